//! Assembling and running a node: the builder users embed, and the handle to stop it.
//!
//! Threads: the shards run on actix arbiters (one thread each) inside an actix System on a
//! dedicated thread, which also runs the actix-web HTTP server; gRPC (tonic) runs on the
//! caller's tokio runtime. They meet only through the [`Router`] (cheap `Addr::do_send`s
//! and oneshot replies), so no lock is held across threads on the message path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use statemesh_sdk::{StatefulFunction, TypeName};
use tokio::sync::oneshot;

use crate::checkpoint::driver::{self, DriverEvent, StatusHandle};
use crate::checkpoint::store::CheckpointStore;
use crate::config::NodeConfig;
use crate::egress::Egress;
use crate::ingress::http::Routes;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::router::Envelope;
use crate::router::Router;
use crate::shard::{Gauges, Outstanding, Shard, ShardOptions};
use crate::store::Store;

/// A node that failed to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Local state could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Builds a node: configure, register functions, start.
pub struct NodeBuilder {
    config: NodeConfig,
    registry: Registry,
}

impl NodeBuilder {
    /// A builder with the given configuration and no functions.
    pub fn new(config: NodeConfig) -> Self {
        NodeBuilder {
            config,
            registry: Registry::default(),
        }
    }

    /// Registers an embedded function type.
    pub fn function(mut self, typ: TypeName, f: impl StatefulFunction) -> Self {
        self.registry.register(typ, Arc::new(f));
        self
    }

    /// Registers an embedded function type (shared).
    pub fn function_arc(mut self, typ: TypeName, f: Arc<dyn StatefulFunction>) -> Self {
        self.registry.register(typ, f);
        self
    }

    /// Serves the remote functions (and playground I/O) of a loaded `module.yaml`.
    pub fn module(mut self, module: crate::module::Module) -> Self {
        self.registry.set_module(module);
        self
    }

    /// Registers the bundled example functions (greeter, counter, shopping cart, memo,
    /// sequence); a module endpoint serving one of their types takes precedence.
    pub fn with_examples(mut self) -> Self {
        for (t, f) in statemesh_examples::all() {
            self.registry.register_bundled(t, f);
        }
        self
    }

    /// Starts the node. Must be called inside a tokio runtime (gRPC runs on it).
    pub async fn start(mut self) -> Result<NodeHandle, StartError> {
        // Kafka clients are checked before anything starts (a refusal later would leave a
        // node half started, possibly a cluster member already).
        crate::kafka::check(self.registry.module(), self.config.checkpoint.enabled)
            .map_err(StartError::Other)?;
        let ingresses = self.registry.module().kafka_ingresses.clone();
        if !ingresses.is_empty() {
            let f = crate::kafka::PartitionFn::new(&ingresses, |t| self.registry.get(t).is_some());
            self.registry.register(
                statemesh_sdk::TypeName::parse(crate::kafka::PARTITION_TYPE).expect("valid"),
                Arc::new(f),
            );
        }
        start(self.config, self.registry).await
    }
}

/// Shared by the ingress services.
#[derive(Clone)]
pub(crate) struct Shared {
    pub router: Router,
    pub config: Arc<NodeConfig>,
    pub shards: Vec<Addr<Shard>>,
    pub ready: Arc<AtomicBool>,
    pub checkpoints: StatusHandle,
    pub cluster: crate::cluster::ClusterHandle,
    pub mesh: Arc<crate::mesh::MeshService>,
    /// Access control (`[auth]`).
    pub auth: Arc<crate::auth::Auth>,
    /// TLS (`[tls]`), if on.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Shared {
    /// Folds the shards' gauges into the metrics.
    pub async fn update_gauges(&self) {
        let (mut active, mut queued, mut timers) = (0, 0, 0);
        for s in &self.shards {
            if let Ok((a, q, t)) = s.send(Gauges).await {
                active += a;
                queued += q;
                timers += t;
            }
        }
        let m = self.router.metrics();
        m.active_instances.set(active as i64);
        m.inbox_depth.set(queued as i64);
        m.delayed_pending.set(timers as i64);
    }
}

