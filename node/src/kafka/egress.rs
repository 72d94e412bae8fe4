//! Kafka egress (issue 11): records functions send to a Kafka egress id are produced to Kafka
//! once their epoch commits.
//!
//! Functions send `KafkaProducerRecord`s (`type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord`
//! from the v3 SDKs' `kafka_egress_message`, or the 2.x SDK's
//! `org.apache.flink.statefun.flink.io.KafkaProducerRecord` from `kafka_egress_record`; both
//! `{ string key = 1; bytes value_bytes = 2; string topic = 3; }`) to the egress id. They are
//! egress records like any other (held until their epoch commits, then stored until gone,
//! `egress.rs`), in a topic named by the egress id, which this module's producer drains:
//!
//! - `at-least-once`: a record is deleted (by the next epoch) only after the broker
//!   acknowledged it (`acks=all`); one the broker refused is produced again after a backoff,
//!   in order. A crash between the acknowledgement and that epoch's commit produces it again.
//! - `none`: deleted as soon as it is handed to the client.
//! - `exactly-once`: see below.
//!
//! ## Exactly once without Kafka transactions
//!
//! librdkafka cannot resume a transaction prepared before a crash, and tansu (the test
//! broker) shows aborted records to `read_committed` readers, so the egress does not use
//! transactions. Every record carries its stable id; the egress makes sure that when it
//! does not know whether a record reached its topic, it looks before producing it again:
//!
//! 1. **Place.** Before producing, the egress chooses the record's partition `P` itself
//!    (Java's default partitioner: murmur2 of the key; the id's murmur2 for a record without
//!    key) and a lower bound `L` of its offset (the partition's end offset, read once and then
//!    advanced past every record acknowledged there), and rewrites the stored record with this
//!    placement and the time `S` from which no request producing it can reach the broker:
//!    `S = T + W + M + SETTLE_MARGIN` (`T` now, `W` the send window, `M` the produce timeout).
//!    The rewrite goes through the node's next epoch ([`Egress::place`]); the record is
//!    produced only once that epoch committed.
//! 2. **Produce** to `P` (a sender task, while the next records are placed), without
//!    librdkafka retries (`message.send.max.retries=0` — Java's `retries` and the other
//!    aliases of the settings fixed here are mapped onto them — so a record is sent at most
//!    once per placement), and only within a bounded time: if less than `W` has passed since
//!    `T` ([`PLACE_WINDOW`], 2 s, doubled up to a minute whenever placements commit too slowly
//!    for it), and with `message.timeout.ms` = `M` (5 s unless set; it must be finite), which
//!    librdkafka also applies to requests in flight. So no request of this placement can reach
//!    the broker after `T + W + M`.
//! 3. **Acknowledged:** deleted by the next epoch, like an at-least-once record.
//! 4. **Not known** — the produce failed, or the record was restored with a placement after a
//!    crash, a rollback or a move of its key group (a *suspect*): once `S` has passed, the
//!    egress reads `P` from `L` to its end (uncommitted records included) and looks for the id
//!    in the `statemesh-record-id` headers. Found: deleted without producing. Not found: placed
//!    again and produced.
//!
//! Costs: one epoch (a few ms) before each round of records is produced (pipelined with the
//! sending of the round before), one sled rewrite per record, and after a crash a wait of up
//! to `W + M + SETTLE_MARGIN` (8 s) before records that were in flight are resolved.
//!
//! Assumptions: a request the broker received is appended **and visible to readers** (for a
//! replicated topic: replicated to the in-sync replicas) at most [`SETTLE_MARGIN`] (1 s) after
//! the client gave up on it; the nodes' clocks agree within that margin (a record placed on one
//! node may be resolved on another after a move); records are not removed by retention before
//! they are looked for. A broker stalled longer than that (a paused process, a follower lagging
//! behind an `acks=all` leader) can break the first. The `transactionTimeout` of the module is
//! read but not used.
//!
//! `L` is always the end of a record batch, which matters on tansu (a fetch from inside a batch
//! skips the batch); tansu 0.6 also reports a partition's end as its last batch's first offset
//! + 1, so the look-up reads on until nothing more comes, or to the partition's end.
//!
//! Every produced record carries the header `statemesh-record-id` with the egress record's
//! stable id (`<key group>-<epoch>-<n>`, the same at every delivery), so a reader can drop a
//! duplicate. A record whose value is not a `KafkaProducerRecord`, or that the broker refuses
//! for good, is dead-lettered: its stored record becomes the dead letter (same key and id), so
//! a crash cannot lose it.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use statemesh_sdk::{TypedValue, DEAD_LETTERS_TOPIC};
use tokio::sync::watch;

use crate::egress::Egress;
use crate::module::{DeliverySemantic, KafkaEgress};
use crate::store::Placement;

/// The v3 SDKs' typename of a Kafka record.
pub const RECORD_TYPE_V3: &str = "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord";
/// The 2.x SDK's typename of a Kafka record.
pub const RECORD_TYPE_V2: &str =
    "type.googleapis.com/org.apache.flink.statefun.flink.io.KafkaProducerRecord";
