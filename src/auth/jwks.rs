//! An issuer's signing keys: JWKS documents parsed into verifying keys, from a file (re-read when it
//! changes) or a URL (fetched at start, refreshed on an interval and for an unknown `kid`, rate-limited).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::AuthError;
use super::jwt::{accepted_algorithm, algorithm_name};

/// The largest JWKS document read or fetched.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The most keys one JWKS document may hold.
pub const MAX_JWKS_KEYS: usize = 100;

/// The kind of a verifying key, which fixes the algorithms it can check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, algorithm: Algorithm) -> bool {
        match self {
            Self::Rsa => matches!(
                algorithm,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            Self::P256 => algorithm == Algorithm::ES256,
            Self::P384 => algorithm == Algorithm::ES384,
            Self::Ed25519 => algorithm == Algorithm::EdDSA,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Rsa => "an RSA key",
            Self::P256 => "a P-256 key",
            Self::P384 => "a P-384 key",
            Self::Ed25519 => "an Ed25519 key",
        }
    }
}

/// One usable key of a JWKS.
#[derive(Debug)]
pub(crate) struct VerifyingKey {
    pub(crate) kid: Option<String>,
    pub(crate) kind: KeyKind,
    /// The key's own `alg`, when the JWK states one.
    pub(crate) algorithm: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl VerifyingKey {
    /// Refuses `algorithm` unless it fits the key's type and the key's stated `alg`.
    pub(crate) fn check_algorithm(&self, algorithm: Algorithm) -> Result<(), AuthError> {
        let fits = self.kind.fits(algorithm) && self.algorithm.is_none_or(|own| own == algorithm);
        if fits {
            Ok(())
        } else {
            Err(AuthError::AlgorithmMismatch {
                algorithm: algorithm_name(algorithm),
                key: self.kind.label(),
            })
        }
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    keys: Vec<Arc<VerifyingKey>>,
}

/// What a key lookup found.
pub(crate) enum Lookup {
    Found(Arc<VerifyingKey>),
    Unknown,
    /// No `kid` and several keys fit.
    Ambiguous,
}

fn decode_b64(value: Option<&Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = value
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no `{name}`"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("`{name}` is not base64url"))
}

/// The key a JWK describes, or why it is skipped.
fn parse_key(jwk: &Map<String, Value>) -> Result<VerifyingKey, String> {
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err("its `kid` is not a string".into()),
    };
    match jwk.get("use").map(|value| value.as_str()) {
        None | Some(Some("sig")) => {}
        Some(_) => return Err("its `use` is not \"sig\"".into()),
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("its `key_ops` do not include \"verify\"".into());
        }
    }
    let algorithm = match jwk.get("alg") {
        None => None,
        Some(Value::String(alg)) => {
            let alg = if alg == "Ed25519" {
                "EdDSA"
            } else {
                alg.as_str()
            };
            Some(accepted_algorithm(alg).map_err(|_| {
                "its `alg` is not a signature algorithm the gateway accepts".to_string()
            })?)
        }
        Some(_) => return Err("its `alg` is not a string".into()),
    };
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
    let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or_default();
    let (kind, key) = match (kty, crv) {
        ("RSA", _) => {
            let n = decode_b64(jwk.get("n"), "n")?;
            let e = decode_b64(jwk.get("e"), "e")?;
            let modulus = n.iter().skip_while(|&&b| b == 0).count();
            if !(256..=1024).contains(&modulus) {
                return Err(format!(
                    "its RSA modulus has {} bits (2048 to 8192 accepted)",
                    modulus * 8
                ));
            }
            if e.is_empty() || e.len() > 8 {
                return Err("its RSA exponent is not 1 to 8 bytes".into());
            }
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        ("EC", "P-256" | "P-384") => {
            let (kind, size) = if crv == "P-256" {
                (KeyKind::P256, 32)
            } else {
                (KeyKind::P384, 48)
            };
            let x = decode_b64(jwk.get("x"), "x")?;
            let y = decode_b64(jwk.get("y"), "y")?;
            if x.len() != size || y.len() != size {
                return Err(format!("its {crv} coordinates are not {size} bytes each"));
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point))
        }
        ("EC", _) => return Err("its curve is not P-256 or P-384".into()),
        ("OKP", "Ed25519") => {
            let x = decode_b64(jwk.get("x"), "x")?;
            if x.len() != 32 {
                return Err("its Ed25519 key is not 32 bytes".into());
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        ("OKP", _) => return Err("its curve is not Ed25519".into()),
        ("oct", _) => return Err("it is a symmetric (oct) key, which is never accepted".into()),
        _ => return Err("its `kty` is not RSA, EC or OKP".into()),
    };
    let key = VerifyingKey {
        kid,
        kind,
        algorithm,
        key,
    };
    if let Some(algorithm) = algorithm {
        if !kind.fits(algorithm) {
            return Err(format!(
                "its `alg` {} does not fit {}",
                algorithm_name(algorithm),
                kind.label()
            ));
        }
    }
    Ok(key)
}

impl KeySet {
    /// The usable keys of a JWKS document, and why each other key was skipped; an error when the document
    /// is not a JWKS, is too large, or has no usable key.
    pub(crate) fn parse(document: &[u8]) -> Result<(Self, Vec<String>), String> {
        if document.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the JWKS is {} bytes; at most {MAX_JWKS_BYTES} are read",
                document.len()
            ));
        }
        let value: Value =
            serde_json::from_slice(document).map_err(|error| format!("not JSON: {error}"))?;
        let Some(keys) = value.get("keys").and_then(Value::as_array) else {
            return Err("not a JWKS (no `keys` array)".into());
        };
        if keys.len() > MAX_JWKS_KEYS {
            return Err(format!(
                "the JWKS holds {} keys; at most {MAX_JWKS_KEYS} are accepted",
                keys.len()
            ));
        }
        let mut set = Self::default();
        let mut skipped = Vec::new();
        for (index, jwk) in keys.iter().enumerate() {
            let name = match jwk.get("kid").and_then(Value::as_str) {
                Some(kid) => format!("key {index} (kid {kid:?})"),
                None => format!("key {index}"),
            };
            let Some(jwk) = jwk.as_object() else {
                skipped.push(format!("{name}: not a JSON object"));
                continue;
            };
            match parse_key(jwk) {
                Ok(key) => {
                    let duplicate =
                        key.kid.is_some() && set.keys.iter().any(|other| other.kid == key.kid);
                    if duplicate {
                        skipped.push(format!("{name}: the same kid as an earlier key"));
                    } else {
                        set.keys.push(Arc::new(key));
                    }
                }
                Err(reason) => skipped.push(format!("{name}: {reason}")),
            }
        }
        if set.keys.is_empty() {
            return Err(if skipped.is_empty() {
                "the JWKS holds no keys".into()
            } else {
                format!("the JWKS holds no usable key ({})", skipped.join("; "))
            });
        }
        Ok((set, skipped))
    }

    /// The key `kid` names; without a `kid`, the one key that fits `algorithm`.
    pub(crate) fn find(&self, kid: Option<&str>, algorithm: Algorithm) -> Lookup {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|key| key.kid.as_deref() == Some(kid))
                .map_or(Lookup::Unknown, |key| Lookup::Found(Arc::clone(key))),
            None => {
                let mut fitting = self
                    .keys
                    .iter()
                    .filter(|key| key.check_algorithm(algorithm).is_ok());
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Lookup::Found(Arc::clone(key)),
                    (None, _) => Lookup::Unknown,
                    (Some(_), Some(_)) => Lookup::Ambiguous,
                }
            }
        }
    }

    /// How many usable keys there are.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// How often keys are re-checked; shortened in tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// A JWKS file's modification time is checked at most this often.
    pub(crate) file_check: Duration,
    /// An unknown `kid` re-checks a file at most this often.
    pub(crate) file_recheck: Duration,
    /// An unknown `kid` (or no keys yet) re-fetches a URL at most this often, per issuer.
    pub(crate) url_refetch: Duration,
    /// A fetch's whole time (connect, headers, body).
    pub(crate) fetch_timeout: Duration,
    /// The refresh interval of a URL whose answer names no usable `max-age`.
    pub(crate) refresh: Duration,
    /// The bounds a `Cache-Control: max-age` is held within.
    pub(crate) refresh_min: Duration,
    pub(crate) refresh_max: Duration,
    /// The first retry after a failed fetch (doubling up to `retry_max`).
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            file_check: Duration::from_secs(5),
            file_recheck: Duration::from_secs(1),
            url_refetch: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(10),
            refresh: Duration::from_secs(300),
            refresh_min: Duration::from_secs(60),
            refresh_max: Duration::from_secs(3600),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Where an issuer's keys come from.
