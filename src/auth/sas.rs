//! Shared access signatures signed with gateway-issued keys (`[[auth.sas_keys]]`, never an Event Hubs key):
//! the keys read from their files or variables, a token's key name, signature, expiry and resource checked,
//! and the resource (`sr`) a verified token is limited to.

use std::fmt;

use eventhub_wire::sas::{SasError, SasToken};
use subtle::ConstantTimeEq;

use super::AuthError;
use super::config::SasKeyConfig;

/// The longest key accepted from a file or variable (a SAS key is 44 characters of base64).
const MAX_KEY_LEN: usize = 1024;

/// A configured key: its name (`skn`), the identity it proves, its secret.
struct SasKey {
    name: String,
    identity: String,
    secret: String,
}

/// The configured SAS keys. Their secrets never reach `Debug`, logs or errors.
#[derive(Default)]
pub(crate) struct SasKeys {
    keys: Vec<SasKey>,
}

impl fmt::Debug for SasKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|key| key.name.as_str()).collect();
        f.debug_struct("SasKeys").field("names", &names).finish()
    }
}

impl SasKeys {
    /// Reads every key's secret (a file's content, or a variable's value, without its trailing newline);
    /// the error names the setting (`sas_keys[0].key_file`) and never the secret.
    pub(crate) fn load(
        configs: &[SasKeyConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, (String, String)> {
        let mut keys = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let (field, secret) = match (&config.key_file, &config.key_env) {
                (Some(path), _) => (
                    format!("sas_keys[{index}].key_file"),
                    std::fs::read_to_string(path).map_err(|error| {
                        (
                            format!("sas_keys[{index}].key_file"),
                            format!("cannot read {}: {error}", path.display()),
                        )
                    })?,
                ),
                (None, Some(name)) => (
                    format!("sas_keys[{index}].key_env"),
                    env(name).ok_or_else(|| {
                        (
                            format!("sas_keys[{index}].key_env"),
                            format!("the variable {name} is not set"),
                        )
                    })?,
                ),
                (None, None) => {
                    return Err((
                        format!("sas_keys[{index}].key_file"),
                        "set key_file or key_env".into(),
                    ));
                }
            };
            // A file written by `echo` ends in a newline that is no part of the key.
            let secret = secret.trim_end_matches(['\r', '\n']).to_owned();
            if secret.is_empty() {
                return Err((field, "the key is empty".into()));
            }
            if secret.len() > MAX_KEY_LEN {
                return Err((field, format!("the key is over {MAX_KEY_LEN} bytes")));
            }
            keys.push(SasKey {
                name: config.name.clone(),
                identity: config.identity.clone(),
                secret,
            });
        }
        Ok(Self { keys })
    }

    /// Whether any key is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `token` (the whole `SharedAccessSignature ...` value) at `now` (Unix seconds): the identity of
    /// its key and the resource it is limited to.
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<(String, SasResource), AuthError> {
        let parsed = SasToken::parse(token).map_err(|error| match error {
            SasError::Malformed(problem) => AuthError::Malformed { problem },
            _ => AuthError::Malformed {
                problem: "not a SharedAccessSignature token",
            },
        })?;
        // Every key name is compared, in constant time, whatever matches: the time taken says nothing of
        // which names exist.
        let mut found: Option<&SasKey> = None;
        for key in &self.keys {
            let equal: bool = key.name.as_bytes().ct_eq(parsed.key_name.as_bytes()).into();
            if equal && found.is_none() {
                found = Some(key);
            }
        }
        let key = found.ok_or(AuthError::SasUnknownKeyName)?;
        // The signature is checked before the expiry, so a forged token learns nothing from the answer.
        parsed
            .verify(|_| Some(key.secret.as_str()), now)
            .map_err(|error| match error {
                SasError::Expired { expired_at, now } => AuthError::Expired {
                    seconds_ago: now.saturating_sub(expired_at),
                },
                SasError::Malformed(problem) => AuthError::Malformed { problem },
                SasError::UnknownKeyName(_) => AuthError::SasUnknownKeyName,
                SasError::BadSignature(_) => AuthError::SasBadSignature,
            })?;
        let resource = SasResource::parse(&parsed.resource)?;
        Ok((key.identity.clone(), resource))
    }
}

/// What a verified token's `sr` covers: the path segments under the namespace that requests must start with.
/// The host is not checked: the key is the gateway's own, and a sender signs whatever name it reaches the
/// gateway by (its service name, an ingress host, `localhost`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SasResource {
    /// The lowercased path segments (`[]` is the whole namespace, `[hub]` one hub, `[hub, "publishers", p]`
    /// one publisher).
    segments: Vec<String>,
    /// `sr` as signed (decoded), for error messages.
    text: String,
}

