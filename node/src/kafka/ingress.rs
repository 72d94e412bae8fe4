//! The Kafka ingress consumer of a node: reads the partitions whose instances this node owns
//! and hands their records to the instances in batches (the protocol is in the module doc of
//! [`super`]).
//!
//! One librdkafka consumer per ingress, with partitions assigned by hand (never a consumer
//! group rebalance: placement decides who reads what). Per partition at most one batch is in
//! flight; records that arrive meanwhile wait for the next batch. When a partition's buffer
//! reaches twice [`MAX_RECORDS`] or [`MAX_BYTES`], the consumer stops taking records (of all
//! its partitions) until a batch leaves, so nothing buffers without bound (librdkafka's own
//! prefetch is capped by `queued.max.messages.kbytes`). It never seeks back to make room: a
//! broker must then return the records from an offset inside a record batch, which the test
//! broker (tansu 0.6) does not (it returns the next batch). A failed call (the node is overloaded, rolling back,
//! stopping, or the instance moved) is retried with backoff; the instance's rules make a
//! repeated batch harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use statemesh_sdk::{Address, TypedValue};
use tokio::sync::watch;

use super::{partition_address, Record, Records, RECORDS_TYPE};
use crate::module::{AutoOffsetReset, KafkaIngress, StartupPosition};
use crate::router::Router;

/// Most records in one batch (and waiting per partition before it pauses).
pub const MAX_RECORDS: usize = 1000;
/// Most bytes in one batch (and half the node's `max_message_bytes` at most).
pub const MAX_BYTES: usize = 1 << 20;
/// What a record adds to a batch besides its key and value (offset and framing), at most.
const FRAMING: usize = 32;

fn size(r: &Record) -> usize {
    r.value.len() + r.key.as_ref().map_or(0, Vec::len) + FRAMING
}
/// How long a call of a partition instance may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of the client's blocking requests (metadata, offsets).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the topics' partition counts are read again.
const METADATA_INTERVAL: Duration = Duration::from_secs(5);
/// How often offsets are committed to the consumer group.
const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// The running Kafka ingresses of a node.
pub(crate) struct KafkaIngresses {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KafkaIngresses {
    /// Starts a consumer per ingress.
    pub fn start(router: Router, ingresses: &[KafkaIngress]) -> Result<Self, String> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for spec in ingresses {
            let consumer = consumer(spec)?;
            let runner = Runner {
                batch_bytes: MAX_BYTES.min(router.max_message_bytes() / 2),
                client: format!("Kafka ingress {} at {}", spec.id, spec.address),
                spec: Arc::new(spec.clone()),
                router: router.clone(),
                consumer: Arc::new(consumer),
                parts: HashMap::new(),
                partitions: HashMap::new(),
                calls: FuturesUnordered::new(),
                next_gen: 0,
                warned: HashMap::new(),
                recv_failing: false,
            };
            tasks.push(tokio::spawn(runner.run(stop_rx.clone())));
        }
        Ok(KafkaIngresses { stop, tasks })
    }

