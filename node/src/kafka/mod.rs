//! Kafka ingress (issue 11): records from Kafka topics delivered to functions exactly once.
//!
//! # How offsets become part of each epoch
//!
//! Each partition of an ingress topic has a **partition instance**: an address of the built-in
//! function type [`PARTITION_TYPE`] with the id `<ingress id>:<topic>:<partition>`. Its one
//! state, `next`, is the offset of the first record not yet delivered. The ingress's consumer
//! reads records and calls the partition instance with a batch of them ([`Records`]); the
//! invocation sends each record on to its targets and advances `next`, so the offset and the
//! record's messages are one invocation's effects: they commit in the same epoch or not at
//! all, like any function's state and messages. Recovery, rollbacks and hand-overs of its key
//! group restore `next` with everything else.
//!
//! The instance decides what a batch means, so the consumer cannot break exactly-once:
//! - records below `next` were delivered already and are skipped;
//! - a batch starting after `next` (the consumer is ahead of what committed, after a crash or
//!   a rollback) is refused whole;
//! - every batch is answered with the new `next`, and the consumer seeks there whenever it
//!   differs from where it read on.
//!
//! The consumer calls with one batch in flight per partition, and the reply comes once the
//! epoch commits (with durable acknowledgements): a partition delivers what arrived while its
//! last batch committed as the next batch, so batches grow with load like group commit.
//!
//! # Where partitions are consumed
//!
//! A partition is consumed by the node that owns its instance's key group: placement spreads
//! partitions over the nodes with the key groups, and a partition moves when its key group
//! does (a failover, a join, a leave). The consumer of a node watches which instances it owns
//! ([`ingress`]). A batch that reaches an instance after it moved is answered by its new owner
//! with the same rules, so two consumers overlapping for a moment duplicate nothing.
//!
//! Offsets are also committed to the consumer group (`consumerGroupId`) after each batch
//! commits, for monitoring tools; the instance's `next` is what recovery trusts. A partition
//! whose instance has no `next` yet starts at the ingress's startup position, pinned by an
//! empty batch before the first record is read (so a crash before the first record cannot
//! move a `latest` start forward past records produced meanwhile).

pub(crate) mod egress;
pub(crate) mod ingress;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use prost::Message;
use statemesh_sdk::{
    typenames, Address, Context, FunctionError, StatefulFunction, TypeName, TypedValue, ValueSpec,
    ValueSpecDescriptor, DEAD_LETTERS_TOPIC,
};

use crate::module::KafkaIngress;

/// The function type of partition instances.
pub const PARTITION_TYPE: &str = "statemesh.kafka/partition";
/// The typename of a batch of records ([`Records`]).
pub const RECORDS_TYPE: &str = "statemesh.kafka/Records";

/// A batch of records of one partition, for its partition instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Records {
    /// The ingress id.
    #[prost(string, tag = "1")]
    pub ingress: String,
    /// The topic.
    #[prost(string, tag = "2")]
    pub topic: String,
    /// The partition.
    #[prost(int32, tag = "3")]
    pub partition: i32,
    /// The offset the consumer read on from (the instance's `next` as the consumer knows it).
    #[prost(int64, tag = "4")]
    pub first: i64,
    /// The consumer's position after the batch (past its last record, and past offsets
    /// without records such as transaction markers).
    #[prost(int64, tag = "5")]
    pub end: i64,
    /// The records, in offset order.
    #[prost(message, repeated, tag = "6")]
    pub records: Vec<Record>,
}

/// One Kafka record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Its offset.
    #[prost(int64, tag = "1")]
    pub offset: i64,
    /// Its key (`None`: the record has none).
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    /// Its value (empty for a null value).
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
    /// Its size, if it is too large to be handed on (its key and value are not carried then):
    /// it is dead-lettered.
    #[prost(uint64, optional, tag = "4")]
    pub too_large: Option<u64>,
}

