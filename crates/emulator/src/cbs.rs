//! Claims-based security: `put-token` requests on `$cbs`, verified for real, and each connection's grants.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;
use serde_amqp::Value;

use super::namespace::Namespace;
use super::node::{AnyMessage, Status, string_property};
use eventhub_wire::address::{audience_path, path_covers};
use eventhub_wire::sas::SasToken;
use eventhub_wire::{JWT_TOKEN_TYPE, SAS_TOKEN_TYPE};

/// The audience claim of Entra ID tokens for Event Hubs.
const EVENT_HUBS_JWT_AUDIENCES: [&str; 2] = [
    "https://eventhubs.azure.net",
    "https://servicebus.azure.net",
];

/// What a `put-token` request carries (from its application properties and body).
#[derive(Debug, Clone, Default)]
pub struct PutToken {
    /// `operation`: must be `put-token`.
    pub operation: Option<String>,
    /// `type`: a SAS or `jwt` token.
    pub token_type: Option<String>,
    /// `name`: the audience, e.g. `sb://ns/eh1`.
    pub audience: Option<String>,
    /// The body: the token itself.
    pub token: Option<String>,
}

/// The tokens a connection has put: which entity paths it may use, until when.
#[derive(Debug, Default)]
pub struct Grants {
    grants: Mutex<Vec<Grant>>,
}

#[derive(Debug, Clone)]
struct Grant {
    path: String,
    expires_at_ms: i64,
    /// Grants from before the last `Faults::expire_tokens` are void.
    generation: u64,
}

impl Grants {
    /// When the latest valid grant covering `path` expires (Unix ms), or `None` if none covers it now.
    pub fn expiry_covering(&self, path: &str, now_ms: i64, generation: u64) -> Option<i64> {
        self.grants
            .lock()
            .iter()
            .filter(|g| {
                g.generation == generation && g.expires_at_ms > now_ms && path_covers(&g.path, path)
            })
            .map(|g| g.expires_at_ms)
            .max()
    }

    fn add(&self, path: String, expires_at_ms: i64, generation: u64) {
        let mut grants = self.grants.lock();
        grants.retain(|g| g.generation == generation && g.path != path);
        grants.push(Grant {
            path,
            expires_at_ms,
            generation,
        });
    }
}

/// Verifies a put-token request and, when it is good, records the grant. Never echoes the token.
pub fn put_token(
    namespace: &Namespace,
    grants: &Grants,
    request: &PutToken,
    now_ms: i64,
    generation: u64,
) -> Status {
    match verify_put_token(namespace, request, now_ms) {
        Ok((path, expires_at_ms)) => {
            grants.add(path, expires_at_ms, generation);
            Status::new(202, "Accepted")
        }
        Err(status) => status,
    }
}

fn verify_put_token(
    namespace: &Namespace,
    request: &PutToken,
    now_ms: i64,
) -> Result<(String, i64), Status> {
    if request.operation.as_deref() != Some("put-token") {
        return Err(Status::new(
            400,
            "the only operation $cbs supports is put-token",
        ));
    }
    let audience = request
        .audience
        .as_deref()
        .ok_or_else(|| Status::new(400, "no `name` (audience) property"))?;
    let token = request
        .token
        .as_deref()
        .ok_or_else(|| Status::new(400, "the body holds no token string"))?;
    let path = audience_path(audience);
    check_entity_exists(namespace, &path)?;
    let expires_at_ms = match request.token_type.as_deref() {
        Some(SAS_TOKEN_TYPE) => verify_sas(namespace, token, &path, now_ms)?,
        Some(JWT_TOKEN_TYPE) if namespace.accept_jwt => verify_jwt(token, now_ms)?,
        Some(JWT_TOKEN_TYPE) => {
            return Err(Status::new(
                401,
                "jwt tokens are refused: start the emulator with --accept-jwt",
            ));
        }
        Some(other) => return Err(Status::new(400, format!("unknown token type {other:?}"))),
        None => return Err(Status::new(400, "no `type` property")),
    };
    Ok((path, expires_at_ms))
}

/// Checks a token string used directly (as `$management` requests carry it) for `path`.
pub fn verify_token_for(
    namespace: &Namespace,
    token: &str,
    path: &str,
    now_ms: i64,
) -> Result<(), Status> {
    if token.starts_with("SharedAccessSignature ") {
        verify_sas(namespace, token, path, now_ms).map(drop)
    } else if namespace.accept_jwt {
        verify_jwt(token, now_ms).map(drop)
    } else {
        Err(Status::new(
            401,
            "the security token is not a shared access signature",
        ))
    }
}