    /// Stops reading (batches in flight are dropped; their instances tell the next reader
    /// where to go on).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The consumer's configuration.
pub(crate) fn config(spec: &KafkaIngress) -> Result<ClientConfig, String> {
    let reset = match spec.auto_offset_reset {
        AutoOffsetReset::Earliest => "earliest",
        AutoOffsetReset::Latest => "latest",
    };
    let mut fixed = vec![
        ("bootstrap.servers", spec.address.as_str()),
        ("group.id", spec.group_id.as_str()),
        // Offsets live in the partition instances; the group only mirrors them.
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("enable.partition.eof", "false"),
        ("auto.offset.reset", reset),
    ];
    if !spec
        .properties
        .iter()
        .any(|(k, _)| k == "queued.max.messages.kbytes")
    {
        fixed.push(("queued.max.messages.kbytes", "8192"));
    }
    super::client_config(
        &format!("Kafka ingress {}", spec.id),
        &spec.properties,
        &fixed,
    )
}

fn consumer(spec: &KafkaIngress) -> Result<StreamConsumer, String> {
    config(spec)?.create().map_err(|e| {
        format!(
            "Kafka ingress {:?}: cannot create its consumer: {e}",
            spec.id
        )
    })
}

type Key = (Arc<str>, i32);

/// A metadata read under way: partition counts by topic, and the end offsets of the partitions
/// read here.
type MetadataTask = tokio::task::JoinHandle<Result<Metadata, String>>;

struct Metadata {
    counts: Vec<(Arc<str>, i32)>,
    ends: Vec<(Key, i64)>,
}

#[derive(PartialEq)]
enum Phase {
    /// Asking the instance where to start.
    Init,
    /// Reading.
    Running,
}

struct Part {
    addr: Address,
    /// Told apart from an earlier `Part` of the same partition (stale replies are dropped).
    gen: u64,
    phase: Phase,
    /// The instance's `next` as last answered.
    base: i64,
    /// Read, not yet delivered (offsets from `base` on).
    buffer: Vec<Record>,
    bytes: usize,
    /// The consumer's position: past the last record read.
    end: i64,
    /// Records of `buffer` in the batch in flight (`None`: nothing in flight).
    in_flight: Option<usize>,
    assigned: bool,
    /// Where the partition was last assigned, until its first record arrives (a record past
    /// it means the broker returned none from there: logged).
    assigned_at: Option<i64>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The offset last committed to the consumer group.
    group_offset: i64,
}

enum Kind {
    Init,
    Batch { records: usize, end: i64 },
}

struct Done {
    key: Key,
    gen: u64,
    kind: Kind,
    result: Result<i64, String>,
}

struct Runner {
    spec: Arc<KafkaIngress>,
    /// Most bytes in a batch: [`MAX_BYTES`], at most half the node's largest message.
    batch_bytes: usize,
    /// `Kafka ingress <id>`, as `/readyz` names it.
    client: String,
    router: Router,
    consumer: Arc<StreamConsumer>,
    parts: HashMap<Key, Part>,
    /// Partition counts by topic, as last read.
    partitions: HashMap<Arc<str>, i32>,
    calls: FuturesUnordered<BoxFuture<'static, Done>>,
    next_gen: u64,
    /// Errors already logged as warnings (repeats go to debug).
    warned: HashMap<String, Instant>,
    /// The last read failed (cleared, with its problem, by the next record).
    recv_failing: bool,
}

fn tpl(topic: &str, partition: i32, offset: Option<i64>) -> TopicPartitionList {
    let mut l = TopicPartitionList::new();
    match offset {
        Some(o) => {
            let _ = l.add_partition_offset(topic, partition, Offset::Offset(o));
        }
        None => {
            l.add_partition(topic, partition);
        }
    }
    l
}

/// Where a partition with no `next` yet starts (blocking: asks the broker).
fn startup_offset(
    consumer: &StreamConsumer,
    spec: &KafkaIngress,
    topic: &str,
    partition: i32,
) -> Result<i64, String> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
        .map_err(|e| format!("cannot read the offsets of {topic}/{partition}: {e}"))?;
    let reset = match spec.auto_offset_reset {
        AutoOffsetReset::Earliest => low,
        AutoOffsetReset::Latest => high,
    };
    let in_range = |o: i64| (low..=high).contains(&o).then_some(o);
    let first_offset = |l: &TopicPartitionList| {
        l.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
    };
    Ok(match &spec.startup {
        StartupPosition::Earliest => low,
        StartupPosition::Latest => high,
        StartupPosition::GroupOffsets => {
            let c = consumer
                .committed_offsets(tpl(topic, partition, None), REQUEST_TIMEOUT)
                .map_err(|e| {
                    format!("cannot read the group's offset of {topic}/{partition}: {e}")
                })?;
            first_offset(&c).and_then(in_range).unwrap_or(reset)
        }
        StartupPosition::SpecificOffsets(list) => list
            .iter()
            .find(|(t, p, _)| t == topic && *p == partition)
            .and_then(|(_, _, o)| in_range(*o))
            .unwrap_or(reset),
        StartupPosition::Date(ms) => {
            let l = consumer
                .offsets_for_times(tpl(topic, partition, Some(*ms)), REQUEST_TIMEOUT)
                .map_err(|e| {
                    format!("cannot find the offset at a time in {topic}/{partition}: {e}")
                })?;
            first_offset(&l).and_then(in_range).unwrap_or(high)
        }
    })
}

fn decode_next(v: Result<TypedValue, crate::ServiceError>) -> Result<i64, String> {
    let v = v.map_err(|e| e.to_string())?;
    v.get::<i64>()
        .map_err(|e| format!("the partition instance answered {e}"))
}

