//! A request on the emulator's `$cbs` node (put-token: SAS or JWT) or `$management` node (its
//! `security_token` checked): the message decoded as fe2o3 decodes a delivery, read
//! (`cbs::PutToken::from_message`, `management::handle`), the token verified, and the response encoded
//! (`eventhub_emulator::fuzzing::{cbs_request, management_request}`).
//!
//! Input: one selector byte, then the AMQP message. Selector bit 0: `$management` instead of `$cbs`. Bit 1:
//! the request's SAS token is re-signed with the namespace's key (same resource, key name and expiry), so
//! the checks after the signature are reached. Bit 2: the token string is taken as a JWT payload and wrapped
//! as `header.<base64url(payload)>.signature`, so the fuzzer mutates the claims' JSON directly.

#![no_main]

#[path = "common/upstream.rs"]
mod upstream;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use eventhub_emulator::fuzzing::{cbs_request, management_request, namespace_key};
use eventhub_wire::message::{AmqpMessage, decode};
use eventhub_wire::sas::{SasToken, sign_token};
use fe2o3_amqp_types::messaging::{AmqpValue, Body};
use fe2o3_amqp_types::primitives::SimpleValue;
use libfuzzer_sys::fuzz_target;
use serde_amqp::Value;

/// The emulator's clock during the checks: 2027-01-15.
const NOW_MS: i64 = 1_800_000_000_000;

/// The token a request carries: its body on `$cbs`, its `security_token` property on `$management`.
fn token(message: &AmqpMessage, management: bool) -> Option<String> {
    if management {
        match message
            .application_properties
            .as_ref()?
            .0
            .get("security_token")?
        {
            SimpleValue::String(token) => Some(token.clone()),
            _ => None,
        }
    } else {
        match &message.body {
            Body::Value(AmqpValue(Value::String(token))) => Some(token.clone()),
            _ => None,
        }
    }
}

fn set_token(message: &mut AmqpMessage, management: bool, token: String) {
    if management {
        if let Some(properties) = message.application_properties.as_mut() {
            properties
                .0
                .insert("security_token".into(), SimpleValue::String(token));
        }
    } else {
        message.body = Body::Value(AmqpValue(Value::String(token)));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let Some(mut message) = upstream::tolerating_serde_amqp(|| decode(payload).ok()) else {
        return;
    };
    let management = selector & 1 != 0;
    if let Some(original) = token(&message, management) {
        if selector & 2 != 0 {
            if let Ok(parsed) = SasToken::parse(&original) {
                let (key_name, key) = namespace_key();
                let resigned = sign_token(&parsed.resource, &key_name, &key, parsed.expires_at);
                set_token(&mut message, management, resigned);
            }
        } else if selector & 4 != 0 {
            let wrapped = format!(
                "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
                URL_SAFE_NO_PAD.encode(original.as_bytes())
            );
            set_token(&mut message, management, wrapped);
        }
    }
    let answered = if management {
        management_request(&message, NOW_MS)
    } else {
        cbs_request(&message, NOW_MS)
    };
    let code = answered.expect("every request gets an encodable answer");
    assert!(
        matches!(code, 200 | 202 | 400 | 401 | 404),
        "status {code} is not one the service answers"
    );
});
