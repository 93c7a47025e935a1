//! Bearer credentials and JWKS documents as the gateway's `auth` module reads them: a JWKS document
//! (`auth::jwks::check_document`), a token's unverified header and claims (`auth::jwt::inspect`), the whole
//! `authenticate` path of an `authorization` value (as a bearer credential and as a `SharedAccessSignature`)
//! against an authenticator with one ES256 key, one API key and one SAS key, and a client certificate's identity (`auth::certificate::identity`) from the same bytes as DER.
//!
//! Checked: nothing panics; a JWKS document keeps at most `MAX_JWKS_KEYS` keys; no input forges an identity
//! (only the seed's signed header and claims authenticate: the key's private half is gone, and nobody knows
//! a key hashing to the configured digest, and the SAS key is drawn at random per run); no refusal's message
//! repeats the input.

#![no_main]

use std::io::Read as _;
use std::sync::LazyLock;

use eventhub_gateway::auth::jwks::{MAX_JWKS_KEYS, check_document};
use eventhub_gateway::auth::{
    ApiKeyConfig, AuthConfig, Authenticator, Credentials, GrantConfig, JwtIssuerConfig,
    SasKeyConfig, certificate, jwt,
};
use libfuzzer_sys::fuzz_target;
use tokio_util::sync::CancellationToken;

/// The public half of a throwaway P-256 key; its private half was discarded once it had signed one token,
/// the seed `seeds/jwt/es256_token` (valid until 2100), so that mutations start from the claims checks.
const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "nC9PCU-9wBFkZFd-EAan4vyR5CVsUmLnxjXmrgdDu-c", "y": "DRzfvTJQyI4zWSM27tAjW4Lyiwo9AiV8ODcBZAK-Aao", "kid": "fuzz-es256", "alg": "ES256", "use": "sig"}]}"#;

/// The header and claims that seed's signature covers: the only ones any input may prove an identity with.
const SIGNED: &str = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImZ1enotZXMyNTYiLCJ0eXAiOiJKV1QifQ.eyJpc3MiOiJodHRwczovL2lzc3Vlci5mdXp6IiwiYXVkIjoiZXZlbnRodWItZ2F0ZXdheSIsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDphOmIiLCJleHAiOjQxMDI0NDQ4MDAsIm5iZiI6MTcwMDAwMDAwMH0";

/// Appended to inputs to see whether a refusal repeats the credential it refused.
const CANARY: &str = "zQ7canaryXv";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    authenticator: std::sync::Arc<Authenticator>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let jwks_file =
        std::env::temp_dir().join(format!("eventhub-fuzz-jwks-{}.json", std::process::id()));
    std::fs::write(&jwks_file, JWKS).expect("the JWKS file");
    // A SAS key no input can know: 32 random bytes, drawn per run.
    let mut sas_key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut sas_key))
        .expect("random bytes");
    let sas_key_file =
        std::env::temp_dir().join(format!("eventhub-fuzz-sas-{}.key", std::process::id()));
    let sas_key_hex: String = sas_key.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(&sas_key_file, sas_key_hex).expect("the SAS key file");
    let hubs = vec!["eh1".to_owned()];
    let config = AuthConfig {
        required: true,
        jwt: vec![JwtIssuerConfig {
            issuer: "https://issuer.fuzz".into(),
            audiences: vec!["eventhub-gateway".into()],
            jwks_file: Some(jwks_file),
            jwks_url: None,
            ca_file: None,
            bearer_token_file: None,
            identity_claim: "sub".into(),
            leeway_seconds: 30,
        }],
        api_keys: vec![ApiKeyConfig {
            identity: "batch".into(),
            // A digest nobody knows a preimage of: no input may prove this identity.
            sha256: "9f2c4b1e8d7a6f5e4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a2918f7e6d5c".into(),
        }],
        sas_keys: vec![SasKeyConfig {
            name: "fuzz".into(),
            identity: "devices".into(),
            key_file: Some(sas_key_file),
            key_env: None,
        }],
        grants: vec![GrantConfig {
            name: "all".into(),
            identities: vec!["*".into()],
            event_hubs: vec!["*".into()],
            events_per_second: None,
        }],
    };
    let authenticator = runtime
        .block_on(Authenticator::start(
            &config,
            &hubs,
            CancellationToken::new(),
        ))
        .expect("the authenticator starts");
    Fixture {
        runtime,
        authenticator,
    }
});

fuzz_target!(|data: &[u8]| {
    if let Ok((keys, _skipped)) = check_document(data) {
        assert!(keys <= MAX_JWKS_KEYS, "{keys} keys kept");
    }
    let _ = certificate::identity(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(inspected) = jwt::inspect(text) {
        let _ = jwt::accepted_algorithm(&inspected.header.alg);
    }
    let fixture = &*FIXTURE;
    let authenticate = |authorization: &str| {
        fixture
            .runtime
            .block_on(fixture.authenticator.authenticate(Credentials {
                authorization: Some(authorization),
                peer_certificate: None,
            }))
    };
    if let Ok(caller) = authenticate(&format!("Bearer {text}")) {
        assert!(
            text.trim().starts_with(&format!("{SIGNED}.")),
            "an input other than the signed seed was authenticated: {caller:?}"
        );
    }
    if let Ok(caller) = authenticate(&format!("SharedAccessSignature {text}")) {
        panic!("a SAS token signed without the key was authenticated: {caller:?}");
    }
    // A canary at the credential's end: a refusal that repeats the credential repeats the canary.
    for scheme in ["Bearer", "SharedAccessSignature"] {
        if let Err(error) = authenticate(&format!("{scheme} {text}{CANARY}")) {
            let message = error.to_string();
            assert!(
                !message.contains(CANARY),
                "the refusal repeats the credential: {message}"
            );
        }
    }
});
