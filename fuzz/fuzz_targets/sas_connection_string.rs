//! Shared access signatures (`eventhub_wire::sas::SasToken::parse` and `verify`) and connection strings
//! (`eventhub_producer::ConnectionString`'s `FromStr`, then `endpoint_for` and `credential_for`).
//!
//! Input: one selector byte (bit 0: a connection string instead of a SAS token), then UTF-8 text. Checked:
//! a parsed token re-signed with a key verifies before its expiry and fails after it, and a parsed
//! connection string's `Debug` never shows its key or signature.

#![no_main]

use eventhub_producer::{
    ConnectionString, ProducerConfig, SharedAccess, credential_for, endpoint_for,
};
use eventhub_wire::sas::{SasError, SasToken, sign_token};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "SAS_KEY_VALUE";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if selector & 1 == 0 {
        let Ok(token) = SasToken::parse(text) else {
            return;
        };
        let lookup = |name: &str| (name == token.key_name).then_some(KEY);
        let _ = token.verify(lookup, token.expires_at.saturating_sub(1));
        // Signed for real, the same claims verify until the expiry and not at it.
        let signed = sign_token(&token.resource, &token.key_name, KEY, token.expires_at);
        let reparsed = SasToken::parse(&signed).expect("a signed token parses");
        assert_eq!(reparsed.resource, token.resource);
        assert_eq!(reparsed.key_name, token.key_name);
        assert_eq!(reparsed.expires_at, token.expires_at);
        if token.expires_at > 0 {
            reparsed
                .verify(lookup, token.expires_at - 1)
                .expect("a token signed with the key verifies before it expires");
        }
        assert!(matches!(
            reparsed.verify(lookup, token.expires_at),
            Err(SasError::Expired { .. })
        ));
    } else {
        let Ok(connection) = text.parse::<ConnectionString>() else {
            return;
        };
        let endpoint = endpoint_for(&connection, selector & 2 != 0);
        let _ = format!("{endpoint:?}");
        let _ = credential_for(&connection, &ProducerConfig::default());
        let shown = format!("{connection:?}");
        let (secret, name) = match &connection.shared_access {
            SharedAccess::Key { name, key } => (key.as_str(), format!("{name:?}")),
            SharedAccess::Signature(signature) => (signature.as_str(), String::new()),
        };
        // A secret that is part of what may be shown (the host, path, key name, the redaction's words)
        // proves nothing.
        let showable = format!(
            "{:?}{:?}{name}Key {{ name: , key: <redacted> }}Signature(<redacted>)",
            connection.host, connection.entity_path
        );
        if secret.len() >= 8 && !showable.contains(secret) {
            assert!(
                !shown.contains(secret),
                "a connection string's Debug shows its secret"
            );
        }
    }
});