/// The header carrying a record's stable id.
pub const ID_HEADER: &str = "statemesh-record-id";
/// Most records produced at once per egress.
const BATCH: usize = 1000;
/// Most records placed at once by an exactly-once egress (each round waits for an epoch to
/// commit, so rounds are larger).
const PLACE_BATCH: usize = 10_000;
/// Exactly once: a placed record is produced within this time after its placement, or
/// placed again.
pub const PLACE_WINDOW: Duration = Duration::from_secs(2);
/// Exactly once: how long after a request timed out the broker may still append it (at most,
/// we assume).
pub const SETTLE_MARGIN: Duration = Duration::from_secs(1);
/// Exactly once: `message.timeout.ms` unless the module sets it.
const EXACTLY_ONCE_TIMEOUT_MS: u64 = 5000;

/// `KafkaProducerRecord`, the same fields in both generations.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KafkaProducerRecord {
    /// The key (empty: none).
    #[prost(string, tag = "1")]
    pub key: String,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value_bytes: Vec<u8>,
    /// The topic.
    #[prost(string, tag = "3")]
    pub topic: String,
}

/// The running Kafka egresses of a node.
pub(crate) struct KafkaEgresses {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KafkaEgresses {
    /// Starts a producer per egress, draining its topic of `egress`.
    pub fn start(egress: Egress, egresses: &[KafkaEgress]) -> Result<Self, String> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for spec in egresses {
            let producer: FutureProducer = config(spec)?.create().map_err(|e| {
                format!(
                    "Kafka egress {:?}: cannot create its producer: {e}",
                    spec.id
                )
            })?;
            let spec = Arc::new(spec.clone());
            if let DeliverySemantic::ExactlyOnce { .. } = spec.semantic {
                let scanner: BaseConsumer = scanner_config(&spec)?.create().map_err(|e| {
                    format!("Kafka egress {:?}: cannot create its reader: {e}", spec.id)
                })?;
                let (tx, rx) = mpsc::channel(2);
                let window = Arc::new(AtomicU64::new(PLACE_WINDOW.as_millis() as u64));
                let ends = Arc::default();
                let sender = tokio::spawn(
                    Sender {
                        spec: spec.clone(),
                        egress: egress.clone(),
                        producer: producer.clone(),
                        client: format!("Kafka egress {} at {}", spec.id, spec.address),
                        ends: Arc::clone(&ends),
                        window: window.clone(),
                    }
                    .run(rx),
                );
                let placer = ExactlyOnce {
                    timeout: Duration::from_millis(message_timeout_ms(&spec)?),
                    window,
                    spec,
                    egress: egress.clone(),
                    producer,
                    scanner: Arc::new(scanner),
                    partitions: HashMap::new(),
                    ends,
                    held: Vec::new(),
                    sender: tx,
                };
                let stop = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    placer.run(stop).await;
                    // The sender ends once the placer dropped its channel.
                    let _ = sender.await;
                }));
                continue;
            }
            tasks.push(tokio::spawn(run(
                spec,
                egress.clone(),
                producer,
                stop_rx.clone(),
            )));
        }
        Ok(KafkaEgresses { stop, tasks })
    }

    /// Stops producing (records taken and not acknowledged are produced again at the next
    /// start: they are still stored).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The producer's configuration.
pub(crate) fn config(spec: &KafkaEgress) -> Result<ClientConfig, String> {
    let exactly_once = matches!(spec.semantic, DeliverySemantic::ExactlyOnce { .. });
    let timeout = message_timeout_ms(spec)?.to_string();
    let properties = canonical(&spec.properties);
    let mut fixed = vec![("bootstrap.servers", spec.address.as_str())];
    if spec.semantic != DeliverySemantic::None {
        fixed.push(("acks", "all"));
        // Retries keep the order of a partition's records.
        fixed.push(("max.in.flight.requests.per.connection", "1"));
    }
    if exactly_once {
        // Sent at most once per placement: the egress decides what to send again.
        fixed.push(("message.send.max.retries", "0"));
        fixed.push(("enable.idempotence", "false"));
        fixed.push(("message.timeout.ms", timeout.as_str()));
        fixed.push(("request.timeout.ms", timeout.as_str()));
    }
    let has = |k: &str| properties.iter().any(|(p, _)| p == k);
    if !has("linger.ms") {
        fixed.push(("linger.ms", "1"));
    }
    // Keyed records go where Java's clients (and so StateFun) put them.
    if !has("partitioner") {
        fixed.push(("partitioner", "murmur2_random"));
    }
    // A broker that is down fails a record after 10 s (not librdkafka's 5 minutes): it is
    // produced again, and `/readyz` says why meanwhile.
    if !exactly_once && !has("message.timeout.ms") {
        fixed.push(("message.timeout.ms", "10000"));
    }
    crate::kafka::client_config(&format!("Kafka egress {}", spec.id), &properties, &fixed)
}

