//! Exactly-once under SIGKILL, modelled on StateFun's end-to-end smoke test.
//!
//! A seeded generator builds command trees (increment, send to another address, delayed send,
//! delayed send cancelled in the same invocation, delayed send cancelled by a *later* request,
//! egress, call with a reply, large states) for the `statemesh.smoke/*` command interpreters
//! (`examples/embedded/src/smoke.rs`, and the same function served by the real StateFun Python
//! SDK in `tests/py/statefun3_functions.py`). Every message carries an id that the function
//! appends to its address's `log` state, so the model checks each address's applied messages
//! as a multiset (a lost and a duplicated message cannot cancel out), the order of messages
//! per sender where it is promised (a client's acknowledged requests; one address's sends to
//! another), the `count` against the messages applied, and every egress record exactly once.
//!
//! Clients send every request with an idempotency key and retry until it is acknowledged,
//! while the node is killed: SIGKILL at random moments from 0 ms after spawn (so some kills
//! land during recovery), and aborts at every checkpoint fault point (`FAILPOINTS`,
//! `node/src/failpoint.rs`). One variant runs with tiny thresholds (full snapshots and garbage
//! collection every few epochs, `retain = 2`, states over 64 KiB so epoch objects are written
//! apart from manifests) and sometimes deletes the local state before a restart (recovery
//! from blob storage alone). A run fails unless retried requests were deduplicated and
//! pending messages recovered, so a run that never exercised them cannot pass.
//!
//! Three variants run the same model on a cluster of three nodes: every request (and every
//! retry) goes to the next node in turn, so most are forwarded to the owner, and the killer
//! SIGKILLs the owner, the current leader or a random node, 16–24 times, restarting each on
//! its data directory (the others keep running). The third node joins under load, after the
//! third kill. One of them commits epochs by manifest puts to blob storage
//! (`cluster_log = false`), where each new leader numbers its epochs above the reservation
//! of its predecessors.
//!
//! Three chaos runs, on three nodes (embedded and Python SDK functions) and on five (once
//! more committing by manifest puts, `cluster_log = false`), put the same model through 30
//! seeded events each, one at a time once the cluster has settled:
//! SIGKILL with a quick restart, SIGKILL with an outage beyond the failure detection (the
//! node's key groups fail over, and come back when it returns), SIGKILL for good, SIGTERM with
//! a restart (the node tells the cluster, and its key groups fail over at once), SIGSTOP and
//! SIGCONT (a pause beyond 1.8 s gets the node declared dead), a network partition of one node
//! (both ways or one way, the `mesh-partition` fault point set at run time), a join, and a
//! leave through the CLI. The clients use one SDK client of the whole cluster, which retries
//! a keyed request on the next node it knows. The run prints the clients' throughput in a
//! quiet phase and during the events.
//!
//! The seed is printed; `SMOKE_SEED=<n>` reproduces a run's commands and kill schedule.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::python::{statefun3, FunctionServer};
use common::{free_port, Launch, Node};
use parking_lot::Mutex;
use serde_json::{json, Value};
use statemesh_mesh::sim::Rng;
use statemesh_sdk::{Address, Client, RetryPolicy, TypedValue};

const COMMANDS: &str = "statemesh.smoke/Commands";

/// What one message does when applied, and whether it must be.
#[derive(Default, Debug)]
struct Msg {
    /// The address it goes to.
    at: String,
    /// Its increments.
    inc: i64,
    /// Its (non-delayed) sends, in order: (target, message id).
    sends: Vec<(String, String)>,
    /// Its egress records.
    egress: Vec<String>,
    /// The request it belongs to (only requests a client took are expected).
    req: usize,
    /// Applied at most once, maybe never (a delayed message a later request cancels, which
    /// may fire first).
    optional: bool,
    /// Never applied (cancelled by the invocation that scheduled it).
    forbidden: bool,
    /// The message that sends it and how (`None`: a client's request sends it).
    parent: Option<(String, &'static str)>,
}

/// The expected outcome, computed from the commands only.
#[derive(Default)]
struct Model {
    msgs: BTreeMap<String, Msg>,
    /// The request being generated.
    req: usize,
}

impl Model {
    fn insert(&mut self, id: String, mut m: Msg) {
        m.req = self.req;
        self.msgs.insert(id, m);
    }
}

struct Gen<'a> {
    rng: Rng,
    addresses: &'a [String],
    uid: u64,
    pad: bool,
}

impl Gen<'_> {
    fn address(&mut self) -> String {
        let i = self.rng.below(self.addresses.len() as u64) as usize;
        self.addresses[i].clone()
    }

    fn id(&mut self, prefix: &str) -> String {
        self.uid += 1;
        format!("{prefix}{}", self.uid)
    }

    /// A message for `at`: its id and command list; records its effects in the model.
    fn message(&mut self, at: &str, depth: u32, model: &mut Model) -> (String, Vec<Value>) {
        let id = self.id("m");
        let mut msg = Msg {
            at: at.to_string(),
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut children: Vec<(String, &'static str)> = Vec::new();
        for _ in 0..1 + self.rng.below(4) {
            match self.rng.below(if depth < 2 { 8 } else { 3 }) {
                0 | 1 => {
                    let n = 1 + self.rng.below(5) as i64;
                    msg.inc += n;
                    out.push(json!({ "inc": n }));
                }
                2 => {
                    let r = format!("{at}#{}", self.id("e"));
                    msg.egress.push(r.clone());
                    out.push(json!({ "egress": r }));
                }
                3 => {
                    let to = self.address();
                    let (child, cmds) = self.message(&to, depth + 1, model);
                    children.push((child.clone(), "a send"));
                    msg.sends.push((to.clone(), child.clone()));
                    out.push(json!({ "send": { "to": to, "id": child, "cmds": cmds } }));
                }
                4 => {
                    let to = self.address();
                    let (child, cmds) = self.message(&to, depth + 1, model);
                    children.push((child.clone(), "a delayed send"));
                    let ms = 5 + self.rng.below(200);
                    out.push(json!({ "delay": { "ms": ms, "to": to, "id": child, "token": null, "cmds": cmds } }));
                }
                7 => {
                    // A burst to one address: its order there is promised, and some of it is
                    // likely still queued when an epoch is cut (replayed after a crash).
                    let to = self.address();
                    for _ in 0..3 + self.rng.below(4) {
                        let (child, cmds) = self.message(&to, 2, model);
                        children.push((child.clone(), "a burst's send"));
                        msg.sends.push((to.clone(), child.clone()));
                        out.push(json!({ "send": { "to": to, "id": child, "cmds": cmds } }));
                    }
                }
                5 if self.pad && self.rng.below(3) == 0 => {
                    // Over 64 KiB: the epoch holding it is written apart from its manifest.
                    out.push(json!({ "pad": 66_000 + self.rng.below(20_000) }));
                }
                _ => {
                    // Scheduled far out and cancelled by the same invocation: never fires.
                    let token = self.id("c");
                    let to = self.address();
                    let never = self.id("f");
                    model.insert(
                        never.clone(),
                        Msg {
                            at: to.clone(),
                            inc: 1_000_000,
                            forbidden: true,
                            ..Default::default()
                        },
                    );
                    out.push(json!({ "delay": { "ms": 600_000, "to": to, "id": never, "token": token, "cmds": [{ "inc": 1_000_000 }] } }));
                    out.push(json!({ "cancel": token }));
                }
            }
        }
        for (child, how) in children {
            if let Some(c) = model.msgs.get_mut(&child) {
                c.parent = Some((id.clone(), how));
            }
        }
        model.insert(id.clone(), msg);
        (id, out)
    }
}

/// One unit of a client's work.
enum Request {
    Send(Address, String, Value),
    Call(Address, String, Value, String),
    /// A delayed message with a token, then (after 0-300 ms) a later request to the same
    /// address that cancels it: it fires at most once.
    DelayThenCancel {
        at: Address,
        schedule: (String, Value),
        cancel: (String, Value),
    },
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

fn body(id: &str, cmds: Vec<Value>) -> Value {
    json!({ "id": id, "cmds": cmds })
}

fn commands(v: &Value) -> TypedValue {
    TypedValue::new(COMMANDS, serde_json::to_vec(v).unwrap())
}

/// A crash-test configuration.
struct Variant {
    types: &'static [&'static str],
    module: Option<String>,
    config: &'static str,
    requests: usize,
    kills: usize,
    /// Fault points at which some incarnations abort.
    points: &'static [&'static str],
    /// Some restarts delete the local state first.
    wipe_local: bool,
    /// Some messages set states over 64 KiB.
    pad: bool,
    /// Three nodes (node 1 bootstraps the cluster and owns every key group, 2 and 3 join and
    /// forward); every request goes to a random node, and random nodes are killed (the owner
    /// every third kill, the current leader every third).
    cluster: bool,
    /// A cluster run whose long outage (the second-to-last kill, the leader) loses the
    /// victim's disk: its whole data directory is deleted, and it comes back empty as a new
    /// member (a new node id, joining through a live member) while the cluster has declared
    /// its former self dead. Blob storage is outside every data directory.
    lose_disk: bool,
    /// A chaos run on a cluster of this many nodes (0: none): `kills` seeded events (see
    /// [`chaos`]), one client of the whole cluster per worker.
    chaos: usize,
}

