//! Who is calling and what they may reach: `[auth]` settings, the caller's identity from a bearer JWT, an
//! API key or its client certificate, and the grants that let an identity publish to hubs.

use std::num::NonZeroU32;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

mod api_key;
pub mod certificate;
mod config;
mod grants;
pub mod jwks;
pub mod jwt;
mod sas;

pub use config::{ApiKeyConfig, AuthConfig, GrantConfig, JwtIssuerConfig, SasKeyConfig};
pub use grants::glob_matches;
pub use sas::SasResource;

use api_key::ApiKeys;
use grants::{Grants, HubScope};
use jwks::{FileKeys, KeySource, Timing, UrlKeys};
use jwt::ClaimsPolicy;
use sas::SasKeys;

/// What a call presents to prove who it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    /// The `authorization` header's value, if any.
    pub authorization: Option<&'a str>,
    /// The DER of the client's leaf certificate, if the connection presented one (mTLS).
    pub peer_certificate: Option<&'a [u8]>,
}

/// How an identity was proven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// A bearer JWT from a configured issuer.
    Jwt,
    /// A configured API key.
    ApiKey,
    /// A client certificate (URI SAN, DNS SAN or subject CN).
    Certificate,
    /// A `SharedAccessSignature` token signed with a configured `[[auth.sas_keys]]` key.
    SharedAccessSignature,
}

/// Where under its hub a request goes (`["publishers", p]` for the REST publisher route); requests without it
/// go to the hub itself. A SAS token's `sr` must cover the hub and this tail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceTail(pub Vec<String>);

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The identity's name (a claim, an API key's identity, a certificate's SAN or CN).
    pub name: String,
    /// How it was proven.
    pub source: IdentitySource,
}

/// A grant, as checked at run time.
#[derive(Debug)]
pub struct Grant {
    /// The grant's metrics label.
    pub name: String,
    /// Per identity, when set.
    pub events_per_second: Option<NonZeroU32>,
    hubs: HubScope,
}

impl Grant {
    /// Whether this grant covers `hub`.
    pub fn allows(&self, hub: &str) -> bool {
        self.hubs.allows(hub)
    }
}

/// The grants that cover one identity, in configuration order.
#[derive(Clone, Debug, Default)]
pub struct Access {
    grants: Vec<Arc<Grant>>,
    /// A SAS token's `sr`: the only resource the call may reach, within its grants.
    sas_resource: Option<SasResource>,
}

impl Access {
    /// Access through these grants (in the order given), for tests and callers building their own.
    pub fn from_grants(grants: Vec<Arc<Grant>>) -> Self {
        Self {
            grants,
            sas_resource: None,
        }
    }

    /// The resource a SAS token limits the call to, if it came with one.
    pub fn sas_resource(&self) -> Option<&SasResource> {
        self.sas_resource.as_ref()
    }

    /// The first grant that covers `hub`, if any.
    pub fn grant_for(&self, hub: &str) -> Option<&Grant> {
        self.grants
            .iter()
            .map(|grant| &**grant)
            .find(|grant| grant.allows(hub))
    }

    /// The identity's own rate, from the first covering grant that sets one.
    pub fn events_per_second(&self) -> Option<NonZeroU32> {
        self.grants.iter().find_map(|grant| grant.events_per_second)
    }

    /// The names of the grants, in configuration order.
    pub fn grant_names(&self) -> impl Iterator<Item = &str> {
        self.grants.iter().map(|grant| grant.name.as_str())
    }
}

/// Who a call is, as far as authorization goes.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No credential, and `auth.required` is false: every hub, limits keyed on `x-client-id`.
    Anonymous,
    /// An authenticated identity and its grants.
    Identified {
        /// Who.
        identity: Identity,
        /// What it may reach.
        access: Access,
    },
}