/// The module's properties under librdkafka's main names (`retries` is
/// `message.send.max.retries`, `delivery.timeout.ms` is `message.timeout.ms`, …), so that the
/// settings the egress fixes win over every name of theirs.
fn canonical(properties: &[(String, String)]) -> Vec<(String, String)> {
    const ALIASES: [(&str, &str); 5] = [
        ("retries", "message.send.max.retries"),
        ("delivery.timeout.ms", "message.timeout.ms"),
        ("request.required.acks", "acks"),
        ("max.in.flight", "max.in.flight.requests.per.connection"),
        ("queue.buffering.max.ms", "linger.ms"),
    ];
    properties
        .iter()
        .map(|(k, v)| {
            let k = ALIASES
                .iter()
                .find(|(alias, _)| alias == k)
                .map_or(k.as_str(), |(_, main)| main);
            (k.to_string(), v.clone())
        })
        .collect()
}

/// `message.timeout.ms` (or `delivery.timeout.ms`) of an exactly-once egress: the module's, or
/// 5 s; it bounds when a record sent can still reach the broker, so it must be finite.
fn message_timeout_ms(spec: &KafkaEgress) -> Result<u64, String> {
    let Some((k, v)) = spec
        .properties
        .iter()
        .rev()
        .find(|(k, _)| k == "message.timeout.ms" || k == "delivery.timeout.ms")
    else {
        return Ok(EXACTLY_ONCE_TIMEOUT_MS);
    };
    match v.trim().parse::<u64>() {
        Ok(ms) if (1..=900_000).contains(&ms) => Ok(ms),
        _ if !matches!(spec.semantic, DeliverySemantic::ExactlyOnce { .. }) => {
            Ok(EXACTLY_ONCE_TIMEOUT_MS)
        }
        _ => Err(format!(
            "Kafka egress {:?}: property {k} = {v:?}: an exactly-once egress needs a timeout of 1 to 900000 ms (0 is endless: a record sent could reach the broker at any time)",
            spec.id
        )),
    }
}

/// The configuration of the reader an exactly-once egress looks for records with (the
/// module's properties, for addresses and security, and a consumer's own).
fn scanner_config(spec: &KafkaEgress) -> Result<ClientConfig, String> {
    let group = format!("statemesh-egress-{}", spec.id);
    // Producer-only properties would make the consumer warn at start.
    let producer_only = [
        "linger.ms",
        "acks",
        "partitioner",
        "message.timeout.ms",
        "request.timeout.ms",
        "compression.type",
        "batch.size",
        "batch.num.messages",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "enable.idempotence",
        "retries",
        "message.send.max.retries",
        "max.in.flight.requests.per.connection",
        "transactional.id",
        "transaction.timeout.ms",
    ];
    let properties: Vec<(String, String)> = canonical(&spec.properties)
        .into_iter()
        .filter(|(k, _)| !producer_only.contains(&k.as_str()))
        .collect();
    crate::kafka::client_config(
        &format!("Kafka egress {} (reader)", spec.id),
        &properties,
        &[
            ("bootstrap.servers", spec.address.as_str()),
            ("group.id", group.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("fetch.wait.max.ms", "10"),
            // Records of transactions (committed or not) count: another producer's open
            // transaction must not hide ours.
            ("isolation.level", "read_uncommitted"),
            ("enable.partition.eof", "true"),
        ],
    )
}

/// Kafka's `Utils.murmur2` (the Java client's default partitioner hashes keys with it).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Java's default partitioner gives `key` among `count`.
pub fn partition_of(key: &[u8], count: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % count.max(1)
}

/// Decodes a record sent to a Kafka egress.
pub fn decode_record(v: &TypedValue) -> Result<KafkaProducerRecord, String> {
    if v.typename() != RECORD_TYPE_V3 && v.typename() != RECORD_TYPE_V2 {
        return Err(format!(
            "a Kafka egress takes {RECORD_TYPE_V3} (kafka_egress_message) or {RECORD_TYPE_V2} (kafka_egress_record), not {}",
            v.typename()
        ));
    }
    let r = KafkaProducerRecord::decode(v.value().as_ref())
        .map_err(|e| format!("a malformed KafkaProducerRecord: {e}"))?;
    if r.topic.is_empty() {
        return Err("a KafkaProducerRecord without a topic".into());
    }
    Ok(r)
}

async fn run(
    spec: Arc<KafkaEgress>,
    egress: Egress,
    producer: FutureProducer,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = egress.wait(&spec.id) => {}
        }
        let records = egress.take(&spec.id, BATCH);
        if records.is_empty() {
            continue;
        }
        let mut sends = Vec::with_capacity(records.len());
        for (value, key) in &records {
            let r = match decode_record(value) {
                Ok(r) => r,
                Err(e) => {
                    sends.push(None);
                    dead_letter(&egress, &spec, value, key.as_deref(), e);
                    continue;
                }
            };
            let id = key.as_deref().and_then(crate::store::egress_record_id);
            let fr = kafka_record(&r, id.as_deref());
            // A full client queue fails the send at once: the record is produced again.
            sends.push(Some(producer.send_result(fr).map_err(|(e, _)| e)));
        }
        if spec.semantic == DeliverySemantic::None {
            egress.delivered(records.into_iter().filter_map(|(_, k)| k));
            continue;
        }
        let mut failed = Vec::new();
        let mut done = Vec::new();
        let mut error = None;
        for ((value, key), send) in records.into_iter().zip(sends) {
            let result = match send {
                None => Ok(()), // dead-lettered
                Some(Err(e)) => Err(e),
                Some(Ok(delivery)) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(rdkafka::error::KafkaError::Canceled),
                },
            };
            match result {
                Ok(()) => done.extend(key),
                // A record the broker can never take is dead-lettered, not retried forever.
                Err(e) if permanent(&e) => {
                    dead_letter(
                        &egress,
                        &spec,
                        &value,
                        key.as_deref(),
                        format!("the broker refused the record for good: {e}"),
                    );
                }
                // Produced again (those acknowledged are not: at-least-once allows the order
                // of a retried record to change).
                Err(e) => {
                    error = Some(e.to_string());
                    failed.push((value, key));
                }
            }
        }
        let metrics = egress.metrics();
        metrics
            .kafka_egress_records
            .with_label_values(&[spec.id.as_str()])
            .inc_by(done.len() as u64);
        egress.delivered(done);
        let client = format!("Kafka egress {} at {}", spec.id, spec.address);
        if failed.is_empty() {
            backoff = Duration::from_millis(50);
            metrics.kafka_problem(&client, None);
        } else {
            metrics
                .kafka_egress_errors
                .with_label_values(&[spec.id.as_str()])
                .inc_by(failed.len() as u64);
            metrics.kafka_problem(
                &client,
                Some(format!(
                    "{} records not taken: {} (retrying)",
                    failed.len(),
                    error.as_deref().unwrap_or("?")
                )),
            );
            tracing::warn!(egress = %spec.id, records = failed.len(), error = ?error, retry_in_ms = backoff.as_millis() as u64, "Kafka egress: the broker did not take records; producing them again");
            egress.give_back(&spec.id, failed);
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    let _ = tokio::task::spawn_blocking(move || {
        let _ = producer.flush(Duration::from_secs(5));
    })
    .await;
}

