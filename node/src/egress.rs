//! Egress topics: records functions send out of the mesh, read by gRPC `Subscribe` and
//! `GET /v1/egress/{topic}`.
//!
//! A topic is a bounded queue: each record goes to exactly one reader (an HTTP GET pops
//! one; a subscriber pops them as they come). Beyond `egress_topic_capacity` unread records
//! the oldest is dropped, logged and counted (`statemesh_egress_dropped_total`), so an
//! unread topic cannot grow memory without bound.
//!
//! With checkpoints on, a record is published only once the epoch that produced it commits,
//! and it is durable until read: it is a local-store entry (`'e' ‖ kg ‖ epoch ‖ n`) written in
//! that epoch, reloaded after a restart, and deleted in the epoch after it is read or dropped.
//! Its key gives readers its id (`"<key group>-<epoch>-<n>"`, [`Read::id`]): the same wherever
//! and whenever the record is read, and never another record's, so that a reader that may see
//! a record twice (a sink that writes on before the read commits) can drop the second.
//! A read is answered only once the epoch deleting its record commits ([`Popped::settled`]),
//! so a record a reader got is never read again — not after a crash, a rollback or a move of
//! its key group — and a read that fails or is refused leaves its record unread: the record
//! goes to the node that owns its key group then. A reader that leaves before its read's
//! epoch is built gives its record back (first in the queue); one that leaves later, while
//! that epoch commits, loses it like a reply lost on the wire
//! (`statemesh_egress_unclaimed_total`).
//!
//! With `egress_reads = "at-least-once"` a read is answered at once and its record deleted by
//! the next epoch, which the read does not hasten: a read costs no commit. A crash, or an
//! abandoned epoch, before that epoch commits makes the record readable again under the same
//! id, which the reader uses to drop it. Nothing is lost in either mode.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use statemesh_sdk::TypedValue;
use tokio::sync::{oneshot, Notify};

use crate::metrics::Metrics;

/// A record and, if it is durable, its local-store key.
type Record = (TypedValue, Option<Vec<u8>>);

/// A change of a durable record for the next epoch: its key and new stored form (`None`:
/// deleted, it was read; `Some`: rewritten with its Kafka placement).
pub(crate) type RecordOp = (Vec<u8>, Option<Vec<u8>>);

struct Topic {
    queue: Mutex<VecDeque<Record>>,
    notify: Notify,
}

/// A read whose record is durable: the record, its topic, and the reader waiting for the
/// epoch deleting it to commit (`true`) or for its key group to leave this node (`false`).
struct Waiter {
    topic: String,
    value: TypedValue,
    tx: oneshot::Sender<bool>,
}

/// A popped record, answered to its reader once [`Popped::settled`] says so.
pub struct Popped {
    value: TypedValue,
    id: Option<String>,
    settle: Option<oneshot::Receiver<bool>>,
}

/// A record read from a topic.
#[derive(Clone, Debug, PartialEq)]
pub struct Read {
    /// The record.
    pub value: TypedValue,
    /// Its id if it is durable (checkpoints on): `"<key group>-<epoch>-<n>"`, the same at
    /// every read of the record, never another record's.
    pub id: Option<String>,
}

impl Popped {
    /// Whether the read waits for a commit (the record is durable).
    pub fn waits(&self) -> bool {
        self.settle.is_some()
    }

    /// The record once its removal is committed (at once if it is not durable); `None` if it
    /// was not removed here after all (its key group moved to another node, which has it, or
    /// this node stopped first): nothing was read.
    pub async fn settled(self) -> Option<Read> {
        let read = Read {
            value: self.value,
            id: self.id,
        };
        match self.settle {
            None => Some(read),
            Some(rx) => matches!(rx.await, Ok(true)).then_some(read),
        }
    }
}

