//! Who answers an event: its caller's deadline while the event waits, or its batch's real outcome once the
//! batch is on the wire; never both, so an event that may be stored is never answered as failed.

use std::sync::atomic::{AtomicU8, Ordering};

const WAITING: u8 = 0;
const EXPIRED: u8 = 1;
const ON_WIRE: u8 = 2;

/// The one decision about an event: its deadline passed first (it is left out of its batch), or its batch
/// went to Event Hubs first (it gets the batch's outcome, however late).
#[derive(Debug, Default)]
pub struct Claim(AtomicU8);

impl Claim {
    /// A claim on an event that is waiting for its batch.
    pub fn new() -> Self {
        Self(AtomicU8::new(WAITING))
    }

    /// The caller's deadline passed: true if the event had not gone on the wire, and now never will.
    pub fn expire(&self) -> bool {
        self.decide(EXPIRED) == EXPIRED
    }

    /// Its batch is about to be written to a link: true if the event goes with it (its deadline had not won).
    pub fn put_on_wire(&self) -> bool {
        self.decide(ON_WIRE) == ON_WIRE
    }

    /// Whether its deadline won.
    pub fn is_expired(&self) -> bool {
        self.0.load(Ordering::Acquire) == EXPIRED
    }

    /// Whether its batch went on the wire first.
    pub fn is_on_wire(&self) -> bool {
        self.0.load(Ordering::Acquire) == ON_WIRE
    }

    /// Moves a waiting claim to `decision`; returns the state it ends in (the first decision stands).
    fn decide(&self, decision: u8) -> u8 {
        match self
            .0
            .compare_exchange(WAITING, decision, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => decision,
            Err(already) => already,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_decision_stands() {
        let expired_first = Claim::new();
        assert!(expired_first.expire());
        assert!(!expired_first.put_on_wire());
        assert!(expired_first.is_expired());

        let sent_first = Claim::new();
        assert!(sent_first.put_on_wire());
        assert!(!sent_first.expire());
        assert!(!sent_first.is_expired());
        assert!(sent_first.is_on_wire());
        // A retry puts the same batch on the wire again.
        assert!(sent_first.put_on_wire());
    }
}
