//! Node configuration (the TOML node file), with defaults for the embedded single node.
//!
//! Every option is documented here and in `docs/configuration.md`. Unknown keys are an
//! error naming the file, line and key: a typo must not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has wrong keys or values.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was expected and found.
        message: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// TLS (`[tls]`): off unless `cert` is set.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// This node's certificate chain (PEM): the gRPC and HTTP listeners present it, and the
    /// node presents it to the other members (mutual TLS).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The cluster's CA (PEM): a member's certificate must chain to it, both ways. Clients of
    /// the ingress and admin API need no certificate.
    pub ca: Option<PathBuf>,
    /// More roots (PEM) to trust for `https://` remote function endpoints, besides the
    /// system's.
    pub remote_ca: Option<PathBuf>,
}

/// An ingress token and what it may address (`[[auth.tokens]]`, or a tokens file).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The bearer token (at least 16 characters).
    pub token: String,
    /// What it may address: `ns/*` (every function type and egress topic of namespace `ns`),
    /// `ns/type` (one function type), or `*` (everything).
    pub namespaces: Vec<String>,
}

/// Access control (`[auth]`). Off (everything open, as without it) unless tokens are set.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Ingress tokens (gRPC `Ingress`, `/v1/send`, `/v1/call`, `/v1/egress`, the playground).
    pub tokens: Vec<TokenConfig>,
    /// A TOML file of more `[[tokens]]`, read at start and again whenever it changes (checked
    /// every second; a file that does not parse keeps the tokens read before, and says why).
    pub tokens_file: Option<PathBuf>,
    /// The token of the admin API (gRPC `Admin`, the other HTTP endpoints but `/healthz` and
    /// `/readyz`, and the console at `/ui`). Unset while ingress tokens are set: the admin API
    /// is refused.
    pub admin_token: Option<String>,
    /// Sign every request to a remote function with this key (at least 32 characters): an
    /// HMAC-SHA256 header the function server verifies (`statemesh_sdk::signing`).
    pub function_signing_key: Option<String>,
}

impl AuthConfig {
    /// Whether any access control is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some() || self.admin_token.is_some()
    }
}

/// OpenTelemetry traces (`[telemetry]`), off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector to export spans to, e.g. `http://127.0.0.1:4317`. Unset (the
    /// default): no traces, and no cost on the message path.
    pub otlp_endpoint: Option<String>,
    /// Share of requests entering the node without a `traceparent` that are traced (0..=1).
    /// A request with one follows its sampled flag. Default 1.0.
    pub sampling_ratio: f64,
    /// `service.name` of the spans. Default `statemesh`.
    pub service_name: String,
    /// Finished spans are sent this often (and at shutdown). Default 1,000 ms.
    pub export_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "statemesh".into(),
            export_interval_ms: 1_000,
        }
    }
}

/// Failure detection and ownership leases in a cluster (`[mesh]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// The leader suspects a member it has not heard from for this long (the control group's
    /// heartbeats go every 150 ms). Default 1,500 ms.
    pub failure_timeout_ms: u64,
    /// A suspicion must hold this long more before the member is declared dead (a Raft
    /// entry) and its key groups move to the others. Default 300 ms: detection within
    /// 1.8 s of the last heartbeat.
    pub stability_window_ms: u64,
    /// A member serves its key groups only within this long of its last confirmation by a
    /// majority; must be below `failure_timeout_ms`, so that a member cut off from the
    /// majority stops serving before it is declared dead. Default 1,000 ms.
    pub lease_ms: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        let d = statemesh_mesh::failure::FailureConfig::default();
        MeshConfig {
            failure_timeout_ms: d.timeout_ms,
            stability_window_ms: d.stability_ms,
            lease_ms: d.lease_ms,
        }
    }
}

impl MeshConfig {
    /// The detector's and the lease's timing.
    pub fn failure(&self) -> statemesh_mesh::failure::FailureConfig {
        statemesh_mesh::failure::FailureConfig {
            timeout_ms: self.failure_timeout_ms,
            stability_ms: self.stability_window_ms,
            lease_ms: self.lease_ms,
        }
    }
}

/// Retry policy of failing embedded invocations.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per message before it goes to `statemesh/dead-letters` (≥ 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt.
    pub initial_backoff_ms: u64,
    /// Upper bound of the backoff.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            initial_backoff_ms: 10,
            max_backoff_ms: 2_000,
        }
    }
}