impl SasResource {
    /// The resource of a decoded `sr`: `[scheme://]host[/path]`; a trailing `/` and a `messages` segment at the
    /// end (what some senders sign) are ignored.
    pub fn parse(resource: &str) -> Result<Self, AuthError> {
        let without_scheme = resource
            .split_once("://")
            .map_or(resource, |(_, rest)| rest);
        let path = without_scheme.split_once('/').map_or("", |(_, path)| path);
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let mut segments: Vec<String> = path
            .split('/')
            .filter(|segment| !segment.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if segments.last().is_some_and(|last| last == "messages") {
            segments.pop();
        }
        if segments.len() > 3 {
            return Err(AuthError::Malformed {
                problem: "the token's resource (sr) has more path segments than a hub's publisher",
            });
        }
        Ok(Self {
            segments,
            text: crate::gateway::status::clip(resource).into_owned(),
        })
    }

    /// Whether a request for `hub`, under its `tail` (`[]` for the hub itself, `["publishers", p]`,
    /// `["partitions", id]`), is covered: the resource's segments start the request's, compared without case
    /// (Event Hubs names are case-insensitive).
    pub fn covers(&self, hub: &str, tail: &[String]) -> bool {
        let requested = std::iter::once(hub).chain(tail.iter().map(String::as_str));
        let mut requested = requested.map(str::to_ascii_lowercase);
        self.segments
            .iter()
            .all(|segment| requested.next().is_some_and(|asked| asked == *segment))
    }

    /// `sr` as signed, clipped.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventhub_wire::sas::sign_token;

    fn keys() -> SasKeys {
        let configs = vec![
            SasKeyConfig {
                name: "devices".into(),
                identity: "device-fleet".into(),
                key_file: None,
                key_env: Some("DEVICES_KEY".into()),
            },
            SasKeyConfig {
                name: "other".into(),
                identity: "other".into(),
                key_file: None,
                key_env: Some("OTHER_KEY".into()),
            },
        ];
        SasKeys::load(&configs, |name| match name {
            "DEVICES_KEY" => Some("c2VjcmV0LWtleS1mb3ItZGV2aWNlcw==\n".into()),
            "OTHER_KEY" => Some("another".into()),
            _ => None,
        })
        .unwrap()
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_signed_token_proves_its_keys_identity_and_resource() {
        let token = sign_token(
            "https://gw.example/orders",
            "devices",
            "c2VjcmV0LWtleS1mb3ItZGV2aWNlcw==",
            NOW + 60,
        );
        let (identity, resource) = keys().verify(&token, NOW).unwrap();
        assert_eq!(identity, "device-fleet");
        assert!(resource.covers("orders", &[]));
        assert!(resource.covers("Orders", &["publishers".into(), "d1".into()]));
        assert!(!resource.covers("audit", &[]));
        assert!(!format!("{:?}", keys()).contains("c2VjcmV0"));
    }

    #[test]
    fn refusals_name_their_cause() {
        let secret = "c2VjcmV0LWtleS1mb3ItZGV2aWNlcw==";
        let expired = sign_token("sb://gw/orders", "devices", secret, NOW - 5);
        assert!(matches!(
            keys().verify(&expired, NOW),
            Err(AuthError::Expired { seconds_ago: 5 })
        ));
        let unknown = sign_token("sb://gw/orders", "nobody", secret, NOW + 5);
        assert!(matches!(
            keys().verify(&unknown, NOW),
            Err(AuthError::SasUnknownKeyName)
        ));
        let forged = sign_token("sb://gw/orders", "devices", "not-the-key", NOW + 5);
        assert!(matches!(
            keys().verify(&forged, NOW),
            Err(AuthError::SasBadSignature)
        ));
        // A forged token that has also expired is refused for its signature.
        let forged_expired = sign_token("sb://gw/orders", "devices", "not-the-key", NOW - 5);
        assert!(matches!(
            keys().verify(&forged_expired, NOW),
            Err(AuthError::SasBadSignature)
        ));
        assert!(matches!(
            keys().verify("SharedAccessSignature sr=a&sig=b", NOW),
            Err(AuthError::Malformed { .. })
        ));
    }

    #[test]
    fn resources_cover_by_path_prefix_whatever_the_host() {
        let namespace = SasResource::parse("myns.servicebus.windows.net").unwrap();
        assert!(namespace.covers("orders", &[]));
        let publisher =
            SasResource::parse("https://gw:8080/orders/publishers/dev-1/messages").unwrap();
        assert!(publisher.covers("orders", &["publishers".into(), "DEV-1".into()]));
        assert!(!publisher.covers("orders", &[]));
        assert!(!publisher.covers("orders", &["publishers".into(), "dev-2".into()]));
        assert!(!publisher.covers("orders", &["partitions".into(), "0".into()]));
        let hub = SasResource::parse("localhost/orders/").unwrap();
        assert!(hub.covers("orders", &["partitions".into(), "1".into()]));
        assert!(SasResource::parse("h/a/b/c/d").is_err());
    }

    #[test]
    fn unreadable_or_empty_keys_stop_the_start_naming_the_setting() {
        let config = |key_file: Option<&str>, key_env: Option<&str>| SasKeyConfig {
            name: "k".into(),
            identity: "i".into(),
            key_file: key_file.map(Into::into),
            key_env: key_env.map(Into::into),
        };
        let (field, _) = SasKeys::load(&[config(Some("/nonexistent/key"), None)], |_| None)
            .err()
            .unwrap();
        assert_eq!(field, "sas_keys[0].key_file");
        let (field, problem) = SasKeys::load(&[config(None, Some("EMPTY"))], |_| Some("\n".into()))
            .err()
            .unwrap();
        assert_eq!(field, "sas_keys[0].key_env");
        assert_eq!(problem, "the key is empty");
    }
}
