//! Bearer JWTs: decoding an untrusted token's header and claims, the accepted algorithms, the signature
//! (verified by `jsonwebtoken` on aws-lc) and the registered claims (`exp`, `nbf`, `iss`, `aud`).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::AuthError;
use super::certificate::MAX_IDENTITY_LEN;

/// The longest bearer token accepted, in bytes (Kubernetes service-account tokens are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The algorithms accepted, as a sentence for error messages.
pub const ACCEPTED_ALGORITHMS: &str =
    "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA";

/// A token's JOSE header, decoded without verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHeader {
    /// `alg`, as the token states it.
    pub alg: String,
    /// `kid`: which of the issuer's keys signed it.
    pub kid: Option<String>,
    /// `typ`, if any (not checked).
    pub typ: Option<String>,
}

/// A token decoded without verification: nothing in it is trusted yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspected {
    /// The header.
    pub header: TokenHeader,
    /// The claims object.
    pub claims: Map<String, Value>,
}

fn is_base64url(part: &str) -> bool {
    part.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `token` has a JWT's shape: three base64url parts separated by dots, header and claims non-empty
/// (an empty signature still counts, so an `alg: none` token is refused as such).
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(claims), Some(signature), None) => {
            !header.is_empty()
                && !claims.is_empty()
                && is_base64url(header)
                && is_base64url(claims)
                && is_base64url(signature)
        }
        _ => false,
    }
}

/// The JSON object base64url `part` holds; the problems are static so no error echoes the token.
fn decode_object(
    part: &str,
    not_base64: &'static str,
    not_object: &'static str,
) -> Result<Map<String, Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed {
            problem: not_base64,
        })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(AuthError::Malformed {
            problem: not_object,
        }),
    }
}

/// Decodes an untrusted token's header and claims without verifying anything (for the authenticator and
/// for fuzzing: it never panics, whatever `token` holds).
pub fn inspect(token: &str) -> Result<Inspected, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::TooLong {
            length: token.len(),
            limit: MAX_TOKEN_LEN,
        });
    }
    if !looks_like_jwt(token) {
        return Err(AuthError::Malformed {
            problem: "the token is not a JWT (three base64url parts separated by dots)",
        });
    }
    let mut parts = token.split('.');
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        return Err(AuthError::Malformed {
            problem: "the token is not a JWT (three base64url parts separated by dots)",
        });
    };
    let header = decode_object(
        header,
        "the token's header is not base64url",
        "the token's header is not a JSON object",
    )?;
    if header.contains_key("crit") {
        return Err(AuthError::Malformed {
            problem: "the token's header lists critical extensions (crit) the gateway does not understand",
        });
    }
    let Some(Value::String(alg)) = header.get("alg") else {
        return Err(AuthError::Malformed {
            problem: "the token's header has no algorithm (alg)",
        });
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => {
            return Err(AuthError::Malformed {
                problem: "the token's key id (kid) is not a string",
            });
        }
    };
    let typ = header.get("typ").and_then(Value::as_str).map(str::to_owned);
    let claims = decode_object(
        claims,
        "the token's claims are not base64url",
        "the token's claims are not a JSON object",
    )?;
    Ok(Inspected {
        header: TokenHeader {
            alg: alg.clone(),
            kid,
            typ,
        },
        claims,
    })
}

/// The algorithm `alg` names, if the gateway accepts it: never `none`, never HMAC, nothing unknown.
pub fn accepted_algorithm(alg: &str) -> Result<Algorithm, AuthError> {
    let accepted = match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => {
            // A bounded label, never the token's own text.
            let algorithm = match alg {
                _ if alg.eq_ignore_ascii_case("none") => "none",
                "HS256" => "HS256",
                "HS384" => "HS384",
                "HS512" => "HS512",
                "ES512" => "ES512",
                _ => "an unknown algorithm",
            };
            return Err(AuthError::AlgorithmRefused { algorithm });
        }
    };
    Ok(accepted)
}

/// The name of an accepted algorithm.
pub(crate) fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        _ => "HMAC",
    }
}