#[derive(Debug)]
pub(crate) enum KeySource {
    File(Box<FileKeys>),
    Url(Arc<UrlKeys>),
}

impl KeySource {
    /// The key for a token's `kid` and algorithm, re-reading or re-fetching (rate-limited) when the `kid`
    /// is unknown.
    pub(crate) async fn key_for(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Arc<VerifyingKey>, AuthError> {
        let lookup = match self {
            Self::File(file) => {
                let lookup = file.current(false).await.find(kid, algorithm);
                match lookup {
                    Lookup::Unknown => file.current(true).await.find(kid, algorithm),
                    other => other,
                }
            }
            Self::Url(url) => {
                let keys = match url.current() {
                    Some(keys) => keys,
                    None => {
                        url.refetch_on_demand().await;
                        url.current().ok_or_else(|| AuthError::KeysUnavailable {
                            issuer: url.issuer.clone(),
                        })?
                    }
                };
                match keys.find(kid, algorithm) {
                    Lookup::Unknown => {
                        url.refetch_on_demand().await;
                        match url.current() {
                            Some(keys) => keys.find(kid, algorithm),
                            None => Lookup::Unknown,
                        }
                    }
                    other => other,
                }
            }
        };
        match lookup {
            Lookup::Found(key) => {
                key.check_algorithm(algorithm)?;
                Ok(key)
            }
            Lookup::Unknown => Err(AuthError::UnknownKey),
            Lookup::Ambiguous => Err(AuthError::Malformed {
                problem: "the token names no key (kid) and several of the issuer's keys fit it",
            }),
        }
    }
}

/// A file's identity for change detection.
type Stamp = (Option<SystemTime>, u64);

async fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let metadata = tokio::fs::metadata(path).await?;
    Ok((metadata.modified().ok(), metadata.len()))
}