/// A running node.
pub struct NodeHandle {
    shared: Shared,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    grpc_shutdown: Option<oneshot::Sender<()>>,
    grpc_task: Option<tokio::task::JoinHandle<()>>,
    /// Ends the streams peers opened to this node (see `MeshService::closing`).
    mesh_closing: tokio::sync::watch::Sender<bool>,
    http_server: actix_web::dev::ServerHandle,
    playground: Vec<actix_web::dev::ServerHandle>,
    system: actix_rt::System,
    actix_thread: Option<std::thread::JoinHandle<()>>,
    /// The epoch driver's thread (it ends after `Stop`, or with the runtime it started on).
    driver_thread: Option<std::thread::JoinHandle<()>>,
    driver_events: tokio::sync::mpsc::UnboundedSender<DriverEvent>,
    store: Store,
    control: crate::cluster::Control,
    kafka: Option<crate::kafka::ingress::KafkaIngresses>,
    kafka_out: Option<crate::kafka::egress::KafkaEgresses>,
}

impl NodeHandle {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The in-process router (send and call without a network hop).
    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    /// The checkpoint status (`GET /v1/checkpoints`).
    pub fn checkpoints(&self) -> driver::CheckpointStatus {
        self.shared.checkpoints.lock().clone()
    }

    /// Resolves once this node has left its cluster (`statemesh cluster leave`: it owns
    /// nothing and is out of the Raft group); the caller then shuts it down.
    pub async fn left(&self) {
        self.control.left(&self.shared.cluster).await
    }

    /// Stops ingress, drains inboxes for up to `shutdown_grace_ms`, commits a last epoch
    /// (written to blob storage and sled) and stops the shards.
    pub async fn shutdown(mut self) {
        self.shared.ready.store(false, Ordering::SeqCst);
        // In a cluster: its key groups go to the others live first, while it still serves
        // (requests for them are forwarded to their new owners), so that its stop rolls
        // nobody back.
        self.control.drain().await;
        if let Some(k) = self.kafka.take() {
            k.stop().await;
        }
        if let Some(k) = self.kafka_out.take() {
            k.stop().await;
        }
        self.shared.router.close();
        self.http_server.stop(true).await;
        for p in &self.playground {
            p.stop(true).await;
        }
        if let Some(tx) = self.grpc_shutdown.take() {
            let _ = tx.send(());
        }
        // The gRPC server stops taking requests; those under way are answered once their
        // epochs commit (waited for after the last one below).
        let deadline = Instant::now() + Duration::from_millis(self.shared.config.shutdown_grace_ms);
        loop {
            let mut left = 0;
            for s in &self.shared.shards {
                left += s.send(Outstanding).await.unwrap_or(0);
            }
            if left == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    messages = left,
                    "shutdown grace period over with messages still queued"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (tx, rx) = oneshot::channel();
        let mut committed = false;
        if self.driver_events.send(DriverEvent::Finish(tx)).is_ok() {
            match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(Ok(Some(epoch))) => {
                    committed = true;
                    tracing::info!(epoch, "last epoch committed")
                }
                // (Said by the driver.)
                Ok(Ok(None)) => {}
                _ => tracing::error!(
                    "the last epoch did not commit within 30 s; what it holds is recovered from the previous commit and replayed"
                ),
            }
        }
        // A node alone leaves blob storage complete (its epoch log is uploaded now rather
        // than at its next start).
        let (tx, rx) = oneshot::channel();
        if self.driver_events.send(DriverEvent::UploadLog(tx)).is_ok() {
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(
                    error = %e,
                    "the epoch log was not uploaded; the next start uploads it"
                ),
                _ => tracing::warn!(
                    "the epoch log was not uploaded within 10 s; the next start uploads it"
                ),
            }
        }
        // In a cluster: the others are told (a leader hands its leadership over first), so
        // that its key groups move now, not once it has been silent for the failure timeout
        // (the cluster's epochs, and every acknowledgement, would wait for it meanwhile). Not
        // when its last epoch could not commit: no leader has taken the epochs for seconds,
        // and none would take its stop either.
        if committed {
            self.control.stopping().await;
        }
        // Nothing more is needed from the peers: the streams they opened end, and the gRPC
        // server stops once the replies under way are sent (a cluster's peer streams kept it
        // waiting 5 s).
        let _ = self.mesh_closing.send(true);
        if let Some(t) = self.grpc_task.take() {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("the gRPC server did not stop within 5 s");
            }
        }
        let (tx, rx) = oneshot::channel();
        if self.driver_events.send(DriverEvent::Stop(tx)).is_ok() {
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(30), rx).await {
                // Its thread ends right after answering; the epoch log closes with it.
                if let Some(t) = self.driver_thread.take() {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
            }
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final sled flush failed");
        }
        self.control.stop().await;
        self.system.stop();
        if let Some(t) = self.actix_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // The shards' arbiter threads drop their actors (and their store handles) after the
        // system stopped, the applier after the driver: the data directory is given back
        // (sled's lock released) only once every handle but this one is gone, so that a node
        // started in this process right after opens it (1e6 cached instances took longer than
        // the next start).
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.store.handles() > 1 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    handles = self.store.handles() - 1,
                    "the local store is still in use 30 s after the node stopped"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!("node stopped");
    }
}