impl Runner {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metadata: Option<MetadataTask> = None;
        let mut metadata_at = Instant::now();
        let mut group_commit_at = Instant::now();
        let consumer = self.consumer.clone();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                // A partition whose buffer is full stops the reading of all (librdkafka's own
                // prefetch is bounded): no seeking back, no unbounded buffer.
                m = consumer.recv(), if !self.full() => match m {
                    Ok(m) => {
                        let key = m.key().map(<[u8]>::to_vec);
                        let value = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                        let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
                        drop(m);
                        self.on_record(&topic, partition, Record { offset, key, value, too_large: None });
                        if self.recv_failing {
                            self.recv_failing = false;
                            self.warned.remove("recv");
                            self.router.metrics().kafka_problem(&self.client, None);
                        }
                    }
                    Err(e) => {
                        self.recv_failing = true;
                        self.warn("recv", format!("Kafka ingress {:?}: {e}", self.spec.id));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = self.calls.next(), if !self.calls.is_empty() => self.on_done(done),
                _ = tick.tick() => {
                    let now = Instant::now();
                    if metadata.as_ref().is_some_and(|h| h.is_finished()) {
                        match metadata.take().expect("checked").await {
                            Ok(Ok(md)) => {
                                for (t, n) in md.counts {
                                    self.partitions.insert(t, n);
                                }
                                let lag = &self.router.metrics().kafka_ingress_lag;
                                for ((t, p), end) in md.ends {
                                    if let Some(part) = self.parts.get(&(t.clone(), p)) {
                                        lag.with_label_values(&[self.spec.id.as_str(), &t, &p.to_string()])
                                            .set((end - part.base).max(0));
                                    }
                                }
                                self.router.metrics().kafka_problem(&self.client, None);
                            }
                            Ok(Err(e)) => self.warn("metadata", e),
                            Err(e) => self.warn("metadata", format!("metadata task: {e}")),
                        }
                    }
                    if metadata.is_none() && (now >= metadata_at || self.partitions.is_empty()) {
                        metadata_at = now + METADATA_INTERVAL;
                        let (c, spec) = (self.consumer.clone(), self.spec.clone());
                        let read: Vec<Key> = self
                            .parts
                            .iter()
                            .filter(|(_, p)| p.phase == Phase::Running)
                            .map(|(k, _)| k.clone())
                            .collect();
                        metadata = Some(tokio::task::spawn_blocking(move || read_metadata(&c, &spec, read)));
                    }
                    self.follow_ownership();
                    if now >= group_commit_at {
                        group_commit_at = now + GROUP_COMMIT_INTERVAL;
                        self.commit_group();
                    }
                }
            }
            self.dispatch();
        }
        // Nothing to hand back: the instances hold what was delivered.
        let consumer = self.consumer.clone();
        drop(self);
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    /// Whether a partition holds as many records as it may (the batch in flight stays in its
    /// buffer until answered: room for it and the next).
    fn full(&self) -> bool {
        self.parts
            .values()
            .any(|p| p.buffer.len() >= 2 * MAX_RECORDS || p.bytes >= 2 * self.batch_bytes)
    }

