//! Injected faults: throttling, released deliveries, slow dispositions, forced closes and detaches,
//! early token expiry and refused connections, for tests of what sends to the emulator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

/// The faults to inject; shared by every connection of one emulator. All methods are cheap and thread-safe.
#[derive(Debug)]
pub struct Faults {
    throttled_sends: AtomicU64,
    released_sends: AtomicU64,
    extra_disposition_delay_ms: AtomicU64,
    /// Transfers left before a connection is force-closed; 0 means off.
    transfers_before_forced_close: AtomicU64,
    refuse_connections_until: Mutex<Option<Instant>>,
    /// Bumped to detach every hub link.
    detach_generation: watch::Sender<u64>,
    /// Bumped to invalidate every token granted so far.
    token_generation: watch::Sender<u64>,
    /// Every transfer received on a hub link (an observation, not a fault).
    transfers_seen: AtomicU64,
    /// Transfers holding an event whose encoding contains these bytes are refused whole.
    refused_marker: Mutex<Option<Vec<u8>>>,
}

/// The faults injected at one moment and what has been seen so far, copied out of [`Faults`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultsSnapshot {
    /// Transfers still to be rejected with `com.microsoft:server-busy`.
    pub throttled_sends: u64,
    /// Transfers still to be answered Released.
    pub released_sends: u64,
    /// The extra delay of every disposition (zero: off).
    pub extra_disposition_delay: Duration,
    /// Transfers until a forced close, the close coming on the last of them (zero: off).
    pub transfers_before_forced_close: u64,
    /// How much longer new connections are refused (zero: not refusing).
    pub refusing_connections_for: Duration,
    /// The marker whose events are refused, if one is set.
    pub refused_marker: Option<Vec<u8>>,
    /// How many times every hub link was detached.
    pub detaches: u64,
    /// How many times every granted token was expired.
    pub token_expiries: u64,
    /// Every transfer hub links have received since the start.
    pub transfers_seen: u64,
}

/// What happens to one incoming transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferFault {
    /// Stored and accepted as usual.
    None,
    /// Rejected with `com.microsoft:server-busy`, not stored.
    Throttle,
    /// Answered Released, not stored.
    Release,
    /// Its connection is closed with `amqp:connection:forced`, not stored.
    ForceClose,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            throttled_sends: AtomicU64::new(0),
            released_sends: AtomicU64::new(0),
            extra_disposition_delay_ms: AtomicU64::new(0),
            transfers_before_forced_close: AtomicU64::new(0),
            refuse_connections_until: Mutex::new(None),
            detach_generation: watch::Sender::new(0),
            token_generation: watch::Sender::new(0),
            transfers_seen: AtomicU64::new(0),
            refused_marker: Mutex::new(None),
        }
    }
}

impl Faults {
    /// The next `count` transfers are rejected with `com.microsoft:server-busy` (and not stored).
    pub fn throttle_next_sends(&self, count: u64) {
        self.throttled_sends.store(count, Ordering::SeqCst);
    }

    /// The next `count` transfers are answered Released (and not stored).
    pub fn release_next_sends(&self, count: u64) {
        self.released_sends.store(count, Ordering::SeqCst);
    }