/// Why a call's credentials were refused. The message says why, never echoing the credential: every
/// detail is static text, a number, or configuration (issuers, audiences, a claim's name).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential, and one is required.
    #[error("no credentials: send `authorization: Bearer <token>` or a client certificate")]
    Missing,
    /// The credential is not of the expected form.
    #[error("malformed credentials: {problem}")]
    Malformed {
        /// What is wrong (static text).
        problem: &'static str,
    },
    /// The `authorization` header's scheme is neither `Bearer` nor `SharedAccessSignature`.
    #[error(
        "the authorization header's scheme is neither Bearer nor SharedAccessSignature: send `authorization: Bearer <token>`"
    )]
    UnsupportedScheme,
    /// A `SharedAccessSignature` token's `skn` names no configured `[[auth.sas_keys]]` key.
    #[error("the SharedAccessSignature's key name (skn) is not one of the gateway's SAS keys")]
    SasUnknownKeyName,
    /// A `SharedAccessSignature` token's `sig` does not verify with its key.
    #[error("the SharedAccessSignature's signature (sig) does not verify with its key")]
    SasBadSignature,
    /// The bearer token is longer than accepted.
    #[error("the bearer token is {length} bytes long; at most {limit} are accepted")]
    TooLong {
        /// Its length.
        length: usize,
        /// The limit.
        limit: usize,
    },
    /// `exp` (plus leeway) has passed.
    #[error("the token expired {seconds_ago} s ago")]
    Expired {
        /// How long ago.
        seconds_ago: u64,
    },
    /// `nbf` (minus leeway) is still ahead.
    #[error("the token is not valid for another {seconds_ahead} s (nbf)")]
    NotYetValid {
        /// How long until it is.
        seconds_ahead: u64,
    },
    /// The token's `iss` is not a configured issuer.
    #[error("the token's issuer (iss) is not one of {configured}")]
    WrongIssuer {
        /// The configured issuers.
        configured: String,
    },
    /// None of the token's `aud` values is accepted.
    #[error("the token's audience is not one of {accepted}")]
    WrongAudience {
        /// The accepted audiences.
        accepted: String,
    },
    /// No key of the issuer has the token's `kid` (after a re-read or re-fetch).
    #[error("the token's key id (kid) is not among its issuer's keys, even after re-reading them")]
    UnknownKey,
    /// The token's `alg` is never accepted (`none`, HMAC, unknown).
    #[error(
        "the token's algorithm {algorithm} is refused; accepted: {}",
        jwt::ACCEPTED_ALGORITHMS
    )]
    AlgorithmRefused {
        /// A bounded label (`none`, `HS256`, `an unknown algorithm`).
        algorithm: &'static str,
    },
    /// The token's `alg` does not fit the key it names.
    #[error("the token's algorithm {algorithm} does not fit its key ({key})")]
    AlgorithmMismatch {
        /// The token's algorithm.
        algorithm: &'static str,
        /// The key's type.
        key: &'static str,
    },
    /// The signature does not verify.
    #[error("the token's signature does not verify against its issuer's key")]
    BadSignature,
    /// An opaque bearer token that matches no configured API key.
    #[error("the bearer token is neither a JWT from a configured issuer nor a configured API key")]
    UnknownApiKey,
    /// The verified token lacks the issuer's identity claim.
    #[error("the token has no non-empty string claim `{claim}` naming the caller")]
    NoIdentityClaim {
        /// The configured claim.
        claim: String,
    },
    /// The issuer's JWKS has not been fetched yet.
    #[error(
        "the keys of issuer {issuer} are not available yet (its JWKS could not be fetched); retry shortly"
    )]
    KeysUnavailable {
        /// The issuer.
        issuer: String,
    },
    /// The client certificate names no identity.
    #[error("the client certificate names no identity (no URI or DNS SAN, no subject CN)")]
    NoCertificateIdentity,
}

impl AuthError {
    /// A bounded label for metrics (`missing`, `expired`, `wrong_audience`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed { .. } => "malformed",
            Self::UnsupportedScheme => "unsupported_scheme",
            Self::SasUnknownKeyName => "sas_unknown_key_name",
            Self::SasBadSignature => "sas_bad_signature",
            Self::TooLong { .. } => "too_long",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongIssuer { .. } => "wrong_issuer",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::UnknownKey => "unknown_key",
            Self::AlgorithmRefused { .. } | Self::AlgorithmMismatch { .. } => "algorithm_refused",
            Self::BadSignature => "bad_signature",
            Self::UnknownApiKey => "unknown_api_key",
            Self::NoIdentityClaim { .. } => "no_identity_claim",
            Self::KeysUnavailable { .. } => "keys_unavailable",
            Self::NoCertificateIdentity => "no_certificate_identity",
        }
    }
}

/// Why the authenticator cannot start (a JWKS file unreadable, say).
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A setting's file or value is unusable.
    #[error("auth: {field}: {problem}")]
    Invalid {
        /// The setting (`auth.jwt[0].jwks_file`).
        field: String,
        /// What is wrong.
        problem: String,
    },
}

