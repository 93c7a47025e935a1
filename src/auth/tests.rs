//! The authenticator end to end: tokens signed with keys made at test time, JWKS files and a loopback JWKS
//! endpoint, API keys and client certificates.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::SanType;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "eventhub-gateway";

/// A signing key made for one test run (never a real credential).
struct TestKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    public_pem: String,
}

/// How a PEM private key becomes a signing key.
type FromPem = fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>;

fn test_key(kid: &str, algorithm: Algorithm) -> TestKey {
    if algorithm == Algorithm::EdDSA {
        return ed25519_key(kid);
    }
    let (rcgen_alg, from_pem): (_, FromPem) = match algorithm {
        Algorithm::RS256 | Algorithm::PS256 => {
            (&rcgen::PKCS_RSA_SHA256, EncodingKey::from_rsa_pem as _)
        }
        Algorithm::ES256 => (
            &rcgen::PKCS_ECDSA_P256_SHA256,
            EncodingKey::from_ec_pem as _,
        ),
        Algorithm::ES384 => (
            &rcgen::PKCS_ECDSA_P384_SHA384,
            EncodingKey::from_ec_pem as _,
        ),
        Algorithm::EdDSA => (&rcgen::PKCS_ED25519, EncodingKey::from_ed_pem as _),
        other => panic!("no test keys for {other:?}"),
    };
    let pair = rcgen::KeyPair::generate_for(rcgen_alg).unwrap();
    let encoding = from_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&encoding, algorithm).unwrap()).unwrap();
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    TestKey {
        kid: kid.into(),
        algorithm,
        encoding,
        jwk,
        public_pem: pair.public_key_pem(),
    }
}

/// rcgen writes Ed25519 keys as PKCS#8 v1, which aws-lc will not sign with; aws-lc makes v2.
fn ed25519_key(kid: &str) -> TestKey {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let document = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).unwrap();
    let x = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())
    };
    TestKey {
        kid: kid.into(),
        algorithm: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(document.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid, "x": x}),
        public_pem: String::new(),
    }
}

impl TestKey {
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    jwt::now_unix() as i64
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": [AUDIENCE], "sub": sub, "exp": now() + 600, "iat": now()})
}

fn claims_with(sub: &str, key: &str, value: Value) -> Value {
    let mut claims = claims(sub);
    claims[key] = value;
    claims
}

fn hubs() -> Vec<String> {
    vec!["orders".into(), "payments".into(), "audit".into()]
}

fn grants() -> Vec<GrantConfig> {
    vec![
        GrantConfig {
            name: "billing".into(),
            identities: vec![
                "system:serviceaccount:billing:*".into(),
                "spiffe://cluster.local/ns/billing/*".into(),
                "billing-batch".into(),
            ],
            event_hubs: vec!["orders".into()],
            events_per_second: NonZeroU32::new(5000),
        },
        GrantConfig {
            name: "ops".into(),
            identities: vec!["system:serviceaccount:ops:*".into(), "*.ops.svc".into()],
            event_hubs: vec!["*".into()],
            events_per_second: None,
        },
    ]
}

