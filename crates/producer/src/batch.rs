//! A batch under construction: encoded events for one route, its exact encoded size, and the transfer it becomes;
//! then, sealed, the transfer made of the events still waiting when it first goes on the wire.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp_types::messaging::annotations::{Annotations, OwnedKey};
use fe2o3_amqp_types::messaging::{Body, Data, Message, MessageAnnotations};
use fe2o3_amqp_types::primitives::{Binary, Symbol};
use serde_amqp::Value;

use super::claim::Claim;
use super::error::SendError;
use eventhub_wire::message::AmqpMessage;
use eventhub_wire::{BATCH_MESSAGE_FORMAT, annotations};

/// The transfer a batch becomes, built once and sent (and resent) by reference.
pub type Transfer = Sendable<Body<Value>>;

/// Bytes a Data section adds around an event of `len` encoded bytes: the section descriptor (3 bytes) and the
/// binary constructor with its length (serde_amqp writes vbin8 up to 254 bytes, vbin32 from 255).
pub fn section_size(len: usize) -> u64 {
    let header = if len < u8::MAX as usize { 2 } else { 5 };
    3 + header + len as u64
}

/// The outer message of a batch, without its body.
fn envelope(partition_key: Option<&str>, sections: Vec<Data>) -> AmqpMessage {
    let message_annotations = partition_key.map(|key| {
        let mut map = Annotations::new();
        map.insert(
            OwnedKey::Symbol(Symbol::from(annotations::PARTITION_KEY)),
            Value::String(key.to_owned()),
        );
        MessageAnnotations(map)
    });
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations,
        properties: None,
        application_properties: None,
        body: Body::Data(sections.into()),
        footer: None,
    }
}

/// The encoded size of a batch's outer message with no events in it: nothing without a key; with one, the
/// message-annotations section holding it. Worked out from the key's length rather than by encoding, as it is
/// asked for every event (encoding an envelope cost a quarter of the gateway's instructions per event).
pub fn envelope_size(partition_key: Option<&str>) -> u64 {
    let Some(key) = partition_key else {
        return 0;
    };
    // The annotation's name as sym8, its value as str8 (up to 254 bytes, as serde_amqp writes) or str32.
    let name = 2 + annotations::PARTITION_KEY.len() as u64;
    let value = key.len() as u64 + if key.len() < u8::MAX as usize { 2 } else { 5 };
    // map8 (size and count bytes) while size and contents fit a byte, else map32; after the descriptor
    // 0x00 0x53 0x72.
    let contents = name + value;
    let map = contents + if contents < u8::MAX as u64 { 3 } else { 9 };
    3 + map
}

/// Events accumulating for one route, with the exact size their transfer will have.
#[derive(Debug)]
pub struct BatchBuilder {
    partition_key: Option<String>,
    sections: Vec<Data>,
    size: u64,
    limit: u64,
}

impl BatchBuilder {
    /// An empty batch for events with this partition key, under the link's `max-message-size`.
    pub fn new(partition_key: Option<String>, limit: u64) -> Self {
        let size = envelope_size(partition_key.as_deref());
        Self {
            partition_key,
            sections: Vec::new(),
            size,
            limit,
        }
    }

    /// What an event of `len` encoded bytes would weigh alone in a batch.
    pub fn size_alone(partition_key: Option<&str>, len: usize) -> u64 {
        envelope_size(partition_key) + section_size(len)
    }

