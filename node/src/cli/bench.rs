//! `statemesh bench`: load generators and benchmarks. Each prints one JSON object with
//! throughput, p50/p99 latency, errors and peak memory.
//!
//! - `bench embedded`: an in-process node; tokens circulate through a ring of embedded
//!   functions (function-to-function messaging, no network).
//! - `bench load`: drives a running node over gRPC or HTTP with the counter workload
//!   (`example/counter`, delta 1): `call`, one-way `send`, or streamed sends (`stream`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use serde_json::json;
use statemesh_node::{NodeBuilder, NodeConfig};
use statemesh_sdk::{Address, Client, FnFunction, TypeName, TypedValue, ValueSpec, WellKnown};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Request-reply: wait for the counter's new total.
    Call,
    /// One-way send, acknowledged when accepted.
    Send,
    /// Streamed sends (gRPC only).
    Stream,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// In-process ring of embedded functions.
    Embedded {
        /// Function instances in the ring.
        #[arg(long, default_value_t = 10_000)]
        instances: u64,
        /// Messages circulating concurrently.
        #[arg(long, default_value_t = 2_000)]
        tokens: u64,
        /// Seconds to measure.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Shards (0 = one per core).
        #[arg(long, default_value_t = 0)]
        shards: usize,
    },
    /// Memory: idle node RSS, then RSS per active instance after activating N counters.
    Memory {
        /// Counter instances to activate.
        #[arg(long, default_value_t = 100_000)]
        instances: u64,
    },
    /// Counter workload against a running node.
    Load(LoadArgs),
    /// Loads a StateFun function server directly (no node) with the shape statemesh sends:
    /// one counter invocation per request, with its state, per address.
    Direct {
        /// The function endpoint URL.
        #[arg(long)]
        url: String,
        /// The counter function type the server serves.
        #[arg(long, default_value = "rs/counter")]
        function: String,
        /// The counter's state name.
        #[arg(long, default_value = "total")]
        state: String,
        /// Concurrent requests, each to its own address.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Messages per request.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Seconds to measure.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> serde_json::Value {
    if h.is_empty() {
        serde_json::Value::Null
    } else {
        json!((h.value_at_quantile(q) as f64) / 1000.0)
    }
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Embedded {
            instances,
            tokens,
            duration,
            shards,
        } => embedded(instances, tokens, duration, shards).await,
        BenchCommand::Memory { instances } => memory(instances).await,
        BenchCommand::Load(args) => load(args).await,
        BenchCommand::Direct {
            url,
            function,
            state,
            concurrency,
            batch,
            duration,
        } => direct(url, function, state, concurrency, batch, duration).await,
    }
}

async fn embedded(instances: u64, tokens: u64, duration: f64, shards: usize) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let stop = Arc::new(AtomicBool::new(false));
    let hops = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(hist()));
    let origin = Instant::now();
    let ring = TypeName::parse("bench/ring")?;
    let count = ValueSpec::<i64>::new("count");
    let (stop2, hops2, lat2, ring2) = (stop.clone(), hops.clone(), latency.clone(), ring.clone());
    let f = FnFunction::new(vec![count.descriptor().clone()], move |ctx, msg| {
        // The message carries its send time (µs since the bench started).
        let sent_us: i64 = msg.get()?;
        let now_us = origin.elapsed().as_micros() as i64;
        let n = ctx.get(&count)?.unwrap_or(0) + 1;
        ctx.set(&count, &n)?;
        if n % 64 == 0 {
            lat2.lock()
                .saturating_record((now_us - sent_us).max(1) as u64);
            hops2.fetch_add(64, Ordering::Relaxed);
        }
        if !stop2.load(Ordering::Relaxed) {
            let id: u64 = ctx.self_address().id.parse().unwrap_or(0);
            let next = Address {
                typ: ring2.clone(),
                id: ((id + 1) % instances).to_string().into(),
            };
            ctx.send_value(next, &now_us);
        }
        Ok(())
    });
    let cfg = NodeConfig {
        shards,
        ..in_process_config(&dir)
    };
    let node = NodeBuilder::new(cfg)
        .function(ring.clone(), f)
        .start()
        .await?;
    let batch: Vec<(Address, TypedValue, Option<String>)> = (0..tokens)
        .map(|t| {
            (
                Address {
                    typ: ring.clone(),
                    id: ((t * instances / tokens.max(1)) % instances)
                        .to_string()
                        .into(),
                },
                TypedValue::of(&0i64),
                None,
            )
        })
        .collect();
    node.router().send_batch(batch, true).await?;
    // Warm up: every instance activated at least once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    latency.lock().reset();
    let h0 = hops.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let h1 = hops.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let peak = statemesh_node::metrics::process_memory().map(|(_, p)| p);
    let l = latency.lock().clone();
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "bench": "embedded-ring",
            "instances": instances,
            "tokens": tokens,
            "duration_s": elapsed,
            "invocations_per_s": ((h1 - h0) as f64 / elapsed).round(),
            "hop_latency_p50_ms": ms(&l, 0.5),
            "hop_latency_p99_ms": ms(&l, 0.99),
            "errors": 0,
            "peak_rss_mib": peak.map(|p| p as f64 / 1048576.0),
        })
    );
    Ok(())
}

