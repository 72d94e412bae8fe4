//! Integration tests of a single node: the real `statemesh` binary on loopback ports chosen
//! at run time, driven through gRPC, HTTP and the CLI.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, http, next_egress, pop_egress, post, state_value, Node};
use futures::StreamExt;
use statemesh_sdk::{typenames, Address, TypedValue};

const LONG: &str = typenames::LONG;
const STRING: &str = typenames::STRING;

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_over_grpc_http_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), None);
    let client = node.client().await;

    let r = client
        .call(
            &addr("example/greeter/alice"),
            TypedValue::of(&"hi".to_string()),
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<String>().unwrap(),
        "Hello alice, you are visitor #1"
    );

    let (s, ct, body) = post(&node, "call", "example/greeter/alice", STRING, "hi").await;
    assert_eq!(
        (s, ct.as_str(), body.as_str()),
        (
            200,
            "application/vnd.io.statefun.types/string",
            "Hello alice, you are visitor #2"
        )
    );
    let (s, _, body) = http(
        &format!("{}/v1/call/example/greeter/alice", node.http),
        "POST",
        Some("text/plain"),
        Bytes::from("x"),
    )
    .await;
    assert_eq!(
        (s, &body[..]),
        (200, &b"Hello alice, you are visitor #3"[..])
    );

    let (ok, out, err) = node.cli(&["call", "example/greeter/alice", "hi"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "Hello alice, you are visitor #4");

    let (ok, out, err) = node.cli(&["call", "example/counter/c", "5", "--type", "long"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "5");
    let (ok, _, err) = node.cli(&["send", "example/counter/c", "7", "--type", "long"]);
    assert!(ok, "{err}");
    eventually("send applied", Duration::from_secs(10), || async {
        (state_value(&node, "example/counter/c", "total").await == Some(serde_json::json!(12)))
            .then_some(())
    })
    .await;

    let (ok, out, err) = node.cli(&["state", "get", "example/greeter/alice"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["states"]["visits"]["value"], 4);
    assert_eq!(j["states"]["visits"]["typename"], LONG);

    let (s, _, body) = post(&node, "send", "example/counter/c", LONG, "1").await;
    assert_eq!(s, 202, "{body}");
    let (s, _, body) = http(
        &format!("{}/v1/functions", node.http),
        "GET",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("example/greeter"));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http(&format!("{}{path}", node.http), "GET", None, Bytes::new())
                .await
                .0,
            200
        );
    }
    assert!(node.metric("statemesh_invocations_total").await >= 6.0);
    let (s, _, body) = http(&format!("{}/metrics", node.http), "GET", None, Bytes::new()).await;
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&body);
    for m in [
        "statemesh_invocation_duration_seconds_bucket",
        "statemesh_active_instances",
        "statemesh_inbox_depth",
        "statemesh_ingress_errors_total",
    ] {
        assert!(text.contains(m), "metrics lack {m}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = Node::start(&data, None);
    let c = node.client().await;
    for i in 0..20 {
        c.call(
            &addr(&format!("example/counter/k{}", i % 4)),
            TypedValue::of(&1i64),
        )
        .await
        .unwrap();
    }
    node.stop().await;
    let node = Node::start(&data, None);
    let c = node.client().await;
    for k in 0..4 {
        let r = c
            .call(
                &addr(&format!("example/counter/k{k}")),
                TypedValue::of(&1i64),
            )
            .await
            .unwrap();
        assert_eq!(r.get::<i64>().unwrap(), 6, "k{k}");
    }
    // State of an address that was never activated since the restart is read from sled.
    let states = c.get_state(&addr("example/counter/k0")).await.unwrap();
    assert_eq!(states[0].0, "total");
    node.stop().await;
}

/// Sends `record` to the egress topic `smoke` through the smoke interpreter at `target`.
async fn emit(node: &Node, target: &Address, record: &str) {
    let cmds = serde_json::json!({ "cmds": [{ "egress": record }] });
    let msg = TypedValue::new(
        "statemesh.smoke/Commands",
        serde_json::to_vec(&cmds).unwrap(),
    );
    node.client().await.send(target, msg).await.unwrap();
}

/// The next record of topic `smoke` over HTTP: (record, id).
async fn read_smoke(node: &Node) -> (String, String) {
    eventually("an egress record", Duration::from_secs(10), || async {
        let (s, id, body) = pop_egress(node, "smoke").await;
        (s == 200).then(|| {
            let id = id.expect("a durable record has an id");
            (String::from_utf8_lossy(&body).to_string(), id)
        })
    })
    .await
}

/// An egress record id's (key group, epoch, n).
fn id_parts(id: &str) -> (u64, u64, u64) {
    let p: Vec<u64> = id
        .split('-')
        .map(|x| x.parse().unwrap_or_else(|_| panic!("record id {id:?}")))
        .collect();
    assert_eq!(p.len(), 3, "record id {id:?}");
    (p[0], p[1], p[2])
}

/// Egress records carry ids (`Statemesh-Record-Id` over HTTP, `EgressRecord.id` over gRPC),
/// and an id is never another record's: not after a restart that finds every earlier record
/// read (the numbering once started over there), nor for records written after a crash that
/// left one unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_record_ids_are_never_reused_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let target = addr("statemesh.smoke/fn/ids");
    let mut read: Vec<(String, String)> = Vec::new();
    let node = Node::start(&data, None);
    for i in 0..3 {
        emit(&node, &target, &format!("a{i}")).await;
    }
    for _ in 0..3 {
        read.push(read_smoke(&node).await);
    }
    node.stop().await;
    // Every record was read: the restarted node finds none to number after.
    let node = Node::start(&data, None);
    for i in 0..3 {
        emit(&node, &target, &format!("b{i}")).await;
    }
    for _ in 0..2 {
        read.push(read_smoke(&node).await);
    }
    let c = node.client().await;
    let mut sub = Box::pin(c.subscribe_records("smoke").await.unwrap());
    let r = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a record within 10 s")
        .unwrap()
        .unwrap();
    drop(sub);
    read.push((
        r.value.get::<String>().unwrap(),
        r.id.expect("an id over gRPC"),
    ));
    // One record left unread across a SIGKILL, then one more.
    emit(&node, &target, "c0").await;
    node.kill();
    let node = Node::start(&data, None);
    emit(&node, &target, "d0").await;
    for _ in 0..2 {
        read.push(read_smoke(&node).await);
    }
    assert_eq!(
        (read
            .iter()
            .map(|r| r.0.as_str())
            .collect::<std::collections::BTreeSet<_>>())
        .len(),
        8,
        "{read:?}"
    );
    let ids: std::collections::BTreeSet<&str> = read.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(ids.len(), 8, "an id was given twice: {read:?}");
    let parts: std::collections::BTreeMap<&str, (u64, u64, u64)> = read
        .iter()
        .map(|(r, id)| (r.as_str(), id_parts(id)))
        .collect();
    let kg = parts["a0"].0;
    assert!(
        parts.values().all(|p| p.0 == kg),
        "one address, one key group: {read:?}"
    );
    // Numbered in the epochs that wrote them: later runs, later epochs. (`c0`'s message was
    // acknowledged once its epoch committed, but the function may have written the record in
    // the next one, which the SIGKILL abandoned: then the restart writes it again, in the same
    // epoch as `d0`, under another number.)
    let epoch = |r: &str| parts[r].1;
    assert!(epoch("a2") < epoch("b0"), "{read:?}");
    assert!(
        epoch("b2") <= epoch("c0") && epoch("c0") <= epoch("d0"),
        "{read:?}"
    );
    node.stop().await;
}