/// A record an exactly-once egress holds: its value, key and decoded record.
struct Held {
    value: TypedValue,
    key: Vec<u8>,
    id: String,
    record: KafkaProducerRecord,
    /// The placement it may have been produced under (a suspect), and when to look next.
    suspect: Option<(Placement, u64)>,
}

/// The producer of an exactly-once egress (module docs).
struct ExactlyOnce {
    spec: Arc<KafkaEgress>,
    egress: Egress,
    producer: FutureProducer,
    scanner: Arc<BaseConsumer>,
    /// `message.timeout.ms`.
    timeout: Duration,
    /// How long after its placement a record may still be sent (ms): doubled (up to a
    /// minute) whenever placements commit too slowly for it.
    window: Arc<AtomicU64>,
    /// Partition counts by topic.
    partitions: HashMap<String, i32>,
    /// A lower bound of the next offset of partitions produced to (a batch boundary).
    ends: Arc<parking_lot::Mutex<HashMap<(String, i32), i64>>>,
    /// Suspects waiting until they can be looked for.
    held: Vec<Held>,
    /// Placed records to the sender (at most two rounds ahead of it).
    sender: mpsc::Sender<Placed>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ExactlyOnce {
    fn client(&self) -> String {
        format!("Kafka egress {} at {}", self.spec.id, self.spec.address)
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            // Suspects this egress no longer holds (their key group moved) are not its own.
            let egress = self.egress.clone();
            self.held.retain(|h| egress.is_taken(&h.key));
            let next_look = self
                .held
                .iter()
                .filter_map(|h| h.suspect.map(|s| s.1))
                .min();
            let sleep = next_look
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = stop.changed() => break,
                _ = self.egress.wait(&self.spec.id) => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            let mut fresh = Vec::new();
            for (value, key) in self.egress.take(&self.spec.id, PLACE_BATCH) {
                let record = match decode_record(&value) {
                    Ok(r) => r,
                    Err(e) => {
                        dead_letter(&self.egress, &self.spec, &value, key.as_deref(), e);
                        continue;
                    }
                };
                let Some(key) = key else {
                    // Not durable (refused at start: exactly-once needs checkpoints).
                    tracing::error!(egress = %self.spec.id, "a record that is not durable reached an exactly-once Kafka egress; dropped");
                    continue;
                };
                let id = crate::store::egress_record_id(&key).unwrap_or_default();
                // Taken again (it moved away and back): what was held of it is stale.
                self.held.retain(|h| h.key != key);
                let suspect = self.egress.suspect(&key).map(|p| (p, p.settled_ms));
                let h = Held {
                    value,
                    key,
                    id,
                    record,
                    suspect,
                };
                if h.suspect.is_some() {
                    self.held.push(h);
                } else {
                    fresh.push(h);
                }
            }
            // Suspects whose placement settled: look for them.
            let now = now_ms();
            let (due, later): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|h| h.suspect.is_some_and(|s| s.1 <= now));
            self.held = later;
            if !due.is_empty() {
                let (mut absent, error) = self.resolve(due).await;
                if let Some(e) = error {
                    self.problem(Some(e));
                }
                absent.append(&mut fresh);
                fresh = absent;
            }
            if fresh.is_empty() {
                continue;
            }
            match self.produce(fresh, &mut stop).await {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    self.problem(Some(e.clone()));
                    tracing::warn!(egress = %self.spec.id, error = %e, retry_in_ms = backoff.as_millis() as u64, "Kafka egress (exactly once): records not produced; trying again");
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn problem(&self, error: Option<String>) {
        self.egress.metrics().kafka_problem(&self.client(), error);
    }

    /// Looks for settled suspects in their partitions: those found are deleted; the others
    /// are returned, to be placed again. Suspects that could not be looked for stay held.
    async fn resolve(&mut self, due: Vec<Held>) -> (Vec<Held>, Option<String>) {
        let mut by_partition: HashMap<(String, i32), (i64, HashSet<String>)> = HashMap::new();
        for h in &due {
            let (p, _) = h.suspect.expect("a suspect");
            let e = by_partition
                .entry((h.record.topic.clone(), p.partition))
                .or_insert((p.from, HashSet::new()));
            e.0 = e.0.min(p.from);
            e.1.insert(h.id.clone());
        }
        let scanner = self.scanner.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut found = HashSet::new();
            for ((topic, partition), (from, ids)) in by_partition {
                found.extend(scan(&scanner, &topic, partition, from, &ids)?);
            }
            Ok::<_, String>(found)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the look-up task failed: {e}")));
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                // Looked for again after a while.
                let again = now_ms() + 1000;
                for mut h in due {
                    if let Some(s) = h.suspect.as_mut() {
                        s.1 = again;
                    }
                    self.held.push(h);
                }
                return (
                    Vec::new(),
                    Some(format!(
                        "looking for records that may have been produced: {e}"
                    )),
                );
            }
        };
        let mut absent = Vec::new();
        let mut there = Vec::new();
        // Only what this egress still holds (a key group may have moved during the look-up).
        let due: Vec<Held> = due
            .into_iter()
            .filter(|h| self.egress.is_taken(&h.key))
            .collect();
        if tracing::enabled!(tracing::Level::TRACE) {
            let ids: Vec<String> = due
                .iter()
                .map(|h| {
                    let p = h.suspect.expect("a suspect").0;
                    format!(
                        "{}@{}/{}:{}",
                        h.id,
                        p.partition,
                        p.from,
                        found.contains(&h.id)
                    )
                })
                .collect();
            tracing::trace!(egress = %self.spec.id, ?ids, "Kafka egress (exactly once): looked for");
        }
        for mut h in due {
            self.egress
                .clear_suspect(&h.key, &h.suspect.expect("a suspect").0);
            if found.contains(&h.id) {
                there.push(h.key);
            } else {
                h.suspect = None;
                absent.push(h);
            }
        }
        tracing::info!(egress = %self.spec.id, found = there.len(), placed_again = absent.len(), "Kafka egress (exactly once): records that may have been produced were looked for");
        if !there.is_empty() {
            self.egress
                .metrics()
                .kafka_egress_records
                .with_label_values(&[self.spec.id.as_str()])
                .inc_by(there.len() as u64);
        }
        self.egress.delivered(there);
        (absent, None)
    }

