//! Each client's share of the producer's buffer: the bytes of its events waiting for their outcome, per peer
//! address, so one client cannot fill `producer.max_buffered_bytes` and leave every other client OVERLOADED.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::status::GatewayError;

/// How soon a client over its share is told to try again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The per-client shares of the buffer, keyed by peer address.
pub struct BufferShares {
    per_client: u32,
    table: Mutex<Table>,
}

struct Table {
    shares: HashMap<IpAddr, Arc<Semaphore>>,
    /// The table is swept of shares nobody holds when it grows past this size.
    sweep_at: usize,
}

/// One client's share, looked up once per call: none for a call without a peer address (not over TCP),
/// which has no share to charge. Holding it keeps the share in the table.
#[derive(Clone, Debug)]
pub struct ClientShare {
    share: Option<Arc<Semaphore>>,
    /// Bytes in a whole share.
    size: u32,
}

/// Bytes of one event held in its client's share until dropped (with the event's outcome).
#[derive(Debug)]
pub struct HeldShare {
    _permit: Option<OwnedSemaphorePermit>,
}

impl BufferShares {
    /// Shares of `per_client` bytes each (at most 4 GiB).
    pub fn new(per_client: u64) -> Self {
        Self {
            per_client: u32::try_from(per_client).unwrap_or(u32::MAX),
            table: Mutex::new(Table {
                shares: HashMap::new(),
                sweep_at: 64,
            }),
        }
    }

    /// Peer addresses in the table now (some may hold nothing until the next sweep).
    pub fn clients(&self) -> usize {
        self.table.lock().shares.len()
    }

    /// The share of `peer` (none without a peer address).
    pub fn share_of(&self, peer: Option<IpAddr>) -> ClientShare {
        ClientShare {
            share: peer.map(|peer| self.share_of_peer(peer)),
            size: self.per_client,
        }
    }

    fn share_of_peer(&self, peer: IpAddr) -> Arc<Semaphore> {
        let mut table = self.table.lock();
        if let Some(share) = table.shares.get(&peer) {
            return Arc::clone(share);
        }
        if table.shares.len() >= table.sweep_at {
            // A share only the table holds has no event in flight: its client starts afresh next time.
            table.shares.retain(|_, share| Arc::strong_count(share) > 1);
            table.sweep_at = (table.shares.len() * 2).max(64);
        }
        let share = Arc::new(Semaphore::new(self.per_client as usize));
        table.shares.insert(peer, Arc::clone(&share));
        share
    }
}

impl ClientShare {
    /// Holds `bytes` of a client's share, waiting until `deadline` for its earlier events to finish.
    pub async fn hold(&self, bytes: usize, deadline: Instant) -> Result<HeldShare, GatewayError> {
        let Some(share) = &self.share else {
            return Ok(HeldShare { _permit: None });
        };
        // An event larger than a whole share still goes, alone.
        let weight = u32::try_from(bytes).unwrap_or(u32::MAX).clamp(1, self.size);
        let permit = match Arc::clone(share).try_acquire_many_owned(weight) {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout_at(
                deadline.into(),
                Arc::clone(share).acquire_many_owned(weight),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(GatewayError::Overloaded {
                bound: "limits.max_buffered_bytes_per_client",
                retry_after: RETRY_AFTER,
            })?,
        };
        Ok(HeldShare {
            _permit: Some(permit),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn peer(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_share_waits_then_is_overloaded_while_others_go_on() {
        let shares = BufferShares::new(2 * MIB as u64);
        // From the paused clock: it runs ahead of the real one while the test waits.
        let now = || tokio::time::Instant::now().into_std();
        let deadline = now() + Duration::from_secs(1);
        let first = shares.share_of(peer(1)).hold(MIB, deadline).await.unwrap();
        let _second = shares.share_of(peer(1)).hold(MIB, deadline).await.unwrap();
        let refused = shares
            .share_of(peer(1))
            .hold(MIB, deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                GatewayError::Overloaded {
                    bound: "limits.max_buffered_bytes_per_client",
                    ..
                }
            ),
            "{refused}"
        );
        shares
            .share_of(peer(2))
            .hold(2 * MIB, deadline)
            .await
            .expect("another client has its own share");

        let later = now() + Duration::from_secs(1);
        let waiting = tokio::spawn(async move {
            let held = shares.share_of(peer(1)).hold(MIB, later).await;
            (held.is_ok(), shares)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        let (admitted, _) = waiting.await.unwrap();
        assert!(admitted, "an event finishing makes room for the next");
    }

    #[tokio::test]
    async fn an_event_larger_than_a_share_goes_alone_and_no_peer_has_no_share() {
        let shares = BufferShares::new(MIB as u64);
        let deadline = Instant::now();
        let _whole = shares
            .share_of(peer(1))
            .hold(3 * MIB, deadline)
            .await
            .unwrap();
        assert!(shares.share_of(peer(1)).hold(1, deadline).await.is_err());
        assert!(shares.share_of(None).hold(10 * MIB, deadline).await.is_ok());
    }

    #[tokio::test]
    async fn the_table_forgets_clients_with_nothing_in_flight() {
        let shares = BufferShares::new(MIB as u64);
        let deadline = Instant::now();
        let held = shares.share_of(peer(0)).hold(1, deadline).await.unwrap();
        for last in 1..=200 {
            drop(shares.share_of(peer(last)).hold(1, deadline).await.unwrap());
        }
        assert!(
            shares.clients() < 130,
            "swept as it grows: {}",
            shares.clients()
        );
        drop(held);
        assert!(shares.share_of(peer(0)).hold(MIB, deadline).await.is_ok());
    }
}