/// Fault points every configuration reaches.
const POINTS: &[&str] = &[
    "checkpoint-manifest-put",
    "checkpoint-after-commit",
    "checkpoint-sled-apply",
    "checkpoint-sled-marker",
    "checkpoint-recovery",
];

/// A node alone with its epoch log: the points above and the log's.
const LOG_POINTS: &[&str] = &[
    "checkpoint-manifest-put",
    "checkpoint-after-commit",
    "checkpoint-sled-apply",
    "checkpoint-sled-marker",
    "checkpoint-recovery",
    "checkpoint-log-append",
    "checkpoint-upload",
    "checkpoint-log-truncate",
];

/// With tiny thresholds: every fault point.
const ALL_POINTS: &[&str] = statemesh_node::failpoint::POINTS;

/// A node alone commits to its epoch log, uploaded every 100 ms (kills come every 0-700 ms).
const CONFIG: &str = "shards = 2\n[checkpoint]\nupload_interval_ms = 100\n";

/// Epochs commit to blob storage one by one (no epoch log).
const BLOB_CONFIG: &str = "shards = 2\n[checkpoint]\nlog = false\n";

/// A cluster's epochs commit by manifest puts to blob storage (no epoch log in the control
/// group).
const MANIFEST_PUT_CONFIG: &str = "shards = 2\n[checkpoint]\ncluster_log = false\n";

/// The chaos runs' `CONFIG`, committing by manifest puts: a paused or cut-off leader of the
/// epochs goes on running after its successor took over, and its late manifests may land.
const CHAOS_MANIFEST_PUT_CONFIG: &str =
    "shards = 2\n[checkpoint]\nupload_interval_ms = 100\ncluster_log = false\n";

/// Errors and delays at the durable steps (fault point actions other than abort), and
/// in-place rollbacks to the last committed epoch.
const NOISE: &str = "checkpoint-object-put=20%return(timeout);checkpoint-manifest-put=20%return(connection reset);checkpoint-after-commit=10%return;checkpoint-full-snapshot-put=30%return;checkpoint-gc-delete=20%return(503);checkpoint-sled-apply=10%return(no space left on device);checkpoint-sled-marker=30%sleep(30);checkpoint-rollback=10%return;checkpoint-log-append=5%return(input/output error);checkpoint-upload=20%return(timeout)";

/// Full snapshots and garbage collection every few epochs, two epochs retained.
const SMALL: &str = "shards = 2\n[checkpoint]\nretain = 2\ngc_every = 2\ngc_min_interval_ms = 0\nfull_snapshot_min_bytes = 1\nfull_snapshot_max_epochs = 4\napply_interval_ms = 200\nupload_interval_ms = 50\n";

/// Per client, its acknowledged top-level messages in order: (target, message id).
type Acked = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// When each top-level message was acknowledged (seconds since the clients started): a
/// failure names it, to be read against the kills' and events' times.
type AckTimes = Arc<Mutex<HashMap<String, f64>>>;

/// What the killer saw.
#[derive(Default, Debug)]
struct KillStats {
    kills: usize,
    aborts: BTreeMap<String, usize>,
    wiped: usize,
    /// Nodes whose whole data directory was deleted (`lose_disk`).
    lost_disks: usize,
    dedup: f64,
    recovered_pending: u64,
    recoveries: BTreeMap<String, usize>,
    /// In-place rollbacks to the last committed epoch begun (`checkpoint-rollback` in the
    /// noise; in a cluster, the leader synchronising the members).
    rollbacks: usize,
    /// Streams of messages between functions broken (`mesh-fn-stream-break` in a cluster's
    /// noise: the frame is lost, the participants roll back).
    stream_breaks: usize,
    /// Failovers: a cluster's leader declared a node dead and moved its key groups to the
    /// others (one kill in a cluster run keeps its node down for longer than the failure
    /// detection takes).
    failovers: usize,
    /// Chaos runs: events, pauses, partitions, joins, leaves, and nodes that learnt they had
    /// been declared dead (paused or cut off) and joined again.
    events: usize,
    pauses: usize,
    partitions: usize,
    joins: usize,
    leaves: usize,
    declared_dead: usize,
    /// Times the epoch leader gave up waiting for a part and synchronised everyone again.
    stalls: usize,
    /// Chaos runs: graceful stops (SIGTERM), and those the cluster took (the stopped node's
    /// key groups moved at once).
    stops: usize,
    stops_taken: usize,
}

async fn metric(http_url: &str, name: &str) -> Option<f64> {
    let (_, _, body) = common::try_http(&format!("{http_url}/metrics"), "GET", None, Bytes::new())
        .await
        .ok()?;
    common::parse_metric(&body, name)
}

/// The recovery report of a node (`GET /v1/checkpoints`): (source, pending messages).
async fn recovery(http_url: &str) -> Option<(String, u64)> {
    let (s, _, body) = common::try_http(
        &format!("{http_url}/v1/checkpoints"),
        "GET",
        None,
        Bytes::new(),
    )
    .await
    .ok()?;
    if s != 200 {
        return None;
    }
    let j: Value = serde_json::from_slice(&body).ok()?;
    let r = &j["recovery"];
    Some((r["source"].as_str()?.to_string(), r["pending"].as_u64()?))
}