fn issuer_config(jwks_file: &Path) -> JwtIssuerConfig {
    JwtIssuerConfig {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks_file: Some(jwks_file.to_owned()),
        jwks_url: None,
        ca_file: None,
        bearer_token_file: None,
        identity_claim: "sub".into(),
        leeway_seconds: 30,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const API_KEY: &str = "test-only-api-key-0123456789";

fn fast_timing() -> Timing {
    Timing {
        file_recheck: Duration::ZERO,
        url_refetch: Duration::from_millis(1500),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        fetch_timeout: Duration::from_secs(5),
        ..Timing::default()
    }
}

struct Fixture {
    authenticator: Arc<Authenticator>,
    rsa: TestKey,
    ec: TestKey,
    ed: TestKey,
    _dir: tempfile::TempDir,
    jwks_path: std::path::PathBuf,
    shutdown: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn fixture(required: bool) -> Fixture {
    let rsa = test_key("rsa-1", Algorithm::RS256);
    let ec = test_key("ec-1", Algorithm::ES256);
    let ed = test_key("ed-1", Algorithm::EdDSA);
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[&rsa, &ec, &ed])).unwrap();
    let config = AuthConfig {
        required,
        jwt: vec![issuer_config(&jwks_path)],
        api_keys: vec![ApiKeyConfig {
            identity: "billing-batch".into(),
            sha256: hex(&Sha256::digest(API_KEY)),
        }],
        grants: grants(),
        ..AuthConfig::default()
    };
    let shutdown = CancellationToken::new();
    let authenticator =
        Authenticator::start_with(&config, &hubs(), shutdown.clone(), fast_timing())
            .await
            .unwrap();
    Fixture {
        authenticator,
        rsa,
        ec,
        ed,
        _dir: dir,
        jwks_path,
        shutdown,
    }
}

async fn bearer(authenticator: &Authenticator, token: &str) -> Result<Caller, AuthError> {
    let header = format!("Bearer {token}");
    authenticator
        .authenticate(Credentials {
            authorization: Some(&header),
            peer_certificate: None,
        })
        .await
}

/// The identity and grant names of an identified caller.
fn identified(caller: Caller) -> (Identity, Vec<String>, Access) {
    match caller {
        Caller::Identified { identity, access } => {
            let names = access.grant_names().map(str::to_owned).collect();
            (identity, names, access)
        }
        Caller::Anonymous => panic!("expected an identity, got Anonymous"),
    }
}

/// Checks the refusal's reason and that its message holds no part of the token.
fn refused(result: Result<Caller, AuthError>, token: &str, reason: &str) -> AuthError {
    let error = match result {
        Err(error) => error,
        Ok(caller) => panic!("expected {reason}, got {caller:?}"),
    };
    assert_eq!(error.reason(), reason, "{error}");
    assert_never_echoes(&error, token);
    error
}

fn assert_never_echoes(error: &AuthError, token: &str) {
    let message = format!("{error} {error:?}");
    for part in token.split('.').filter(|part| part.len() >= 8) {
        assert!(!message.contains(part), "{message:?} echoes the credential");
    }
}

#[tokio::test]
async fn valid_tokens_of_each_key_type_get_their_grants() {
    let fixture = fixture(true).await;
    for (key, sub, expected) in [
        (
            &fixture.rsa,
            "system:serviceaccount:billing:api",
            vec!["billing"],
        ),
        (
            &fixture.ec,
            "system:serviceaccount:ops:deployer",
            vec!["ops"],
        ),
        (
            &fixture.ed,
            "system:serviceaccount:billing:worker",
            vec!["billing"],
        ),
        (&fixture.ed, "system:serviceaccount:nobody:x", vec![]),
    ] {
        let token = key.sign(&claims(sub));
        let (identity, grants, access) =
            identified(bearer(&fixture.authenticator, &token).await.unwrap());
        assert_eq!(identity.name, sub);
        assert_eq!(identity.source, IdentitySource::Jwt);
        assert_eq!(grants, expected, "{sub}");
        if expected == ["billing"] {
            assert_eq!(access.grant_for("orders").unwrap().name, "billing");
            assert!(access.grant_for("payments").is_none());
            assert_eq!(access.events_per_second(), NonZeroU32::new(5000));
        }
    }
}

#[tokio::test]
async fn the_scheme_is_case_insensitive_and_others_are_refused() {
    let fixture = fixture(true).await;
    let token = fixture
        .rsa
        .sign(&claims("system:serviceaccount:billing:api"));
    for header in [format!("bearer {token}"), format!("BEARER   {token} ")] {
        let caller = fixture
            .authenticator
            .authenticate(Credentials {
                authorization: Some(&header),
                peer_certificate: None,
            })
            .await;
        identified(caller.unwrap());
    }
    for (header, reason) in [
        (format!("Basic {token}"), "unsupported_scheme"),
        (token.clone(), "unsupported_scheme"),
        ("Bearer".to_string(), "malformed"),
        ("Bearer    ".to_string(), "malformed"),
    ] {
        let result = fixture
            .authenticator
            .authenticate(Credentials {
                authorization: Some(&header),
                peer_certificate: None,
            })
            .await;
        refused(result, &token, reason);
    }
}

#[tokio::test]
async fn time_claims_are_checked_with_leeway() {
    let fixture = fixture(true).await;
    let sub = "system:serviceaccount:billing:api";
    let within = fixture
        .rsa
        .sign(&claims_with(sub, "exp", json!(now() - 10)));
    identified(bearer(&fixture.authenticator, &within).await.unwrap());
    let expired = fixture
        .rsa
        .sign(&claims_with(sub, "exp", json!(now() - 100)));
    let error = refused(
        bearer(&fixture.authenticator, &expired).await,
        &expired,
        "expired",
    );
    assert!(
        error.to_string().starts_with("the token expired 10"),
        "{error}"
    );
    let early = fixture.ec.sign(&claims_with(sub, "nbf", json!(now() + 20)));
    identified(bearer(&fixture.authenticator, &early).await.unwrap());
    let future = fixture
        .ec
        .sign(&claims_with(sub, "nbf", json!(now() + 300)));
    refused(
        bearer(&fixture.authenticator, &future).await,
        &future,
        "not_yet_valid",
    );
    let mut no_exp = claims(sub);
    no_exp.as_object_mut().unwrap().remove("exp");
    let no_exp = fixture.ed.sign(&no_exp);
    refused(
        bearer(&fixture.authenticator, &no_exp).await,
        &no_exp,
        "malformed",
    );
}

#[tokio::test]
async fn issuer_audience_and_identity_claim_are_checked() {
    let fixture = fixture(true).await;
    let sub = "system:serviceaccount:billing:api";
    let wrong_issuer = fixture
        .rsa
        .sign(&claims_with(sub, "iss", json!("https://evil.example")));
    let error = refused(
        bearer(&fixture.authenticator, &wrong_issuer).await,
        &wrong_issuer,
        "wrong_issuer",
    );
    assert!(error.to_string().contains(ISSUER), "{error}");
    let wrong_audience = fixture
        .rsa
        .sign(&claims_with(sub, "aud", json!("something-else")));
    let error = refused(
        bearer(&fixture.authenticator, &wrong_audience).await,
        &wrong_audience,
        "wrong_audience",
    );
    assert_eq!(
        error.to_string(),
        "the token's audience is not one of eventhub-gateway"
    );
    let mut no_sub = claims(sub);
    no_sub.as_object_mut().unwrap().remove("sub");
    let no_sub = fixture.rsa.sign(&no_sub);
    refused(
        bearer(&fixture.authenticator, &no_sub).await,
        &no_sub,
        "no_identity_claim",
    );
}

#[tokio::test]
async fn forged_and_broken_tokens_are_refused() {
    let fixture = fixture(true).await;
    let sub = "system:serviceaccount:billing:api";
    let b64 = |value: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };

    let unknown = test_key("rsa-unknown", Algorithm::RS256).sign(&claims(sub));
    refused(
        bearer(&fixture.authenticator, &unknown).await,
        &unknown,
        "unknown_key",
    );

    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "rsa-1"})),
        b64(&claims(sub))
    );
    let error = refused(
        bearer(&fixture.authenticator, &none).await,
        &none,
        "algorithm_refused",
    );
    assert!(
        error.to_string().contains("algorithm none is refused"),
        "{error}"
    );

    // The classic confusion: HMAC keyed with the RSA public key's PEM.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let hs256 = jsonwebtoken::encode(
        &header,
        &claims(sub),
        &EncodingKey::from_secret(fixture.rsa.public_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let error = refused(
        bearer(&fixture.authenticator, &hs256).await,
        &hs256,
        "algorithm_refused",
    );
    assert!(error.to_string().contains("HS256"), "{error}");

    // An ES256 header naming the RSA key.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-1".into());
    let mismatch = jsonwebtoken::encode(&header, &claims(sub), &fixture.ec.encoding).unwrap();
    let error = refused(
        bearer(&fixture.authenticator, &mismatch).await,
        &mismatch,
        "algorithm_refused",
    );
    assert!(
        error
            .to_string()
            .contains("does not fit its key (an RSA key)"),
        "{error}"
    );

    let genuine = fixture.rsa.sign(&claims(sub));
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let tampered_claims = b64(&claims("system:serviceaccount:ops:admin"));
    parts[1] = &tampered_claims;
    let tampered = parts.join(".");
    refused(
        bearer(&fixture.authenticator, &tampered).await,
        &tampered,
        "bad_signature",
    );

    let other_signature = fixture
        .rsa
        .sign(&claims("system:serviceaccount:billing:other"));
    let spliced = format!(
        "{}.{}",
        genuine.rsplit_once('.').unwrap().0,
        other_signature.rsplit_once('.').unwrap().1
    );
    refused(
        bearer(&fixture.authenticator, &spliced).await,
        &spliced,
        "bad_signature",
    );

    for garbage in [
        "garbage",
        "a.b.c",
        "eyJhbGciOiJSUzI1NiJ9.%%%.sig",
        "....",
        "x.y",
    ] {
        let reason = if garbage == "a.b.c" {
            "malformed"
        } else {
            "unknown_api_key"
        };
        refused(
            bearer(&fixture.authenticator, garbage).await,
            garbage,
            reason,
        );
    }
    let header_garbage = format!("{}.e30.c2ln", b64(&json!({"alg": "RS256", "kid": "rsa-1"})));
    refused(
        bearer(&fixture.authenticator, &header_garbage).await,
        &header_garbage,
        "wrong_issuer",
    );

    let long = format!(
        "{}.{}.{}",
        "a".repeat(5000),
        "b".repeat(5000),
        "c".repeat(10)
    );
    let error = refused(
        bearer(&fixture.authenticator, &long).await,
        &long,
        "too_long",
    );
    assert_eq!(
        error.to_string(),
        "the bearer token is 10012 bytes long; at most 8192 are accepted"
    );
}