/// All egress topics of a node. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    topics: Arc<Mutex<HashMap<String, Arc<Topic>>>>,
    capacity: usize,
    metrics: Metrics,
    /// Durable records read or dropped (deleted) or placed (rewritten) since the last epoch
    /// was built.
    consumed: Arc<Mutex<Vec<RecordOp>>>,
    /// Reads of durable records whose removal has not committed yet, by record key.
    waiting: Arc<Mutex<HashMap<Vec<u8>, Waiter>>>,
    /// The next `Seq::n` of a durable record (numbers are unique per epoch and process).
    next_n: Arc<AtomicU64>,
    /// Key groups are about to move: no record is read until they have (every record read
    /// before is deleted by a committed epoch, so the new owners load exactly the unread).
    paused: Arc<std::sync::atomic::AtomicBool>,
    /// Topics drained by a sink (a Kafka egress): never dropped at capacity (a sink that
    /// cannot deliver keeps its records until it can).
    sinks: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Durable records a sink took and is delivering, by key: deleted once delivered
    /// ([`Egress::delivered`]), queued again if not ([`Egress::give_back`]).
    taken: Arc<Mutex<std::collections::HashSet<Vec<u8>>>>,
    /// Placements being committed ([`Egress::place`]), by record key.
    placing: Arc<Mutex<HashMap<Vec<u8>, oneshot::Sender<bool>>>>,
    /// Records that may have been produced already under this placement (restored with one,
    /// or their produce failed): an exactly-once sink looks for them before producing again.
    suspects: Arc<Mutex<HashMap<Vec<u8>, crate::store::Placement>>>,
    /// Reads of durable records are answered at once (`egress_reads = "at-least-once"`).
    at_least_once: bool,
}