/// Chaos runs start up to eight nodes each: they run alone, the other runs of this file side
/// by side (two at a time on two cores).
static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn run(seed: u64, v: Variant) {
    let (_alone, _beside);
    if v.chaos > 0 {
        _alone = HEAVY.write().await;
    } else {
        _beside = HEAVY.read().await;
    }
    println!("crash test seed = {seed} (SMOKE_SEED={seed} reproduces it)");
    let addresses: Vec<String> = v
        .types
        .iter()
        .flat_map(|t| (0..10).map(move |i| format!("{t}/{i}")))
        .collect();
    let mut g = Gen {
        rng: Rng(seed),
        addresses: &addresses,
        uid: 0,
        pad: v.pad,
    };
    let mut model = Model::default();
    let mut reqs = Vec::new();
    // Clients take requests from this pool until the killer is done (and at least
    // `v.requests`); only the requests taken are expected.
    for i in 0..v.requests * 20 {
        model.req = i;
        let at = g.address();
        let target = Address::parse(&at).unwrap();
        match g.rng.below(8) {
            0 | 1 => {
                let (id, mut cmds) = g.message(&at, 0, &mut model);
                let reply = format!("ok{i}");
                cmds.push(json!({ "reply": reply }));
                reqs.push(Request::Call(target, id.clone(), body(&id, cmds), reply));
            }
            2 => {
                let token = g.id("t");
                let to = g.address();
                let delayed = g.id("o");
                let n = 1 + g.rng.below(5) as i64;
                model.insert(
                    delayed.clone(),
                    Msg {
                        at: to.clone(),
                        inc: n,
                        optional: true,
                        ..Default::default()
                    },
                );
                let ms = 50 + g.rng.below(251);
                let first = g.id("m");
                model.insert(
                    first.clone(),
                    Msg {
                        at: at.clone(),
                        ..Default::default()
                    },
                );
                let second = g.id("m");
                model.insert(
                    second.clone(),
                    Msg {
                        at: at.clone(),
                        ..Default::default()
                    },
                );
                reqs.push(Request::DelayThenCancel {
                    at: target,
                    schedule: (
                        first.clone(),
                        body(
                            &first,
                            vec![json!({ "delay": { "ms": ms, "to": to, "id": delayed, "token": token, "cmds": [{ "inc": n }] } })],
                        ),
                    ),
                    cancel: (second.clone(), body(&second, vec![json!({ "cancel": token })])),
                });
            }
            _ => {
                let (id, cmds) = g.message(&at, 0, &mut model);
                reqs.push(Request::Send(target, id.clone(), body(&id, cmds)));
            }
        }
    }
    let kill_rng = Mutex::new(Rng(seed ^ 0x9E37_79B9_7F4A_7C15));

    let mut dir = tempfile::tempdir().unwrap();
    // CRASH_KEEP=1 keeps the data directory and the node's log for a look after a failure.
    if std::env::var_os("CRASH_KEEP").is_some() {
        dir.disable_cleanup(true);
        println!("seed {seed}: keeping {}", dir.path().display());
    }
    let data = dir.path().join("n");
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut config = if v.lose_disk {
        // Beside the data directories (by default it is in node 1's, which may be lost).
        let blob = dir.path().join("blob");
        format!("{}url = {:?}\n", v.config, blob.display().to_string())
    } else {
        v.config.to_string()
    };
    // CRASH_CHECKPOINT adds lines (separated by `;`) to the nodes' [checkpoint] section (every
    // variant's config ends in it); with CRASH_KEEP, `retain = 1000000` keeps every epoch.
    if let Ok(extra) = std::env::var("CRASH_CHECKPOINT") {
        config.push_str(&extra.replace(';', "\n"));
        config.push('\n');
    }
    let launch = Launch {
        config: Some(config),
        module: v.module.clone(),
        grpc_port,
        http_port,
        env: Vec::new(),
        args: Vec::new(),
    };
    let http_url = format!("http://127.0.0.1:{http_port}");
    let grpc = format!("http://127.0.0.1:{grpc_port}");
    // In a cluster, nodes 2 and 3 (ports chosen now, kept across restarts).
    let peers: Vec<(u16, u16)> = if v.cluster {
        vec![(free_port(), free_port()), (free_port(), free_port())]
    } else {
        Vec::new()
    };
    let retry = RetryPolicy {
        attempts: 100,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(250),
    };
    // A chaos run: ports of every node it may start (node 1's are above); one client of the
    // cluster (it learns the nodes that join, and retries keyed requests on the next node).
    let chaos_ports: Vec<(u16, u16)> = (0..v.chaos.saturating_sub(1) + 7)
        .map(|_| (free_port(), free_port()))
        .collect();
    let clients: Vec<Client> = if v.chaos > 0 {
        let urls: Vec<String> = std::iter::once(grpc.clone())
            .chain(
                chaos_ports[..v.chaos - 1]
                    .iter()
                    .map(|(g, _)| format!("http://127.0.0.1:{g}")),
            )
            .collect();
        vec![Client::connect_cluster(&urls)
            .unwrap()
            .with_retry(retry)
            .with_attempt_timeout(Duration::from_secs(5))]
    } else {
        std::iter::once(grpc.clone())
            .chain(peers.iter().map(|(g, _)| format!("http://127.0.0.1:{g}")))
            .map(|url| Client::connect_lazy(&url).unwrap().with_retry(retry))
            .collect()
    };

    let reqs = Arc::new(reqs);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Per worker, the ids of its acknowledged top-level messages, in order, with their target.
    let acked: Acked = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    let ack_times: AckTimes = Arc::default();
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (reqs, next, clients, acked, done, ack_times) = (
            reqs.clone(),
            next.clone(),
            clients.clone(),
            acked.clone(),
            done.clone(),
            ack_times.clone(),
        );
        let min_requests = v.requests;
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w + 1));
            // Sends one message until acknowledged (same key on every attempt).
            let deliver = |t: Address, id: String, v: Value, reply: Option<String>| {
                let clients = clients.clone();
                // Each attempt through the next node (a cluster: any node takes any request).
                let mut through = (seed as usize).wrapping_add(id.len() + w as usize);
                async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        through = through.wrapping_add(1);
                        let client = &clients[through % clients.len()];
                        let r = match &reply {
                            None => client
                                .send_with_key(&t, commands(&v), Some(&id))
                                .await
                                .map(|()| None),
                            Some(_) => client
                                .call_with(
                                    &t,
                                    commands(&v),
                                    Some(&id),
                                    Some(Duration::from_secs(10)),
                                )
                                .await
                                .map(Some),
                        };
                        match r {
                            Ok(Some(got)) => {
                                let got: String = got.get().unwrap();
                                assert_eq!(
                                    Some(&got),
                                    reply.as_ref(),
                                    "seed {seed}: call {id} got another call's reply"
                                );
                                return;
                            }
                            Ok(None) => return,
                            Err(e) => {
                                assert!(
                                    Instant::now() < deadline,
                                    "seed {seed}: request {id} not acknowledged within 120 s: {e}"
                                );
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            };
            loop {
                // Every request taken is delivered: the model expects exactly those.
                if done.load(Ordering::SeqCst) && next.load(Ordering::SeqCst) >= min_requests {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= reqs.len() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
                let ack = |at: &Address, id: &str| {
                    ack_times
                        .lock()
                        .insert(id.to_string(), t0.elapsed().as_secs_f64());
                    acked.lock()[w as usize].push((at.to_string(), id.to_string()))
                };
                match &reqs[i] {
                    Request::Send(t, id, v) => {
                        deliver(t.clone(), id.clone(), v.clone(), None).await;
                        // Now and then the same request again, after its acknowledgement (and
                        // perhaps a crash), in a cluster through another node: its idempotency
                        // key must hold there too. (So every run deduplicates some retries,
                        // whether or not a kill left a request ambiguous.)
                        if rng.below(10) == 0 {
                            deliver(t.clone(), id.clone(), v.clone(), None).await;
                        }
                        ack(t, id);
                    }
                    Request::Call(t, id, v, reply) => {
                        deliver(t.clone(), id.clone(), v.clone(), Some(reply.clone())).await;
                        if rng.below(10) == 0 {
                            deliver(t.clone(), id.clone(), v.clone(), Some(reply.clone())).await;
                        }
                        ack(t, id);
                    }
                    Request::DelayThenCancel {
                        at,
                        schedule,
                        cancel,
                    } => {
                        deliver(at.clone(), schedule.0.clone(), schedule.1.clone(), None).await;
                        ack(at, &schedule.0);
                        tokio::time::sleep(Duration::from_millis(rng.below(301))).await;
                        deliver(at.clone(), cancel.0.clone(), cancel.1.clone(), None).await;
                        ack(at, &cancel.0);
                    }
                }
            }
        }));
    }

    // The killer: each incarnation is killed with SIGKILL 0-700 ms after its spawn, or aborts
    // by itself at a fault point; then it is restarted on the same data and ports.
    let stats = Arc::new(Mutex::new(KillStats::default()));
    if v.chaos > 0 || v.cluster {
        let (n, others) = if v.chaos > 0 {
            let ports = std::iter::once((grpc_port, http_port))
                .chain(chaos_ports)
                .collect();
            chaos(
                dir.path(),
                &launch,
                ports,
                v.chaos,
                v.kills,
                kill_rng,
                stats.clone(),
                acked.clone(),
                t0,
            )
            .await
        } else {
            cluster_killer(
                dir.path(),
                &launch,
                &peers,
                v.kills,
                v.lose_disk,
                kill_rng,
                stats.clone(),
                t0,
            )
            .await
        };
        done.store(true, Ordering::SeqCst);
        for w in workers {
            w.await.unwrap();
        }
        if v.config.contains("cluster_log = false") {
            // Manifest puts: epoch numbers came from the control group's reservations.
            let view = cluster_view(&|_| n.http.clone(), 1)
                .await
                .expect("the cluster's view");
            let reserved = view["epochs_reserved"].as_u64().unwrap_or(0);
            let committed = metric(&n.http, "statemesh_checkpoint_committed_epoch")
                .await
                .unwrap_or(0.0);
            println!(
                "seed {seed}: epoch numbers reserved through {reserved}; committed epoch {committed}"
            );
            assert!(
                reserved >= statemesh_mesh::epoch::RESERVE_STEP,
                "seed {seed}: no epoch numbers were reserved: {view}"
            );
        }
        // Egress is read through another node (it pops the owners' records).
        let egress_http = others[0].http.clone();
        verify(
            seed,
            &v,
            n,
            others,
            model,
            reqs,
            next,
            acked,
            stats,
            t0,
            &addresses,
            &egress_http,
            &ack_times,
        )
        .await;
        return;
    }
    let killer = {
        let (data, launch, done, stats, http_url) = (
            data.clone(),
            launch.clone(),
            done.clone(),
            stats.clone(),
            http_url.clone(),
        );
        let (points, wipe_local, kills) = (v.points, v.wipe_local, v.kills);
        tokio::spawn(async move {
            // Fault points in turn; the killer stays on one until it fired (at most 3 tries).
            let (mut point, mut tries) = (0, 0);
            for k in 0..kills {
                let (wait, fault, wipe, noisy) = {
                    let mut r = kill_rng.lock();
                    let wait = if r.below(8) == 0 {
                        r.below(30)
                    } else {
                        r.below(700)
                    };
                    // Every third incarnation aborts at a fault point, so each point gets its
                    // turns whatever the seed.
                    let fault = (!points.is_empty() && k % 3 == 2).then(|| {
                        let p = points[point % points.len()];
                        // Recovery runs once per start: abort at its first pass.
                        (
                            p,
                            if p == "checkpoint-recovery" {
                                0
                            } else {
                                r.below(4)
                            },
                        )
                    });
                    // Some incarnations fail and delay durable steps now and then (errors are
                    // retried; stored-then-failed puts are resolved by reading back).
                    // Every sixth incarnation at least, for long enough to roll back in place.
                    let noisy =
                        fault.is_none() && !points.is_empty() && (r.below(4) == 0 || k % 6 == 1);
                    let wait = if noisy { wait.max(300) } else { wait };
                    (wait, fault, wipe_local && r.below(3) == 0, noisy)
                };
                if wipe {
                    std::fs::remove_dir_all(data.join("state")).ok();
                    stats.lock().wiped += 1;
                }
                let mut l = launch.clone();
                if let Some((p, skip)) = fault {
                    l.env.push((
                        "FAILPOINTS".into(),
                        format!("{p}={skip}*off->return(abort)"),
                    ));
                }
                if noisy {
                    l.env.push(("FAILPOINTS".into(), NOISE.into()));
                }
                let mut n = Node::launch(&data, &l);
                let spawned = Instant::now();
                let limit = match fault {
                    // Wait for the abort (a node that never reaches the point is killed).
                    Some(_) => Duration::from_secs(5),
                    None => Duration::from_millis(wait),
                };
                let mut listening = false;
                let mut dedup = 0.0;
                loop {
                    if n.exited().is_some() {
                        break;
                    }
                    if !listening && n.is_listening() {
                        listening = true;
                        if let Some((source, pending)) = recovery(&http_url).await {
                            let mut s = stats.lock();
                            s.recovered_pending += pending;
                            *s.recoveries.entry(source).or_default() += 1;
                        }
                    }
                    if listening {
                        if let Some(d) =
                            metric(&http_url, "statemesh_idempotent_retries_total").await
                        {
                            dedup = d;
                        }
                    }
                    if spawned.elapsed() >= limit {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20).min(limit)).await;
                }
                let log = n.log_since_launch();
                n.kill();
                let mut s = stats.lock();
                s.kills += 1;
                s.dedup += dedup;
                s.rollbacks += log
                    .matches("rolling back to the last committed epoch")
                    .count();
                if let Some((p, _)) = fault {
                    tries += 1;
                    if log.contains(&format!("failpoint {p}: abort")) {
                        *s.aborts.entry(p.to_string()).or_default() += 1;
                        (point, tries) = (point + 1, 0);
                    } else {
                        println!("fault point {p} not reached within {limit:?}");
                        if tries >= 3 {
                            (point, tries) = (point + 1, 0);
                        }
                    }
                }
                println!(
                    "kill {} of {kills} at {:.1} s: {}{}{}",
                    k + 1,
                    t0.elapsed().as_secs_f64(),
                    match fault {
                        Some((p, skip)) => format!("abort at {p} after {skip} passes"),
                        None => format!("SIGKILL after {wait} ms"),
                    },
                    if wipe {
                        " (local state deleted before start)"
                    } else {
                        ""
                    },
                    if noisy {
                        " (errors and delays injected)"
                    } else {
                        ""
                    }
                );
            }
            done.store(true, Ordering::SeqCst);
            // The last incarnation runs to the end.
            Node::start_launch(&data, &launch)
        })
    };
    for w in workers {
        w.await.unwrap();
    }
    let n = killer.await.unwrap();
    assert!(done.load(Ordering::SeqCst));
    let egress_http = n.http.clone();
    verify(
        seed,
        &v,
        n,
        Vec::new(),
        model,
        reqs,
        next,
        acked,
        stats,
        t0,
        &addresses,
        &egress_http,
        &ack_times,
    )
    .await;
}