/// `egress_reads = "at-least-once"`: a read is answered before the epoch deleting its record
/// commits, and does not hasten that epoch. Epochs here start every 60 s unless an output
/// waits, so a SIGKILL right after a read finds the deletion uncommitted: the record is read
/// again, under the same id. Once a later epoch committed the deletion, it is gone for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_egress_reads_give_a_record_again_after_a_crash_under_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let config = "egress_reads = \"at-least-once\"\n[checkpoint]\ninterval_ms = 60000\n";
    let target = addr("statemesh.smoke/fn/alo");
    let node = Node::start(&data, Some(config));
    emit(&node, &target, "a").await;
    let first = read_smoke(&node).await;
    assert_eq!(first.0, "a");
    node.kill();
    let node = Node::start(&data, Some(config));
    assert_eq!(
        read_smoke(&node).await,
        first,
        "read again after the crash, under the same id"
    );
    // `b`'s epochs (its send, then its record) commit the deletion of `a`.
    emit(&node, &target, "b").await;
    let second = read_smoke(&node).await;
    assert_eq!(second.0, "b");
    node.kill();
    let node = Node::start(&data, Some(config));
    assert_eq!(
        read_smoke(&node).await,
        second,
        "`b` again (its deletion was not committed), and not `a`"
    );
    // A graceful stop commits a last epoch: nothing is read again.
    node.stop().await;
    let node = Node::start(&data, Some(config));
    let (status, id, body) = pop_egress(&node, "smoke").await;
    assert_eq!(
        status,
        204,
        "nothing left after a graceful stop: {id:?} {:?}",
        String::from_utf8_lossy(&body)
    );
    node.stop().await;
}

async fn stock(node: &Node, item: &str) -> i64 {
    state_value(node, &format!("example/stock/{item}"), "quantity")
        .await
        .and_then(|v| v.as_i64())
        .unwrap_or(0)
}

async fn cart(node: &Node, user: &str) -> serde_json::Value {
    let (s, _, body) = post(
        node,
        "call",
        &format!("example/cart/{user}"),
        "example/ViewCart",
        "{}",
    )
    .await;
    assert_eq!(s, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_fires_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = Node::start(&data, None);
    assert_eq!(
        post(&node, "call", "example/stock/apple", LONG, "10")
            .await
            .2,
        "10"
    );
    let add = r#"{"item":"apple","quantity":3,"checkout_timeout_ms":1500}"#;
    assert_eq!(
        post(&node, "send", "example/cart/bob", "example/AddToCart", add)
            .await
            .0,
        202
    );
    eventually("item in cart", Duration::from_secs(10), || async {
        (cart(&node, "bob").await["apple"] == 3).then_some(())
    })
    .await;
    assert_eq!(stock(&node, "apple").await, 7);
    node.stop().await;
    // The timeout comes due while the node is down; it must fire after the restart.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let node = Node::start(&data, None);
    eventually(
        "abandoned cart restocked",
        Duration::from_secs(10),
        || async { (stock(&node, "apple").await == 10).then_some(()) },
    )
    .await;
    assert_eq!(cart(&node, "bob").await, serde_json::json!({}));
    assert_eq!(
        node.metric("statemesh_dead_letters_total").await,
        0.0,
        "the cart takes stock's answer to its restock"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_cancels_timeout_and_publishes_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), None);
    let client = node.client().await;
    let mut receipts = client.subscribe("receipts").await.unwrap();
    assert_eq!(
        post(&node, "call", "example/stock/pear", LONG, "5").await.2,
        "5"
    );
    let add = r#"{"item":"pear","quantity":2,"checkout_timeout_ms":800}"#;
    post(&node, "send", "example/cart/ann", "example/AddToCart", add).await;
    eventually("item in cart", Duration::from_secs(10), || async {
        (cart(&node, "ann").await["pear"] == 2).then_some(())
    })
    .await;
    let (s, ct, body) = post(&node, "call", "example/cart/ann", "example/Checkout", "{}").await;
    assert_eq!((s, ct.as_str()), (200, "application/vnd.example/Receipt"));
    let receipt: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        receipt,
        serde_json::json!({"user": "ann", "items": {"pear": 2}})
    );
    let streamed = tokio::time::timeout(Duration::from_secs(10), receipts.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(streamed.typename(), "example/Receipt");
    // The cancelled timeout must not fire. Sentinel: a new item schedules a new timeout with
    // the same token on the same cart (so on the same shard, due later than the cancelled
    // one). Were the old timeout still live, the new one would be dead-lettered as a
    // duplicate token; once the sentinel fires, the cancelled one's time has passed too.
    let add = r#"{"item":"pear","quantity":1,"checkout_timeout_ms":800}"#;
    post(&node, "send", "example/cart/ann", "example/AddToCart", add).await;
    eventually(
        "the sentinel item in the cart",
        Duration::from_secs(10),
        || async { (cart(&node, "ann").await["pear"] == 1).then_some(()) },
    )
    .await;
    eventually(
        "the sentinel timeout restocked",
        Duration::from_secs(20),
        || async {
            (cart(&node, "ann").await == serde_json::json!({}) && stock(&node, "pear").await == 3)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        node.metric("statemesh_dead_letters_total").await,
        0.0,
        "no duplicate timeout token"
    );
    assert_eq!(
        stock(&node, "pear").await,
        3,
        "two purchased, one restocked"
    );
    // A second checkout's receipt is readable through HTTP egress too; an empty topic is 204.
    drop(receipts);
    post(&node, "call", "example/cart/ann", "example/Checkout", "{}").await;
    let (s, _, _) = eventually("receipt over HTTP", Duration::from_secs(5), || async {
        let r = http(
            &format!("{}/v1/egress/receipts", node.http),
            "GET",
            None,
            Bytes::new(),
        )
        .await;
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        http(
            &format!("{}/v1/egress/nothing-here", node.http),
            "GET",
            None,
            Bytes::new()
        )
        .await
        .0,
        204
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), None);
    // Keep invoking more often than the 1 s TTL: `calls` (after invoke) survives, `value`
    // (after write) too since each call rewrites it. That holds only if no two consecutive
    // calls were a TTL apart at the node; the time from one call's start to the next one's
    // end bounds that. On a machine too loaded to stay well below it, the round is
    // inconclusive and runs again on a fresh address.
    let mut attempt = 0;
    let m = loop {
        let m = format!("example/memo/m{attempt}");
        let mut starts = Vec::new();
        let mut gap = Duration::ZERO;
        let mut call = |v: &'static str| {
            let (node, m) = (&node, m.clone());
            starts.push(Instant::now());
            let since = starts.get(starts.len().wrapping_sub(2)).copied();
            async move {
                let r = post(node, "call", &m, STRING, v).await.2;
                (r, since.map(|s| s.elapsed()).unwrap_or_default())
            }
        };
        let (first, _) = call("a").await;
        assert_eq!(first, "");
        let (second, g) = call("b").await;
        gap = gap.max(g);
        let mut rest = Vec::new();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (r, g) = call("c").await;
            gap = gap.max(g);
            rest.push(r);
        }
        let calls = state_value(&node, &m, "calls").await;
        if gap < Duration::from_millis(850) {
            assert_eq!(second, "a");
            assert_eq!(rest, vec!["b", "c", "c"]);
            assert_eq!(calls, Some(serde_json::json!(5)));
            break m;
        }
        attempt += 1;
        assert!(
            attempt < 5,
            "the machine stayed too loaded for a TTL test ({gap:?} between calls)"
        );
        eprintln!("calls {gap:?} apart: inconclusive, again");
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        state_value(&node, &m, "value").await,
        None,
        "expired after write"
    );
    assert_eq!(
        state_value(&node, &m, "calls").await,
        None,
        "expired after invoke"
    );
    assert_eq!(
        post(&node, "call", &m, STRING, "d").await.2,
        "",
        "expired value reads as absent"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_order_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), None);
    let client = node.client().await;
    let addresses = 50;
    let per_address = 400i64;
    // One ordered stream interleaving all addresses, plus concurrent unary senders each
    // owning other addresses.
    let stream_msgs: Vec<(Address, TypedValue)> = (1..=per_address)
        .flat_map(|n| {
            (0..addresses)
                .map(move |a| (addr(&format!("example/sequence/s{a}")), TypedValue::of(&n)))
        })
        .collect();
    let c2 = client.clone();
    let streamer = tokio::spawn(async move {
        c2.send_stream(futures::stream::iter(stream_msgs), 97)
            .await
            .unwrap()
    });
    let mut senders = Vec::new();
    for a in 0..8 {
        let c = client.clone();
        senders.push(tokio::spawn(async move {
            for n in 1..=100i64 {
                c.send(&addr(&format!("example/sequence/u{a}")), TypedValue::of(&n))
                    .await
                    .unwrap();
            }
        }));
    }
    assert_eq!(streamer.await.unwrap(), (addresses * per_address) as u64);
    for s in senders {
        s.await.unwrap();
    }
    for (prefix, count, last) in [("s", addresses, per_address), ("u", 8, 100)] {
        for a in 0..count {
            let a = format!("example/sequence/{prefix}{a}");
            eventually("all processed", Duration::from_secs(20), || async {
                (state_value(&node, &a, "last").await == Some(serde_json::json!(last)))
                    .then_some(())
            })
            .await;
            assert_eq!(
                state_value(&node, &a, "gaps").await,
                None,
                "{a} saw messages out of order"
            );
        }
    }
    node.stop().await;
}

