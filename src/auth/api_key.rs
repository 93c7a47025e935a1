//! Opaque bearer API keys, known only by their SHA-256 and compared in constant time.

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::config::ApiKeyConfig;

/// The configured keys' digests and the identities they prove.
#[derive(Default)]
pub(crate) struct ApiKeys {
    keys: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .finish()
    }
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, pair) in bytes.chunks_exact(2).enumerate() {
        let high = (pair[0] as char).to_digit(16)?;
        let low = (pair[1] as char).to_digit(16)?;
        digest[index] = u8::try_from(high * 16 + low).ok()?;
    }
    Some(digest)
}

impl ApiKeys {
    /// The keys of validated settings (a digest that is not 64 hex digits is skipped: validation refuses it).
    pub(crate) fn new(configs: &[ApiKeyConfig]) -> Self {
        let keys = configs
            .iter()
            .filter_map(|config| Some((decode_hex(&config.sha256)?, config.identity.clone())))
            .collect();
        Self { keys }
    }

    /// The identity `key` proves. Every configured digest is compared, in constant time, whatever matches.
    pub(crate) fn identify(&self, key: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found: Option<&str> = None;
        for (configured, identity) in &self.keys {
            let equal: Choice = configured.ct_eq(&digest);
            if bool::from(equal) && found.is_none() {
                found = Some(identity);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(digest: &[u8]) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_right_key_proves_its_identity_and_others_nothing() {
        let keys = ApiKeys::new(&[
            ApiKeyConfig {
                identity: "billing-batch".into(),
                sha256: hex(&Sha256::digest(b"s3cret-key-1")),
            },
            ApiKeyConfig {
                identity: "audit".into(),
                sha256: hex(&Sha256::digest(b"s3cret-key-2")).to_uppercase(),
            },
        ]);
        assert_eq!(keys.identify("s3cret-key-1"), Some("billing-batch"));
        assert_eq!(keys.identify("s3cret-key-2"), Some("audit"));
        assert_eq!(keys.identify("s3cret-key-3"), None);
        assert_eq!(keys.identify(""), None);
        assert!(!format!("{keys:?}").contains(&hex(&Sha256::digest(b"s3cret-key-1"))));
    }
}
