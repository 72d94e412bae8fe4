//! Idempotency records (issue 4): a `Send` or `Call` retried with the same idempotency key
//! within a window is not applied again. A retried `Send` is acknowledged; a retried `Call`
//! gets the first call's reply, or waits for it while it is still being computed.
//!
//! A record belongs to the key group of the request's target and lives in the shard that owns
//! it. It is written into the epoch in which the shard accepted the request (and again when a
//! call's reply arrives), as a local-store entry `'i' ‖ kg ‖ scope`, so it is committed
//! atomically with the message it guards and survives recovery with it.
//!
//! Pure: time comes in as `now_ms`.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use statemesh_sdk::TypedValue;

/// What a request with a key turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A `Send`: accepted.
    Sent,
    /// A `Call` whose reply has not arrived yet.
    CallPending,
    /// A `Call` that was answered.
    Replied(TypedValue),
    /// A `Call` that failed for good (its message was dead-lettered).
    Failed(String),
}

/// One record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// When the key was first seen, ms since the Unix epoch.
    pub seen_ms: u64,
    /// What it did.
    pub outcome: Outcome,
}

impl Record {
    /// The stored form: `seen_ms:u64le ‖ tag:u8 ‖ …`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.seen_ms.to_le_bytes().to_vec();
        match &self.outcome {
            Outcome::Sent => v.push(0),
            Outcome::CallPending => v.push(1),
            Outcome::Replied(t) => {
                v.push(2);
                let tn = t.typename().as_bytes();
                v.extend_from_slice(&(tn.len() as u32).to_le_bytes());
                v.extend_from_slice(tn);
                v.push(u8::from(t.has_value()));
                v.extend_from_slice(t.value());
            }
            Outcome::Failed(e) => {
                v.push(3);
                v.extend_from_slice(e.as_bytes());
            }
        }
        v
    }

    /// Decodes the stored form.
    pub fn decode(raw: &[u8]) -> Result<Record, String> {
        if raw.len() < 9 {
            return Err(format!(
                "idempotency record: expected ≥ 9 bytes, found {}",
                raw.len()
            ));
        }
        let seen_ms = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let rest = &raw[9..];
        let outcome = match raw[8] {
            0 => Outcome::Sent,
            1 => Outcome::CallPending,
            2 => {
                if rest.len() < 4 {
                    return Err("idempotency record: reply typename length missing".into());
                }
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                if rest.len() < 5 + n {
                    return Err("idempotency record: reply runs past the end".into());
                }
                let tn = std::str::from_utf8(&rest[4..4 + n]).map_err(|e| e.to_string())?;
                let has_value = rest[4 + n] != 0;
                let value = bytes::Bytes::copy_from_slice(&rest[5 + n..]);
                Outcome::Replied(if has_value {
                    TypedValue::new(tn.to_string(), value)
                } else {
                    TypedValue::empty(tn.to_string())
                })
            }
            3 => Outcome::Failed(String::from_utf8_lossy(rest).to_string()),
            t => return Err(format!("idempotency record: unknown tag {t}")),
        };
        Ok(Record { seen_ms, outcome })
    }
}

/// The records of one shard, by scope (`target address ‖ 0x1F ‖ key`).
#[derive(Debug, Default)]
pub struct IdempotencyTable {
    records: FxHashMap<String, Record>,
    /// (seen_ms, key group, scope) in the order keys were first seen.
    by_time: VecDeque<(u64, u32, String)>,
}

/// The scope of a key: keys are per target address.
pub fn scope(target: &str, key: &str) -> String {
    format!("{target}\u{1f}{key}")
}

impl IdempotencyTable {
    /// Records remembered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record is remembered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The record of a scope, if any.
    pub fn get(&self, scope: &str) -> Option<&Record> {
        self.records.get(scope)
    }

    /// Inserts or replaces a record.
    pub fn put(&mut self, kg: u32, scope: &str, record: Record) {
        if !self.records.contains_key(scope) {
            self.by_time
                .push_back((record.seen_ms, kg, scope.to_string()));
        }
        self.records.insert(scope.to_string(), record);
    }