impl RetryConfig {
    /// The backoff after `attempt` failed attempts (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        Duration::from_millis(exp.min(self.max_backoff_ms))
    }
}

/// When a read of a durable egress record (`GET /v1/egress/{topic}`, the playground egress,
/// `Subscribe`) is answered.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EgressReads {
    /// Once the epoch deleting the record has committed: a record a reader got is never read
    /// again, not after a crash either (a read costs an epoch's commit).
    #[default]
    ExactlyOnce,
    /// At once; the record is deleted by the next epoch. A crash (or an abandoned epoch)
    /// before that epoch commits makes it readable again, with the same id, so a reader drops
    /// what it has seen by id. Nothing is lost either way.
    AtLeastOnce,
}

/// When a `Send` is acknowledged.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once the epoch holding the message has committed to blob storage (durable).
    #[default]
    Committed,
    /// As soon as the owning shard has queued it (faster; lost if the node dies first).
    Accepted,
}

/// Checkpoints: epochs of state and pending messages in blob storage (exactly-once).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint to blob storage. When off, state is still written to sled every
    /// `flush_interval_ms`, but nothing survives the loss of the data directory, pending
    /// messages are lost in a crash, and `Send`s are acknowledged on acceptance. Default on.
    pub enabled: bool,
    /// Blob storage URL: `file:///path` (or a plain path), `memory://`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`. Default `<data_dir>/checkpoints`.
    pub url: Option<String>,
    /// How often an epoch starts (earlier when callers wait for a commit). Default 100 ms.
    pub interval_ms: u64,
    /// Committed epochs to keep. Default 10.
    pub retain: usize,
    /// Epochs cut but not yet committed before ingress gets back-pressure (429 /
    /// RESOURCE_EXHAUSTED). Default 100.
    pub max_uncommitted: u64,
    /// When a `Send` is acknowledged (`committed` or `accepted`). Default `committed`.
    pub ack: AckMode,
    /// How long idempotency keys are remembered. Default 3,600,000 ms (1 hour).
    pub idempotency_window_ms: u64,
    /// This node's name in epoch objects. Default (empty): `node-<its cluster node id>`, so
    /// that the members of a cluster have distinct names.
    pub node_id: String,
    /// A full snapshot is written once the deltas written since the last one exceed twice its
    /// size and at least this many bytes. Default 8 MiB.
    pub full_snapshot_min_bytes: u64,
    /// A full snapshot is also written once this many epochs have committed since the last
    /// one (bounds how many manifests recovery reads under high epoch rates). Default 5,000.
    pub full_snapshot_max_epochs: u64,
    /// Garbage collection of old epochs runs every this many commits, but at most once per
    /// `gc_min_interval_ms`. Default 20.
    pub gc_every: u64,
    /// Least time between two garbage collections (each lists the manifests). Default 5,000 ms.
    pub gc_min_interval_ms: u64,
    /// Committed epochs are applied to sled at most this often, merged (a key changed in
    /// several epochs is written once); recovery replays the epochs sled lacks from blob
    /// storage. Default 1,000 ms.
    pub apply_interval_ms: u64,
    /// Local files (`file://` or a plain path): every object an epoch writes, and the
    /// directory entries that name it, are on stable storage (fsync) before the epoch commits,
    /// so an acknowledged message survives a power loss. Group commit amortises it: one epoch
    /// carries every message acknowledged in it. Off: a process crash still loses nothing, a
    /// power loss may lose the last acknowledged epochs. No effect on S3, GCS and Azure, whose
    /// writes are durable when they return. Default on.
    pub fsync: bool,
    /// A node alone commits its epochs to its epoch log (`<data_dir>/epochlog`, raft-engine,
    /// fsynced) rather than to blob storage, and uploads the log to blob storage every
    /// `upload_interval_ms` or `upload_bytes`, merged: acknowledgements do not wait for blob
    /// storage, and blob storage sees a few requests a second at most. The log survives a
    /// process crash and a power loss, not the loss of the disk. In a cluster of several, epochs
    /// commit to blob storage (the log is uploaded before a second member joins). Default on.
    pub log: bool,
    /// In a cluster of several, epochs commit through the control group (Raft, fsynced on a
    /// majority of voters) instead of a manifest in blob storage: the leader logs each epoch's
    /// manifest (the participants' parts ride in it when small, up to 64 KiB each) and uploads
    /// the log's tail every `upload_interval_ms` or `upload_bytes`, merged, and before every
    /// synchronisation of the participants; the tail survives the loss of any one member's
    /// disk (in a cluster of three or more: a majority of voters is two disks or more; a
    /// cluster of two has one voter, and the log is then on the leader's disk only, as a node
    /// alone's). While the tail holds `log_max_bytes` (at most 128 MiB here: the tail rides in
    /// the control group's snapshots), epochs wait (ingress is refused once `max_uncommitted`
    /// are open). Off: every epoch's manifest is a put to blob storage.
    /// Default on.
    pub cluster_log: bool,
    /// How often the epoch log is uploaded to blob storage while it holds epochs. Default
    /// 2,000 ms.
    pub upload_interval_ms: u64,
    /// The log is uploaded sooner once it holds this many bytes. Default 16 MiB.
    pub upload_bytes: u64,
    /// Ingress is refused (429 / RESOURCE_EXHAUSTED, named by `/readyz`) while the log holds
    /// more than this many bytes blob storage lacks (blob storage is down or slow).
    /// Default 1 GiB.
    pub log_max_bytes: u64,
    /// The cluster's lease on the blob location is rewritten every 2 s while the node writes
    /// checkpoints, and this often while it writes none (an idle node then costs blob storage
    /// a put and a listing per period). A new cluster on a location holding another cluster's
    /// lease watches it this long plus 3.5 s before taking the location over. Default
    /// 30,000 ms (at least 2,000).
    pub lease_idle_renew_ms: u64,
    /// S3 settings (override `AWS_*` environment variables).
    pub s3: crate::checkpoint::blob::S3Options,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            enabled: true,
            url: None,
            interval_ms: 100,
            retain: 10,
            max_uncommitted: 100,
            ack: AckMode::Committed,
            idempotency_window_ms: 3_600_000,
            node_id: String::new(),
            full_snapshot_min_bytes: 8 << 20,
            full_snapshot_max_epochs: 5_000,
            gc_every: 20,
            gc_min_interval_ms: 5_000,
            apply_interval_ms: 1_000,
            fsync: true,
            log: true,
            cluster_log: true,
            upload_interval_ms: 2_000,
            upload_bytes: 16 << 20,
            log_max_bytes: 1 << 30,
            lease_idle_renew_ms: 30_000,
            s3: Default::default(),
        }
    }
}

