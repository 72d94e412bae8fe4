//! `example/forward`: hands each message on to Kafka (the Kafka benchmark's workload).

use statemesh_sdk::{FnFunction, FunctionError, TypedValue, ValueSpec};

/// The function type.
pub const TYPE: &str = "example/forward";
/// The Kafka egress it sends to (declare it in the module to produce to Kafka).
pub const EGRESS: &str = "example/kafka";
/// The topic its records go to.
pub const TOPIC: &str = "forwarded";

fn put_bytes(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
    out.push(tag);
    let mut n = b.len() as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(b);
}

/// A `KafkaProducerRecord { key = 1, value_bytes = 2, topic = 3 }` as the v3 SDKs' typename.
pub fn kafka_record(topic: &str, key: &str, value: &[u8]) -> TypedValue {
    let mut v = Vec::with_capacity(key.len() + value.len() + topic.len() + 12);
    put_bytes(&mut v, 0x0A, key.as_bytes());
    put_bytes(&mut v, 0x12, value);
    put_bytes(&mut v, 0x1A, topic.as_bytes());
    TypedValue::new(
        "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord",
        v,
    )
}

/// Message: anything; its bytes go to topic `forwarded`, keyed by the instance id. State:
/// `forwarded`, how many it handed on.
pub fn function() -> FnFunction {
    let forwarded = ValueSpec::<i64>::new("forwarded");
    FnFunction::new(vec![forwarded.descriptor().clone()], move |ctx, msg| {
        let n = ctx.get(&forwarded)?.unwrap_or(0) + 1;
        ctx.set(&forwarded, &n)?;
        let id = ctx.self_address().id.clone();
        ctx.send_egress(EGRESS, kafka_record(TOPIC, &id, msg.value()));
        Ok::<(), FunctionError>(())
    })
}