    /// Places and produces records none of which can be in their topic.
    async fn produce(
        &mut self,
        records: Vec<Held>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        // Partition counts and ends of the partitions not known yet.
        let mut topics: Vec<String> = Vec::new();
        for h in &records {
            if !self.partitions.contains_key(&h.record.topic) && !topics.contains(&h.record.topic) {
                topics.push(h.record.topic.clone());
            }
        }
        let give_back = |this: &Self, records: Vec<Held>| {
            this.egress.give_back(
                &this.spec.id,
                records
                    .into_iter()
                    .map(|h| (h.value, Some(h.key)))
                    .collect(),
            );
        };
        if !topics.is_empty() {
            let producer = self.producer.clone();
            let counts = tokio::task::spawn_blocking(move || {
                topics
                    .into_iter()
                    .map(|t| partition_count(&producer, &t).map(|n| (t, n)))
                    .collect::<Result<Vec<_>, String>>()
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match counts {
                Ok(c) => self.partitions.extend(c),
                Err(e) => {
                    give_back(self, records);
                    return Err(e);
                }
            }
        }
        let placed: Vec<(Held, i32)> = records
            .into_iter()
            .map(|h| {
                let n = self.partitions[&h.record.topic];
                let p = if h.record.key.is_empty() {
                    partition_of(h.id.as_bytes(), n)
                } else {
                    partition_of(h.record.key.as_bytes(), n)
                };
                (h, p)
            })
            .collect();
        let mut unknown: Vec<(String, i32)> = Vec::new();
        for (h, p) in &placed {
            let k = (h.record.topic.clone(), *p);
            if !self.ends.lock().contains_key(&k) && !unknown.contains(&k) {
                unknown.push(k);
            }
        }
        if !unknown.is_empty() {
            let producer = self.producer.clone();
            let ends = tokio::task::spawn_blocking(move || {
                unknown
                    .into_iter()
                    .map(|(t, p)| {
                        producer
                            .client()
                            .fetch_watermarks(&t, p, Duration::from_secs(5))
                            .map(|(_, high)| ((t.clone(), p), high))
                            .map_err(|e| format!("reading the end of {t}/{p}: {e}"))
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match ends {
                Ok(e) => self.ends.lock().extend(e),
                Err(e) => {
                    give_back(self, placed.into_iter().map(|(h, _)| h).collect());
                    return Err(e);
                }
            }
        }
        // 1. Place: the partition, a lower bound of the offset and the time, committed.
        let placed_at = std::time::Instant::now();
        let window = Duration::from_millis(self.window.load(Ordering::Relaxed));
        let settled_ms = now_ms() + (window + self.timeout + SETTLE_MARGIN).as_millis() as u64;
        let mut waits = Vec::with_capacity(placed.len());
        for (h, p) in placed {
            let placement = Placement {
                partition: p,
                from: self.ends.lock()[&(h.record.topic.clone(), p)],
                settled_ms,
            };
            let raw = crate::store::encode_placed_egress(&self.spec.id, &h.value, Some(&placement));
            let rx = self.egress.place(h.key.clone(), raw);
            waits.push((h, placement, rx));
        }
        let mut ready = Vec::with_capacity(waits.len());
        let mut lost = Vec::new();
        for (h, placement, rx) in waits {
            let committed = tokio::select! {
                _ = stop.changed() => return Ok(()),
                r = rx => r,
            };
            match committed {
                Ok(true) => ready.push((h, placement)),
                // Not committed here: the key group left (its new owner has the record).
                Ok(false) => {}
                // Not answered (not expected): placed again later.
                Err(_) => lost.push(h),
            }
        }
        if !lost.is_empty() {
            tracing::warn!(egress = %self.spec.id, records = lost.len(), "Kafka egress (exactly once): placements not answered; placing them again");
            give_back(self, lost);
        }
        if ready.is_empty() {
            return Ok(());
        }
        // 2. Produce (the sender task: the next records are placed meanwhile), unless the
        // placement is too old by then.
        if self
            .sender
            .send(Placed {
                records: ready,
                placed_at,
                window,
            })
            .await
            .is_err()
        {
            return Err("the sender stopped".into());
        }
        Ok(())
    }
}

/// Records placed and committed, for the sender.
struct Placed {
    records: Vec<(Held, Placement)>,
    /// When the placement was made.
    placed_at: std::time::Instant,
    /// How long after it they may still be sent.
    window: Duration,
}

/// The sending half of an exactly-once egress: produces placed records in order while the
/// next ones are placed.
struct Sender {
    spec: Arc<KafkaEgress>,
    egress: Egress,
    producer: FutureProducer,
    client: String,
    /// Shared with the placer: a lower bound of the next offset of partitions.
    ends: Arc<parking_lot::Mutex<HashMap<(String, i32), i64>>>,
    /// Shared with the placer: its window, lengthened here (ms).
    window: Arc<AtomicU64>,
}

impl Sender {
    async fn run(mut self, mut rx: mpsc::Receiver<Placed>) {
        let mut backoff = Duration::from_millis(50);
        while let Some(placed) = rx.recv().await {
            match self.send(placed).await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    self.egress
                        .metrics()
                        .kafka_problem(&self.client, Some(e.clone()));
                    tracing::warn!(egress = %self.spec.id, error = %e, retry_in_ms = backoff.as_millis() as u64, "Kafka egress (exactly once): records not produced; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = producer.flush(Duration::from_secs(5));
        })
        .await;
    }

    async fn send(&mut self, placed: Placed) -> Result<(), String> {
        let Placed {
            records: ready,
            placed_at,
            window,
        } = placed;
        // Unless the placement is too old (its commit was slow, or this process was paused):
        // then nothing is sent, and the records are placed again, with a longer window.
        let took = placed_at.elapsed();
        if took > window {
            let longer = (window * 2).min(Duration::from_secs(60));
            tracing::warn!(egress = %self.spec.id, records = ready.len(), took_ms = took.as_millis() as u64, window_ms = longer.as_millis() as u64, "Kafka egress (exactly once): placements committed too late to be produced; placing them again with a longer window");
            self.window
                .fetch_max(longer.as_millis() as u64, Ordering::Relaxed);
            self.egress.give_back(
                &self.spec.id,
                ready
                    .into_iter()
                    .map(|(h, _)| (h.value, Some(h.key)))
                    .collect(),
            );
            return Ok(());
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            let ids: Vec<String> = ready
                .iter()
                .map(|(h, p)| format!("{}@{}/{}", h.id, p.partition, p.from))
                .collect();
            tracing::trace!(egress = %self.spec.id, ?ids, "Kafka egress (exactly once): producing");
        }
        let mut sends = Vec::with_capacity(ready.len());
        for (h, placement) in &ready {
            let fr = kafka_record(&h.record, Some(&h.id)).partition(placement.partition);
            sends.push(self.producer.send_result(fr).map_err(|(e, _)| e));
        }
        let mut done = Vec::new();
        let mut failed = 0usize;
        let mut error = None;
        for ((h, placement), send) in ready.into_iter().zip(sends) {
            let result = match send {
                Err(e) => Err((e, false)),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(d)) => Ok(d.offset),
                    Ok(Err((e, _))) => Err((e, true)),
                    Err(_) => Err((rdkafka::error::KafkaError::Canceled, true)),
                },
            };
            match result {
                Ok(offset) => {
                    let mut ends = self.ends.lock();
                    let end = ends
                        .entry((h.record.topic.clone(), placement.partition))
                        .or_insert(0);
                    *end = (*end).max(offset + 1);
                    done.push(h.key);
                }
                Err((e, _)) if permanent(&e) => {
                    dead_letter(
                        &self.egress,
                        &self.spec,
                        &h.value,
                        Some(&h.key),
                        format!("the broker refused the record for good: {e}"),
                    );
                }
                // Never handed to the client: nothing was sent.
                Err((e, false)) => {
                    error = Some(e.to_string());
                    failed += 1;
                    self.egress
                        .give_back(&self.spec.id, vec![(h.value, Some(h.key))]);
                }
                // Sent, perhaps appended: looked for once its placement settled.
                Err((e, true)) => {
                    error = Some(e.to_string());
                    failed += 1;
                    // Taken again as a suspect.
                    self.egress.set_suspect(&h.key, placement);
                    self.egress
                        .give_back(&self.spec.id, vec![(h.value, Some(h.key))]);
                }
            }
        }
        let metrics = self.egress.metrics();
        metrics
            .kafka_egress_records
            .with_label_values(&[self.spec.id.as_str()])
            .inc_by(done.len() as u64);
        self.egress.delivered(done);
        if failed == 0 {
            self.egress.metrics().kafka_problem(&self.client, None);
            return Ok(());
        }
        metrics
            .kafka_egress_errors
            .with_label_values(&[self.spec.id.as_str()])
            .inc_by(failed as u64);
        Err(format!(
            "{failed} records not taken: {} (retrying)",
            error.as_deref().unwrap_or("?")
        ))
    }
}

/// The number of partitions of `topic`.
fn partition_count(producer: &FutureProducer, topic: &str) -> Result<i32, String> {
    let md = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| format!("reading the partitions of topic {topic:?}: {e}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("topic {topic:?}: not in the broker's metadata"))?;
    if let Some(e) = t.error() {
        return Err(format!(
            "topic {topic:?}: {}",
            rdkafka::error::RDKafkaErrorCode::from(e)
        ));
    }
    match t.partitions().len() {
        0 => Err(format!("topic {topic:?} has no partitions")),
        n => Ok(n as i32),
    }
}

/// The ids among `ids` found in the `statemesh-record-id` headers of `topic`/`partition` from
/// offset `from` to its current end (read until nothing more comes once past the end offset
/// read first: a record produced under a placement made before that read is below it).
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    ids: &HashSet<String>,
) -> Result<HashSet<String>, String> {
    let place = format!("{topic}/{partition}");
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(5))
        .map_err(|e| format!("reading the end of {place}: {e}"))?;
    let mut found = HashSet::new();
    let start = from.max(low);
    if start >= high {
        return Ok(found);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| e.to_string())?;
    consumer
        .assign(&tpl)
        .map_err(|e| format!("reading {place}: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut next = start;
    let mut read = 0u64;
    let result = loop {
        if std::time::Instant::now() > deadline {
            break Err(format!(
                "reading {place} from {start} to {high}: timed out at {next}"
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            // Past the end offset read before, and nothing more queued: done. (tansu 0.6 gives
            // the last batch's first offset + 1 as the end, so the rest of that batch comes
            // after `high`.)
            None if next >= high => break Ok(found),
            None => {}
            // The end of the partition (past transaction markers, which are not delivered);
            // the records fetched before it were delivered first.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if p == partition => {
                break Ok(found)
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => break Err(format!("reading {place}: {e}")),
            // A record of an earlier assignment still queued.
            Some(Ok(m)) if m.partition() != partition || m.topic() != topic => {}
            Some(Ok(m)) => {
                next = m.offset() + 1;
                read += 1;
                if let Some(headers) = m.headers() {
                    for h in headers.iter() {
                        if h.key != ID_HEADER {
                            continue;
                        }
                        if let Some(id) = h.value.and_then(|v| std::str::from_utf8(v).ok()) {
                            if ids.contains(id) {
                                found.insert(id.to_string());
                            }
                        }
                    }
                }
            }
        }
    };
    let _ = consumer.unassign();
    tracing::debug!(topic, partition, from, low, high, read, found = ?result.as_ref().map(|f| f.len()), "Kafka egress (exactly once): looked for records");
    result
}

/// The Kafka record of `r`, keyed unless its key is empty, with its id in the header
/// `statemesh-record-id`.
fn kafka_record<'a>(
    r: &'a KafkaProducerRecord,
    id: Option<&'a str>,
) -> FutureRecord<'a, str, [u8]> {
    let mut fr = FutureRecord::<str, [u8]>::to(&r.topic).payload(&r.value_bytes);
    if !r.key.is_empty() {
        fr = fr.key(&r.key);
    }
    if let Some(id) = id {
        fr = fr.headers(OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(id.as_bytes()),
        }));
    }
    fr
}

/// Errors a retry cannot fix.
fn permanent(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidTopic
                | C::InvalidRecord
                | C::MessageBatchTooLarge
                | C::TopicAuthorizationFailed
        )
    )
}

/// Dead-letters a record the egress cannot deliver: the stored record (`key`) becomes the dead
/// letter, so it is not lost in a crash (a record that is not durable is published as one).
fn dead_letter(
    egress: &Egress,
    spec: &KafkaEgress,
    value: &TypedValue,
    key: Option<&[u8]>,
    error: String,
) {
    tracing::warn!(egress = %spec.id, error = %error, "Kafka egress record dead-lettered");
    let json = serde_json::json!({
        "address": serde_json::Value::Null,
        "caller": serde_json::Value::Null,
        "egress": spec.id,
        "typename": value.typename(),
        "value_base64": base64::engine::general_purpose::STANDARD.encode(value.value()),
        "error": error,
        "attempts": 0,
    });
    let letter = TypedValue::new("statemesh/DeadLetter", json.to_string().into_bytes());
    match key {
        Some(k) => {
            egress.redirect(k, DEAD_LETTERS_TOPIC, letter);
        }
        None => egress.publish_durable(DEAD_LETTERS_TOPIC, letter, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_the_java_clients() {
        // Kafka's own vectors (UtilsTest.testMurmur2).
        for (key, want) in [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
        assert_eq!(
            partition_of(b"21", 7),
            ((-973_932_308i32 & 0x7fff_ffff) % 7)
        );
        assert!((0..100).all(|i| (0..4).contains(&partition_of(format!("k{i}").as_bytes(), 4))));
    }

    fn spec(semantic: DeliverySemantic, properties: &[(&str, &str)]) -> KafkaEgress {
        KafkaEgress {
            id: "test/out".into(),
            address: "127.0.0.1:1".into(),
            semantic,
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn an_exactly_once_producer_sends_each_placement_once_within_its_timeout() {
        let eo = DeliverySemantic::ExactlyOnce {
            transaction_timeout: Duration::from_secs(900),
        };
        let c = config(&spec(eo, &[("message.send.max.retries", "5")])).unwrap();
        assert_eq!(c.get("message.send.max.retries"), Some("0"));
        assert_eq!(c.get("message.timeout.ms"), Some("5000"));
        assert_eq!(c.get("request.timeout.ms"), Some("5000"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        let c = config(&spec(eo, &[("message.timeout.ms", "3000")])).unwrap();
        assert_eq!(c.get("message.timeout.ms"), Some("3000"));
        // Java's names of the settings the egress fixes do not override them.
        let c = config(&spec(
            eo,
            &[
                ("retries", "2147483647"),
                ("delivery.timeout.ms", "4000"),
                ("request.required.acks", "1"),
                ("max.in.flight", "5"),
            ],
        ))
        .unwrap();
        assert_eq!(c.get("retries"), None);
        assert_eq!(c.get("message.send.max.retries"), Some("0"));
        assert_eq!(c.get("delivery.timeout.ms"), None);
        assert_eq!(c.get("message.timeout.ms"), Some("4000"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), Some("1"));
        // An endless timeout is refused, naming the property.
        let e = config(&spec(eo, &[("message.timeout.ms", "0")])).unwrap_err();
        assert!(
            e.contains("message.timeout.ms") && e.contains("\"test/out\""),
            "{e}"
        );
        // The reader leaves the producer's own properties out, keeps the others.
        let r = scanner_config(&spec(
            eo,
            &[("linger.ms", "5"), ("client.id", "mine"), ("acks", "1")],
        ))
        .unwrap();
        assert_eq!(r.get("linger.ms"), None);
        assert_eq!(r.get("acks"), None);
        assert_eq!(r.get("client.id"), Some("mine"));
        let c = config(&spec(DeliverySemantic::AtLeastOnce, &[])).unwrap();
        assert_eq!(c.get("message.timeout.ms"), Some("10000"));
        assert_eq!(c.get("message.send.max.retries"), None);
    }
}