    /// Refuses an event that would not fit under `limit` even alone in a batch, naming its size and the limit.
    pub fn check_fits_alone(
        partition_key: Option<&str>,
        len: usize,
        limit: u64,
    ) -> Result<(), SendError> {
        let size = Self::size_alone(partition_key, len);
        if size > limit {
            return Err(SendError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// Adds the event if it fits; gives it back if it does not.
    pub fn try_push(&mut self, encoded: Vec<u8>) -> Result<(), Vec<u8>> {
        let grown = self.size + section_size(encoded.len());
        if grown > self.limit {
            return Err(encoded);
        }
        self.size = grown;
        self.sections.push(Data(Binary::from(encoded)));
        Ok(())
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.sections.len()
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// Its encoded size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Keeps only the events whose index `keep` accepts, and the size that leaves.
    fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let mut index = 0;
        self.sections.retain(|_| {
            index += 1;
            keep(index - 1)
        });
        self.size = envelope_size(self.partition_key.as_deref())
            + self
                .sections
                .iter()
                .map(|section| section_size(section.0.len()))
                .sum::<u64>();
    }

    /// The transfer: message format 0x80013700, one Data section per event.
    pub fn into_transfer(self) -> Transfer {
        Sendable::builder()
            .message(envelope(self.partition_key.as_deref(), self.sections))
            .message_format(BATCH_MESSAGE_FORMAT)
            .build()
    }
}

/// A sealed batch on its way to Event Hubs. Its transfer is made when it first goes on the wire, of the events
/// whose deadline had not passed by then (their claims decide it), and resent as it is on every retry.
#[derive(Debug)]
pub struct SealedBatch {
    builder: parking_lot::Mutex<Option<BatchBuilder>>,
    partition_key: Option<String>,
    limit: u64,
    size: u64,
    claims: Vec<Arc<Claim>>,
    on_wire: OnceLock<Option<(Arc<Transfer>, Instant)>>,
    in_doubt: AtomicBool,
}

impl SealedBatch {
    /// A batch of the builder's events, the claim of each in the same order.
    pub fn new(builder: BatchBuilder, claims: Vec<Arc<Claim>>) -> Self {
        debug_assert_eq!(builder.len(), claims.len());
        Self {
            partition_key: builder.partition_key.clone(),
            limit: builder.limit,
            size: builder.size,
            builder: parking_lot::Mutex::new(Some(builder)),
            claims,
            on_wire: OnceLock::new(),
            in_doubt: AtomicBool::new(false),
        }
    }

    /// The transfer to write now. The first call puts every event whose deadline has not passed on the wire and
    /// leaves the others out; `None` when no event is left.
    pub fn transfer_for_wire(&self) -> Option<Arc<Transfer>> {
        let on_wire = self.on_wire.get_or_init(|| {
            let mut builder = self.builder.lock().take()?;
            let keep: Vec<bool> = self
                .claims
                .iter()
                .map(|claim| claim.put_on_wire())
                .collect();
            if !keep.iter().all(|&kept| kept) {
                builder.retain(|index| keep[index]);
            }
            (!builder.is_empty()).then(|| (Arc::new(builder.into_transfer()), super::route::now()))
        });
        on_wire.as_ref().map(|(transfer, _)| Arc::clone(transfer))
    }

    /// Makes sure it never goes on the wire: true unless it already has.
    pub fn abandon(&self) -> bool {
        self.on_wire.get_or_init(|| None).is_none()
    }

    /// When it first went on the wire, if it has.
    pub fn on_wire_since(&self) -> Option<Instant> {
        self.on_wire
            .get()
            .and_then(|on_wire| on_wire.as_ref().map(|&(_, at)| at))
    }

    /// An attempt went on the wire and ended without an outcome (the link or connection was lost, or no
    /// disposition came): Event Hubs may have stored the batch.
    pub fn mark_in_doubt(&self) {
        self.in_doubt.store(true, Ordering::Release);
    }

    /// Whether an attempt may have been stored without the producer knowing.
    pub fn is_in_doubt(&self) -> bool {
        self.in_doubt.load(Ordering::Acquire)
    }

    /// Its encoded size as sealed, bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Events in the batch, those left out of its transfer included.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// After Event Hubs refused its transfer whole (nothing of it stored), the events that were on the wire in two
    /// batches, first half and second half in order, each with the indices (in this batch) of its events; `None`
    /// when fewer than two went on the wire. Their claims are on the wire already: the halves carry the same
    /// events, whatever their callers' deadlines.
    pub fn split(&self) -> Option<[(SealedBatch, Vec<usize>); 2]> {
        let transfer = self.on_wire.get()?.as_ref()?.0.clone();
        let Body::Data(sections) = &transfer.message.body else {
            return None;
        };
        let kept: Vec<usize> = (0..self.claims.len())
            .filter(|&index| !self.claims[index].is_expired())
            .collect();
        if kept.len() < 2 || kept.len() != sections.len() {
            return None;
        }
        let middle = kept.len() / 2;
        let half = |range: std::ops::Range<usize>| {
            let mut builder = BatchBuilder::new(self.partition_key.clone(), self.limit);
            for section in &sections[range.clone()] {
                // A part of a batch that fitted fits.
                let _ = builder.try_push(section.0.to_vec());
            }
            let indices = kept[range].to_vec();
            let claims = indices
                .iter()
                .map(|&index| Arc::clone(&self.claims[index]))
                .collect();
            (SealedBatch::new(builder, claims), indices)
        };
        Some([half(0..middle), half(middle..kept.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventhub_wire::message::encode;

    fn encoded_size(transfer: &Transfer) -> u64 {
        encode(&transfer.message).unwrap().len() as u64
    }

    #[test]
    fn the_predicted_size_is_the_encoded_size() {
        for key in [None, Some("k"), Some("a much longer partition key ü")] {
            for lens in [
                vec![0],
                vec![1, 254, 255, 256],
                vec![1000; 7],
                vec![70_000, 3],
            ] {
                let mut batch = BatchBuilder::new(key.map(str::to_owned), u64::MAX);
                for len in &lens {
                    batch.try_push(vec![7; *len]).unwrap();
                }
                let predicted = batch.size();
                assert_eq!(
                    encoded_size(&batch.into_transfer()),
                    predicted,
                    "{key:?} {lens:?}"
                );
            }
        }
    }

    /// The size of an empty batch's envelope, by encoding one (with an empty section, less that section).
    fn encoded_envelope_size(partition_key: Option<&str>) -> u64 {
        let message = envelope(partition_key, vec![Data(Binary::from(vec![]))]);
        encode(&message).unwrap().len() as u64 - section_size(0)
    }

    #[test]
    fn the_envelope_size_is_what_encoding_it_gives_for_every_key_length() {
        assert_eq!(envelope_size(None), encoded_envelope_size(None));
        for len in (0..600).chain([65_535, 65_536, 70_000]) {
            let key = "k".repeat(len);
            assert_eq!(
                envelope_size(Some(&key)),
                encoded_envelope_size(Some(&key)),
                "key of {len} bytes"
            );
        }
        let multibyte = "ü".repeat(130);
        assert_eq!(
            envelope_size(Some(&multibyte)),
            encoded_envelope_size(Some(&multibyte))
        );
    }

    fn sealed(lens: &[usize]) -> (SealedBatch, Vec<Arc<Claim>>) {
        let mut builder = BatchBuilder::new(Some("key".into()), u64::MAX);
        for (index, len) in lens.iter().enumerate() {
            builder.try_push(vec![index as u8; *len]).unwrap();
        }
        let claims: Vec<_> = lens.iter().map(|_| Arc::new(Claim::new())).collect();
        (SealedBatch::new(builder, claims.clone()), claims)
    }

    #[test]
    fn events_whose_deadline_passed_first_are_left_out_of_the_transfer() {
        let (batch, claims) = sealed(&[10, 300, 20]);
        assert!(claims[1].expire());
        assert_eq!(batch.on_wire_since(), None);
        let transfer = batch.transfer_for_wire().unwrap();
        let Body::Data(sections) = &transfer.message.body else {
            panic!("a batch body is Data sections")
        };
        let kept: Vec<_> = sections.iter().map(|section| section.0.to_vec()).collect();
        assert_eq!(kept, vec![vec![0u8; 10], vec![2u8; 20]]);
        // The size predicted after leaving one out is still the encoded size.
        let mut expected = BatchBuilder::new(Some("key".into()), u64::MAX);
        expected.try_push(vec![0; 10]).unwrap();
        expected.try_push(vec![2; 20]).unwrap();
        assert_eq!(encoded_size(&transfer), expected.size());
        // The others are on the wire: their deadline can no longer answer them.
        assert!(!claims[0].expire() && !claims[2].expire());
        assert!(batch.on_wire_since().is_some());
        // A retry resends the same transfer.
        assert!(Arc::ptr_eq(&transfer, &batch.transfer_for_wire().unwrap()));
    }

    fn bodies(batch: &SealedBatch) -> Vec<Vec<u8>> {
        let transfer = batch.transfer_for_wire().unwrap();
        let Body::Data(sections) = &transfer.message.body else {
            panic!("a batch body is Data sections")
        };
        sections.iter().map(|section| section.0.to_vec()).collect()
    }

    #[test]
    fn a_refused_batch_splits_into_halves_of_what_went_on_the_wire() {
        let (batch, claims) = sealed(&[1, 2, 3, 4, 5]);
        assert!(batch.split().is_none(), "not on the wire yet");
        assert!(claims[1].expire());
        bodies(&batch);
        let [(first, first_indices), (second, second_indices)] = batch.split().unwrap();
        assert_eq!(first_indices, vec![0, 2]);
        assert_eq!(second_indices, vec![3, 4]);
        // The halves go out whole, whatever happens to their callers' deadlines now.
        assert!(
            claims
                .iter()
                .all(|claim| !claim.expire() || claim.is_expired())
        );
        assert_eq!(bodies(&first), vec![vec![0u8; 1], vec![2u8; 3]]);
        assert_eq!(bodies(&second), vec![vec![3u8; 4], vec![4u8; 5]]);
        let [(last, _), (_, _)] = second.split().unwrap();
        assert_eq!(bodies(&last), vec![vec![3u8; 4]]);
        assert!(last.split().is_none(), "one event is not split");
        // The halves keep the batch's key.
        let transfer = first.transfer_for_wire().unwrap();
        assert_eq!(
            eventhub_wire::message::partition_key(&transfer.message),
            Ok(Some("key".into()))
        );
    }

    #[test]
    fn a_batch_whose_every_deadline_passed_is_never_sent() {
        let (batch, claims) = sealed(&[5, 5]);
        assert!(claims.iter().all(|claim| claim.expire()));
        assert!(batch.transfer_for_wire().is_none());
        assert!(batch.transfer_for_wire().is_none());
        assert_eq!(batch.on_wire_since(), None);
    }

    #[test]
    fn an_event_that_does_not_fit_is_given_back() {
        let alone = BatchBuilder::size_alone(None, 100);
        let mut batch = BatchBuilder::new(None, alone + section_size(100) - 1);
        assert!(batch.try_push(vec![0; 100]).is_ok());
        assert_eq!(batch.try_push(vec![1; 100]), Err(vec![1; 100]));
        assert_eq!(batch.len(), 1);
    }
}