    /// Logs an error as a warning once a minute per kind, else at debug level.
    fn warn(&mut self, what: &str, e: String) {
        if what == "recv" || what == "metadata" {
            self.router
                .metrics()
                .kafka_problem(&self.client, Some(format!("{e} (retrying)")));
        }
        let now = Instant::now();
        match self.warned.get(what) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(60) => {
                tracing::debug!(ingress = %self.spec.id, error = %e, "Kafka ingress")
            }
            _ => {
                tracing::warn!(ingress = %self.spec.id, error = %e, "Kafka ingress (retrying)");
                self.warned.insert(what.to_string(), now);
            }
        }
    }

    /// Starts reading the partitions this node's instances own, stops the others.
    fn follow_ownership(&mut self) {
        let placement = self.router.placement().clone();
        let mut wanted = Vec::new();
        for (topic, n) in &self.partitions {
            for p in 0..*n {
                let addr = partition_address(&self.spec.id, topic, p);
                if placement.is_local(self.router.key_group(&addr)) {
                    wanted.push(((topic.clone(), p), addr));
                }
            }
        }
        let keep: std::collections::HashSet<&Key> = wanted.iter().map(|(k, _)| k).collect();
        let gone: Vec<Key> = self
            .parts
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for k in gone {
            let part = self.parts.remove(&k).expect("listed");
            tracing::info!(ingress = %self.spec.id, topic = %k.0, partition = k.1, "partition instance moved away: stops reading it");
            if part.assigned {
                let _ = self.consumer.incremental_unassign(&tpl(&k.0, k.1, None));
            }
        }
        for (k, addr) in wanted {
            if self.parts.contains_key(&k) {
                continue;
            }
            self.next_gen += 1;
            tracing::info!(ingress = %self.spec.id, topic = %k.0, partition = k.1, "reading a partition");
            self.parts.insert(
                k,
                Part {
                    addr,
                    gen: self.next_gen,
                    phase: Phase::Init,
                    base: 0,
                    buffer: Vec::new(),
                    bytes: 0,
                    end: 0,
                    in_flight: None,
                    assigned: false,
                    assigned_at: None,
                    retry_at: None,
                    backoff: Duration::from_millis(50),
                    group_offset: -1,
                },
            );
        }
    }

    fn on_record(&mut self, topic: &str, partition: i32, mut r: Record) {
        if size(&r) > self.batch_bytes {
            // Handed on without its key and value, to be dead-lettered with its size.
            r.too_large = Some((r.value.len() + r.key.as_ref().map_or(0, Vec::len)) as u64);
            r.value = Vec::new();
            r.key = None;
        }
        let Some(part) = self.parts.get_mut(&(Arc::from(topic), partition)) else {
            return;
        };
        tracing::trace!(topic, partition, offset = r.offset, "record");
        if part.phase != Phase::Running || r.offset < part.end {
            // Read before a seek, or for a partition being set up: read again later.
            return;
        }
        if let Some(at) = part.assigned_at.take() {
            if r.offset > at {
                tracing::warn!(ingress = %self.spec.id, topic, partition, from = at, to = r.offset, "the broker returned no records from where the partition was assigned up to here (compacted or expired, transaction markers, or a broker that skips a batch read from its middle)");
            }
        }
        part.end = r.offset + 1;
        part.bytes += size(&r);
        part.buffer.push(r);
    }

    fn on_done(&mut self, done: Done) {
        let Some(part) = self.parts.get_mut(&done.key) else {
            return;
        };
        if part.gen != done.gen {
            return;
        }
        let (topic, partition) = (done.key.0.clone(), done.key.1);
        tracing::trace!(topic = %topic, partition, result = ?done.result, "done");
        part.in_flight = None;
        let next = match done.result {
            Ok(n) => n,
            Err(e) => {
                part.retry_at = Some(Instant::now() + part.backoff);
                part.backoff = (part.backoff * 2).min(Duration::from_secs(2));
                let msg = format!("{topic}/{partition}: {e}");
                self.warn("call", msg);
                return;
            }
        };
        part.backoff = Duration::from_millis(50);
        part.retry_at = None;
        match done.kind {
            Kind::Init => {
                tracing::debug!(ingress = %self.spec.id, topic = %topic, partition, next, "partition instance set up");
                part.base = next;
                part.end = next;
                part.phase = Phase::Running;
                self.reposition(&done.key, next);
            }
            Kind::Batch { records, end } => {
                if next == end {
                    self.router
                        .metrics()
                        .kafka_ingress_records
                        .with_label_values(&[self.spec.id.as_str()])
                        .inc_by(records as u64);
                    part.base = next;
                    let removed: usize = part.buffer.drain(..records).map(|r| size(&r)).sum();
                    part.bytes -= removed;
                } else {
                    tracing::info!(ingress = %self.spec.id, topic = %topic, partition, read_to = end, next, "the partition instance is elsewhere than the consumer (after a crash, a rollback or a move): reading from its offset");
                    self.reposition(&done.key, next);
                }
            }
        }
    }

    /// Reads `key`'s partition from `offset` on, dropping what was read past it.
    fn reposition(&mut self, key: &Key, offset: i64) {
        let part = self.parts.get_mut(key).expect("present");
        part.buffer.clear();
        part.bytes = 0;
        part.base = offset;
        part.end = offset;
        self.assign_at(key, offset);
    }

    /// (Re)assigns `key`'s partition at `offset` (librdkafka drops what it had fetched).
    fn assign_at(&mut self, key: &Key, offset: i64) {
        let part = self.parts.get_mut(key).expect("present");
        let one = tpl(&key.0, key.1, None);
        if part.assigned {
            let _ = self.consumer.incremental_unassign(&one);
        }
        match self
            .consumer
            .incremental_assign(&tpl(&key.0, key.1, Some(offset)))
        {
            Ok(()) => {
                part.assigned = true;
                part.assigned_at = Some(offset);
            }
            Err(e) => {
                part.assigned = false;
                part.phase = Phase::Init;
                part.buffer.clear();
                part.bytes = 0;
                part.retry_at = Some(Instant::now() + Duration::from_millis(500));
                let msg = format!("cannot assign {}/{}: {e}", key.0, key.1);
                self.warn("assign", msg);
            }
        }
    }

    /// Sends what is due: set-up calls, and a batch per idle partition with records.
    fn dispatch(&mut self) {
        let now = Instant::now();
        for (key, part) in self.parts.iter_mut() {
            if part.in_flight.is_some() || part.retry_at.is_some_and(|t| now < t) {
                continue;
            }
            let (router, addr, gen, key2) = (
                self.router.clone(),
                part.addr.clone(),
                part.gen,
                key.clone(),
            );
            match part.phase {
                Phase::Init => {
                    part.in_flight = Some(0);
                    let (consumer, spec) = (self.consumer.clone(), self.spec.clone());
                    let ingress = spec.id.clone();
                    self.calls.push(Box::pin(async move {
                        let (t, p) = (key2.0.clone(), key2.1);
                        let start = tokio::task::spawn_blocking(move || {
                            startup_offset(&consumer, &spec, &t, p)
                        })
                        .await
                        .unwrap_or_else(|e| Err(format!("offset task: {e}")));
                        let result = match start {
                            Ok(first) => {
                                let batch = Records {
                                    ingress,
                                    topic: key2.0.to_string(),
                                    partition: key2.1,
                                    first,
                                    end: first,
                                    records: Vec::new(),
                                };
                                decode_next(
                                    router
                                        .call(
                                            addr,
                                            TypedValue::new(RECORDS_TYPE, batch.encode_to_vec()),
                                            CALL_TIMEOUT,
                                        )
                                        .await,
                                )
                            }
                            Err(e) => Err(e),
                        };
                        Done {
                            key: key2,
                            gen,
                            kind: Kind::Init,
                            result,
                        }
                    }));
                }
                Phase::Running if !part.buffer.is_empty() => {
                    let mut bytes = 0;
                    let batch_bytes = self.batch_bytes;
                    let n = part
                        .buffer
                        .iter()
                        .take(MAX_RECORDS)
                        .take_while(|r| {
                            bytes += size(r);
                            bytes <= batch_bytes
                        })
                        .count()
                        .max(1);
                    let records = part.buffer[..n].to_vec();
                    let end = records.last().expect("non-empty").offset + 1;
                    let batch = Records {
                        ingress: self.spec.id.clone(),
                        topic: key.0.to_string(),
                        partition: key.1,
                        first: part.base,
                        end,
                        records,
                    };
                    part.in_flight = Some(n);
                    tracing::trace!(topic = %key.0, partition = key.1, first = part.base, end, records = n, "batch");
                    self.calls.push(Box::pin(async move {
                        let v = TypedValue::new(RECORDS_TYPE, batch.encode_to_vec());
                        let result = decode_next(router.call(addr, v, CALL_TIMEOUT).await);
                        Done {
                            key: key2,
                            gen,
                            kind: Kind::Batch { records: n, end },
                            result,
                        }
                    }));
                }
                Phase::Running => {}
            }
        }
    }

    /// Mirrors the instances' offsets into the consumer group (for monitoring tools).
    fn commit_group(&mut self) {
        let mut l = TopicPartitionList::new();
        for ((topic, p), part) in self.parts.iter_mut() {
            if part.phase == Phase::Running && part.assigned && part.base != part.group_offset {
                let _ = l.add_partition_offset(topic, *p, Offset::Offset(part.base));
                part.group_offset = part.base;
            }
        }
        if l.count() > 0 {
            if let Err(e) = self.consumer.commit(&l, CommitMode::Async) {
                tracing::debug!(ingress = %self.spec.id, error = %e, "cannot commit offsets to the consumer group");
            }
        }
    }
}

