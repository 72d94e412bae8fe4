//! Egress topics: records functions send out of the mesh, read by gRPC `Subscribe` and
//! `GET /v1/egress/{topic}`.
//!
//! A topic is a bounded queue: each record goes to exactly one reader (an HTTP GET pops
//! one; a subscriber pops them as they come). Beyond `egress_topic_capacity` unread records
//! the oldest is dropped, logged and counted (`statemesh_egress_dropped_total`), so an
//! unread topic cannot grow memory without bound.
//!
//! With checkpoints on, a record is published only once the epoch that produced it commits,
//! and it is durable until read: it is a local-store entry (`'e' ‖ kg ‖ seq`) written in that
//! epoch, reloaded after a restart, and deleted in the epoch after it is read or dropped.
//! Production is exactly once; delivery to readers is at least once across a crash (a record
//! read just before the crash, whose deletion had not committed yet, is read again).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use statemesh_sdk::TypedValue;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// A record and, if it is durable, its local-store key.
type Record = (TypedValue, Option<Vec<u8>>);

struct Topic {
    queue: Mutex<VecDeque<Record>>,
    notify: Notify,
}

/// All egress topics of a node. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    topics: Arc<Mutex<HashMap<String, Arc<Topic>>>>,
    capacity: usize,
    metrics: Metrics,
    /// Keys of durable records read or dropped since the last epoch was built.
    consumed: Arc<Mutex<Vec<Vec<u8>>>>,
    next_seq: Arc<AtomicU64>,
    /// Key groups are about to move: no record is read until they have (every record read
    /// before is deleted by a committed epoch, so the new owners load exactly the unread).
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl Egress {
    /// Topics holding at most `capacity` unread records each.
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Egress {
            topics: Arc::default(),
            capacity: capacity.max(1),
            metrics,
            consumed: Arc::default(),
            next_seq: Arc::new(AtomicU64::new(1)),
            paused: Arc::default(),
        }
    }

    /// The next durable record key of key group `kg`.
    pub(crate) fn next_key(&self, kg: u32) -> Vec<u8> {
        crate::store::egress_key(kg, self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Restores durable records (in production order) after a restart.
    pub(crate) fn restore(&self, records: Vec<crate::store::StoredEgress>) {
        for (seq, key, topic, value) in records {
            self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
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
        known.extend(self.consumed.lock().iter().cloned());
        for t in self.topics.lock().values() {
            known.extend(t.queue.lock().iter().filter_map(|(_, k)| k.clone()));
        }
        self.restore(
            records
                .into_iter()
                .filter(|r| {
                    r.1.len() >= 3
                        && kgs.contains(&(u16::from_be_bytes([r.1[1], r.1[2]]) as u32))
                        && !known.contains(&r.1)
                })
                .collect(),
        );
    }

    /// Drops the unread records of key groups this node no longer serves (their new owner
    /// restores them from the state it loads).
    pub(crate) fn drop_key_groups(&self, kgs: &std::collections::BTreeSet<u32>) {
        let of = |k: &Option<Vec<u8>>| {
            k.as_ref()
                .filter(|k| k.len() >= 3)
                .map(|k| u16::from_be_bytes([k[1], k[2]]) as u32)
        };
        for t in self.topics.lock().values() {
            t.queue
                .lock()
                .retain(|(_, k)| of(k).is_none_or(|kg| !kgs.contains(&kg)));
        }
        self.consumed
            .lock()
            .retain(|k| of(&Some(k.clone())).is_none_or(|kg| !kgs.contains(&kg)));
    }

    /// Keys of durable records read or dropped since the last call (to delete them).
    pub(crate) fn take_consumed(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.consumed.lock())
    }

    /// Gives back consumed records' keys taken for an epoch that was abandoned (rollback):
    /// the next epoch deletes them.
    pub(crate) fn return_consumed(&self, mut keys: Vec<Vec<u8>>) {
        if !keys.is_empty() {
            self.consumed.lock().append(&mut keys);
        }
    }

    fn consumed(&self, key: Option<Vec<u8>>) {
        if let Some(k) = key {
            self.consumed.lock().push(k);
        }
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
            if q.len() >= self.capacity {
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
    pub fn pop(&self, topic: &str) -> Option<TypedValue> {
        if self.paused.load(Ordering::SeqCst) {
            return None;
        }
        let t = self.topics.lock().get(topic).cloned()?;
        let v = t.queue.lock().pop_front();
        let (v, key) = v?;
        self.consumed(key);
        Some(v)
    }

    /// Waits for and pops the next record.
    pub async fn next(&self, topic: &str) -> TypedValue {
        let t = self.topic(topic);
        loop {
            let notified = t.notify.notified();
            if self.paused.load(Ordering::SeqCst) {
                notified.await;
                continue;
            }
            let (next, more) = {
                let mut q = t.queue.lock();
                let next = q.pop_front();
                (next, !q.is_empty())
            };
            if let Some((v, key)) = next {
                self.consumed(key);
                // Pass the wake-up on: more records may be waiting for other readers.
                if more {
                    t.notify.notify_one();
                }
                return v;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_missing_adds_only_records_neither_queued_nor_read() {
        let e = Egress::new(16, Metrics::new());
        let rec = |kg: u32, seq: u64| {
            (
                seq,
                crate::store::egress_key(kg, seq),
                "t".to_string(),
                TypedValue::of(&(seq as i64)),
            )
        };
        // Released before: records 1 and 2 of key group 5 (record 1 read since, its deletion
        // not committed yet), record 3 of key group 5 read in an epoch not committed yet.
        for r in [rec(5, 1), rec(5, 2)] {
            e.publish_durable(&r.2, r.3, Some(r.1));
        }
        assert_eq!(e.pop("t").unwrap().get::<i64>().unwrap(), 1);
        let read: std::collections::HashSet<Vec<u8>> = [rec(5, 3).1].into_iter().collect();
        // Sled holds all of them, record 4 (read back from blob storage) and record 5 of a key
        // group not restored.
        let sled = vec![rec(5, 1), rec(5, 2), rec(5, 3), rec(5, 4), rec(6, 5)];
        e.restore_missing(sled, &[5].into_iter().collect(), &read);
        let mut got = Vec::new();
        while let Some(v) = e.pop("t") {
            got.push(v.get::<i64>().unwrap());
        }
        assert_eq!(got, vec![2, 4]);
        assert_eq!(e.next_key(5), crate::store::egress_key(5, 5));
    }

    #[tokio::test]
    async fn queue_pop_and_bounded() {
        let e = Egress::new(2, Metrics::new());
        assert!(e.pop("t").is_none());
        for i in 0..3i64 {
            e.publish("t", TypedValue::of(&i));
        }
        assert_eq!(
            e.pop("t").unwrap().get::<i64>().unwrap(),
            1,
            "oldest dropped"
        );
        assert_eq!(e.next("t").await.get::<i64>().unwrap(), 2);
        let e2 = e.clone();
        let waiter = tokio::spawn(async move { e2.next("t").await });
        tokio::task::yield_now().await;
        e.publish("t", TypedValue::of(&9i64));
        assert_eq!(waiter.await.unwrap().get::<i64>().unwrap(), 9);
    }
}