/// An instance keeps its actor while its state is cached: visits seconds apart start it once.
/// With `instance_linger_ms` set, an actor idle that long is stopped and the next visit starts
/// it again; the state stays cached either way (no passivation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_keeps_its_actor_while_its_state_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    for (config, starts) in [(None, 1.0), (Some("instance_linger_ms = 100\n"), 3.0)] {
        let node = Node::start(&dir.path().join(format!("n{starts}")), config);
        let c = node.client().await;
        for round in 1..=3i64 {
            if round > 1 {
                // Longer than a sweep of idle instances (at most 1 s apart).
                tokio::time::sleep(Duration::from_millis(1300)).await;
            }
            let r = c
                .call(&addr("example/counter/kept"), TypedValue::of(&1i64))
                .await
                .unwrap();
            assert_eq!(r.get::<i64>().unwrap(), round, "{config:?}");
        }
        eventually("the metrics folded", Duration::from_secs(5), || async {
            (node.metric("statemesh_invocations_total").await >= 3.0).then_some(())
        })
        .await;
        assert_eq!(
            node.metric("statemesh_instance_actor_starts_total").await,
            starts,
            "{config:?}"
        );
        assert_eq!(node.metric("statemesh_passivations_total").await, 0.0);
        assert_eq!(node.metric("statemesh_active_instances").await, 1.0);
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivation_under_small_instance_limit_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("n"),
        Some("max_active_instances = 4\nidle_timeout_ms = 100\nshards = 2\n"),
    );
    let c = node.client().await;
    for round in 1..=3i64 {
        for k in 0..40 {
            let r = c
                .call(
                    &addr(&format!("example/counter/p{k}")),
                    TypedValue::of(&1i64),
                )
                .await
                .unwrap();
            assert_eq!(r.get::<i64>().unwrap(), round, "p{k}");
        }
    }
    // Passivation waits until an instance's changes are in sled (applied right away when the
    // limit is reached).
    eventually("the instance limit", Duration::from_secs(5), || async {
        (node.metric("statemesh_active_instances").await <= 4.0).then_some(())
    })
    .await;
    assert!(node.metric("statemesh_passivations_total").await >= 36.0);
    // Idle instances are passivated after the idle timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    eventually("idle passivation", Duration::from_secs(5), || async {
        (node.metric("statemesh_active_instances").await == 0.0).then_some(())
    })
    .await;
    let r = c
        .call(&addr("example/counter/p0"), TypedValue::of(&1i64))
        .await
        .unwrap();
    assert_eq!(r.get::<i64>().unwrap(), 4);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), Some("max_message_bytes = 1024\n"));
    let client = node.client().await;

    // Unknown function type.
    let (s, _, body) = post(&node, "call", "example/nope/a", STRING, "x").await;
    assert_eq!(s, 404);
    assert!(
        body.contains("unknown function type \\\"example/nope\\\""),
        "{body}"
    );
    let e = client
        .send(&addr("example/nope/a"), TypedValue::of(&1i64))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    assert!(e.to_string().contains("example/nope"), "{e}");

    // Malformed address and typename.
    let raw = statemesh_proto::v1::SendRequest {
        target: Some(statemesh_proto::v1::Address {
            namespace: "example".into(),
            r#type: "counter".into(),
            id: String::new(),
        }),
        message: Some(TypedValue::of(&1i64).to_proto()),
        idempotency_key: String::new(),
        traceparent: String::new(),
    };
    let mut ingress =
        statemesh_proto::v1::ingress_client::IngressClient::connect(node.grpc.clone())
            .await
            .unwrap();
    let e = ingress.send(raw).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("expected"), "{}", e.message());
    let e = client
        .send(
            &addr("example/counter/a"),
            TypedValue::new("no-slash", Bytes::new()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert!(e.to_string().contains("namespace/name"), "{e}");
    let (s, _, body) = http(
        &format!("{}/v1/send/example/counter/a", node.http),
        "POST",
        Some("application/json"),
        Bytes::from("1"),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("application/vnd."),
        "{body:?}"
    );
    let (s, _, body) = post(&node, "send", "example/counter/a", LONG, "five").await;
    assert_eq!(s, 400);
    assert!(body.contains("expected a 64-bit integer"), "{body}");

    // Too large.
    let big = "x".repeat(2000);
    let (s, _, body) = post(&node, "send", "example/greeter/a", "example/Blob", &big).await;
    assert_eq!(s, 413, "{body}");
    assert!(body.contains("maximum of 1024 bytes"), "{body}");
    let e = client
        .send(
            &addr("example/greeter/a"),
            TypedValue::new("example/Blob", Bytes::from(big)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted));

    // A reply that never comes: 504 / DEADLINE_EXCEEDED.
    let (s, _, body) = http(
        &format!("{}/v1/call/example/cart/z?timeout_ms=200", node.http),
        "POST",
        Some("application/vnd.example/ItemAvailability"),
        Bytes::from(r#"{"item":"a","quantity":0,"in_stock":false}"#),
    )
    .await;
    assert_eq!(s, 504, "{body:?}");
    let e = client
        .call_with(
            &addr("example/sequence/t"),
            TypedValue::of(&"not a long".to_string()),
            None,
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(tonic::Code::DeadlineExceeded) | Some(tonic::Code::Aborted)
        ),
        "{e}"
    );

    // A failing function: retried with backoff, then dead-lettered with its error; the
    // caller hears at once (502 / ABORTED), other addresses keep running.
    let (s, _, body) = post(&node, "call", "example/counter/bad", STRING, "not a long").await;
    assert_eq!(s, 502, "{body}");
    assert!(
        body.contains("after 5 attempts") && body.contains("statemesh/dead-letters"),
        "{body}"
    );
    let dead = next_egress(&node, "statemesh/dead-letters", Duration::from_secs(5)).await;
    let dead: serde_json::Value = serde_json::from_slice(&dead).unwrap();
    // The first dead letter is either call's (both fail to decode their argument).
    assert!(
        dead["error"].as_str().unwrap().contains("cannot decode"),
        "{dead}"
    );
    assert_eq!(dead["attempts"], 5);
    assert_eq!(
        post(&node, "call", "example/counter/good", LONG, "3")
            .await
            .2,
        "3"
    );
    assert!(node.metric("statemesh_dead_letters_total").await >= 1.0);
    assert!(node.metric("statemesh_invocation_errors_total").await >= 5.0);
    node.stop().await;
}

/// A call retried with its idempotency key while the first call is still being computed
/// waits for the first call's answer, even when the key's record expires meanwhile (a window
/// shorter than the call). Before, the waiting retry was forgotten at the expiry and got no
/// answer until its own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_gets_the_first_calls_answer_though_its_key_expires_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("n"),
        Some(
            "call_timeout_ms = 60000\n[retry]\nmax_attempts = 4\ninitial_backoff_ms = 500\nmax_backoff_ms = 500\n[checkpoint]\nidempotency_window_ms = 300\n",
        ),
    );
    let c = node.client().await;
    let target = addr("statemesh.smoke/fn/slow");
    // Fails at each of its 4 attempts, 500 ms apart: answered (dead-lettered) after ~1.5 s.
    let bad = TypedValue::new(
        "statemesh.smoke/Commands",
        serde_json::to_vec(&serde_json::json!({ "cmds": [{ "nonsense": 1 }] })).unwrap(),
    );
    let first = {
        let (c, target, bad) = (c.clone(), target.clone(), bad.clone());
        tokio::spawn(async move {
            c.call_with(&target, bad, Some("k"), Some(Duration::from_secs(50)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        c.call_with(&target, bad, Some("k"), Some(Duration::from_secs(50))),
    )
    .await
    .expect("the retry was answered when the first call was");
    let first = first.await.unwrap();
    let (first, second) = (
        first.unwrap_err().to_string(),
        second.unwrap_err().to_string(),
    );
    assert!(first.contains("nonsense"), "{first}");
    assert_eq!(first, second);
    println!("the retry was answered after {:?}", t.elapsed());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_function_does_not_stop_others() {
    // `example/cart` panics on nothing, but a message of an unexpected type makes it fail;
    // meanwhile many other addresses keep being served.
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("n"),
        Some("[retry]\nmax_attempts = 3\ninitial_backoff_ms = 50\n"),
    );
    let c = node.client().await;
    c.send(&addr("example/cart/x"), TypedValue::of(&1i64))
        .await
        .unwrap();
    for k in 0..200 {
        c.call(
            &addr(&format!("example/counter/o{k}")),
            TypedValue::of(&1i64),
        )
        .await
        .unwrap();
    }
    let dead = next_egress(&node, "statemesh/dead-letters", Duration::from_secs(5)).await;
    let dead: serde_json::Value = serde_json::from_slice(&dead).unwrap();
    assert_eq!(dead["address"], "example/cart/x");
    assert_eq!(dead["attempts"], 3);
    node.stop().await;
}

#[test]
fn malformed_config_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "shards = 2\nmax_active_instance = 5\n").unwrap();
    let out = std::process::Command::new(common::BIN)
        .args([
            "node",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.toml:2:1") && err.contains("max_active_instance"),
        "{err}"
    );

    std::fs::write(&cfg, "grpc_addr = 5\n").unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["node", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.toml:1:") && err.contains("expected"),
        "{err}"
    );

    // A bad address on the command line.
    let out = std::process::Command::new(common::BIN)
        .args(["call", "greeter", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected \"namespace/type/id\""));
}

#[test]
fn malformed_module_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.yaml");
    std::fs::write(&module, "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: greeter\n  urlPathTemplate: http://127.0.0.1:1/x\n").unwrap();
    let run = || {
        std::process::Command::new(common::BIN)
            .args([
                "node",
                "--module",
                module.to_str().unwrap(),
                "--data-dir",
                dir.path().join("d").to_str().unwrap(),
            ])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .output()
            .unwrap()
    };
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("module.yaml:3:") && err.contains("expected \"namespace/name\""),
        "{err}"
    );
    // A Kafka spec with a key missing or misspelt: named with its line.
    std::fs::write(
        &module,
        "kind: io.statefun.kafka.v1/ingress\nspec:\n  address: localhost:9092\n",
    )
    .unwrap();
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("module.yaml:2:") && err.contains("missing required key \"id\""),
        "{err}"
    );
    std::fs::write(
        &module,
        "kind: io.statefun.kafka.v1/egress\nspec:\n  id: a/b\n  adress: localhost:9092\n",
    )
    .unwrap();
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("module.yaml:4:") && err.contains("unknown key \"adress\""),
        "{err}"
    );
    // Kinesis is refused by name.
    std::fs::write(&module, "kind: io.statefun.kinesis.v1/ingress\nspec: {}\n").unwrap();
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("io.statefun.kinesis.v1/ingress") && err.contains("not supported"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_local_state_is_dead_lettered_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = Node::start(&data, None);
    assert_eq!(
        post(&node, "call", "example/counter/x", LONG, "1").await.2,
        "1"
    );
    node.stop().await;
    // Corrupt the stored `total` of example/counter/x (layout: store.rs).
    {
        let db = sled::open(data.join("state")).unwrap();
        let addr = "example/counter/x";
        let kg = statemesh_mesh::keygroup::key_group("example", "counter", "x", 1024) as u16;
        let mut key = vec![b's'];
        key.extend_from_slice(&kg.to_be_bytes());
        key.extend_from_slice(&(addr.len() as u32).to_be_bytes());
        key.extend_from_slice(addr.as_bytes());
        key.extend_from_slice(b"total");
        assert!(
            db.get(&key).unwrap().is_some(),
            "the layout matches store.rs"
        );
        db.insert(key, &b"\x07garbage"[..]).unwrap();
        db.flush().unwrap();
    }
    let node = Node::start(&data, None);
    let (s, _, body) = post(&node, "call", "example/counter/x", LONG, "1").await;
    assert_eq!(s, 502, "{body}");
    assert!(
        body.contains("cannot load state") && body.contains("corrupt"),
        "{body}"
    );
    let dead: serde_json::Value = serde_json::from_slice(
        &next_egress(&node, "statemesh/dead-letters", Duration::from_secs(5)).await,
    )
    .unwrap();
    assert_eq!(dead["address"], "example/counter/x");
    assert_eq!(
        post(&node, "call", "example/counter/y", LONG, "2").await.2,
        "2",
        "other addresses are unaffected"
    );
    node.stop().await;
}

