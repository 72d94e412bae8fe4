//! Exactly-once under SIGKILL, modelled on StateFun's end-to-end smoke test.
//!
//! A seeded generator builds command trees (increment, send to another address, delayed send,
//! cancelled delayed send, egress, call with a reply) for the `statemesh.smoke/*` command
//! interpreters (`examples/embedded/src/smoke.rs`, and the same function served by the real
//! StateFun Python SDK in `tests/py/statefun3_functions.py`). Clients send every command with
//! an idempotency key and retry until it is acknowledged, while the node is SIGKILLed at random
//! moments (≥ 20 times) and restarted on the same data directory and ports. The expected state
//! of every address and the expected egress records are computed from the commands alone
//! (outside the node) and compared exactly at the end; an over-count fails at once.
//!
//! The seed is printed; `SMOKE_SEED=<n>` reproduces a run's commands and kill schedule.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::python::{statefun3, FunctionServer};
use common::{free_port, http, state_value, Node};
use parking_lot::Mutex;
use serde_json::{json, Value};
use statemesh_sdk::{Address, Client, RetryPolicy, TypedValue};

const COMMANDS: &str = "statemesh.smoke/Commands";

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The expected outcome, computed from the commands only.
#[derive(Default)]
struct Model {
    counts: BTreeMap<String, i64>,
    egress: BTreeMap<String, usize>,
}

struct Gen<'a> {
    rng: Rng,
    addresses: &'a [String],
    uid: u64,
}

impl Gen<'_> {
    fn address(&mut self) -> String {
        let i = self.rng.below(self.addresses.len() as u64) as usize;
        self.addresses[i].clone()
    }

    /// A command list run by `at`; records its effects in the model.
    fn list(&mut self, at: &str, depth: u32, model: &mut Model) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..1 + self.rng.below(4) {
            self.uid += 1;
            let uid = self.uid;
            match self.rng.below(if depth < 2 { 6 } else { 3 }) {
                0 | 1 => {
                    let n = 1 + self.rng.below(5) as i64;
                    *model.counts.entry(at.to_string()).or_default() += n;
                    out.push(json!({ "inc": n }));
                }
                2 => {
                    let r = format!("{at}#{uid}");
                    *model.egress.entry(r.clone()).or_default() += 1;
                    out.push(json!({ "egress": r }));
                }
                3 => {
                    let to = self.address();
                    let cmds = self.list(&to, depth + 1, model);
                    out.push(json!({ "send": { "to": to, "cmds": cmds } }));
                }
                4 => {
                    let to = self.address();
                    let cmds = self.list(&to, depth + 1, model);
                    let ms = 5 + self.rng.below(200);
                    out.push(
                        json!({ "delay": { "ms": ms, "to": to, "token": null, "cmds": cmds } }),
                    );
                }
                _ => {
                    // Scheduled far out and cancelled by the same invocation: never fires.
                    let token = format!("c{uid}");
                    let to = self.address();
                    out.push(json!({ "delay": { "ms": 600_000, "to": to, "token": token, "cmds": [{ "inc": 1_000_000 }] } }));
                    out.push(json!({ "cancel": token }));
                }
            }
        }
        out
    }
}

enum Request {
    Send(Address, Value),
    Call(Address, Value, String),
}