    /// Forgets records first seen more than `window_ms` ago; returns their (key group, scope)
    /// so the caller deletes them from the store too.
    pub fn expire(&mut self, now_ms: u64, window_ms: u64) -> Vec<(u32, String)> {
        let cutoff = now_ms.saturating_sub(window_ms);
        let mut gone = Vec::new();
        while let Some((t, _, _)) = self.by_time.front() {
            if *t >= cutoff {
                break;
            }
            let (_, kg, scope) = self.by_time.pop_front().expect("non-empty");
            self.records.remove(&scope);
            gone.push((kg, scope));
        }
        gone
    }

    /// Forgets the records of key groups `kgs` (they moved; sled keeps them).
    pub fn drop_key_groups(&mut self, kgs: &rustc_hash::FxHashSet<u32>) {
        let records = &mut self.records;
        self.by_time.retain(|(_, kg, scope)| {
            let keep = !kgs.contains(kg);
            if !keep {
                records.remove(scope);
            }
            keep
        });
    }

    /// Restores records from the store: at start, or those of key groups that moved in, which
    /// can be older than records already here. They take their place by `seen_ms`, so they
    /// expire on time and older ones do not wait behind them.
    pub fn load(&mut self, records: Vec<(u32, String, Record)>) {
        if records.is_empty() {
            return;
        }
        for (kg, scope, r) in records {
            self.put(kg, &scope, r);
        }
        // Stable: records seen in the same millisecond keep their order.
        self.by_time.make_contiguous().sort_by_key(|(t, _, _)| *t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for outcome in [
            Outcome::Sent,
            Outcome::CallPending,
            Outcome::Replied(TypedValue::new("a/b", b"xyz".to_vec())),
            Outcome::Replied(TypedValue::empty("a/b")),
            Outcome::Failed("boom".into()),
        ] {
            let r = Record {
                seen_ms: 42,
                outcome,
            };
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
        assert!(Record::decode(b"short").unwrap_err().contains("≥ 9 bytes"));
        let mut bad = Record {
            seen_ms: 1,
            outcome: Outcome::Sent,
        }
        .encode();
        bad[8] = 9;
        assert!(Record::decode(&bad).unwrap_err().contains("unknown tag 9"));
    }

    /// A `Send`'s record first seen at `ms`.
    fn rec(ms: u64) -> Record {
        Record {
            seen_ms: ms,
            outcome: Outcome::Sent,
        }
    }

    #[test]
    fn records_expire_after_the_window_in_order() {
        let mut t = IdempotencyTable::default();
        t.put(1, "a", rec(100));
        t.put(2, "b", rec(200));
        // Replacing a record (a call's reply arrived) keeps its place.
        t.put(1, "a", rec(100));
        assert_eq!(t.len(), 2);
        assert!(t.expire(150, 100).is_empty());
        assert_eq!(t.expire(250, 100), vec![(1, "a".to_string())]);
        assert!(t.get("a").is_none());
        assert!(t.get("b").is_some());
        assert_eq!(t.expire(1000, 100), vec![(2, "b".to_string())]);
        assert!(t.is_empty());
    }

    /// Records of key groups that move in are older than some already here: they expire on
    /// time, not after the newer ones.
    #[test]
    fn records_moved_in_expire_in_order_with_those_already_here() {
        let mut t = IdempotencyTable::default();
        t.load(vec![(1, "c".into(), rec(300)), (1, "a".into(), rec(100))]);
        t.put(1, "e", rec(500));
        t.load(vec![(7, "d".into(), rec(400)), (7, "b".into(), rec(200))]);
        assert_eq!(
            t.expire(350, 100),
            vec![(1, "a".to_string()), (7, "b".to_string())]
        );
        assert_eq!(
            t.expire(550, 100),
            vec![(1, "c".to_string()), (7, "d".to_string())]
        );
        assert_eq!(t.len(), 1);
        assert!(t.get("e").is_some());
    }
}