#[tokio::test]
async fn api_keys_right_and_wrong() {
    let fixture = fixture(true).await;
    let (identity, grants, _) = identified(bearer(&fixture.authenticator, API_KEY).await.unwrap());
    assert_eq!(identity.name, "billing-batch");
    assert_eq!(identity.source, IdentitySource::ApiKey);
    assert_eq!(grants, ["billing"]);
    let wrong = "test-only-api-key-0123456780";
    let error = refused(
        bearer(&fixture.authenticator, wrong).await,
        wrong,
        "unknown_api_key",
    );
    assert!(!error.to_string().contains("0123456780"));
}

#[tokio::test]
async fn client_certificates_name_their_identity() {
    use super::certificate::tests::certificate;
    let fixture = fixture(true).await;
    let cases = [
        (
            certificate(
                vec![
                    SanType::DnsName("api.billing.svc".try_into().unwrap()),
                    SanType::URI(
                        "spiffe://cluster.local/ns/billing/sa/api"
                            .try_into()
                            .unwrap(),
                    ),
                ],
                Some("cn"),
            ),
            "spiffe://cluster.local/ns/billing/sa/api",
            vec!["billing"],
        ),
        (
            certificate(
                vec![SanType::DnsName("deployer.ops.svc".try_into().unwrap())],
                Some("cn"),
            ),
            "deployer.ops.svc",
            vec!["ops"],
        ),
        (
            certificate(vec![], Some("billing-batch")),
            "billing-batch",
            vec!["billing"],
        ),
    ];
    for (der, name, expected) in cases {
        let caller = fixture
            .authenticator
            .authenticate(Credentials {
                authorization: None,
                peer_certificate: Some(&der),
            })
            .await
            .unwrap();
        let (identity, grants, _) = identified(caller);
        assert_eq!(identity.name, name);
        assert_eq!(identity.source, IdentitySource::Certificate);
        assert_eq!(grants, expected);
    }
    let nameless = certificate(vec![], None);
    let credentials = Credentials {
        authorization: None,
        peer_certificate: Some(&nameless),
    };
    let error = fixture
        .authenticator
        .authenticate(credentials)
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "no_certificate_identity");

    let relaxed = self::fixture(false).await;
    assert!(matches!(
        relaxed.authenticator.authenticate(credentials).await,
        Ok(Caller::Anonymous)
    ));
}

