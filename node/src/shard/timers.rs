//! Delayed messages of a shard: an in-memory schedule over durable records in sled.
//!
//! A delayed message belongs to the key group of its sender (tokens are scoped to the
//! sender). Scheduling and firing are written to sled with the shard's next flush, in the
//! same batch as the state changes of the invocation that scheduled them.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use statemesh_sdk::{Address, DelayedMessage};

use crate::store::{Store, StoreError, StoredTimer, WriteBatch};

#[derive(Default)]
pub(crate) struct Timers {
    /// (due_ms, seq) → (key group, timer)
    schedule: BTreeMap<(u64, u64), (u32, StoredTimer)>,
    tokens: HashMap<(Address, String), (u64, u64)>,
    next_seq: u64,
}

impl Timers {
    pub fn len(&self) -> usize {
        self.schedule.len()
    }

    /// Loads the stored delayed messages of the given key groups.
    pub fn load(
        &mut self,
        store: &Store,
        kgs: impl Iterator<Item = u32>,
    ) -> Result<(), StoreError> {
        for kg in kgs {
            for (seq, t) in store.load_timers(kg)? {
                self.next_seq = self.next_seq.max(seq + 1);
                tracing::trace!(
                    kg,
                    seq,
                    id = super::msg_id(&t.message),
                    due = t.due_ms,
                    "delayed message loaded"
                );
                if let Some(tok) = &t.token {
                    self.tokens
                        .insert((t.sender.clone(), tok.clone()), (t.due_ms, seq));
                }
                self.schedule.insert((t.due_ms, seq), (kg, t));
            }
        }
        Ok(())
    }

    /// Schedules a delayed message from `sender`; an error if its token is already live.
    pub fn schedule(
        &mut self,
        sender: &Address,
        kg: u32,
        now_ms: u64,
        d: DelayedMessage,
        w: &mut WriteBatch,
    ) -> Result<(), String> {
        if let Some(tok) = &d.cancellation_token {
            if self.tokens.contains_key(&(sender.clone(), tok.clone())) {
                return Err(format!("cancellation token {tok:?} of {sender} is already used by a pending delayed message"));
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let due = now_ms
            + d.delay
                .min(Duration::from_secs(100 * 365 * 86_400))
                .as_millis() as u64;
        let t = StoredTimer {
            due_ms: due,
            sender: sender.clone(),
            token: d.cancellation_token,
            target: d.target,
            message: d.message,
        };
        if let Some(tok) = &t.token {
            self.tokens
                .insert((sender.clone(), tok.clone()), (due, seq));
        }
        tracing::trace!(
            kg,
            seq,
            id = super::msg_id(&t.message),
            due,
            "delayed message scheduled"
        );
        w.put_timer(kg, seq, &t);
        self.schedule.insert((due, seq), (kg, t));
        Ok(())
    }

    /// Cancels `sender`'s delayed message with `token`; false if none is pending.
    pub fn cancel(&mut self, sender: &Address, token: &str, w: &mut WriteBatch) -> bool {
        match self.tokens.remove(&(sender.clone(), token.to_string())) {
            Some(key) => {
                if let Some((kg, _)) = self.schedule.remove(&key) {
                    tracing::trace!(kg, seq = key.1, "delayed message cancelled");
                    w.delete_timer(kg, key.1);
                }
                true
            }
            None => false,
        }
    }

    /// Forgets the delayed messages of key groups `kgs` (they moved; sled keeps them).
    pub fn drop_key_groups(&mut self, kgs: &rustc_hash::FxHashSet<u32>) {
        self.schedule.retain(|_, (kg, _)| !kgs.contains(kg));
        let schedule = &self.schedule;
        self.tokens.retain(|_, k| schedule.contains_key(k));
    }

    /// Removes and returns the messages due at `now_ms` (except those of key groups in
    /// `stopped`: they fire at their owner after a move).
    pub fn take_due(
        &mut self,
        now_ms: u64,
        w: &mut WriteBatch,
        stopped: Option<&rustc_hash::FxHashSet<u32>>,
    ) -> Vec<StoredTimer> {
        let mut out = Vec::new();
        if let Some(stopped) = stopped {
            let due: Vec<(u64, u64)> = self
                .schedule
                .range(..=(now_ms, u64::MAX))
                .filter(|(_, (kg, _))| !stopped.contains(kg))
                .map(|(k, _)| *k)
                .collect();
            for key in due {
                let (kg, t) = self.schedule.remove(&key).expect("listed");
                out.push(self.fired(kg, key.1, t, w));
            }
            return out;
        }
        while let Some(entry) = self.schedule.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, seq), (kg, t)) = entry.remove_entry();
            out.push(self.fired(kg, seq, t, w));
        }
        out
    }

    /// A delayed message taken from the schedule to fire: its token is free again, and its
    /// record is deleted in the same batch.
    fn fired(&mut self, kg: u32, seq: u64, t: StoredTimer, w: &mut WriteBatch) -> StoredTimer {
        if let Some(tok) = &t.token {
            self.tokens.remove(&(t.sender.clone(), tok.clone()));
        }
        tracing::trace!(
            kg,
            seq,
            id = super::msg_id(&t.message),
            "delayed message due"
        );
        w.delete_timer(kg, seq);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statemesh_sdk::TypedValue;

    fn delayed(ms: u64, token: Option<&str>) -> DelayedMessage {
        DelayedMessage {
            delay: Duration::from_millis(ms),
            target: Address::parse("a/b/c").unwrap(),
            message: TypedValue::of(&1i64),
            cancellation_token: token.map(String::from),
        }
    }

    #[test]
    fn schedule_cancel_fire() {
        let me = Address::parse("a/s/1").unwrap();
        let mut t = Timers::default();
        let mut w = WriteBatch::default();
        t.schedule(&me, 0, 100, delayed(10, Some("x")), &mut w)
            .unwrap();
        assert!(
            t.schedule(&me, 0, 100, delayed(10, Some("x")), &mut w)
                .is_err(),
            "duplicate live token"
        );
        t.schedule(&me, 0, 100, delayed(20, None), &mut w).unwrap();
        assert!(t.take_due(109, &mut w, None).is_empty());
        assert!(t.cancel(&me, "x", &mut w));
        assert!(!t.cancel(&me, "x", &mut w));
        assert_eq!(t.take_due(120, &mut w, None).len(), 1);
        assert_eq!(t.len(), 0);
        // The token is free again after cancellation.
        t.schedule(&me, 0, 100, delayed(10, Some("x")), &mut w)
            .unwrap();
    }
}
