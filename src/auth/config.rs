//! The `[auth]` settings and their validation (fields named relative to `auth`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The longest leeway on `exp`/`nbf` an issuer may configure (five minutes).
pub const MAX_LEEWAY_SECONDS: u64 = 300;
/// The longest grant name (it is a metrics label).
pub const MAX_GRANT_NAME_LEN: usize = 64;

/// `[auth]`: whether callers must authenticate, how, and what each identity may reach.
///
/// `required = true` with neither `jwt` nor `api_keys` is accepted here: client certificates (`tls.client_ca`,
/// outside this section) may be the only credential, and the gateway's own validation checks that some
/// credential source exists.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether every call but health and reflection needs an identity with a grant (default false).
    pub required: bool,
    /// `[[auth.jwt]]`: issuers whose bearer JWTs are accepted.
    pub jwt: Vec<JwtIssuerConfig>,
    /// `[[auth.api_keys]]`: opaque bearer keys, by their SHA-256.
    pub api_keys: Vec<ApiKeyConfig>,
    /// `[[auth.grants]]`: which identities may publish to which hubs.
    pub grants: Vec<GrantConfig>,
    /// `[[auth.sas_keys]]`: gateway-issued keys that sign `SharedAccessSignature` tokens.
    pub sas_keys: Vec<SasKeyConfig>,
}

/// One `[[auth.sas_keys]]` key: its name (a token's `skn`), the identity a token signed with it proves, and
/// where its secret is (a file or an environment variable; never in the configuration itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SasKeyConfig {
    /// The key's name, as senders put it in `skn`.
    pub name: String,
    /// The identity a token signed with this key proves (its grants give its hubs).
    pub identity: String,
    /// A file holding the key (a trailing newline is ignored).
    pub key_file: Option<PathBuf>,
    /// An environment variable holding the key.
    pub key_env: Option<String>,
}

/// One `[[auth.jwt]]` issuer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// The `iss` a token must carry.
    pub issuer: String,
    /// The `aud` values accepted (a token needs one of them).
    pub audiences: Vec<String>,
    /// A JWKS document on disk (re-read when it changes).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS endpoint (cached, refreshed, re-fetched for an unknown `kid`).
    pub jwks_url: Option<String>,
    /// CA bundle for `jwks_url` (the cluster's own CA).
    pub ca_file: Option<PathBuf>,
    /// A bearer token sent to `jwks_url`, read from this file at each fetch.
    pub bearer_token_file: Option<PathBuf>,
    /// The claim naming the identity (default `sub`).
    #[serde(default = "default_identity_claim")]
    pub identity_claim: String,
    /// Clock skew allowed on `exp` and `nbf` (default 30).
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
}

fn default_identity_claim() -> String {
    "sub".into()
}

fn default_leeway_seconds() -> u64 {
    30
}

/// One `[[auth.api_keys]]` key: the identity it proves and the SHA-256 (hex) of the key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The identity a caller presenting this key has.
    pub identity: String,
    /// The key's SHA-256, 64 hex digits (the key itself is never configured).
    pub sha256: String,
}

/// One `[[auth.grants]]` grant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// A short label for metrics.
    pub name: String,
    /// Identities, exact or with `*` globs.
    pub identities: Vec<String>,
    /// Hubs this grant covers; `["*"]` covers every configured hub.
    pub event_hubs: Vec<String>,
    /// Per identity, overrides `limits.client_events_per_second`.
    pub events_per_second: Option<NonZeroU32>,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::invalid(field, problem))
}