#[tokio::test]
async fn no_credentials_is_missing_only_when_required() {
    let required = fixture(true).await;
    let error = required
        .authenticator
        .authenticate(Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "missing");
    assert!(required.authenticator.required());
    let relaxed = fixture(false).await;
    assert!(matches!(
        relaxed
            .authenticator
            .authenticate(Credentials::default())
            .await,
        Ok(Caller::Anonymous)
    ));
    // A credential sent anyway is still checked.
    refused(
        bearer(&relaxed.authenticator, "nope").await,
        "nope",
        "unknown_api_key",
    );
}

#[tokio::test]
async fn a_rewritten_jwks_file_brings_in_a_new_kid() {
    let fixture = fixture(true).await;
    let rotated = test_key("rsa-2", Algorithm::RS256);
    let token = rotated.sign(&claims("system:serviceaccount:billing:api"));
    refused(
        bearer(&fixture.authenticator, &token).await,
        &token,
        "unknown_key",
    );
    std::fs::write(&fixture.jwks_path, jwks(&[&fixture.rsa, &rotated])).unwrap();
    identified(bearer(&fixture.authenticator, &token).await.unwrap());
    // The keys dropped from the file are gone.
    let old = fixture
        .ec
        .sign(&claims("system:serviceaccount:billing:api"));
    refused(
        bearer(&fixture.authenticator, &old).await,
        &old,
        "unknown_key",
    );
    // A half-written file (re-read for an unknown kid) keeps the previous keys.
    std::fs::write(&fixture.jwks_path, "{\"keys\": [").unwrap();
    let unknown =
        test_key("rsa-3", Algorithm::ES256).sign(&claims("system:serviceaccount:billing:api"));
    refused(
        bearer(&fixture.authenticator, &unknown).await,
        &unknown,
        "unknown_key",
    );
    identified(bearer(&fixture.authenticator, &token).await.unwrap());
}

