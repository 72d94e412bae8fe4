//! The embedding API: a user's own binary builds a node with its own functions.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use statemesh_node::{NodeBuilder, NodeConfig, RetryConfig, ServiceError};
use statemesh_sdk::{Address, FnFunction, FunctionError, TypeName, TypedValue, ValueSpec};

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        retry: RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 5,
            max_backoff_ms: 20,
        },
        ..NodeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_errors_are_retried_then_dead_lettered_and_leave_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let a2 = attempts.clone();
    let total = ValueSpec::<i64>::new("total");
    let t2 = total.clone();
    // Adds the delta, then panics on 13 and fails on 7 — after changing state and
    // publishing to egress, which must all be undone.
    let flaky = FnFunction::new(vec![total.descriptor().clone()], move |ctx, msg| {
        let d: i64 = msg.get()?;
        let t = ctx.get(&t2)?.unwrap_or(0) + d;
        ctx.set(&t2, &t)?;
        ctx.send_egress("side-effects", TypedValue::of(&d));
        match d {
            13 => {
                a2.fetch_add(1, Ordering::SeqCst);
                panic!("unlucky number")
            }
            7 => Err(FunctionError::msg("seven is refused")),
            _ => {
                ctx.reply(TypedValue::of(&t));
                Ok(())
            }
        }
    });
    let typ = TypeName::parse("test/flaky").unwrap();
    let node = NodeBuilder::new(config(dir.path()))
        .function(typ.clone(), flaky)
        .start()
        .await
        .unwrap();
    let r = node.router();
    let a = Address::new(typ.clone(), "a").unwrap();
    let call = |v: i64| r.call(a.clone(), TypedValue::of(&v), Duration::from_secs(5));

    assert_eq!(call(1).await.unwrap().get::<i64>().unwrap(), 1);
    let e = call(13).await.unwrap_err();
    assert!(matches!(e, ServiceError::FunctionFailed(_)), "{e}");
    assert!(
        e.to_string().contains("function panicked: unlucky number"),
        "{e}"
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "retried up to max_attempts"
    );
    let e = call(7).await.unwrap_err();
    assert!(e.to_string().contains("seven is refused"), "{e}");
    // Neither failure left state behind, and the address still works.
    assert_eq!(call(2).await.unwrap().get::<i64>().unwrap(), 3);
    let states = r.get_state(a.clone()).await.unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1.get::<i64>().unwrap(), 3);
    // Only the successful invocations' egress records were published.
    let metrics = r.metrics_text();
    assert!(
        metrics.contains("statemesh_dead_letters_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("statemesh_egress_records_total 4"),
        "2 side effects + 2 dead letters\n{metrics}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_node_serves_its_own_functions_and_the_examples() {
    let dir = tempfile::tempdir().unwrap();
    let echo = FnFunction::new(vec![], |ctx, msg| {
        ctx.reply(msg.clone());
        Ok(())
    });
    let node = NodeBuilder::new(config(dir.path()))
        .with_examples()
        .function(TypeName::parse("my/echo").unwrap(), echo)
        .start()
        .await
        .unwrap();
    let client = statemesh_sdk::Client::connect(&format!("http://{}", node.grpc_addr()))
        .await
        .unwrap();
    let r = client
        .call(
            &Address::parse("my/echo/x").unwrap(),
            TypedValue::of(&"ping".to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.get::<String>().unwrap(), "ping");
    let r = client
        .call(
            &Address::parse("example/counter/x").unwrap(),
            TypedValue::of(&4i64),
        )
        .await
        .unwrap();
    assert_eq!(r.get::<i64>().unwrap(), 4);
    node.shutdown().await;
}

/// A node shut down in-process gives its data directory back: a node started right after on
/// the same directory (a service restarting its embedded node) opens it and has the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_in_process_can_start_again_on_its_data_directory_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let counter = Address::parse("example/counter/again").unwrap();
    for round in 1..=3i64 {
        let node = NodeBuilder::new(config(dir.path()))
            .with_examples()
            .start()
            .await
            .unwrap_or_else(|e| panic!("start {round} on the same data directory: {e}"));
        let r = node
            .router()
            .call(
                counter.clone(),
                TypedValue::of(&1i64),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(r.get::<i64>().unwrap(), round);
        node.shutdown().await;
    }
}

/// An embedded node that does not own an address forwards `Router::send` to the owner in the
/// calling thread's order: a burst of fire-and-forget messages to one address is applied in
/// the order it was sent (each accepted message once; a full forwarding queue refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_sends_through_a_non_owner_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = || {
        // The numbers received, space-separated.
        let seen = ValueSpec::<String>::new("seen");
        let s2 = seen.clone();
        FnFunction::new(vec![seen.descriptor().clone()], move |ctx, msg| {
            let mut v = ctx.get(&s2)?.unwrap_or_default();
            if msg.typename() == "test/Read" {
                ctx.reply(TypedValue::of(&v));
                return Ok(());
            }
            v.push_str(&format!("{} ", msg.get::<i64>()?));
            ctx.set(&s2, &v)?;
            Ok(())
        })
    };
    let typ = TypeName::parse("test/log").unwrap();
    let owner = NodeBuilder::new(NodeConfig {
        node_id: Some(1),
        ..config(&dir.path().join("a"))
    })
    .function(typ.clone(), log())
    .start()
    .await
    .unwrap();
    let other = NodeBuilder::new(NodeConfig {
        node_id: Some(2),
        join: vec![owner.grpc_addr().to_string()],
        ..config(&dir.path().join("b"))
    })
    .function(typ.clone(), log())
    .start()
    .await
    .unwrap();
    // The joiner gets its share of the key groups (one round of moves, which rolls both back):
    // wait for it, then send through the node that does not own the address.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let probes: Vec<Address> = (0..64)
        .map(|i| Address::new(typ.clone(), format!("p{i}")).unwrap())
        .collect();
    while ![&owner, &other].iter().all(|n| {
        let seen: std::collections::BTreeSet<_> =
            probes.iter().map(|p| n.router().owner_of(p)).collect();
        seen.contains(&Some(1)) && seen.contains(&Some(2))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the key groups did not spread"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = Address::new(typ.clone(), "x").unwrap();
    let via = match owner.router().owner_of(&a) {
        Some(1) => &other,
        _ => &owner,
    };
    let r = via.router();
    let read = || {
        r.call(
            a.clone(),
            TypedValue::new("test/Read", Vec::new()),
            Duration::from_secs(5),
        )
    };
    // Until the joiner has the cluster's state, it cannot route.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = read().await {
        assert!(std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..3000i64 {
        match r.send(a.clone(), TypedValue::of(&i)) {
            Ok(()) => accepted.push(i),
            Err(ServiceError::Overloaded(m)) => {
                assert!(m.contains("forwarding queue"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("send {i}: {e}"),
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v: Vec<i64> = read()
            .await
            .unwrap()
            .get::<String>()
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        if v.len() >= accepted.len() || std::time::Instant::now() > deadline {
            assert_eq!(v, accepted, "{refused} refused");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.shutdown().await;
    owner.shutdown().await;
}
