//! Kafka ingress (issue 11) against a real Kafka-protocol broker (tansu, `common::kafka`) and
//! the real `statemesh` binary.

mod common;

use std::time::Duration;

use common::kafka::{produce, Broker};
use common::{eventually, next_egress, state_value, Node};
use statemesh_sdk::TypedValue;

fn long(v: i64) -> Vec<u8> {
    TypedValue::of(&v).value().to_vec()
}

fn v1_module(bootstrap: &str, topic: &str) -> String {
    format!(
        "kind: io.statefun.kafka.v1/ingress
spec:
  id: test/deltas
  address: {bootstrap}
  consumerGroupId: statemesh-test
  startupPosition:
    type: earliest
  topics:
    - topic: {topic}
      valueType: io.statefun.types/long
      targets:
        - example/counter
"
    )
}

async fn total(node: &Node, id: &str) -> Option<i64> {
    state_value(node, &format!("example/counter/{id}"), "total")
        .await
        .and_then(|v| v.as_i64())
}

/// Records of a v1 ingress reach their targets (the key is the id), once each, across a
/// SIGKILL of the node; records without a key or with a value that is not the declared type
/// are dead-lettered naming partition and offset, and the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_ingress_feeds_functions_and_dead_letters_bad_records() {
    let broker = Broker::start();
    broker.create_topic("deltas", 3);
    let p = broker.producer();
    // Produced before the node starts: startupPosition earliest reads them.
    for i in 0..300 {
        produce(&p, "deltas", None, Some(&format!("c{}", i % 10)), &long(1)).await;
    }
    produce(&p, "deltas", Some(1), None, &long(1)).await;
    produce(&p, "deltas", Some(2), Some("c0"), b"not a long").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let module = v1_module(&broker.bootstrap, "deltas");
    let node = Node::start_with_module(&data, None, Some(&module));
    for c in 0..10 {
        let id = format!("c{c}");
        eventually(
            &format!("counter {id} at 30"),
            Duration::from_secs(60),
            || async { (total(&node, &id).await == Some(30)).then_some(()) },
        )
        .await;
    }
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let d = next_egress(&node, "statemesh/dead-letters", Duration::from_secs(10)).await;
        reasons.push(String::from_utf8_lossy(&d).into_owned());
    }
    reasons.sort();
    assert!(
        reasons[0].contains("deltas/1@") && reasons[0].contains("has no key"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("deltas/2@") && reasons[1].contains("is not a io.statefun.types/long"),
        "{reasons:?}"
    );

    // Killed and restarted: nothing is read twice, and what comes later is read once.
    node.kill();
    for i in 0..100 {
        produce(&p, "deltas", None, Some(&format!("c{}", i % 10)), &long(1)).await;
    }
    let node = Node::start_with_module(&data, None, Some(&module));
    for c in 0..10 {
        let id = format!("c{c}");
        eventually(
            &format!("counter {id} at 40"),
            Duration::from_secs(60),
            || async { (total(&node, &id).await == Some(40)).then_some(()) },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for c in 0..10 {
        assert_eq!(total(&node, &format!("c{c}")).await, Some(40), "c{c}");
    }
    node.stop();
}