impl Egress {
    /// Topics holding at most `capacity` unread records each.
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Egress {
            topics: Arc::default(),
            capacity: capacity.max(1),
            metrics,
            consumed: Arc::default(),
            waiting: Arc::default(),
            next_n: Arc::new(AtomicU64::new(1)),
            paused: Arc::default(),
            sinks: Arc::default(),
            taken: Arc::default(),
            placing: Arc::default(),
            suspects: Arc::default(),
            at_least_once: false,
        }
    }

    /// Reads of durable records are answered at once, before the epoch deleting them commits
    /// (`egress_reads = "at-least-once"`).
    pub fn with_reads(mut self, reads: crate::config::EgressReads) -> Self {
        self.at_least_once = reads == crate::config::EgressReads::AtLeastOnce;
        self
    }

    /// The node's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether a sink (a Kafka egress) drains `topic`.
    pub(crate) fn is_sink(&self, topic: &str) -> bool {
        self.sinks.lock().contains(topic)
    }

    /// Marks `topic` as drained by a sink: it is never cut at capacity.
    pub(crate) fn add_sink(&self, topic: &str) {
        self.sinks.lock().insert(topic.to_string());
    }

    /// Takes up to `max` records of a sink's topic to deliver (none while key groups move).
    /// Each durable one stays stored until [`Egress::delivered`] says it left.
    pub(crate) fn take(&self, topic: &str, max: usize) -> Vec<(TypedValue, Option<Vec<u8>>)> {
        if self.paused.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let Some(t) = self.topics.lock().get(topic).cloned() else {
            return Vec::new();
        };
        let out: Vec<Record> = {
            let mut q = t.queue.lock();
            let n = q.len().min(max);
            q.drain(..n).collect()
        };
        let mut taken = self.taken.lock();
        for (_, k) in &out {
            if let Some(k) = k {
                taken.insert(k.clone());
            }
        }
        out
    }

    /// Records a sink delivered: deleted by the next epoch. Keys of key groups that moved away
    /// meanwhile are skipped (their new owner has them and delivers them too).
    pub(crate) fn delivered(&self, keys: impl IntoIterator<Item = Vec<u8>>) {
        let mut taken = self.taken.lock();
        let mut consumed = self.consumed.lock();
        for k in keys {
            if taken.remove(&k) {
                consumed.push((k, None));
            }
        }
    }

    /// Rewrites the stored record `key` (taken by a sink) as `raw` (the record with its
    /// placement) in the next epoch. The answer is `true` once that epoch committed, `false`
    /// if the record's key group left this node first (its new owner has the record).
    pub(crate) fn place(&self, key: Vec<u8>, raw: Vec<u8>) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        if !self.taken.lock().contains(&key) {
            let _ = tx.send(false);
            return rx;
        }
        // Registered before the rewrite can be taken into an epoch.
        self.placing.lock().insert(key.clone(), tx);
        self.consumed.lock().push((key, Some(raw)));
        rx
    }

    /// Turns the record `key`, taken by a sink that cannot deliver it, into `value` on `topic`
    /// (a dead letter): rewritten in place by the next epoch, so it keeps its id and is never
    /// lost, and queued on `topic` at once (its read waits for the rewrite's epoch like any
    /// read). `false` if the sink no longer holds it (its key group moved).
    pub(crate) fn redirect(&self, key: &[u8], topic: &str, value: TypedValue) -> bool {
        if !self.taken.lock().remove(key) {
            return false;
        }
        self.suspects.lock().remove(key);
        self.consumed.lock().push((
            key.to_vec(),
            Some(crate::store::encode_egress(topic, &value)),
        ));
        self.publish_durable(topic, value, Some(key.to_vec()));
        true
    }

    /// The placement under which the record `key` may have been produced already, if any.
    pub(crate) fn suspect(&self, key: &[u8]) -> Option<crate::store::Placement> {
        self.suspects.lock().get(key).copied()
    }

    /// Marks the record `key` as possibly produced under `placement`.
    pub(crate) fn set_suspect(&self, key: &[u8], placement: crate::store::Placement) {
        self.suspects.lock().insert(key.to_vec(), placement);
    }

    /// The record `key` was looked for under `placement`: no longer a suspect of it (a newer
    /// placement, restored meanwhile, stays).
    pub(crate) fn clear_suspect(&self, key: &[u8], placement: &crate::store::Placement) {
        let mut s = self.suspects.lock();
        if s.get(key) == Some(placement) {
            s.remove(key);
        }
    }

    /// Records a sink could not deliver, first in its topic again (in their order).
    pub(crate) fn give_back(&self, topic: &str, records: Vec<(TypedValue, Option<Vec<u8>>)>) {
        let t = self.topic(topic);
        let mut taken = self.taken.lock();
        let mut q = t.queue.lock();
        for (v, k) in records.into_iter().rev() {
            match k {
                Some(k) if !taken.remove(&k) => {} // its key group moved away
                k => q.push_front((v, k)),
            }
        }
        if !q.is_empty() {
            t.notify.notify_one();
        }
    }

    /// Waits until `topic` may have records.
    pub(crate) async fn wait(&self, topic: &str) {
        let t = self.topic(topic);
        let notified = t.notify.notified();
        if !t.queue.lock().is_empty() && !self.paused.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }

    /// The key of the next durable record of key group `kg`, written in epoch `epoch`.
    pub(crate) fn next_key(&self, kg: u32, epoch: u64) -> Vec<u8> {
        let n = self.next_n.fetch_add(1, Ordering::Relaxed);
        crate::store::egress_key(kg, crate::store::Seq { epoch, n })
    }

    /// Restores durable records (in production order) after a restart.
    pub(crate) fn restore(&self, records: Vec<crate::store::StoredEgress>) {
        for (seq, key, topic, value, placement) in records {
            self.next_n.fetch_max(seq.n + 1, Ordering::Relaxed);
            if let Some(p) = placement {
                self.suspects.lock().insert(key.clone(), p);
            }
            self.publish_durable(&topic, value, Some(key));
        }
    }

    /// Restores the durable records of key groups `kgs` that sled holds but this node has
    /// neither queued nor read (`also_read`: keys read in epochs not committed yet), in
    /// production order: the records of epochs read back from blob storage in place of the
    /// node's own (it had not released them), or of key groups it gained.
    pub(crate) fn restore_missing(
        &self,
        records: Vec<crate::store::StoredEgress>,
        kgs: &std::collections::BTreeSet<u32>,
        also_read: &std::collections::HashSet<Vec<u8>>,
    ) {
        let mut known: std::collections::HashSet<Vec<u8>> = also_read.clone();
        known.extend(self.consumed.lock().iter().map(|(k, _)| k.clone()));
        known.extend(self.taken.lock().iter().cloned());
        known.extend(self.waiting.lock().keys().cloned());
        for t in self.topics.lock().values() {
            known.extend(t.queue.lock().iter().filter_map(|(_, k)| k.clone()));
        }
        self.restore(
            records
                .into_iter()
                .filter(|r| {
                    crate::store::egress_key_group(&r.1).is_some_and(|kg| kgs.contains(&kg))
                        && !known.contains(&r.1)
                })
                .collect(),
        );
    }

    /// Drops the unread records of key groups this node no longer serves (their new owner
    /// restores them from the state it loads), and the reads of their records not committed
    /// yet: those readers get nothing (the new owner has the records).
    pub(crate) fn drop_key_groups(&self, kgs: &std::collections::BTreeSet<u32>) {
        let kept = |k: &[u8]| crate::store::egress_key_group(k).is_none_or(|kg| !kgs.contains(&kg));
        for t in self.topics.lock().values() {
            t.queue
                .lock()
                .retain(|(_, k)| k.as_deref().is_none_or(kept));
        }
        self.consumed.lock().retain(|(k, _)| kept(k));
        self.taken.lock().retain(|k| kept(k));
        self.suspects.lock().retain(|k, _| kept(k));
        {
            let mut placing = self.placing.lock();
            let gone: Vec<Vec<u8>> = placing.keys().filter(|k| !kept(k)).cloned().collect();
            for k in gone {
                if let Some(tx) = placing.remove(&k) {
                    let _ = tx.send(false);
                }
            }
        }
        let mut waiting = self.waiting.lock();
        let gone: Vec<Vec<u8>> = waiting.keys().filter(|k| !kept(k)).cloned().collect();
        for k in gone {
            if let Some(w) = waiting.remove(&k) {
                let _ = w.tx.send(false);
            }
        }
    }

    /// Durable records read or dropped (to delete) or placed (to rewrite) since the last
    /// call. A record whose reader has left gives its read back: it is first in its topic
    /// again.
    pub(crate) fn take_consumed(&self) -> Vec<RecordOp> {
        let mut keys = std::mem::take(&mut *self.consumed.lock());
        let mut back = Vec::new();
        {
            let mut waiting = self.waiting.lock();
            keys.retain(|(k, v)| match waiting.get(k) {
                Some(w) if v.is_none() && w.tx.is_closed() => {
                    let w = waiting.remove(k).expect("present");
                    back.push((w.topic, w.value, k.clone()));
                    false
                }
                _ => true,
            });
        }
        for (topic, value, key) in back.into_iter().rev() {
            let t = self.topic(&topic);
            t.queue.lock().push_front((value, Some(key)));
            t.notify.notify_one();
        }
        keys
    }

    /// The epochs deleting (or placing) these records committed: their readers get them (their
    /// sinks produce them).
    pub(crate) fn released(&self, ops: &[RecordOp]) {
        let mut waiting = self.waiting.lock();
        for (k, v) in ops {
            if v.is_some() {
                if let Some(tx) = self.placing.lock().remove(k) {
                    let _ = tx.send(true);
                }
                continue;
            }
            if let Some(w) = waiting.remove(k) {
                if w.tx.send(true).is_err() {
                    self.metrics.egress_unclaimed.inc();
                    tracing::warn!(
                        topic = w.topic,
                        "an egress record's reader left while its read was committed: the record is consumed unanswered"
                    );
                }
            }
        }
    }

    /// Gives back changes taken for an epoch that was abandoned (rollback): the next epoch
    /// makes them.
    pub(crate) fn return_consumed(&self, mut keys: Vec<RecordOp>) {
        if !keys.is_empty() {
            // Before the changes made since (changes of one record stay in order).
            let mut c = self.consumed.lock();
            keys.append(&mut c);
            *c = keys;
        }
    }

    /// Whether a sink holds the record `key` (taken and not delivered, given back or moved).
    pub(crate) fn is_taken(&self, key: &[u8]) -> bool {
        self.taken.lock().contains(key)
    }

    fn consumed(&self, key: Option<Vec<u8>>) {
        if let Some(k) = key {
            self.consumed.lock().push((k, None));
        }
    }

    /// A read of `value` (from `topic`, stored under `key` if durable): it waits for the
    /// epoch deleting the record to commit (with at-least-once reads, only the deletion does).
    fn read(&self, topic: &str, value: TypedValue, key: Option<Vec<u8>>) -> Popped {
        let Some(key) = key else {
            return Popped {
                value,
                id: None,
                settle: None,
            };
        };
        // An exactly-once reader waits, registered before the key can be taken into an epoch.
        let settle = (!self.at_least_once).then(|| {
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().insert(
                key.clone(),
                Waiter {
                    topic: topic.to_string(),
                    value: value.clone(),
                    tx,
                },
            );
            rx
        });
        let id = crate::store::egress_record_id(&key);
        self.consumed.lock().push((key, None));
        Popped { value, id, settle }
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.topics.lock();
        if let Some(t) = topics.get(name) {
            return t.clone();
        }
        let t = Arc::new(Topic {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
        });
        topics.insert(name.to_string(), t.clone());
        t
    }

    /// Appends a record that is not durable.
    #[cfg(test)]
    pub fn publish(&self, topic: &str, value: TypedValue) {
        self.publish_durable(topic, value, None)
    }

    /// Appends a record stored under `key` until it is read.
    pub(crate) fn publish_durable(&self, topic: &str, value: TypedValue, key: Option<Vec<u8>>) {
        let t = self.topic(topic);
        {
            let mut q = t.queue.lock();
            if q.len() >= self.capacity && !self.sinks.lock().contains(topic) {
                let dropped = q.pop_front().and_then(|r| r.1);
                self.consumed(dropped);
                self.metrics.egress_dropped.inc();
                tracing::warn!(
                    topic,
                    capacity = self.capacity,
                    "egress topic full: dropped its oldest unread record"
                );
            }
            q.push_back((value, key));
        }
        self.metrics.egress_records.inc();
        t.notify.notify_one();
    }

    /// Stops reads (key groups are about to move) or lets them go on.
    pub(crate) fn pause(&self, on: bool) {
        let was = self.paused.swap(on, Ordering::SeqCst);
        if was && !on {
            for t in self.topics.lock().values() {
                t.notify.notify_one();
            }
        }
    }

    /// Pops the next record, if any.
    pub fn pop(&self, topic: &str) -> Option<Popped> {
        // A Kafka egress's records are its producer's alone.
        if self.paused.load(Ordering::SeqCst) || self.sinks.lock().contains(topic) {
            return None;
        }
        let t = self.topics.lock().get(topic).cloned()?;
        let v = t.queue.lock().pop_front();
        let (v, key) = v?;
        Some(self.read(topic, v, key))
    }

    /// The unread records of `topic`, oldest first, at most `limit` (not consumed).
    pub fn peek(&self, topic: &str, limit: usize) -> Vec<Read> {
        let Some(t) = self.topics.lock().get(topic).cloned() else {
            return Vec::new();
        };
        let q = t.queue.lock();
        q.iter()
            .take(limit)
            .map(|(v, k)| Read {
                value: v.clone(),
                id: k.as_deref().and_then(crate::store::egress_record_id),
            })
            .collect()
    }

    /// The unread record of `topic` whose id is `id`, if any (not consumed).
    pub fn find_by_id(&self, topic: &str, id: &str) -> Option<Read> {
        let t = self.topics.lock().get(topic).cloned()?;
        let q = t.queue.lock();
        let at = position_of(&q, id)?;
        Some(Read {
            value: q[at].0.clone(),
            id: Some(id.to_string()),
        })
    }

    /// The unread record of `topic` whose id is `id`, taken out of the queue, and its key.
    fn take_by_id(&self, topic: &str, id: &str) -> Result<(TypedValue, Vec<u8>), String> {
        if self.paused.load(Ordering::SeqCst) {
            return Err("key groups are moving".into());
        }
        let t = self
            .topics
            .lock()
            .get(topic)
            .cloned()
            .ok_or_else(|| format!("no unread record {id} in {topic} on this node"))?;
        let mut q = t.queue.lock();
        let at = position_of(&q, id).ok_or_else(|| {
                format!("no unread record {id} in {topic} on this node (read, replayed, or moved with its key group: list again)")
            })?;
        let (v, k) = q.remove(at).expect("found");
        Ok((v, k.expect("found by its key")))
    }

    /// Reads the record `id` of `topic` (not necessarily the oldest): answered once the epoch
    /// deleting it commits, like [`Egress::pop`].
    pub(crate) fn pop_by_id(&self, topic: &str, id: &str) -> Result<Popped, String> {
        let (v, k) = self.take_by_id(topic, id)?;
        Ok(self.read(topic, v, Some(k)))
    }

    /// Moves the record `id` of `topic` to `to` as `value`: rewritten in place by the next
    /// epoch (it keeps its key and id), and queued on `to` at once.
    pub(crate) fn move_by_id(
        &self,
        topic: &str,
        id: &str,
        to: &str,
        value: TypedValue,
    ) -> Result<(), String> {
        let (_, k) = self.take_by_id(topic, id)?;
        self.consumed
            .lock()
            .push((k.clone(), Some(crate::store::encode_egress(to, &value))));
        self.publish_durable(to, value, Some(k));
        Ok(())
    }

    /// Waits for and pops the next record.
    pub async fn next(&self, topic: &str) -> Popped {
        let t = self.topic(topic);
        loop {
            let notified = t.notify.notified();
            if self.paused.load(Ordering::SeqCst) || self.sinks.lock().contains(topic) {
                notified.await;
                continue;
            }
            let (next, more) = {
                let mut q = t.queue.lock();
                let next = q.pop_front();
                (next, !q.is_empty())
            };
            if let Some((v, key)) = next {
                // Pass the wake-up on: more records may be waiting for other readers.
                if more {
                    t.notify.notify_one();
                }
                return self.read(topic, v, key);
            }
            notified.await;
        }
    }
}