/// The node configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Directory of local state (sled under `<data_dir>/state`). Default `./data`.
    pub data_dir: PathBuf,
    /// This node's id in the cluster (a positive integer), kept in `<data_dir>/node-id`;
    /// generated on the first start if not given. Default: none.
    pub node_id: Option<u64>,
    /// gRPC addresses (`HOST:PORT`) of members of a cluster to join. Empty (the default): a
    /// new data directory starts a new cluster of one.
    pub join: Vec<String>,
    /// The gRPC address (`HOST:PORT`) other nodes reach this one at. Default: `grpc_addr`
    /// (as bound); required when that is a wildcard address such as 0.0.0.0.
    pub advertise_addr: Option<String>,
    /// gRPC ingress/admin address. Default `127.0.0.1:5090`; port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// HTTP ingress/admin address. Default `127.0.0.1:8090`; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Shards (actix arbiter threads). 0 = one per core.
    pub shards: usize,
    /// Key groups of the cluster (fixed for the life of the data directory). Default 1024.
    pub key_groups: u32,
    /// Maximum active (in-memory) instances per node; beyond it the least recently used
    /// idle instances are passivated. Default 1,000,000.
    pub max_active_instances: usize,
    /// An instance idle this long is passivated. Default 300,000 ms (5 minutes).
    pub idle_timeout_ms: u64,
    /// If set, an active instance's actor is stopped after it has had no work this long (its
    /// state stays cached until `idle_timeout_ms`, and its next message starts it again). By
    /// default an instance keeps its actor for as long as its state is cached.
    pub instance_linger_ms: Option<u64>,
    /// Largest accepted message value in bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// Default reply timeout of `Call`. Default 30,000 ms.
    pub call_timeout_ms: u64,
    /// How often state and timers are written to sled when checkpoints are off (with
    /// checkpoints on, sled is written when an epoch commits). Default 200 ms.
    pub flush_interval_ms: u64,
    /// Ingress messages queued per shard before ingress answers 429/RESOURCE_EXHAUSTED.
    /// Default 200,000.
    pub max_queued_per_shard: usize,
    /// Records kept per egress topic until read; beyond it the oldest are dropped and
    /// counted in `statemesh_egress_dropped_total`. Default 100,000.
    pub egress_topic_capacity: usize,
    /// When a read of a durable egress record is answered: `exactly-once` (default: once the
    /// epoch deleting it committed) or `at-least-once` (at once; read again, with the same
    /// id, if the node crashes before the next epoch commits).
    pub egress_reads: EgressReads,
    /// Most messages given to one embedded instance in one batch. Default 256.
    pub max_batch: usize,
    /// Grace period to drain inboxes on shutdown. Default 5,000 ms.
    pub shutdown_grace_ms: u64,
    /// Retry policy of failing invocations.
    pub retry: RetryConfig,
    /// Checkpoints to blob storage.
    pub checkpoint: CheckpointConfig,
    /// Failure detection and leases in a cluster.
    pub mesh: MeshConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
    /// Access control.
    pub auth: AuthConfig,
    /// TLS.
    pub tls: TlsConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./data"),
            node_id: None,
            join: Vec::new(),
            advertise_addr: None,
            grpc_addr: "127.0.0.1:5090".parse().expect("literal address"),
            http_addr: "127.0.0.1:8090".parse().expect("literal address"),
            shards: 0,
            key_groups: statemesh_mesh::keygroup::DEFAULT_KEY_GROUPS,
            max_active_instances: 1_000_000,
            idle_timeout_ms: 300_000,
            instance_linger_ms: None,
            max_message_bytes: 4 << 20,
            call_timeout_ms: 30_000,
            flush_interval_ms: 200,
            max_queued_per_shard: 200_000,
            egress_topic_capacity: 100_000,
            egress_reads: EgressReads::ExactlyOnce,
            max_batch: 256,
            shutdown_grace_ms: 5_000,
            retry: RetryConfig::default(),
            checkpoint: CheckpointConfig::default(),
            mesh: MeshConfig::default(),
            telemetry: TelemetryConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

