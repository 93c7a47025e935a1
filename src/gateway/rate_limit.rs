//! The events-per-second limits, global and per client: shared state the handlers charge once a request is
//! decoded and its events can be counted (so not a tower layer).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter};

use crate::middleware::ClientId;

/// How often `charge` forgets idle clients.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The smallest `retry_after` of a refusal, so a client is never told to retry at once.
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// Token buckets of events per second, global and per client; each bucket holds one second of its rate.
///
/// Share it in an `Arc`. Per-client state is kept only for clients seen recently: `charge` sweeps out idle
/// clients at most every 10 seconds, so the state holds about the clients of the last 11 seconds and no
/// background task is needed.
#[derive(Debug)]
pub struct RateLimits {
    global: Option<Bucket<DefaultDirectRateLimiter>>,
    per_client: Option<Bucket<DefaultKeyedRateLimiter<ClientId>>>,
    /// The identities' own rates (`auth.grants[].events_per_second`), one keyed bucket per distinct rate.
    per_identity: HashMap<NonZeroU32, Bucket<DefaultKeyedRateLimiter<ClientId>>>,
    refused: AtomicU64,
    created: Instant,
    /// When the next sweep is due, in milliseconds since `created`.
    next_sweep_ms: AtomicU64,
}

#[derive(Debug)]
struct Bucket<L> {
    limiter: L,
    per_second: NonZeroU32,
}

/// A refused charge: who is over which limit, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(.subject, *.retry_after, *.limit_per_second, *.requested))]
pub struct RateLimited {
    /// `global`, `client:<id>` or `identity:<name>`.
    pub subject: String,
    /// How long until the charge could pass (at least 1 ms); zero when it never can (see
    /// [`exceeds_capacity`](Self::exceeds_capacity)).
    pub retry_after: Duration,
    /// The limit that refused, in events per second.
    pub limit_per_second: u32,
    /// The events the refused charge asked for.
    pub requested: u32,
}

impl RateLimited {
    /// Whether the charge was more than one second of the limit, which no wait can make pass: the caller must
    /// send fewer events per request, so this is an invalid request rather than a reason to retry.
    pub fn exceeds_capacity(&self) -> bool {
        self.requested > self.limit_per_second
    }
}

fn describe(subject: &str, retry_after: Duration, limit: u32, requested: u32) -> String {
    if requested > limit {
        format!(
            "{subject} cannot take {requested} events at once: its limit of {limit} events/s allows at most \
             {limit} in one request"
        )
    } else {
        let millis = retry_after.as_micros().div_ceil(1000);
        format!("{subject} is over its limit of {limit} events/s; retry after {millis} ms")
    }
}

impl RateLimits {
    /// Limits of `global_events_per_second` over all clients and `per_client_events_per_second` for each
    /// client (`None`: unlimited), and the `identity_rates` that grants give their identities instead; a burst
    /// may use one second of a rate at once.
    pub fn new(
        global_events_per_second: Option<NonZeroU32>,
        per_client_events_per_second: Option<NonZeroU32>,
        identity_rates: impl IntoIterator<Item = NonZeroU32>,
    ) -> Self {
        Self {
            global: global_events_per_second.map(|per_second| Bucket {
                limiter: RateLimiter::direct(Quota::per_second(per_second)),
                per_second,
            }),
            per_client: per_client_events_per_second.map(|per_second| Bucket {
                limiter: RateLimiter::keyed(Quota::per_second(per_second)),
                per_second,
            }),
            per_identity: identity_rates
                .into_iter()
                .map(|per_second| {
                    let bucket = Bucket {
                        limiter: RateLimiter::keyed(Quota::per_second(per_second)),
                        per_second,
                    };
                    (per_second, bucket)
                })
                .collect(),
            refused: AtomicU64::new(0),
            created: Instant::now(),
            next_sweep_ms: AtomicU64::new(duration_ms(SWEEP_INTERVAL)),
        }
    }