async fn memory(instances: u64) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let cfg = in_process_config(&dir);
    let node = NodeBuilder::new(cfg).with_examples().start().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = || {
        statemesh_node::metrics::process_memory()
            .map(|(r, _)| r)
            .unwrap_or(0) as f64
    };
    let idle = rss();
    let counter = TypeName::parse("example/counter")?;
    let metrics = || async {
        // The invocation count as the node exports it.
        let text = node.router().metrics_text();
        text.lines()
            .find(|l| l.starts_with("statemesh_invocations_total "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    for chunk in (0..instances).collect::<Vec<_>>().chunks(10_000) {
        let batch = chunk
            .iter()
            .map(|i| {
                (
                    Address {
                        typ: counter.clone(),
                        id: i.to_string().into(),
                    },
                    TypedValue::of(&1i64),
                    None,
                )
            })
            .collect();
        node.router().send_batch(batch, true).await?;
    }
    let t0 = Instant::now();
    while metrics().await < instances && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the periodic flush write every dirty state to sled and the instance actors'
    // linger run out (their state stays cached in the shards: the instances stay active).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // Return freed pages to the OS so RSS shows live memory, not the ingest burst's garbage.
    // SAFETY: asks mimalloc to release unused memory; no preconditions.
    unsafe { libmimalloc_sys::mi_collect(true) };
    let active = rss();
    let peak = statemesh_node::metrics::process_memory()
        .map(|(_, p)| p)
        .unwrap_or(0) as f64;
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "bench": "memory",
            "instances": instances,
            "idle_rss_mib": idle / 1048576.0,
            "active_rss_mib": active / 1048576.0,
            "peak_rss_mib": peak / 1048576.0,
            "bytes_per_active_instance": ((active - idle) / instances as f64).round(),
        })
    );
    Ok(())
}

/// An in-process node on a scratch directory and OS-chosen loopback ports.
fn in_process_config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        grpc_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        http_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..NodeConfig::default()
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("statemesh-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// gRPC URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:5090")]
    grpc: String,
    /// HTTP base URL of the node (also used to read its peak memory from /metrics).
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    http: String,
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    #[arg(long, value_enum, default_value = "call")]
    mode: Mode,
    /// Distinct counter keys.
    #[arg(long, default_value_t = 1_000)]
    keys: u64,
    /// Concurrent requests (or streams).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Connections to spread the load over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Messages per frame in stream mode.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// The counter function type to load (`example/counter`, or a remote one).
    #[arg(long, default_value = "example/counter")]
    function: String,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A metric of the node, from its `/metrics`.
async fn node_metric(http: &str, name: &str) -> Option<f64> {
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = client
        .get(format!("{http}/metrics").parse().ok()?)
        .await
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    let prefix = format!("{name} ");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
}