/// A librdkafka configuration: a module's `properties`, then `fixed` (which win). Properties
/// of Java's Kafka client that librdkafka does not know (`max.poll.records`,
/// `key.serializer`, `ssl.truststore.location`, …; StateFun modules carry them) are left out
/// with a warning; a known property with a value librdkafka refuses is an error naming it.
pub(crate) fn client_config(
    client: &str,
    properties: &[(String, String)],
    fixed: &[(&str, &str)],
) -> Result<rdkafka::config::ClientConfig, String> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaConfRes;
    let mut cfg = rdkafka::config::ClientConfig::new();
    for (k, v) in properties {
        let mut one = rdkafka::config::ClientConfig::new();
        one.set(k, v);
        match one.create_native_config() {
            Ok(_) => {
                cfg.set(k, v);
            }
            Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => {
                tracing::warn!(client, property = %k, "a Kafka client property librdkafka does not know is left out (Java client only)");
            }
            Err(e) => return Err(format!("{client}: property {k} = {v:?}: {e}")),
        }
    }
    for (k, v) in fixed {
        cfg.set(*k, *v);
    }
    cfg.create_native_config()
        .map_err(|e| format!("{client}: {e}"))?;
    Ok(cfg)
}

/// Checks a module's Kafka clients before the node starts anything: their configurations,
/// and what is not supported.
pub(crate) fn check(module: &crate::module::Module, checkpointing: bool) -> Result<(), String> {
    for i in &module.kafka_ingresses {
        ingress::config(i)?;
        if !checkpointing {
            tracing::warn!(ingress = %i.id, "checkpoints are off: the Kafka ingress is not exactly once (its offsets and the records' effects are not committed together)");
        }
    }
    for e in &module.kafka_egresses {
        egress::config(e)?;
        if !checkpointing {
            if let crate::module::DeliverySemantic::ExactlyOnce { .. } = e.semantic {
                return Err(format!("Kafka egress {:?}: deliverySemantic exactly-once needs checkpoints (its records are placed in committed epochs before they are produced); turn checkpoints on or use at-least-once", e.id));
            }
        }
    }
    Ok(())
}

/// The partition instance's address.
pub fn partition_address(ingress: &str, topic: &str, partition: i32) -> Address {
    Address::new(
        TypeName::parse(PARTITION_TYPE).expect("valid type"),
        format!("{ingress}:{topic}:{partition}"),
    )
    .expect("non-empty id")
}

struct Topic {
    value_type: Arc<str>,
    /// Each target type and whether the node runs it.
    targets: Vec<(TypeName, bool)>,
}

/// The partition instances' function: delivers a batch's records not yet delivered and
/// advances `next` (module doc).
pub(crate) struct PartitionFn {
    /// (ingress id, topic) → where its records go.
    topics: HashMap<(String, String), Topic>,
    next: ValueSpec<i64>,
}

impl PartitionFn {
    /// For `ingresses`; `known` says whether the node runs a function type (a record for a
    /// type it does not run is dead-lettered).
    pub fn new(ingresses: &[KafkaIngress], known: impl Fn(&TypeName) -> bool) -> Self {
        let mut topics = HashMap::new();
        for i in ingresses {
            for t in &i.topics {
                let targets = t
                    .targets
                    .iter()
                    .filter_map(|s| TypeName::parse(s).ok())
                    .map(|tn| {
                        let k = known(&tn);
                        if !k {
                            tracing::warn!(ingress = %i.id, topic = %t.topic, target = %tn, "a Kafka ingress target is not a function type this node runs; its records will be dead-lettered");
                        }
                        (tn, k)
                    })
                    .collect();
                topics.insert(
                    (i.id.clone(), t.topic.clone()),
                    Topic {
                        value_type: Arc::from(t.value_type.as_str()),
                        targets,
                    },
                );
            }
        }
        PartitionFn {
            topics,
            next: ValueSpec::new("next"),
        }
    }
}