impl NodeConfig {
    /// Parses TOML text and checks it; `path` names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::parse_toml(text, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text without [`NodeConfig::validate`] (the command line overrides some
    /// options first, then checks the whole); `path` names the source in errors.
    pub fn parse_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        Ok(cfg)
    }

    /// Loads a TOML file and checks it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::load_unchecked(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads a TOML file without [`NodeConfig::validate`].
    pub fn load_unchecked(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_toml(&text, path)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.key_groups == 0 || self.key_groups > 65_536 {
            return bad("key_groups: expected 1..=65536");
        }
        if self.max_active_instances == 0 {
            return bad("max_active_instances: expected at least 1");
        }
        if self.max_batch == 0 {
            return bad("max_batch: expected at least 1");
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts: expected at least 1");
        }
        if self.flush_interval_ms == 0 {
            return bad("flush_interval_ms: expected at least 1");
        }
        if self.checkpoint.interval_ms == 0 {
            return bad("checkpoint.interval_ms: expected at least 1");
        }
        if self.checkpoint.max_uncommitted == 0 {
            return bad("checkpoint.max_uncommitted: expected at least 1");
        }
        if !self
            .checkpoint
            .node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("checkpoint.node_id: expected letters, digits, '-' or '_'");
        }
        if let Err(e) = self.mesh.failure().check() {
            return Err(ConfigError::Invalid(format!("mesh.{e}")));
        }
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sampling_ratio) {
            return bad("telemetry.sampling_ratio: expected 0.0..=1.0");
        }
        if let Some(e) = &t.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return bad(
                    "telemetry.otlp_endpoint: expected http://HOST:PORT or https://HOST:PORT",
                );
            }
        }
        if t.export_interval_ms == 0 {
            return bad("telemetry.export_interval_ms: expected at least 1");
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            crate::auth::check_token(t)
                .map_err(|e| ConfigError::Invalid(format!("auth.tokens[{i}]: {e}")))?;
        }
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() || (tls.cert.is_some() && tls.ca.is_none()) {
            return bad("tls: cert, key and ca go together (ca: the cluster's CA, which every member's certificate chains to)");
        }
        if tls.ca.is_some() && tls.cert.is_none() {
            return bad("tls.ca: needs tls.cert and tls.key");
        }
        if self.auth.enabled() && tls.cert.is_none() && !self.join.is_empty() {
            return bad("auth: a node with [auth] joins a cluster only with [tls] (without it the node-to-node service would let anyone past the tokens)");
        }
        if self
            .auth
            .function_signing_key
            .as_ref()
            .is_some_and(|k| k.len() < 32)
        {
            return bad("auth.function_signing_key: expected at least 32 characters");
        }
        if let Some(a) = &self.auth.admin_token {
            crate::auth::check_token(&TokenConfig {
                token: a.clone(),
                namespaces: vec!["*".into()],
            })
            .map_err(|e| ConfigError::Invalid(format!("auth.admin_{e}")))?;
        }
        for a in self.join.iter().chain(self.advertise_addr.iter()) {
            if !is_host_port(a) {
                return Err(ConfigError::Invalid(format!(
                    "join/advertise_addr: expected HOST:PORT, found {a:?}"
                )));
            }
        }
        if self.advertise_addr.is_none() && self.grpc_addr.ip().is_unspecified() {
            return bad("advertise_addr: required when grpc_addr is a wildcard address (other nodes must know where to reach this one)");
        }
        Ok(())
    }

    /// The gRPC address other nodes reach this one at, given the bound one.
    pub fn advertised_grpc(&self, bound: SocketAddr) -> String {
        self.advertise_addr
            .clone()
            .unwrap_or_else(|| bound.to_string())
    }

    /// The blob storage URL of checkpoints.
    pub fn checkpoint_url(&self) -> String {
        self.checkpoint.url.clone().unwrap_or_else(|| {
            let p = self.data_dir.join("checkpoints");
            let abs = std::path::absolute(&p).unwrap_or(p);
            abs.display().to_string()
        })
    }

    /// The number of shards to run (resolving 0 to the core count).
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