impl AuthConfig {
    /// Checks every `[auth]` setting against the configured hubs; fields are relative to `auth`.
    pub fn validate(&self, event_hubs: &[String]) -> Result<(), ConfigError> {
        let mut issuers: HashMap<&str, usize> = HashMap::new();
        for (index, issuer) in self.jwt.iter().enumerate() {
            issuer.validate(&format!("jwt[{index}]"))?;
            if let Some(first) = issuers.insert(issuer.issuer.as_str(), index) {
                return invalid(
                    format!("jwt[{index}].issuer"),
                    format!("the same issuer as jwt[{first}]; configure each issuer once"),
                );
            }
        }
        let mut digests: HashMap<String, usize> = HashMap::new();
        for (index, key) in self.api_keys.iter().enumerate() {
            if key.identity.trim().is_empty() {
                return invalid(format!("api_keys[{index}].identity"), "must not be empty");
            }
            if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return invalid(
                    format!("api_keys[{index}].sha256"),
                    "must be exactly 64 hex digits (the SHA-256 of the key, e.g. `printf %s \"$KEY\" | sha256sum`)",
                );
            }
            if let Some(first) = digests.insert(key.sha256.to_ascii_lowercase(), index) {
                return invalid(
                    format!("api_keys[{index}].sha256"),
                    format!("the same key as api_keys[{first}]; a key proves one identity"),
                );
            }
        }
        let mut key_names: HashMap<&str, usize> = HashMap::new();
        for (index, key) in self.sas_keys.iter().enumerate() {
            key.validate(&format!("sas_keys[{index}]"))?;
            if let Some(first) = key_names.insert(key.name.as_str(), index) {
                return invalid(
                    format!("sas_keys[{index}].name"),
                    format!("the same name as sas_keys[{first}]; a token's skn names one key"),
                );
            }
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, grant) in self.grants.iter().enumerate() {
            grant.validate(&format!("grants[{index}]"), event_hubs)?;
            if let Some(first) = names.insert(grant.name.as_str(), index) {
                return invalid(
                    format!("grants[{index}].name"),
                    format!("the same name as grants[{first}]; grant names must be unique"),
                );
            }
        }
        if self.required && self.grants.is_empty() {
            return invalid(
                "required",
                "is true but no [[auth.grants]] are configured: nothing would be allowed",
            );
        }
        Ok(())
    }
}

impl JwtIssuerConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.issuer.trim().is_empty() {
            return invalid(format!("{at}.issuer"), "must not be empty");
        }
        if self.audiences.is_empty() {
            return invalid(
                format!("{at}.audiences"),
                "must list at least one audience (e.g. [\"eventhub-gateway\"])",
            );
        }
        for (index, audience) in self.audiences.iter().enumerate() {
            if audience.trim().is_empty() {
                return invalid(format!("{at}.audiences[{index}]"), "must not be empty");
            }
        }
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => {
                return invalid(
                    format!("{at}.jwks_url"),
                    "jwks_file and jwks_url are both set; set exactly one",
                );
            }
            (None, None) => {
                return invalid(
                    format!("{at}.jwks_file"),
                    "set jwks_file or jwks_url (exactly one): where the issuer's keys are",
                );
            }
            (Some(file), None) if file.as_os_str().is_empty() => {
                return invalid(format!("{at}.jwks_file"), "must not be empty");
            }
            (None, Some(url)) => {
                if let Err(problem) = check_jwks_url(url) {
                    return invalid(format!("{at}.jwks_url"), problem);
                }
            }
            (Some(_), None) => {}
        }
        if self.jwks_url.is_none() {
            if self.ca_file.is_some() {
                return invalid(format!("{at}.ca_file"), "only applies with jwks_url");
            }
            if self.bearer_token_file.is_some() {
                return invalid(
                    format!("{at}.bearer_token_file"),
                    "only applies with jwks_url",
                );
            }
        }
        if self.identity_claim.trim().is_empty() {
            return invalid(
                format!("{at}.identity_claim"),
                "must not be empty (default \"sub\")",
            );
        }
        if self.leeway_seconds > MAX_LEEWAY_SECONDS {
            return invalid(
                format!("{at}.leeway_seconds"),
                format!("must be at most {MAX_LEEWAY_SECONDS} s"),
            );
        }
        Ok(())
    }
}