/// A node dropped without [`NodeHandle::shutdown`] (or with its shutdown cut short) stops at
/// once, the way a killed process does: ingress closes, no last epoch is committed (what was
/// not committed is recovered and replayed at its next start), and its servers, shards, epoch
/// driver and control group end on their own threads, releasing its ports and its data
/// directory. Nothing here blocks the dropping thread.
impl Drop for NodeHandle {
    fn drop(&mut self) {
        if self.actix_thread.take().is_none() {
            // Shut down already.
            return;
        }
        tracing::warn!(
            "node dropped before its shutdown was done: stopping it at once (what its last epoch did not commit is recovered at its next start)"
        );
        self.shared.ready.store(false, Ordering::SeqCst);
        self.shared.router.close();
        // Both send their command when called; the futures only wait for it to be done.
        drop(self.http_server.stop(false));
        for p in &self.playground {
            drop(p.stop(false));
        }
        if let Some(tx) = self.grpc_shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.mesh_closing.send(true);
        let (tx, _) = oneshot::channel();
        let _ = self.driver_events.send(DriverEvent::Stop(tx));
        // The control group's thread ends when its stop sender (in `control`) is dropped.
        self.system.stop();
    }
}

struct ActixStarted {
    shards: Vec<Addr<Shard>>,
    playground: Vec<actix_web::dev::ServerHandle>,
    http_addr: SocketAddr,
    http_server: actix_web::dev::ServerHandle,
    system: actix_rt::System,
}

