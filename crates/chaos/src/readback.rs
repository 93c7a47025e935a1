//! Reading every stored event back from the emulator, straight over AMQP (no proxy, no fault), by the id its
//! body starts with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use eventhub_producer::{NodeClient, Producer, ProducerConfig, TlsOptions};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Receiver, Session};
use fe2o3_amqp_types::definitions::Fields;
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, Message, MessageId, Source};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

use crate::cluster::{EmulatorProcess, HUB, KEY, KEY_NAME, PARTITIONS};
use crate::load::id_of_body;

/// The longest wait for one stored event while reading a partition back.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the emulator stored, by event id.
#[derive(Debug, Default)]
pub struct Stored {
    /// How many times each id was stored.
    pub copies: HashMap<String, u32>,
    /// Stored events whose message-id is not their id (a resend that lost or changed it).
    pub message_id_mismatches: u64,
}

impl Stored {
    /// Events stored more than once, counting each extra copy.
    pub fn duplicates(&self) -> u64 {
        self.copies
            .values()
            .map(|&n| u64::from(n.saturating_sub(1)))
            .sum()
    }
}

/// Reads every partition of [`HUB`] from its start to its last enqueued event.
pub async fn read_all(emulator: SocketAddr) -> Result<Stored> {
    let last = last_sequences(emulator).await?;
    let mut connection = Connection::builder()
        .container_id("chaos-readback")
        .sasl_profile(SaslProfile::Plain {
            username: KEY_NAME.to_owned(),
            password: KEY.to_owned(),
        })
        .open(format!("amqp://{emulator}").as_str())
        .await
        .context("the read-back connection opens")?;
    let mut session = Session::begin(&mut connection)
        .await
        .context("a read-back session")?;
    authorize(&mut session, emulator).await?;
    let mut stored = Stored::default();
    for (partition, last) in last.into_iter().enumerate() {
        if let Some(last) = last {
            read_partition(&mut session, partition, last, &mut stored).await?;
        }
    }
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(stored)
}

/// Puts a SAS token for the whole hub on `$cbs`, as a consumer must before its receivers attach.
async fn authorize(session: &mut SessionHandle<()>, emulator: SocketAddr) -> Result<()> {
    let audience = format!("sb://{}/{HUB}", emulator.ip());
    let expires_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 3600;
    let token = eventhub_wire::sas::sign_token(&audience, KEY_NAME, KEY, expires_at);
    let mut cbs = NodeClient::attach(session, "$cbs")
        .await
        .context("the $cbs links")?;
    let properties = ApplicationProperties::builder()
        .insert("operation", "put-token")
        .insert("type", "servicebus.windows.net:sastoken")
        .insert("name", audience.as_str())
        .build();
    let response = cbs
        .request(properties, Value::String(token), READ_TIMEOUT)
        .await
        .context("put-token")?;
    if !(200..300).contains(&response.code) {
        bail!(
            "put-token for {audience}: {} {}",
            response.code,
            response.description
        );
    }
    Ok(())
}

/// Each partition's last enqueued sequence number, `None` when it is empty.
async fn last_sequences(emulator: SocketAddr) -> Result<Vec<Option<i64>>> {
    let producer = Producer::from_connection_string(
        &EmulatorProcess::connection_string_via(emulator),
        false,
        TlsOptions::default(),
        ProducerConfig {
            min_size: 0,
            ..ProducerConfig::default()
        },
    )
    .context("a management client")?;
    let mut last = Vec::new();
    for partition in 0..PARTITIONS {
        let properties = producer
            .partition_properties(HUB, &partition.to_string())
            .await
            .with_context(|| format!("partition {partition}'s properties"))?;
        last.push((!properties.is_empty).then_some(properties.last_enqueued_sequence_number));
    }
    producer.close().await;
    Ok(last)
}

async fn read_partition(
    session: &mut SessionHandle<()>,
    partition: usize,
    last: i64,
    stored: &mut Stored,
) -> Result<()> {
    let selector = Described {
        descriptor: Descriptor::Name(Symbol::from("apache.org:selector-filter:string")),
        value: Value::String("amqp.annotation.x-opt-offset > '-1'".into()),
    };
    let source = Source::builder()
        .address(format!(
            "{HUB}/ConsumerGroups/$Default/Partitions/{partition}"
        ))
        .add_to_filter("apache.org:selector-filter:string", Some(selector))
        .build();
    let mut receiver = Receiver::builder()
        .name(format!("chaos-readback-{partition}"))
        .source(source)
        .target("chaos-readback")
        .properties(Fields::new())
        .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Auto(1000))
        .attach(session)
        .await
        .with_context(|| format!("a receiver on partition {partition}"))?;
    loop {
        let delivery = tokio::time::timeout(READ_TIMEOUT, receiver.recv::<Body<Value>>())
            .await
            .with_context(|| {
                format!("partition {partition}: nothing arrived within {READ_TIMEOUT:?}")
            })?
            .with_context(|| format!("partition {partition}: receive"))?;
        receiver.accept(&delivery).await.context("accept")?;
        let message = delivery.message();
        record(message, stored);
        let sequence = eventhub_wire::message::annotation(message, "x-opt-sequence-number")
            .and_then(|value| match value {
                Value::Long(n) => Some(*n),
                _ => None,
            })
            .with_context(|| {
                format!("partition {partition}: an event without x-opt-sequence-number")
            })?;
        if sequence >= last {
            break;
        }
    }
    let _ = receiver.close().await;
    Ok(())
}

fn record(message: &Message<Body<Value>>, stored: &mut Stored) {
    let body = match &message.body {
        Body::Data(sections) => sections
            .iter()
            .map(|data| String::from_utf8_lossy(data.0.as_ref()).into_owned())
            .collect::<String>(),
        Body::Value(value) => format!("{:?}", value.0),
        _ => String::new(),
    };
    let id = id_of_body(&body).to_owned();
    let message_id = message
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref());
    if !matches!(message_id, Some(MessageId::String(m)) if *m == id) {
        stored.message_id_mismatches += 1;
    }
    *stored.copies.entry(id).or_default() += 1;
}
