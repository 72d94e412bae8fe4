//! Delayed messages of a shard: an in-memory schedule over durable records in sled.
//!
//! A delayed message belongs to the key group of its sender (tokens are scoped to the
//! sender). Scheduling and firing are written to sled with the shard's next flush, in the
//! same batch as the state changes of the invocation that scheduled them. Each is numbered
//! by a [`Seq`] (the epoch that scheduled it, then a number this shard had not given in it),
//! which no other delayed message of its key group gets, whoever owns it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use statemesh_sdk::{Address, DelayedMessage};

use crate::store::{Seq, Store, StoreError, StoredTimer, WriteBatch};

/// Where a delayed message is in the schedule: (due_ms, seq, key group).
type Slot = (u64, Seq, u32);

#[derive(Default)]
pub(crate) struct Timers {
    schedule: BTreeMap<Slot, StoredTimer>,
    tokens: HashMap<(Address, String), Slot>,
    /// The next `Seq::n` this shard gives.
    next_n: u64,
}

impl Timers {
    pub fn len(&self) -> usize {
        self.schedule.len()
    }

    /// When the earliest delayed message is due (ms since the Unix epoch), if there is one.
    pub fn next_due(&self) -> Option<u64> {
        self.schedule.first_key_value().map(|((due, _, _), _)| *due)
    }

    /// Loads the stored delayed messages of the given key groups.
    pub fn load(
        &mut self,
        store: &Store,
        kgs: impl Iterator<Item = u32>,
    ) -> Result<(), StoreError> {
        for kg in kgs {
            for (seq, t) in store.load_timers(kg)? {
                self.next_n = self.next_n.max(seq.n + 1);
                tracing::trace!(
                    kg,
                    ?seq,
                    id = super::msg_id(&t.message),
                    due = t.due_ms,
                    "delayed message loaded"
                );
                let slot = (t.due_ms, seq, kg);
                if let Some(tok) = &t.token {
                    self.tokens.insert((t.sender.clone(), tok.clone()), slot);
                }
                self.schedule.insert(slot, t);
            }
        }
        Ok(())
    }

    /// Schedules a delayed message from `sender` in epoch `epoch`; an error if its token is
    /// already live.
    pub fn schedule(
        &mut self,
        sender: &Address,
        kg: u32,
        epoch: u64,
        now_ms: u64,
        d: DelayedMessage,
        w: &mut WriteBatch,
    ) -> Result<(), String> {
        if let Some(tok) = &d.cancellation_token {
            if self.tokens.contains_key(&(sender.clone(), tok.clone())) {
                return Err(format!("cancellation token {tok:?} of {sender} is already used by a pending delayed message"));
            }
        }
        let seq = Seq {
            epoch,
            n: self.next_n,
        };
        self.next_n += 1;
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
        let slot = (due, seq, kg);
        if let Some(tok) = &t.token {
            self.tokens.insert((sender.clone(), tok.clone()), slot);
        }
        tracing::trace!(
            kg,
            ?seq,
            id = super::msg_id(&t.message),
            due,
            "delayed message scheduled"
        );
        w.put_timer(kg, seq, &t);
        self.schedule.insert(slot, t);
        Ok(())
    }

    /// Cancels `sender`'s delayed message with `token`; false if none is pending.
    pub fn cancel(&mut self, sender: &Address, token: &str, w: &mut WriteBatch) -> bool {
        match self.tokens.remove(&(sender.clone(), token.to_string())) {
            Some(slot @ (_, seq, kg)) => {
                if self.schedule.remove(&slot).is_some() {
                    tracing::trace!(kg, ?seq, "delayed message cancelled");
                    w.delete_timer(kg, seq);
                }
                true
            }
            None => false,
        }
    }

