//! The producer's credentials against the emulator: a wrong key fails at once, short-lived SAS and Entra ID
//! tokens are refreshed without a failed send, a fixed signature works until it expires, and neither tokens
//! nor payloads reach the logs.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// A fake Entra ID credential: JWT-shaped tokens for Event Hubs, valid `lifetime`, counted. Never reaches a network.
#[derive(Debug)]
struct FakeEntraCredential {
    lifetime: i64,
    issued: AtomicU32,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for FakeEntraCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use base64::Engine;
        assert_eq!(scopes, ["https://eventhubs.azure.net/.default"]);
        self.issued.fetch_add(1, Ordering::SeqCst);
        let expires = azure_core::time::OffsetDateTime::now_utc().unix_timestamp() + self.lifetime;
        let encode = |value: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
        };
        let token = format!(
            "{}.{}.c2lnbmF0dXJl",
            encode(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            encode(serde_json::json!({"aud": "https://eventhubs.azure.net", "exp": expires}))
        );
        Ok(azure_core::credentials::AccessToken::new(
            token,
            azure_core::time::OffsetDateTime::from_unix_timestamp(expires).unwrap(),
        ))
    }
}

/// An emulator accepting JWTs and a producer authenticated by a fake Entra credential whose tokens live
/// `lifetime` seconds.
async fn entra_fixture(lifetime: i64) -> (Fixture, Arc<FakeEntraCredential>) {
    let credential = Arc::new(FakeEntraCredential {
        lifetime,
        issued: AtomicU32::default(),
    });
    let fx = Fixture::builder(&["eh1:1"])
        .emulator(|config| config.accept_jwt = true)
        .connect(Connect::Credential(
            Transport::Amqp,
            Credential::Entra(credential.clone()),
        ))
        .start()
        .await;
    (fx, credential)
}

#[tokio::test]
async fn a_wrong_key_is_not_retried() {
    let fx = Fixture::builder(&["eh1:1"])
        .connect(Connect::WrongKey("wrong"))
        .start()
        .await;
    let started = Instant::now();
    let error = fx
        .producer()
        .send("eh1", Event::text("x"))
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Auth(_)), "{error}");
    assert!(
        !format!("{error}").contains("wrong"),
        "the key is never echoed: {error}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fx.faults().transfers_seen(), 0);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_without_failed_sends() {
    // Two-second tokens, refreshed at 90%: a 5 s run needs at least two refreshes per connection.
    let fx = Fixture::builder(&["eh1:1"])
        .producer(|config| config.sas_token_lifetime = Duration::from_secs(2))
        .start()
        .await;
    let producer = fx.producer();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        producer
            .send("eh1", Event::text(format!("{sent}")))
            .await
            .expect("no send fails");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        producer.stats().token_refreshes >= 3,
        "{:?}",
        producer.stats()
    );
    assert_eq!(fx.stored_count("eh1", "0"), sent);
}

#[tokio::test]
async fn entra_id_tokens_authorize_and_are_refreshed() {
    let (fx, credential) = entra_fixture(3).await;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        fx.producer()
            .send("eh1", Event::text("jwt"))
            .await
            .expect("no send fails across refreshes");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(credential.issued.load(Ordering::SeqCst) >= 2);
    assert_eq!(fx.stored_count("eh1", "0"), sent);
}

#[tokio::test]
async fn a_shared_access_signature_connection_string_works_until_it_expires() {
    let fx = Fixture::builder(&["eh1:1"])
        .connect(Connect::Signature("eh1", Duration::from_secs(600)))
        .start()
        .await;
    fx.producer()
        .send("eh1", Event::text("signed"))
        .await
        .expect("accepted");
    let expired = fx.connect(Connect::Signature("eh1", Duration::ZERO));
    let error = expired.send("eh1", Event::text("late")).await.unwrap_err();
    assert!(error.to_string().contains("expired"), "{error}");
}

#[tokio::test]
async fn entra_tokens_and_payloads_never_reach_the_logs_even_at_trace_level() {
    let (logs, _capture) = capture_logs(tracing::Level::TRACE);
    let (fx, _credential) = entra_fixture(3600).await;
    fx.producer()
        .send("eh1", Event::text("PAYLOAD-MARKER-entra"))
        .await
        .unwrap();
    fx.faults().throttle_next_sends(1);
    fx.producer()
        .send("eh1", Event::binary(b"PAYLOAD-MARKER-retried".to_vec()))
        .await
        .unwrap();
    // Closing and shutting down log too: captured before the check.
    fx.shutdown(TIMEOUT).await;
    let text = logs.text();
    assert!(
        text.contains("retrying a batch"),
        "the capture works: {text}"
    );
    for secret in [
        "c2lnbmF0dXJl",
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9",
        "PAYLOAD-MARKER",
    ] {
        assert!(!text.contains(secret), "{secret} in the logs:\n{text}");
    }
}

#[tokio::test]
async fn a_token_the_service_stops_honouring_is_put_again_and_no_send_fails_for_it() {
    // The service detaches every link of a token it no longer honours (expired by its clock, or revoked) while
    // the producer's own clock says the token is good for an hour: the producer puts a token again and
    // resends, instead of failing every send until its next scheduled refresh.
    let fx = Fixture::start(&["eh1:2"]).await;
    let producer = fx.producer();
    for round in 0..3 {
        producer
            .send("eh1", Event::text(format!("before-{round}")))
            .await
            .expect("sends before the expiry");
        fx.faults().expire_tokens();
        for n in 0..5 {
            producer
                .send("eh1", Event::text(format!("after-{round}-{n}")))
                .await
                .expect("a send after the service dropped the token");
        }
    }
    assert_eq!(fx.stored("eh1").len(), 18);
}