/// `https://` anywhere, `http://` only to a loopback host (tests, a local sidecar); no user or password.
fn check_jwks_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "is not a URL (expected https://host/path)".to_string())?;
    let Some(authority) = uri.authority() else {
        return Err("is not an absolute URL (expected https://host/path)".into());
    };
    if authority.as_str().contains('@') {
        return Err("must not carry a user or password (use bearer_token_file)".into());
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(authority.host()) => Ok(()),
        Some("http") => {
            Err("must be https:// (http:// is allowed only for a loopback host)".into())
        }
        _ => Err("must be an https:// URL".into()),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

impl SasKeyConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.len() > 256 {
            return invalid(format!("{at}.name"), "must be 1 to 256 characters");
        }
        if !self.name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return invalid(
                format!("{at}.name"),
                "may hold only visible ASCII (it is sent in a token's skn)",
            );
        }
        if self.identity.trim().is_empty() {
            return invalid(format!("{at}.identity"), "must not be empty");
        }
        match (&self.key_file, &self.key_env) {
            (Some(_), Some(_)) => invalid(
                format!("{at}.key_env"),
                "key_file and key_env are both set; set exactly one",
            ),
            (None, None) => invalid(
                format!("{at}.key_file"),
                "set key_file or key_env (exactly one): where the key is",
            ),
            (Some(path), None) if path.as_os_str().is_empty() => {
                invalid(format!("{at}.key_file"), "must not be empty")
            }
            (None, Some(name)) if name.is_empty() => {
                invalid(format!("{at}.key_env"), "must not be empty")
            }
            _ => Ok(()),
        }
    }
}