#[tokio::test]
async fn an_unusable_jwks_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let config = |path: &Path| AuthConfig {
        jwt: vec![issuer_config(path)],
        ..AuthConfig::default()
    };
    let Err(AuthSetupError::Invalid { field, problem }) =
        Authenticator::start(&config(&path), &hubs(), CancellationToken::new()).await
    else {
        panic!("a missing file must stop the start");
    };
    assert_eq!(field, "auth.jwt[0].jwks_file");
    assert!(problem.contains("cannot read"), "{problem}");
    std::fs::write(&path, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    let Err(AuthSetupError::Invalid { problem, .. }) =
        Authenticator::start(&config(&path), &hubs(), CancellationToken::new()).await
    else {
        panic!("a JWKS without usable keys must stop the start");
    };
    assert!(problem.contains("symmetric"), "{problem}");
    let mut invalid = config(&path);
    invalid.jwt[0].audiences.clear();
    let Err(AuthSetupError::Invalid { field, .. }) =
        Authenticator::start(&invalid, &hubs(), CancellationToken::new()).await
    else {
        panic!("an invalid config must stop the start");
    };
    assert_eq!(field, "auth.jwt[0].audiences");
}

/// A loopback JWKS endpoint answering `document` to every request, counting them and keeping the last
/// request's `authorization` header.
struct JwksServer {
    url: String,
    document: Arc<parking_lot::Mutex<String>>,
    hits: Arc<AtomicUsize>,
    authorization: Arc<parking_lot::Mutex<Option<String>>>,
}

async fn jwks_server(document: String) -> JwksServer {
    jwks_server_over(document, None).await
}

/// Reads one request's head, records it, and answers `document`.
async fn answer<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    mut stream: S,
    document: &parking_lot::Mutex<String>,
    hits: &AtomicUsize,
    authorization: &parking_lot::Mutex<Option<String>>,
) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let text = String::from_utf8_lossy(&request);
    *authorization.lock() = text
        .lines()
        .find_map(|line| line.strip_prefix("authorization: ").map(str::to_owned));
    let body = document.lock().clone();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: max-age=3600\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The endpoint over plain HTTP, or over TLS with `tls`.
async fn jwks_server_over(document: String, tls: Option<Arc<rustls::ServerConfig>>) -> JwksServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = match tls {
        Some(_) => format!("https://localhost:{port}/openid/v1/jwks"),
        None => format!("http://127.0.0.1:{port}/openid/v1/jwks"),
    };
    let server = JwksServer {
        url,
        document: Arc::new(parking_lot::Mutex::new(document)),
        hits: Arc::new(AtomicUsize::new(0)),
        authorization: Arc::new(parking_lot::Mutex::new(None)),
    };
    let (document, hits, authorization) = (
        Arc::clone(&server.document),
        Arc::clone(&server.hits),
        Arc::clone(&server.authorization),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            match &tls {
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                    if let Ok(stream) = acceptor.accept(stream).await {
                        answer(stream, &document, &hits, &authorization).await;
                    }
                }
                None => answer(stream, &document, &hits, &authorization).await,
            }
        }
    });
    server
}

fn url_config(url: &str, token_file: Option<&Path>) -> AuthConfig {
    AuthConfig {
        required: true,
        jwt: vec![JwtIssuerConfig {
            jwks_file: None,
            jwks_url: Some(url.into()),
            bearer_token_file: token_file.map(Path::to_owned),
            ..issuer_config(Path::new("unused"))
        }],
        api_keys: Vec::new(),
        grants: grants(),
        sas_keys: Vec::new(),
    }
}

