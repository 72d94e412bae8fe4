//! The uncommitted overlay (DESIGN.md: "uncommitted overlay (per key group, in memory)"), as a
//! pure data structure: state writes of epochs that have not committed yet, keyed like the
//! local store (`'s' ‖ kg:u16be ‖ …`), so that sled only ever holds committed state.
//!
//! - [`Overlay::put`] records a write (or delete) made in an epoch;
//! - [`Overlay::get`] answers reads ahead of sled (the newest uncommitted write wins);
//! - [`Overlay::delta`] is an epoch's contribution to its checkpoint, per key group;
//! - [`Overlay::commit`] removes everything up to a committed epoch and returns what to apply
//!   to sled (the newest write per key), in key order;
//! - [`Overlay::clear`] drops everything uncommitted (recovery rolls back to the last commit).
//!
//! Not wired into the shards yet (see `OVERVIEW.md`).

use std::collections::{BTreeMap, BTreeSet};

use super::format::{Entry, KeyGroupSection};

/// Uncommitted state writes by key and epoch.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    /// key → epoch → value (`None` = deleted)
    entries: BTreeMap<Vec<u8>, BTreeMap<u64, Option<Vec<u8>>>>,
    /// epoch → keys written in it
    by_epoch: BTreeMap<u64, BTreeSet<Vec<u8>>>,
}

/// The key group of a local-store key (`'s' ‖ kg:u16be ‖ …`).
pub fn key_group_of(key: &[u8]) -> Option<u32> {
    (key.len() >= 3).then(|| u32::from(u16::from_be_bytes([key[1], key[2]])))
}

impl Overlay {
    /// Records a write (`Some`) or delete (`None`) of `key` in `epoch`.
    pub fn put(&mut self, epoch: u64, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.by_epoch.entry(epoch).or_default().insert(key.clone());
        self.entries.entry(key).or_default().insert(epoch, value);
    }

    /// The newest uncommitted write of `key`: `Some(Some(v))` written, `Some(None)` deleted,
    /// `None` not in the overlay (read sled).
    pub fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.entries
            .get(key)
            .and_then(|e| e.values().next_back())
            .map(|v| v.as_deref())
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What `epoch` wrote, as one delta section per key group.
    pub fn delta(&self, epoch: u64) -> BTreeMap<u32, KeyGroupSection> {
        let mut out: BTreeMap<u32, KeyGroupSection> = BTreeMap::new();
        for key in self.by_epoch.get(&epoch).into_iter().flatten() {
            let Some(kg) = key_group_of(key) else {
                continue;
            };
            let section = out.entry(kg).or_insert_with(|| KeyGroupSection {
                key_group: kg,
                ..Default::default()
            });
            match &self.entries[key][&epoch] {
                Some(v) => section.puts.push(Entry {
                    key: key.clone(),
                    value: v.clone(),
                }),
                None => section.deletes.push(key.clone()),
            }
        }
        out
    }

    /// Removes every write of epochs ≤ `epoch` and returns, per key, the newest of them, to
    /// apply to the local store in key order. Writes of later epochs stay.
    pub fn commit(&mut self, epoch: u64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let later = self.by_epoch.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.by_epoch, later);
        let keys: BTreeSet<Vec<u8>> = done.into_values().flatten().collect();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let versions = self.entries.get_mut(&key).expect("indexed keys are held");
            let newer = versions.split_off(&(epoch + 1));
            let committed = std::mem::replace(versions, newer);
            if versions.is_empty() {
                self.entries.remove(&key);
            }
            if let Some((_, v)) = committed.into_iter().next_back() {
                out.push((key, v));
            }
        }
        out
    }

    /// Drops every uncommitted write (recovery).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_epoch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kg: u16, name: &str) -> Vec<u8> {
        let mut k = vec![b's'];
        k.extend_from_slice(&kg.to_be_bytes());
        k.extend_from_slice(name.as_bytes());
        k
    }

    #[test]
    fn reads_newest_and_commits_in_order() {
        let mut o = Overlay::default();
        o.put(1, key(3, "a"), Some(b"1".to_vec()));
        o.put(2, key(3, "a"), Some(b"2".to_vec()));
        o.put(2, key(4, "b"), None);
        assert_eq!(o.get(&key(3, "a")), Some(Some(&b"2"[..])));
        assert_eq!(o.get(&key(4, "b")), Some(None));
        assert_eq!(o.get(&key(5, "c")), None);

        let d2 = o.delta(2);
        assert_eq!(d2.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(d2[&3].puts[0].value, b"2");
        assert_eq!(d2[&4].deletes, vec![key(4, "b")]);
        assert_eq!(
            o.delta(1)[&3].puts[0].value,
            b"1",
            "each epoch keeps its own write"
        );

        // Committing epoch 1 applies its write; epoch 2's stays uncommitted and wins reads.
        assert_eq!(o.commit(1), vec![(key(3, "a"), Some(b"1".to_vec()))]);
        assert_eq!(o.get(&key(3, "a")), Some(Some(&b"2"[..])));
        assert!(o.delta(1).is_empty());
        assert_eq!(
            o.commit(2),
            vec![(key(3, "a"), Some(b"2".to_vec())), (key(4, "b"), None)]
        );
        assert!(o.is_empty());
    }

    #[test]
    fn committing_several_epochs_keeps_the_newest_write_and_clear_rolls_back() {
        let mut o = Overlay::default();
        for e in 1..=5 {
            o.put(e, key(1, "n"), Some(e.to_string().into_bytes()));
        }
        assert_eq!(o.commit(3), vec![(key(1, "n"), Some(b"3".to_vec()))]);
        assert_eq!(o.len(), 1);
        o.clear();
        assert_eq!(o.get(&key(1, "n")), None);
        assert!(o.commit(9).is_empty());
    }
}
