//! Address → key group.
//!
//! A key group is the unit of ownership, placement, snapshot and move (DESIGN.md). The
//! mapping is part of the on-disk and on-wire format, so it is **fixed forever**:
//!
//! ```text
//! h  = FNV-1a-64( namespace ‖ 0x1F ‖ type ‖ 0x1F ‖ id )      (UTF-8 bytes)
//! h' = fmix64(h)                                              (MurmurHash3 finaliser)
//! key_group = h' mod K                                        (K = key groups, default 1024)
//! ```
//!
//! FNV-1a alone mixes its low bits poorly for short ids; the finaliser spreads every input
//! bit over the whole word, so `mod K` is uniform for any K. `0x1F` (unit separator)
//! cannot be part of a valid namespace or type, so distinct addresses never concatenate to
//! the same bytes.

/// The default number of key groups of a cluster.
pub const DEFAULT_KEY_GROUPS: u32 = 1024;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const SEPARATOR: u8 = 0x1F;

/// The stable 64-bit hash of an address (see the module docs). Never change it.
pub fn stable_hash(namespace: &str, typ: &str, id: &str) -> u64 {
    let mut h = FNV_OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    feed(namespace.as_bytes());
    feed(&[SEPARATOR]);
    feed(typ.as_bytes());
    feed(&[SEPARATOR]);
    feed(id.as_bytes());
    fmix64(h)
}

/// The key group of an address among `key_groups` groups.
///
/// # Panics
/// If `key_groups` is 0 (configuration validation rejects that before any call).
pub fn key_group(namespace: &str, typ: &str, id: &str, key_groups: u32) -> u32 {
    assert!(key_groups > 0, "key_groups must be positive");
    (stable_hash(namespace, typ, id) % u64::from(key_groups)) as u32
}

pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These values pin the hash (computed independently from the definition above): if
    /// this test fails, the on-disk and on-wire format broke.
    #[test]
    fn hash_is_fixed() {
        assert_eq!(stable_hash("", "", ""), 0x35a2_bd31_7b95_7a81);
        assert_eq!(
            stable_hash("example", "counter", "1"),
            0xad88_ba8f_a8c9_b6a4
        );
        assert_eq!(key_group("example", "counter", "1", 1024), 676);
        assert_eq!(
            stable_hash("example", "greeter", "alice"),
            0xa9d7_1ed8_475e_391c
        );
        assert_eq!(key_group("example", "greeter", "alice", 1024), 284);
    }

    #[test]
    fn separator_prevents_concatenation_collisions() {
        assert_ne!(stable_hash("ab", "c", "d"), stable_hash("a", "bc", "d"));
        assert_ne!(stable_hash("a", "b", "cd"), stable_hash("a", "bc", "d"));
    }

    #[test]
    fn spreads_sequential_ids_evenly() {
        let k = 1024;
        let mut counts = vec![0u32; k as usize];
        let n = 1024 * 100;
        for i in 0..n {
            counts[key_group("example", "counter", &i.to_string(), k) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // Expected 100 per group; a uniform hash stays well within ±50%.
        assert!(*min > 50 && *max < 150, "min {min} max {max}");
    }
}