async fn start(config: NodeConfig, mut registry: Registry) -> Result<NodeHandle, StartError> {
    config.validate()?;
    registry.set_signing_key(config.auth.function_signing_key.as_deref());
    let tls = crate::tls::load(&config.tls).map_err(StartError::Other)?;
    crate::tls::set_mesh_policy(tls.is_some(), config.auth.enabled());
    for w in &registry.module().warnings {
        tracing::warn!("{w}");
    }
    let mut config = config;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        StartError::Other(format!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let node_id_was_new = !config.data_dir.join("node-id").exists();
    let node_id =
        crate::cluster::node_id(&config.data_dir, config.node_id).map_err(StartError::Other)?;
    if config.checkpoint.node_id.is_empty() {
        // The members of a cluster name their epoch objects apart.
        config.checkpoint.node_id = format!("node-{node_id}");
    }
    crate::telemetry::set_node(node_id);
    let config = Arc::new(config);
    let cluster: crate::cluster::ClusterHandle = Default::default();
    // Listeners first, so a bad address fails before anything starts, and the addresses to
    // advertise are known before joining.
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| StartError::Bind {
            what: "grpc",
            addr: config.grpc_addr,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let http_listener =
        std::net::TcpListener::bind(config.http_addr).map_err(|source| StartError::Bind {
            what: "http",
            addr: config.http_addr,
            source,
        })?;
    let adv_grpc = config.advertised_grpc(grpc_addr);
    let adv_http = match &config.advertise_addr {
        Some(a) => {
            let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
            format!(
                "{host}:{}",
                http_listener.local_addr().map(|a| a.port()).unwrap_or(0)
            )
        }
        None => http_listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    };
    let own_url = config.checkpoint_url();
    let explicit_url = config.checkpoint.url.is_some();
    let opened = crate::cluster::open(
        &config.data_dir,
        node_id,
        config.key_groups,
        &config.join,
        &adv_grpc,
        &adv_http,
        if config.checkpoint.enabled {
            &own_url
        } else {
            ""
        },
        explicit_url && config.checkpoint.enabled,
    )
    .await
    .map_err(StartError::Other)?;
    // Every member writes to the cluster's blob location.
    let url = if opened.checkpoint_url.is_empty() {
        own_url
    } else {
        if explicit_url && opened.checkpoint_url != own_url {
            return Err(StartError::Other(format!(
                "this node is configured with the blob location {own_url:?}, its cluster uses {:?}: every member writes its checkpoints to the cluster's (leave --checkpoint-url out to use it)",
                opened.checkpoint_url
            )));
        }
        opened.checkpoint_url.clone()
    };
    let placement = Arc::new(crate::mesh::Placement::new(node_id));
    placement.update(&opened.state);
    // Every member uses the blob location: the owners write their parts of each epoch there,
    // the leader the manifests. A member recovers only the key groups it owns (all of them
    // while it is alone).
    let lone = placement.is_lone();
    let owned: Vec<u32> = if lone {
        (0..config.key_groups).collect()
    } else {
        (0..config.key_groups)
            .filter(|&kg| {
                opened
                    .state
                    .table
                    .get(kg as usize)
                    .is_some_and(|o| o.owner == Some(node_id))
            })
            .collect()
    };
    let cp = if config.checkpoint.enabled {
        if let Some(path) = url
            .strip_prefix("file://")
            .or((!url.contains("://")).then_some(url.as_str()))
        {
            std::fs::create_dir_all(path).map_err(|e| {
                StartError::Other(format!("cannot create checkpoint directory {path}: {e}"))
            })?;
        }
        let blob =
            crate::checkpoint::blob::open(&url, &config.checkpoint.s3, config.checkpoint.fsync)
                .map_err(|e| StartError::Other(e.to_string()))?;
        Some(CheckpointStore::new(blob))
    } else {
        None
    };
    // One running cluster per blob location (a new cluster on a silent one restores it).
    let lease = match &cp {
        Some(cp) => {
            match crate::checkpoint::lease::acquire(
                cp,
                &opened.cluster_id,
                node_id,
                Duration::from_millis(config.checkpoint.lease_idle_renew_ms),
            )
            .await
            {
                Ok(l) => Some(l),
                Err(e) => {
                    opened.undo_bootstrap(&config.data_dir, node_id_was_new);
                    return Err(StartError::Other(e));
                }
            }
        }
        None => None,
    };
    let state_dir = config.data_dir.join("state");
    let store = match Store::open(&state_dir, config.key_groups) {
        Ok(s) => s,
        Err(e @ crate::store::StoreError::KeyGroupsChanged { .. }) => return Err(e.into()),
        // Another process (or node) has it open: never touch it.
        Err(e) if e.to_string().contains("could not acquire lock") => {
            return Err(StartError::Other(format!(
                "{e}: another statemesh node uses this data directory"
            )))
        }
        Err(e) if cp.is_some() => {
            // Blob storage holds every committed epoch: move the broken store aside and
            // rebuild it from there.
            let aside = config
                .data_dir
                .join(format!("state.corrupt-{}", crate::shard::now_ms()));
            tracing::error!(error = %e, moved_to = %aside.display(), "local state cannot be opened; rebuilding it from blob storage");
            std::fs::rename(&state_dir, &aside).map_err(|err| {
                StartError::Other(format!(
                    "local state cannot be opened ({e}) and cannot be moved aside: {err}"
                ))
            })?;
            Store::open(&state_dir, config.key_groups)?
        }
        Err(e) => return Err(e.into()),
    };
    let shard_count = config.shard_count();
    if cp.is_some() {
        driver::mark_unowned_stale(&store, config.key_groups, &owned)?;
    }
    // The epoch log: what it holds beyond blob storage (epochs acknowledged before a stop)
    // is uploaded first, so recovery reads one history.
    let log = match &cp {
        Some(cp) if config.checkpoint.log => {
            let log = Arc::new(
                statemesh_mesh::epochlog::EpochLog::open(&config.data_dir.join("epochlog"))
                    .map_err(StartError::Other)?,
            );
            let writer = format!(
                "{}/start-{}",
                config.checkpoint.node_id,
                crate::shard::now_ms()
            );
            crate::checkpoint::upload::upload_at_start(cp, &log, &writer)
                .await
                .map_err(|e| {
                    StartError::Other(format!(
                        "recovery failed: cannot upload the epoch log to blob storage: {e}"
                    ))
                })?;
            Some((log, Arc::new(std::sync::atomic::AtomicBool::new(false))))
        }
        _ => None,
    };
    let log_busy = log.as_ref().map(|l| l.1.clone());
    // A member alone: what its cluster's epoch log holds beyond blob storage goes there
    // first, so that recovery reads it.
    if let Some(cp) = cp.as_ref().filter(|_| lone) {
        let tail = opened
            .state
            .log
            .epochs()
            .iter()
            .map(|(e, b)| (*e, b.clone()))
            .collect();
        let writer = format!(
            "{}/start-{}",
            config.checkpoint.node_id,
            crate::shard::now_ms()
        );
        let uploaded =
            crate::checkpoint::upload::upload_cluster_tail_at_start(cp, tail, &writer).await;
        let why = "recovery failed: cannot upload the cluster's epoch log to blob storage";
        if let Some(through) = uploaded.map_err(|e| StartError::Other(format!("{why}: {e}")))? {
            tracing::info!(
                through,
                "the cluster's epoch log held epochs blob storage lacked: uploaded before recovery"
            );
        }
    }
    let mut recovered = driver::recover(&store, cp.as_ref(), &owned)
        .await
        .map_err(|e| StartError::Other(format!("recovery failed: {e}")))?;
    if let Some(floor) = lease.as_ref().map(|l| l.epoch_floor()) {
        // A cluster that took the location over numbers its epochs above any an older
        // cluster reaches (one that only looked lost and commits a few more before it sees the
        // lease): they never collide, nor enter its chain (each manifest names its
        // predecessor).
        recovered.committed = recovered.committed.max(floor);
    }
    let status: StatusHandle = Default::default();
    {
        let mut s = status.lock();
        s.url = if cp.is_some() {
            url.clone()
        } else {
            "off".into()
        };
        s.durability = cp.as_ref().map_or("none", |c| c.durability()).into();
        s.recovery = Some(recovered.report.clone());
    }
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (epoch_tx, epoch_rx) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Metrics::new();
    let egress =
        Egress::new(config.egress_topic_capacity, metrics.clone()).with_reads(config.egress_reads);
    let router = Router::new(
        shard_count,
        config.key_groups,
        config.max_queued_per_shard,
        config.max_message_bytes,
        Arc::new(registry),
        egress,
        metrics,
        cp.is_some(),
        config.checkpoint.ack,
        placement.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    // Kafka egresses drain their topics: never cut at capacity, restored ones included.
    for e in &router.registry().module().kafka_egresses {
        router.egress().add_sink(&e.id);
    }
    if cp.is_some() {
        // Egress records committed but not read before the last stop.
        // Only the key groups this node serves: a node stopped between a move and its
        // rollback still holds the records of key groups it lost (their new owner serves them).
        let mine: std::collections::BTreeSet<u32> = owned.iter().copied().collect();
        router.egress().restore(
            store
                .load_egress()?
                .into_iter()
                .filter(|r| {
                    r.1.len() >= 3 && mine.contains(&(u16::from_be_bytes([r.1[1], r.1[2]]) as u32))
                })
                .collect(),
        );
    }

    // The playground's ingress and egress listen on the ports the module names (on the HTTP
    // address's interface), sharing the main listener when a port is the same.
    let http_port = http_listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut main_routes = Routes {
        api: true,
        playground_ingress: false,
        playground_egress: false,
    };
    let mut extra: Vec<(std::net::TcpListener, Routes)> = Vec::new();
    let module = router.registry().module();
    let ports = [
        (module.playground_ingress, true),
        (module.playground_egress, false),
    ];
    for (port, ingress) in ports.into_iter().filter_map(|(p, i)| p.map(|p| (p, i))) {
        let set = |r: &mut Routes| {
            if ingress {
                r.playground_ingress = true;
            } else {
                r.playground_egress = true;
            }
        };
        if port == http_port || port == config.http_addr.port() {
            set(&mut main_routes);
        } else if let Some((_, r)) = extra
            .iter_mut()
            .find(|(l, _)| l.local_addr().map(|a| a.port()).ok() == Some(port))
        {
            set(r);
        } else {
            let addr = SocketAddr::new(config.http_addr.ip(), port);
            let l = std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind {
                what: "playground",
                addr,
                source,
            })?;
            let mut r = Routes {
                api: false,
                playground_ingress: false,
                playground_egress: false,
            };
            set(&mut r);
            extra.push((l, r));
        }
    }

    let auth = crate::auth::Auth::new(&config.auth, router.metrics().clone())
        .map_err(StartError::Other)?;
    auth.watch();
    let auth2 = auth.clone();
    let tls2 = tls.clone();
    let (started_tx, started_rx) = oneshot::channel::<Result<ActixStarted, String>>();
    let (r2, c2, ready2) = (router.clone(), config.clone(), ready.clone());
    let (store2, events2, status2) = (store.clone(), events_tx.clone(), status.clone());
    let cluster2 = cluster.clone();
    let (mesh_closing, mesh_closing_rx) = tokio::sync::watch::channel(false);
    let mesh = Arc::new(crate::mesh::MeshService {
        me: node_id,
        cluster_id: opened.cluster_id.clone(),
        inbox: opened.inbox.clone(),
        epochs: epoch_tx.clone(),
        driver: events_tx.clone(),
        router: router.clone(),
        closing: mesh_closing_rx,
    });
    let mesh2 = mesh.clone();
    let committed = recovered.committed;
    let replay = replay_batches(shard_count, &router, recovered.pending.clone());
    let actix_thread = std::thread::Builder::new()
        .name("statemesh-actix".into())
        .spawn(move || {
            let sys = actix_rt::System::new();
            let setup = sys.block_on(async move {
                let mut shards = Vec::with_capacity(shard_count);
                for (index, replay) in replay.into_iter().enumerate() {
                    let arbiter = Arbiter::new();
                    let opts = ShardOptions {
                        index,
                        router: r2.clone(),
                        store: store2.clone(),
                        config: c2.clone(),
                        committed,
                        events: events2.clone(),
                        replay,
                    };
                    shards.push(Shard::start_in_arbiter(&arbiter.handle(), move |_| {
                        Shard::new(opts)
                    }));
                }
                r2.set_shards(shards.clone());
                // Each shard queued its key groups' pending message records and then the
                // recovered epoch's pending messages when it started, ahead of anything in
                // its mailbox; now that the router knows every shard, they may run.
                for s in 0..shard_count {
                    r2.deliver_internal(s, None, 0, Vec::new());
                }
                let shared = Shared {
                    router: r2.clone(),
                    config: c2.clone(),
                    shards: shards.clone(),
                    ready: ready2,
                    checkpoints: status2,
                    cluster: cluster2,
                    mesh: mesh2,
                    auth: auth2,
                    tls: tls2,
                };
                let mut playground = Vec::new();
                for (l, routes) in extra {
                    let (srv, addr) = crate::ingress::http::server(shared.clone(), l, routes)?;
                    tracing::info!(%addr, ?routes, "playground I/O listening");
                    playground.push(srv.handle());
                    actix_rt::spawn(srv);
                }
                let server = crate::ingress::http::server(shared, http_listener, main_routes)?;
                let http_addr = server.1;
                let handle = server.0.handle();
                actix_rt::spawn(server.0);
                Ok::<_, String>(ActixStarted {
                    shards,
                    http_addr,
                    http_server: handle,
                    playground,
                    system: actix_rt::System::current(),
                })
            });
            let ok = setup.is_ok();
            let _ = started_tx.send(setup);
            if ok {
                let _ = sys.run();
            }
        })
        .map_err(|e| StartError::Other(format!("cannot start the actix thread: {e}")))?;
    let started = started_rx
        .await
        .map_err(|_| StartError::Other("the actix thread died during start".into()))?
        .map_err(StartError::Other)?;

    // With checkpoints a node of a cluster of several follows the leader's epochs (a lone
    // node commits its own until a second member joins).
    let epoch_side = cp.as_ref().map(|_| (node_id, epoch_tx.clone(), !lone));
    let epoch_cp = cp.clone();
    let driver_thread = driver::start(
        &config,
        cp,
        store.clone(),
        router.clone(),
        started.shards.clone(),
        recovered.committed,
        recovered.last_manifest,
        recovered.force_full,
        recovered.pending,
        events_tx.clone(),
        events_rx,
        status.clone(),
        owned,
        epoch_side,
        log,
    );
    let committed_status = status.clone();
    let control = crate::cluster::start(
        opened,
        adv_grpc,
        adv_http,
        cluster.clone(),
        placement,
        Box::new(move || committed_status.lock().committed),
        crate::cluster::EpochParams {
            tx: epoch_tx,
            rx: epoch_rx,
            driver: events_tx.clone(),
            cp: epoch_cp,
            interval_ms: config.checkpoint.interval_ms,
            max_uncommitted: config.checkpoint.max_uncommitted,
            failure: config.mesh.failure(),
            log_busy,
            cluster_log: crate::cluster::LogConfig {
                enabled: config.checkpoint.cluster_log,
                upload_interval: std::time::Duration::from_millis(
                    config.checkpoint.upload_interval_ms,
                ),
                upload_bytes: config.checkpoint.upload_bytes,
                max_bytes: config
                    .checkpoint
                    .log_max_bytes
                    .min(crate::cluster::LOG_MAX_BYTES),
            },
        },
    )
    .map_err(|e| StartError::Other(format!("control group: {e}")))?;
    let shared = Shared {
        router,
        config: config.clone(),
        shards: started.shards,
        ready: ready.clone(),
        checkpoints: status,
        cluster,
        mesh,
        auth,
        tls,
    };
    let (grpc_shutdown, grpc_task) = crate::ingress::grpc::serve(shared.clone(), grpc_listener);
    if let Some(l) = lease {
        l.spawn();
    }
    let ingresses = &shared.router.registry().module().kafka_ingresses;
    let kafka = if ingresses.is_empty() {
        None
    } else {
        Some(
            crate::kafka::ingress::KafkaIngresses::start(shared.router.clone(), ingresses)
                .map_err(StartError::Other)?,
        )
    };
    let egresses = &shared.router.registry().module().kafka_egresses;
    let kafka_out = if egresses.is_empty() {
        None
    } else {
        Some(
            crate::kafka::egress::KafkaEgresses::start(shared.router.egress().clone(), egresses)
                .map_err(StartError::Other)?,
        )
    };
    ready.store(true, Ordering::SeqCst);
    tracing::info!(grpc = %grpc_addr, http = %started.http_addr, shards = shard_count, data_dir = %config.data_dir.display(), "node started");
    Ok(NodeHandle {
        shared,
        grpc_addr,
        http_addr: started.http_addr,
        grpc_shutdown: Some(grpc_shutdown),
        grpc_task: Some(grpc_task),
        mesh_closing,
        http_server: started.http_server,
        playground: started.playground,
        system: started.system,
        actix_thread: Some(actix_thread),
        driver_thread: Some(driver_thread),
        driver_events: events_tx,
        store,
        control,
        kafka,
        kafka_out,
    })
}

/// A recovered epoch's pending messages per shard, in order.
fn replay_batches(
    shards: usize,
    router: &Router,
    pending: Vec<(u32, crate::checkpoint::format::PendingMessage)>,
) -> Vec<Vec<Envelope>> {
    let n = pending.len();
    let mut per_shard: Vec<Vec<(u32, crate::checkpoint::format::PendingMessage)>> =
        (0..shards).map(|_| Vec::new()).collect();
    for (kg, m) in pending {
        per_shard[router.shard_of(kg)].push((kg, m));
    }
    if n > 0 {
        tracing::info!(
            messages = n,
            "replaying the recovered epoch's pending messages"
        );
    }
    per_shard.into_iter().map(envelopes).collect()
}

/// Pending messages of a checkpoint as envelopes, in order (a malformed target is logged and
/// dropped).
pub(crate) fn envelopes(
    pending: Vec<(u32, crate::checkpoint::format::PendingMessage)>,
) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(pending.len());
    for (kg, m) in pending {
        let target = match statemesh_sdk::Address::parse(&m.target) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(target = %m.target, error = %e, "recovered message has a malformed target; dropped");
                continue;
            }
        };
        let caller = if m.caller.is_empty() {
            None
        } else {
            statemesh_sdk::Address::parse(&m.caller).ok()
        };
        let message = if m.has_value {
            statemesh_sdk::TypedValue::new(m.typename, m.value)
        } else {
            statemesh_sdk::TypedValue::empty(m.typename)
        };
        out.push(Envelope {
            target,
            kg,
            caller,
            message,
            ingress: false,
            key: (!m.idempotency_key.is_empty()).then(|| m.idempotency_key.into()),
            trace: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use statemesh_sdk::{Address, TypedValue};

    /// A node's configuration on `dir`, on loopback ports chosen at its start.
    fn config_in(dir: &std::path::Path) -> NodeConfig {
        NodeConfig {
            data_dir: dir.to_path_buf(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        }
    }

    /// The runtime a test's nodes start on.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Adds `n` to `example/counter/{id}` through `node`'s router: the new total.
    async fn add(node: &NodeHandle, id: &str, n: i64) -> i64 {
        let counter = Address::parse(&format!("example/counter/{id}")).unwrap();
        let r = node
            .router()
            .call(counter, TypedValue::of(&n), Duration::from_secs(10))
            .await
            .expect("the counter answers");
        r.get::<i64>().unwrap()
    }

    /// A node dropped without a shutdown, with the runtime it started on: its epoch driver,
    /// on a thread of its own, ends too (it held the epoch log and the local store).
    #[test]
    fn a_node_dropped_with_its_runtime_stops_its_epoch_driver() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let rt = runtime();
        let mut node = rt
            .block_on(NodeBuilder::new(config).with_examples().start())
            .unwrap();
        let driver = node.driver_thread.take().expect("a driver thread");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!driver.is_finished(), "the driver ended on its own");
        drop(rt);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !driver.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the epoch driver still runs 10 s after its node's runtime is gone"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The rest of the node (its actix system) is not tied to the runtime; not asserted.
        std::mem::forget(node);
    }

    /// A shutdown waits for its last epoch to be in sled, not for the applier's merge window
    /// (`checkpoint.apply_interval_ms`, 10 s here): it asked the applier only for the epochs
    /// committed before it, so the last one waited for the window (1 s with the defaults).
    #[test]
    fn a_shutdown_does_not_wait_for_the_appliers_merge_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.checkpoint.apply_interval_ms = 10_000;
        let rt = runtime();
        rt.block_on(async {
            for expect in [5, 10] {
                let node = NodeBuilder::new(config.clone())
                    .with_examples()
                    .start()
                    .await
                    .unwrap();
                assert_eq!(add(&node, "stopping", 5).await, expect);
                // Epochs go on meanwhile (100 ms apart): the applier is in a window.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let t = Instant::now();
                node.shutdown().await;
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "the shutdown took {:?}",
                    t.elapsed()
                );
            }
        });
    }

    /// A node dropped without a shutdown stops at once: its ports are released, and a node
    /// started on its data directory in the same process (sled's lock released) finds what
    /// was committed.
    #[test]
    fn a_node_dropped_without_a_shutdown_stops_and_gives_back_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let rt = runtime();
        rt.block_on(async {
            let node = NodeBuilder::new(config.clone())
                .with_examples()
                .start()
                .await
                .unwrap();
            // A call is answered once its epoch committed.
            assert_eq!(add(&node, "dropped", 5).await, 5);
            let (grpc, http) = (node.grpc_addr(), node.http_addr());
            drop(node);
            let deadline = Instant::now() + Duration::from_secs(30);
            for addr in [http, grpc] {
                while tokio::net::TcpStream::connect(addr).await.is_ok() {
                    assert!(
                        Instant::now() < deadline,
                        "{addr} still answers 30 s after the drop"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let node = loop {
                match NodeBuilder::new(config.clone())
                    .with_examples()
                    .start()
                    .await
                {
                    Ok(n) => break n,
                    Err(e) => {
                        assert!(
                            Instant::now() < deadline,
                            "no node starts on the data directory 30 s after the drop: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            assert_eq!(
                add(&node, "dropped", 1).await,
                6,
                "the committed call was lost"
            );
            node.shutdown().await;
        });
    }
}