#[tokio::test]
async fn a_jwks_url_is_fetched_refetched_for_a_new_kid_and_rate_limited() {
    let first = test_key("k1", Algorithm::ES256);
    let second = test_key("k2", Algorithm::RS256);
    let server = jwks_server(jwks(&[&first])).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "cluster-token\n").unwrap();
    let shutdown = CancellationToken::new();
    let authenticator = Authenticator::start_with(
        &url_config(&server.url, Some(&token_file)),
        &hubs(),
        shutdown.clone(),
        fast_timing(),
    )
    .await
    .unwrap();
    let sub = "system:serviceaccount:billing:api";
    let token = first.sign(&claims(sub));
    identified(bearer(&authenticator, &token).await.unwrap());
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "one fetch at start");
    assert_eq!(
        server.authorization.lock().as_deref(),
        Some("Bearer cluster-token")
    );

    // The endpoint rotates; a token with the new kid arrives before the next refresh.
    *server.document.lock() = jwks(&[&first, &second]);
    tokio::time::sleep(fast_timing().url_refetch).await;
    let rotated = second.sign(&claims(sub));
    identified(bearer(&authenticator, &rotated).await.unwrap());
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        2,
        "re-fetched for the unknown kid"
    );

    // A flood of bogus kids within the interval costs no fetch.
    for n in 0..20 {
        let bogus = test_key(&format!("bogus-{n}"), Algorithm::ES256).sign(&claims(sub));
        refused(bearer(&authenticator, &bogus).await, &bogus, "unknown_key");
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 2, "rate-limited");
    shutdown.cancel();
}

#[tokio::test]
async fn an_https_jwks_url_is_trusted_through_its_ca_file_only() {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let signing = test_key("k1", Algorithm::ES256);
    let server = jwks_server_over(jwks(&[&signing]), Some(Arc::new(tls))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let token = signing.sign(&claims("system:serviceaccount:billing:api"));

    let mut config = url_config(&server.url, None);
    config.jwt[0].ca_file = Some(ca_file);
    let shutdown = CancellationToken::new();
    let trusting = Authenticator::start_with(&config, &hubs(), shutdown.clone(), fast_timing())
        .await
        .unwrap();
    identified(bearer(&trusting, &token).await.unwrap());

    // Without the CA the same endpoint is not trusted, and no keys arrive.
    let untrusting = Authenticator::start_with(
        &url_config(&server.url, None),
        &hubs(),
        shutdown.clone(),
        fast_timing(),
    )
    .await
    .unwrap();
    refused(
        bearer(&untrusting, &token).await,
        &token,
        "keys_unavailable",
    );

    config.jwt[0].ca_file = Some(dir.path().join("missing.pem"));
    let Err(AuthSetupError::Invalid { field, .. }) =
        Authenticator::start(&config, &hubs(), shutdown.clone()).await
    else {
        panic!("an unreadable ca_file must stop the start");
    };
    assert_eq!(field, "auth.jwt[0].ca_file");
    shutdown.cancel();
}

/// Every log line written while it is alive, at every level (current-thread tests only).
#[derive(Clone, Default)]
struct CapturedLogs(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn start(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

#[tokio::test]
async fn tokens_before_any_keys_are_keys_unavailable_and_no_log_holds_a_credential() {
    let logs = CapturedLogs::default();
    let _guard = logs.start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "cluster-token-secret").unwrap();
    let shutdown = CancellationToken::new();
    let authenticator = Authenticator::start_with(
        &url_config(&url, Some(&token_file)),
        &hubs(),
        shutdown.clone(),
        fast_timing(),
    )
    .await
    .unwrap();
    let token = test_key("k1", Algorithm::EdDSA).sign(&claims("system:serviceaccount:billing:api"));
    let error = refused(
        bearer(&authenticator, &token).await,
        &token,
        "keys_unavailable",
    );
    assert!(error.to_string().contains(ISSUER), "{error}");
    // The task retries with backoff meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    shutdown.cancel();

    // Then the endpoint answers, with the token file sent and tokens verified.
    let key = test_key("k2", Algorithm::ES256);
    let server = jwks_server(jwks(&[&key])).await;
    let shutdown = CancellationToken::new();
    let authenticator = Authenticator::start_with(
        &url_config(&server.url, Some(&token_file)),
        &hubs(),
        shutdown.clone(),
        fast_timing(),
    )
    .await
    .unwrap();
    let good = key.sign(&claims("system:serviceaccount:billing:api"));
    identified(bearer(&authenticator, &good).await.unwrap());
    let forged = format!("{}.{}", good.rsplit_once('.').unwrap().0, "A".repeat(86));
    refused(
        bearer(&authenticator, &forged).await,
        &forged,
        "bad_signature",
    );
    refused(
        bearer(&authenticator, API_KEY).await,
        API_KEY,
        "unknown_api_key",
    );
    shutdown.cancel();

    let text = logs.text();
    assert!(
        text.contains("JWKS fetch failed"),
        "logs were captured: {text}"
    );
    assert!(
        text.matches("JWKS fetch failed").count() >= 2,
        "retried: {text}"
    );
    for secret in ["cluster-token-secret", API_KEY]
        .into_iter()
        .chain(token.split('.'))
        .chain(good.split('.'))
    {
        assert!(
            !text.contains(secret),
            "a log line holds a credential: {text}"
        );
    }
}

#[tokio::test]
async fn the_refresh_task_retries_a_bad_answer_and_stops_at_shutdown_or_drop() {
    let server = jwks_server("{}".into()).await;
    let config = url_config(&server.url, None);
    let shutdown = CancellationToken::new();
    let authenticator =
        Authenticator::start_with(&config, &hubs(), shutdown.clone(), fast_timing())
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let retried = server.hits.load(Ordering::SeqCst);
    assert!(retried >= 3, "retried with backoff: {retried}");
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = server.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        stopped,
        "no fetch after shutdown"
    );
    drop(authenticator);

    let dropped =
        Authenticator::start_with(&config, &hubs(), CancellationToken::new(), fast_timing())
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after_drop = server.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        after_drop,
        "no fetch once dropped"
    );
}