async fn node_peak_rss(http: &str) -> Option<f64> {
    node_metric(http, "statemesh_process_peak_resident_memory_bytes")
        .await
        .map(|b| b / 1048576.0)
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    if a.mode == Mode::Stream && a.protocol == Protocol::Http {
        anyhow::bail!("--mode stream needs --protocol grpc");
    }
    let counter = TypeName::parse(&a.function)?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut clients = Vec::new();
    if a.protocol == Protocol::Grpc {
        for _ in 0..a.connections.max(1) {
            clients.push(Client::connect(&a.grpc).await?);
        }
    }
    let http_client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(a.concurrency)
            .build_http();
    let batches_before = node_metric(&a.http, "statemesh_remote_batch_size_count")
        .await
        .unwrap_or(0.0);
    let batched_before = node_metric(&a.http, "statemesh_remote_batch_size_sum")
        .await
        .unwrap_or(0.0);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.concurrency {
        let (ok, errors, first_error, counter) = (
            ok.clone(),
            errors.clone(),
            first_error.clone(),
            counter.clone(),
        );
        let grpc = clients.get(w % clients.len().max(1)).cloned();
        let http_client = http_client.clone();
        let (http, mode, protocol, keys, batch) =
            (a.http.clone(), a.mode, a.protocol, a.keys.max(1), a.batch);
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut i = w as u64;
            let note = |e: String| {
                errors.fetch_add(1, Ordering::Relaxed);
                first_error.lock().get_or_insert(e);
            };
            if mode == Mode::Stream {
                let client = grpc.expect("grpc client");
                let n = Arc::new(AtomicU64::new(0));
                let n2 = n.clone();
                let ctr = counter.clone();
                let msgs = futures::stream::unfold(i, move |i| {
                    let ctr = ctr.clone();
                    let n2 = n2.clone();
                    async move {
                        if Instant::now() >= deadline {
                            return None;
                        }
                        n2.fetch_add(1, Ordering::Relaxed);
                        let addr = Address {
                            typ: ctr,
                            id: (i % keys).to_string().into(),
                        };
                        Some(((addr, TypedValue::of(&1i64)), i + 7919))
                    }
                });
                match client.send_stream(msgs, batch).await {
                    Ok(accepted) => {
                        ok.fetch_add(accepted, Ordering::Relaxed);
                    }
                    Err(e) => note(e.to_string()),
                }
                return h;
            }
            while Instant::now() < deadline {
                let key = (i % keys).to_string();
                i = i.wrapping_add(7919);
                let t = Instant::now();
                let r: Result<(), String> = match protocol {
                    Protocol::Grpc => {
                        let c = grpc.as_ref().expect("grpc client");
                        let addr = Address {
                            typ: counter.clone(),
                            id: key.into(),
                        };
                        match mode {
                            Mode::Call => c
                                .call(&addr, TypedValue::of(&1i64))
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string()),
                            _ => c
                                .send(&addr, TypedValue::of(&1i64))
                                .await
                                .map_err(|e| e.to_string()),
                        }
                    }
                    Protocol::Http => {
                        let verb = if mode == Mode::Call { "call" } else { "send" };
                        let req =
                            hyper::Request::post(format!("{http}/v1/{verb}/example/counter/{key}"))
                                .header("content-type", "application/vnd.io.statefun.types/long")
                                .body(Full::new(Bytes::from_static(b"1")))
                                .expect("valid request");
                        match http_client.request(req).await {
                            Ok(resp) if resp.status().is_success() => {
                                let _ = resp.into_body().collect().await;
                                Ok(())
                            }
                            Ok(resp) => Err(format!("HTTP {}", resp.status())),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                };
                match r {
                    Ok(()) => {
                        h.saturating_record(t.elapsed().as_micros().max(1) as u64);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => note(e),
                }
            }
            h
        }));
    }
    let mut all = hist();
    for t in tasks {
        all.add(t.await?).ok();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    let batches = node_metric(&a.http, "statemesh_remote_batch_size_count")
        .await
        .unwrap_or(0.0)
        - batches_before;
    let batched = node_metric(&a.http, "statemesh_remote_batch_size_sum")
        .await
        .unwrap_or(0.0)
        - batched_before;
    println!(
        "{}",
        json!({
            "bench": "load",
            "remote_mean_batch_size": if batches > 0.0 { serde_json::json!((batched / batches * 100.0).round() / 100.0) } else { serde_json::Value::Null },
            "protocol": format!("{:?}", a.protocol).to_lowercase(),
            "mode": format!("{:?}", a.mode).to_lowercase(),
            "function": a.function,
            "keys": a.keys,
            "concurrency": a.concurrency,
            "duration_s": elapsed,
            "ok": n,
            "throughput_per_s": (n as f64 / elapsed).round(),
            "latency_p50_ms": ms(&all, 0.5),
            "latency_p99_ms": ms(&all, 0.99),
            "errors": errors.load(Ordering::Relaxed),
            "first_error": *first_error.lock(),
            "node_peak_rss_mib": node_peak_rss(&a.http).await,
        })
    );
    Ok(())
}

