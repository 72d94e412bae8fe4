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

use anyhow::Context as _;
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
    /// One-way send, acknowledged with the node's mode (by default once committed).
    Send,
    /// Streamed sends (gRPC only).
    Stream,
}

/// `bench embedded`.
#[derive(clap::Args)]
pub struct EmbeddedArgs {
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
    /// Checkpoint to blob storage (a `file://` store in the scratch directory) every
    /// `--interval-ms`; off = sled only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    checkpoints: bool,
    /// Checkpoint interval.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// The node's `instance_linger_ms` (unset: actors kept while states are cached).
    #[arg(long)]
    instance_linger_ms: Option<u64>,
    /// The node's `[checkpoint] apply_interval_ms` (how often committed epochs are
    /// written to sled, merged).
    #[arg(long, default_value_t = 1_000)]
    apply_interval_ms: u64,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// In-process ring of embedded functions.
    Embedded(EmbeddedArgs),
    /// Checkpoint cost vs state size: populates `--keys` states of `--value-bytes`, then
    /// changes `--change` of them per round and reports each epoch's bytes and duration.
    Checkpoint {
        /// Keys (one state each).
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Bytes per state value.
        #[arg(long, default_value_t = 100)]
        value_bytes: usize,
        /// Fraction of keys changed per round.
        #[arg(long, default_value_t = 0.01)]
        change: f64,
        /// Rounds.
        #[arg(long, default_value_t = 20)]
        rounds: u64,
    },
    /// Recovery time to the first served call: populates `--keys` states, stops, restarts
    /// from local sled, then from blob storage alone (sled deleted).
    Recovery {
        /// Keys (one state each).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// A node config file whose `[checkpoint]` section the node uses (for example blob
        /// storage on S3); by default local files in the scratch directory.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Bytes per state value.
        #[arg(long, default_value_t = 100)]
        value_bytes: usize,
    },
    /// Memory: idle node RSS, then RSS per active instance after activating N counters.
    Memory {
        /// Counter instances to activate.
        #[arg(long, default_value_t = 100_000)]
        instances: u64,
        /// The node's `instance_linger_ms` (unset: actors kept while states are cached).
        #[arg(long)]
        instance_linger_ms: Option<u64>,
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
    /// Kafka through running nodes: produces `--records` records to `--input` (keys over
    /// `--keys` ids), which a Kafka ingress hands to `example/forward`, and reads them back
    /// from the topic `forwarded` (its Kafka egress). Prints throughput, end-to-end latency
    /// (produced → read back), duplicates and missing records, and the CPU time of `--pids`
    /// per record. Expects empty topics.
    Kafka(KafkaArgs),
}

/// `bench kafka`.
#[derive(clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers.
    #[arg(long)]
    bootstrap: String,
    /// The input topic (the ingress's).
    #[arg(long, default_value = "in")]
    input: String,
    /// Records to produce.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Distinct record keys (function instances).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Records per second to produce at (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Node processes whose CPU time to report (comma-separated PIDs).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Give up waiting for records after this many seconds without one.
    #[arg(long, default_value_t = 30.0)]
    quiet: f64,
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
        BenchCommand::Kafka(a) => kafka(a).await,
        BenchCommand::Embedded(a) => embedded(a).await,
        BenchCommand::Checkpoint {
            keys,
            value_bytes,
            change,
            rounds,
        } => checkpoint(keys, value_bytes, change, rounds).await,
        BenchCommand::Recovery {
            keys,
            value_bytes,
            config,
        } => recovery(keys, value_bytes, config).await,
        BenchCommand::Memory {
            instances,
            instance_linger_ms,
        } => memory(instances, instance_linger_ms).await,
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

async fn embedded(a: EmbeddedArgs) -> anyhow::Result<()> {
    let EmbeddedArgs {
        instances,
        tokens,
        duration,
        shards,
        checkpoints,
        interval_ms,
        instance_linger_ms,
        apply_interval_ms,
    } = a;
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
        if sent_us < 0 {
            // Warm-up: activate the instance, do not forward.
            return Ok(());
        }
        thread_local! {
            static LOCAL_HOPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        let local = LOCAL_HOPS.with(|h| {
            h.set(h.get() + 1);
            h.get()
        });
        if local.is_multiple_of(64) {
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
    let mut cfg = NodeConfig {
        shards,
        ..in_process_config(&dir)
    };
    cfg.checkpoint.enabled = checkpoints;
    cfg.checkpoint.interval_ms = interval_ms;
    cfg.checkpoint.apply_interval_ms = apply_interval_ms;
    cfg.instance_linger_ms = instance_linger_ms;
    // Every instance stays active: this measures messaging and checkpoints, not passivation.
    cfg.max_active_instances = cfg.max_active_instances.max(2 * instances as usize);
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
    // Warm up: every instance activated (its state written) before measuring.
    let typ = ring.clone();
    write_keys(&node, &typ, 0..instances, &TypedValue::of(&-1i64)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.router().send_batch(batch, true).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    latency.lock().reset();
    let h0 = hops.load(Ordering::Relaxed);
    let cpu0 = process_cpu_s();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let h1 = hops.load(Ordering::Relaxed);
    let cpu = process_cpu_s() - cpu0;
    stop.store(true, Ordering::Relaxed);
    let peak = statemesh_node::metrics::process_memory().map(|(_, p)| p);
    let l = latency.lock().clone();
    let cp = node.checkpoints();
    let text = node.router().metrics_text();
    let metric = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let cut_max_ms = metric("statemesh_checkpoint_cut_max_microseconds ").map(|us| us / 1e3);
    let cut_mean_ms = match (
        metric("statemesh_checkpoint_cut_duration_seconds_sum "),
        metric("statemesh_checkpoint_cut_duration_seconds_count "),
    ) {
        (Some(s), Some(c)) if c > 0.0 => Some(s / c * 1e3),
        _ => None,
    };
    let listed = metric("statemesh_checkpoint_pending_listed_total ");
    let recorded = metric("statemesh_checkpoint_pending_recorded_total ");
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let epochs = cp.recent.len().max(1) as f64;
    println!(
        "{}",
        json!({
            "bench": "embedded-ring",
            "checkpoints": checkpoints,
            "interval_ms": interval_ms,
            "apply_interval_ms": apply_interval_ms,
            "epochs_committed": cp.committed,
            "cut_pause_mean_ms": cut_mean_ms,
            "cut_pause_max_ms": cut_max_ms,
            "pending_listed": listed,
            "pending_recorded": recorded,
            "recent_epoch_mean_bytes": (cp.recent.iter().map(|e| e.bytes).sum::<u64>() as f64 / epochs).round(),
            "recent_epoch_mean_ms": cp.recent.iter().map(|e| e.duration_ms).sum::<f64>() / epochs,
            "instances": instances,
            "instance_linger_ms": instance_linger_ms,
            "tokens": tokens,
            "duration_s": elapsed,
            "invocations_per_s": ((h1 - h0) as f64 / elapsed).round(),
            "cpu_s": cpu,
            "cpu_us_per_invocation": cpu * 1e6 / (h1 - h0).max(1) as f64,
            "hop_latency_p50_ms": ms(&l, 0.5),
            "hop_latency_p99_ms": ms(&l, 0.99),
            "errors": 0,
            "peak_rss_mib": peak.map(|p| p as f64 / 1048576.0),
        })
    );
    Ok(())
}

async fn memory(instances: u64, instance_linger_ms: Option<u64>) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let mut cfg = in_process_config(&dir);
    cfg.instance_linger_ms = instance_linger_ms;
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
    // Let the periodic flush write every dirty state to sled (the instances stay active, with
    // their actors).
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
            "instance_linger_ms": instance_linger_ms,
            "idle_rss_mib": idle / 1048576.0,
            "active_rss_mib": active / 1048576.0,
            "peak_rss_mib": peak / 1048576.0,
            "bytes_per_active_instance": ((active - idle) / instances as f64).round(),
        })
    );
    Ok(())
}