#[tokio::test]
async fn a_jwk_stating_its_alg_admits_only_that_alg() {
    let rs = test_key("rsa-stated", Algorithm::RS256);
    let mut ps = test_key("rsa-open", Algorithm::RS256);
    ps.jwk.as_object_mut().unwrap().remove("alg");
    let es384 = test_key("ec-384", Algorithm::ES384);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&rs, &ps, &es384])).unwrap();
    let config = AuthConfig {
        jwt: vec![issuer_config(&path)],
        grants: grants(),
        ..AuthConfig::default()
    };
    let authenticator = Authenticator::start(&config, &hubs(), CancellationToken::new())
        .await
        .unwrap();
    let sub = "system:serviceaccount:ops:x";
    let sign_as = |key: &TestKey, algorithm: Algorithm| {
        let mut header = Header::new(algorithm);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims(sub), &key.encoding).unwrap()
    };
    let stated = sign_as(&rs, Algorithm::PS256);
    let error = refused(
        bearer(&authenticator, &stated).await,
        &stated,
        "algorithm_refused",
    );
    assert!(error.to_string().contains("PS256"), "{error}");
    for token in [
        sign_as(&rs, Algorithm::RS256),
        sign_as(&ps, Algorithm::PS256),
        sign_as(&ps, Algorithm::RS512),
        sign_as(&es384, Algorithm::ES384),
    ] {
        let (_, grants, _) = identified(bearer(&authenticator, &token).await.unwrap());
        assert_eq!(grants, ["ops"]);
    }
}

#[tokio::test]
async fn an_oversized_jwks_answer_is_refused() {
    let key = test_key("k1", Algorithm::ES256);
    let padding = " ".repeat(jwks::MAX_JWKS_BYTES);
    let server = jwks_server(format!("{}{padding}", jwks(&[&key]))).await;
    let shutdown = CancellationToken::new();
    let authenticator = Authenticator::start_with(
        &url_config(&server.url, None),
        &hubs(),
        shutdown.clone(),
        fast_timing(),
    )
    .await
    .unwrap();
    let token = key.sign(&claims("system:serviceaccount:billing:api"));
    refused(
        bearer(&authenticator, &token).await,
        &token,
        "keys_unavailable",
    );
    assert!(server.hits.load(Ordering::SeqCst) >= 1);
    assert!(jwks::check_document(padding.as_bytes()).is_err());
    assert_eq!(jwks::check_document(jwks(&[&key]).as_bytes()).unwrap().0, 1);
    shutdown.cancel();
}

