//! The idempotency table (issue 4): a `Send` or `Call` retried with the same idempotency key
//! within a window is not applied again. A retried `Send` is acknowledged, a retried `Call`
//! gets the first call's reply (or waits for it while it is still in flight). The table is
//! part of each key group's checkpoint, so it survives recovery: [`IdempotencyTable::to_entries`]
//! and [`IdempotencyTable::from_entries`].
//!
//! Pure: time comes in as `now_ms`. Not wired into the node yet (see `OVERVIEW.md`).

use std::collections::{BTreeSet, HashMap};

use super::format::Entry;

/// What a key is known for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not seen within the window: apply the request (the key is now recorded in flight).
    New,
    /// Applied before and finished: answer with the recorded reply (`None` for a `Send`).
    Done(Option<Vec<u8>>),
    /// Applied before, not finished yet: wait for its result instead of applying again.
    InFlight,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    seen_ms: u64,
    /// `None` while in flight; `Some(reply)` once done.
    result: Option<Option<Vec<u8>>>,
}

/// Idempotency keys seen within a window.
#[derive(Debug, Clone)]
pub struct IdempotencyTable {
    window_ms: u64,
    records: HashMap<String, Record>,
    by_time: BTreeSet<(u64, String)>,
}

impl IdempotencyTable {
    /// A table remembering keys for `window_ms`.
    pub fn new(window_ms: u64) -> Self {
        IdempotencyTable {
            window_ms,
            records: HashMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Checks a request's key, recording it as in flight if it is new.
    pub fn check(&mut self, key: &str, now_ms: u64) -> Check {
        self.expire(now_ms);
        match self.records.get(key) {
            Some(Record {
                result: Some(r), ..
            }) => Check::Done(r.clone()),
            Some(Record { result: None, .. }) => Check::InFlight,
            None => {
                self.records.insert(
                    key.to_string(),
                    Record {
                        seen_ms: now_ms,
                        result: None,
                    },
                );
                self.by_time.insert((now_ms, key.to_string()));
                Check::New
            }
        }
    }

    /// Records the result of a request (`None` for a `Send`'s acknowledgement).
    pub fn complete(&mut self, key: &str, reply: Option<Vec<u8>>) {
        if let Some(r) = self.records.get_mut(key) {
            r.result = Some(reply);
        }
    }

    /// Forgets a request that failed before it was applied, so a retry applies it.
    pub fn forget(&mut self, key: &str) {
        if let Some(r) = self.records.remove(key) {
            self.by_time.remove(&(r.seen_ms, key.to_string()));
        }
    }

    /// Forgets keys older than the window.
    pub fn expire(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.window_ms);
        while let Some((t, k)) = self.by_time.first().cloned() {
            if t >= cutoff {
                break;
            }
            self.by_time.pop_first();
            self.records.remove(&k);
        }
    }

    /// The finished records, for a checkpoint section (in-flight ones are re-applied from the
    /// checkpoint's pending messages after recovery, which records them again).
    pub fn to_entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .records
            .iter()
            .filter_map(|(k, r)| {
                let reply = r.result.as_ref()?;
                let mut value = r.seen_ms.to_le_bytes().to_vec();
                if let Some(b) = reply {
                    value.push(1);
                    value.extend_from_slice(b);
                } else {
                    value.push(0);
                }
                Some(Entry {
                    key: k.as_bytes().to_vec(),
                    value,
                })
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Restores a table from checkpoint entries; malformed entries are skipped.
    pub fn from_entries(window_ms: u64, entries: &[Entry]) -> Self {
        let mut t = Self::new(window_ms);
        for e in entries {
            let (Ok(key), true) = (std::str::from_utf8(&e.key), e.value.len() >= 9) else {
                continue;
            };
            let seen_ms = u64::from_le_bytes(e.value[..8].try_into().expect("8 bytes"));
            let reply = (e.value[8] == 1).then(|| e.value[9..].to_vec());
            t.records.insert(
                key.to_string(),
                Record {
                    seen_ms,
                    result: Some(reply),
                },
            );
            t.by_time.insert((seen_ms, key.to_string()));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_within_the_window_are_not_applied_again() {
        let mut t = IdempotencyTable::new(1_000);
        assert_eq!(t.check("send-1", 0), Check::New);
        assert_eq!(t.check("send-1", 10), Check::InFlight);
        t.complete("send-1", None);
        assert_eq!(t.check("send-1", 20), Check::Done(None));
        assert_eq!(t.check("call-1", 30), Check::New);
        t.complete("call-1", Some(b"reply".to_vec()));
        assert_eq!(t.check("call-1", 40), Check::Done(Some(b"reply".to_vec())));
        // Past the window, a key is new again.
        assert_eq!(t.check("send-1", 1_001), Check::New);
        assert_eq!(t.len(), 2, "call-1 (seen at 30) is still within the window");
    }

    #[test]
    fn failures_are_forgotten_and_finished_records_survive_a_checkpoint() {
        let mut t = IdempotencyTable::new(1_000);
        t.check("a", 5);
        t.complete("a", Some(vec![1, 2]));
        t.check("b", 6);
        t.complete("b", None);
        t.check("c", 7);
        t.check("d", 8);
        t.forget("d");
        assert_eq!(t.check("d", 9), Check::New);
        let entries = t.to_entries();
        assert_eq!(
            entries.iter().map(|e| e.key.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()],
            "in-flight keys are not checkpointed"
        );
        let mut r = IdempotencyTable::from_entries(1_000, &entries);
        assert_eq!(r.check("a", 10), Check::Done(Some(vec![1, 2])));
        assert_eq!(r.check("b", 10), Check::Done(None));
        assert_eq!(r.check("c", 10), Check::New);
        r.expire(2_000);
        assert!(r.check("a", 2_000) == Check::New);
    }
}