/// CPU time (user + system) this process has used, seconds.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th field.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// A function keeping the message (a string) as its state `v`; replies its length.
fn blob_function() -> (TypeName, FnFunction) {
    let v = ValueSpec::<String>::new("v");
    let f = FnFunction::new(vec![v.descriptor().clone()], move |ctx, msg| {
        let s: String = msg.get()?;
        let n = s.len() as i64;
        ctx.set(&v, &s)?;
        ctx.reply(TypedValue::of(&n));
        Ok(())
    });
    (TypeName::parse("bench/blob").expect("valid"), f)
}

fn value(bytes: usize, round: u64) -> TypedValue {
    let mut s = format!("{round:08}");
    s.extend(std::iter::repeat_n('x', bytes.saturating_sub(s.len())));
    TypedValue::of(&s)
}

/// Sends `value` to `keys` (committed acknowledgements), in chunks.
async fn write_keys(
    node: &statemesh_node::NodeHandle,
    typ: &TypeName,
    keys: impl Iterator<Item = u64>,
    v: &TypedValue,
) -> anyhow::Result<()> {
    let keys: Vec<u64> = keys.collect();
    for chunk in keys.chunks(20_000) {
        let batch = chunk
            .iter()
            .map(|k| {
                (
                    Address {
                        typ: typ.clone(),
                        id: k.to_string().into(),
                    },
                    v.clone(),
                    None,
                )
            })
            .collect();
        node.router().send_batch(batch, true).await?;
    }
    Ok(())
}

