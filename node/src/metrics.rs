//! Prometheus metrics of a node (`GET /metrics`).
//!
//! Shards count locally and fold their counts in on each tick, so the hot path does no
//! shared atomic operation per message.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The metrics of a node. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Invocations completed (successfully or not).
    pub invocations: IntCounter,
    /// Failed invocation attempts.
    pub invocation_errors: IntCounter,
    /// Invocation latency.
    pub invocation_seconds: Histogram,
    /// Active (in-memory) instances.
    pub active_instances: IntGauge,
    /// Messages queued in inboxes.
    pub inbox_depth: IntGauge,
    /// Pending delayed messages.
    pub delayed_pending: IntGauge,
    /// Messages sent to `statemesh/dead-letters`.
    pub dead_letters: IntCounter,
    /// Requests refused, by reason.
    pub ingress_errors: IntCounterVec,
    /// Ingress messages accepted.
    pub ingress_messages: IntCounter,
    /// Egress records published.
    pub egress_records: IntCounter,
    /// Egress records dropped because their topic was full.
    pub egress_dropped: IntCounter,
    /// Egress records whose reader left while the read was committed.
    pub egress_unclaimed: IntCounter,
    /// Instances passivated.
    pub passivations: IntCounter,
    /// Instance actors started (an instance keeps its actor while its state is cached).
    pub actor_starts: IntCounter,
    /// Local state write failures.
    pub store_errors: IntCounter,
    /// Messages per remote batch.
    pub remote_batch_size: Histogram,
    /// Failed remote call attempts (each retried or ending in a dead letter).
    pub remote_failed_attempts: IntCounter,
    /// Retried requests answered from their idempotency record.
    pub idempotent_retries: IntCounter,
    /// Forwarded requests a node that does not own their key group refused, routed again.
    pub rerouted: IntCounter,
    /// Time from an epoch's barrier to its commit.
    pub checkpoint_seconds: Histogram,
    /// How long a shard paused processing to cut an epoch.
    pub checkpoint_cut_seconds: Histogram,
    /// The longest such pause so far, µs.
    pub checkpoint_cut_max_us: IntGauge,
    /// Bytes written to blob storage by epochs and full snapshots.
    pub checkpoint_bytes: IntCounter,
    /// Bytes of the last committed epoch's object.
    pub checkpoint_last_bytes: IntGauge,
    /// The last committed epoch.
    pub checkpoint_committed_epoch: IntGauge,
    /// Epochs cut but not yet committed.
    pub checkpoint_backlog: IntGauge,
    /// Milliseconds since the last commit (while an epoch is open).
    pub checkpoint_commit_lag_ms: IntGauge,
    /// Failed epoch writes and commits (each retried).
    pub checkpoint_failures: IntCounter,
    /// Rollbacks to the last committed epoch.
    pub checkpoint_rollbacks: IntCounter,
    /// Pending messages listed in full by cuts (a message's first cut).
    pub checkpoint_pending_listed: IntCounter,
    /// Pending message records written (a message still pending at its second cut).
    pub checkpoint_pending_recorded: IntCounter,
    /// TLS handshakes refused (a certificate that does not chain to the cluster's CA, not
    /// TLS at all, or no handshake within 10 s).
    pub tls_refused: IntCounter,
    /// Requests refused by access control, by surface (`grpc`, `http`) and reason
    /// (`unauthenticated`: no or an unknown token; `forbidden`: a token not allowed there).
    pub auth_refused: IntCounterVec,
    /// Kafka records handed to functions, by ingress.
    pub kafka_ingress_records: IntCounterVec,
    /// Records of a partition not yet handed to functions (its end offset minus the partition
    /// instance's `next`), by ingress, topic and partition; read every few seconds.
    pub kafka_ingress_lag: IntGaugeVec,
    /// Records produced to Kafka and acknowledged, by egress.
    pub kafka_egress_records: IntCounterVec,
    /// Records a broker did not take (each produced again), by egress.
    pub kafka_egress_errors: IntCounterVec,
    /// What keeps a Kafka ingress or egress from its broker now, by client (`/readyz` names
    /// them).
    pub kafka_problems: Arc<parking_lot::Mutex<std::collections::BTreeMap<String, String>>>,
    rss: IntGauge,
    peak_rss: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let invocation_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "statemesh_invocation_duration_seconds",
                "Duration of one invocation",
            )
            .buckets(vec![
                1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(invocation_seconds.clone()))
            .expect("metric registered once");
        let ingress_errors = IntCounterVec::new(
            Opts::new(
                "statemesh_ingress_errors_total",
                "Ingress requests refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        r.register(Box::new(ingress_errors.clone()))
            .expect("metric registered once");
        // Export every reason from the start, at 0, so rates work before the first error.
        for reason in [
            "unknown_function",
            "invalid_argument",
            "too_large",
            "overloaded",
            "timeout",
            "shutdown",
            "checkpoint_backlog",
        ] {
            ingress_errors.with_label_values(&[reason]);
        }
        let remote_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "statemesh_remote_batch_size",
                "Messages per remote function batch",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(remote_batch_size.clone()))
            .expect("metric registered once");
        let checkpoint_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "statemesh_checkpoint_duration_seconds",
                "Time from an epoch's barrier to its commit",
            )
            .buckets(vec![
                1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(checkpoint_seconds.clone()))
            .expect("metric registered once");
        let checkpoint_cut_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "statemesh_checkpoint_cut_duration_seconds",
                "How long a shard paused processing to cut an epoch",
            )
            .buckets(vec![
                1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(checkpoint_cut_seconds.clone()))
            .expect("metric registered once");
        let kafka_ingress_lag = IntGaugeVec::new(
            Opts::new(
                "statemesh_kafka_ingress_lag_records",
                "Records of a Kafka partition not yet handed to functions (end offset minus the partition instance's next offset)",
            ),
            &["ingress", "topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(kafka_ingress_lag.clone()))
            .expect("metric registered once");
        Metrics {
            tls_refused: counter(
                &r,
                "statemesh_tls_refused_total",
                "TLS handshakes refused (bad certificate, not TLS, or too slow)",
            ),
            auth_refused: counter_vec(
                &r,
                "statemesh_auth_refused_total",
                "Requests refused by access control (bad or missing credentials)",
                &["surface", "reason"],
            ),
            kafka_ingress_records: counter_vec(
                &r,
                "statemesh_kafka_ingress_records_total",
                "Kafka records handed to functions",
                &["ingress"],
            ),
            kafka_ingress_lag,
            kafka_egress_records: counter_vec(
                &r,
                "statemesh_kafka_egress_records_total",
                "Records produced to Kafka and acknowledged",
                &["egress"],
            ),
            kafka_egress_errors: counter_vec(
                &r,
                "statemesh_kafka_egress_produce_errors_total",
                "Records a Kafka broker did not take (each produced again)",
                &["egress"],
            ),
            kafka_problems: Arc::default(),
            checkpoint_cut_seconds,
            checkpoint_cut_max_us: gauge(
                &r,
                "statemesh_checkpoint_cut_max_microseconds",
                "The longest pause of a shard to cut an epoch",
            ),
            idempotent_retries: counter(
                &r,
                "statemesh_idempotent_retries_total",
                "Retried requests answered from their idempotency record",
            ),
            rerouted: counter(
                &r,
                "statemesh_forward_rerouted_total",
                "Forwarded requests refused by a node that does not own their key group (ownership was changing), routed again",
            ),
            checkpoint_seconds,
            checkpoint_bytes: counter(
                &r,
                "statemesh_checkpoint_bytes_total",
                "Bytes written to blob storage by epochs and full snapshots",
            ),
            checkpoint_last_bytes: gauge(
                &r,
                "statemesh_checkpoint_last_bytes",
                "Bytes of the last committed epoch's object",
            ),
            checkpoint_committed_epoch: gauge(
                &r,
                "statemesh_checkpoint_committed_epoch",
                "The last committed epoch",
            ),
            checkpoint_backlog: gauge(
                &r,
                "statemesh_checkpoint_uncommitted_epochs",
                "Epochs cut but not yet committed",
            ),
            checkpoint_commit_lag_ms: gauge(
                &r,
                "statemesh_checkpoint_commit_lag_milliseconds",
                "Milliseconds since the last commit",
            ),
            checkpoint_failures: counter(
                &r,
                "statemesh_checkpoint_failures_total",
                "Failed epoch writes and commits (each retried)",
            ),
            checkpoint_rollbacks: counter(
                &r,
                "statemesh_checkpoint_rollbacks_total",
                "Rollbacks to the last committed epoch (the epochs after it abandoned)",
            ),
            checkpoint_pending_listed: counter(
                &r,
                "statemesh_checkpoint_pending_listed_total",
                "Pending messages listed in full by epoch cuts (a message's first cut)",
            ),
            checkpoint_pending_recorded: counter(
                &r,
                "statemesh_checkpoint_pending_recorded_total",
                "Pending message records written (a message still pending at its second cut; deleted when processed)",
            ),
            remote_batch_size,
            remote_failed_attempts: counter(
                &r,
                "statemesh_remote_failed_attempts_total",
                "Failed remote function call attempts",
            ),
            invocations: counter(&r, "statemesh_invocations_total", "Invocations completed"),
            invocation_errors: counter(
                &r,
                "statemesh_invocation_errors_total",
                "Failed invocation attempts",
            ),
            invocation_seconds,
            active_instances: gauge(
                &r,
                "statemesh_active_instances",
                "Active (in-memory) instances",
            ),
            inbox_depth: gauge(&r, "statemesh_inbox_depth", "Messages queued in inboxes"),
            delayed_pending: gauge(&r, "statemesh_delayed_messages", "Pending delayed messages"),
            dead_letters: counter(
                &r,
                "statemesh_dead_letters_total",
                "Messages sent to statemesh/dead-letters",
            ),
            ingress_errors,
            ingress_messages: counter(
                &r,
                "statemesh_ingress_messages_total",
                "Ingress messages accepted",
            ),
            egress_records: counter(
                &r,
                "statemesh_egress_records_total",
                "Egress records published",
            ),
            egress_dropped: counter(
                &r,
                "statemesh_egress_dropped_total",
                "Egress records dropped from full topics",
            ),
            egress_unclaimed: counter(
                &r,
                "statemesh_egress_unclaimed_total",
                "Egress records consumed unanswered: their reader left while the read was committed",
            ),
            passivations: counter(&r, "statemesh_passivations_total", "Instances passivated"),
            actor_starts: counter(
                &r,
                "statemesh_instance_actor_starts_total",
                "Instance actors started",
            ),
            store_errors: counter(
                &r,
                "statemesh_store_errors_total",
                "Local state write failures",
            ),
            rss: gauge(
                &r,
                "statemesh_process_resident_memory_bytes",
                "Resident memory of the node process",
            ),
            peak_rss: gauge(
                &r,
                "statemesh_process_peak_resident_memory_bytes",
                "Peak resident memory of the node process",
            ),
            registry: Arc::new(r),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Some((rss, peak)) = process_memory() {
            self.rss.set(rss as i64);
            self.peak_rss.set(peak as i64);
        }
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec does not fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// (current RSS, peak RSS) in bytes of this process, from /proc on Linux.
pub fn process_memory() -> Option<(u64, u64)> {
    proc_memory("self")
}

/// (current RSS, peak RSS) in bytes of process `pid` (`self` for this one).
pub fn proc_memory(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

impl Metrics {
    /// Records what keeps a Kafka client from its broker (`None`: nothing now).
    pub(crate) fn kafka_problem(&self, client: &str, problem: Option<String>) {
        let mut p = self.kafka_problems.lock();
        match problem {
            Some(text) => {
                p.insert(client.to_string(), text);
            }
            None => {
                p.remove(client);
            }
        }
    }
}
