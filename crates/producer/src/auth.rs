//! Credentials and the token cache: SAS keys signed locally, fixed signatures, Entra ID through azure_identity's
//! `TokenCredential`; one cache per credential and audience, refreshed in the background before expiry.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use eventhub_wire::sas::{SasToken, sign_token};
use eventhub_wire::{JWT_TOKEN_TYPE, SAS_TOKEN_TYPE};

/// The scope of Entra ID tokens for Event Hubs.
pub const EVENT_HUBS_SCOPE: &str = "https://eventhubs.azure.net/.default";

/// How the producer proves who it is.
#[derive(Clone)]
pub enum Credential {
    /// A shared access key: tokens are signed locally and live `token_lifetime`.
    SharedKey {
        /// `SharedAccessKeyName`.
        name: String,
        /// `SharedAccessKey`.
        key: String,
        /// How long each signed token is valid.
        token_lifetime: Duration,
    },
    /// A ready-made SAS token; it cannot be renewed, so sends fail once it expires.
    SharedAccessSignature(String),
    /// An Entra ID credential (workload identity, managed identity, Azure CLI, client secret, ...).
    Entra(Arc<dyn azure_core::credentials::TokenCredential>),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SharedKey {
                name,
                token_lifetime,
                ..
            } => f
                .debug_struct("SharedKey")
                .field("name", name)
                .field("token_lifetime", token_lifetime)
                .finish_non_exhaustive(),
            Self::SharedAccessSignature(_) => f.write_str("SharedAccessSignature(<redacted>)"),
            Self::Entra(credential) => write!(f, "Entra({credential:?})"),
        }
    }
}

/// A token to put on `$cbs`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The token itself.
    pub token: String,
    /// Its CBS type (`servicebus.windows.net:sastoken` or `jwt`).
    pub token_type: &'static str,
    /// When it was obtained.
    pub issued_at: SystemTime,
    /// When it expires.
    pub expires_at: SystemTime,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// When to fetch its successor: after `fraction` of its lifetime.
    pub fn refresh_at(&self, fraction: f64) -> SystemTime {
        let lifetime = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + lifetime.mul_f64(fraction)
    }

    /// Whether it is still valid now.
    pub fn is_valid(&self) -> bool {
        self.expires_at > SystemTime::now()
    }
}

/// Why no token could be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The fixed SAS token of the connection string has expired.
    #[error("the SharedAccessSignature expired; a connection string with a key can be renewed")]
    SignatureExpired,
    /// The fixed SAS token is not a valid SAS token.
    #[error("the SharedAccessSignature is malformed: {0}")]
    BadSignature(String),
    /// The Entra ID credential failed.
    #[error("the Entra ID credential failed: {0}")]
    Credential(String),
    /// No token arrived in time.
    #[error("no token for {audience} within {waited:?}")]
    Timeout {
        /// The audience.
        audience: String,
        /// How long the caller waited.
        waited: Duration,
    },
}