    /// Takes `events` events from the client's bucket (at `own_rate` when its grant sets one, else the
    /// per-client rate), then from the global one, without waiting; refuses (taking nothing from the refusing
    /// bucket) when either is short.
    ///
    /// The client's bucket goes first so a client over its own limit never drains the global one. A charge
    /// the client's bucket took but the global one refused is not given back (governor cannot): that client
    /// pays for an attempt that a global shortage refused, and nobody else does.
    pub fn charge(
        &self,
        client: &ClientId,
        own_rate: Option<NonZeroU32>,
        events: u32,
    ) -> Result<(), RateLimited> {
        let Some(n) = NonZeroU32::new(events) else {
            return Ok(());
        };
        self.sweep_if_due();
        let client_bucket = own_rate
            .and_then(|rate| self.per_identity.get(&rate))
            .or(self.per_client.as_ref());
        // Capacity is checked for both buckets before either is charged, so a charge that can never pass
        // costs nothing.
        if let Some(bucket) = client_bucket {
            if n > bucket.per_second {
                return Err(self.refuse(client.subject(), Duration::ZERO, bucket, n));
            }
        }
        if let Some(bucket) = &self.global {
            if n > bucket.per_second {
                return Err(self.refuse("global".into(), Duration::ZERO, bucket, n));
            }
        }
        if let Some(bucket) = client_bucket {
            let outcome = bucket.limiter.check_key_n(client, n);
            let clock = bucket.limiter.clock();
            if let Some(retry_after) = refusal(outcome, clock) {
                return Err(self.refuse(client.subject(), retry_after, bucket, n));
            }
        }
        if let Some(bucket) = &self.global {
            let outcome = bucket.limiter.check_n(n);
            let clock = bucket.limiter.clock();
            if let Some(retry_after) = refusal(outcome, clock) {
                return Err(self.refuse("global".into(), retry_after, bucket, n));
            }
        }
        Ok(())
    }

    /// Events refused so far (all events of each refused charge).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Clients with per-client state now (recently seen ones, plus idle ones until the next sweep).
    pub fn tracked_clients(&self) -> usize {
        self.keyed_buckets()
            .map(|bucket| bucket.limiter.len())
            .sum()
    }

    fn keyed_buckets(&self) -> impl Iterator<Item = &Bucket<DefaultKeyedRateLimiter<ClientId>>> {
        self.per_client.iter().chain(self.per_identity.values())
    }