async fn checkpoint(keys: u64, value_bytes: usize, change: f64, rounds: u64) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let (typ, f) = blob_function();
    let node = NodeBuilder::new(in_process_config(&dir))
        .function(typ.clone(), f)
        .start()
        .await?;
    let t0 = Instant::now();
    write_keys(&node, &typ, 0..keys, &value(value_bytes, 0)).await?;
    let populate_s = t0.elapsed().as_secs_f64();
    // Let any full snapshot the population triggered finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = node.checkpoints();
    let changed = ((keys as f64 * change).round() as u64).max(1);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut commit = hist();
    for r in 1..=rounds {
        let picks: Vec<u64> = (0..changed)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % keys
            })
            .collect();
        let t = Instant::now();
        write_keys(&node, &typ, picks.into_iter(), &value(value_bytes, r)).await?;
        commit.saturating_record(t.elapsed().as_micros().max(1) as u64);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let after = node.checkpoints();
    let peak = statemesh_node::metrics::process_memory().map(|(_, p)| p);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let epochs: Vec<_> = after
        .recent
        .iter()
        .filter(|e| e.epoch > before.committed && e.bytes > 0)
        .collect();
    let n = epochs.len().max(1) as f64;
    let mut durations: Vec<f64> = epochs.iter().map(|e| e.duration_ms).collect();
    durations.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        durations
            .get(((durations.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    println!(
        "{}",
        json!({
            "bench": "checkpoint",
            "keys": keys,
            "value_bytes": value_bytes,
            "state_mib": (keys as f64 * value_bytes as f64) / 1048576.0,
            "changed_per_round": changed,
            "populate_s": populate_s,
            "epochs": epochs.len(),
            "epoch_mean_bytes": (epochs.iter().map(|e| e.bytes).sum::<u64>() as f64 / n).round(),
            "epoch_mean_entries": (epochs.iter().map(|e| e.entries).sum::<usize>() as f64 / n).round(),
            "epoch_duration_mean_ms": durations.iter().sum::<f64>() / n,
            "epoch_duration_p50_ms": pct(0.5),
            "epoch_duration_p99_ms": pct(0.99),
            "round_commit_p50_ms": ms(&commit, 0.5),
            "round_commit_p99_ms": ms(&commit, 0.99),
            "last_full_snapshot": after.last_full,
            "peak_rss_mib": peak.map(|p| p as f64 / 1048576.0),
        })
    );
    Ok(())
}

async fn recovery(
    keys: u64,
    value_bytes: usize,
    config: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let checkpoint = match &config {
        Some(path) => statemesh_node::config::NodeConfig::load(path)?.checkpoint,
        None => in_process_config(&dir).checkpoint,
    };
    let start = || async {
        let (typ, f) = blob_function();
        let cfg = NodeConfig {
            checkpoint: checkpoint.clone(),
            ..in_process_config(&dir)
        };
        let node = NodeBuilder::new(cfg)
            .function(typ.clone(), f)
            .start()
            .await?;
        anyhow::Ok((node, typ))
    };
    let (node, typ) = start().await?;
    let t0 = Instant::now();
    write_keys(&node, &typ, 0..keys, &value(value_bytes, 0)).await?;
    let populate_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full = node.checkpoints().last_full;
    node.shutdown().await;
    let mut out = json!({
        "bench": "recovery",
        "keys": keys,
        "value_bytes": value_bytes,
        "blob_storage": checkpoint.url.as_deref().unwrap_or("local files"),
        "populate_s": populate_s,
        "full_snapshot": full,
    });
    for (label, wipe) in [("from_sled", false), ("from_blob", true)] {
        if wipe {
            std::fs::remove_dir_all(dir.join("state"))?;
        }
        let t = Instant::now();
        let (node, typ) = start().await?;
        let a = Address {
            typ: typ.clone(),
            id: (keys / 2).to_string().into(),
        };
        let reply = node
            .router()
            .call(a, value(value_bytes, 1), Duration::from_secs(60))
            .await?;
        let first_call_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(
            reply.get::<i64>()? == value_bytes as i64,
            "unexpected reply"
        );
        let report = node.checkpoints().recovery;
        out[label] = json!({
            "first_call_ms": first_call_ms,
            "recovery": report,
        });
        node.shutdown().await;
    }
    out["peak_rss_mib"] =
        json!(statemesh_node::metrics::process_memory().map(|(_, p)| p as f64 / 1048576.0));
    let _ = std::fs::remove_dir_all(&dir);
    println!("{out}");
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
    /// Writes every request (call and send modes) to this CSV file: start (µs since the
    /// load began), latency (µs), key, key group, and 1 if it succeeded.
    #[arg(long)]
    timeline: Option<std::path::PathBuf>,
    /// Retries a request refused with UNAVAILABLE (HTTP 503) until it succeeds (up to 30 s),
    /// as a client with idempotency keys would; its latency covers the retries.
    #[arg(long)]
    retry_unavailable: bool,
    /// The nodes' key-group count (for the timeline's key group column).
    #[arg(long, default_value_t = 1024)]
    key_groups: u32,
    /// The CA (PEM file) of a node with `[tls]` (`https://` URLs).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The CA of `--ca` (this process's HTTPS clients trust it).
static CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// An HTTP client of `http://` and, trusting `--ca`, `https://` URLs.
fn http_client(pool: usize) -> HttpClient {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = CA.get() {
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem).flatten() {
            let _ = roots.add(c);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .build(connector)
}

/// A metric of the node, from its `/metrics`.
async fn node_metric(http: &str, name: &str) -> Option<f64> {
    let client = http_client(1);
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
    // What the first call retried was refused with (`--retry-unavailable`).
    let first_retry: Arc<Mutex<Option<String>>> = Arc::default();
    let retries = Arc::new(AtomicU64::new(0));
    if let Some(p) = &a.ca {
        let _ = CA.set(std::fs::read(p).with_context(|| format!("--ca {}", p.display()))?);
    }
    let options = statemesh_sdk::ConnectOptions {
        token: None,
        ca_pem: CA.get().cloned(),
    };
    let mut clients = Vec::new();
    if a.protocol == Protocol::Grpc {
        for _ in 0..a.connections.max(1) {
            clients.push(Client::connect_with(&a.grpc, &options).await?);
        }
    }
    let http_client = http_client(a.concurrency);
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
        let timeline = a.timeline.is_some();
        let (retry, retries, first_retry) =
            (a.retry_unavailable, retries.clone(), first_retry.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut rows: Vec<(u64, u64, u64, bool)> = Vec::new();
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
                return (h, rows);
            }
            while Instant::now() < deadline {
                let k = i % keys;
                let key = k.to_string();
                i = i.wrapping_add(7919);
                let t = Instant::now();
                let mut r: Result<(), String>;
                loop {
                    r = match protocol {
                        Protocol::Grpc => {
                            let c = grpc.as_ref().expect("grpc client");
                            let addr = Address {
                                typ: counter.clone(),
                                id: key.clone().into(),
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
                            let req = hyper::Request::post(format!(
                                "{http}/v1/{verb}/example/counter/{key}"
                            ))
                            .header("content-type", "application/vnd.io.statefun.types/long")
                            .body(Full::new(Bytes::from_static(b"1")))
                            .expect("valid request");
                            match http_client.request(req).await {
                                Ok(resp) if resp.status().is_success() => {
                                    let _ = resp.into_body().collect().await;
                                    Ok(())
                                }
                                Ok(resp) => {
                                    // The answer names the reason (the body of a refusal).
                                    let status = resp.status();
                                    let body = resp
                                        .into_body()
                                        .collect()
                                        .await
                                        .map(|b| b.to_bytes())
                                        .unwrap_or_default();
                                    let text: String =
                                        String::from_utf8_lossy(&body).chars().take(300).collect();
                                    Err(format!("HTTP {status}: {text}"))
                                }
                                Err(e) => Err(e.to_string()),
                            }
                        }
                    };
                    // A caller that retries what the cluster refused for now (a rollback, a
                    // key group moving): the latency is the whole wait.
                    match &r {
                        Err(e)
                            if retry
                                && (e.contains("503") || e.contains("navailable"))
                                && t.elapsed() < Duration::from_secs(30) =>
                        {
                            retries.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = &r {
                                first_retry.lock().get_or_insert_with(|| e.clone());
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        _ => break,
                    }
                }
                let took = t.elapsed().as_micros().max(1) as u64;
                if timeline {
                    rows.push((
                        t.duration_since(start).as_micros() as u64,
                        took,
                        k,
                        r.is_ok(),
                    ));
                }
                match r {
                    Ok(()) => {
                        h.saturating_record(took);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => note(e),
                }
            }
            (h, rows)
        }));
    }
    let mut all = hist();
    let mut rows = Vec::new();
    for t in tasks {
        let (h, r) = t.await?;
        all.add(h).ok();
        rows.extend(r);
    }
    if let Some(path) = &a.timeline {
        use std::io::Write;
        rows.sort_unstable();
        let (ns, typ) = (counter.namespace().to_string(), counter.name().to_string());
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        let began = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(start.elapsed());
        writeln!(f, "# start_unix_ms={}", began.as_millis())?;
        writeln!(f, "start_us,latency_us,key,key_group,ok")?;
        for (at, took, k, ok) in rows {
            let kg = statemesh_mesh::keygroup::key_group(&ns, &typ, &k.to_string(), a.key_groups);
            writeln!(f, "{at},{took},{k},{kg},{}", u8::from(ok))?;
        }
        f.flush()?;
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
            "retried_unavailable": retries.load(Ordering::Relaxed),
            "first_retried": *first_retry.lock(),
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
    let client = http_client(concurrency);
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

/// CPU time (user + system) of processes, in µs.
fn cpu_us(pids: &[u32]) -> u64 {
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| {
            // Fields after the parenthesised command name: utime and stime are the 12th and
            // 13th of them.
            let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            f.iter().sum::<u64>() * 1_000_000 / tck
        })
        .sum()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

async fn kafka(a: KafkaArgs) -> anyhow::Result<()> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Offset, TopicPartitionList};

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("group.id", "statemesh-bench-reader")
        .set("enable.auto.commit", "false")
        // A broker that holds fetches for the full wait (tansu) would add up to it.
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let md = consumer.fetch_metadata(Some("forwarded"), Duration::from_secs(10))?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    anyhow::ensure!(
        parts > 0,
        "topic \"forwarded\" has no partitions at {}",
        a.bootstrap
    );
    let mut l = TopicPartitionList::new();
    for p in 0..parts {
        l.add_partition_offset("forwarded", p as i32, Offset::Beginning)?;
    }
    consumer.assign(&l)?;
    let n = a.records;
    let quiet = Duration::from_secs_f64(a.quiet);
    // Reader: latency per record, duplicates by sequence number.
    let reader = tokio::spawn(async move {
        let mut seen = vec![false; n as usize];
        let (mut got, mut dups) = (0u64, 0u64);
        let mut lat = hist();
        let mut last = Instant::now();
        while got < n {
            match tokio::time::timeout(quiet, consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    eprintln!("read: {e}");
                    continue;
                }
                Ok(Ok(m)) => {
                    let v = m.payload().unwrap_or_default();
                    if v.len() < 16 {
                        continue;
                    }
                    let sent = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
                    let seq = u64::from_le_bytes(v[8..16].try_into().expect("8 bytes"));
                    if seq >= n {
                        continue;
                    }
                    if seen[seq as usize] {
                        dups += 1;
                        continue;
                    }
                    seen[seq as usize] = true;
                    got += 1;
                    last = Instant::now();
                    let _ = lat.record(now_ns().saturating_sub(sent) / 1000);
                }
            }
        }
        (got, dups, lat, last)
    });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let cpu0 = cpu_us(&a.pids);
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut produce_errors = 0u64;
    let pad = [0u8; 16];
    for i in 0..n {
        if a.rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / a.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&now_ns().to_le_bytes());
        v.extend_from_slice(&i.to_le_bytes());
        v.extend_from_slice(&pad);
        let key = format!("k{}", i % a.keys.max(1));
        let r = FutureRecord::to(&a.input).key(&key).payload(&v);
        match producer.send_result(r) {
            Ok(f) => inflight.push(f),
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
        while inflight.len() > 100_000 {
            if let Some(Ok(Err(_)) | Err(_)) = inflight.next().await {
                produce_errors += 1;
            }
        }
    }
    while let Some(r) = inflight.next().await {
        if !matches!(r, Ok(Ok(_))) {
            produce_errors += 1;
        }
    }
    let produced_s = start.elapsed().as_secs_f64();
    let (got, dups, lat, last) = reader.await?;
    let cpu = cpu_us(&a.pids).saturating_sub(cpu0);
    let span = last.duration_since(start).as_secs_f64().max(1e-9);
    println!(
        "{}",
        json!({
            "bench": "kafka",
            "records": n,
            "read_back": got,
            "missing": n - got,
            "duplicates": dups,
            "produce_errors": produce_errors,
            "produce_rate": (n as f64 / produced_s).round(),
            "records_per_s": (got as f64 / span).round(),
            "e2e_ms_p50": ms(&lat, 0.5),
            "e2e_ms_p99": ms(&lat, 0.99),
            "cpu_us_per_record": if a.pids.is_empty() { serde_json::Value::Null } else { json!(((cpu as f64) / got.max(1) as f64 * 10.0).round() / 10.0) },
            "cpu_cores_used": if a.pids.is_empty() { serde_json::Value::Null } else { json!(((cpu as f64) / 1e6 / span * 100.0).round() / 100.0) },
        })
    );
    Ok(())
}