/// A message for a failure: its target, its request (what kind) and, for the request's own
/// messages, when the client had it acknowledged (to be read against the kills' times).
fn describe(model: &Model, reqs: &[Request], ack_times: &AckTimes, id: &str) -> String {
    let m = &model.msgs[id];
    let kind = match &reqs[m.req] {
        Request::Send(..) => "a Send",
        Request::Call(..) => "a Call",
        Request::DelayThenCancel { .. } => "a delay then its cancel",
    };
    let acked = match ack_times.lock().get(id) {
        Some(t) => format!(", acknowledged at {t:.2} s"),
        None => String::new(),
    };
    // How it was sent: the chain of messages from the client's request down to it.
    let mut chain = String::new();
    let mut at = id;
    while let Some((parent, how)) = model.msgs.get(at).and_then(|m| m.parent.as_ref()) {
        let p = &model.msgs[parent];
        chain.push_str(&format!(", {how} of {parent} at {}", p.at));
        at = parent;
    }
    let top = match ack_times.lock().get(at) {
        Some(t) => format!(", acknowledged at {t:.2} s"),
        None => String::new(),
    };
    if at != id {
        chain.push_str(&format!(" (the request's own message{top})"));
    }
    format!("{id} to {} (request {}: {kind}{acked}{chain})", m.at, m.req)
}

