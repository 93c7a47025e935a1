//! The service's partition-key hash: Jenkins lookup3 over the key's UTF-8 bytes, bit-identical to Event Hubs.
//!
//! The service (and the Java, .NET and JS SDKs, which port its code) hashes the key with `hashlittle2`
//! (both seeds 0), folds the two 32-bit results into a signed 16-bit value and takes the remainder with
//! the sign semantics of Java's `%`, then its absolute value.

/// The partition index (0-based) that Event Hubs assigns to `key` on a hub with `partition_count` partitions.
///
/// `partition_count` must be at least 1.
pub fn partition_for_key(key: &str, partition_count: u32) -> u32 {
    debug_assert!(partition_count > 0, "a hub has at least one partition");
    let hash = i32::from(hash_key(key));
    // Rust's `%` on signed integers truncates toward zero, exactly as Java's and JavaScript's do.
    (hash % partition_count.max(1) as i32).unsigned_abs()
}

/// The service's 16-bit hash of a partition key.
pub fn hash_key(key: &str) -> i16 {
    let (hash1, hash2) = hashlittle2(key.as_bytes(), 0, 0);
    (hash1 ^ hash2) as i16
}

/// Bob Jenkins' lookup3 `hashlittle2`: returns `(c, b)`, the primary and secondary hashes.
fn hashlittle2(key: &[u8], seed_primary: u32, seed_secondary: u32) -> (u32, u32) {
    let initial = 0xdead_beef_u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(seed_primary);
    let (mut a, mut b, mut c) = (initial, initial, initial.wrapping_add(seed_secondary));

    let mut rest = key;
    while rest.len() > 12 {
        a = a.wrapping_add(read_le_u32(&rest[0..4]));
        b = b.wrapping_add(read_le_u32(&rest[4..8]));
        c = c.wrapping_add(read_le_u32(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return (c, b);
    }
    // The last 1..=12 bytes, zero-padded: lookup3 adds them as little-endian words.
    let mut tail = [0u8; 12];
    tail[..rest.len()].copy_from_slice(rest);
    a = a.wrapping_add(read_le_u32(&tail[0..4]));
    b = b.wrapping_add(read_le_u32(&tail[4..8]));
    c = c.wrapping_add(read_le_u32(&tail[8..12]));
    final_mix(&mut a, &mut b, &mut c);
    (c, b)
}

fn read_le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors produced by the JS SDK's `mapPartitionKeyToId` (`@azure/event-hubs` 6.0.4), a port of the
    /// service's resolver: 409 keys (empty, ASCII, accented, CJK, emoji, Cyrillic, up to 300 characters).
    const JS_SDK_VECTORS: &str = include_str!("../../../tests/data/partition-key-vectors.json");

    #[derive(serde::Deserialize)]
    struct Vectors {
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        key: String,
        utf8_len: usize,
        partition: std::collections::BTreeMap<u32, u32>,
    }

    #[test]
    fn matches_every_js_sdk_vector() {
        let vectors: Vectors = serde_json::from_str(JS_SDK_VECTORS).expect("vector file parses");
        assert!(vectors.cases.len() >= 400, "the vector file is complete");
        let mut checked = 0;
        for case in &vectors.cases {
            assert_eq!(case.key.len(), case.utf8_len, "key {:?}", case.key);
            for (&count, &expected) in &case.partition {
                assert_eq!(
                    partition_for_key(&case.key, count),
                    expected,
                    "key {:?} on {count} partitions",
                    case.key
                );
                checked += 1;
            }
        }
        assert!(checked > 4000);
    }

    #[test]
    fn vectors_cover_the_edge_cases_the_service_cares_about() {
        let vectors: Vectors = serde_json::from_str(JS_SDK_VECTORS).expect("vector file parses");
        let keys: Vec<&str> = vectors.cases.iter().map(|c| c.key.as_str()).collect();
        assert!(keys.contains(&""), "empty key");
        assert!(keys.iter().any(|k| !k.is_ascii()), "non-ASCII key");
        assert!(keys.iter().any(|k| k.len() > 200), "long key");
        assert!(keys.iter().any(|k| hash_key(k) < 0), "negative hash");
        assert!(
            keys.iter().any(|k| k.len() % 12 == 0 && !k.is_empty()),
            "whole 12-byte blocks"
        );
    }

    #[test]
    fn empty_key_hashes_like_the_service() {
        // lookup3 of zero bytes returns the seeds' initial state untouched: c = b = 0xdeadbeef.
        assert_eq!(hashlittle2(b"", 0, 0), (0xdead_beef, 0xdead_beef));
        assert_eq!(hash_key(""), 0);
        assert_eq!(partition_for_key("", 32), 0);
    }

    #[test]
    fn negative_hashes_take_the_absolute_remainder() {
        let key = (0..10_000)
            .map(|i| format!("key-{i}"))
            .find(|k| hash_key(k) < 0 && i32::from(hash_key(k)) % 7 != 0)
            .expect("some key hashes negative");
        let hash = i32::from(hash_key(&key));
        assert_eq!(partition_for_key(&key, 7), (hash % 7).unsigned_abs());
        assert!(partition_for_key(&key, 7) < 7);
    }
}