/// Checks `token`'s signature with `key` under `algorithm` (already matched to the key).
pub(crate) fn verify_signature(
    token: &str,
    algorithm: Algorithm,
    key: &DecodingKey,
) -> Result<(), AuthError> {
    let Some((message, signature)) = token.rsplit_once('.') else {
        return Err(AuthError::BadSignature);
    };
    match jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, algorithm) {
        Ok(true) => Ok(()),
        _ => Err(AuthError::BadSignature),
    }
}

/// What one issuer requires of a token's claims.
#[derive(Clone, Debug)]
pub(crate) struct ClaimsPolicy {
    pub(crate) issuer: String,
    pub(crate) audiences: Vec<String>,
    pub(crate) identity_claim: String,
    pub(crate) leeway_seconds: u64,
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(number)) => match number.as_f64() {
            Some(value) if value.is_finite() => Ok(Some(value)),
            _ => Err(()),
        },
        Some(_) => Err(()),
    }
}

impl ClaimsPolicy {
    /// The identity the (signature-verified) `claims` name, if `exp`, `nbf`, `iss` and `aud` hold at `now`.
    pub(crate) fn check(&self, claims: &Map<String, Value>, now: u64) -> Result<String, AuthError> {
        let now = now as f64;
        let leeway = self.leeway_seconds as f64;
        let exp = match numeric_date(claims, "exp") {
            Ok(Some(exp)) => exp,
            Ok(None) => {
                return Err(AuthError::Malformed {
                    problem: "the token has no expiry (exp); one is required",
                });
            }
            Err(()) => {
                return Err(AuthError::Malformed {
                    problem: "the token's expiry (exp) is not a number",
                });
            }
        };
        if now > exp + leeway {
            return Err(AuthError::Expired {
                seconds_ago: (now - exp) as u64,
            });
        }
        match numeric_date(claims, "nbf") {
            Ok(Some(nbf)) if nbf > now + leeway => {
                return Err(AuthError::NotYetValid {
                    seconds_ahead: (nbf - now) as u64,
                });
            }
            Ok(_) => {}
            Err(()) => {
                return Err(AuthError::Malformed {
                    problem: "the token's not-before time (nbf) is not a number",
                });
            }
        }
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(AuthError::WrongIssuer {
                configured: self.issuer.clone(),
            });
        }
        let audience_fits = match claims.get("aud") {
            Some(Value::String(audience)) => self.audiences.contains(audience),
            Some(Value::Array(audiences)) => audiences
                .iter()
                .filter_map(Value::as_str)
                .any(|audience| self.audiences.iter().any(|accepted| accepted == audience)),
            _ => false,
        };
        if !audience_fits {
            return Err(AuthError::WrongAudience {
                accepted: self.audiences.join(", "),
            });
        }
        match claims.get(&self.identity_claim) {
            Some(Value::String(identity)) if identity.len() > MAX_IDENTITY_LEN => {
                Err(AuthError::Malformed {
                    problem: "the token's identity claim is longer than 1024 bytes",
                })
            }
            Some(Value::String(identity)) if !identity.is_empty() => Ok(identity.clone()),
            _ => Err(AuthError::NoIdentityClaim {
                claim: self.identity_claim.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encode(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    fn token(header: &Value, claims: &Value) -> String {
        format!("{}.{}.c2ln", encode(header), encode(claims))
    }

    #[test]
    fn inspect_decodes_header_and_claims() {
        let inspected = inspect(&token(
            &json!({"alg": "RS256", "kid": "k1", "typ": "JWT"}),
            &json!({"sub": "a", "exp": 1}),
        ))
        .unwrap();
        assert_eq!(inspected.header.alg, "RS256");
        assert_eq!(inspected.header.kid.as_deref(), Some("k1"));
        assert_eq!(inspected.claims["sub"], "a");
    }

    #[test]
    fn inspect_refuses_what_is_not_a_jwt_without_panicking() {
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        let header = encode(&json!({"alg": "RS256"}));
        let cases = [
            "",
            ".",
            "..",
            "a.b",
            "a.b.c.d",
            "!!.b.c",
            "a.b.c",
            "e30.e30.",
            "bnVsbA.e30.",
            "W10.e30.",
            &format!("{header}.W10.x"),
            &format!("{header}.bm90IGpzb24.x"),
            &format!("{}.e30.x", encode(&json!({"alg": 1}))),
            &format!("{}.e30.x", encode(&json!({"alg": "RS256", "kid": 3}))),
            &format!(
                "{}.e30.x",
                encode(&json!({"alg": "RS256", "crit": ["exp"]}))
            ),
            &long,
            "é.é.é",
            "\u{0}.\u{0}.\u{0}",
        ];
        for case in cases {
            assert!(inspect(case).is_err(), "{case:?}");
        }
        // Deeply nested JSON stays an error, not a stack overflow.
        let deep = URL_SAFE_NO_PAD.encode("[".repeat(4000));
        assert!(inspect(&format!("{header}.{deep}.x")).is_err());
    }

    #[test]
    fn only_asymmetric_signature_algorithms_are_accepted() {
        for alg in ACCEPTED_ALGORITHMS.split(", ") {
            assert_eq!(algorithm_name(accepted_algorithm(alg).unwrap()), alg);
        }
        for (alg, label) in [
            ("none", "none"),
            ("NONE", "none"),
            ("HS256", "HS256"),
            ("HS512", "HS512"),
            ("rs256", "an unknown algorithm"),
            ("RS256 ", "an unknown algorithm"),
        ] {
            match accepted_algorithm(alg) {
                Err(AuthError::AlgorithmRefused { algorithm }) => assert_eq!(algorithm, label),
                other => panic!("{alg}: {other:?}"),
            }
        }
    }

    fn policy() -> ClaimsPolicy {
        ClaimsPolicy {
            issuer: "https://issuer".into(),
            audiences: vec!["eventhub-gateway".into(), "other".into()],
            identity_claim: "sub".into(),
            leeway_seconds: 30,
        }
    }

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn claims_are_checked_with_leeway() {
        let now = 1_000_000;
        let base = json!({"iss": "https://issuer", "aud": "eventhub-gateway", "sub": "me", "exp": now + 60});
        assert_eq!(policy().check(&claims(base.clone()), now).unwrap(), "me");
        let with = |key: &str, value: Value| {
            let mut map = claims(base.clone());
            map.insert(key.into(), value);
            policy().check(&map, now)
        };
        assert!(with("exp", json!(now - 29)).is_ok(), "inside the leeway");
        match with("exp", json!(now - 42)) {
            Err(error @ AuthError::Expired { seconds_ago: 42 }) => {
                assert_eq!(error.to_string(), "the token expired 42 s ago")
            }
            other => panic!("{other:?}"),
        }
        assert!(with("nbf", json!(now + 29)).is_ok(), "inside the leeway");
        assert!(matches!(
            with("nbf", json!(now + 100)),
            Err(AuthError::NotYetValid { seconds_ahead: 100 })
        ));
        assert!(matches!(
            with("exp", json!("soon")),
            Err(AuthError::Malformed { .. })
        ));
        assert!(matches!(
            with("nbf", json!(null)),
            Err(AuthError::Malformed { .. })
        ));
        assert!(with("exp", json!((now + 10) as f64 + 0.5)).is_ok());
        assert!(matches!(
            with("iss", json!("https://elsewhere")),
            Err(AuthError::WrongIssuer { .. })
        ));
        assert!(with("aud", json!(["x", "other"])).is_ok());
        match with("aud", json!(["x", "y"])) {
            Err(error @ AuthError::WrongAudience { .. }) => assert_eq!(
                error.to_string(),
                "the token's audience is not one of eventhub-gateway, other"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            with("aud", json!(7)),
            Err(AuthError::WrongAudience { .. })
        ));
        assert!(matches!(
            with("sub", json!(7)),
            Err(AuthError::NoIdentityClaim { .. })
        ));
        assert!(matches!(
            with("sub", json!("")),
            Err(AuthError::NoIdentityClaim { .. })
        ));
        let mut no_exp = claims(base.clone());
        no_exp.remove("exp");
        assert!(matches!(
            policy().check(&no_exp, now),
            Err(AuthError::Malformed { .. })
        ));
        let mut no_aud = claims(base);
        no_aud.remove("aud");
        assert!(matches!(
            policy().check(&no_aud, now),
            Err(AuthError::WrongAudience { .. })
        ));
    }
}