fn setup_error(field: String, problem: impl Into<String>) -> AuthSetupError {
    AuthSetupError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// One configured issuer: what its tokens must claim, and its keys.
#[derive(Debug)]
struct Issuer {
    policy: ClaimsPolicy,
    keys: KeySource,
}

/// Authenticates calls and finds their grants; shared by every call.
#[derive(Debug)]
pub struct Authenticator {
    required: bool,
    issuers: Vec<Issuer>,
    /// The configured issuers, for error messages.
    issuer_names: String,
    api_keys: ApiKeys,
    sas_keys: SasKeys,
    grants: Grants,
}

/// The bearer token of an `authorization` value (`Bearer <token>`, scheme case-insensitive).
fn bearer_token(authorization: &str) -> Result<&str, AuthError> {
    let value = authorization.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::UnsupportedScheme);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed {
            problem: "the bearer token is empty",
        });
    }
    if token.len() > jwt::MAX_TOKEN_LEN {
        return Err(AuthError::TooLong {
            length: token.len(),
            limit: jwt::MAX_TOKEN_LEN,
        });
    }
    Ok(token)
}

/// The whole value, when the scheme is `SharedAccessSignature` (case-insensitive), bounded in length.
fn sas_token(authorization: &str) -> Result<Option<std::borrow::Cow<'_, str>>, AuthError> {
    const SCHEME: &str = "SharedAccessSignature";
    let value = authorization.trim();
    let scheme = value.split([' ', '\t']).next().unwrap_or_default();
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Ok(None);
    }
    if value.len() > jwt::MAX_TOKEN_LEN {
        return Err(AuthError::TooLong {
            length: value.len(),
            limit: jwt::MAX_TOKEN_LEN,
        });
    }
    // The wire crate's parser expects the scheme as the Azure SDKs write it, and one space after it.
    if scheme == SCHEME && value.as_bytes().get(SCHEME.len()) == Some(&b' ') {
        return Ok(Some(std::borrow::Cow::Borrowed(value)));
    }
    let fields = value[scheme.len()..].trim_start();
    Ok(Some(std::borrow::Cow::Owned(format!("{SCHEME} {fields}"))))
}