    /// Forgets the delayed messages of key groups `kgs` (they moved; sled keeps them).
    pub fn drop_key_groups(&mut self, kgs: &rustc_hash::FxHashSet<u32>) {
        self.schedule.retain(|(_, _, kg), _| !kgs.contains(kg));
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
            let last = Seq {
                epoch: u64::MAX,
                n: u64::MAX,
            };
            let due: Vec<Slot> = self
                .schedule
                .range(..=(now_ms, last, u32::MAX))
                .filter(|((_, _, kg), _)| !stopped.contains(kg))
                .map(|(k, _)| *k)
                .collect();
            for slot in due {
                let t = self.schedule.remove(&slot).expect("listed");
                out.push(self.fired(slot, t, w));
            }
            return out;
        }
        while let Some(entry) = self.schedule.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let (slot, t) = entry.remove_entry();
            out.push(self.fired(slot, t, w));
        }
        out
    }

    /// A delayed message taken from the schedule to fire: its token is free again, and its
    /// record is deleted in the same batch.
    fn fired(&mut self, (_, seq, kg): Slot, t: StoredTimer, w: &mut WriteBatch) -> StoredTimer {
        if let Some(tok) = &t.token {
            self.tokens.remove(&(t.sender.clone(), tok.clone()));
        }
        tracing::trace!(
            kg,
            ?seq,
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
        t.schedule(&me, 0, 1, 100, delayed(10, Some("x")), &mut w)
            .unwrap();
        assert!(
            t.schedule(&me, 0, 1, 100, delayed(10, Some("x")), &mut w)
                .is_err(),
            "duplicate live token"
        );
        t.schedule(&me, 0, 1, 100, delayed(20, None), &mut w)
            .unwrap();
        assert!(t.take_due(109, &mut w, None).is_empty());
        assert!(t.cancel(&me, "x", &mut w));
        assert!(!t.cancel(&me, "x", &mut w));
        assert_eq!(t.take_due(120, &mut w, None).len(), 1);
        assert_eq!(t.len(), 0);
        // The token is free again after cancellation.
        t.schedule(&me, 0, 1, 100, delayed(10, Some("x")), &mut w)
            .unwrap();
    }

    #[test]
    fn delayed_messages_of_two_key_groups_with_one_number_and_due_time_stay_apart() {
        // Two owners numbered a delayed message of key groups 1 and 2 alike, due at once (one
        // was numbered before numbers carried their epoch); this shard gains both.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16).unwrap();
        let seq = Seq { epoch: 0, n: 7 };
        let stored = |sender: &str, token: Option<&str>| StoredTimer {
            due_ms: 100,
            sender: Address::parse(sender).unwrap(),
            token: token.map(String::from),
            target: Address::parse("a/b/c").unwrap(),
            message: TypedValue::of(&sender.to_string()),
        };
        let mut w = WriteBatch::default();
        w.put_timer(1, seq, &stored("a/s/1", Some("x")));
        w.put_timer(2, seq, &stored("a/s/2", None));
        store.write(w).unwrap();
        let mut t = Timers::default();
        t.load(&store, [1, 2].into_iter()).unwrap();
        assert_eq!(t.len(), 2);
        // Cancelling the first deletes its record, not the other's.
        let mut w = WriteBatch::default();
        assert!(t.cancel(&Address::parse("a/s/1").unwrap(), "x", &mut w));
        store.write(w).unwrap();
        assert_eq!(store.load_timers(1).unwrap(), vec![]);
        assert_eq!(store.load_timers(2).unwrap().len(), 1);
        let mut w = WriteBatch::default();
        let fired = t.take_due(100, &mut w, None);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].sender.to_string(), "a/s/2");
        // The next one this shard schedules takes a number after those it loaded.
        let mut w = WriteBatch::default();
        t.schedule(
            &Address::parse("a/s/1").unwrap(),
            1,
            0,
            100,
            delayed(5, None),
            &mut w,
        )
        .unwrap();
        store.write(w).unwrap();
        assert_eq!(store.load_timers(1).unwrap()[0].0, Seq { epoch: 0, n: 8 });
    }
}