impl Credential {
    /// Obtains a fresh token for `audience` (`sb://<host>/<hub>`).
    pub async fn fetch(&self, audience: &str) -> Result<AccessToken, AuthError> {
        let now = SystemTime::now();
        match self {
            Self::SharedKey {
                name,
                key,
                token_lifetime,
            } => {
                // `se` has whole seconds: the cache must refresh against the expiry the service will read.
                let expires = unix_seconds(now + *token_lifetime);
                let expires_at = UNIX_EPOCH + Duration::from_secs(expires);
                Ok(AccessToken {
                    token: sign_token(audience, name, key, expires),
                    token_type: SAS_TOKEN_TYPE,
                    issued_at: now,
                    expires_at,
                })
            }
            Self::SharedAccessSignature(token) => {
                let parsed =
                    SasToken::parse(token).map_err(|e| AuthError::BadSignature(e.to_string()))?;
                let expires_at = UNIX_EPOCH + Duration::from_secs(parsed.expires_at);
                if expires_at <= now {
                    return Err(AuthError::SignatureExpired);
                }
                Ok(AccessToken {
                    token: token.clone(),
                    token_type: SAS_TOKEN_TYPE,
                    issued_at: now,
                    expires_at,
                })
            }
            Self::Entra(credential) => {
                let token = credential
                    .get_token(&[EVENT_HUBS_SCOPE], None)
                    .await
                    .map_err(|e| AuthError::Credential(e.to_string()))?;
                let expires_at = UNIX_EPOCH
                    + Duration::from_secs(token.expires_on.unix_timestamp().max(0) as u64);
                Ok(AccessToken {
                    token: token.token.secret().to_owned(),
                    token_type: JWT_TOKEN_TYPE,
                    issued_at: now,
                    expires_at,
                })
            }
        }
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The cache's view of one audience's token.
#[derive(Clone, Debug)]
pub enum TokenState {
    /// The first token is being fetched.
    Pending,
    /// A valid token.
    Ready(Arc<AccessToken>),
    /// The last fetch failed; `previous` is the last token obtained, which may still be valid.
    Failed {
        /// Why.
        error: AuthError,
        /// The last good token.
        previous: Option<Arc<AccessToken>>,
    },
}

impl TokenState {
    /// A token that is valid now, if there is one.
    pub fn valid_token(&self) -> Option<Arc<AccessToken>> {
        match self {
            Self::Ready(token)
            | Self::Failed {
                previous: Some(token),
                ..
            } if token.is_valid() => Some(Arc::clone(token)),
            _ => None,
        }
    }
}

/// When the cache refreshes tokens and how it backs off after failures.
#[derive(Clone, Copy, Debug)]
pub struct RefreshPolicy {
    /// Fraction of a token's lifetime after which it is replaced.
    pub refresh_fraction: f64,
    /// First pause after a failed fetch; it doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between failed fetches.
    pub max_backoff: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            refresh_fraction: 0.9,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// One token per audience, fetched once and refreshed in the background; shared by every connection.
pub struct TokenCache {
    credential: Credential,
    policy: RefreshPolicy,
    audiences: Mutex<HashMap<String, Audience>>,
    stop: CancellationToken,
    refreshes: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU64,
}

/// One audience's token as the cache follows it, and the bell that asks for a new one early.
struct Audience {
    state: watch::Receiver<TokenState>,
    refresh_now: Arc<Notify>,
}

/// The soonest one audience's token is fetched again after a fetch, however often a refusal asks for it.
const MIN_FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

impl TokenCache {
    /// A cache for this credential; its refresh tasks stop when `stop` is cancelled.
    pub fn new(
        credential: Credential,
        policy: RefreshPolicy,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            credential,
            policy,
            audiences: Mutex::new(HashMap::new()),
            stop,
            refreshes: Default::default(),
            failures: Default::default(),
        })
    }

    /// Follows the token of `audience`, starting its refresh task on first use.
    pub fn watch(self: &Arc<Self>, audience: &str) -> watch::Receiver<TokenState> {
        let mut audiences = self.audiences.lock();
        if let Some(existing) = audiences.get(audience) {
            return existing.state.clone();
        }
        let (sender, receiver) = watch::channel(TokenState::Pending);
        let refresh_now = Arc::new(Notify::new());
        audiences.insert(
            audience.to_owned(),
            Audience {
                state: receiver.clone(),
                refresh_now: Arc::clone(&refresh_now),
            },
        );
        tokio::spawn(Arc::clone(self).refresh(audience.to_owned(), sender, refresh_now));
        receiver
    }

    /// Asks for a new token for `audience` now rather than at its refresh time, because the service refused the
    /// current one (it expired by the service's clock, or was revoked). Fetches at most once per
    /// [`MIN_FORCED_REFRESH_INTERVAL`]; every connection then puts the new token.
    pub fn refresh_now(&self, audience: &str) {
        if let Some(known) = self.audiences.lock().get(audience) {
            known.refresh_now.notify_one();
        }
    }

    /// A valid token for `audience`, waiting at most `wait` for the first one.
    pub async fn token(
        self: &Arc<Self>,
        audience: &str,
        wait: Duration,
    ) -> Result<Arc<AccessToken>, AuthError> {
        let mut receiver = self.watch(audience);
        let outcome = tokio::time::timeout(wait, async {
            loop {
                let state = receiver.borrow_and_update().clone();
                if let Some(token) = state.valid_token() {
                    return Ok(token);
                }
                if let TokenState::Failed { error, .. } = state {
                    return Err(error);
                }
                if receiver.changed().await.is_err() {
                    return Err(AuthError::Credential("the token cache stopped".into()));
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            Err(AuthError::Timeout {
                audience: audience.to_owned(),
                waited: wait,
            })
        })
    }

    /// How many tokens were fetched, and how many fetches failed.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.refreshes.load(Relaxed), self.failures.load(Relaxed))
    }

    async fn refresh(
        self: Arc<Self>,
        audience: String,
        sender: watch::Sender<TokenState>,
        refresh_now: Arc<Notify>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut backoff = self.policy.initial_backoff;
        let mut previous: Option<Arc<AccessToken>> = None;
        loop {
            let fetched_at = tokio::time::Instant::now();
            let fetch = self
                .credential
                .fetch(&audience)
                .instrument(tracing::info_span!(
                    "token refresh",
                    otel.name = "token refresh",
                    %audience
                ));
            let pause = match fetch.await {
                Ok(token) => {
                    self.refreshes.fetch_add(1, Relaxed);
                    debug!(%audience, expires_at = ?token.expires_at, "token obtained");
                    backoff = self.policy.initial_backoff;
                    let refresh_at = token.refresh_at(self.policy.refresh_fraction);
                    let token = Arc::new(token);
                    previous = Some(Arc::clone(&token));
                    sender.send_replace(TokenState::Ready(token));
                    // Never spin: a token too short-lived to refresh early is refreshed once a second at most.
                    refresh_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(Duration::from_secs(1))
                }
                Err(error) => {
                    self.failures.fetch_add(1, Relaxed);
                    warn!(%audience, %error, retry_in = ?backoff, "token fetch failed");
                    sender.send_replace(TokenState::Failed {
                        error,
                        previous: previous.clone().filter(|t| t.is_valid()),
                    });
                    let pause = backoff;
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                    pause
                }
            };
            let early = tokio::select! {
                () = tokio::time::sleep(pause) => false,
                () = refresh_now.notified() => true,
                () = self.stop.cancelled() => return,
            };
            if early {
                tokio::select! {
                    () = tokio::time::sleep_until(fetched_at + MIN_FORCED_REFRESH_INTERVAL) => {}
                    () = self.stop.cancelled() => return,
                }
                // Asks made while waiting are answered by the fetch that follows.
                let _ = refresh_now.notified().now_or_never();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_key(lifetime: Duration) -> Credential {
        Credential::SharedKey {
            name: "RootManageSharedAccessKey".into(),
            key: "SAS_KEY_VALUE".into(),
            token_lifetime: lifetime,
        }
    }

    #[tokio::test]
    async fn shared_keys_sign_tokens_for_the_audience() {
        let token = shared_key(Duration::from_secs(3600))
            .fetch("sb://localhost/eh1")
            .await
            .unwrap();
        let parsed = SasToken::parse(&token.token).unwrap();
        assert_eq!(parsed.resource, "sb://localhost/eh1");
        assert_eq!(token.token_type, SAS_TOKEN_TYPE);
        let lifetime = token.expires_at.duration_since(token.issued_at).unwrap();
        assert!(lifetime <= Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn expired_fixed_signatures_are_refused() {
        let expired = sign_token("sb://localhost/eh1", "n", "k", 1);
        let error = Credential::SharedAccessSignature(expired)
            .fetch("sb://localhost/eh1")
            .await
            .unwrap_err();
        assert_eq!(error, AuthError::SignatureExpired);
    }

    #[tokio::test]
    async fn the_cache_refreshes_before_expiry() {
        let stop = CancellationToken::new();
        let cache = TokenCache::new(
            shared_key(Duration::from_secs(2)),
            RefreshPolicy::default(),
            stop.clone(),
        );
        let first = cache
            .token("sb://localhost/eh1", Duration::from_secs(5))
            .await
            .unwrap();
        let mut watch = cache.watch("sb://localhost/eh1");
        watch.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .unwrap()
            .unwrap();
        let second = watch.borrow().valid_token().unwrap();
        assert_ne!(first.token, second.token, "a new token replaced the first");
        assert!(
            first.is_valid(),
            "the new one came before the first expired"
        );
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_token_is_fetched_again_early_but_at_most_once_per_interval() {
        let stop = CancellationToken::new();
        let cache = TokenCache::new(
            shared_key(Duration::from_secs(3600)),
            RefreshPolicy::default(),
            stop.clone(),
        );
        let audience = "sb://localhost/eh1";
        cache.token(audience, Duration::from_secs(5)).await.unwrap();
        assert_eq!(cache.counts(), (1, 0));
        // Asked at once and again: one early fetch, after the interval since the last one.
        cache.refresh_now(audience);
        cache.refresh_now(audience);
        tokio::time::sleep(MIN_FORCED_REFRESH_INTERVAL - Duration::from_millis(10)).await;
        assert_eq!(cache.counts(), (1, 0), "not before the interval");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            cache.counts(),
            (2, 0),
            "an hour-long token fetched again early"
        );
        tokio::time::sleep(MIN_FORCED_REFRESH_INTERVAL * 3).await;
        assert_eq!(cache.counts(), (2, 0), "and only once for both asks");
        // An audience never asked for has nothing to refresh.
        cache.refresh_now("sb://localhost/other");
        stop.cancel();
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let credential = shared_key(Duration::from_secs(1));
        assert!(!format!("{credential:?}").contains("SAS_KEY_VALUE"));
        let token = AccessToken {
            token: "SECRET".into(),
            token_type: SAS_TOKEN_TYPE,
            issued_at: UNIX_EPOCH,
            expires_at: UNIX_EPOCH,
        };
        assert!(!format!("{token:?}").contains("SECRET"));
    }
}