async fn direct(
    url: String,
    function: String,
    state: String,
    concurrency: usize,
    batch: usize,
    duration: f64,
) -> anyhow::Result<()> {
    use prost::Message;
    use statemesh_proto::statefun_v3 as pb;
    let typ = TypeName::parse(&function)?;
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .build_http();
    let deadline = Instant::now() + Duration::from_secs_f64(duration);
    let errors = Arc::new(AtomicU64::new(0));
    let messages = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, url, typ, state, errors, messages) = (
            client.clone(),
            url.clone(),
            typ.clone(),
            state.clone(),
            errors.clone(),
            messages.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut total = TypedValue::empty(<i64 as WellKnown>::TYPENAME);
            let target = pb::Address { namespace: typ.namespace().into(), r#type: typ.name().into(), id: format!("direct-{w}") };
            let caller = pb::Address { namespace: "statemesh".into(), r#type: "reply".into(), id: w.to_string() };
            while Instant::now() < deadline {
                let req = pb::ToFunction {
                    request: Some(pb::to_function::Request::Invocation(pb::to_function::InvocationBatchRequest {
                        target: Some(target.clone()),
                        state: vec![pb::to_function::PersistedValue {
                            state_name: state.clone(),
                            state_value: Some(pb::TypedValue { typename: total.typename().into(), has_value: total.has_value(), value: total.value().clone() }),
                        }],
                        invocations: (0..batch)
                            .map(|_| pb::to_function::Invocation {
                                caller: Some(caller.clone()),
                                argument: Some(pb::TypedValue { typename: <i64 as WellKnown>::TYPENAME.into(), has_value: true, value: TypedValue::of(&1i64).value().clone() }),
                            })
                            .collect(),
                    })),
                };
                let t = Instant::now();
                let http_req = hyper::Request::post(url.as_str())
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(Bytes::from(req.encode_to_vec())))
                    .expect("valid request");
                let ok = match client.request(http_req).await {
                    Ok(resp) if resp.status().is_success() => match resp.into_body().collect().await {
                        Ok(b) => match pb::FromFunction::decode(b.to_bytes()) {
                            Ok(pb::FromFunction { response: Some(pb::from_function::Response::InvocationResult(r)) }) => {
                                if let Some(v) = r.state_mutations.into_iter().find_map(|m| m.state_value) {
                                    total = TypedValue::new(v.typename, v.value);
                                }
                                true
                            }
                            _ => false,
                        },
                        Err(_) => false,
                    },
                    _ => false,
                };
                if ok {
                    h.saturating_record(t.elapsed().as_micros().max(1) as u64);
                    messages.fetch_add(batch as u64, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            h
        }));
    }
    let mut all = hist();
    for t in tasks {
        all.add(t.await?).ok();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = messages.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({
            "bench": "direct",
            "url": url,
            "function": function,
            "concurrency": concurrency,
            "batch": batch,
            "duration_s": elapsed,
            "messages_per_s": (n as f64 / elapsed).round(),
            "request_latency_p50_ms": ms(&all, 0.5),
            "request_latency_p99_ms": ms(&all, 0.99),
            "errors": errors.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