/// Checks everything the clients had acknowledged against the model, reading through `n`
/// (the node that owns the key groups), and that the run exercised what it claims to check.
#[allow(clippy::too_many_arguments)]
async fn verify(
    seed: u64,
    v: &Variant,
    n: Node,
    others: Vec<Node>,
    mut model: Model,
    reqs: Arc<Vec<Request>>,
    next: Arc<AtomicUsize>,
    acked: Acked,
    stats: Arc<Mutex<KillStats>>,
    t0: Instant,
    addresses: &[String],
    egress_http: &str,
    ack_times: &AckTimes,
) {
    if let Some((source, pending)) = recovery(&n.http).await {
        let mut s = stats.lock();
        s.recovered_pending += pending;
        *s.recoveries.entry(source).or_default() += 1;
    }
    let taken = next.load(Ordering::SeqCst).min(reqs.len());
    println!(
        "{taken} requests acknowledged with {} kills in {:?}",
        v.kills,
        t0.elapsed()
    );
    if taken == reqs.len() {
        println!("seed {seed}: the request pool ran out before the kills did");
    }
    model.msgs.retain(|_, m| m.req < taken);
    let mut expected_egress: BTreeMap<String, usize> = BTreeMap::new();
    for m in model.msgs.values() {
        for r in &m.egress {
            *expected_egress.entry(r.clone()).or_default() += 1;
        }
    }

    // Every address's log: each required message exactly once, an optional one at most once,
    // a forbidden one never, nothing unknown; the count equals the increments of the
    // messages applied. Delayed messages may still be due: wait for the required ones.
    let required: BTreeSet<&String> = model
        .msgs
        .iter()
        .filter(|(_, m)| !m.optional && !m.forbidden)
        .map(|(id, _)| id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let logs: BTreeMap<String, Vec<String>> = loop {
        let mut logs = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for a in addresses {
            // Both states from one read: delayed messages may still be applying.
            // A node just restarted refuses reads until a majority confirms its ownership
            // lease again (503, retryable).
            let states: Value = loop {
                let (s, _, body) = common::http(
                    &format!("{}/v1/state/{a}", n.http),
                    "GET",
                    None,
                    Bytes::new(),
                )
                .await;
                if s == 200 {
                    break serde_json::from_slice(&body).unwrap();
                }
                assert!(
                    s == 503 && Instant::now() < deadline,
                    "seed {seed}: GET /v1/state/{a}: {s} {}",
                    String::from_utf8_lossy(&body)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let log: Vec<String> = states["states"]["log"]["value"]
                .as_str()
                .map(String::from)
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect();
            let mut here = BTreeMap::<&str, usize>::new();
            for id in &log {
                *here.entry(id).or_default() += 1;
                let m = model.msgs.get(id).unwrap_or_else(|| {
                    panic!("seed {seed}: {a} applied a message never sent: {id}")
                });
                assert_eq!(
                    &m.at, a,
                    "seed {seed}: message {id} applied at the wrong address"
                );
                assert!(
                    !m.forbidden,
                    "seed {seed}: cancelled message {id} fired at {a}"
                );
                seen.insert(id.clone());
            }
            let dups: Vec<_> = here.iter().filter(|(_, c)| **c > 1).collect();
            assert!(
                dups.is_empty(),
                "seed {seed}: {a} applied messages more than once: {dups:?} ({})",
                dups.iter()
                    .map(|(id, _)| describe(&model, &reqs, ack_times, id))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let want: i64 = log.iter().map(|id| model.msgs[id].inc).sum();
            let got = states["states"]["count"]["value"].as_i64().unwrap_or(0);
            assert_eq!(
                got, want,
                "seed {seed}: {a}: count {got} but its applied messages add up to {want}"
            );
            logs.insert(a.clone(), log);
        }
        let missing: Vec<_> = required.iter().filter(|id| !seen.contains(**id)).collect();
        if missing.is_empty() {
            break logs;
        }
        if Instant::now() >= deadline {
            // Where each went and what sent it (a function's send, or the request itself).
            let detail: Vec<String> = missing
                .iter()
                .take(20)
                .map(|id| {
                    let parent = model
                        .msgs
                        .iter()
                        .find(|(_, p)| p.sends.iter().any(|(_, s)| s == **id))
                        .map(|(p, pm)| {
                            format!(", sent by {p} at {} (applied: {})", pm.at, seen.contains(p))
                        })
                        .unwrap_or_default();
                    format!("{}{parent}", describe(&model, &reqs, ack_times, id))
                })
                .collect();
            panic!(
                "seed {seed}: {} required messages were never applied: {detail:?}",
                missing.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let position = |a: &str| -> BTreeMap<&str, usize> {
        logs[a]
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect()
    };
    // Order per sender: a client's acknowledged requests to an address...
    for (w, list) in acked.lock().iter().enumerate() {
        let _ = &reqs;
        let mut last: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        for (at, id) in list {
            let pos = position(at)[id.as_str()];
            if let Some((p, prev)) = last.get(at.as_str()) {
                assert!(
                    pos > *p,
                    "seed {seed}: client {w} had {prev} acknowledged before sending {id}, but {at} applied them the other way round"
                );
            }
            last.insert(at, (pos, id));
        }
    }
    // ... and one address's sends to another, in the order it applied the messages sending them.
    let mut ordered = 0;
    for (a, log) in &logs {
        let mut last: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        for id in log {
            for (to, child) in &model.msgs[id].sends {
                let pos = position(to)[child.as_str()];
                if let Some((p, prev)) = last.get(to.as_str()) {
                    assert!(
                        pos > *p,
                        "seed {seed}: {a} sent {prev} before {child} to {to}, which applied them the other way round"
                    );
                    ordered += 1;
                }
                last.insert(to, (pos, child));
            }
        }
    }
    let optional_fired = model
        .msgs
        .iter()
        .filter(|(id, m)| m.optional && logs[&m.at].contains(id))
        .count();
    let optional = model.msgs.values().filter(|m| m.optional).count();
    println!(
        "seed {seed}: {} messages applied exactly once at {} addresses ({ordered} sender-ordered pairs checked; {optional_fired} of {optional} delayed messages cancelled by a later request fired first)",
        required.len(),
        addresses.len()
    );

    // No delayed message is left over (cancelled ones included).
    let gauge_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pending = n.metric("statemesh_delayed_messages").await;
        for o in &others {
            pending += o.metric("statemesh_delayed_messages").await;
        }
        if pending == 0.0 {
            break;
        }
        assert!(
            Instant::now() < gauge_deadline,
            "seed {seed}: {pending} delayed messages still pending at the end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Egress: every expected record exactly once, read by several readers at once (a read
    // is answered once its record's removal commits: one commit answers the reads under way).
    let want: usize = expected_egress.values().sum();
    let read = Arc::new(Mutex::new((
        BTreeMap::<String, usize>::new(),
        0usize,
        None::<Instant>,
    )));
    // Every record's id, read once: ids name one record each, across every crash of the run.
    let ids = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let readers: Vec<_> = (0..EGRESS_READERS)
        .map(|_| {
            let (read, ids, url, expected) = (
                read.clone(),
                ids.clone(),
                format!("{egress_http}/v1/egress/smoke"),
                expected_egress.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let (s, id, body) = common::pop_egress_at(&url).await;
                    if s == 200 {
                        let rec = String::from_utf8_lossy(&body).to_string();
                        let id =
                            id.unwrap_or_else(|| panic!("seed {seed}: record {rec:?} has no id"));
                        if let Some(other) = ids.lock().insert(id.clone(), rec.clone()) {
                            panic!("seed {seed}: records {other:?} and {rec:?} both have id {id}");
                        }
                        let mut r = read.lock();
                        let (got, total, quiet_since) = &mut *r;
                        let c = got.entry(rec.clone()).or_default();
                        *c += 1;
                        *total += 1;
                        let e = expected.get(&rec).copied().unwrap_or(0);
                        assert!(
                            *c <= e,
                            "seed {seed}: egress record {rec:?} seen {c} times, expected {e}"
                        );
                        *quiet_since = None;
                        continue;
                    }
                    assert_eq!(s, 204, "seed {seed}: egress read failed");
                    let done = {
                        let mut r = read.lock();
                        let (_, total, quiet_since) = &mut *r;
                        assert!(
                            Instant::now() < deadline,
                            "seed {seed}: {total} of {want} egress records arrived"
                        );
                        // Once all arrived, wait a little longer for any duplicate.
                        *total >= want
                            && quiet_since.get_or_insert_with(Instant::now).elapsed()
                                > Duration::from_millis(500)
                    };
                    if done {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    for r in readers {
        if let Err(e) = r.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let got = std::mem::take(&mut read.lock().0);
    assert_eq!(
        got, expected_egress,
        "seed {seed}: egress records differ from the model"
    );
    let mut dedup_now = n.metric("statemesh_idempotent_retries_total").await;
    for o in &others {
        dedup_now += o.metric("statemesh_idempotent_retries_total").await;
    }
    // All at once: stopped one at a time, the members after the leader would each wait 5 s
    // for a last epoch that cannot commit.
    Node::stop_all(std::iter::once(n).chain(others)).await;
    let stats = stats.lock();
    println!("seed {seed}: {want} egress records exactly once; {stats:?}");
    // The run exercised what it claims to check.
    assert!(
        stats.dedup + dedup_now > 0.0,
        "seed {seed}: no retried request was deduplicated: the run did not exercise idempotency"
    );
    // (A cluster run kills the owner about eight times, often between epochs with nothing
    // pending; the single-node variants, killed 30-45 times, prove the replay.)
    assert!(
        v.cluster || v.chaos > 0 || stats.recovered_pending > 0,
        "seed {seed}: no recovery replayed a pending message"
    );
    // Noise (on some incarnations of the variants with fault points) rolls nodes back in
    // place to their last committed epoch now and then.
    // In a cluster, the leader rolls every participant back (after a noisy node asks, or
    // when the leader changes with epochs open).
    assert!(
        (v.points.is_empty() && !v.cluster) || stats.rollbacks > 0,
        "seed {seed}: no incarnation rolled back: {stats:?}"
    );
    assert!(
        !v.cluster || stats.failovers > 0,
        "seed {seed}: the leader never failed over the node kept down: {stats:?}"
    );
    for p in v.points {
        assert!(
            stats.aborts.get(*p).copied().unwrap_or(0) > 0,
            "seed {seed}: no incarnation aborted at fault point {p}: {:?}",
            stats.aborts
        );
    }
    if v.wipe_local {
        assert!(stats.wiped > 0 && stats.recoveries.contains_key("blob-full"));
    }
    if v.lose_disk {
        assert_eq!(stats.lost_disks, 1, "seed {seed}: {stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_functions_survive_sigkill_exactly_once() {
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn"],
            module: None,
            config: CONFIG,
            requests: 300,
            kills: 40,
            points: LOG_POINTS,
            wipe_local: false,
            pad: false,
            cluster: false,
            lose_disk: false,
            chaos: 0,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_thresholds_and_recovery_from_blob_storage_alone() {
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn"],
            module: None,
            config: SMALL,
            requests: 250,
            kills: 45,
            points: ALL_POINTS,
            wipe_local: true,
            pad: true,
            cluster: false,
            lose_disk: false,
            chaos: 0,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_functions_survive_sigkill_exactly_once() {
    let server = FunctionServer::start(&statefun3(), "tests/py/statefun3_functions.py");
    let module = python_module(&server.url());
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn", "statemesh.smoke/py"],
            module: Some(module),
            config: BLOB_CONFIG,
            requests: 250,
            kills: 30,
            points: POINTS,
            wipe_local: false,
            pad: false,
            cluster: false,
            lose_disk: false,
            chaos: 0,
        },
    )
    .await;
    drop(server);
}

/// What a cluster's leader logs when it moves the key groups of a node declared dead.
const FAILOVER: &str = "failover: moving the key groups of dead members";
/// How long one victim of a cluster run stays down (the leader declares a node dead 1.8 s
/// after its last heartbeat, and moves its key groups to the others).
const OUTAGE: Duration = Duration::from_secs(6);

/// The killer of a three-node cluster: starts node 1 (it bootstraps the cluster and owns
/// every key group) and nodes 2 and 3 (joining), then `kills` times SIGKILLs one of them — the
/// owner every third kill, the current leader every third, a random node otherwise — 0-700 ms
/// after its previous restart, and restarts it on its data directory and ports (with
/// `lose_disk`, the node kept down long loses its data directory and comes back as node 4).
/// Returns node 1's slot and the two others, all running.
/// `/v1/cluster` as the first of nodes `0..nodes` that answers sees it.
async fn cluster_view(http: &impl Fn(usize) -> String, nodes: usize) -> Option<Value> {
    for i in 0..nodes {
        if let Ok((200, _, b)) = common::try_http(
            &format!("{}/v1/cluster", http(i)),
            "GET",
            None,
            Bytes::new(),
        )
        .await
        {
            return Some(serde_json::from_slice(&b).unwrap_or_default());
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn cluster_killer(
    root: &std::path::Path,
    owner: &Launch,
    peers: &[(u16, u16)],
    kills: usize,
    lose_disk: bool,
    rng: Mutex<Rng>,
    stats: Arc<Mutex<KillStats>>,
    t0: Instant,
) -> (Node, Vec<Node>) {
    let seed = format!("127.0.0.1:{}", owner.grpc_port);
    let mut launches: Vec<Launch> = std::iter::once({
        let mut l = owner.clone();
        l.args = vec!["--node-id".into(), "1".into()];
        l
    })
    .chain(peers.iter().enumerate().map(|(i, (g, h))| {
        let mut l = owner.clone();
        l.grpc_port = *g;
        l.http_port = *h;
        l.args = vec![
            "--node-id".into(),
            (i + 2).to_string(),
            "--join".into(),
            seed.clone(),
        ];
        l
    }))
    .collect();
    let dir = |i: usize| root.join(format!("n{}", i + 1));
    // Node 3 joins under load, after the first kills.
    let mut nodes: Vec<Option<Node>> = vec![
        Some(Node::start_launch(&dir(0), &launches[0])),
        Some(Node::start_launch(&dir(1), &launches[1])),
        None,
    ];
    let joins_at = 3;
    let http_ports: Vec<u16> = launches.iter().map(|l| l.http_port).collect();
    let http = |i: usize| format!("http://127.0.0.1:{}", http_ports[i]);
    for k in 0..kills {
        let (wait, victim, noisy) = {
            let mut r = rng.lock();
            let wait = if r.below(8) == 0 {
                r.below(30)
            } else {
                r.below(700)
            };
            (
                wait,
                r.below(if k < joins_at { 2 } else { 3 }) as usize,
                r.below(2) == 0,
            )
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if k == joins_at {
            println!("node 3 joins the cluster under load");
            nodes[2] = Some(Node::start_launch(&dir(2), &launches[2]));
        }
        if k + 2 == kills {
            // The node kept down must be one whose loss a majority of voters survives. Two
            // members have one voter, and the third's promotion (a joint change) may not have
            // finished under the kills so far: a group whose only voter is kept down cannot
            // fail it over (seed 1796483041167110587). And it must own key groups, or there
            // is nothing to fail over: a member restarted under the kills gets its share back
            // by a handover that each kill of the leader interrupts, and the leader is killed
            // every third time (seeds 1796604616437700089, 1796604757373898905: the node kept
            // down owned nothing; it was declared dead in 1.8 s, and nothing had to move).
            // Without kills both should take moments; after 30 s the run goes on, and the
            // failover guard below says what happened.
            let calm = Instant::now();
            loop {
                let (voters, owning) = cluster_view(&http, 3).await.map_or((0, 0), |j| {
                    let m = j["members"].as_array().cloned().unwrap_or_default();
                    (
                        m.iter().filter(|m| m["role"] == "voter").count(),
                        m.iter()
                            .filter(|m| m["alive"] == true && m["key_groups"].as_u64() > Some(0))
                            .count(),
                    )
                });
                if (voters >= 3 && owning >= 3) || calm.elapsed() > Duration::from_secs(30) {
                    println!(
                        "{voters} voters, {owning} members owning key groups before the long outage (waited {:.1} s)",
                        calm.elapsed().as_secs_f64()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let why = ["the owner", "the leader", "random"][k % 3];
        let victim = match k % 3 {
            0 => 0,
            1 => {
                // The leader, as a live node sees it.
                cluster_view(&http, if k < joins_at { 2 } else { 3 })
                    .await
                    .and_then(|j| j["leader"].as_u64())
                    .map_or(victim, |l| l as usize - 1)
            }
            _ => victim,
        };
        if victim == 0 {
            // Deduplicated retries of this incarnation of the owner.
            if let Some(d) = metric(&http(0), "statemesh_idempotent_retries_total").await {
                stats.lock().dedup += d;
            }
        }
        if let Some(n) = nodes[victim].take() {
            let log = n.log_since_launch();
            let rolled = log
                .matches("rolling back to the last committed epoch")
                .count();
            let broke = log
                .matches("a stream of messages between functions broke")
                .count();
            let failovers = log.matches(FAILOVER).count();
            n.kill();
            stats.lock().rollbacks += rolled;
            stats.lock().stream_breaks += broke;
            stats.lock().failovers += failovers;
        }
        stats.lock().kills += 1;
        println!(
            "kill {} of {kills} at {:.1} s: node {} ({why}; SIGKILL after {wait} ms)",
            k + 1,
            t0.elapsed().as_secs_f64(),
            victim + 1
        );
        let mut replaced = false;
        if k + 2 == kills {
            // Down for longer than the failure detection: the leader declares it dead and its
            // key groups move to the others (everyone rolls back to the last committed epoch;
            // the new owners load them from blob storage); it gets its share back on return.
            println!("node {} stays down for {OUTAGE:?}", victim + 1);
            if lose_disk {
                // Its disk is lost for good: nothing it acknowledged may depend on it.
                std::fs::remove_dir_all(dir(victim)).unwrap();
                println!(
                    "node {}'s whole data directory is deleted; it comes back empty as node 4",
                    victim + 1
                );
                stats.lock().lost_disks += 1;
                replaced = true;
            }
            // At least OUTAGE, and until a running node logged the failover (up to 30 s): on
            // a loaded 2-core machine a leader elected after the kill may need longer than
            // OUTAGE to declare the node dead and move its key groups (seed
            // 1796437145664684873: no failover within 6 s).
            let (least, most) = (Instant::now() + OUTAGE, Instant::now() + OUTAGE * 5);
            loop {
                let now = Instant::now();
                let seen = nodes
                    .iter()
                    .flatten()
                    .any(|n| n.log_since_launch().contains(FAILOVER));
                if now >= most || (now >= least && seen) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if replaced {
            // A new member on the same ports: a node id of its own (its former self is a
            // dead member, whose Raft seat goes to it once it has caught up), joining
            // through a member that runs.
            let through = (0..launches.len()).find(|i| *i != victim && nodes[*i].is_some());
            let through = launches[through.expect("another node runs")].grpc_port;
            launches[victim].args = vec![
                "--node-id".into(),
                "4".into(),
                "--join".into(),
                format!("127.0.0.1:{through}"),
            ];
        }
        // Half of the restarts fail blob writes (manifests are the leader's, parts the
        // owner's) and roll back in place now and then (the leader synchronises everyone).
        let mut l = launches[victim].clone();
        if noisy {
            // Each rollback asked for here rolls every participant back: rarer than on one node.
            l.env.push((
                "FAILPOINTS".into(),
                // Streams of messages between functions break now and then (frames lost).
                format!(
                    "{};mesh-fn-stream-break=0.2%return",
                    NOISE.replace("checkpoint-rollback=10%", "checkpoint-rollback=1%")
                ),
            ));
        }
        let mut n = Node::launch(&dir(victim), &l);
        if let Err(log) = n.wait_listening() {
            panic!("node {} did not restart:\n{log}", victim + 1);
        }
        if victim == 0 {
            if let Some((source, pending)) = recovery(&http(0)).await {
                let mut s = stats.lock();
                s.recovered_pending += pending;
                *s.recoveries.entry(source).or_default() += 1;
            }
        }
        nodes[victim] = Some(n);
    }
    for n in nodes.iter().flatten() {
        stats.lock().failovers += n.log_since_launch().matches(FAILOVER).count();
    }
    let mut it = nodes.into_iter().map(Option::unwrap);
    let first = it.next().unwrap();
    (first, it.collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_functions_in_a_three_node_cluster_survive_sigkill_and_a_lost_disk_exactly_once() {
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn"],
            module: None,
            config: CONFIG,
            requests: 200,
            kills: 24,
            points: &[],
            wipe_local: false,
            pad: false,
            cluster: true,
            lose_disk: true,
            chaos: 0,
        },
    )
    .await;
}

/// The leaders killed while their manifest puts may be in flight (`cluster_log = false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_functions_in_a_three_node_cluster_committing_by_manifest_puts_survive_sigkill_exactly_once(
) {
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn"],
            module: None,
            config: MANIFEST_PUT_CONFIG,
            requests: 150,
            kills: 16,
            points: &[],
            wipe_local: false,
            pad: false,
            cluster: true,
            lose_disk: false,
            chaos: 0,
        },
    )
    .await;
}

/// Concurrent readers of the egress topic at the end of a run.
const EGRESS_READERS: usize = 16;

// Under its noisy fault points this run found two exactly-once defects (issue 9): a key group
// gained by a move and not loaded before a kill was recovered from deltas only (seed
// 1796294821260445853: a `count` that disagreed with its `log`; fixed by marking a new store's
// unowned key groups stale), and an egress record read twice after a return move undid the
// deletion of records read in abandoned epochs (seed 1796295187208581647; fixed by answering a
// read once its record's removal commits). 12 messages lost once in CI (seed
// 1796293964847690215) did not recur in 32 runs in a row after those fixes (that seed 2 times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_functions_in_a_three_node_cluster_survive_sigkill_exactly_once() {
    let server = FunctionServer::start(&statefun3(), "tests/py/statefun3_functions.py");
    let module = python_module(&server.url());
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn", "statemesh.smoke/py"],
            module: Some(module),
            config: CONFIG,
            requests: 150,
            kills: 21,
            points: &[],
            wipe_local: false,
            pad: false,
            cluster: true,
            lose_disk: false,
            chaos: 0,
        },
    )
    .await;
    drop(server);
}

/// The module.yaml serving `statemesh.smoke/py` from the Python SDK server at `url`.
fn python_module(url: &str) -> String {
    format!(
        "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: statemesh.smoke/py\n  urlPathTemplate: {url}\n  transport:\n    type: io.statefun.transports.v1/async\n    call: 10s\n"
    )
}

/// What a node logs when it learns it was declared dead (it was paused, or cut off from the
/// majority), before it joins again as a new generation.
const DECLARED_DEAD: &str = "this node was declared dead";

/// One event of a chaos run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// SIGKILL, restart 0-700 ms later on the same data.
    KillRestart,
    /// SIGKILL, down for 2.5-5 s (longer than the failure detection: its key groups fail
    /// over), then restarted (a new generation: it gets its share back).
    KillDown,
    /// SIGKILL, never restarted (a dead member from then on).
    KillForever,
    /// SIGTERM (it commits its last epoch and tells the cluster, whose leader moves its key
    /// groups at once), restarted 0.3-3 s later (a new generation: it gets its share back).
    Stop,
    /// SIGSTOP for 0.3-3 s, then SIGCONT (beyond 1.8 s it is declared dead and rejoins).
    Pause,
    /// Cut off from the others (`mesh-partition`, both ways or one way) for 0.5-3 s.
    Partition,
    /// A new node joins.
    Join,
    /// `statemesh cluster leave --node <a node>`: it hands its key groups over and exits 0.
    Leave,
}

/// The nodes of a chaos run.
struct Mesh {
    root: std::path::PathBuf,
    /// Node 1's launch; the others differ in ports and arguments.
    base: Launch,
    /// Ports of node `id` at `id - 1`.
    ports: Vec<(u16, u16)>,
    running: BTreeMap<u64, Node>,
    /// Left, or killed for good.
    gone: BTreeSet<u64>,
    next_id: u64,
}

impl Mesh {
    fn dir(&self, id: u64) -> std::path::PathBuf {
        self.root.join(format!("n{id}"))
    }

    /// Starts node `id` (node 1 bootstraps the cluster; the others join through the running
    /// nodes, or restart on their data) and waits until it listens.
    fn start(&mut self, id: u64) {
        let mut l = self.base.clone();
        (l.grpc_port, l.http_port) = self.ports[id as usize - 1];
        l.args = vec!["--node-id".into(), id.to_string()];
        let seeds: Vec<String> = self
            .running
            .values()
            .map(|n| n.grpc.trim_start_matches("http://").to_string())
            .collect();
        if id != 1 && !seeds.is_empty() {
            l.args.push("--join".into());
            l.args.push(seeds.join(","));
        }
        let n = Node::start_launch(&self.dir(id), &l);
        self.running.insert(id, n);
    }

    /// Waits until every running node agrees on a leader, sees every running node as a live
    /// member that is not leaving, no key group unassigned and none owned by a dead member, and
    /// is ready; returns the leader.
    async fn settled(&self) -> u64 {
        let running: BTreeSet<u64> = self.running.keys().copied().collect();
        common::eventually(
            &format!("the cluster to settle with nodes {running:?} running"),
            Duration::from_secs(60),
            || async {
                let mut leader = None;
                for n in self.running.values() {
                    let (s, _, b) = common::try_http(
                        &format!("{}/v1/cluster", n.http),
                        "GET",
                        None,
                        Bytes::new(),
                    )
                    .await
                    .ok()?;
                    let v: Value = (s == 200).then(|| serde_json::from_slice(&b).ok())??;
                    let l = v["leader"].as_u64().filter(|l| *l > 0)?;
                    if leader.is_some_and(|x| x != l) || v["unassigned_key_groups"] != 0 {
                        return None;
                    }
                    leader = Some(l);
                    let ms = v["members"].as_array()?;
                    for id in &running {
                        let m = ms.iter().find(|m| m["id"] == *id)?;
                        if m["alive"] != true || m["leaving"] == true {
                            return None;
                        }
                    }
                    if ms
                        .iter()
                        .any(|m| m["alive"] == false && m["key_groups"] != 0)
                    {
                        return None;
                    }
                    let (s, _, _) =
                        common::try_http(&format!("{}/readyz", n.http), "GET", None, Bytes::new())
                            .await
                            .ok()?;
                    if s != 200 {
                        return None;
                    }
                }
                leader
            },
        )
        .await
    }

    /// Takes node `id` out of the running ones, counting what its log says and the retried
    /// requests it deduplicated (its counter dies with it: the nodes running at the end may all
    /// have restarted since the last retry).
    async fn take(&mut self, id: u64, stats: &Mutex<KillStats>) -> Node {
        let n = self.running.remove(&id).unwrap();
        tally(&n, stats);
        let read = metric(&n.http, "statemesh_idempotent_retries_total");
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), read).await {
            stats.lock().dedup += d;
        }
        n
    }
}

/// Counts the failovers, rollbacks and declared deaths a node logged since its launch.
fn tally(n: &Node, stats: &Mutex<KillStats>) {
    let log = n.log_since_launch();
    let mut s = stats.lock();
    s.failovers += log.matches(FAILOVER).count();
    s.rollbacks += log
        .matches("rolling back to the last committed epoch")
        .count();
    s.declared_dead += log.matches(DECLARED_DEAD).count();
    s.stalls += log.matches("cluster epochs made no progress").count();
}

/// The seeded schedule of a chaos run: cycles of seven events in a random order, each cycle a
/// SIGKILL with a quick restart, a SIGKILL with an outage beyond the failure detection, a
/// SIGTERM with a restart, a pause, a partition, a join and (after it) a leave; in the second
/// cycle a SIGKILL for good instead of the leave.
fn chaos_schedule(rng: &mut Rng, events: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut cycle = 0;
    while out.len() < events {
        let mut c = vec![
            Event::KillRestart,
            Event::KillDown,
            Event::Stop,
            Event::Pause,
            Event::Partition,
            Event::Join,
            if cycle == 1 {
                Event::KillForever
            } else {
                Event::Leave
            },
        ];
        for i in (1..c.len()).rev() {
            c.swap(i, rng.below(i as u64 + 1) as usize);
        }
        // A join first: the members never drop below the initial count.
        let (j, l) = (
            c.iter().position(|e| *e == Event::Join).unwrap(),
            c.iter()
                .position(|e| matches!(e, Event::Leave | Event::KillForever))
                .unwrap(),
        );
        if l < j {
            c.swap(j, l);
        }
        out.extend(c);
        cycle += 1;
    }
    out.truncate(events);
    out
}

/// A chaos run on a cluster of `size` nodes: starts them, measures the clients' throughput
/// for 10 s of quiet, then runs `events` seeded events (one at a time, each after the cluster
/// has settled: a failure of a node while another is out would stop commits in a 3-voter
/// group, which loses nothing but proves nothing more); returns a running node and the other
/// running ones.
#[allow(clippy::too_many_arguments)]
async fn chaos(
    root: &std::path::Path,
    base: &Launch,
    ports: Vec<(u16, u16)>,
    size: usize,
    events: usize,
    rng: Mutex<Rng>,
    stats: Arc<Mutex<KillStats>>,
    acked: Acked,
    start: Instant,
) -> (Node, Vec<Node>) {
    let mut mesh = Mesh {
        root: root.to_path_buf(),
        base: base.clone(),
        ports,
        running: BTreeMap::new(),
        gone: BTreeSet::new(),
        next_id: size as u64 + 1,
    };
    for id in 1..=size as u64 {
        mesh.start(id);
    }
    mesh.settled().await;
    let acks = || acked.lock().iter().map(Vec::len).sum::<usize>();
    let (a0, t0) = (acks(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let quiet = (acks() - a0) as f64 / t0.elapsed().as_secs_f64();
    let schedule = chaos_schedule(&mut rng.lock(), events);
    println!("chaos schedule: {schedule:?}");
    let (a1, t1) = (acks(), Instant::now());
    let mut long_pause_done = false;
    for (k, e) in schedule.iter().enumerate() {
        let leader = mesh.settled().await;
        let (victim, wait, mode) = {
            let mut r = rng.lock();
            let ids: Vec<u64> = mesh.running.keys().copied().collect();
            let random = ids[r.below(ids.len() as u64) as usize];
            let victim = if r.below(3) == 0 && mesh.running.contains_key(&leader) {
                leader
            } else {
                random
            };
            let mut wait = match e {
                Event::KillRestart => r.below(700),
                Event::KillDown => 2_500 + r.below(2_500),
                Event::Stop => 300 + r.below(2_700),
                Event::Pause => 300 + r.below(2_700),
                Event::Partition => 500 + r.below(2_500),
                _ => 0,
            };
            let mode = ["return", "return(in)", "return(out)"][r.below(3) as usize];
            let mut victim = victim;
            if *e == Event::Pause && !long_pause_done {
                // The run's first pause outlasts the failure detection, on a member that does
                // not lead (a leader's successor counts from its election): it is declared dead
                // and learns it when it resumes, whatever the seed.
                long_pause_done = true;
                wait = 4_000 + r.below(1_000);
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
                if !others.is_empty() {
                    victim = others[r.below(others.len() as u64) as usize];
                }
            }
            (victim, wait, mode)
        };
        let what = match e {
            Event::KillRestart | Event::KillDown | Event::KillForever => {
                mesh.take(victim, &stats).await.kill();
                stats.lock().kills += 1;
                if *e != Event::KillForever {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    mesh.start(victim);
                } else {
                    mesh.gone.insert(victim);
                }
                if *e == Event::KillForever {
                    format!("SIGKILL node {victim} for good")
                } else {
                    format!("SIGKILL node {victim}, restarted {wait} ms later")
                }
            }
            Event::Stop => {
                let taken = mesh
                    .take(victim, &stats)
                    .await
                    .stop_logged()
                    .await
                    .contains("the cluster has taken this node's stop");
                {
                    let mut s = stats.lock();
                    s.stops += 1;
                    s.stops_taken += usize::from(taken);
                }
                tokio::time::sleep(Duration::from_millis(wait)).await;
                mesh.start(victim);
                format!(
                    "SIGTERM node {victim} (its stop {}), restarted {wait} ms later",
                    if taken { "taken" } else { "not taken" }
                )
            }
            Event::Pause => {
                let pid = mesh.running[&victim].pid() as i32;
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                unsafe { libc::kill(pid, libc::SIGCONT) };
                stats.lock().pauses += 1;
                format!("SIGSTOP node {victim}, SIGCONT {wait} ms later")
            }
            Event::Partition => {
                let n = &mesh.running[&victim];
                put_failpoints(n, &format!("mesh-partition={mode}")).await;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                put_failpoints(n, "mesh-partition=off").await;
                stats.lock().partitions += 1;
                format!("node {victim} cut off ({mode}) for {wait} ms")
            }
            Event::Join => {
                let id = mesh.next_id;
                mesh.next_id += 1;
                mesh.start(id);
                stats.lock().joins += 1;
                format!("node {id} joins")
            }
            Event::Leave => {
                let grpc = mesh.running[&victim].grpc.clone();
                let t = Instant::now();
                let (ok, out, err) = tokio::task::spawn_blocking(move || {
                    let o = std::process::Command::new(common::BIN)
                        .args(["cluster", "leave", "--node", &grpc, "--timeout-s", "90"])
                        .output()
                        .unwrap();
                    (
                        o.status.success(),
                        String::from_utf8_lossy(&o.stdout).to_string(),
                        String::from_utf8_lossy(&o.stderr).to_string(),
                    )
                })
                .await
                .unwrap();
                if !ok {
                    // What the members say, and what the nodes logged lately.
                    let status = std::process::Command::new(common::BIN)
                        .args(["cluster", "status", "--node", &mesh.running[&victim].grpc])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                        .unwrap_or_default();
                    let mut logs = String::new();
                    for (id, n) in &mesh.running {
                        let log = n.log_since_launch();
                        // Not the reconnection attempts to a node killed for good (one a
                        // second: they filled the whole tail of a CI failure's logs).
                        let lines: Vec<&str> = log
                            .lines()
                            .filter(|l| {
                                l.contains("statemesh")
                                    && !l.contains("mesh link to a peer is down")
                            })
                            .collect();
                        logs += &format!("--- node {id}, the end of its log:\n");
                        for l in &lines[lines.len().saturating_sub(25)..] {
                            logs += &format!("{}\n", l.chars().take(400).collect::<String>());
                        }
                    }
                    panic!("node {victim} did not leave:\n{out}\n{err}\n{status}\n{logs}");
                }
                let mut n = mesh.take(victim, &stats).await;
                let status = common::eventually(
                    &format!("node {victim} to exit after leaving"),
                    Duration::from_secs(30),
                    || {
                        let s = n.exited();
                        async move { s }
                    },
                )
                .await;
                assert!(status.success(), "node {victim} exited with {status}");
                mesh.gone.insert(victim);
                stats.lock().leaves += 1;
                format!("node {victim} leaves ({:?})", t.elapsed())
            }
        };
        stats.lock().events += 1;
        println!(
            "event {} of {events} (ended at {:.1} s): {what}",
            k + 1,
            start.elapsed().as_secs_f64()
        );
    }
    mesh.settled().await;
    let during = (acks() - a1) as f64 / t1.elapsed().as_secs_f64();
    println!(
        "throughput of the clients: {quiet:.0} acknowledged requests/s quiet, {during:.0}/s during {events} events over {:?} ({:.0} %)",
        t1.elapsed(),
        100.0 * during / quiet
    );
    for n in mesh.running.values() {
        tally(n, &stats);
    }
    let s = stats.lock();
    assert!(
        s.failovers > 0 && s.declared_dead > 0 && s.joins > 0 && s.leaves > 0,
        "the chaos run exercised failover, declared deaths, joins and leaves: {s:?}"
    );
    // (Whether the cluster took them depends on who else is up: not asserted here, see
    // `tests/cluster.rs`.)
    assert!(s.stops > 0, "the chaos run had graceful stops: {s:?}");
    drop(s);
    let mut it = std::mem::take(&mut mesh.running).into_values();
    let first = it.next().unwrap();
    (first, it.collect())
}

/// Configures fault points of a running node (`PUT /debug/failpoints`).
async fn put_failpoints(n: &Node, spec: &str) {
    let (s, _, b) = common::http(
        &format!("{}/debug/failpoints", n.http),
        "PUT",
        None,
        Bytes::from(spec.to_string()),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
}

// Before the fix of overlapping rollbacks (`4c975ca`: a shard dropped what came early for a
// newer generation when an older rollback finished first), one run in about ten lost a
// message between two functions (seed 1796279335830154761); since, 21 runs in a row passed
// with no loss and no epoch stall before it went back into CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_three_nodes_with_python_sdk_functions_loses_nothing() {
    let server = FunctionServer::start(&statefun3(), "tests/py/statefun3_functions.py");
    let module = python_module(&server.url());
    run(
        seed(),
        Variant {
            types: &["statemesh.smoke/fn", "statemesh.smoke/py"],
            module: Some(module),
            config: CONFIG,
            requests: 200,
            kills: 30,
            points: &[],
            wipe_local: false,
            pad: false,
            cluster: false,
            lose_disk: false,
            chaos: 3,
        },
    )
    .await;
    drop(server);
}

// Pauses and partitions of the epochs' leader where nothing fences its commits: with
// `cluster_log = false` a commit is the leader's manifest put, and no entry of the control
// group refuses a deposed leader's (its successor numbers its epochs above every reservation
// instead). Five runs by hand passed before it went into CI (four of the five-node chaos with
// `CRASH_CHECKPOINT="cluster_log = false"`, one of this test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_five_nodes_committing_by_manifest_puts_loses_nothing() {
    run(seed(), five_node_chaos(CHAOS_MANIFEST_PUT_CONFIG)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_five_nodes_loses_nothing() {
    run(seed(), five_node_chaos(CONFIG)).await;
}

/// The five-node chaos runs: 30 chaos events (pauses, partitions, kills, joins and leaves)
/// over 200 requests to one embedded function.
fn five_node_chaos(config: &'static str) -> Variant {
    Variant {
        types: &["statemesh.smoke/fn"],
        module: None,
        config,
        requests: 200,
        kills: 30,
        points: &[],
        wipe_local: false,
        pad: false,
        cluster: false,
        lose_disk: false,
        chaos: 5,
    }
}
