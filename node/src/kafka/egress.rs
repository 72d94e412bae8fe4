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
//! - `exactly-once`: refused at start for now (the design is in the closing note of issue 11's
//!   second session: the partition and a lower bound of the offset are written into the record
//!   before it is produced, so that after a crash only that range is searched for its id).
//!
//! Every produced record carries the header `statemesh-record-id` with the egress record's
//! stable id (`<key group>-<epoch>-<n>`, the same at every delivery), so a reader can drop a
//! duplicate. A record whose value is not a `KafkaProducerRecord` is dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use statemesh_sdk::{TypedValue, DEAD_LETTERS_TOPIC};
use tokio::sync::watch;

use crate::egress::Egress;
use crate::module::{DeliverySemantic, KafkaEgress};

/// The v3 SDKs' typename of a Kafka record.
pub const RECORD_TYPE_V3: &str = "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord";
/// The 2.x SDK's typename of a Kafka record.
pub const RECORD_TYPE_V2: &str =
    "type.googleapis.com/org.apache.flink.statefun.flink.io.KafkaProducerRecord";
/// The header carrying a record's stable id.
pub const ID_HEADER: &str = "statemesh-record-id";
/// Most records produced at once per egress.
const BATCH: usize = 1000;

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
            tasks.push(tokio::spawn(run(
                Arc::new(spec.clone()),
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

/// The producer's configuration; `exactly-once` is refused (not supported yet).
pub(crate) fn config(spec: &KafkaEgress) -> Result<ClientConfig, String> {
    if let DeliverySemantic::ExactlyOnce { .. } = spec.semantic {
        return Err(format!(
            "Kafka egress {:?}: deliverySemantic exactly-once is not supported yet; use at-least-once (every record carries the header {ID_HEADER} with its stable id, so a reader can drop duplicates)",
            spec.id
        ));
    }
    let mut fixed = vec![("bootstrap.servers", spec.address.as_str())];
    if spec.semantic == DeliverySemantic::AtLeastOnce {
        fixed.push(("acks", "all"));
        // Retries keep the order of a partition's records.
        fixed.push(("max.in.flight.requests.per.connection", "1"));
    }
    let has = |k: &str| spec.properties.iter().any(|(p, _)| p == k);
    if !has("linger.ms") {
        fixed.push(("linger.ms", "1"));
    }
    // A broker that is down fails a record after 10 s (not librdkafka's 5 minutes): it is
    // produced again, and `/readyz` says why meanwhile.
    if !has("message.timeout.ms") {
        fixed.push(("message.timeout.ms", "10000"));
    }
    crate::kafka::client_config(
        &format!("Kafka egress {}", spec.id),
        &spec.properties,
        &fixed,
    )
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
                    dead_letter(&egress, &spec, value, e);
                    continue;
                }
            };
            let id = key.as_deref().and_then(crate::store::egress_record_id);
            let mut fr = FutureRecord::<str, [u8]>::to(&r.topic).payload(&r.value_bytes);
            if !r.key.is_empty() {
                fr = fr.key(&r.key);
            }
            if let Some(id) = &id {
                fr = fr.headers(OwnedHeaders::new().insert(Header {
                    key: ID_HEADER,
                    value: Some(id.as_bytes()),
                }));
            }
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
                        format!("the broker refused the record for good: {e}"),
                    );
                    done.extend(key);
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

fn dead_letter(egress: &Egress, spec: &KafkaEgress, value: &TypedValue, error: String) {
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
    egress.publish_durable(
        DEAD_LETTERS_TOPIC,
        TypedValue::new("statemesh/DeadLetter", json.to_string().into_bytes()),
        None,
    );
}