/// The partition count of each topic of an ingress, and the end offsets of `read` (blocking).
fn read_metadata(
    consumer: &StreamConsumer,
    spec: &KafkaIngress,
    read: Vec<Key>,
) -> Result<Metadata, String> {
    let mut out = Vec::new();
    for t in &spec.topics {
        let md = consumer
            .fetch_metadata(Some(&t.topic), REQUEST_TIMEOUT)
            .map_err(|e| {
                format!(
                    "cannot read the metadata of topic {:?} at {}: {e}",
                    t.topic, spec.address
                )
            })?;
        let Some(mt) = md.topics().iter().find(|m| m.name() == t.topic) else {
            continue;
        };
        if let Some(e) = mt.error() {
            return Err(format!(
                "topic {:?} at {}: {}",
                t.topic,
                spec.address,
                rdkafka::error::RDKafkaErrorCode::from(e)
            ));
        }
        out.push((Arc::from(t.topic.as_str()), mt.partitions().len() as i32));
    }
    let ends = read
        .into_iter()
        .filter_map(|(t, p)| {
            let (_, high) = consumer.fetch_watermarks(&t, p, REQUEST_TIMEOUT).ok()?;
            Some(((t, p), high))
        })
        .collect();
    Ok(Metadata { counts: out, ends })
}