fn seed() -> u64 {
    std::env::var("SMOKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn commands(v: &Value) -> TypedValue {
    TypedValue::new(COMMANDS, serde_json::to_vec(v).unwrap())
}

async fn run(seed: u64, types: &[&str], module: Option<String>, requests: usize, kills: usize) {
    println!("crash test seed = {seed} (SMOKE_SEED={seed} reproduces it)");
    let addresses: Vec<String> = types
        .iter()
        .flat_map(|t| (0..10).map(move |i| format!("{t}/{i}")))
        .collect();
    let mut g = Gen {
        rng: Rng(seed),
        addresses: &addresses,
        uid: 0,
    };
    let mut model = Model::default();
    let mut reqs = Vec::new();
    for i in 0..requests {
        let at = g.address();
        let mut cmds = g.list(&at, 0, &mut model);
        let target = Address::parse(&at).unwrap();
        if g.rng.below(4) == 0 {
            let reply = format!("ok{i}");
            cmds.push(json!({ "reply": reply }));
            reqs.push(Request::Call(target, json!({ "cmds": cmds }), reply));
        } else {
            reqs.push(Request::Send(target, json!({ "cmds": cmds })));
        }
    }
    let kill_rng = Mutex::new(Rng(seed ^ 0x9E37_79B9_7F4A_7C15));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let (grpc_port, http_port) = (free_port(), free_port());
    let config = "shards = 2\n";
    let start = || Node::start_at(&data, Some(config), module.as_deref(), grpc_port, http_port);
    let node = Arc::new(Mutex::new(Some(start())));
    let grpc = format!("http://127.0.0.1:{grpc_port}");
    let client = Client::connect_lazy(&grpc)
        .unwrap()
        .with_retry(RetryPolicy {
            attempts: 100,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(250),
        });

    let reqs = Arc::new(reqs);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (reqs, next, client) = (reqs.clone(), next.clone(), client.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w + 1));
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= reqs.len() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let r = match &reqs[i] {
                        Request::Send(t, v) => client
                            .send_with_key(t, commands(v), Some(&format!("s{i}")))
                            .await
                            .map(|()| None),
                        Request::Call(t, v, _) => client
                            .call_with(
                                t,
                                commands(v),
                                Some(&format!("c{i}")),
                                Some(Duration::from_secs(10)),
                            )
                            .await
                            .map(Some),
                    };
                    match (r, &reqs[i]) {
                        (Ok(Some(reply)), Request::Call(_, _, want)) => {
                            let got: String = reply.get().unwrap();
                            assert_eq!(
                                &got, want,
                                "seed {seed}: call {i} got another call's reply"
                            );
                            break;
                        }
                        (Ok(_), _) => break,
                        (Err(e), _) => {
                            assert!(
                                Instant::now() < deadline,
                                "seed {seed}: request {i} not acknowledged within 120 s: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }));
    }

    // The killer: SIGKILL at random moments, restart on the same data and ports.
    let killer = {
        let node = node.clone();
        let data = data.clone();
        let module = module.clone();
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            for k in 0..kills {
                let wait = 100 + kill_rng.lock().below(500);
                std::thread::sleep(Duration::from_millis(wait));
                let n = node.lock().take().unwrap();
                n.kill();
                let n =
                    Node::start_at(&data, Some(config), module.as_deref(), grpc_port, http_port);
                *node.lock() = Some(n);
                println!("kill {} of {kills} after {wait} ms", k + 1);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    for w in workers {
        w.await.unwrap();
    }
    killer.await.unwrap();
    assert!(done.load(Ordering::SeqCst));
    println!(
        "{} requests acknowledged with {kills} kills in {:?}",
        reqs.len(),
        t0.elapsed()
    );

    // States: equal to the model once delayed messages have fired; never above it.
    let n = node.lock().take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut mismatched = Vec::new();
        for a in &addresses {
            let got = state_value(&n, a, "count")
                .await
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            let want = model.counts.get(a).copied().unwrap_or(0);
            assert!(got <= want, "seed {seed}: {a} over-counted: {got} > {want}");
            if got != want {
                mismatched.push(format!("{a}: {got} of {want}"));
            }
        }
        if mismatched.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: states still differ from the model: {mismatched:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Egress: every expected record exactly once.
    let want: usize = model.egress.values().sum();
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_since = None;
    loop {
        let (s, _, body) = http(
            &format!("{}/v1/egress/smoke", n.http),
            "GET",
            None,
            Bytes::new(),
        )
        .await;
        if s == 200 {
            let r = String::from_utf8_lossy(&body).to_string();
            let c = got.entry(r.clone()).or_default();
            *c += 1;
            total += 1;
            let expected = model.egress.get(&r).copied().unwrap_or(0);
            assert!(
                *c <= expected,
                "seed {seed}: egress record {r:?} seen {c} times, expected {expected}"
            );
            quiet_since = None;
            continue;
        }
        assert_eq!(s, 204, "seed {seed}: egress read failed");
        if total >= want {
            // Wait a little longer for any duplicate.
            let q = *quiet_since.get_or_insert_with(Instant::now);
            if q.elapsed() > Duration::from_millis(500) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {total} of {want} egress records arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        got, model.egress,
        "seed {seed}: egress records differ from the model"
    );
    println!(
        "seed {seed}: {} addresses and {want} egress records match the model exactly",
        addresses.len()
    );
    n.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_functions_survive_sigkill_exactly_once() {
    run(seed(), &["statemesh.smoke/fn"], None, 300, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_functions_survive_sigkill_exactly_once() {
    let server = FunctionServer::start(&statefun3(), "tests/py/statefun3_functions.py");
    let module = format!(
        "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: statemesh.smoke/py\n  urlPathTemplate: {}\n  transport:\n    type: io.statefun.transports.v1/async\n    call: 10s\n",
        server.url()
    );
    run(
        seed(),
        &["statemesh.smoke/fn", "statemesh.smoke/py"],
        Some(module),
        300,
        20,
    )
    .await;
    drop(server);
}