/// Where the durable record `id` is in a topic's queue.
fn position_of(q: &std::collections::VecDeque<Record>, id: &str) -> Option<usize> {
    q.iter().position(|(_, k)| {
        k.as_deref()
            .and_then(crate::store::egress_record_id)
            .is_some_and(|i| i == id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kg: u32, n: u64) -> crate::store::StoredEgress {
        let seq = crate::store::Seq { epoch: 3, n };
        (
            seq,
            crate::store::egress_key(kg, seq),
            "t".to_string(),
            TypedValue::of(&(n as i64)),
            None,
        )
    }

    fn publish(e: &Egress, r: crate::store::StoredEgress) {
        e.publish_durable(&r.2, r.3, Some(r.1));
    }

    /// Pops every record at once (their reads not committed).
    fn drain(e: &Egress) -> Vec<i64> {
        std::iter::from_fn(|| e.pop("t"))
            .map(|p| p.value.get::<i64>().unwrap())
            .collect()
    }

    #[test]
    fn restore_missing_adds_only_records_neither_queued_nor_read() {
        let e = Egress::new(16, Metrics::new());
        // Released before: records 1 and 2 of key group 5 (record 1 read since, its deletion
        // not committed yet), record 3 of key group 5 read in an epoch not committed yet.
        for r in [rec(5, 1), rec(5, 2)] {
            publish(&e, r);
        }
        let first = e.pop("t").unwrap();
        assert!(first.waits());
        let read: std::collections::HashSet<Vec<u8>> = [rec(5, 3).1].into_iter().collect();
        // Sled holds all of them, record 4 (read back from blob storage) and record 5 of a key
        // group not restored.
        let sled = vec![rec(5, 1), rec(5, 2), rec(5, 3), rec(5, 4), rec(6, 5)];
        e.restore_missing(sled, &[5].into_iter().collect(), &read);
        assert_eq!(drain(&e), vec![2, 4]);
        assert_eq!(e.next_key(5, 3), rec(5, 5).1);
    }

    #[tokio::test]
    async fn a_read_is_answered_once_the_epoch_removing_its_record_is_released() {
        let e = Egress::new(16, Metrics::new());
        publish(&e, rec(5, 1));
        publish(&e, rec(5, 2));
        let p = e.pop("t").unwrap();
        let reader = tokio::spawn(p.settled());
        tokio::task::yield_now().await;
        assert!(
            !reader.is_finished(),
            "answered before its removal committed"
        );
        let keys = e.take_consumed();
        assert_eq!(keys, vec![(rec(5, 1).1, None)]);
        // A rollback gives the keys back: the next epoch removes them, the reader still waits.
        e.return_consumed(keys);
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "answered after a rollback");
        let keys = e.take_consumed();
        e.released(&keys);
        let read = reader.await.unwrap().unwrap();
        assert_eq!(read.value.get::<i64>().unwrap(), 1);
        assert_eq!(read.id.as_deref(), Some("5-3-1"));
        assert_eq!(e.metrics.egress_unclaimed.get(), 0);
    }

    #[tokio::test]
    async fn a_read_of_a_key_group_that_leaves_before_its_commit_gets_nothing() {
        let e = Egress::new(16, Metrics::new());
        publish(&e, rec(5, 1));
        publish(&e, rec(6, 2));
        let lost = e.pop("t").unwrap();
        let kept = e.pop("t").unwrap();
        assert_eq!(e.take_consumed().len(), 2);
        // Key group 5 moves away before the epoch commits: its new owner has the record.
        e.drop_key_groups(&[5].into_iter().collect());
        assert!(lost.settled().await.is_none());
        e.released(&[(rec(6, 2).1, None)]);
        assert_eq!(kept.settled().await.unwrap().value.get::<i64>().unwrap(), 2);
        // Nothing of key group 5 is queued or removed here any more.
        publish(&e, rec(5, 3));
        e.drop_key_groups(&[5].into_iter().collect());
        assert!(e.pop("t").is_none());
        assert!(e.take_consumed().is_empty());
    }

    #[tokio::test]
    async fn a_reader_that_leaves_before_its_epoch_gives_its_record_back() {
        let e = Egress::new(16, Metrics::new());
        for seq in 1..=3 {
            publish(&e, rec(5, seq));
        }
        // Records 1 and 2 read; record 1's reader leaves (a cancelled request).
        drop(e.pop("t").unwrap());
        let second = e.pop("t").unwrap();
        // The epoch removes record 2 only; record 1 is first in the queue again.
        assert_eq!(e.take_consumed(), vec![(rec(5, 2).1, None)]);
        let again: Vec<Popped> = std::iter::from_fn(|| e.pop("t")).collect();
        let got: Vec<i64> = again
            .iter()
            .map(|p| p.value.get::<i64>().unwrap())
            .collect();
        assert_eq!(got, vec![1, 3]);
        assert_eq!(
            e.take_consumed(),
            vec![(rec(5, 1).1, None), (rec(5, 3).1, None)]
        );
        // A reader that leaves after its epoch was built: the record is consumed unanswered.
        drop(second);
        e.released(&[(rec(5, 2).1, None)]);
        assert_eq!(e.metrics.egress_unclaimed.get(), 1);
    }

    #[tokio::test]
    async fn a_placement_is_answered_once_committed_and_restored_placements_are_suspects() {
        let e = Egress::new(16, Metrics::new());
        e.add_sink("t");
        publish(&e, rec(5, 1));
        publish(&e, rec(6, 2));
        let taken = e.take("t", 10);
        assert_eq!(taken.len(), 2);
        let (k1, k2) = (rec(5, 1).1, rec(6, 2).1);
        let one = e.place(k1.clone(), b"placed-1".to_vec());
        let two = e.place(k2.clone(), b"placed-2".to_vec());
        // A record not taken here cannot be placed.
        assert!(!e.place(rec(7, 3).1, Vec::new()).await.unwrap());
        let ops = e.take_consumed();
        assert_eq!(
            ops,
            vec![
                (k1.clone(), Some(b"placed-1".to_vec())),
                (k2.clone(), Some(b"placed-2".to_vec()))
            ]
        );
        // A rollback: the rewrites go into the next epoch; key group 6 leaves meanwhile.
        e.return_consumed(ops);
        e.drop_key_groups(&[6].into_iter().collect());
        assert!(!two.await.unwrap(), "a placement of a key group that left");
        let ops = e.take_consumed();
        assert_eq!(ops, vec![(k1.clone(), Some(b"placed-1".to_vec()))]);
        e.released(&ops);
        assert!(one.await.unwrap());
        // Delivered: deleted by the next epoch.
        e.delivered([k1.clone()]);
        assert_eq!(e.take_consumed(), vec![(k1.clone(), None)]);
        // A record restored with a placement is a suspect until told otherwise.
        let placement = crate::store::Placement {
            partition: 1,
            from: 10,
            settled_ms: 5,
        };
        let mut r = rec(5, 4);
        r.4 = Some(placement);
        let k4 = r.1.clone();
        e.restore(vec![r]);
        assert_eq!(e.suspect(&k4), Some(placement));
        let newer = crate::store::Placement {
            settled_ms: 9,
            ..placement
        };
        e.set_suspect(&k4, newer);
        e.clear_suspect(&k4, &placement);
        assert_eq!(e.suspect(&k4), Some(newer), "a newer placement stays");
        e.clear_suspect(&k4, &newer);
        assert_eq!(e.suspect(&k4), None);
        e.set_suspect(&k4, placement);
        e.drop_key_groups(&[5].into_iter().collect());
        assert_eq!(e.suspect(&k4), None, "forgotten with its key group");
    }

    #[tokio::test]
    async fn a_record_a_sink_cannot_deliver_becomes_a_durable_dead_letter() {
        let e = Egress::new(16, Metrics::new());
        e.add_sink("t");
        publish(&e, rec(5, 1));
        let taken = e.take("t", 10);
        let k = rec(5, 1).1;
        let letter = TypedValue::of(&"dead".to_string());
        assert!(e.redirect(&k, "dl", letter.clone()));
        // Rewritten in place by the next epoch, and readable as the same record.
        assert_eq!(
            e.take_consumed(),
            vec![(k.clone(), Some(crate::store::encode_egress("dl", &letter)))]
        );
        let p = e.pop("dl").unwrap();
        assert_eq!(p.id.as_deref(), Some("5-3-1"));
        // The sink's later "delivered" for it deletes nothing (it is the dead letter now).
        e.delivered(taken.into_iter().filter_map(|(_, k)| k));
        assert_eq!(
            e.take_consumed(),
            vec![(k.clone(), None)],
            "only the read's delete"
        );
        assert!(!e.redirect(&k, "dl", letter), "no longer the sink's");
    }

    #[tokio::test]
    async fn at_least_once_reads_are_answered_at_once_and_deleted_by_the_next_epoch() {
        let e = Egress::new(16, Metrics::new()).with_reads(crate::config::EgressReads::AtLeastOnce);
        publish(&e, rec(5, 1));
        let p = e.pop("t").unwrap();
        assert!(!p.waits(), "an at-least-once read waits for no commit");
        let read = p.settled().await.unwrap();
        assert_eq!(read.value.get::<i64>().unwrap(), 1);
        assert_eq!(
            read.id.as_deref(),
            Some("5-3-1"),
            "the record's id, as ever"
        );
        // Its deletion rides in the next epoch; an abandoned one gives it back to the next.
        let keys = e.take_consumed();
        assert_eq!(keys, vec![(rec(5, 1).1, None)]);
        e.return_consumed(keys);
        assert_eq!(e.take_consumed(), vec![(rec(5, 1).1, None)]);
        // Read but not deleted yet: not restored a second time.
        let read: std::collections::HashSet<Vec<u8>> = [rec(5, 1).1].into_iter().collect();
        e.restore_missing(vec![rec(5, 1)], &[5].into_iter().collect(), &read);
        assert!(e.pop("t").is_none());
    }

    #[tokio::test]
    async fn records_that_are_not_durable_are_answered_at_once() {
        let e = Egress::new(16, Metrics::new());
        e.publish("t", TypedValue::of(&7i64));
        let p = e.pop("t").unwrap();
        assert!(!p.waits());
        let read = p.settled().await.unwrap();
        assert_eq!(read.value.get::<i64>().unwrap(), 7);
        assert_eq!(read.id, None);
        assert!(e.take_consumed().is_empty());
    }

    #[tokio::test]
    async fn queue_pop_and_bounded() {
        let e = Egress::new(2, Metrics::new());
        assert!(e.pop("t").is_none());
        for i in 0..3i64 {
            e.publish("t", TypedValue::of(&i));
        }
        assert_eq!(
            e.pop("t").unwrap().value.get::<i64>().unwrap(),
            1,
            "oldest dropped"
        );
        assert_eq!(e.next("t").await.value.get::<i64>().unwrap(), 2);
        let e2 = e.clone();
        let waiter = tokio::spawn(async move { e2.next("t").await });
        tokio::task::yield_now().await;
        e.publish("t", TypedValue::of(&9i64));
        assert_eq!(waiter.await.unwrap().value.get::<i64>().unwrap(), 9);
    }
}