/// Checks a value of one of StateFun's built-in types decodes as that type.
fn check_value(v: &TypedValue) -> Result<(), String> {
    let r = match v.typename() {
        typenames::LONG => v.get::<i64>().map(drop),
        typenames::INT => v.get::<i32>().map(drop),
        typenames::DOUBLE => v.get::<f64>().map(drop),
        typenames::FLOAT => v.get::<f32>().map(drop),
        typenames::BOOL => v.get::<bool>().map(drop),
        typenames::STRING => v.get::<String>().map(drop),
        _ => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

fn dead_letter(
    ctx: &mut Context<'_>,
    batch: &Records,
    record: &Record,
    target: Option<&Address>,
    typename: &str,
    error: String,
) {
    tracing::warn!(ingress = %batch.ingress, topic = %batch.topic, partition = batch.partition, offset = record.offset, error = %error, "Kafka record dead-lettered");
    let json = serde_json::json!({
        "address": target.map(|t| t.to_string()),
        "caller": ctx.self_address().to_string(),
        "typename": typename,
        "value_base64": base64::engine::general_purpose::STANDARD.encode(&record.value),
        "key_base64": record.key.as_ref().map(|k| base64::engine::general_purpose::STANDARD.encode(k)),
        "error": error,
        "attempts": 0,
        "kafka": {
            "ingress": batch.ingress,
            "topic": batch.topic,
            "partition": batch.partition,
            "offset": record.offset,
        },
    });
    ctx.send_egress(
        DEAD_LETTERS_TOPIC,
        TypedValue::new("statemesh/DeadLetter", json.to_string().into_bytes()),
    );
}

impl StatefulFunction for PartitionFn {
    fn value_specs(&self) -> Vec<ValueSpecDescriptor> {
        vec![self.next.descriptor().clone()]
    }

    fn invoke(&self, ctx: &mut Context<'_>, message: &TypedValue) -> Result<(), FunctionError> {
        if message.typename() != RECORDS_TYPE {
            return Err(FunctionError::msg(format!(
                "{PARTITION_TYPE} takes {RECORDS_TYPE} batches from the Kafka ingress, not {}",
                message.typename()
            )));
        }
        let batch = Records::decode(message.value().as_ref())
            .map_err(|e| FunctionError::msg(format!("a malformed {RECORDS_TYPE} batch: {e}")))?;
        let next = ctx.get(&self.next)?.unwrap_or(batch.first);
        if batch.first > next {
            // The consumer read on from past what committed here: it seeks back to `next`.
            ctx.reply(TypedValue::of(&next));
            return Ok(());
        }
        let topic = self
            .topics
            .get(&(batch.ingress.clone(), batch.topic.clone()));
        for record in batch.records.iter().filter(|r| r.offset >= next) {
            if let Some(size) = record.too_large {
                let e = format!(
                    "Kafka record {}/{}@{} of {size} bytes is larger than the node takes (max_message_bytes)",
                    batch.topic, batch.partition, record.offset
                );
                dead_letter(ctx, &batch, record, None, "", e);
                continue;
            }
            let Some(topic) = topic else {
                let e = format!(
                    "the module has no Kafka ingress {:?} reading topic {:?} (it changed since the record was read)",
                    batch.ingress, batch.topic
                );
                dead_letter(ctx, &batch, record, None, "", e);
                continue;
            };
            let id = match record.key.as_deref().map(std::str::from_utf8) {
                Some(Ok(k)) if !k.is_empty() => k,
                Some(Ok(_)) | None => {
                    let e = format!(
                        "Kafka record {}/{}@{} has no key: the key (UTF-8) names the target id",
                        batch.topic, batch.partition, record.offset
                    );
                    dead_letter(ctx, &batch, record, None, &topic.value_type, e);
                    continue;
                }
                Some(Err(_)) => {
                    let e = format!(
                        "Kafka record {}/{}@{}: its key is not UTF-8 (the key names the target id)",
                        batch.topic, batch.partition, record.offset
                    );
                    dead_letter(ctx, &batch, record, None, &topic.value_type, e);
                    continue;
                }
            };
            let value = TypedValue::new(topic.value_type.clone(), record.value.clone());
            if let Err(e) = check_value(&value) {
                let e = format!(
                    "Kafka record {}/{}@{}: its value is not a {}: {e}",
                    batch.topic, batch.partition, record.offset, topic.value_type
                );
                dead_letter(ctx, &batch, record, None, &topic.value_type, e);
                continue;
            }
            for (typ, known) in &topic.targets {
                let target = Address::new(typ.clone(), id).expect("non-empty id");
                if *known {
                    ctx.send(target, value.clone());
                } else {
                    let e = format!(
                        "Kafka record {}/{}@{}: unknown function type {typ} (no embedded function or module endpoint serves it)",
                        batch.topic, batch.partition, record.offset
                    );
                    dead_letter(ctx, &batch, record, Some(&target), &topic.value_type, e);
                }
            }
        }
        let new_next = next.max(batch.end);
        if ctx.get(&self.next)? != Some(new_next) {
            ctx.set(&self.next, &new_next)?;
        }
        ctx.reply(TypedValue::of(&new_next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use statemesh_sdk::{Effects, StateSlot, Undo};

    use super::*;
    use crate::module::{AutoOffsetReset, KafkaTopic, StartupPosition, WireProtocol};

    fn ingress() -> KafkaIngress {
        KafkaIngress {
            id: "a/in".into(),
            address: "k:9092".into(),
            group_id: "g".into(),
            topics: vec![KafkaTopic {
                topic: "t".into(),
                value_type: typenames::LONG.into(),
                targets: vec!["a/counter".into(), "a/missing".into()],
            }],
            startup: StartupPosition::Earliest,
            auto_offset_reset: AutoOffsetReset::Earliest,
            properties: vec![],
            protocol: WireProtocol::V3,
        }
    }

    struct Harness {
        f: PartitionFn,
        state: Vec<StateSlot>,
        me: Address,
        caller: Address,
    }

    impl Harness {
        fn new() -> Self {
            let f = PartitionFn::new(&[ingress()], |t| t.as_str() == "a/counter");
            let state = vec![StateSlot::empty(f.next.descriptor())];
            Harness {
                f,
                state,
                me: partition_address("a/in", "t", 0),
                caller: Address::parse("statemesh/reply/1.2").unwrap(),
            }
        }

        /// Invokes with a batch; returns the reply and the other effects.
        fn call(&mut self, first: i64, end: i64, records: Vec<Record>) -> (i64, Effects) {
            let batch = Records {
                ingress: "a/in".into(),
                topic: "t".into(),
                partition: 0,
                first,
                end,
                records,
            };
            let mut eff = Effects::default();
            let mut undo: Vec<Undo> = Vec::new();
            let mut ctx = Context::new(
                &self.me,
                Some(&self.caller),
                0,
                &mut self.state,
                &mut eff,
                &mut undo,
            );
            self.f
                .invoke(
                    &mut ctx,
                    &TypedValue::new(RECORDS_TYPE, batch.encode_to_vec()),
                )
                .unwrap();
            let i = eff
                .messages
                .iter()
                .position(|(a, _)| *a == self.caller)
                .expect("a reply");
            let (_, reply) = eff.messages.remove(i);
            (reply.get::<i64>().unwrap(), eff)
        }
    }

    fn rec(offset: i64, key: Option<&str>, v: i64) -> Record {
        Record {
            offset,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: TypedValue::of(&v).value().to_vec(),
            too_large: None,
        }
    }

    #[test]
    fn offsets_advance_with_the_records_and_nothing_is_delivered_twice() {
        let mut h = Harness::new();
        // The first (empty) batch pins the start.
        assert_eq!(h.call(5, 5, vec![]).0, 5);
        // A batch from past `next` is refused: the consumer seeks back.
        let (n, eff) = h.call(7, 9, vec![rec(7, Some("x"), 1), rec(8, Some("x"), 2)]);
        assert_eq!((n, eff.messages.len()), (5, 0));
        let (n, eff) = h.call(5, 7, vec![rec(5, Some("x"), 1), rec(6, Some("y"), 2)]);
        assert_eq!(n, 7);
        let to: Vec<String> = eff.messages.iter().map(|(a, _)| a.to_string()).collect();
        assert_eq!(to, ["a/counter/x", "a/counter/y"]);
        // a/missing is not run here: one dead letter per record, naming partition and offset.
        assert_eq!(eff.egress.len(), 2);
        assert!(String::from_utf8_lossy(eff.egress[0].1.value())
            .contains("unknown function type a/missing"));
        // A batch sent again (a retry after a lost reply) delivers only what is new.
        let (n, eff) = h.call(
            5,
            9,
            vec![
                rec(5, Some("x"), 1),
                rec(6, Some("y"), 2),
                rec(8, Some("z"), 3),
            ],
        );
        assert_eq!((n, eff.messages.len()), (9, 1));
        // An empty batch from an older start leaves `next` alone.
        assert_eq!(h.call(0, 0, vec![]).0, 9);
    }

    #[test]
    fn an_exactly_once_egress_needs_checkpoints() {
        let m = crate::module::Module::parse(
            "kind: io.statefun.kafka.v1/egress
spec:
  id: a/out
  address: 127.0.0.1:9092
  deliverySemantic:
    type: exactly-once
    transactionTimeout: 15min
",
            std::path::Path::new("module.yaml"),
        )
        .unwrap();
        assert_eq!(check(&m, true), Ok(()));
        let e = check(&m, false).unwrap_err();
        assert!(
            e.contains("\"a/out\"") && e.contains("exactly-once needs checkpoints"),
            "{e}"
        );
    }

    #[test]
    fn java_client_properties_are_left_out_and_bad_values_refused() {
        let props = vec![
            ("max.poll.records".to_string(), "500".to_string()),
            ("fetch.wait.max.ms".to_string(), "5".to_string()),
        ];
        let cfg = client_config("t", &props, &[("bootstrap.servers", "k:9092")]).unwrap();
        assert_eq!(cfg.get("max.poll.records"), None);
        assert_eq!(cfg.get("fetch.wait.max.ms"), Some("5"));
        let e = client_config(
            "Kafka ingress a/b",
            &[("fetch.wait.max.ms".to_string(), "soon".to_string())],
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains("fetch.wait.max.ms") && e.contains("Kafka ingress a/b"),
            "{e}"
        );
    }

    #[test]
    fn bad_records_are_dead_lettered_with_partition_and_offset() {
        let mut h = Harness::new();
        let bad_value = Record {
            offset: 2,
            key: Some(b"k".to_vec()),
            value: b"not a long".to_vec(),
            too_large: None,
        };
        let non_utf8 = Record {
            offset: 3,
            key: Some(vec![0xff, 0xfe]),
            value: vec![],
            too_large: None,
        };
        let huge = Record {
            offset: 4,
            key: None,
            value: vec![],
            too_large: Some(5 << 20),
        };
        let (n, eff) = h.call(
            0,
            5,
            vec![
                rec(0, None, 1),
                rec(1, Some(""), 1),
                bad_value,
                non_utf8,
                huge,
            ],
        );
        assert_eq!((n, eff.messages.len(), eff.egress.len()), (5, 0, 5));
        let texts: Vec<String> = eff
            .egress
            .iter()
            .map(|(topic, v)| {
                assert_eq!(topic, DEAD_LETTERS_TOPIC);
                String::from_utf8_lossy(v.value()).into_owned()
            })
            .collect();
        assert!(
            texts[0].contains("t/0@0 has no key") && texts[0].contains("\"offset\":0"),
            "{}",
            texts[0]
        );
        assert!(texts[1].contains("t/0@1 has no key"), "{}", texts[1]);
        assert!(
            texts[2].contains("t/0@2: its value is not a io.statefun.types/long"),
            "{}",
            texts[2]
        );
        assert!(texts[3].contains("not UTF-8"), "{}", texts[3]);
        assert!(
            texts[4].contains("t/0@4 of 5242880 bytes is larger"),
            "{}",
            texts[4]
        );
    }
}