    /// Forgets clients whose buckets are full again (indistinguishable from new ones) and frees their memory;
    /// `charge` calls it every 10 seconds, so calling it is only needed to reclaim memory sooner.
    pub fn sweep(&self) {
        for bucket in self.keyed_buckets() {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
    }

    fn sweep_if_due(&self) {
        if self.per_client.is_none() && self.per_identity.is_empty() {
            return;
        }
        let now = duration_ms(self.created.elapsed());
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        // Of the callers that find the sweep due, only the one that moves the deadline sweeps.
        if now >= due
            && self
                .next_sweep_ms
                .compare_exchange(
                    due,
                    now.saturating_add(duration_ms(SWEEP_INTERVAL)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.sweep();
        }
    }

    fn refuse<L>(
        &self,
        subject: String,
        retry_after: Duration,
        bucket: &Bucket<L>,
        events: NonZeroU32,
    ) -> RateLimited {
        self.refused
            .fetch_add(u64::from(events.get()), Ordering::Relaxed);
        RateLimited {
            subject,
            retry_after,
            limit_per_second: bucket.per_second.get(),
            requested: events.get(),
        }
    }
}

/// How long to wait, if governor refused the charge; `None` if it passed.
fn refusal(
    outcome: Result<
        Result<(), NotUntil<<DefaultClock as Clock>::Instant>>,
        governor::InsufficientCapacity,
    >,
    clock: &DefaultClock,
) -> Option<Duration> {
    match outcome {
        Ok(Ok(())) => None,
        Ok(Err(not_until)) => Some(not_until.wait_time_from(clock.now()).max(MIN_RETRY_AFTER)),
        // Capacity was checked before charging; should governor still disagree, the charge is refused all the
        // same, as one that no wait makes pass.
        Err(governor::InsufficientCapacity(_)) => Some(Duration::ZERO),
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(per_second)
    }

    #[test]
    fn per_client_limit_refuses_the_101st_event_of_one_client_only() {
        let limits = RateLimits::new(None, limit(100), []);
        let a = ClientId::new("a");
        let b = ClientId::new("b");
        for i in 0..100 {
            assert_eq!(limits.charge(&a, None, 1), Ok(()), "event {i}");
        }
        let refused = limits.charge(&a, None, 1).unwrap_err();
        assert_eq!(refused.subject, "client:a");
        assert_eq!(refused.limit_per_second, 100);
        assert!(!refused.exceeds_capacity());
        assert_eq!(limits.charge(&b, None, 1), Ok(()));
        assert_eq!(limits.refused(), 1);
    }

    #[test]
    fn global_limit_refuses_across_clients() {
        let limits = RateLimits::new(limit(100), None, []);
        for i in 0..100 {
            let client = ClientId::new(format!("client-{i}"));
            assert_eq!(limits.charge(&client, None, 1), Ok(()), "client {i}");
        }
        let refused = limits.charge(&ClientId::new("late"), None, 1).unwrap_err();
        assert_eq!(refused.subject, "global");
        assert_eq!(refused.limit_per_second, 100);
        assert_eq!(limits.tracked_clients(), 0, "no per-client limit, no state");
    }

    #[test]
    fn a_batch_costs_its_events() {
        let limits = RateLimits::new(limit(500), limit(500), []);
        let client = ClientId::new("batcher");
        for i in 0..5 {
            assert_eq!(limits.charge(&client, None, 100), Ok(()), "batch {i}");
        }
        let refused = limits.charge(&client, None, 100).unwrap_err();
        assert_eq!(refused.subject, "client:batcher");
        assert_eq!(refused.requested, 100);
        assert_eq!(limits.refused(), 100);
    }

    #[test]
    fn refusal_says_when_to_retry() {
        let limits = RateLimits::new(None, limit(100), []);
        let client = ClientId::new("abc");
        assert_eq!(limits.charge(&client, None, 100), Ok(()));
        let refused = limits.charge(&client, None, 10).unwrap_err();
        assert!(refused.retry_after >= MIN_RETRY_AFTER, "{refused:?}");
        // Ten events at 100/s take about 100 ms to come back.
        assert!(
            refused.retry_after <= Duration::from_millis(100),
            "{refused:?}"
        );
        let message = refused.to_string();
        assert!(
            message.starts_with("client:abc is over its limit of 100 events/s; retry after "),
            "{message}"
        );
        assert!(message.ends_with(" ms"), "{message}");
    }

    #[test]
    fn over_capacity_charge_is_refused_and_costs_nothing() {
        let limits = RateLimits::new(limit(1000), limit(100), []);
        let client = ClientId::new("abc");
        let refused = limits.charge(&client, None, 101).unwrap_err();
        assert!(refused.exceeds_capacity());
        assert_eq!(refused.retry_after, Duration::ZERO);
        assert_eq!(
            refused.to_string(),
            "client:abc cannot take 101 events at once: its limit of 100 events/s allows at most 100 in one \
             request"
        );
        assert_eq!(
            limits.charge(&client, None, 100),
            Ok(()),
            "the refused charge took nothing"
        );

        // The global bucket's capacity is checked before the client's bucket is charged.
        let limits = RateLimits::new(limit(50), limit(100), []);
        let refused = limits.charge(&client, None, 80).unwrap_err();
        assert_eq!(refused.subject, "global");
        assert!(refused.exceeds_capacity());
        assert_eq!(limits.charge(&client, None, 50), Ok(()));
        // Had the refused 80 been taken from the client's 100, the client's bucket would refuse this one.
        let refused = limits.charge(&client, None, 50).unwrap_err();
        assert_eq!(refused.subject, "global");
    }

    #[test]
    fn unlimited_always_passes() {
        let limits = RateLimits::new(None, None, []);
        let client = ClientId::new("anyone");
        for _ in 0..1000 {
            assert_eq!(limits.charge(&client, None, u32::MAX), Ok(()));
        }
        assert_eq!(limits.refused(), 0);
        assert_eq!(limits.tracked_clients(), 0);
    }

    #[test]
    fn zero_events_always_pass() {
        let limits = RateLimits::new(limit(1), limit(1), []);
        let client = ClientId::new("idle");
        assert_eq!(limits.charge(&client, None, 1), Ok(()));
        assert_eq!(limits.charge(&client, None, 0), Ok(()));
    }

    #[test]
    fn sweep_forgets_idle_clients() {
        let limits = RateLimits::new(None, limit(1000), []);
        for i in 0..10 {
            assert_eq!(
                limits.charge(&ClientId::new(format!("c{i}")), None, 1),
                Ok(())
            );
        }
        assert_eq!(limits.tracked_clients(), 10);
        // One event at 1000/s is back in the bucket after 1 ms.
        std::thread::sleep(Duration::from_millis(20));
        limits.sweep();
        assert_eq!(limits.tracked_clients(), 0);
    }

    #[test]
    fn an_identity_has_its_grant_rate_and_its_own_bucket() {
        let limits = RateLimits::new(None, limit(100), [NonZeroU32::new(10).unwrap()]);
        let billing = ClientId::authenticated("billing");
        let own = NonZeroU32::new(10);
        for i in 0..10 {
            assert_eq!(limits.charge(&billing, own, 1), Ok(()), "event {i}");
        }
        let refused = limits.charge(&billing, own, 1).unwrap_err();
        assert_eq!(refused.subject, "identity:billing");
        assert_eq!(refused.limit_per_second, 10);
        // A caller that only names itself `billing` has the per-client rate and a bucket of its own.
        let impostor = ClientId::new("billing");
        assert_eq!(limits.charge(&impostor, None, 100), Ok(()));
        assert_eq!(limits.tracked_clients(), 2);
    }
}
