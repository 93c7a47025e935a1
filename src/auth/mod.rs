//! Who is calling and what they may reach: `[auth]` settings, the caller's identity from a bearer JWT, an
//! API key or its client certificate, and the grants that let an identity publish to hubs.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// `[auth]`: whether callers must authenticate, how, and what each identity may reach.
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

impl AuthConfig {
    /// Checks every `[auth]` setting against the configured hubs; fields are relative to `auth`.
    pub fn validate(&self, _event_hubs: &[String]) -> Result<(), ConfigError> {
        Ok(())
    }
}

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
}

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
}

impl Grant {
    /// Whether this grant covers `hub`.
    pub fn allows(&self, _hub: &str) -> bool {
        false
    }
}

/// The grants that cover one identity, in configuration order.
#[derive(Clone, Debug, Default)]
pub struct Access {
    grants: Vec<Arc<Grant>>,
}

impl Access {
    /// The first grant that covers `hub`, if any.
    pub fn grant_for(&self, hub: &str) -> Option<&Grant> {
        self.grants
            .iter()
            .map(|grant| &**grant)
            .find(|grant| grant.allows(hub))
    }

    /// The name of the identity's first grant (the `grant` label of its calls).
    pub fn first_grant_name(&self) -> Option<&str> {
        self.grants.first().map(|grant| grant.name.as_str())
    }

    /// The identity's own rate, from the first covering grant that sets one.
    pub fn events_per_second(&self) -> Option<NonZeroU32> {
        self.grants.iter().find_map(|grant| grant.events_per_second)
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

/// Why a call's credentials were refused. The message says why, never echoing the credential.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential, and one is required.
    #[error("no credentials: send `authorization: Bearer <token>` or a client certificate")]
    Missing,
}

impl AuthError {
    /// A bounded label for metrics (`missing`, `expired`, `wrong_audience`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
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

/// Authenticates calls and finds their grants; shared by every call.
#[derive(Debug)]
pub struct Authenticator {
    required: bool,
}

impl Authenticator {
    /// Loads JWKS files, starts the refresh of JWKS URLs (until `shutdown`), and compiles the grants.
    pub async fn start(
        config: &AuthConfig,
        _event_hubs: &[String],
        _shutdown: CancellationToken,
    ) -> Result<Arc<Self>, AuthSetupError> {
        Ok(Arc::new(Self {
            required: config.required,
        }))
    }

    /// Every distinct `events_per_second` the grants set (the rate limiter keeps a bucket per rate).
    pub fn identity_rates(&self) -> Vec<NonZeroU32> {
        Vec::new()
    }

    /// Whether calls need an identity.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The caller a call's credentials prove: a bearer credential first, else the client certificate; no
    /// credential is `Anonymous` unless auth is required.
    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError> {
        match (credentials.authorization, self.required) {
            (None, true) => Err(AuthError::Missing),
            _ => Ok(Caller::Anonymous),
        }
    }
}
