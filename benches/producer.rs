//! Micro-benchmark (not a test): events/s and MB/s through the producer core straight into the in-process
//! emulator, for 100 B and 1 KiB events, keyless, one key, and many keys. Run: `cargo bench --bench producer`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventhub_gateway::emulator::{Emulator, EmulatorConfig, HubConfig};
use eventhub_gateway::producer::{Event, Producer, ProducerConfig};

/// Concurrent senders (each awaits its event's outcome before sending the next); `BENCH_SENDERS` overrides.
const DEFAULT_SENDERS: usize = 4096;
const RUN_FOR: Duration = Duration::from_secs(4);

#[derive(Clone, Copy)]
enum Keys {
    None,
    One,
    Many(usize),
}

async fn scenario(senders: usize, size: usize, keys: Keys, local_partitioning: bool) -> (f64, f64) {
    let emulator = Emulator::start(EmulatorConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        event_hubs: vec!["bench:8".parse::<HubConfig>().expect("hub spec")],
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts");
    let producer = Producer::from_connection_string(
        &emulator.connection_string(),
        false,
        Default::default(),
        ProducerConfig {
            local_partitioning,
            ..ProducerConfig::default()
        },
    )
    .expect("producer");
    let producer = Arc::new(producer);
    let body = Arc::new(vec![b'x'; size]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|sender| {
            let producer = Arc::clone(&producer);
            let body = Arc::clone(&body);
            tokio::spawn(async move {
                let mut sent = 0u64;
                let mut i = sender;
                while started.elapsed() < RUN_FOR {
                    let mut event = Event::binary(body.to_vec());
                    match keys {
                        Keys::None => {}
                        Keys::One => event = event.with_partition_key("the-key"),
                        Keys::Many(n) => event = event.with_partition_key(format!("key-{}", i % n)),
                    }
                    producer.send("bench", event).await.expect("accepted");
                    sent += 1;
                    i += senders;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("sender task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    producer.close().await;
    emulator.shutdown(Duration::from_secs(5)).await;
    let events_per_second = total as f64 / elapsed;
    (events_per_second, events_per_second * size as f64 / 1e6)
}

#[tokio::main]
async fn main() {
    let senders = std::env::var("BENCH_SENDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_SENDERS);
    // BENCH_ONLY=text runs only the scenarios whose name contains it (to profile one).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    println!("{senders} concurrent senders, {RUN_FOR:?} per scenario, emulator in process");
    println!("{:<34} {:>12} {:>10}", "scenario", "events/s", "MB/s");
    for size in [100, 1024] {
        for (name, keys, local) in [
            ("keyless", Keys::None, false),
            ("one key", Keys::One, false),
            ("1000 keys (service routing)", Keys::Many(1000), false),
            ("1000 keys (local partitioning)", Keys::Many(1000), true),
        ] {
            let label = format!("{size} B, {name}");
            if !label.contains(&only) {
                continue;
            }
            let (events, megabytes) = scenario(senders, size, keys, local).await;
            println!("{label:<34} {events:>12.0} {megabytes:>10.1}");
        }
    }
}