async fn cluster(node: &Node) -> serde_json::Value {
    node.get_json("/v1/cluster").await
}

/// A node without peers is a cluster of one: it leads its control group (raft-rs, log in
/// raft-engine under the data directory), joins it with a new generation on every start,
/// owns all 1,024 key groups by placement, and keeps its node id in the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_is_a_cluster_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let launch = |id: &str| common::Launch {
        args: vec!["--node-id".into(), id.into()],
        ..Default::default()
    };
    let settled = |node: &Node, generation: u64| {
        let node = Node::attach(&node.http);
        async move {
            eventually("the cluster of one", Duration::from_secs(20), || async {
                let c = cluster(&node).await;
                let m = &c["members"];
                (c["leader"] == 7
                    && c["unassigned_key_groups"] == 0
                    && m.as_array().map(|a| a.len()) == Some(1)
                    && m[0]["generation"] == generation)
                    .then_some(c)
            })
            .await
        }
    };
    let node = Node::start_launch(&data, &launch("7"));
    let c = settled(&node, 1).await;
    let m = &c["members"][0];
    assert_eq!(c["node_id"], 7);
    assert_eq!(m["id"], 7);
    assert_eq!(m["role"], "voter");
    assert_eq!(m["alive"], true);
    assert_eq!(m["key_groups"], 1024);
    assert_eq!(
        format!("http://{}", m["grpc_addr"].as_str().unwrap()),
        node.grpc
    );
    assert_eq!(
        format!("http://{}", m["http_addr"].as_str().unwrap()),
        node.http
    );
    // All key groups are assigned in one entry when the cluster is bootstrapped.
    assert_eq!(c["placement_version"], 1, "{c}");
    assert!(c["term"].as_u64().unwrap() >= 1);
    // The same over gRPC, as the CLI prints it.
    let (ok, out, err) = node.cli(&["cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("leader 7"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("7 "))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..5], &["7", "1", "voter", "alive", "1024"], "{out}");
    node.stop().await;

    // A restart (without --node-id: it is in the data directory) rejoins as generation 2.
    let node = Node::start(&data, None);
    let c = settled(&node, 2).await;
    assert_eq!(c["members"][0]["key_groups"], 1024);
    node.stop().await;

    // The data directory of node 7 refuses to start as node 8; 0 is not an id.
    let mut n = Node::launch(&data, &launch("8"));
    let log = n.wait_listening().expect_err("refused");
    assert!(log.contains("belongs to node 7, not 8"), "{log}");
    let mut n = Node::launch(&dir.path().join("other"), &launch("0"));
    let log = n.wait_listening().expect_err("refused");
    assert!(log.contains("0 is reserved"), "{log}");
    // A node-id file that is not an id is refused, naming the file.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("node-id"), "seven\n").unwrap();
    let mut n = Node::launch(&bad, &common::Launch::default());
    let log = n.wait_listening().expect_err("refused");
    assert!(log.contains("node-id: expected a node id"), "{log}");
}

/// The SDK client says what went wrong when no node it knows answers: no URL at all; a node
/// that does not answer within the attempt timeout (SIGSTOP) beside one that refuses
/// connections (keyed retries rotate over both, then the last refusal is returned); and
/// after the pause, the same idempotency key is applied once. Then every node it knows is
/// gone: the retries end with UNAVAILABLE, in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_client_says_why_when_no_node_it_knows_answers() {
    let none: &[&str] = &[];
    let Err(e) = statemesh_sdk::Client::connect_cluster(none) else {
        panic!("a client without any node URL");
    };
    assert!(e.to_string().contains("at least one node URL"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), None);
    // A listener that never accepts holds its port, so no other test's node can take it while
    // this one counts on it not answering (a free port could be bound meanwhile).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = silent.local_addr().unwrap().to_string();
    let client = statemesh_sdk::Client::connect_cluster(&[node.grpc.as_str(), closed.as_str()])
        .unwrap()
        .with_attempt_timeout(Duration::from_millis(300))
        .with_retry(statemesh_sdk::RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
        });
    assert_eq!(client.nodes().len(), 2, "{:?}", client.nodes());
    let ctr = addr("example/counter/paused");
    let add = |n: i64, key: &'static str| {
        let client = client.clone();
        let ctr = ctr.clone();
        async move {
            client
                .call_with(&ctr, TypedValue::of(&n), Some(key), None)
                .await
        }
    };
    assert_eq!(add(1, "k1").await.unwrap().get::<i64>().unwrap(), 1);

    unsafe { libc::kill(node.pid() as i32, libc::SIGSTOP) };
    let t = Instant::now();
    let e = add(5, "k2").await.unwrap_err();
    let took = t.elapsed();
    unsafe { libc::kill(node.pid() as i32, libc::SIGCONT) };
    assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
    let why = e.to_string();
    assert!(
        why.contains("no answer within 300 ms") || why.contains("onnect"),
        "the error names neither the timeout nor the refused connection: {why}"
    );
    assert!(took < Duration::from_secs(6), "gave up after {took:?}");
    println!("with the node paused, the client gave up after {took:?}: {why}");
    // The paused node may have taken the request before it stopped: retried with its key, it
    // is applied once either way.
    let r = eventually("the node answering again", Duration::from_secs(10), || {
        let add = add(5, "k2");
        async move { add.await.ok() }
    })
    .await;
    assert_eq!(r.get::<i64>().unwrap(), 6);
    assert_eq!(add(5, "k2").await.unwrap().get::<i64>().unwrap(), 6);
    assert_eq!(add(1, "k3").await.unwrap().get::<i64>().unwrap(), 7);

    node.kill();
    let t = Instant::now();
    let e = add(1, "k4").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
    assert!(
        e.to_string().contains("4 attempts over 2 of the 2 nodes"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    println!(
        "with every node gone, the client gave up after {:?}: {e}",
        t.elapsed()
    );
}

/// `statemesh state set|delete` and `PUT`/`DELETE /v1/state/…`: an edit goes through a
/// committed epoch (it survives a SIGKILL right after its answer), is applied between two
/// invocations of the address (the next message sees it), and bad edits are refused with
/// errors that name what was wrong. The public ingress refuses the admin API's typename.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_set_and_deleted_through_committed_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = Node::start(&data, None);
    assert_eq!(
        post(&node, "call", "example/counter/a", LONG, "5").await.2,
        "5"
    );

    // The CLI: text converted with the state's declared typename.
    let (ok, out, err) = node.cli(&["state", "set", "example/counter/a", "total", "41"]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["states"]["total"]["value"], 41, "{out}");
    assert_eq!(
        post(&node, "call", "example/counter/a", LONG, "1").await.2,
        "42"
    );
    // With --type, converted by the CLI; the node checks it is the declared typename.
    let (ok, out, err) = node.cli(&[
        "state",
        "set",
        "example/counter/c",
        "total",
        "7",
        "--type",
        "long",
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        post(&node, "call", "example/counter/c", LONG, "1").await.2,
        "8"
    );

    // HTTP: PUT with a text body, DELETE.
    let url = |a: &str, q: &str| format!("{}/v1/state/{a}?{q}", node.http);
    let (s, _, body) = http(
        &url("example/counter/b", "name=total"),
        "PUT",
        Some("text/plain"),
        Bytes::from("7"),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        post(&node, "call", "example/counter/b", LONG, "1").await.2,
        "8"
    );
    let (s, _, body) = http(
        &url("example/counter/a", "name=total"),
        "DELETE",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["states"], serde_json::json!({}), "{v}");

    // Refused, naming what was wrong; nothing changes.
    let refused = |args: &[&str], want: &str| {
        let (ok, out, err) = node.cli(args);
        assert!(!ok, "{args:?} was accepted: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["state", "set", "example/counter/b", "nope", "1"],
        "function type example/counter has no state named \"nope\" (its states: total)",
    );
    refused(
        &["state", "set", "example/counter/b", "total", "abc"],
        "state \"total\" (io.statefun.types/long)",
    );
    refused(
        &[
            "state",
            "set",
            "example/counter/b",
            "total",
            "x",
            "--type",
            "string",
        ],
        "state \"total\" holds io.statefun.types/long, not io.statefun.types/string",
    );
    refused(
        &["state", "delete", "nope/nope/x", "total"],
        "unknown function type",
    );
    let (s, _, body) = http(
        &url("example/counter/b", ""),
        "PUT",
        Some("text/plain"),
        Bytes::from("1"),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("a state name is required"),
        "{body:?}"
    );
    let (s, _, body) = post(
        &node,
        "send",
        "example/counter/b",
        "statemesh/admin.SetState",
        "{}",
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("reserved to the node's admin API"), "{body}");

    // Durable once answered: SIGKILL, restart on the same data directory.
    let (grpc, http_port) = (node.grpc_port(), node.http_port());
    node.kill();
    let node = Node::start_at(&data, None, None, grpc, http_port);
    assert_eq!(
        post(&node, "call", "example/counter/a", LONG, "1").await.2,
        "1"
    );
    assert_eq!(
        post(&node, "call", "example/counter/b", LONG, "1").await.2,
        "9"
    );
    assert_eq!(
        post(&node, "call", "example/counter/c", LONG, "0").await.2,
        "8"
    );
    node.stop().await;
}

/// `[auth]`: ingress tokens scoped to what they may address, the admin token for the admin
/// API and the console, a tokens file read again when it changes; bad or missing credentials
/// get UNAUTHENTICATED/401 or PERMISSION_DENIED/403, counted in a metric. `/healthz` and
/// `/readyz` stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_with_scoped_tokens_an_admin_token_and_a_reloaded_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let file_token = |t: &str| {
        std::fs::write(
            &tokens,
            format!("[[tokens]]\ntoken = \"{t}\"\nnamespaces = [\"example/greeter\"]\n"),
        )
        .unwrap()
    };
    file_token("greeter-token-0123456789");
    let (counter_t, admin_t) = ("counter-token-0123456789", "admin-token-0123456789");
    let all_t = "all-namespaces-token-0123456789";
    let config = format!(
        "[auth]\ntokens = [{{ token = \"{counter_t}\", namespaces = [\"example/counter\"] }}, {{ token = \"{all_t}\", namespaces = [\"*\"] }}]\ntokens_file = \"{}\"\nadmin_token = \"{admin_t}\"\n",
        tokens.display()
    );
    let node = Node::start(&dir.path().join("n"), Some(&config));

    // gRPC.
    let anon = node.client().await;
    let e = anon
        .call(&addr("example/counter/a"), TypedValue::of(&1i64))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    let c = statemesh_sdk::Client::connect_with_token(&node.grpc, Some(counter_t))
        .await
        .unwrap();
    let r = c
        .call(&addr("example/counter/a"), TypedValue::of(&1i64))
        .await
        .unwrap();
    assert_eq!(r.get::<i64>().unwrap(), 1);
    let e = c
        .call(
            &addr("example/greeter/a"),
            TypedValue::of(&"hi".to_string()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");
    assert!(
        e.to_string().contains("may not address example/greeter"),
        "{e}"
    );
    let e = c.get_state(&addr("example/counter/a")).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");
    let admin = statemesh_sdk::Client::connect_with_token(&node.grpc, Some(admin_t))
        .await
        .unwrap();
    assert_eq!(
        admin
            .get_state(&addr("example/counter/a"))
            .await
            .unwrap()
            .len(),
        1
    );
    let e = anon.cluster().await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");

    // HTTP.
    let h = |path: &str, method: &'static str, token: Option<&str>, body: &'static str| {
        let url = format!("{}{path}", node.http);
        let auth = token.map(|t| format!("Bearer {t}"));
        async move {
            let mut headers = vec![("content-type", "application/vnd.io.statefun.types/long")];
            if let Some(a) = &auth {
                headers.push(("authorization", a.as_str()));
            }
            let (s, _, b) = common::http_headers(&url, method, &headers, Bytes::from(body))
                .await
                .unwrap();
            (s, String::from_utf8_lossy(&b).to_string())
        }
    };
    assert_eq!(
        h("/v1/call/example/counter/a", "POST", None, "1").await.0,
        401
    );
    assert_eq!(
        h(
            "/v1/call/example/counter/a",
            "POST",
            Some("wrong-token-0123456789"),
            "1"
        )
        .await
        .0,
        401
    );
    assert_eq!(
        h("/v1/call/example/counter/a", "POST", Some(counter_t), "1").await,
        (200, "2".to_string())
    );
    let (s, body) = h("/v1/send/example/cart/a", "POST", Some(counter_t), "1").await;
    assert_eq!(
        (s, body.contains("may not address example/cart")),
        (403, true),
        "{body}"
    );
    // Percent-encoding does not get around a scope.
    assert_eq!(
        h("/v1/call/ex%61mple/greeter/a", "POST", Some(counter_t), "1")
            .await
            .0,
        403
    );
    assert_eq!(h("/v1/cluster", "GET", None, "").await.0, 401);
    assert_eq!(h("/v1/cluster", "GET", Some(counter_t), "").await.0, 403);
    assert_eq!(h("/v1/cluster", "GET", Some(admin_t), "").await.0, 200);
    assert_eq!(h("/healthz", "GET", None, "").await.0, 200);
    assert_eq!(h("/readyz", "GET", None, "").await.0, 200);
    // An ingress token covering everything still does not reach the admin API: not with the
    // path percent-encoded, not through another method on an ingress path.
    assert_eq!(h("/%761/cluster", "GET", Some(all_t), "").await.0, 403);
    assert_eq!(
        h("/%761/cluster/leave", "POST", Some(all_t), "").await.0,
        403
    );
    assert_eq!(
        h("/v1/%73tate/example/counter/a", "GET", Some(all_t), "")
            .await
            .0,
        403
    );
    assert_eq!(
        h("/v1/send/example/counter/a", "PUT", Some(all_t), "1")
            .await
            .0,
        403
    );
    assert_eq!(
        h("/v1/call/example/counter/a", "POST", Some(all_t), "1")
            .await
            .0,
        200
    );
    // [auth] without [tls]: the node-to-node service is closed.
    let e = statemesh_proto::mesh_v1::mesh_client::MeshClient::connect(node.grpc.clone())
        .await
        .unwrap()
        .join(statemesh_proto::mesh_v1::JoinRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // The admin token admits the ingress too.
    assert_eq!(
        h("/v1/call/example/counter/b", "POST", Some(admin_t), "5")
            .await
            .0,
        200
    );

    // The CLI: --token or STATEMESH_TOKEN.
    let (ok, _, err) = node.cli(&["call", "example/counter/c", "1", "--type", "long"]);
    assert!(
        !ok && err.to_lowercase().contains("missing credentials"),
        "{err}"
    );
    let out = std::process::Command::new(common::BIN)
        .args(["call", "example/counter/c", "1", "--type", "long"])
        .env("STATEMESH_NODE", &node.grpc)
        .env("STATEMESH_TOKEN", counter_t)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out, err) = node.cli(&["state", "get", "example/counter/c", "--token", admin_t]);
    assert!(ok, "{out}{err}");

    // The tokens file is read again when it changes.
    let call_greeter = |t: &str| {
        let url = format!("{}/v1/call/example/greeter/g", node.http);
        let auth = format!("Bearer {t}");
        async move {
            common::http_headers(
                &url,
                "POST",
                &[("content-type", "text/plain"), ("authorization", &auth)],
                Bytes::from("hi"),
            )
            .await
            .unwrap()
            .0
        }
    };
    assert_eq!(call_greeter("greeter-token-0123456789").await, 200);
    file_token("greeter-token-2-0123456789");
    eventually(
        "the new token of the file",
        Duration::from_secs(10),
        || async { (call_greeter("greeter-token-2-0123456789").await == 200).then_some(()) },
    )
    .await;
    assert_eq!(call_greeter("greeter-token-0123456789").await, 401);

    // A subscription whose token is taken out of the file ends (UNAUTHENTICATED) and takes
    // no record after that: the record sent then is still there for another reader.
    let sub_t = "subscriber-token-0123456789";
    std::fs::write(
        &tokens,
        format!("[[tokens]]\ntoken = \"{sub_t}\"\nnamespaces = [\"smoke/*\"]\n[[tokens]]\ntoken = \"greeter-token-3-0123456789\"\nnamespaces = [\"example/greeter\"]\n"),
    )
    .unwrap();
    eventually(
        "the subscriber's token",
        Duration::from_secs(10),
        || async { (call_greeter("greeter-token-3-0123456789").await == 200).then_some(()) },
    )
    .await;
    let all = statemesh_sdk::Client::connect_with_token(&node.grpc, Some(all_t))
        .await
        .unwrap();
    let smoke = addr("statemesh.smoke/fn/ids");
    let emit_with = |record: &'static str| {
        let (all, smoke) = (all.clone(), smoke.clone());
        async move {
            let cmds = serde_json::json!({ "cmds": [{ "egress": record }] });
            all.send(
                &smoke,
                TypedValue::new(
                    "statemesh.smoke/Commands",
                    serde_json::to_vec(&cmds).unwrap(),
                ),
            )
            .await
            .unwrap();
        }
    };
    let subscriber = statemesh_sdk::Client::connect_with_token(&node.grpc, Some(sub_t))
        .await
        .unwrap();
    let mut sub = Box::pin(subscriber.subscribe_records("smoke").await.unwrap());
    emit_with("before").await;
    let r = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a record within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(r.value.get::<String>().unwrap(), "before");
    file_token("greeter-token-4-0123456789");
    eventually(
        "the subscriber's token gone",
        Duration::from_secs(10),
        || async { (call_greeter("greeter-token-4-0123456789").await == 200).then_some(()) },
    )
    .await;
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the stream ends within 10 s")
        .expect("an error, not the end");
    assert_eq!(
        end.as_ref().unwrap_err().code(),
        Some(tonic::Code::Unauthenticated),
        "{end:?}"
    );
    emit_with("after").await;
    let mut other = Box::pin(all.subscribe_records("smoke").await.unwrap());
    let r = tokio::time::timeout(Duration::from_secs(10), other.next())
        .await
        .expect("a record within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(r.value.get::<String>().unwrap(), "after");
    drop(other);

    // The console: a login form, then a cookie.
    let (s, body) = h("/ui", "GET", None, "").await;
    assert_eq!(s, 401);
    assert!(body.contains("action=\"/ui/login\""), "{body}");
    let login = |t: &str| {
        let url = format!("{}/ui/login", node.http);
        let form = format!("token={t}");
        async move {
            common::http_headers(
                &url,
                "POST",
                &[("content-type", "application/x-www-form-urlencoded")],
                Bytes::from(form),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(login("wrong-token-0123456789").await.0, 401);
    let (s, headers, _) = login(admin_t).await;
    assert_eq!(s, 303);
    let cookie = headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    for path in ["/ui", "/v1/cluster"] {
        let (s, _, _) = common::http_headers(
            &format!("{}{path}", node.http),
            "GET",
            &[("cookie", &cookie)],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(s, 200, "{path}");
    }
    // Signed in, the page offers to sign out.
    let (_, _, page) = common::http_headers(
        &format!("{}/ui", node.http),
        "GET",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&page).contains(r#"action="/ui/logout">"#),
        "{}",
        String::from_utf8_lossy(&page)
    );
    // A change with the cookie must come from the console's origin (404: admitted, and no
    // such letter); with a bearer token, no Origin is needed.
    let replay = |headers: Vec<(&'static str, String)>| {
        let url = format!("{}/v1/dead-letters/1-2-3/replay", node.http);
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            common::http_headers(&url, "POST", &h, Bytes::new())
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(replay(vec![("cookie", cookie.clone())]).await, 403);
    assert_eq!(
        replay(vec![
            ("cookie", cookie.clone()),
            ("origin", "http://evil.example".into())
        ])
        .await,
        403
    );
    assert_eq!(
        replay(vec![
            ("cookie", cookie.clone()),
            ("origin", node.http.clone())
        ])
        .await,
        404
    );
    assert_eq!(
        replay(vec![("authorization", format!("Bearer {admin_t}"))]).await,
        404
    );
    // Signing out clears the cookie.
    let (s, headers, _) = common::http_headers(
        &format!("{}/ui/logout", node.http),
        "POST",
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(s, 303);
    let cleared = headers["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("statemesh_admin=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    // Every refusal is counted.
    let (_, metrics) = h("/metrics", "GET", Some(admin_t), "").await;
    let count = |surface: &str, reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("statemesh_auth_refused_total")
                    && l.contains(&format!("surface=\"{surface}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(count("grpc", "unauthenticated") >= 3.0, "{metrics}");
    assert!(count("grpc", "forbidden") >= 2.0, "{metrics}");
    assert!(count("http", "unauthenticated") >= 5.0, "{metrics}");
    assert!(count("http", "forbidden") >= 5.0, "{metrics}");
    node.stop().await;
}

/// A state edit queued behind messages of a busy address is applied between two batches: the
/// messages before it see the old value, those after it the new one, and the function never
/// receives the edit. Every invocation sleeps 300 ms (`function-invoke`) so that the inbox
/// holds messages before and after the edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_edit_queued_behind_messages_is_applied_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let launch = common::Launch {
        env: vec![("FAILPOINTS".into(), "function-invoke=sleep(300)".into())],
        ..Default::default()
    };
    let node = Node::start_launch(&dir.path().join("n"), &launch);
    let c = node.client().await;
    let a = addr("example/counter/busy");
    let send = |c: &statemesh_sdk::Client| {
        let (c, a) = (c.clone(), a.clone());
        tokio::spawn(async move { c.send(&a, TypedValue::of(&1i64)).await.unwrap() })
    };
    // m1 runs (300 ms) while m2, m3, the edit and m4 queue behind it, in that order.
    let m1 = send(&c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (m2, m3) = (send(&c), send(&c));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let edit = {
        let (c, a) = (c.clone(), a.clone());
        tokio::spawn(async move {
            c.set_state(
                &a,
                "total",
                statemesh_sdk::StateChange::Text("100".into()),
                None,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m4 = send(&c);
    for m in [m1, m2, m3, m4] {
        m.await.unwrap();
    }
    let states = edit.await.unwrap().unwrap();
    assert_eq!(states[0].1.get::<i64>().unwrap(), 100, "{states:?}");
    // Four messages and the edit processed.
    eventually("five invocations", Duration::from_secs(20), || async {
        (node.metric("statemesh_invocations_total").await >= 5.0).then_some(())
    })
    .await;
    let total = state_value(&node, "example/counter/busy", "total")
        .await
        .unwrap()
        .as_i64()
        .unwrap();
    // 101 as the messages were sent (m2 and m3 before the edit, m4 after it); a machine slow
    // enough to reorder the sends' arrival gives 100 + the messages behind the edit.
    assert!((100..=104).contains(&total), "{total}");
    // The function never saw the edit (it would fail to read it as a long).
    assert_eq!(node.metric("statemesh_invocation_errors_total").await, 0.0);
    assert_eq!(node.metric("statemesh_dead_letters_total").await, 0.0);
    node.stop().await;
}

/// `statemesh node` with `config`: it must refuse to start; returns what it printed on stderr.
fn refused_start(dir: &std::path::Path, config: &str) -> String {
    refused_start_with(dir, config, &[])
}

/// [`refused_start`] with environment variables and arguments added.
fn refused_start_with(dir: &std::path::Path, config: &str, env: &[(&str, &str)]) -> String {
    let cfg = dir.join("refused.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .args(["node", "--config", cfg.to_str().unwrap(), "--data-dir"])
        .arg(dir.join("refused-data"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node started with {config:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{config:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_or_broken_tokens_and_certificate_files_refuse_to_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("nowhere.toml");
    let err = refused_start(
        d,
        &format!("[auth]\ntokens_file = {:?}\n", missing.to_str().unwrap()),
    );
    assert!(
        err.contains("auth.tokens_file") && err.contains("nowhere.toml"),
        "{err}"
    );
    // Not TOML; then a token too short to be one.
    let tokens = d.join("tokens.toml");
    std::fs::write(&tokens, "[[tokens]\n").unwrap();
    let cfg = format!("[auth]\ntokens_file = {:?}\n", tokens.to_str().unwrap());
    let err = refused_start(d, &cfg);
    assert!(
        err.contains("auth.tokens_file") && err.contains("tokens.toml"),
        "{err}"
    );
    std::fs::write(
        &tokens,
        "[[tokens]]\ntoken = \"short\"\nnamespaces = [\"shop/*\"]\n",
    )
    .unwrap();
    let err = refused_start(d, &cfg);
    assert!(
        err.contains("tokens.toml") && err.contains("at least 16 characters"),
        "{err}"
    );
    std::fs::write(
        &tokens,
        "[[tokens]]\ntoken = \"0123456789abcdef\"\nnamespaces = [\"shop*\"]\n",
    )
    .unwrap();
    let err = refused_start(d, &cfg);
    assert!(err.contains("\"shop*\""), "{err}");

    // [tls] with a certificate file missing, then files that are not PEM.
    let pem = |name: &str| d.join(name).to_str().unwrap().to_string();
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        pem("node.pem"),
        pem("node.key"),
        pem("ca.pem")
    );
    let err = refused_start(d, &tls);
    assert!(
        err.contains("tls.cert") && err.contains("node.pem"),
        "{err}"
    );
    for f in ["node.pem", "node.key", "ca.pem"] {
        std::fs::write(d.join(f), "not a PEM file\n").unwrap();
    }
    let err = refused_start(d, &tls);
    assert!(
        err.contains("tls.cert") && err.contains("node.pem"),
        "{err}"
    );
    // Half a [tls] section.
    let err = refused_start(d, &format!("[tls]\ncert = {:?}\n", pem("node.pem")));
    assert!(err.contains("tls: cert, key and ca go together"), "{err}");
}

/// A collector that accepts connections and never answers.
fn black_hole() -> (u16, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            match l.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            if held.len() > 64 {
                break;
            }
        }
    });
    (port, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_to_a_collector_that_is_down_or_hangs_do_not_slow_or_stop_the_node() {
    let (hang, _holder) = black_hole();
    for endpoint in [
        format!("http://127.0.0.1:{}", common::free_port()),
        format!("http://127.0.0.1:{hang}"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(
            &dir.path().join("n"),
            Some(&format!(
                "[telemetry]\notlp_endpoint = {endpoint:?}\nsampling_ratio = 1.0\nexport_interval_ms = 100\n"
            )),
        );
        let c = node.client().await;
        let started = Instant::now();
        for i in 0..300i64 {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                c.call(&addr("example/counter/t"), TypedValue::of(&1i64)),
            )
            .await
            .unwrap_or_else(|_| panic!("call {i} hung with the collector at {endpoint}"))
            .unwrap();
            assert_eq!(r.decode::<i64>().unwrap(), i + 1);
        }
        eprintln!(
            "300 traced calls, collector {endpoint}: {:?}",
            started.elapsed()
        );
        // Span batches are due every 100 ms: by now some export failed or hangs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stopping = Instant::now();
        node.stop().await;
        assert!(
            stopping.elapsed() < Duration::from_secs(15),
            "stopping took {:?} with the collector at {endpoint}",
            stopping.elapsed()
        );
    }
}

/// Without CA roots (a container image that lacks them), an S3 checkpoint location cannot be
/// used: the node refuses to start and says why, not just "builder error".
#[test]
fn without_ca_roots_an_s3_location_is_refused_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = d.join("no-roots.pem");
    std::fs::write(&empty, "").unwrap();
    let err = refused_start_with(
        d,
        "[checkpoint]\nurl = \"s3://bucket/prefix\"\n",
        &[
            ("SSL_CERT_FILE", empty.to_str().unwrap()),
            ("SSL_CERT_DIR", d.to_str().unwrap()),
            ("AWS_ENDPOINT", "http://127.0.0.1:1"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "b"),
        ],
    );
    assert!(
        err.contains("s3://bucket/prefix") && err.contains("No CA certificates"),
        "{err}"
    );
}

/// An idle node sleeps between timers rather than polling: its epoch driver wakes when the
/// interval's epoch is due and at least every 100 ms, each shard once a second, plus what each
/// `checkpoint.interval_ms` epoch takes (a wake per marker from every other shard: two shards
/// and 1 s epochs here, so that the figures do not depend on the machine's cores); the applier
/// sleeps out its merge window. They polled every 1 ms, 5 ms and 10 ms once: 1,000, 200 and
/// 100 wakes a second; then the driver every 10 ms and the shards every 50 ms (107 and 39-40
/// wakes a second here). Voluntary switches only (a thread blocking).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_sleeps_between_its_timers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("n"),
        Some("shards = 2\n[checkpoint]\ninterval_ms = 1000\n"),
    );
    assert_eq!(
        post(&node, "call", "example/stock/fig", LONG, "4").await.2,
        "4"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = common::wakes_by_thread(node.pid());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = common::wakes_by_thread(node.pid());
    let secs = t0.elapsed().as_secs_f64();
    let rates: Vec<(String, f64)> = after
        .iter()
        .filter_map(|(name, tid, w)| {
            let (_, _, w0) = before.iter().find(|(_, t, _)| t == tid)?;
            Some((name.clone(), (w - w0) as f64 / secs))
        })
        .collect();
    eprintln!("wakes per second, by thread: {rates:?}");
    let named = |prefix: &str| -> Vec<f64> {
        rates
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, r)| *r)
            .collect()
    };
    let driver = named("statemesh-epoch");
    assert_eq!(driver.len(), 1, "one epoch driver thread: {rates:?}");
    assert!(driver[0] < 60.0, "the idle epoch driver polls: {rates:?}");
    // The shards' arbiters (and the HTTP server's workers, nearly silent) are actix threads.
    let actix = named("actix-rt");
    assert!(actix.len() >= 2, "shard threads: {rates:?}");
    assert!(
        actix.iter().all(|r| *r < 25.0),
        "an idle shard polls: {rates:?}"
    );
    // The applier waits out its 1 s merge window asleep (it polled every 10 ms).
    let applier = named("statemesh-apply");
    assert_eq!(applier.len(), 1, "one applier thread: {rates:?}");
    assert!(applier[0] < 20.0, "the idle applier polls: {rates:?}");
    // The main thread waits for a signal or for the node to leave its cluster (it looked
    // every 50 ms, and woke the runtime's workers with it).
    let main: Vec<f64> = rates
        .iter()
        .filter(|(n, _)| n == "statemesh")
        .map(|(_, r)| *r)
        .collect();
    assert_eq!(main.len(), 1, "one main thread: {rates:?}");
    assert!(main[0] < 5.0, "the main thread polls: {rates:?}");
    node.stop().await;
}