impl GrantConfig {
    fn validate(&self, at: &str, event_hubs: &[String]) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return invalid(format!("{at}.name"), "must not be empty");
        }
        if self.name.len() > MAX_GRANT_NAME_LEN {
            return invalid(
                format!("{at}.name"),
                format!("must be at most {MAX_GRANT_NAME_LEN} characters (it is a metrics label)"),
            );
        }
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return invalid(
                format!("{at}.name"),
                "may hold only letters, digits, `_`, `.` and `-` (it is a metrics label)",
            );
        }
        if self.identities.is_empty() {
            return invalid(
                format!("{at}.identities"),
                "must list at least one identity (exact, or with `*`)",
            );
        }
        for (index, identity) in self.identities.iter().enumerate() {
            if identity.is_empty() {
                return invalid(format!("{at}.identities[{index}]"), "must not be empty");
            }
        }
        if self.event_hubs.is_empty() {
            return invalid(
                format!("{at}.event_hubs"),
                "must list at least one hub, or [\"*\"] for every configured hub",
            );
        }
        for (index, hub) in self.event_hubs.iter().enumerate() {
            if hub != "*" && !event_hubs.contains(hub) {
                let configured = if event_hubs.is_empty() {
                    "none".to_string()
                } else {
                    event_hubs.join(", ")
                };
                return invalid(
                    format!("{at}.event_hubs[{index}]"),
                    format!(
                        "`{hub}` is not a configured hub (configured: {configured}); use \"*\" for all"
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> JwtIssuerConfig {
        JwtIssuerConfig {
            issuer: "https://issuer.example".into(),
            audiences: vec!["eventhub-gateway".into()],
            jwks_file: Some("/etc/jwks.json".into()),
            jwks_url: None,
            ca_file: None,
            bearer_token_file: None,
            identity_claim: "sub".into(),
            leeway_seconds: 30,
        }
    }

    fn grant() -> GrantConfig {
        GrantConfig {
            name: "billing".into(),
            identities: vec!["system:serviceaccount:billing:*".into()],
            event_hubs: vec!["orders".into()],
            events_per_second: None,
        }
    }

    fn key() -> ApiKeyConfig {
        ApiKeyConfig {
            identity: "billing-batch".into(),
            sha256: "a".repeat(64),
        }
    }

    fn hubs() -> Vec<String> {
        vec!["orders".into(), "payments".into()]
    }

    /// The field and problem of the error `config` gets.
    fn refusal(config: &AuthConfig) -> (String, String) {
        match config.validate(&hubs()) {
            Err(ConfigError::Invalid { field, problem }) => (field, problem),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn with_issuer(change: impl FnOnce(&mut JwtIssuerConfig)) -> AuthConfig {
        let mut issuer = issuer();
        change(&mut issuer);
        AuthConfig {
            jwt: vec![issuer],
            ..AuthConfig::default()
        }
    }

    #[test]
    fn sas_keys_are_checked_naming_the_field() {
        let key = |name: &str, file: Option<&str>, env: Option<&str>| SasKeyConfig {
            name: name.into(),
            identity: "devices".into(),
            key_file: file.map(Into::into),
            key_env: env.map(Into::into),
        };
        let field_of = |keys: Vec<SasKeyConfig>| match (AuthConfig {
            sas_keys: keys,
            ..AuthConfig::default()
        })
        .validate(&[])
        {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field_of(vec![key("a", None, None)]), "sas_keys[0].key_file");
        assert_eq!(
            field_of(vec![key("a", Some("/k"), Some("K"))]),
            "sas_keys[0].key_env"
        );
        assert_eq!(
            field_of(vec![key("a b", Some("/k"), None)]),
            "sas_keys[0].name"
        );
        assert_eq!(
            field_of(vec![key("a", Some("/k"), None), key("a", None, Some("K"))]),
            "sas_keys[1].name"
        );
        assert!(
            AuthConfig {
                sas_keys: vec![key("devices", Some("/k"), None)],
                ..AuthConfig::default()
            }
            .validate(&[])
            .is_ok()
        );
    }

    fn with_grant(change: impl FnOnce(&mut GrantConfig)) -> AuthConfig {
        let mut grant = grant();
        change(&mut grant);
        AuthConfig {
            grants: vec![grant],
            ..AuthConfig::default()
        }
    }

    #[test]
    fn a_complete_config_and_the_default_pass() {
        AuthConfig::default().validate(&hubs()).unwrap();
        let config = AuthConfig {
            required: true,
            jwt: vec![issuer()],
            api_keys: vec![key()],
            grants: vec![grant()],
            sas_keys: Vec::new(),
        };
        config.validate(&hubs()).unwrap();
    }

    #[test]
    fn issuer_settings_are_named() {
        let cases: Vec<(AuthConfig, &str, &str)> = vec![
            (
                with_issuer(|i| i.issuer = " ".into()),
                "jwt[0].issuer",
                "empty",
            ),
            (
                with_issuer(|i| i.audiences.clear()),
                "jwt[0].audiences",
                "at least one",
            ),
            (
                with_issuer(|i| i.audiences = vec!["a".into(), "".into()]),
                "jwt[0].audiences[1]",
                "empty",
            ),
            (
                with_issuer(|i| i.jwks_url = Some("https://x/keys".into())),
                "jwt[0].jwks_url",
                "both set",
            ),
            (
                with_issuer(|i| i.jwks_file = None),
                "jwt[0].jwks_file",
                "exactly one",
            ),
            (
                with_issuer(|i| {
                    i.jwks_file = None;
                    i.jwks_url = Some("http://issuer.example/keys".into());
                }),
                "jwt[0].jwks_url",
                "https",
            ),
            (
                with_issuer(|i| {
                    i.jwks_file = None;
                    i.jwks_url = Some("ftp://issuer.example/keys".into());
                }),
                "jwt[0].jwks_url",
                "https",
            ),
            (
                with_issuer(|i| {
                    i.jwks_file = None;
                    i.jwks_url = Some("/keys".into());
                }),
                "jwt[0].jwks_url",
                "absolute",
            ),
            (
                with_issuer(|i| {
                    i.jwks_file = None;
                    i.jwks_url = Some("https://user:pw@issuer.example/keys".into());
                }),
                "jwt[0].jwks_url",
                "password",
            ),
            (
                with_issuer(|i| i.ca_file = Some("/ca.pem".into())),
                "jwt[0].ca_file",
                "jwks_url",
            ),
            (
                with_issuer(|i| i.bearer_token_file = Some("/token".into())),
                "jwt[0].bearer_token_file",
                "jwks_url",
            ),
            (
                with_issuer(|i| i.identity_claim = "".into()),
                "jwt[0].identity_claim",
                "empty",
            ),
            (
                with_issuer(|i| i.leeway_seconds = 301),
                "jwt[0].leeway_seconds",
                "300",
            ),
        ];
        for (config, field, problem) in cases {
            let (got_field, got_problem) = refusal(&config);
            assert_eq!(got_field, field, "{got_problem}");
            assert!(got_problem.contains(problem), "{field}: {got_problem}");
        }
    }

    #[test]
    fn jwks_urls_over_http_only_to_loopback() {
        for url in [
            "http://127.0.0.1:8080/keys",
            "http://localhost/keys",
            "http://[::1]:9/keys",
            "https://kubernetes.default.svc/openid/v1/jwks",
        ] {
            with_issuer(|i| {
                i.jwks_file = None;
                i.jwks_url = Some(url.into());
                i.ca_file = Some("/ca.pem".into());
                i.bearer_token_file = Some("/token".into());
            })
            .validate(&hubs())
            .unwrap_or_else(|error| panic!("{url}: {error}"));
        }
    }

    #[test]
    fn the_same_issuer_twice_is_refused() {
        let config = AuthConfig {
            jwt: vec![issuer(), issuer()],
            ..AuthConfig::default()
        };
        let (field, problem) = refusal(&config);
        assert_eq!(field, "jwt[1].issuer");
        assert!(problem.contains("jwt[0]"), "{problem}");
    }

    #[test]
    fn api_keys_need_an_identity_and_a_unique_sha256() {
        let mut config = AuthConfig {
            api_keys: vec![ApiKeyConfig {
                identity: "".into(),
                ..key()
            }],
            ..AuthConfig::default()
        };
        assert_eq!(refusal(&config).0, "api_keys[0].identity");
        for digest in [
            "a".repeat(63),
            "a".repeat(65),
            "g".repeat(64),
            String::new(),
        ] {
            config.api_keys = vec![ApiKeyConfig {
                sha256: digest,
                ..key()
            }];
            let (field, problem) = refusal(&config);
            assert_eq!(field, "api_keys[0].sha256");
            assert!(problem.contains("64 hex digits"), "{problem}");
        }
        config.api_keys = vec![
            key(),
            ApiKeyConfig {
                identity: "other".into(),
                sha256: "A".repeat(64),
            },
        ];
        let (field, problem) = refusal(&config);
        assert_eq!(field, "api_keys[1].sha256");
        assert!(problem.contains("api_keys[0]"), "{problem}");
    }

    #[test]
    fn grant_settings_are_named() {
        let cases: Vec<(AuthConfig, &str, &str)> = vec![
            (
                with_grant(|g| g.name = "".into()),
                "grants[0].name",
                "empty",
            ),
            (
                with_grant(|g| g.name = "x".repeat(65)),
                "grants[0].name",
                "64",
            ),
            (
                with_grant(|g| g.name = "bill ing".into()),
                "grants[0].name",
                "metrics label",
            ),
            (
                with_grant(|g| g.name = "bill\"ing".into()),
                "grants[0].name",
                "metrics label",
            ),
            (
                with_grant(|g| g.identities.clear()),
                "grants[0].identities",
                "at least one",
            ),
            (
                with_grant(|g| g.identities = vec!["a".into(), "".into()]),
                "grants[0].identities[1]",
                "empty",
            ),
            (
                with_grant(|g| g.event_hubs.clear()),
                "grants[0].event_hubs",
                "at least one",
            ),
            (
                with_grant(|g| g.event_hubs = vec!["orders".into(), "audit".into()]),
                "grants[0].event_hubs[1]",
                "`audit` is not a configured hub (configured: orders, payments)",
            ),
        ];
        for (config, field, problem) in cases {
            let (got_field, got_problem) = refusal(&config);
            assert_eq!(got_field, field, "{got_problem}");
            assert!(got_problem.contains(problem), "{field}: {got_problem}");
        }
        with_grant(|g| {
            g.name = "a-Z_0.9".into();
            g.event_hubs = vec!["*".into()];
        })
        .validate(&hubs())
        .unwrap();
    }

    #[test]
    fn grant_names_are_unique() {
        let config = AuthConfig {
            grants: vec![grant(), grant()],
            ..AuthConfig::default()
        };
        let (field, problem) = refusal(&config);
        assert_eq!(field, "grants[1].name");
        assert!(problem.contains("grants[0]"), "{problem}");
    }

    #[test]
    fn required_without_grants_allows_nothing_and_is_refused() {
        let config = AuthConfig {
            required: true,
            api_keys: vec![key()],
            ..AuthConfig::default()
        };
        let (field, problem) = refusal(&config);
        assert_eq!(field, "required");
        assert!(problem.contains("nothing would be allowed"), "{problem}");
    }

    #[test]
    fn required_with_only_client_certificates_is_left_to_the_gateway() {
        let config = AuthConfig {
            required: true,
            grants: vec![grant()],
            ..AuthConfig::default()
        };
        config.validate(&hubs()).unwrap();
    }
}