#[test]
fn every_reason_is_a_distinct_bounded_label() {
    let errors = [
        AuthError::Missing,
        AuthError::Malformed { problem: "x" },
        AuthError::UnsupportedScheme,
        AuthError::TooLong {
            length: 9,
            limit: 8,
        },
        AuthError::Expired { seconds_ago: 1 },
        AuthError::NotYetValid { seconds_ahead: 1 },
        AuthError::WrongIssuer {
            configured: "i".into(),
        },
        AuthError::WrongAudience {
            accepted: "a".into(),
        },
        AuthError::UnknownKey,
        AuthError::AlgorithmRefused { algorithm: "none" },
        AuthError::BadSignature,
        AuthError::UnknownApiKey,
        AuthError::NoIdentityClaim {
            claim: "sub".into(),
        },
        AuthError::KeysUnavailable { issuer: "i".into() },
        AuthError::NoCertificateIdentity,
    ];
    let reasons: std::collections::HashSet<&str> = errors.iter().map(AuthError::reason).collect();
    assert_eq!(reasons.len(), errors.len());
    assert!(
        reasons
            .iter()
            .all(|reason| reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    );
    assert_eq!(
        AuthError::AlgorithmMismatch {
            algorithm: "ES256",
            key: "an RSA key"
        }
        .reason(),
        "algorithm_refused"
    );
}

#[tokio::test]
async fn a_sas_token_proves_its_keys_identity_limited_to_its_resource() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("devices.key");
    std::fs::write(&key_path, "device-secret\n").unwrap();
    let config = AuthConfig {
        required: true,
        sas_keys: vec![SasKeyConfig {
            name: "devices".into(),
            identity: "billing-batch".into(),
            key_file: Some(key_path),
            key_env: None,
        }],
        grants: grants(),
        ..AuthConfig::default()
    };
    let authenticator = Authenticator::start(&config, &hubs(), CancellationToken::new())
        .await
        .unwrap();
    let now = jwt::now_unix();
    let token = eventhub_wire::sas::sign_token(
        "https://gw:8080/orders",
        "devices",
        "device-secret",
        now + 60,
    );
    let caller = authenticator
        .authenticate(Credentials {
            authorization: Some(&token),
            peer_certificate: None,
        })
        .await
        .unwrap();
    let (identity, grants, access) = identified(caller);
    assert_eq!(identity.name, "billing-batch");
    assert_eq!(identity.source, IdentitySource::SharedAccessSignature);
    // The scheme is case-insensitive, as HTTP's are.
    let lower = token.replacen("SharedAccessSignature ", "sharedaccesssignature  ", 1);
    let caller = authenticator
        .authenticate(Credentials {
            authorization: Some(&lower),
            peer_certificate: None,
        })
        .await
        .unwrap();
    assert_eq!(identified(caller).0.name, "billing-batch");
    assert_eq!(grants, ["billing"]);
    let resource = access
        .sas_resource()
        .expect("a SAS caller is limited to its sr");
    assert!(resource.covers("orders", &[]));
    assert!(!resource.covers("payments", &[]));

    let forged =
        eventhub_wire::sas::sign_token("https://gw/orders", "devices", "guessed", now + 60);
    refused(
        authenticator
            .authenticate(Credentials {
                authorization: Some(&forged),
                peer_certificate: None,
            })
            .await,
        &forged,
        "sas_bad_signature",
    );
    // A bearer credential is still a bearer credential: SAS keys do not change how those are read.
    let bearer = refused(
        authenticator
            .authenticate(Credentials {
                authorization: Some("Bearer device-secret"),
                peer_certificate: None,
            })
            .await,
        "device-secret",
        "unknown_api_key",
    );
    assert!(matches!(bearer, AuthError::UnknownApiKey));
}

#[tokio::test]
async fn a_sas_token_without_sas_keys_names_no_key_and_auth_off_ignores_it() {
    let required = AuthConfig {
        required: true,
        api_keys: vec![ApiKeyConfig {
            identity: "billing-batch".into(),
            sha256: "a".repeat(64),
        }],
        grants: grants(),
        ..AuthConfig::default()
    };
    let token =
        eventhub_wire::sas::sign_token("sb://ns/orders", "devices", "k", jwt::now_unix() + 60);
    let credentials = Credentials {
        authorization: Some(&token),
        peer_certificate: None,
    };
    let authenticator = Authenticator::start(&required, &hubs(), CancellationToken::new())
        .await
        .unwrap();
    refused(
        authenticator.authenticate(credentials).await,
        &token,
        "sas_unknown_key_name",
    );
    let off = Authenticator::start(&AuthConfig::default(), &hubs(), CancellationToken::new())
        .await
        .unwrap();
    assert!(matches!(
        off.authenticate(credentials).await.unwrap(),
        Caller::Anonymous
    ));
}