/// A reqwest client for one issuer's JWKS URL: its own CA bundle if configured, no redirects, no proxy.
fn jwks_client(
    at: &str,
    config: &JwtIssuerConfig,
    timing: Timing,
) -> Result<reqwest::Client, AuthSetupError> {
    let mut builder = reqwest::Client::builder()
        .timeout(timing.fetch_timeout)
        .connect_timeout(timing.fetch_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("eventhub-gateway/", env!("CARGO_PKG_VERSION")));
    if config
        .jwks_url
        .as_deref()
        .is_some_and(|url| url.starts_with("https:"))
    {
        builder = builder.https_only(true);
    }
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|error| {
            setup_error(
                format!("{at}.ca_file"),
                format!("cannot read {}: {error}", path.display()),
            )
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| {
            setup_error(
                format!("{at}.ca_file"),
                format!(
                    "{} holds no usable PEM certificate: {error}",
                    path.display()
                ),
            )
        })?;
        if certificates.is_empty() {
            return Err(setup_error(
                format!("{at}.ca_file"),
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        builder = builder.tls_certs_only(certificates);
    }
    builder
        .build()
        .map_err(|error| setup_error(format!("{at}.jwks_url"), error.to_string()))
}

impl Authenticator {
    /// Loads JWKS files, starts the refresh of JWKS URLs (until `shutdown`), and compiles the grants.
    pub async fn start(
        config: &AuthConfig,
        event_hubs: &[String],
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, AuthSetupError> {
        Self::start_with(config, event_hubs, shutdown, Timing::default()).await
    }

    async fn start_with(
        config: &AuthConfig,
        event_hubs: &[String],
        shutdown: CancellationToken,
        timing: Timing,
    ) -> Result<Arc<Self>, AuthSetupError> {
        config.validate(event_hubs).map_err(|error| match error {
            ConfigError::Invalid { field, problem } => {
                setup_error(format!("auth.{field}"), problem)
            }
            other => setup_error("auth".into(), other.to_string()),
        })?;
        let mut issuers = Vec::with_capacity(config.jwt.len());
        let mut fetchers = Vec::new();
        for (index, issuer) in config.jwt.iter().enumerate() {
            let at = format!("auth.jwt[{index}]");
            let keys = match (&issuer.jwks_file, &issuer.jwks_url) {
                (Some(path), _) => KeySource::File(Box::new(
                    FileKeys::load(&issuer.issuer, path, timing)
                        .await
                        .map_err(|problem| setup_error(format!("{at}.jwks_file"), problem))?,
                )),
                (None, Some(url)) => {
                    let client = jwks_client(&at, issuer, timing)?;
                    let keys = Arc::new(UrlKeys::new(
                        &issuer.issuer,
                        url,
                        client,
                        issuer.bearer_token_file.clone(),
                        timing,
                    ));
                    fetchers.push(Arc::downgrade(&keys));
                    KeySource::Url(keys)
                }
                (None, None) => {
                    return Err(setup_error(
                        format!("{at}.jwks_file"),
                        "set jwks_file or jwks_url",
                    ));
                }
            };
            issuers.push(Issuer {
                policy: ClaimsPolicy {
                    issuer: issuer.issuer.clone(),
                    audiences: issuer.audiences.clone(),
                    identity_claim: issuer.identity_claim.clone(),
                    leeway_seconds: issuer.leeway_seconds,
                },
                keys,
            });
        }
        let sas_keys = SasKeys::load(&config.sas_keys, |name| std::env::var(name).ok())
            .map_err(|(field, problem)| setup_error(format!("auth.{field}"), problem))?;
        let authenticator = Arc::new(Self {
            required: config.required,
            issuer_names: config
                .jwt
                .iter()
                .map(|issuer| issuer.issuer.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            issuers,
            api_keys: ApiKeys::new(&config.api_keys),
            sas_keys,
            grants: Grants::new(&config.grants),
        });
        // The first fetch happens in the task: an unreachable endpoint delays nothing, and a token arriving
        // before any keys gets `keys_unavailable`.
        for keys in fetchers {
            tokio::spawn(UrlKeys::run(keys, shutdown.clone()));
        }
        Ok(authenticator)
    }

    /// Every distinct `events_per_second` the grants set (the rate limiter keeps a bucket per rate).
    pub fn identity_rates(&self) -> Vec<NonZeroU32> {
        self.grants.rates()
    }

    /// Whether calls need an identity.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The caller a call's credentials prove: a bearer credential first, else the client certificate; no
    /// credential is `Anonymous` unless auth is required, and so is every call while auth is off (not
    /// required, no grants).
    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError> {
        // Auth is off (today's behaviour) until it is required or grants say what identities may do: an
        // `authorization` header or a client certificate then proves nothing anyone asked for.
        if !self.required && self.grants.is_empty() {
            return Ok(Caller::Anonymous);
        }
        if let Some(authorization) = credentials.authorization {
            if let Some(token) = sas_token(authorization)? {
                if self.sas_keys.is_empty() {
                    return Err(AuthError::SasUnknownKeyName);
                }
                let (name, resource) = self.sas_keys.verify(&token, jwt::now_unix())?;
                let mut caller = self.identified(name, IdentitySource::SharedAccessSignature);
                if let Caller::Identified { access, .. } = &mut caller {
                    access.sas_resource = Some(resource);
                }
                return Ok(caller);
            }
            let token = bearer_token(authorization)?;
            if !self.issuers.is_empty() && jwt::looks_like_jwt(token) {
                let name = self.verify_jwt(token).await?;
                return Ok(self.identified(name, IdentitySource::Jwt));
            }
            return match self.api_keys.identify(token) {
                Some(name) => Ok(self.identified(name.to_owned(), IdentitySource::ApiKey)),
                None => Err(AuthError::UnknownApiKey),
            };
        }
        if let Some(der) = credentials.peer_certificate {
            match certificate::identity(der) {
                Some(name) => return Ok(self.identified(name, IdentitySource::Certificate)),
                // The chain was verified; without auth required, such a client stays anonymous as before.
                None if self.required => return Err(AuthError::NoCertificateIdentity),
                None => {}
            }
        }
        if self.required {
            Err(AuthError::Missing)
        } else {
            Ok(Caller::Anonymous)
        }
    }

    fn identified(&self, name: String, source: IdentitySource) -> Caller {
        let access = self.grants.access_for(&name);
        Caller::Identified {
            identity: Identity { name, source },
            access,
        }
    }

    /// The identity a JWT proves: algorithm, issuer (by the unverified `iss`), key, signature, claims.
    async fn verify_jwt(&self, token: &str) -> Result<String, AuthError> {
        let inspected = jwt::inspect(token)?;
        let algorithm = jwt::accepted_algorithm(&inspected.header.alg)?;
        let issuer = inspected
            .claims
            .get("iss")
            .and_then(serde_json::Value::as_str)
            .and_then(|iss| {
                self.issuers
                    .iter()
                    .find(|issuer| issuer.policy.issuer == iss)
            })
            .ok_or_else(|| AuthError::WrongIssuer {
                configured: self.issuer_names.clone(),
            })?;
        let key = issuer
            .keys
            .key_for(inspected.header.kid.as_deref(), algorithm)
            .await?;
        jwt::verify_signature(token, algorithm, &key.key)?;
        issuer.policy.check(&inspected.claims, jwt::now_unix())
    }
}
#[cfg(test)]
mod tests;