/// The audience path must name the namespace, a hub, or a hub's consumer group.
fn check_entity_exists(namespace: &Namespace, path: &str) -> Result<(), Status> {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let Some(hub_name) = segments.next() else {
        return Ok(());
    };
    let not_found = || {
        Status::new(
            404,
            format!("the messaging entity '{path}' could not be found"),
        )
    };
    let hub = namespace.hub(hub_name).ok_or_else(not_found)?;
    let rest: Vec<&str> = segments.collect();
    let partition_exists = |id: &str| hub.partition_index(id).is_some();
    let exists = match rest.as_slice() {
        // The JS and .NET SDKs authorize their management link with `sb://ns/<hub>/$management`.
        [] | ["$management"] => true,
        ["partitions", id] => partition_exists(id),
        ["consumergroups", group] => hub.has_consumer_group(group),
        ["consumergroups", group, "partitions", id] => {
            hub.has_consumer_group(group) && partition_exists(id)
        }
        _ => false,
    };
    if exists { Ok(()) } else { Err(not_found()) }
}

fn verify_sas(namespace: &Namespace, token: &str, path: &str, now_ms: i64) -> Result<i64, Status> {
    let unauthorized = |reason: String| Status::new(401, format!("unauthorized: {reason}"));
    let parsed = SasToken::parse(token).map_err(|e| unauthorized(e.to_string()))?;
    parsed
        .verify(|name| namespace.key(name), (now_ms / 1000) as u64)
        .map_err(|e| unauthorized(e.to_string()))?;
    let resource = audience_path(&parsed.resource);
    if !path_covers(&resource, path) {
        return Err(unauthorized(format!(
            "the token is for '{resource}', not for '{path}'"
        )));
    }
    Ok(unix_ms(
        i64::try_from(parsed.expires_at).unwrap_or(i64::MAX),
    ))
}

/// A token's expiry in Unix seconds as milliseconds; tokens good past the range are good until its end.
fn unix_ms(seconds: i64) -> i64 {
    seconds.saturating_mul(1000)
}

/// Checks an Entra ID token's form, audience and expiry. Its signature cannot be verified offline.
fn verify_jwt(token: &str, now_ms: i64) -> Result<i64, Status> {
    let unauthorized = |reason: &str| Status::new(401, format!("unauthorized: {reason}"));
    let token = token.strip_prefix("Bearer ").unwrap_or(token);
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized(
            "the jwt does not have three dot-separated parts",
        ));
    };
    let claims: serde_json::Value = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| unauthorized("the jwt payload is not base64url-encoded JSON"))?;
    let audiences: Vec<&str> = match &claims["aud"] {
        serde_json::Value::String(aud) => vec![aud.as_str()],
        serde_json::Value::Array(auds) => auds.iter().filter_map(|a| a.as_str()).collect(),
        _ => vec![],
    };
    let for_event_hubs = audiences
        .iter()
        .any(|aud| EVENT_HUBS_JWT_AUDIENCES.contains(&aud.trim_end_matches('/')));
    if !for_event_hubs {
        return Err(unauthorized(
            "the jwt audience is not https://eventhubs.azure.net",
        ));
    }
    let expires_at_ms = unix_ms(
        claims["exp"]
            .as_i64()
            .ok_or_else(|| unauthorized("the jwt has no numeric `exp`"))?,
    );
    if expires_at_ms <= now_ms {
        return Err(unauthorized("the jwt has expired"));
    }
    Ok(expires_at_ms)
}

