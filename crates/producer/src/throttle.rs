//! The optional rate limit toward Event Hubs (events/s and bytes/s, shared by every route): the outermost
//! layer of the send stack, so a batch pays once however often it is retried.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tower::{Layer, Service, ServiceExt};

use super::error::SendError;
use super::route::BatchRequest;

/// Token buckets for events and bytes per second; a bucket holds one second of its rate.
pub struct Throttle {
    events: Option<Bucket>,
    bytes: Option<Bucket>,
    waits: AtomicU64,
}

struct Bucket {
    limiter: DefaultDirectRateLimiter,
    capacity: NonZeroU32,
}

impl Bucket {
    fn per_second(rate: NonZeroU32) -> Self {
        Self {
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            capacity: rate,
        }
    }

    /// Takes `amount` cells, waiting for them; an amount above one second's worth costs one full second, so a
    /// batch larger than the rate still goes out (at the rate's pace) instead of failing.
    async fn take(&self, amount: u64) -> bool {
        let amount = u32::try_from(amount)
            .ok()
            .and_then(NonZeroU32::new)
            .map_or(self.capacity, |amount| amount.min(self.capacity));
        if self.limiter.check_n(amount) == Ok(Ok(())) {
            return false;
        }
        // Capacity is checked above, so the only error is impossible; waiting is what matters.
        let _ = self.limiter.until_n_ready(amount).await;
        true
    }
}

impl Throttle {
    /// A throttle for the given rates, or none when both are unlimited.
    pub fn new(
        events_per_second: Option<NonZeroU32>,
        bytes_per_second: Option<NonZeroU32>,
    ) -> Option<Arc<Self>> {
        if events_per_second.is_none() && bytes_per_second.is_none() {
            return None;
        }
        Some(Arc::new(Self {
            events: events_per_second.map(Bucket::per_second),
            bytes: bytes_per_second.map(Bucket::per_second),
            waits: AtomicU64::new(0),
        }))
    }

    /// Batches that had to wait for the rate limit so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Waits until a batch of `events` events and `bytes` bytes may go, or fails once `deadline` passes.
    pub async fn admit(&self, events: u64, bytes: u64, deadline: Instant) -> Result<(), SendError> {
        let wait = async {
            let mut waited = false;
            if let Some(bucket) = &self.events {
                waited |= bucket.take(events).await;
            }
            if let Some(bucket) = &self.bytes {
                waited |= bucket.take(bytes).await;
            }
            waited
        };
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(waited) => {
                if waited {
                    self.waits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(_) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                Err(SendError::DeadlineExceeded {
                    last_error: Some(
                        "waiting for the producer's rate limit toward Event Hubs".into(),
                    ),
                })
            }
        }
    }
}

/// Wraps a send stack so every batch first passes the throttle, if there is one.
#[derive(Clone)]
pub struct RateLimitLayer {
    throttle: Option<Arc<Throttle>>,
}

impl RateLimitLayer {
    /// A layer over the given throttle (none: batches pass straight through).
    pub fn new(throttle: Option<Arc<Throttle>>) -> Self {
        Self { throttle }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            throttle: self.throttle.clone(),
            inner,
        }
    }
}

/// The rate-limit service of [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    throttle: Option<Arc<Throttle>>,
    inner: S,
}

impl<S> Service<BatchRequest> for RateLimit<S>
where
    S: Service<BatchRequest, Response = (), Error = SendError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = ();
    type Error = SendError;
    type Future = BoxFuture<'static, Result<(), SendError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        // Readiness is decided per batch (its size and deadline), in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: BatchRequest) -> Self::Future {
        let throttle = self.throttle.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            if let Some(throttle) = throttle {
                throttle
                    .admit(request.events(), request.bytes(), request.deadline())
                    .await?;
            }
            inner.oneshot(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rate(value: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(value)
    }

    #[test]
    fn no_rates_means_no_throttle() {
        assert!(Throttle::new(None, None).is_none());
    }

    #[tokio::test]
    async fn a_full_bucket_admits_without_waiting_then_the_next_batch_waits() {
        let throttle = Throttle::new(rate(100), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        throttle.admit(100, 0, deadline).await.unwrap();
        assert_eq!(throttle.waits(), 0);
        let started = Instant::now();
        throttle.admit(10, 0, deadline).await.unwrap();
        assert_eq!(throttle.waits(), 1);
        // 10 events at 100/s need about 100 ms of refill; only the lower bound is safe on a shared machine.
        assert!(started.elapsed() >= Duration::from_millis(80));
    }

    #[tokio::test]
    async fn a_batch_above_the_rate_costs_one_second_instead_of_failing() {
        let throttle = Throttle::new(None, rate(1000)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        throttle.admit(1, 1_000_000, deadline).await.unwrap();
        assert_eq!(throttle.waits(), 0);
    }

    #[tokio::test]
    async fn waiting_past_the_deadline_fails_with_deadline_exceeded() {
        let throttle = Throttle::new(rate(1), rate(1_000_000)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        throttle.admit(1, 10, deadline).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(50);
        let error = throttle.admit(1, 10, soon).await.unwrap_err();
        assert!(
            matches!(error, SendError::DeadlineExceeded { last_error: Some(ref why) } if why.contains("rate limit")),
            "{error:?}"
        );
    }
}