/// Reads and parses a JWKS file (bounded before reading).
async fn read_jwks_file(path: &Path) -> Result<(KeySet, Vec<String>), String> {
    let metadata = tokio::fs::metadata(path)
        .await
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if metadata.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!(
            "{} is {} bytes; at most {MAX_JWKS_BYTES} are read",
            path.display(),
            metadata.len()
        ));
    }
    let document = tokio::fs::read(path)
        .await
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    KeySet::parse(&document).map_err(|problem| format!("{}: {problem}", path.display()))
}

fn log_skipped(issuer: &str, skipped: &[String]) {
    for reason in skipped {
        tracing::warn!(issuer, "JWKS key skipped: {reason}");
    }
}

/// Keys from a JWKS file, re-read when its modification time or size changes.
#[derive(Debug)]
pub(crate) struct FileKeys {
    issuer: String,
    path: PathBuf,
    timing: Timing,
    keys: RwLock<Arc<KeySet>>,
    /// When the file was last checked: read without waiting, so a check costs one request per interval.
    checked: parking_lot::Mutex<Instant>,
    /// The file's stamp when its keys were read; held while checking.
    stamp: tokio::sync::Mutex<Stamp>,
}

impl FileKeys {
    /// Reads `path` now: a file unusable at start is a setup error.
    pub(crate) async fn load(issuer: &str, path: &Path, timing: Timing) -> Result<Self, String> {
        let before = stamp(path)
            .await
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let (keys, skipped) = read_jwks_file(path).await?;
        log_skipped(issuer, &skipped);
        tracing::info!(issuer, keys = keys.len(), file = %path.display(), "JWKS loaded");
        Ok(Self {
            issuer: issuer.to_owned(),
            path: path.to_owned(),
            timing,
            keys: RwLock::new(Arc::new(keys)),
            checked: parking_lot::Mutex::new(Instant::now()),
            stamp: tokio::sync::Mutex::new(before),
        })
    }