impl PutToken {
    /// Reads a put-token request from an AMQP message's application properties and body.
    pub fn from_message(message: &AnyMessage) -> Self {
        use fe2o3_amqp_types::messaging::Body;
        let token = match &message.body {
            Body::Value(value) => match &value.0 {
                Value::String(token) => Some(token.clone()),
                Value::Binary(bytes) => String::from_utf8(bytes.to_vec()).ok(),
                _ => None,
            },
            Body::Data(batch) => batch
                .iter()
                .next()
                .and_then(|data| String::from_utf8(data.0.to_vec()).ok()),
            _ => None,
        };
        Self {
            operation: string_property(message, "operation"),
            token_type: string_property(message, "type"),
            audience: string_property(message, "name"),
            token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EmulatorConfig;
    use eventhub_wire::sas::sign_token;

    const NOW_MS: i64 = 1_800_000_000_000;

    fn namespace(accept_jwt: bool) -> Namespace {
        Namespace::new(
            &EmulatorConfig {
                accept_jwt,
                ..EmulatorConfig::default()
            },
            0,
        )
    }

    fn sas_request(audience: &str, token: String) -> PutToken {
        PutToken {
            operation: Some("put-token".into()),
            token_type: Some(SAS_TOKEN_TYPE.into()),
            audience: Some(audience.into()),
            token: Some(token),
        }
    }

    fn valid_sas(resource: &str, expires_at_secs: u64) -> String {
        sign_token(
            resource,
            "RootManageSharedAccessKey",
            "SAS_KEY_VALUE",
            expires_at_secs,
        )
    }

    fn jwt(claims: serde_json::Value) -> String {
        let encode = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2lnbmF0dXJl",
            encode(&serde_json::json!({"alg": "RS256"})),
            encode(&claims)
        )
    }

    #[test]
    fn a_valid_sas_token_grants_its_entity_until_it_expires() {
        let (ns, grants) = (namespace(false), Grants::default());
        let expiry_secs = (NOW_MS / 1000 + 60) as u64;
        let request = sas_request(
            "sb://localhost/eh1",
            valid_sas("sb://localhost/eh1", expiry_secs),
        );
        assert_eq!(put_token(&ns, &grants, &request, NOW_MS, 0).code, 202);
        assert_eq!(
            grants.expiry_covering("eh1", NOW_MS, 0),
            Some(expiry_secs as i64 * 1000)
        );
        assert_eq!(
            grants.expiry_covering("eh1/consumergroups/$default", NOW_MS, 0),
            Some(expiry_secs as i64 * 1000)
        );
        assert_eq!(
            grants.expiry_covering("eh1", expiry_secs as i64 * 1000, 0),
            None,
            "expired"
        );
        assert_eq!(
            grants.expiry_covering("eh1", NOW_MS, 1),
            None,
            "voided by expire_tokens"
        );
    }

    #[test]
    fn link_level_audiences_as_the_js_sdk_puts_them_are_granted() {
        let (ns, grants) = (namespace(false), Grants::default());
        for audience in [
            "sb://localhost/eh1/$management",
            "sb://localhost/eh1/Partitions/1",
            "sb://localhost/eh1/ConsumerGroups/$Default/Partitions/0",
        ] {
            let request = sas_request(audience, valid_sas("sb://localhost/eh1", 2_000_000_000));
            assert_eq!(
                put_token(&ns, &grants, &request, NOW_MS, 0).code,
                202,
                "{audience}"
            );
        }
        assert!(
            grants
                .expiry_covering("eh1/partitions/1", NOW_MS, 0)
                .is_some()
        );
        assert!(
            grants
                .expiry_covering("eh1/partitions/0", NOW_MS, 0)
                .is_none(),
            "only the partition named"
        );
        let unknown = sas_request(
            "sb://localhost/eh1/Partitions/9",
            valid_sas("sb://localhost/eh1", 2_000_000_000),
        );
        assert_eq!(put_token(&ns, &grants, &unknown, NOW_MS, 0).code, 404);
    }

    #[test]
    fn a_namespace_token_covers_every_hub() {
        let (ns, grants) = (namespace(false), Grants::default());
        let request = sas_request(
            "sb://localhost/eh1",
            valid_sas("sb://localhost/", 2_000_000_000),
        );
        assert_eq!(put_token(&ns, &grants, &request, NOW_MS, 0).code, 202);
    }

    #[test]
    fn wrong_key_expired_and_foreign_audience_are_401() {
        let ns = namespace(false);
        let cases = [
            sign_token(
                "sb://localhost/eh1",
                "RootManageSharedAccessKey",
                "wrong",
                2_000_000_000,
            ),
            valid_sas("sb://localhost/eh1", (NOW_MS / 1000 - 1) as u64),
            valid_sas("sb://localhost/other", 2_000_000_000),
        ];
        for token in cases {
            let grants = Grants::default();
            let status = put_token(
                &ns,
                &grants,
                &sas_request("sb://localhost/eh1", token),
                NOW_MS,
                0,
            );
            assert_eq!(status.code, 401, "{status:?}");
            assert!(
                !status.description.contains("sig="),
                "never echoes the token"
            );
            assert_eq!(grants.expiry_covering("eh1", NOW_MS, 0), None);
        }
    }

    #[test]
    fn unknown_entities_are_404_and_malformed_requests_400() {
        let ns = namespace(false);
        let grants = Grants::default();
        let token = valid_sas("sb://localhost/", 2_000_000_000);
        assert_eq!(
            put_token(
                &ns,
                &grants,
                &sas_request("sb://localhost/nope", token.clone()),
                NOW_MS,
                0
            )
            .code,
            404
        );
        let unknown_group = sas_request("sb://localhost/eh1/consumergroups/nope", token.clone());
        assert_eq!(put_token(&ns, &grants, &unknown_group, NOW_MS, 0).code, 404);
        let mut no_body = sas_request("sb://localhost/eh1", token);
        no_body.token = None;
        assert_eq!(put_token(&ns, &grants, &no_body, NOW_MS, 0).code, 400);
    }

    #[test]
    fn jwt_tokens_need_the_flag_and_the_right_audience() {
        let good = jwt(
            serde_json::json!({"aud": "https://eventhubs.azure.net/", "exp": NOW_MS / 1000 + 60}),
        );
        let request = PutToken {
            token_type: Some(JWT_TOKEN_TYPE.into()),
            ..sas_request("sb://localhost/eh1", good)
        };
        assert_eq!(
            put_token(&namespace(false), &Grants::default(), &request, NOW_MS, 0).code,
            401
        );
        assert_eq!(
            put_token(&namespace(true), &Grants::default(), &request, NOW_MS, 0).code,
            202
        );

        for claims in [
            serde_json::json!({"aud": "https://storage.azure.com", "exp": NOW_MS / 1000 + 60}),
            serde_json::json!({"aud": "https://eventhubs.azure.net", "exp": NOW_MS / 1000 - 1}),
            serde_json::json!({"aud": "https://eventhubs.azure.net"}),
        ] {
            let request = PutToken {
                token: Some(jwt(claims)),
                ..request.clone()
            };
            assert_eq!(
                put_token(&namespace(true), &Grants::default(), &request, NOW_MS, 0).code,
                401
            );
        }
        let request = PutToken {
            token: Some("not-a-jwt".into()),
            ..request
        };
        assert_eq!(
            put_token(&namespace(true), &Grants::default(), &request, NOW_MS, 0).code,
            401
        );
    }

    #[test]
    fn expiries_past_the_millisecond_range_are_granted_until_the_end_of_time() {
        // Found by the fuzz target emulator_cbs: `exp * 1000` overflowed (a panic in debug builds).
        let claims =
            serde_json::json!({"aud": "https://eventhubs.azure.net", "exp": i64::MAX / 1000 + 1});
        let request = PutToken {
            token_type: Some(JWT_TOKEN_TYPE.into()),
            ..sas_request("sb://localhost/eh1", jwt(claims))
        };
        let grants = Grants::default();
        assert_eq!(
            put_token(&namespace(true), &grants, &request, NOW_MS, 0).code,
            202
        );
        assert_eq!(grants.expiry_covering("eh1", NOW_MS, 0), Some(i64::MAX));
        let claims =
            serde_json::json!({"aud": "https://eventhubs.azure.net", "exp": i64::MIN / 1000 - 1});
        let request = PutToken {
            token_type: Some(JWT_TOKEN_TYPE.into()),
            ..sas_request("sb://localhost/eh1", jwt(claims))
        };
        assert_eq!(
            put_token(&namespace(true), &Grants::default(), &request, NOW_MS, 0).code,
            401,
            "expired long ago"
        );
        for expiry in [i64::MAX as u64 / 1000 + 1, i64::MAX as u64 + 1, u64::MAX] {
            let request = sas_request(
                "sb://localhost/eh1",
                valid_sas("sb://localhost/eh1", expiry),
            );
            let grants = Grants::default();
            assert_eq!(
                put_token(&namespace(false), &grants, &request, NOW_MS, 0).code,
                202
            );
            assert_eq!(grants.expiry_covering("eh1", NOW_MS, 0), Some(i64::MAX));
        }
    }
}