    /// Every disposition waits this much longer (on top of `latency_ms`); zero turns it off.
    pub fn delay_dispositions(&self, delay: Duration) {
        self.extra_disposition_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The connection carrying the `count`-th transfer from now is closed with `amqp:connection:forced`
    /// before that transfer is stored; zero turns it off.
    pub fn force_close_after_transfers(&self, count: u64) {
        self.transfers_before_forced_close
            .store(count, Ordering::SeqCst);
    }

    /// Detaches every sender and receiver link on a hub with `amqp:link:detach-forced`, now.
    pub fn detach_all_links(&self) {
        self.detach_generation
            .send_modify(|generation| *generation += 1);
    }

    /// Makes every token granted so far expire now: links relying on them are detached with
    /// `amqp:unauthorized-access` unless a fresh token is put.
    pub fn expire_tokens(&self) {
        self.token_generation
            .send_modify(|generation| *generation += 1);
    }

    /// New TCP connections are closed at once for this long.
    pub fn refuse_connections_for(&self, duration: Duration) {
        *self.refuse_connections_until.lock() = Some(Instant::now() + duration);
    }

    /// Refuses whole, with `com.microsoft:argument-error` as the service refuses a batch holding an event it will
    /// not take, every transfer holding an event whose encoding contains `marker` (a rule only the emulator knows,
    /// so the sender cannot check it first); `None` turns it off.
    pub fn refuse_events_containing(&self, marker: Option<&[u8]>) {
        *self.refused_marker.lock() = marker.map(<[u8]>::to_vec);
    }

    /// The index of the first event holding the refused marker, if one does.
    pub(crate) fn refused_event(&self, events: &[bytes::Bytes]) -> Option<usize> {
        let marker = self.refused_marker.lock();
        let marker = marker.as_deref().filter(|marker| !marker.is_empty())?;
        events
            .iter()
            .position(|event| event.windows(marker.len()).any(|window| window == marker))
    }

    /// Turns every fault off.
    pub fn clear(&self) {
        self.throttle_next_sends(0);
        self.release_next_sends(0);
        self.delay_dispositions(Duration::ZERO);
        self.force_close_after_transfers(0);
        self.refuse_events_containing(None);
        *self.refuse_connections_until.lock() = None;
    }

    /// Decides the fate of one incoming transfer, consuming one unit of whichever fault applies.
    pub(crate) fn next_transfer(&self) -> TransferFault {
        self.transfers_seen.fetch_add(1, Ordering::Relaxed);
        let take_one = |counter: &AtomicU64| {
            counter
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let forced = self.transfers_before_forced_close.fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |n| (n > 0).then(|| n - 1),
        );
        if forced == Ok(1) {
            TransferFault::ForceClose
        } else if take_one(&self.throttled_sends) {
            TransferFault::Throttle
        } else if take_one(&self.released_sends) {
            TransferFault::Release
        } else {
            TransferFault::None
        }
    }

    /// How many transfers (single messages or batches) hub links have received since the start.
    pub fn transfers_seen(&self) -> u64 {
        self.transfers_seen.load(Ordering::Relaxed)
    }

    /// The faults injected now and the counters, read one by one (not atomically together).
    pub fn snapshot(&self) -> FaultsSnapshot {
        FaultsSnapshot {
            throttled_sends: self.throttled_sends.load(Ordering::SeqCst),
            released_sends: self.released_sends.load(Ordering::SeqCst),
            extra_disposition_delay: self.extra_disposition_delay(),
            transfers_before_forced_close: self
                .transfers_before_forced_close
                .load(Ordering::SeqCst),
            refusing_connections_for: self
                .refuse_connections_until
                .lock()
                .map_or(Duration::ZERO, |until| {
                    until.saturating_duration_since(Instant::now())
                }),
            refused_marker: self.refused_marker.lock().clone(),
            detaches: *self.detach_generation.borrow(),
            token_expiries: *self.token_generation.borrow(),
            transfers_seen: self.transfers_seen(),
        }
    }

    /// The injected extra disposition delay.
    pub(crate) fn extra_disposition_delay(&self) -> Duration {
        Duration::from_millis(self.extra_disposition_delay_ms.load(Ordering::Relaxed))
    }

    /// Whether a new connection must be refused now.
    pub(crate) fn refusing_connections(&self) -> bool {
        self.refuse_connections_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Changes when links must be detached.
    pub(crate) fn subscribe_detach(&self) -> watch::Receiver<u64> {
        self.detach_generation.subscribe()
    }

    /// Changes when every token granted so far must be treated as expired.
    pub(crate) fn subscribe_tokens(&self) -> watch::Receiver<u64> {
        self.token_generation.subscribe()
    }

    /// The current token generation; grants from older generations are void.
    pub(crate) fn token_generation(&self) -> u64 {
        *self.token_generation.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_faults_are_consumed_one_transfer_at_a_time() {
        let faults = Faults::default();
        faults.throttle_next_sends(2);
        faults.release_next_sends(1);
        let fates: Vec<_> = (0..4).map(|_| faults.next_transfer()).collect();
        assert_eq!(
            fates,
            [
                TransferFault::Throttle,
                TransferFault::Throttle,
                TransferFault::Release,
                TransferFault::None
            ]
        );
    }

    #[test]
    fn forced_close_fires_on_the_nth_transfer_only() {
        let faults = Faults::default();
        faults.force_close_after_transfers(3);
        let fates: Vec<_> = (0..5).map(|_| faults.next_transfer()).collect();
        assert_eq!(fates[2], TransferFault::ForceClose);
        assert_eq!(
            fates
                .iter()
                .filter(|f| **f == TransferFault::ForceClose)
                .count(),
            1
        );
    }

    #[test]
    fn the_snapshot_shows_what_is_injected_and_what_is_left() {
        let faults = Faults::default();
        assert_eq!(faults.snapshot().throttled_sends, 0);
        faults.throttle_next_sends(2);
        faults.release_next_sends(3);
        faults.delay_dispositions(Duration::from_millis(250));
        faults.force_close_after_transfers(7);
        faults.refuse_connections_for(Duration::from_secs(60));
        faults.refuse_events_containing(Some(b"poison"));
        faults.detach_all_links();
        faults.expire_tokens();
        faults.expire_tokens();
        faults.next_transfer();
        let snapshot = faults.snapshot();
        assert_eq!(snapshot.throttled_sends, 1, "one throttle consumed");
        assert_eq!(snapshot.released_sends, 3);
        assert_eq!(snapshot.extra_disposition_delay, Duration::from_millis(250));
        assert_eq!(snapshot.transfers_before_forced_close, 6);
        assert!(
            snapshot.refusing_connections_for > Duration::from_secs(50)
                && snapshot.refusing_connections_for <= Duration::from_secs(60),
            "{:?}",
            snapshot.refusing_connections_for
        );
        assert_eq!(snapshot.refused_marker.as_deref(), Some(&b"poison"[..]));
        assert_eq!((snapshot.detaches, snapshot.token_expiries), (1, 2));
        assert_eq!(snapshot.transfers_seen, 1);
        faults.clear();
        let cleared = faults.snapshot();
        assert_eq!(
            (
                cleared.throttled_sends,
                cleared.released_sends,
                cleared.extra_disposition_delay,
                cleared.transfers_before_forced_close,
                cleared.refusing_connections_for,
                cleared.refused_marker,
            ),
            (0, 0, Duration::ZERO, 0, Duration::ZERO, None)
        );
        assert_eq!(
            (
                cleared.detaches,
                cleared.token_expiries,
                cleared.transfers_seen
            ),
            (1, 2, 1)
        );
    }

    #[test]
    fn clear_turns_everything_off() {
        let faults = Faults::default();
        faults.throttle_next_sends(5);
        faults.refuse_connections_for(Duration::from_secs(60));
        assert!(faults.refusing_connections());
        faults.clear();
        assert!(!faults.refusing_connections());
        assert_eq!(faults.next_transfer(), TransferFault::None);
    }
}