    /// The keys, re-read first if the file changed and a check is due (`unknown_kid` makes one due sooner).
    async fn current(&self, unknown_kid: bool) -> Arc<KeySet> {
        let due = if unknown_kid {
            self.timing.file_recheck
        } else {
            self.timing.file_check
        };
        let check_now = {
            let mut checked = self.checked.lock();
            let check_now = checked.elapsed() >= due;
            if check_now {
                *checked = Instant::now();
            }
            check_now
        };
        if check_now {
            let mut stamp_read = self.stamp.lock().await;
            match stamp(&self.path).await {
                Ok(now) if now != *stamp_read => match read_jwks_file(&self.path).await {
                    Ok((keys, skipped)) => {
                        log_skipped(&self.issuer, &skipped);
                        tracing::info!(issuer = %self.issuer, keys = keys.len(), "JWKS file changed; keys re-read");
                        *self.keys.write() = Arc::new(keys);
                        *stamp_read = now;
                    }
                    // Perhaps half-written: the old keys stay, and the next check tries again.
                    Err(problem) => {
                        tracing::warn!(issuer = %self.issuer, "JWKS file unusable, keeping the previous keys: {problem}")
                    }
                },
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(issuer = %self.issuer, file = %self.path.display(), "JWKS file unreadable, keeping the previous keys: {error}")
                }
            }
        }
        Arc::clone(&self.keys.read())
    }
}