/// `HOST:PORT` with a non-empty host and a port number.
fn is_host_port(a: &str) -> bool {
    match a.rsplit_once(':') {
        Some((h, p)) => !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = NodeConfig::from_toml(
            "shards = 3\n[retry]\nmax_attempts = 2\n",
            Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.retry.max_attempts, 2);
        assert_eq!(c.grpc_addr.port(), 5090);
        assert_eq!(c.mesh, MeshConfig::default());
        let c = NodeConfig::from_toml(
            "[mesh]\nfailure_timeout_ms = 3000\nlease_ms = 2000\n",
            Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(c.mesh.failure().timeout_ms, 3_000);
        assert_eq!(c.mesh.failure().stability_ms, 300);
        // A lease as long as the detection would let a cut-off node serve after its death.
        let e = NodeConfig::from_toml("[mesh]\nlease_ms = 1500\n", Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mesh.lease_ms") && e.contains("below failure_timeout_ms"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = NodeConfig::from_toml("shards = 1\nsharts = 2\n", Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("n.toml:2:1:"), "{e}");
        assert!(e.contains("sharts"), "{e}");
        let e = NodeConfig::from_toml("grpc_addr = \"nope\"\n", Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("n.toml:1:"), "{e}");
        let e = NodeConfig::from_toml("key_groups = 0\n", Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_groups"), "{e}");
    }

    #[test]
    fn auth_and_tls_settings_are_checked() {
        let e = |t: &str| {
            NodeConfig::from_toml(t, Path::new("t.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(
            e("join = [\"a:1\"]\n[auth]\nadmin_token = \"0123456789abcdef0\"\n")
                .contains("joins a cluster only with [tls]")
        );
        assert!(e("[tls]\ncert = \"c\"\n").contains("go together"));
        assert!(e("[tls]\nca = \"c\"\n").contains("needs tls.cert"));
        assert!(e("[auth]\nadmin_token = \"short\"\n")
            .contains("auth.admin_token: expected at least 16"));
        assert!(e("[auth]\nfunction_signing_key = \"short\"\n").contains("at least 32"));
        assert!(
            e("[auth]\ntokens = [{ token = \"0123456789abcdef0\", namespaces = [\"x\"] }]\n")
                .contains("auth.tokens[0]: namespaces")
        );
        assert!(e("[telemetry]\nsampling_ratio = 2.0\n").contains("sampling_ratio"));
        assert!(e("[telemetry]\notlp_endpoint = \"localhost:4317\"\n").contains("otlp_endpoint"));
    }

    #[test]
    fn ops_sample_is_the_default() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/node.toml"));
        assert_eq!(NodeConfig::load(path).unwrap(), NodeConfig::default());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let r = RetryConfig {
            max_attempts: 5,
            initial_backoff_ms: 10,
            max_backoff_ms: 50,
        };
        assert_eq!(r.backoff(1).as_millis(), 10);
        assert_eq!(r.backoff(2).as_millis(), 20);
        assert_eq!(r.backoff(4).as_millis(), 50);
    }
}