/// Keys from a JWKS URL: fetched at start and on an interval by a task, and on demand (rate-limited).
#[derive(Debug)]
pub(crate) struct UrlKeys {
    issuer: String,
    url: String,
    client: reqwest::Client,
    bearer_token_file: Option<PathBuf>,
    timing: Timing,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching; the time of the last attempt.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl UrlKeys {
    pub(crate) fn new(
        issuer: &str,
        url: &str,
        client: reqwest::Client,
        bearer_token_file: Option<PathBuf>,
        timing: Timing,
    ) -> Self {
        Self {
            issuer: issuer.to_owned(),
            url: url.to_owned(),
            client,
            bearer_token_file,
            timing,
            keys: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().clone()
    }

    /// Fetches now unless a fetch happened within `url_refetch` (callers waiting meanwhile share its result).
    async fn refetch_on_demand(&self) {
        let mut last = self.fetching.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.timing.url_refetch) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(problem) = self.fetch().await {
            tracing::warn!(issuer = %self.issuer, url = %self.url, "JWKS fetch failed: {problem}");
        }
    }

    /// One fetch: the keys are replaced on success; the answer's `max-age`, if any, is returned.
    async fn fetch(&self) -> Result<Option<Duration>, String> {
        let mut request = self
            .client
            .get(&self.url)
            .header(http::header::ACCEPT, "application/json");
        if let Some(path) = &self.bearer_token_file {
            let token = tokio::fs::read_to_string(path).await.map_err(|error| {
                format!("cannot read bearer_token_file {}: {error}", path.display())
            })?;
            request = request.bearer_auth(token.trim());
        }
        let mut response = request.send().await.map_err(|error| error.to_string())?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("answered HTTP {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|length| length > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let max_age = response
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|value| value.to_str().ok())
            .and_then(max_age);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| error.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let (keys, skipped) = KeySet::parse(&body)?;
        log_skipped(&self.issuer, &skipped);
        tracing::debug!(issuer = %self.issuer, keys = keys.len(), "JWKS fetched");
        *self.keys.write() = Some(Arc::new(keys));
        Ok(max_age)
    }

    /// Fetches at once, then on the refresh interval (or sooner, with backoff, after a failure), until
    /// `shutdown` or until the authenticator is gone.
    pub(crate) async fn run(this: Weak<Self>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let Some(keys) = this.upgrade() else { return };
            let result = {
                let mut last = tokio::select! {
                    last = keys.fetching.lock() => last,
                    () = shutdown.cancelled() => return,
                };
                let fresh = last.is_some_and(|at| at.elapsed() < keys.timing.url_refetch);
                if fresh && keys.current().is_some() {
                    // A fetch for an unknown kid just ran: it counts as this refresh.
                    Ok(None)
                } else {
                    *last = Some(Instant::now());
                    tokio::select! {
                        result = keys.fetch() => result,
                        () = shutdown.cancelled() => return,
                    }
                }
            };
            let wait = next_wait(&keys.timing, result.as_ref().map(|age| *age), &mut failures);
            if let Err(problem) = &result {
                tracing::warn!(
                    issuer = %keys.issuer,
                    url = %keys.url,
                    retry_in = ?wait,
                    have_keys = keys.current().is_some(),
                    "JWKS fetch failed: {problem}"
                );
            }
            drop(keys);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// How long until the next fetch: the answer's `max-age` within bounds (or the default refresh) after a
/// success; after a failure, a backoff doubling from `retry_min` to `retry_max`.
fn next_wait(
    timing: &Timing,
    result: Result<Option<Duration>, &String>,
    failures: &mut u32,
) -> Duration {
    match result {
        Ok(max_age) => {
            *failures = 0;
            max_age
                .map(|age| age.clamp(timing.refresh_min, timing.refresh_max))
                .unwrap_or(timing.refresh)
        }
        Err(_) => {
            *failures = failures.saturating_add(1);
            timing
                .retry_min
                .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
                .min(timing.retry_max)
        }
    }
}

/// Checks a JWKS document as the authenticator would (for fuzzing): the number of usable keys and why the
/// others were skipped, or why the document is refused. It never panics.
pub fn check_document(document: &[u8]) -> Result<(usize, Vec<String>), String> {
    KeySet::parse(document).map(|(keys, skipped)| (keys.len(), skipped))
}

/// The `max-age` of a `Cache-Control` value (`no-cache`/`no-store` count as 0).
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let directive = directive.trim();
        if directive.eq_ignore_ascii_case("no-cache") || directive.eq_ignore_ascii_case("no-store")
        {
            return Some(Duration::ZERO);
        }
        let (name, value) = directive.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        value
            .trim()
            .trim_matches('"')
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn parse(keys: Value) -> Result<(KeySet, Vec<String>), String> {
        KeySet::parse(&serde_json::to_vec(&json!({ "keys": keys })).unwrap())
    }

    #[test]
    fn keys_that_cannot_sign_are_skipped_with_a_reason() {
        let rsa = json!({"kty": "RSA", "kid": "r", "n": b64(&[0xab; 256]), "e": "AQAB"});
        let p256 = json!({"kty": "EC", "crv": "P-256", "kid": "p", "x": b64(&[1; 32]), "y": b64(&[2; 32])});
        let ed =
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "e", "x": b64(&[3; 32]), "alg": "EdDSA"});
        let skipped_cases = [
            (
                json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}),
                "symmetric",
            ),
            (
                json!({"kty": "RSA", "kid": "s", "n": b64(&[0xab; 128]), "e": "AQAB"}),
                "1024 bits",
            ),
            (
                json!({"kty": "RSA", "kid": "u", "use": "enc", "n": b64(&[0xab; 256]), "e": "AQAB"}),
                "use",
            ),
            (
                json!({"kty": "RSA", "kid": "o", "key_ops": ["encrypt"], "n": b64(&[0xab; 256]), "e": "AQAB"}),
                "key_ops",
            ),
            (
                json!({"kty": "RSA", "kid": "a", "alg": "HS256", "n": b64(&[0xab; 256]), "e": "AQAB"}),
                "alg",
            ),
            (
                json!({"kty": "RSA", "kid": "m", "alg": "ES256", "n": b64(&[0xab; 256]), "e": "AQAB"}),
                "does not fit an RSA key",
            ),
            (
                json!({"kty": "EC", "crv": "P-521", "kid": "c", "x": "AA", "y": "AA"}),
                "curve",
            ),
            (
                json!({"kty": "EC", "crv": "P-256", "kid": "l", "x": b64(&[1; 31]), "y": b64(&[2; 32])}),
                "32 bytes",
            ),
            (
                json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": b64(&[3; 32])}),
                "Ed25519",
            ),
            (
                json!({"kty": "RSA", "kid": "r", "n": b64(&[0xcd; 256]), "e": "AQAB"}),
                "same kid",
            ),
            (json!("not an object"), "not a JSON object"),
        ];
        let mut keys = vec![rsa, p256, ed];
        keys.extend(skipped_cases.iter().map(|(key, _)| key.clone()));
        let (set, skipped) = parse(Value::Array(keys)).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(skipped.len(), skipped_cases.len());
        for ((_, reason), got) in skipped_cases.iter().zip(&skipped) {
            assert!(got.contains(reason), "{got} should say {reason}");
        }
        assert!(matches!(
            set.find(Some("p"), Algorithm::ES256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            set.find(Some("zz"), Algorithm::ES256),
            Lookup::Unknown
        ));
        assert!(matches!(set.find(None, Algorithm::EdDSA), Lookup::Found(_)));
        assert!(matches!(set.find(None, Algorithm::ES384), Lookup::Unknown));
        let Lookup::Found(rsa) = set.find(Some("r"), Algorithm::ES256) else {
            panic!("kid r")
        };
        assert!(matches!(
            rsa.check_algorithm(Algorithm::ES256),
            Err(AuthError::AlgorithmMismatch { .. })
        ));
        rsa.check_algorithm(Algorithm::PS512).unwrap();
    }

    #[test]
    fn documents_are_bounded_and_need_a_usable_key() {
        assert!(KeySet::parse(b"not json").unwrap_err().contains("not JSON"));
        assert!(KeySet::parse(b"{}").unwrap_err().contains("no `keys`"));
        assert!(parse(json!([])).unwrap_err().contains("no keys"));
        assert!(
            parse(json!([{"kty": "oct", "k": "AA"}]))
                .unwrap_err()
                .contains("no usable key")
        );
        let many: Vec<Value> = (0..101)
            .map(|i| json!({"kty": "OKP", "crv": "Ed25519", "kid": i.to_string(), "x": b64(&[3; 32])}))
            .collect();
        assert!(parse(Value::Array(many)).unwrap_err().contains("101 keys"));
        let huge = vec![b' '; MAX_JWKS_BYTES + 1];
        assert!(KeySet::parse(&huge).unwrap_err().contains("at most"));
    }

    #[test]
    fn refreshes_follow_max_age_within_bounds_and_failures_back_off() {
        let timing = Timing::default();
        let mut failures = 0;
        let error = String::from("down");
        let secs = Duration::from_secs;
        assert_eq!(next_wait(&timing, Ok(None), &mut failures), secs(300));
        assert_eq!(
            next_wait(&timing, Ok(Some(secs(5))), &mut failures),
            secs(60)
        );
        assert_eq!(
            next_wait(&timing, Ok(Some(secs(900))), &mut failures),
            secs(900)
        );
        assert_eq!(
            next_wait(&timing, Ok(Some(secs(86400))), &mut failures),
            secs(3600)
        );
        let backoff: Vec<u64> = (0..9)
            .map(|_| next_wait(&timing, Err(&error), &mut failures).as_secs())
            .collect();
        assert_eq!(backoff, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        for _ in 0..100 {
            next_wait(&timing, Err(&error), &mut failures);
        }
        assert_eq!(next_wait(&timing, Err(&error), &mut failures), secs(60));
        assert_eq!(next_wait(&timing, Ok(None), &mut failures), secs(300));
        assert_eq!(failures, 0);
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age("public, max-age=120"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(max_age("MAX-AGE = \"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("private"), None);
        assert_eq!(max_age("max-age=-1"), None);
    }
}
