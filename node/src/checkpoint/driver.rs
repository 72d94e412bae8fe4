//! The epoch driver of one node: runs the [`Coordinator`] against the shards, blob storage and
//! sled, and recovers a node at start.
//!
//! Flow of an epoch `e`: `Barrier(e)` to every shard → each shard's [`ShardCut`] (its delta
//! and pending messages) → one node object in blob storage → the manifest (create-only: the
//! commit point) → `Committed(e)` to the shards (they release held acknowledgements, replies and
//! egress) → the delta applied to sled by the applier thread, which then records `applied = e`.
//!
//! An epoch in which nothing changed and nothing was pending is committed without writing
//! (it equals the previous one). With checkpoints off the same flow runs without blob storage,
//! so sled is still written once per `flush_interval_ms`.
//!
//! Full snapshots: when the deltas written since the last full snapshot exceed twice its size
//! (at least `full_snapshot_min_bytes`, 8 MiB), the driver scans sled (which holds every committed epoch up to some `c`)
//! into a full snapshot labelled `c` and lists it in the next manifest; recovery reads it and
//! the deltas after `c`. Scanning while newer epochs are applied is safe: every key changed
//! after `c` is rewritten by a delta after `c`. Garbage collection runs between snapshots,
//! never concurrently with one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::coordinator::{Action, Coordinator, EpochCoordinator, Input, Participant};
use super::format::{Entry, KeyGroupSection, Manifest, NodeEpoch, ObjectRef, PendingMessage};
use super::store::{CheckpointError, CheckpointStore};
use crate::router::Router;
use crate::shard::{Barrier, Committed, Rollback, Shard};
use crate::store::{key_group_of, Change, Store};
use statemesh_mesh::epoch::EpochMsg;

/// What a shard cut.
pub(crate) struct ShardCut {
    pub epoch: u64,
    pub shard: usize,
    /// The shard's generation when it cut (a rollback gives the shards a new one): a cut of
    /// an older generation than the driver's is stale, whatever its epoch.
    pub generation: u64,
    /// Local-store writes since the previous cut, in order.
    pub ops: Vec<Change>,
    /// Unprocessed messages at the cut, with their key group, in replay order.
    pub pending: Vec<(u32, PendingMessage)>,
}

/// What the driver does with a shard's cut.
#[derive(Debug, PartialEq, Eq)]
enum CutFate {
    /// A cut of a running epoch.
    Take,
    /// A cut of the epoch after a rollback's base by a shard that rolled back already (a
    /// peer's marker came first): kept until the rollback ends.
    AfterRollback,
    /// A cut of an abandoned epoch.
    Drop,
}

/// What becomes of a cut of `epoch` by a shard of generation `generation`, with the shards
/// at `shard_gen` (the generation the last rollback gave them) and `rolling_back` = (the
/// shards were told, the rollback's base) during a rollback.
///
/// Everything of the epochs being abandoned is dropped (a shard's last old cut reaches the
/// driver before `RolledBack` does). Old cuts are told apart by their generation, not their
/// epoch: a shard may cut an epoch after the rollback's base before its `Rollback` comes (a
/// peer's marker of the old generation came first), and after the rollback the next epoch
/// takes the number after the base, the same one. Taken for the new epoch's, that old cut
/// committed what the rollback abandoned: timers fired and messages applied, while their
/// effects were dropped with the old generation (lost) or done again after it (applied twice).
fn cut_fate(
    rolling_back: Option<(bool, u64)>,
    shard_gen: u64,
    generation: u64,
    epoch: u64,
) -> CutFate {
    match rolling_back {
        Some((told, base)) if told && generation == shard_gen && epoch > base => {
            CutFate::AfterRollback
        }
        Some(_) => CutFate::Drop,
        None if generation != shard_gen => CutFate::Drop,
        None => CutFate::Take,
    }
}

/// Inputs of the driver.
pub(crate) enum DriverEvent {
    Cut(ShardCut),
    Written {
        epoch: u64,
        /// [`Driver::rollbacks`] when the write began: a write begun before a rollback
        /// belongs to an abandoned epoch, even if the epoch's number is used again after it.
        rollbacks: u64,
        result: Result<Option<ObjectRef>, String>,
    },
    Committed {
        epoch: u64,
        /// `Some`: the manifest stored is an earlier attempt's (found reading back after an
        /// ambiguous put), not the one just written.
        result: Result<Option<Manifest>, String>,
        /// Bytes of its record, when the epoch committed to the epoch log.
        logged: Option<u64>,
    },
    Applied {
        epoch: u64,
        result: Result<(), String>,
    },
    Maintenance(Result<Maintenance, String>),
    /// Commit everything accepted so far and apply it to sled (shutdown); answers with the
    /// epoch, or `None` when a participant in a cluster gave up waiting for it (no leader
    /// known, or `FINISH_IN_CLUSTER` passed): what it accepted since the last commit is then
    /// recovered from that commit and replayed.
    Finish(oneshot::Sender<Option<u64>>),
    /// Stop the driver and the applier (after `Finish`); answers once they have stopped.
    Stop(oneshot::Sender<()>),
    /// Every shard has rolled back and the pending messages are replayed.
    RolledBack,
    /// A participant stops waiting for its last epoch to commit (`Finish`).
    FinishTimeout,
    /// A message of the cluster's epoch protocol for this node (a participant).
    Epoch {
        from: statemesh_mesh::placement::NodeId,
        msg: EpochMsg,
    },
    /// Committed epochs this node did not write were read from blob storage into sled (a
    /// rollback to an epoch the leader committed while this node restarted): their pending
    /// messages, or the error.
    CaughtUp(Result<Loaded, String>),
    /// A live move's key groups were read from blob storage (see [`Reconfiguring`]).
    Handed(Result<Handed, String>),
    /// Every shard handed the live move's key groups over.
    HandedOver {
        at: u64,
    },
    /// An upload of the epoch log ended.
    Uploaded(Result<Option<super::upload::Uploaded>, String>),
    /// A second member is about to join: epochs commit to blob storage from now on, and the
    /// epoch log is uploaded.
    LeaveLog,
    /// Upload the epoch log now (shutdown); answers once it holds nothing released, or with
    /// the upload's error.
    UploadLog(oneshot::Sender<Result<(), String>>),
}

/// What a live move read from blob storage for this node.
pub(crate) struct Handed {
    at: u64,
    /// The pending messages at `at` of the moving key groups this node serves now.
    pending: Vec<(u32, PendingMessage)>,
    /// The key groups sled holds now.
    owned: std::collections::BTreeSet<u32>,
    gained: Vec<u32>,
    lost: Vec<u32>,
}

/// A live move under way here (after the leader's live `Resume`): once sled holds `at`, the
/// key groups this node gained are read from blob storage, those it lost are dropped from
/// sled, the pending messages of every moving key group it serves now are read, and then the
/// shards hand them over ([`Reconfigure`](crate::shard::Reconfigure)).
#[derive(Debug)]
struct Reconfiguring {
    at: u64,
    manifest: Option<u64>,
    started: bool,
    since: Instant,
}

/// What a rollback read from blob storage.
pub(crate) struct Loaded {
    /// The committed epochs this node missed (its key groups' pending messages at the
    /// committed epoch replace the last ones it knew).
    replaced: Option<Vec<(u32, PendingMessage)>>,
    /// The key groups new to this node: their pending messages at the committed epoch.
    extra: Vec<(u32, PendingMessage)>,
    /// The key groups sled now holds.
    owned: std::collections::BTreeSet<u32>,
    /// Of those, the ones new to this node; and the ones it no longer holds.
    gained: Vec<u32>,
    lost: Vec<u32>,
    /// Of this node's open epochs that read egress records, the ones committed (a manifest
    /// lists their object): the reads' records are removed.
    committed_reads: Vec<u64>,
}

/// Where a node in a cluster of several sends its epoch messages (its control thread, which
/// passes them to the leader).
pub(crate) type EpochOut = mpsc::UnboundedSender<crate::cluster::EpochRoute>;

/// How long garbage collection leaves an object no manifest lists: a full snapshot is listed
/// only in a part after it is written (a move's snapshot after the leader's `Prepared` round),
/// and in a cluster the member that collects is not the one that wrote it.
const GC_GRACE: Duration = Duration::from_secs(300);

/// A node's side of cluster epochs.
struct ClusterSide {
    me: statemesh_mesh::placement::NodeId,
    out: EpochOut,
    /// The leader decides the epochs (else this node still commits its own: it was alone).
    active: bool,
    /// The leader's synchronisation generation this node follows.
    gen: u64,
    /// The generation of the last `Resume` it followed: its open epochs were cut in it.
    cut_gen: u64,
    leader: Option<statemesh_mesh::placement::NodeId>,
    /// Synchronising: no epochs are cut until the leader's `Resume`.
    holding: bool,
    /// A `Hold` waits for this node's own open epochs to commit (it was alone until now).
    hold_pending: bool,
    /// Barriers that arrived during a rollback, cut after it.
    deferred: Vec<u64>,
    /// The epoch whose part lists the full snapshot being listed.
    listing_epoch: Option<u64>,
    /// A `Resume` waiting for the key-group table it was sent at.
    waiting_resume: Option<(statemesh_mesh::placement::NodeId, EpochMsg)>,
    /// The leader asked for a full snapshot of key groups about to move.
    move_snapshot: Option<MoveSnapshot>,
    /// A stream of messages between functions broke: the newest shard generation whose
    /// messages may have been lost, until a rollback takes the shards past it.
    broken: Option<u64>,
    /// The generation in which this node last asked the leader to synchronise for it
    /// (`Reset`; asked again in a newer one while the shards are still in that generation:
    /// the leader ignores a `Reset` of another generation, and may resume everyone live).
    reset_sent: Option<u64>,
}

/// A full snapshot of the key groups about to move that this node owns: once a part lists
/// it, the node answers `Prepared` (their new owners read the chain only from its label on).
#[derive(Debug)]
struct MoveSnapshot {
    /// The generation that asked.
    gen: u64,
    key_groups: Vec<u32>,
    /// Being written.
    started: bool,
    /// Written (waiting to be listed): its path.
    path: Option<String>,
}

/// A finished background job.
pub(crate) enum Maintenance {
    /// `partial`: only key groups about to move (the periodic snapshot is not reset).
    Full {
        object: ObjectRef,
        label: u64,
        partial: bool,
        /// [`Driver::sled_rewrites`] when the scan began.
        rewrites: u64,
    },
    Gc(super::store::GcReport),
}

/// One committed epoch, for `GET /v1/checkpoints`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochInfo {
    /// The epoch.
    pub epoch: u64,
    /// Bytes of its node object, or of its record in the epoch log (0: nothing changed,
    /// nothing written).
    pub bytes: u64,
    /// Key groups with a section.
    pub key_groups: usize,
    /// State entries written or deleted.
    pub entries: usize,
    /// Pending messages at its cut.
    pub pending: usize,
    /// Barrier to commit, ms.
    pub duration_ms: f64,
    /// When it committed, ms since the Unix epoch.
    pub committed_ms: u64,
}

/// The checkpoint status of a node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckpointStatus {
    /// Checkpoints on.
    pub enabled: bool,
    /// Blob storage URL.
    pub url: String,
    /// How a committed epoch is durable: `fsync` (local files synced to stable storage),
    /// `no-fsync` (local files in the page cache: a process crash loses nothing, a power loss
    /// may), `backend` (the store's writes are durable when they return: S3, GCS, Azure),
    /// `none` (in memory, or checkpoints off).
    pub durability: String,
    /// Last committed epoch.
    pub committed: u64,
    /// Last started epoch.
    pub started: u64,
    /// Newest epoch applied to sled.
    pub applied: u64,
    /// When the last epoch committed, ms since the Unix epoch.
    pub last_commit_ms: u64,
    /// The last write or commit error (cleared by a commit).
    pub last_error: Option<String>,
    /// Why ingress is refused, if it is.
    pub backpressure: Option<String>,
    /// The newest full snapshot: (label epoch, bytes).
    pub last_full: Option<(u64, u64)>,
    /// How the node recovered at start.
    pub recovery: Option<RecoveryReport>,
    /// The newest committed epochs, newest last.
    pub recent: VecDeque<EpochInfo>,
    /// Rollbacks to the last committed epoch since start.
    pub rollbacks: u64,
    /// How long the last one refused ingress (from its start until the pending messages were
    /// replayed), ms.
    pub last_rollback_ms: Option<f64>,
    /// The epoch log (`[checkpoint] log`), if the node keeps one.
    pub log: Option<LogStatus>,
}

/// The epoch log's state, for `GET /v1/checkpoints`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogStatus {
    /// Epochs commit to the log (the node is alone); else to blob storage.
    pub active: bool,
    /// Committed epochs the log holds that blob storage does not have yet.
    pub epochs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The newest epoch uploaded to blob storage.
    pub uploaded: Option<u64>,
    /// Uploads since start.
    pub uploads: u64,
    /// Why the last upload failed (cleared by the next that succeeds).
    pub last_error: Option<String>,
}

/// The epoch log while this node has one (OVERVIEW.md, "The epoch log").
struct LogSide {
    log: Arc<statemesh_mesh::epochlog::EpochLog>,
    /// Epochs commit to the log (the node is alone); else to blob storage.
    active: bool,
    uploading: bool,
    last_upload: Instant,
    /// After a failed upload, the next waits until then.
    retry_at: Option<Instant>,
    failures: u32,
    interval: Duration,
    upload_bytes: u64,
    max_bytes: u64,
    /// Ingress is refused: the log is over `max_bytes`.
    full: Option<String>,
    /// Read by the control thread: the log is active or holds epochs blob storage lacks (a
    /// second member may join only once it is false).
    busy: Arc<std::sync::atomic::AtomicBool>,
    /// Waiting for the log's released epochs to be uploaded (shutdown).
    flush: Vec<oneshot::Sender<Result<(), String>>>,
    /// The size last shown in the status (epochs, bytes): it is updated on a change only.
    shown: (usize, u64),
}

impl LogSide {
    /// The log is active or holds epochs blob storage lacks: a second member may not join yet
    /// (see `busy`).
    fn busy_now(&self) -> bool {
        self.active || self.log.last_epoch().is_some()
    }

    fn publish_busy(&self) {
        self.busy
            .store(self.busy_now(), std::sync::atomic::Ordering::SeqCst);
    }
}

/// How a node recovered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    /// `none` (fresh), `sled` (local state current), `blob-deltas` (sled caught up from
    /// blob storage), `blob-full` (sled rebuilt from blob storage).
    pub source: String,
    /// The epoch recovered.
    pub epoch: u64,
    /// Pending messages replayed.
    pub pending: usize,
    /// State entries written to sled.
    pub entries: usize,
    /// Time spent, ms.
    pub duration_ms: u64,
}

/// Shared with the admin endpoints.
pub type StatusHandle = Arc<Mutex<CheckpointStatus>>;

struct Options {
    node_id: String,
    /// `node/nonce`: recognises this process's manifests after an ambiguous put.
    writer: String,
    retain: usize,
    full_min: u64,
    full_max_epochs: u64,
    gc_every: u64,
    gc_min_interval: Duration,
}

struct Driver {
    coord: Box<dyn EpochCoordinator>,
    events: mpsc::UnboundedSender<DriverEvent>,
    cp: Option<CheckpointStore>,
    store: Store,
    router: Router,
    shards: Vec<Addr<Shard>>,
    opts: Options,
    /// Cuts received, by epoch.
    cuts: BTreeMap<u64, Vec<ShardCut>>,
    /// Built and being written/committed, by epoch.
    built: BTreeMap<u64, Arc<NodeEpoch>>,
    objects: BTreeMap<u64, Option<ObjectRef>>,
    started_at: BTreeMap<u64, Instant>,
    last_manifest: Option<u64>,
    /// A full snapshot waiting to be listed in the next manifest.
    unlisted_full: Option<(ObjectRef, u64)>,
    /// The full snapshot listed by the manifest being committed.
    listing: Option<(ObjectRef, u64)>,
    maintenance_running: bool,
    bytes_since_full: u64,
    last_full_bytes: u64,
    force_full: bool,
    commits_since_gc: u64,
    last_was_gc: bool,
    /// A full snapshot is due once sled has applied this epoch.
    full_wanted_at: Option<u64>,
    epochs_since_full: u64,
    last_gc: Option<Instant>,
    applier: Option<std::sync::mpsc::Sender<(u64, Option<Arc<NodeEpoch>>)>>,
    /// The node's runtime: the driver's own thread runs only its loop; uploads, loads and
    /// maintenance run here, beside the node's other work.
    rt: tokio::runtime::Handle,
    applier_thread: Option<std::thread::JoinHandle<()>>,
    finish: Vec<(u64, oneshot::Sender<Option<u64>>)>,
    status: StatusHandle,
    /// The coordinator's parameters (a rollback starts a new one).
    coord_params: (usize, u64, u64),
    /// The pending messages of the last committed epoch (what a rollback replays).
    last_pending: LastPending,
    /// Egress records read, taken into each epoch not committed yet (a rollback gives them
    /// back).
    consumed: BTreeMap<u64, Vec<crate::egress::RecordOp>>,
    /// A rollback under way.
    rolling_back: Option<RollingBack>,
    /// In a cluster of several: the leader's side of epochs.
    cluster: Option<ClusterSide>,
    /// The last epoch released here (whose state sled gets): numbers after it that were
    /// abandoned are not counted.
    last_released: u64,
    /// The newest epoch committed to the epoch log and its record's bytes (for the status).
    last_logged: Option<(u64, u64)>,
    /// The key groups whose state sled holds (this node's when it last started or rolled
    /// back; a rollback loads the ones it gained from blob storage and drops the ones it
    /// lost).
    loaded: std::collections::BTreeSet<u32>,
    /// The participants of the cluster's epochs the shards know (empty: this node alone).
    members: Arc<Vec<(u64, u32)>>,
    key_groups: u32,
    /// Cuts of epochs after a rollback that arrived before it ended.
    early_cuts: Vec<ShardCut>,
    /// A live move under way.
    reconfiguring: Option<Reconfiguring>,
    /// A hand-over's task that writes the moving key groups to sled runs (a rollback waits
    /// for it, so that the rollback's own writes of the same key groups come last).
    handing: bool,
    /// Counts the rollbacks and hand-overs begun: each may rewrite key groups in sled (clear
    /// the ones lost, rebuild the ones gained, read committed epochs back). A full snapshot
    /// scanned across one is dropped (see [`Driver::snapshot`]).
    sled_rewrites: u64,
    /// The generation the shards took at their last rollback.
    shard_gen: u64,
    /// Counts the rollbacks begun (see [`DriverEvent::Written`]).
    rollbacks: u64,
    /// The epoch log (a node alone commits its epochs there).
    log: Option<LogSide>,
    /// An epoch to commit to blob storage once the log is uploaded (it left the log).
    commit_after_upload: Option<u64>,
    /// The coordinator's back-pressure (epochs not committed), beside the log's.
    coord_backpressure: Option<String>,
    /// Outputs that want a commit soon, not at once.
    soon: CommitSoon,
}

impl ClusterSide {
    fn send(&self, to: statemesh_mesh::placement::NodeId, msg: EpochMsg) {
        let _ = self.out.send(crate::cluster::EpochRoute::Send {
            from: self.me,
            to,
            msg,
        });
    }
}

/// Writes a key group's state rebuilt from blob storage into sled (its deletions, then its
/// entries).
fn write_state(store: &Store, st: &super::format::KeyGroupState) -> Result<(), String> {
    store
        .write_ops(
            st.deleted.iter().map(|k| (k.as_slice(), None)).chain(
                st.state
                    .iter()
                    .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
            ),
        )
        .map_err(|e| e.to_string())
}

/// Reads the committed epochs after `after` up to `to` of the key groups `owned` from blob
/// storage into sled (a rollback to an epoch this node did not see committed); returns the
/// pending messages of `to`.
/// The pending messages of key groups `kgs` at committed epoch `m` (every participant's part
/// of it), read from blob storage.
async fn pending_at(
    cp: &CheckpointStore,
    m: u64,
    kgs: &[u32],
) -> Result<Vec<(u32, PendingMessage)>, String> {
    let (_, states) = retry("read the committed epoch", || {
        cp.recover_at(m, kgs, Some(m))
    })
    .await
    .map_err(|e| format!("cannot read the committed epoch's pending messages: {e}"))?;
    Ok(states
        .into_iter()
        .flat_map(|(kg, st)| st.pending.into_iter().map(move |p| (kg, p)))
        .collect())
}

async fn catch_up(
    cp: &CheckpointStore,
    store: &Store,
    owned: &[u32],
    after: Option<u64>,
    to: u64,
    manifest: u64,
) -> Result<Vec<(u32, PendingMessage)>, String> {
    if owned.is_empty() {
        return Ok(Vec::new());
    }
    // Key groups rebuilt whole: marked stale in sled until they are (a node killed meanwhile
    // reads them whole again at its start, not as deltas over a partial copy).
    let mut whole = after.is_none();
    if whole {
        // Key groups new to this node: whatever sled holds of them is stale.
        store
            .set_stale(owned.iter().copied(), true)
            .and_then(|()| store.clear_key_groups(owned.iter().copied()))
            .map_err(|e| e.to_string())?;
    }
    let m = retry("read a committed epoch", || cp.manifest(manifest))
        .await
        .map_err(|e| format!("cannot read the manifest of epoch {manifest}: {e}"))?;
    let (_, states) = match retry("read the checkpoint chain", || {
        cp.recover_at(m.epoch, owned, after)
    })
    .await
    {
        Ok(r) => r,
        Err(CheckpointError::HistoryTooShort { .. }) => {
            whole = true;
            store
                .set_stale(owned.iter().copied(), true)
                .and_then(|()| store.clear_key_groups(owned.iter().copied()))
                .map_err(|e| e.to_string())?;
            retry("read the checkpoint chain", || {
                cp.recover_at(m.epoch, owned, None)
            })
            .await
            .map_err(|e| format!("cannot read the checkpoint chain: {e}"))?
        }
        Err(e) => return Err(format!("cannot read the checkpoint chain: {e}")),
    };
    let mut pending = Vec::new();
    for (kg, st) in states {
        write_state(store, &st)?;
        pending.extend(st.pending.into_iter().map(|m| (kg, m)));
    }
    if after.is_some() {
        store.reset_applied(to).map_err(|e| e.to_string())?;
    }
    if whole {
        store
            .set_stale(owned.iter().copied(), false)
            .map_err(|e| e.to_string())?;
    }
    // The epochs after the manifest's wrote nothing: nothing was pending at their cuts.
    if manifest < to {
        pending.clear();
    }
    Ok(pending)
}

/// Where the pending messages of the last committed epoch are.
enum LastPending {
    /// Recovered at start (no epoch committed since).
    Recovered(Vec<(u32, PendingMessage)>),
    /// In the last committed epoch's object (none if it wrote nothing).
    Epoch(Arc<NodeEpoch>),
}

/// A rollback under way: to the committed epoch `to`, after which epochs are numbered from
/// `base + 1` (abandoned numbers are not reused).
#[derive(Debug, Clone)]
struct RollingBack {
    to: u64,
    base: u64,
    /// A participant new to the epochs taken in live: its shards take this generation (the
    /// others'), and it answers `Reconfigured` at the end.
    join_live: Option<u64>,
    /// The shards were told (after sled had applied `to`).
    shards_told: bool,
    /// Sled must hold this epoch before the shards are told (the last one this node
    /// released).
    wait: u64,
    /// `to` is past what this node released: the committed epochs between (the newest with a
    /// manifest is the second number) are read from blob storage first, once sled holds this
    /// node's own.
    catch_up: Option<(u64, u64)>,
    catching_up: bool,
    /// The newest manifest up to `to` (key groups this node gained are read from it).
    manifest: Option<u64>,
    /// Gained and lost key groups are handled.
    owned_checked: bool,
    /// Pending messages of key groups gained, replayed with the others.
    extra: Vec<(u32, PendingMessage)>,
    since: Instant,
    /// In a cluster: the generation this rollback is for (its shards take it). A `Hold` of a
    /// newer one may come meanwhile: that generation's `Resume` (its base, its participants)
    /// waits until this rollback is done, then rolls back again.
    gen: Option<u64>,
    /// The committed epoch may have other participants' parts: this node took part in the
    /// epochs with others before this rollback, or does after it. Its key groups' pending
    /// messages at `to` are then read from every part (see `continue_rollback`), also when it
    /// goes on alone (its peers left the epochs, or the leader holds only this node).
    several: bool,
}

pub(crate) fn now_ms() -> u64 {
    crate::shard::now_ms()
}

/// An output that wants a commit soon, not at once (an egress record nobody is blocked on),
/// gets an epoch of its own after this long, unless one starts meanwhile and takes it along.
pub(crate) const COMMIT_SOON_MS: u64 = 2;

/// The epoch driver's tick while anything is under way (see `Driver::tick_period`).
const BUSY_TICK: Duration = Duration::from_millis(1);

/// The epoch driver's tick while only the epoch log's upload is under way, a flush of it is
/// waited for, or it is over its bound (its completion comes as an event; what follows, a
/// flush's answer, a retry after a failed upload, the log's bound, is looked at on ticks).
const UPLOAD_TICK: Duration = Duration::from_millis(10);

/// The epoch driver's longest tick, while nothing is under way: it wakes when the interval's
/// next epoch is due (`EpochCoordinator::next_start_ms`), or after this long (a cluster's
/// participant, whose epochs the leader starts; uploads and collection, on timers of seconds;
/// metrics gauges). An idle node woke the driver 1,000 times a second with a 1 ms tick, about
/// 120 with a 10 ms one (`scripts/bench-idle.sh`).
const IDLE_TICK: Duration = Duration::from_millis(100);

/// When outputs that want a commit soon (see [`Router::want_commit_soon`]) ask for an epoch.
/// Outputs are known by the epoch they are held in, not by time: in a cluster a shard may cut
/// an epoch on a peer's marker before this node's barrier for it, and hold the next outputs
/// in the epoch after it.
#[derive(Debug, Default)]
struct CommitSoon {
    /// The epoch whose barrier the shards were last sent.
    last_barrier: u64,
    /// Since when (ms, monotonic) an output has been seen in an epoch not started yet.
    since: Option<u64>,
}

/// What [`CommitSoon::poll`] found.
#[derive(Debug, PartialEq, Eq)]
enum Soon {
    /// Nothing waits, or not for long yet.
    Wait,
    /// The newest output's epoch started: forget the outputs held until then.
    Covered,
    /// Ask for an epoch (again after [`COMMIT_SOON_MS`], until one starts).
    Due,
}

impl CommitSoon {
    /// The shards were told to cut `epoch`. (After a rollback epochs go on after its base,
    /// which may be below an epoch a shard cut early in the old generation: an output held in
    /// an epoch of that number asks until the number comes round again, an epoch every
    /// `COMMIT_SOON_MS` at most.)
    fn barrier(&mut self, epoch: u64) {
        self.last_barrier = epoch;
        self.since = None;
    }

    /// `held`: the newest epoch an output wanting a commit soon is held in (0: none); `now`:
    /// ms, monotonic.
    fn poll(&mut self, held: u64, now: u64) -> Soon {
        if held == 0 {
            return Soon::Wait;
        }
        if self.last_barrier >= held {
            self.since = None;
            return Soon::Covered;
        }
        let since = *self.since.get_or_insert(now);
        if now.saturating_sub(since) >= COMMIT_SOON_MS {
            self.since = Some(now);
            return Soon::Due;
        }
        Soon::Wait
    }
}

/// A nonce for this process's writer id.
fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    h.finish()
}

/// How long a participant in a cluster waits at shutdown for its last epoch to commit.
const FINISH_IN_CLUSTER: Duration = Duration::from_secs(5);

use super::upload::INLINE_MAX;

/// Starts the driver on a thread of its own (see the end of this function), which ends after
/// `Stop` or with the current tokio runtime; the tasks it spawns (uploads, loads, maintenance)
/// run on that runtime.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    config: &crate::config::NodeConfig,
    cp: Option<CheckpointStore>,
    store: Store,
    router: Router,
    shards: Vec<Addr<Shard>>,
    committed: u64,
    last_manifest: Option<u64>,
    force_full: bool,
    initial_pending: Vec<(u32, PendingMessage)>,
    events: mpsc::UnboundedSender<DriverEvent>,
    rx: mpsc::UnboundedReceiver<DriverEvent>,
    status: StatusHandle,
    owned: Vec<u32>,
    cluster: Option<(statemesh_mesh::placement::NodeId, EpochOut, bool)>,
    log: Option<(
        Arc<statemesh_mesh::epochlog::EpochLog>,
        Arc<std::sync::atomic::AtomicBool>,
    )>,
) -> std::thread::JoinHandle<()> {
    let interval = if cp.is_some() {
        config.checkpoint.interval_ms
    } else {
        config.flush_interval_ms
    };
    let n = shards.len();
    let (atx, arx) = std::sync::mpsc::channel::<(u64, Option<Arc<NodeEpoch>>)>();
    // With checkpoints, sled is a cache of blob storage: apply at most once a second. Without,
    // sled is all there is: apply every epoch (`flush_interval_ms`).
    let coalesce = if cp.is_some() {
        Duration::from_millis(config.checkpoint.apply_interval_ms)
    } else {
        Duration::ZERO
    };
    let applier_thread = {
        let (store, router, events) = (store.clone(), router.clone(), events.clone());
        std::thread::Builder::new()
            .name("statemesh-apply".into())
            .spawn(move || applier(store, router, events, arx, coalesce, committed))
            .expect("spawn the applier thread")
    };
    router.set_applier(applier_thread.thread().clone());
    router.set_applied(committed);
    {
        let mut s = status.lock();
        s.enabled = cp.is_some();
        s.committed = committed;
        s.started = committed;
        s.applied = committed;
    }
    let clustered = cluster.as_ref().is_some_and(|c| c.2);
    let log = log.filter(|_| cp.is_some()).map(|(log, busy)| {
        let l = LogSide {
            log,
            active: !clustered,
            uploading: false,
            last_upload: Instant::now(),
            retry_at: None,
            failures: 0,
            interval: Duration::from_millis(config.checkpoint.upload_interval_ms),
            upload_bytes: config.checkpoint.upload_bytes,
            max_bytes: config.checkpoint.log_max_bytes,
            full: None,
            busy,
            flush: Vec::new(),
            shown: (usize::MAX, u64::MAX),
        };
        l.publish_busy();
        l
    });
    status.lock().log = log.as_ref().map(|l| LogStatus {
        active: l.active,
        uploaded: last_manifest,
        ..Default::default()
    });
    let coord: Box<dyn EpochCoordinator> = if clustered {
        Box::new(Participant::new(
            n,
            config.checkpoint.max_uncommitted,
            committed,
            committed,
        ))
    } else {
        Box::new(Coordinator::new(
            n,
            interval,
            config.checkpoint.max_uncommitted,
            committed,
        ))
    };
    let mut d = Driver {
        coord,
        events,
        cp,
        store,
        router,
        shards,
        opts: Options {
            node_id: config.checkpoint.node_id.clone(),
            writer: format!("{}/{:016x}", config.checkpoint.node_id, rand_nonce()),
            retain: config.checkpoint.retain,
            full_min: config.checkpoint.full_snapshot_min_bytes,
            full_max_epochs: config.checkpoint.full_snapshot_max_epochs.max(1),
            gc_every: config.checkpoint.gc_every.max(1),
            gc_min_interval: Duration::from_millis(config.checkpoint.gc_min_interval_ms),
        },
        cuts: BTreeMap::new(),
        built: BTreeMap::new(),
        objects: BTreeMap::new(),
        started_at: BTreeMap::new(),
        last_manifest,
        unlisted_full: None,
        listing: None,
        maintenance_running: false,
        bytes_since_full: 0,
        last_full_bytes: 0,
        force_full,
        commits_since_gc: 0,
        last_was_gc: false,
        full_wanted_at: None,
        epochs_since_full: 0,
        last_gc: None,
        applier: Some(atx),
        applier_thread: Some(applier_thread),
        rt: tokio::runtime::Handle::current(),
        finish: Vec::new(),
        status,
        coord_params: (n, interval, config.checkpoint.max_uncommitted),
        last_pending: LastPending::Recovered(initial_pending),
        consumed: BTreeMap::new(),
        rolling_back: None,
        last_released: committed,
        last_logged: None,
        loaded: owned.iter().copied().collect(),
        members: Arc::new(Vec::new()),
        key_groups: config.key_groups,
        early_cuts: Vec::new(),
        reconfiguring: None,
        handing: false,
        sled_rewrites: 0,
        shard_gen: crate::shard::FIRST_GENERATION,
        rollbacks: 0,
        log,
        commit_after_upload: None,
        coord_backpressure: None,
        soon: CommitSoon::default(),
        cluster: cluster.map(|(me, out, active)| ClusterSide {
            me,
            out,
            active,
            gen: 0,
            leader: None,
            holding: active,
            hold_pending: false,
            deferred: Vec::new(),
            listing_epoch: None,
            waiting_resume: None,
            cut_gen: 0,
            move_snapshot: None,
            broken: None,
            reset_sent: None,
        }),
    };
    // The driver's loop runs on a thread of its own, and appends to the epoch log there (the
    // commit point: nothing else it could do meanwhile commits sooner). On the node's
    // multi-threaded runtime, each of its wake-ups (a caller waiting, a cut, an append in the
    // blocking pool and its completion) cost thread hand-offs: a durable one-way `Send` from
    // one client took 0.42 ms p50 and 290 us of node CPU, 0.36-0.37 ms and 230-243 us here.
    let (keep, runtime_gone) = oneshot::channel::<()>();
    d.rt.spawn(async move {
        let _keep = keep;
        std::future::pending::<()>().await
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the epoch driver's runtime");
    std::thread::Builder::new()
        .name("statemesh-epochs".into())
        .spawn(move || rt.block_on(async move { d.run(rx, runtime_gone).await }))
        .expect("the epoch driver's thread")
}

/// Applies committed epochs to sled, in order, then records them as applied. Epochs that
/// commit within `coalesce` (`checkpoint.apply_interval_ms`) of each other are merged and
/// written once (a key written in
/// several of them is written once): sled may lag the commits by that much, which recovery
/// makes up from blob storage.
fn applier(
    store: Store,
    router: Router,
    events: mpsc::UnboundedSender<DriverEvent>,
    rx: std::sync::mpsc::Receiver<(u64, Option<Arc<NodeEpoch>>)>,
    coalesce: Duration,
    mut last_applied: u64,
) {
    // Jobs received while a failed write was being retried.
    let mut stash: VecDeque<(u64, Option<Arc<NodeEpoch>>)> = VecDeque::new();
    let mut closed = false;
    loop {
        let first = match stash.pop_front() {
            Some(j) => j,
            None if closed => return,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut jobs = vec![first];
        jobs.extend(stash.drain(..));
        // The merge window: epochs committed meanwhile wait in the channel. It ends early when
        // asked (`Router::want_apply` unparks this thread) or when the driver is gone (it
        // unparks it too, after dropping its sender).
        let deadline = Instant::now() + coalesce;
        loop {
            // The request first, then the jobs: a caller sends its epoch before it asks
            // (`Finish`, passivation), so a request seen here finds its epoch in the drain
            // after it. The other way round, an epoch sent between the drain and the look at
            // the request would wait a whole new window.
            let wanted = router.take_apply_wanted();
            if !take_jobs(&rx, &mut jobs) {
                closed = true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if closed || left.is_zero() || wanted {
                break;
            }
            std::thread::park_timeout(left);
        }
        let epoch = jobs.last().map(|j| j.0).unwrap_or(0);
        // The durable marker names the newest epoch that changed something: epochs without
        // changes may have no manifest, and the marker must never be ahead of blob storage.
        let marker = jobs.iter().filter(|j| j.1.is_some()).map(|j| j.0).max();
        let epochs: Vec<Arc<NodeEpoch>> = jobs.into_iter().filter_map(|j| j.1).collect();
        // A failed write is retried with the same epochs until it succeeds: neither `applied`
        // nor the durable marker may pass an epoch sled does not hold (passivation would
        // reload stale state, a full snapshot labelled past it would lose it, and a restart
        // from sled would skip it). Only at shutdown does it give up, the marker behind, so
        // that recovery re-applies those epochs from blob storage.
        let mut delay = Duration::from_millis(20);
        let mut attempts = 0u32;
        let result = loop {
            let r = match marker {
                None => Ok(()),
                Some(marker) => crate::failpoint::eval("checkpoint-sled-apply")
                    .and_then(|()| apply_to_sled(&store, &epochs))
                    .and_then(|()| crate::failpoint::eval("checkpoint-sled-marker"))
                    .and_then(|()| store.set_applied(marker).map_err(|err| err.to_string())),
            };
            let Err(err) = r else { break Ok(()) };
            attempts += 1;
            router.metrics().store_errors.inc();
            tracing::error!(epoch, attempts, error = %err, "applying committed epochs to sled failed; retrying (they stay in blob storage)");
            let _ = events.send(DriverEvent::Applied {
                epoch: last_applied,
                result: Err(err.clone()),
            });
            loop {
                match rx.try_recv() {
                    Ok(j) => stash.push_back(j),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed && attempts >= 5 {
                break Err(err);
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        };
        match result {
            Ok(()) => {
                last_applied = epoch;
                router.set_applied(epoch);
                let _ = events.send(DriverEvent::Applied { epoch, result });
            }
            Err(_) => {
                tracing::error!(epoch, "stopping with committed epochs not in sled; recovery re-applies them from blob storage");
                return;
            }
        }
    }
}

/// Moves what waits in `rx` to `jobs`; false once the driver's sender is gone.
fn take_jobs(
    rx: &std::sync::mpsc::Receiver<(u64, Option<Arc<NodeEpoch>>)>,
    jobs: &mut Vec<(u64, Option<Arc<NodeEpoch>>)>,
) -> bool {
    loop {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(std::sync::mpsc::TryRecvError::Empty) => return true,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
        }
    }
}

/// Writes the merged changes of committed epochs (oldest first; later writes win).
fn apply_to_sled(store: &Store, epochs: &[Arc<NodeEpoch>]) -> Result<(), String> {
    if let [e] = epochs {
        let ops = e.key_groups.iter().flat_map(|s| {
            s.puts
                .iter()
                .map(|p| (p.key.as_slice(), Some(p.value.as_slice())))
                .chain(s.deletes.iter().map(|k| (k.as_slice(), None)))
        });
        return store.write_ops(ops).map_err(|e| e.to_string());
    }
    let mut merged: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
    for e in epochs {
        for s in &e.key_groups {
            for p in &s.puts {
                merged.insert(&p.key, Some(&p.value));
            }
            for k in &s.deletes {
                merged.insert(k, None);
            }
        }
    }
    store
        .write_ops(merged.into_iter())
        .map_err(|e| e.to_string())
}

/// Builds a node's epoch object from its shards' cuts (later writes of a key win).
/// Whether a local-store key is one only its key group's owner writes: a state entry, a
/// delayed message, an idempotency record or a pending message record (egress records are
/// deleted by whoever read them).
fn owner_key(k: &[u8]) -> bool {
    matches!(k.first(), Some(b's' | b't' | b'i' | b'p'))
}

/// A node's part of `epoch` from its shards' cuts; `version` gives the node's ownership
/// version of a key group, recorded on the sections with an owner's changes.
fn build(epoch: u64, node: &str, cuts: Vec<ShardCut>, version: impl Fn(u32) -> u64) -> NodeEpoch {
    type Changes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;
    let mut kgs: BTreeMap<u32, (Changes, Vec<PendingMessage>)> = BTreeMap::new();
    for c in cuts {
        for (k, v) in c.ops.into_iter().map(Change::encode) {
            let Some(kg) = key_group_of(&k) else {
                tracing::error!(key = ?k, "local-store key without a key group; not checkpointed");
                continue;
            };
            kgs.entry(kg).or_default().0.insert(k, v);
        }
        for (kg, m) in c.pending {
            kgs.entry(kg).or_default().1.push(m);
        }
    }
    let key_groups = kgs
        .into_iter()
        .map(|(kg, (entries, pending))| {
            let mut s = KeyGroupSection {
                key_group: kg,
                full: false,
                pending,
                ..Default::default()
            };
            if entries.keys().any(|k| owner_key(k)) {
                s.version = version(kg);
            }
            for (key, v) in entries {
                match v {
                    Some(value) => s.puts.push(Entry { key, value }),
                    None => s.deletes.push(key),
                }
            }
            s
        })
        .collect();
    NodeEpoch {
        epoch,
        node: node.to_string(),
        key_groups,
    }
}

/// However the driver's loop ends (a `Stop`, or the node's runtime gone), the applier is told
/// at once, not at the end of its merge window: it writes what it holds and ends.
impl Drop for Driver {
    fn drop(&mut self) {
        self.release_applier();
    }
}

impl Driver {
    /// Drops the applier's sender and wakes it: it writes what it holds and ends, without
    /// waiting out its merge window.
    fn release_applier(&mut self) {
        self.applier = None;
        self.router.want_apply();
    }

    /// The driver's loop, until `Stop`, or until the node's runtime is gone (`runtime_gone`
    /// resolves when a task parked there is dropped with it: a node dropped without a
    /// shutdown does not leave its driver running).
    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<DriverEvent>,
        mut runtime_gone: oneshot::Receiver<()>,
    ) {
        let router = self.router.clone();
        let placement = router.placement().clone();
        let mut ticker = crate::ticker::Ticker::new(BUSY_TICK);
        loop {
            // The next tick: 1 ms after the last one while anything is under way, else when
            // the next interval epoch is due (what starts work meanwhile wakes the loop: an
            // event, a caller, an output that wants a commit soon).
            ticker.arm(self.tick_period(ticker.since_last()));
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(DriverEvent::Stop(done)) => {
                        // The applier ends once it has written what it holds; then nothing
                        // here uses the store any more.
                        self.release_applier();
                        if let Some(t) = self.applier_thread.take() {
                            let _ = tokio::task::spawn_blocking(move || t.join()).await;
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(ev) => self.event(ev),
                    None => return,
                },
                _ = ticker.tick() => {
                    self.tick();
                    self.gauges();
                }
                // A caller waits: start its epoch now rather than at the next tick.
                _ = router.commit_wanted() => self.tick(),
                // An output wants a commit soon, or messages between functions were lost (in
                // a cluster): ticks every 1 ms again (next round).
                _ = router.commit_soon_asked() => {}
                _ = placement.fn_broken_set() => {}
                _ = &mut runtime_gone => return,
            }
        }
    }

    /// How long after a tick the next one comes: [`BUSY_TICK`] while anything is under way
    /// that ticks move on (an epoch open, a caller waiting for one that no tick has started
    /// yet (one that asked during a rollback), outputs waiting for a commit soon, messages
    /// between functions lost, a rollback, a finish, a cluster's synchronisation);
    /// [`UPLOAD_TICK`] while the epoch log is being uploaded, flushed or over its bound; else
    /// 1 ms after the interval's next epoch is due, [`IDLE_TICK`] at most. Nothing else is due
    /// sooner while idle: uploads and collection (seconds) and metrics gauges; the rest wakes
    /// the loop (events, callers waiting for a commit, outputs wanting one soon, messages
    /// between functions lost). `since_last`: how long ago the last tick came.
    fn tick_period(&self, since_last: Duration) -> Duration {
        let busy = self.coord.started() > self.coord.committed()
            || self.router.commit_wanted_now()
            || self.router.commit_soon() != 0
            || self.rolling_back.is_some()
            || !self.finish.is_empty()
            || self.cluster.as_ref().is_some_and(|c| {
                (c.active
                    && (self.router.placement().fn_broken()
                        || (c.broken.is_some() && c.reset_sent != Some(c.gen))))
                    || c.holding
                    || c.hold_pending
                    || c.waiting_resume.is_some()
                    || !c.deferred.is_empty()
                    || c.move_snapshot.is_some()
            });
        if busy {
            return BUSY_TICK;
        }
        if self
            .log
            .as_ref()
            .is_some_and(|l| l.uploading || !l.flush.is_empty() || l.full.is_some())
        {
            return UPLOAD_TICK;
        }
        crate::ticker::until_due(
            since_last,
            self.coord.next_start_ms(),
            now_ms(),
            BUSY_TICK,
            IDLE_TICK,
        )
    }

    fn tick(&mut self) {
        self.maybe_upload();
        if self.rolling_back.is_some() {
            return;
        }
        let wanted =
            self.router.take_commit_wanted() || !self.finish.is_empty() || self.commit_soon_due();
        if let Some((from, msg)) = self.cluster.as_mut().and_then(|c| c.waiting_resume.take()) {
            self.epoch_msg(from, msg);
        }
        let shard_gen = self.shard_gen;
        let taken = if self.cluster.as_ref().is_some_and(|c| c.active) {
            self.router.placement().take_fn_broken()
        } else {
            None
        };
        if let Some(c) = self.cluster.as_mut().filter(|c| c.active) {
            if wanted && !c.holding {
                if let Some(l) = c.leader {
                    c.send(l, EpochMsg::Wanted { gen: c.gen });
                }
            }
            // Messages between functions may have been lost: every participant goes back to
            // the last committed epoch. Kept until a rollback takes the shards to a newer
            // generation (which makes up for them); asked for once not holding (the leader
            // may resume everyone live, keeping the generation whose messages were lost),
            // and again in each newer generation of the leader's until then.
            if taken.is_some() {
                c.broken = c.broken.max(taken);
            }
            match c.broken {
                Some(g) if g < shard_gen => {
                    tracing::debug!(
                        generation = g,
                        shard_generation = shard_gen,
                        "a stream of an older generation broke: a rollback since made up for it"
                    );
                    c.broken = None;
                    c.reset_sent = None;
                }
                Some(g) if !c.holding && c.reset_sent != Some(c.gen) => {
                    if let Some(l) = c.leader {
                        tracing::info!(
                            generation = g,
                            "messages between functions may have been lost: asking the leader to synchronise the participants (they go back to the last committed epoch)"
                        );
                        c.send(l, EpochMsg::Reset { gen: c.gen });
                        c.reset_sent = Some(c.gen);
                    }
                }
                _ => {}
            }
        } else if wanted {
            self.input(Input::CallerWaiting);
        }
        self.input(Input::Tick { now_ms: now_ms() });
    }

    /// Whether outputs that want a commit soon have waited [`COMMIT_SOON_MS`] with no epoch
    /// starting after them.
    fn commit_soon_due(&mut self) -> bool {
        let held = self.router.commit_soon();
        match self.soon.poll(held, crate::mesh::mono_ms()) {
            Soon::Wait => false,
            Soon::Covered => {
                self.router.clear_commit_soon(held);
                false
            }
            Soon::Due => true,
        }
    }

    fn gauges(&self) {
        let m = self.router.metrics();
        let open = self.coord.started() - self.coord.committed();
        m.checkpoint_backlog.set(open as i64);
        let last = self.status.lock().last_commit_ms;
        m.checkpoint_commit_lag_ms.set(if open > 0 && last > 0 {
            now_ms().saturating_sub(last) as i64
        } else {
            0
        });
    }

    fn input(&mut self, i: Input) {
        for a in self.coord.handle(i) {
            self.action(a);
        }
    }

    fn event(&mut self, ev: DriverEvent) {
        match ev {
            DriverEvent::Cut(c) => {
                let rb = self
                    .rolling_back
                    .as_ref()
                    .map(|rb| (rb.shards_told, rb.base));
                match cut_fate(rb, self.shard_gen, c.generation, c.epoch) {
                    CutFate::Take => {
                        let (epoch, shard) = (c.epoch, c.shard);
                        self.cuts.entry(epoch).or_default().push(c);
                        self.input(Input::ShardCut { epoch, shard });
                    }
                    CutFate::AfterRollback => self.early_cuts.push(c),
                    CutFate::Drop => tracing::debug!(
                        epoch = c.epoch,
                        shard = c.shard,
                        generation = c.generation,
                        shards = self.shard_gen,
                        "a cut of an abandoned epoch dropped"
                    ),
                }
            }
            // A write of an abandoned epoch is dropped (during the rollback, or after it if
            // it took longer: its epoch's number may be given again).
            DriverEvent::Written {
                epoch, rollbacks, ..
            } if self.rolling_back.is_some() || rollbacks != self.rollbacks => {
                tracing::debug!(epoch, "a write of an abandoned epoch dropped");
            }
            DriverEvent::Written { epoch, result, .. } => match result {
                Ok(obj) => {
                    if let Some(o) = &obj {
                        self.router.metrics().checkpoint_bytes.inc_by(o.size);
                        self.bytes_since_full += o.size;
                    }
                    // Only with checkpoints: without them outputs are not held and cuts keep
                    // no pending messages, so there is nothing consistent to go back to.
                    let rollback = match self.cp {
                        Some(_) => crate::failpoint::eval("checkpoint-rollback"),
                        None => Ok(()),
                    };
                    if let Err(e) = rollback {
                        tracing::warn!(epoch, "{e}");
                        match self.cluster.as_ref().filter(|c| c.active) {
                            // Every participant rolls back together: the leader decides.
                            Some(c) => {
                                if let Some(l) = c.leader {
                                    c.send(l, EpochMsg::Reset { gen: c.gen });
                                }
                            }
                            None => {
                                let (to, base) = (self.coord.committed(), self.coord.started());
                                self.begin_rollback(to, base, None, None);
                            }
                        }
                        return;
                    }
                    self.objects.insert(epoch, obj);
                    self.input(Input::Written { epoch });
                }
                Err(e) => self.failed(epoch, e),
            },
            DriverEvent::Committed {
                epoch,
                result,
                logged,
            } => {
                // A manifest was written (not an append to the epoch log, nor an empty epoch):
                // only then is a snapshot being listed this commit's (an upload of the epoch
                // log, which may run meanwhile, lists its own: `uploaded`).
                let manifest = self.objects.get(&epoch).is_some_and(|o| o.is_some());
                if let Some(n) = logged {
                    self.last_logged = Some((epoch, n));
                }
                match result {
                    Ok(stored) => {
                        if manifest {
                            self.last_manifest = Some(epoch);
                        }
                        // One commit is in flight at a time: a listed snapshot is in this one,
                        // unless the manifest stored is an earlier attempt's that did not list it.
                        if let Some((obj, label)) = self.listing.take_if(|_| manifest) {
                            if stored
                                .as_ref()
                                .is_none_or(|m| m.objects.iter().any(|o| o.path == obj.path))
                            {
                                self.status.lock().last_full = Some((label, obj.size));
                            } else {
                                self.unlisted_full = Some((obj, label));
                            }
                        }
                        self.input(Input::Committed { epoch });
                        // Group commit: the next epoch may start right away.
                        self.tick();
                        self.maybe_held();
                    }
                    Err(e) => {
                        // The full snapshot stays unlisted until a manifest lists it (this
                        // commit's; not an upload's in flight).
                        if let Some(full) = self.listing.take_if(|_| manifest) {
                            self.unlisted_full = Some(full);
                        }
                        self.failed(epoch, e)
                    }
                }
            }
            DriverEvent::Applied { epoch, result } => {
                {
                    let mut s = self.status.lock();
                    s.applied = epoch;
                    if let Err(e) = result {
                        s.last_error = Some(format!("applying epoch {epoch} to sled: {e}"));
                    }
                }
                let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.finish)
                    .into_iter()
                    .partition(|(target, _)| epoch >= *target);
                self.finish = keep;
                for (_, tx) in done {
                    let _ = tx.send(Some(epoch));
                }
                self.continue_rollback();
                self.continue_reconfigure();
                self.maintain();
            }
            DriverEvent::Handed(r) => self.handed(r),
            DriverEvent::Uploaded(r) => self.uploaded(r),
            DriverEvent::LeaveLog => self.leave_log(),
            DriverEvent::UploadLog(tx) => match self.log.as_mut() {
                Some(l) => {
                    l.flush.push(tx);
                    l.retry_at = None;
                    self.maybe_upload();
                }
                None => {
                    let _ = tx.send(Ok(()));
                }
            },
            DriverEvent::HandedOver { at } => self.handed_over(at),
            DriverEvent::RolledBack => self.end_rollback(),
            DriverEvent::Epoch { from, msg } => self.epoch_msg(from, msg),
            DriverEvent::CaughtUp(r) => match r {
                Ok(l) => {
                    if let Some(rb) = self.rolling_back.as_mut() {
                        rb.catching_up = false;
                        rb.owned_checked = true;
                        rb.extra = l.extra;
                        // Committed epochs read back in place of its own (not only the
                        // pending messages of the committed one).
                        let replaced = l.replaced.is_some() && rb.catch_up.is_some();
                        if let Some(pending) = l.replaced {
                            rb.catch_up = None;
                            rb.wait = rb.to;
                            self.last_released = rb.to;
                            self.status.lock().applied = rb.to;
                            self.router.set_applied(rb.to);
                            self.last_pending = LastPending::Recovered(pending);
                        }
                        self.loaded = l.owned;
                        for e in &l.committed_reads {
                            if let Some(keys) = self.consumed.remove(e) {
                                self.router.egress().released(&keys);
                            }
                        }
                        // Records of the key groups gained, and of the epochs read back in
                        // place of this node's own (it had not released them: their records
                        // are in sled now, not yet in the queues).
                        let mut restore: std::collections::BTreeSet<u32> =
                            l.gained.iter().copied().collect();
                        if replaced {
                            restore.extend(self.loaded.iter().copied());
                        }
                        self.move_egress(&l.lost, &restore);
                        self.continue_rollback();
                    }
                }
                Err(e) => {
                    // Nothing this node acknowledged depends on it; without those epochs it
                    // cannot go on consistently.
                    tracing::error!(error = %e, "cannot read committed epochs from blob storage during a rollback; stopping the node (a restart recovers them)");
                    std::process::exit(3);
                }
            },
            DriverEvent::Maintenance(r) => {
                self.maintenance_running = false;
                match r {
                    Ok(Maintenance::Full {
                        object,
                        label,
                        partial,
                        rewrites,
                    }) if rewrites != self.sled_rewrites => {
                        // Sled was being rewritten during the scan (a key group cleared or
                        // rebuilt under it): the object may not reflect `label`. Never listed
                        // (garbage collection deletes it); taken again later.
                        tracing::info!(
                            label,
                            partial,
                            path = %object.path,
                            "a full snapshot scanned while key groups were rewritten in sled is dropped"
                        );
                        if let Some(m) = self
                            .cluster
                            .as_mut()
                            .and_then(|c| c.move_snapshot.as_mut())
                            .filter(|_| partial)
                        {
                            m.started = false;
                        }
                    }
                    Ok(Maintenance::Full {
                        object,
                        label,
                        partial,
                        ..
                    }) => {
                        self.router.metrics().checkpoint_bytes.inc_by(object.size);
                        if partial {
                            if let Some(m) =
                                self.cluster.as_mut().and_then(|c| c.move_snapshot.as_mut())
                            {
                                m.path = Some(object.path.clone());
                            }
                            tracing::debug!(label, key_groups = ?object.full_key_groups, "snapshot of key groups about to move written");
                        } else {
                            self.full_wanted_at = None;
                            self.last_full_bytes = object.size;
                            self.bytes_since_full = 0;
                            self.epochs_since_full = 0;
                            self.force_full = false;
                        }
                        self.unlisted_full = Some((object, label));
                    }
                    Ok(Maintenance::Gc(report)) => {
                        tracing::debug!(?report, "checkpoint garbage collection");
                    }
                    Err(e) => {
                        if let Some(m) =
                            self.cluster.as_mut().and_then(|c| c.move_snapshot.as_mut())
                        {
                            m.started = false;
                        }
                        self.router.metrics().checkpoint_failures.inc();
                        tracing::warn!(error = %e, "checkpoint maintenance failed; retried later");
                    }
                }
            }
            DriverEvent::Stop(_) => unreachable!("handled by run"),
            DriverEvent::Finish(tx) => {
                // No waiting for the applier's merge window (for the epochs committed so far;
                // the last one asks again when it is released).
                self.router.want_apply();
                if let Some(c) = self.cluster.as_ref().filter(|c| c.active) {
                    // Epochs need the leader (which may be stopping too): a node that takes
                    // no part in them answers at once, a participant waits a little.
                    if c.holding
                        || c.leader.is_none()
                        || self.router.placement().owned(self.key_groups).is_empty()
                    {
                        if c.leader.is_none() {
                            tracing::warn!(
                                committed = self.last_released,
                                "no leader of the cluster's epochs is known: the last epoch is not committed; what this node took since is recovered from the last commit and replayed"
                            );
                        }
                        let _ = tx.send(c.leader.map(|_| self.last_released));
                        return;
                    }
                    let events = self.events.clone();
                    self.rt.spawn(async move {
                        tokio::time::sleep(FINISH_IN_CLUSTER).await;
                        let _ = events.send(DriverEvent::FinishTimeout);
                    });
                }
                // Everything accepted so far is in the next epoch to start.
                self.finish.push((self.coord.started() + 1, tx));
            }
            DriverEvent::FinishTimeout => {
                if !self.finish.is_empty() {
                    tracing::warn!(
                        committed = self.last_released,
                        "the last epoch did not commit within {} s (the cluster's leader may be stopping or gone); what this node took since is recovered from the last commit and replayed",
                        FINISH_IN_CLUSTER.as_secs()
                    );
                }
                for (_, tx) in std::mem::take(&mut self.finish) {
                    let _ = tx.send(None);
                }
            }
        }
    }

    /// Abandons the epochs after the last committed one: ingress is refused, sled catches up
    /// with the committed epoch, then every shard drops what it did since
    /// ([`continue_rollback`](Self::continue_rollback)) and the committed epoch's pending
    /// messages are delivered again ([`end_rollback`](Self::end_rollback)). Called with no
    /// commit in flight (epochs commit one at a time; this is decided before the next).
    fn begin_rollback(&mut self, to: u64, base: u64, behind: Option<u64>, manifest: Option<u64>) {
        let several = self.members.len() > 1;
        self.begin_rollback_as(to, base, behind, manifest, None, several)
    }

    /// [`begin_rollback`](Self::begin_rollback); `join_live`: see [`RollingBack`].
    fn begin_rollback_as(
        &mut self,
        to: u64,
        base: u64,
        behind: Option<u64>,
        manifest: Option<u64>,
        join_live: Option<u64>,
        several: bool,
    ) {
        debug_assert!(self.cp.is_some(), "a rollback needs checkpoints");
        self.sled_rewrites += 1;
        self.rollbacks += 1;
        tracing::warn!(
            committed = to,
            abandoned = ?(to + 1..=base),
            "rolling back to the last committed epoch"
        );
        self.router.set_rolling_back(Some(format!(
            "the node is rolling back to its last committed epoch {to}; retry"
        )));
        // An abandoned epoch may be in the epoch log already (its append was durable, then a
        // later step failed and the epoch was abandoned before it was released): it must not
        // be uploaded, nor found at a restart.
        if let Some(l) = &self.log {
            if let Err(e) = l.log.discard_after(to) {
                tracing::error!(error = %e, "cannot drop abandoned epochs from the epoch log; stopping");
                eprintln!("statemesh: cannot drop abandoned epochs from the epoch log: {e}");
                std::process::exit(3);
            }
        }
        // A live move under way is abandoned: the shards drop what they stopped, and the
        // key groups are served by the table again.
        self.reconfiguring = None;
        self.router.placement().set_moving(None);
        // Numbers between the last epoch released here and `to` were abandoned, unless a
        // manifest after it exists (the leader committed epochs this node did not release).
        let own = self.last_released;
        let catch_up = behind.filter(|&m| m > own).map(|m| (own, m));
        self.rolling_back = Some(RollingBack {
            to,
            base,
            join_live,
            shards_told: false,
            wait: own.min(to),
            catch_up,
            catching_up: false,
            manifest,
            owned_checked: false,
            extra: Vec::new(),
            since: Instant::now(),
            gen: self.cluster.as_ref().filter(|c| c.active).map(|c| c.gen),
            several,
        });
        self.router.want_apply();
        self.continue_rollback();
    }

    /// Once sled holds the committed epoch: the shards roll back, then the pending messages
    /// are replayed (in a task; it reports [`DriverEvent::RolledBack`]).
    fn continue_rollback(&mut self) {
        let carried = match self.rolling_back.as_ref() {
            Some(rb) if !rb.owned_checked => self.carried(),
            _ => Vec::new(),
        };
        let Some(rb) = self.rolling_back.as_mut() else {
            return;
        };
        if rb.shards_told || rb.catching_up || self.handing || self.status.lock().applied < rb.wait
        {
            return;
        }
        if !rb.owned_checked {
            // Sled holds this node's own committed epochs: key groups it gained (a move)
            // and committed epochs it missed (it restarted as the leader committed them) come
            // from blob storage; key groups it lost are dropped from sled.
            let now: std::collections::BTreeSet<u32> = self
                .router
                .placement()
                .owned(self.key_groups)
                .into_iter()
                .collect();
            let gained: Vec<u32> = now.difference(&self.loaded).copied().collect();
            let lost: Vec<u32> = self.loaded.difference(&now).copied().collect();
            // With several participants, a key group's pending messages at the committed epoch
            // are in every participant's part (its own inboxes; messages others kept for it or
            // logged in flight while rerouting them): the owner reads them all.
            let several = rb.several || self.members.len() > 1;
            // Key groups whose owner takes no part now (the leader left it out: it did not
            // answer): the participant with the lowest id carries their pending messages at the
            // committed epoch (its shards keep them parked, in every cut) until the owner is
            // back and reads them from its parts. Every committed epoch's parts hold every
            // pending message, whoever is absent.
            if rb.catch_up.is_some()
                || !gained.is_empty()
                || !lost.is_empty()
                || several
                || !carried.is_empty()
            {
                rb.catching_up = true;
                let keep: Vec<u32> = now
                    .difference(&gained.iter().copied().collect())
                    .copied()
                    .collect();
                let (cp, store, to, behind, manifest) = (
                    self.cp.clone().expect("a rollback needs checkpoints"),
                    self.store.clone(),
                    rb.to,
                    rb.catch_up,
                    rb.manifest,
                );
                // Open epochs of this node that removed egress records read here: whether
                // each committed decides whether its readers get their records (or, for key
                // groups this node loses, the new owner does).
                let reads: Vec<(u64, String)> = self
                    .consumed
                    .range(..=to)
                    .filter_map(|(e, _)| {
                        let o = self.objects.get(e).cloned().flatten()?;
                        Some((*e, o.path))
                    })
                    .collect();
                if !gained.is_empty() || !lost.is_empty() {
                    tracing::info!(gained = gained.len(), lost = lost.len(), manifest = ?manifest, "key groups moved: loading the ones gained from blob storage");
                }
                if !carried.is_empty() {
                    tracing::info!(
                        key_groups = carried.len(),
                        "carrying the pending messages of key groups whose owner takes no part now"
                    );
                }
                let events = self.events.clone();
                self.rt.spawn(async move {
                    let r = async {
                        store
                            .set_stale(lost.iter().copied(), true)
                            .and_then(|()| store.clear_key_groups(lost.iter().copied()))
                            .map_err(|e| e.to_string())?;
                        let replaced = match behind {
                            Some((own, m)) => {
                                Some(catch_up(&cp, &store, &keep, Some(own), to, m).await?)
                            }
                            None if several => Some(match manifest {
                                Some(m) if m == to => pending_at(&cp, m, &keep).await?,
                                // No manifest: every part was empty, nothing was pending.
                                _ => Vec::new(),
                            }),
                            None => None,
                        };
                        let mut extra = match manifest {
                            Some(m) => catch_up(&cp, &store, &gained, None, to, m).await?,
                            None => {
                                // Nothing committed yet: they are empty.
                                store
                                    .clear_key_groups(gained.iter().copied())
                                    .and_then(|()| store.set_stale(gained.iter().copied(), false))
                                    .map_err(|e| e.to_string())?;
                                Vec::new()
                            }
                        };
                        if let Some(m) = manifest.filter(|&m| m == to && !carried.is_empty()) {
                            extra.extend(pending_at(&cp, m, &carried).await?);
                        }
                        let mut committed_reads = Vec::new();
                        for (e, path) in reads {
                            if lists(&cp, e, &path, manifest).await? {
                                committed_reads.push(e);
                            }
                        }
                        Ok(Loaded {
                            replaced,
                            extra,
                            owned: now,
                            gained,
                            lost,
                            committed_reads,
                        })
                    }
                    .await;
                    let _ = events.send(DriverEvent::CaughtUp(r));
                });
                return;
            }
            rb.owned_checked = true;
        }
        rb.shards_told = true;
        let extra = std::mem::take(&mut rb.extra);
        let rb = rb.clone();
        let generation = match (rb.join_live, self.cluster.as_ref().filter(|c| c.active)) {
            // Taken in live: the others keep theirs.
            (Some(g), _) => g,
            // Every participant takes the leader's generation: messages between them of work
            // before the rollback are told apart. The one this rollback is for: a newer one
            // held meanwhile comes with its own `Resume` and base (shards in it with this
            // rollback's base would number their cuts apart from the others').
            (None, Some(c)) => rb.gen.unwrap_or(c.gen),
            (None, None) => self.router.next_generation(),
        };
        if generation == self.shard_gen && rb.join_live.is_some() {
            // A cut the shards made before this rollback cannot be told from one after it by
            // its generation (see `cut_fate`); none is known to come (its epoch is at most
            // the base), but say so if it happens.
            tracing::debug!(
                generation,
                "taken in live with the generation its shards have already"
            );
        }
        self.shard_gen = generation;
        let placement = self.router.placement().clone();
        let members = self.members.clone();
        let shards = self.shards.clone();
        let router = self.router.clone();
        let events = self.events.clone();
        // Each shard gets its share inside its `Rollback`, ahead of anything it can do
        // afterwards (fire a timer, take a message another shard sent after its rollback).
        let n = self.shards.len();
        let mut per_shard: Vec<Vec<(u32, PendingMessage)>> = (0..n).map(|_| Vec::new()).collect();
        // The key groups this node serves now (the new owner of a moved one replays its
        // pending messages, read from blob storage).
        match &self.last_pending {
            LastPending::Recovered(v) => {
                for (kg, m) in v.iter().filter(|(kg, _)| placement.is_local(*kg)) {
                    per_shard[self.router.shard_of(*kg)].push((*kg, m.clone()));
                }
            }
            LastPending::Epoch(b) => {
                for k in b
                    .key_groups
                    .iter()
                    .filter(|k| placement.is_local(k.key_group))
                {
                    for m in &k.pending {
                        per_shard[self.router.shard_of(k.key_group)].push((k.key_group, m.clone()));
                    }
                }
            }
        }
        for (kg, m) in extra {
            per_shard[self.router.shard_of(kg)].push((kg, m));
        }
        self.rt.spawn(async move {
            // Waiting calls fail first: a reply the replay produces finds nobody waiting (its
            // caller retries with its key), like after a restart.
            router.fail_calls(&crate::error::ServiceError::Unavailable(format!(
                "the node rolled back to its last committed epoch {}; retry with the same idempotency key",
                rb.to
            )));
            let _ = futures::future::join_all(shards.iter().zip(per_shard).map(|(s, pending)| {
                s.send(Rollback {
                    base: rb.base,
                    generation,
                    committed: rb.to,
                    pending: crate::node::envelopes(pending),
                    members: members.clone(),
                })
            }))
            .await;
            let _ = events.send(DriverEvent::RolledBack);
        });
    }

    /// The shards have rolled back: epochs start again after the abandoned ones.
    fn end_rollback(&mut self) {
        let Some(rb) = self.rolling_back.take() else {
            return;
        };
        let (n, interval, max) = self.coord_params;
        // Committed "up to" `base` for the numbering: nothing between `to` and `base` is
        // in blob storage's chain (the next manifest names `last_manifest`).
        self.coord = match &self.cluster {
            Some(c) if c.active => Box::new(Participant::new(n, max, rb.base, rb.base)),
            _ => Box::new(Coordinator::new(n, interval, max, rb.base)),
        };
        self.cuts.clear();
        self.built.clear();
        self.objects.clear();
        self.started_at.clear();
        for (_, keys) in std::mem::take(&mut self.consumed) {
            self.router.egress().return_consumed(keys);
        }
        let took = rb.since.elapsed();
        {
            let mut s = self.status.lock();
            s.rollbacks += 1;
            s.last_rollback_ms = Some(took.as_secs_f64() * 1e3);
            s.started = rb.base;
            s.backpressure = None;
        }
        self.router.metrics().checkpoint_rollbacks.inc();
        self.router.set_backpressure(None);
        self.router.set_rolling_back(None);
        tracing::warn!(
            committed = rb.to,
            next = rb.base + 1,
            ms = took.as_secs_f64() * 1e3,
            "rolled back to epoch {}; the pending messages of that epoch are replayed",
            rb.to
        );
        if let Some(full) = self.listing.take() {
            self.unlisted_full = Some(full);
        }
        if self.cluster.as_ref().is_some_and(|c| c.hold_pending) {
            self.coord.drain();
            self.maybe_held();
        }
        if let Some(c) = self
            .cluster
            .as_mut()
            .filter(|c| c.active && rb.gen.is_none_or(|g| g == c.gen))
        {
            c.holding = false;
            c.listing_epoch = None;
            if rb.join_live.is_some() {
                if let Some(l) = c.leader {
                    c.send(l, EpochMsg::Reconfigured { gen: c.gen });
                }
            }
            let deferred = std::mem::take(&mut c.deferred);
            for epoch in deferred {
                self.input(Input::Barrier { epoch });
            }
        }
        for c in std::mem::take(&mut self.early_cuts) {
            let (epoch, shard) = (c.epoch, c.shard);
            self.cuts.entry(epoch).or_default().push(c);
            self.input(Input::ShardCut { epoch, shard });
        }
    }

    /// A message of the cluster's epoch protocol.
    fn epoch_msg(&mut self, from: statemesh_mesh::placement::NodeId, msg: EpochMsg) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let gen = msg.gen();
        let (active, holding) = (c.active, c.holding);
        match msg {
            EpochMsg::Hold { .. } if gen > c.gen || (gen == c.gen && holding) => {
                if gen > c.gen {
                    // A live hand-over under way belongs to the generation that ends here: it
                    // is given up (its end must not release the hold of this one; this
                    // generation's `Resume` decides, and rolls back what it did).
                    if let Some(r) = self.reconfiguring.take() {
                        tracing::info!(
                            epoch = r.at,
                            gen,
                            "the leader synchronises again during a live hand-over: it is given up"
                        );
                    }
                }
                c.gen = gen;
                c.leader = Some(from);
                c.holding = true;
                c.deferred.clear();
                // The leader dropped the move that asked (a snapshot under way is still
                // listed: it is a valid one).
                if c.move_snapshot.as_ref().is_some_and(|m| m.gen < gen) {
                    c.move_snapshot = None;
                }
                if active {
                    let held = EpochMsg::Held {
                        gen,
                        committed: self.last_released,
                        cut: self.coord.started(),
                        shards: self.shards.len() as u32,
                        cut_gen: c.cut_gen,
                        shard_gen: self.shard_gen,
                    };
                    match crate::failpoint::eval_delay("mesh-held-answer") {
                        Ok(Some(ms)) => {
                            let out = c.out.clone();
                            let me = c.me;
                            self.rt.spawn(async move {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                let _ = out.send(crate::cluster::EpochRoute::Send {
                                    from: me,
                                    to: from,
                                    msg: held,
                                });
                            });
                        }
                        _ => c.send(from, held),
                    }
                } else {
                    // Alone until now: finish the open epochs (this node writes their
                    // manifests), start no more, then answer.
                    c.hold_pending = true;
                    self.coord.drain();
                    // The others read blob storage: the log goes there first.
                    self.leave_log();
                    self.maybe_held();
                }
            }
            EpochMsg::Stop { at, key_groups, .. }
                if gen == c.gen && active && !holding && self.rolling_back.is_none() =>
            {
                // Before answering: no shard can cut `at` before the leader has every answer.
                tracing::debug!(
                    at,
                    key_groups = key_groups.len(),
                    "key groups stop at the next cut for a move"
                );
                self.router
                    .placement()
                    .set_moving(Some(crate::mesh::Moving {
                        at,
                        key_groups: Arc::new(key_groups.into_iter().collect()),
                    }));
                c.send(from, EpochMsg::Stopping { gen });
            }
            m @ EpochMsg::Resume { .. }
                if gen == c.gen && holding && active && self.rolling_back.is_some() =>
            {
                // The rollback of an earlier generation is still under way: this one's
                // `Resume` is taken once it is done (see `tick`).
                tracing::debug!(
                    gen,
                    "resume of a newer generation waits for the rollback under way"
                );
                c.waiting_resume = Some((from, m));
            }
            EpochMsg::Resume {
                committed,
                base,
                manifest,
                roll_back,
                members,
                placement_version,
                release,
                live,
                shards_gen,
                ..
            } if gen == c.gen && holding && active && self.rolling_back.is_none() => {
                if self.router.placement().version() < placement_version {
                    // The key groups this node serves are decided by the table the leader
                    // resumed at: wait until it is applied here.
                    c.waiting_resume = Some((
                        from,
                        EpochMsg::Resume {
                            gen,
                            committed,
                            base,
                            manifest,
                            roll_back,
                            members,
                            placement_version,
                            release,
                            live,
                            shards_gen,
                        },
                    ));
                    return;
                }
                c.cut_gen = gen;
                if live {
                    self.resume_live(from, committed, base, manifest, members, shards_gen);
                } else {
                    // A live move given up: its shards may have stopped key groups, which only
                    // a rollback undoes.
                    let stopped = self.router.placement().moving().is_some();
                    self.router.placement().set_moving(None);
                    self.resume(
                        committed,
                        base,
                        manifest,
                        roll_back || stopped,
                        members,
                        release,
                    )
                }
            }
            EpochMsg::Barrier {
                epoch,
                quiesce,
                snapshot,
                ..
            } if gen == c.gen && active => {
                if !snapshot.is_empty() && c.move_snapshot.is_none() {
                    let owned: std::collections::BTreeSet<u32> = self
                        .router
                        .placement()
                        .owned(self.key_groups)
                        .into_iter()
                        .collect();
                    let mine: Vec<u32> = snapshot
                        .into_iter()
                        .filter(|kg| owned.contains(kg))
                        .collect();
                    if mine.is_empty() || self.cp.is_none() {
                        c.send(from, EpochMsg::Prepared { gen });
                    } else {
                        tracing::debug!(
                            key_groups = mine.len(),
                            "snapshotting the key groups about to move"
                        );
                        c.move_snapshot = Some(MoveSnapshot {
                            gen,
                            key_groups: mine,
                            started: false,
                            path: None,
                        });
                    }
                }
                if quiesce {
                    // Key groups move once this epoch commits: reads stop until the move.
                    self.router.egress().pause(true);
                }
                if self.rolling_back.is_some() || holding {
                    // The leader sends it after this generation's `Resume`, which is not
                    // done yet (a rollback, or a table version to apply first): cut it then.
                    c.deferred.push(epoch);
                } else {
                    self.input(Input::Barrier { epoch });
                }
                self.maintain();
            }
            EpochMsg::Committed { epoch, .. } if gen == c.gen && active => {
                self.input(Input::Committed { epoch });
            }
            _ => {}
        }
    }

    /// A `Hold` that waited for this node's own epochs: once none is open, the node hands its
    /// epochs to the leader (it becomes a participant) and answers.
    fn maybe_held(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if !c.hold_pending
            || self.rolling_back.is_some()
            || self.coord.started() != self.coord.committed()
            || self.log.as_ref().is_some_and(LogSide::busy_now)
        {
            return;
        }
        c.hold_pending = false;
        c.active = true;
        let (n, _, max) = self.coord_params;
        let cut = self.coord.started();
        let committed = self.last_released;
        self.coord = Box::new(Participant::new(n, max, cut, cut));
        tracing::info!(
            committed,
            "the cluster has several members: its leader coordinates this node's epochs from now on"
        );
        let c = self.cluster.as_ref().expect("checked");
        if let Some(l) = c.leader {
            c.send(
                l,
                EpochMsg::Held {
                    gen: c.gen,
                    committed,
                    cut,
                    shards: self.shards.len() as u32,
                    cut_gen: 0,
                    shard_gen: self.shard_gen,
                },
            );
        }
    }

    /// The key groups whose pending messages this node carries: their owner takes no part in
    /// the epochs now (the leader left it out), and this node is the participant with the
    /// lowest id (or alone).
    fn carried(&self) -> Vec<u32> {
        let Some(c) = self.cluster.as_ref().filter(|c| c.active) else {
            return Vec::new();
        };
        let ids: Vec<u64> = self.members.iter().map(|(n, _)| *n).collect();
        if ids.iter().min().is_some_and(|&m| m != c.me) {
            return Vec::new();
        }
        let (_, owners) = self.router.placement().owners();
        owners
            .iter()
            .enumerate()
            .filter_map(|(kg, o)| match o {
                Some(o) if *o != c.me && !ids.contains(o) => Some(kg as u32),
                _ => None,
            })
            .collect()
    }

    /// The leader's `Resume`: epochs up to `committed` are committed (the newest with a
    /// manifest is `manifest`), later ones abandoned; epochs go on after `base` (the shards
    /// take the next number the leader gives them).
    fn resume(
        &mut self,
        committed: u64,
        base: u64,
        manifest: Option<u64>,
        all: bool,
        members: Vec<(u64, u32)>,
        release: bool,
    ) {
        // Reads stopped for a move go on (moved or not).
        self.router.egress().pause(false);
        // The shards learn the participants in a rollback (a lone participant has no peers).
        let members = if members.len() > 1 {
            members
        } else {
            Vec::new()
        };
        let changed = members != *self.members;
        let several_before = self.members.len() > 1;
        self.members = Arc::new(members);
        let owned_changed = {
            let now: std::collections::BTreeSet<u32> = self
                .router
                .placement()
                .owned(self.key_groups)
                .into_iter()
                .collect();
            now != self.loaded
        };
        // Open epochs of its own are released by `committed` only when the leader says they
        // are the committed ones (this node took part in the generation that cut them):
        // otherwise they may have been abandoned while the leader left this node out (the
        // others' epochs of the same numbers committed since). Those that did commit are read
        // back from blob storage below (their callers, failed by the rollback, retry with
        // their keys).
        let open = self.coord.started() > self.coord.committed();
        if committed > self.coord.committed() && (!open || release) {
            self.input(Input::Committed { epoch: committed });
        }
        let open = self.coord.started() > self.coord.committed();
        // Committed epochs with data this node did not release (it restarted as the leader
        // committed them, or was left out), open epochs (abandoned), several participants
        // (all go back to the same cut), or key groups whose pending messages it carries now
        // (their owner is left out: its next parts must hold them): roll back.
        let missing = manifest.filter(|&m| m > self.last_released);
        let carries = !self.carried().is_empty();
        if (missing.is_some() || open || all || changed || owned_changed || carries)
            && self.cp.is_some()
        {
            if let Some(c) = self.cluster.as_mut() {
                c.holding = true;
            }
            let several = several_before || self.members.len() > 1;
            self.begin_rollback_as(
                committed,
                base.max(self.coord.started()),
                missing,
                manifest,
                None,
                several,
            );
            return;
        }
        let (n, _, max) = self.coord_params;
        let committed = committed.max(self.coord.committed());
        self.coord = Box::new(Participant::new(n, max, committed, base.max(committed)));
        self.status.lock().started = self.coord.started();
        if let Some(c) = self.cluster.as_mut() {
            c.holding = false;
            for epoch in std::mem::take(&mut c.deferred) {
                self.input(Input::Barrier { epoch });
            }
        }
    }

    /// The leader's live `Resume` (a move that rolls nobody back): every participant stopped
    /// the moving key groups at its cut of `committed`, which it released, and cut nothing
    /// after it. This node hands them over ([`Reconfiguring`]) and answers `Reconfigured`;
    /// epochs start again once every participant did. If it cannot (its epochs are not the
    /// leader's), it asks the leader to synchronise again: everyone rolls back.
    fn resume_live(
        &mut self,
        leader: statemesh_mesh::placement::NodeId,
        committed: u64,
        base: u64,
        manifest: Option<u64>,
        members: Vec<(u64, u32)>,
        shards_gen: u64,
    ) {
        let members = if members.len() > 1 {
            members
        } else {
            Vec::new()
        };
        let open = self.coord.started() > self.coord.committed();
        let ours = !open
            && self.coord.committed() == committed
            && self.last_released == committed
            && self.shard_gen == shards_gen;
        let owns_nothing =
            self.loaded.is_empty() && self.router.placement().owned(self.key_groups).is_empty();
        if !ours && owns_nothing && self.cp.is_some() && shards_gen != 0 {
            // New to the epochs and owning nothing: it loses nothing by rolling back to the
            // committed epoch, with the others' shard generation (they roll nothing back).
            tracing::info!(
                committed,
                "taking part in the cluster's epochs (nothing rolls back elsewhere)"
            );
            self.router.placement().set_moving(None);
            self.router.egress().pause(false);
            self.members = Arc::new(members);
            if let Some(c) = self.cluster.as_mut() {
                c.holding = true;
            }
            let missing = manifest.filter(|&m| m > self.last_released);
            self.begin_rollback_as(
                committed,
                base.max(self.coord.started()),
                missing,
                manifest,
                Some(shards_gen),
                false,
            );
            return;
        }
        let why = if self.cp.is_none() {
            Some("checkpoints are off")
        } else if !ours {
            Some("its epochs are not the leader's")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!(
                committed,
                "cannot hand key groups over live: {why}; the participants synchronise again"
            );
            if let Some(c) = self.cluster.as_mut() {
                c.leader = Some(leader);
            }
            self.give_up_live();
            return;
        }
        self.members = Arc::new(members);
        let (n, _, max) = self.coord_params;
        self.coord = Box::new(Participant::new(n, max, committed, base.max(committed)));
        self.status.lock().started = self.coord.started();
        self.reconfiguring = Some(Reconfiguring {
            at: committed,
            manifest,
            started: false,
            since: Instant::now(),
        });
        self.router.want_apply();
        self.continue_reconfigure();
    }

    /// The live move cannot go on here: the leader synchronises again (everyone rolls back,
    /// which also undoes what the shards stopped).
    fn give_up_live(&mut self) {
        self.reconfiguring = None;
        if let Some(c) = self.cluster.as_ref() {
            if let Some(l) = c.leader {
                c.send(l, EpochMsg::Reset { gen: c.gen });
            }
        }
    }

    /// Unread egress records move with their key groups: those of `lost` leave the queues,
    /// those of `restore` (read from blob storage into sled) join them, except records read
    /// in epochs not committed yet.
    fn move_egress(&mut self, lost: &[u32], restore: &std::collections::BTreeSet<u32>) {
        let lost: std::collections::BTreeSet<u32> = lost.iter().copied().collect();
        // Reads of their records in open epochs are undone (the epochs are abandoned): the
        // new owner has the records, and this node no longer removes them.
        for keys in self.consumed.values_mut() {
            keys.retain(|(k, _)| {
                crate::store::egress_key_group(k).is_none_or(|kg| !lost.contains(&kg))
            });
        }
        let egress = self.router.egress();
        egress.drop_key_groups(&lost);
        if restore.is_empty() {
            return;
        }
        let read: std::collections::HashSet<Vec<u8>> = self
            .consumed
            .values()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect();
        match self.store.load_egress() {
            Ok(v) => egress.restore_missing(v, restore, &read),
            Err(e) => {
                tracing::error!(error = %e, "cannot load the egress records of key groups read from blob storage")
            }
        }
    }

    /// Once sled holds the move's epoch: reads what this node gained from blob storage (in a
    /// task; it reports [`DriverEvent::Handed`]).
    fn continue_reconfigure(&mut self) {
        let Some(r) = self.reconfiguring.as_mut() else {
            return;
        };
        if r.started || self.status.lock().applied < r.at {
            return;
        }
        r.started = true;
        self.sled_rewrites += 1;
        let (at, manifest) = (r.at, r.manifest);
        let placement = self.router.placement().clone();
        let now: std::collections::BTreeSet<u32> =
            placement.owned(self.key_groups).into_iter().collect();
        let gained: Vec<u32> = now.difference(&self.loaded).copied().collect();
        let lost: Vec<u32> = self.loaded.difference(&now).copied().collect();
        let moving = placement.stop_at(at).unwrap_or_default();
        if let Some(kg) = gained.iter().chain(&lost).find(|kg| !moving.contains(kg)) {
            // Ownership changed beyond what stopped: it cannot be handed over live.
            tracing::error!(
                key_group = kg,
                "a key group moved that was not stopped; the participants synchronise again"
            );
            self.give_up_live();
            return;
        }
        let mine: Vec<u32> = moving
            .iter()
            .copied()
            .filter(|kg| now.contains(kg))
            .collect();
        if !gained.is_empty() || !lost.is_empty() {
            tracing::info!(
                gained = gained.len(),
                lost = lost.len(),
                epoch = at,
                "key groups moved (live): loading the ones gained from blob storage"
            );
        }
        let (cp, store, events) = (
            self.cp.clone().expect("a live move needs checkpoints"),
            self.store.clone(),
            self.events.clone(),
        );
        self.handing = true;
        self.rt.spawn(async move {
            let r = async {
                crate::failpoint::eval_slow("mesh-handover-read").await?;
                store
                    .set_stale(lost.iter().copied(), true)
                    .and_then(|()| store.clear_key_groups(lost.iter().copied()))
                    .map_err(|e| e.to_string())?;
                match manifest {
                    Some(m) => {
                        catch_up(&cp, &store, &gained, None, at, m).await?;
                    }
                    None => {
                        // Nothing committed yet: they are empty.
                        store
                            .clear_key_groups(gained.iter().copied())
                            .and_then(|()| store.set_stale(gained.iter().copied(), false))
                            .map_err(|e| e.to_string())?;
                    }
                }
                // Their messages pending at the move's cut are in every participant's part.
                let pending = match manifest {
                    Some(m) if m == at => pending_at(&cp, m, &mine).await?,
                    // No manifest at `at`: every part was empty, nothing was pending.
                    _ => Vec::new(),
                };
                Ok(Handed {
                    at,
                    pending,
                    owned: now,
                    gained,
                    lost,
                })
            }
            .await;
            let _ = events.send(DriverEvent::Handed(r));
        });
    }

    /// The move's key groups are read: the shards hand them over.
    fn handed(&mut self, r: Result<Handed, String>) {
        self.handing = false;
        // A rollback that came meanwhile waited for the task's writes to sled.
        self.continue_rollback();
        let h = match r {
            Ok(h) if self.reconfiguring.as_ref().is_some_and(|x| x.at == h.at) => h,
            Ok(h) => {
                tracing::info!(
                    epoch = h.at,
                    "a hand-over's blob read ended after its move was given up"
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the moving key groups from blob storage; the participants synchronise again");
                self.give_up_live();
                return;
            }
        };
        self.loaded = h.owned;
        self.move_egress(&h.lost, &h.gained.iter().copied().collect());
        // Calls waiting here for a reply of a key group that left: the reply goes to its new
        // owner.
        let lost: rustc_hash::FxHashSet<u32> = h.lost.iter().copied().collect();
        if !lost.is_empty() {
            self.router.fail_calls_of(
                &lost,
                &crate::error::ServiceError::Unavailable(format!(
                    "the call's key group moved to another node at epoch {}; retry with the same idempotency key",
                    h.at
                )),
            );
        }
        let n = self.shards.len();
        let mut per_shard: Vec<Vec<(u32, PendingMessage)>> = (0..n).map(|_| Vec::new()).collect();
        for (kg, m) in h.pending {
            per_shard[self.router.shard_of(kg)].push((kg, m));
        }
        let (shards, members, events, at, generation) = (
            self.shards.clone(),
            self.members.clone(),
            self.events.clone(),
            h.at,
            self.shard_gen,
        );
        self.rt.spawn(async move {
            let _ = futures::future::join_all(shards.iter().zip(per_shard).map(|(s, pending)| {
                s.send(crate::shard::Reconfigure {
                    at,
                    generation,
                    pending: crate::node::envelopes(pending),
                    members: members.clone(),
                })
            }))
            .await;
            let _ = events.send(DriverEvent::HandedOver { at });
        });
    }

    /// Every shard handed over: requests for the moved key groups go to their owners again,
    /// egress records are read again, and the leader learns it.
    fn handed_over(&mut self, at: u64) {
        let Some(r) = self.reconfiguring.take_if(|r| r.at == at) else {
            return;
        };
        self.router.placement().set_moving(None);
        self.router.egress().pause(false);
        tracing::info!(
            epoch = at,
            ms = r.since.elapsed().as_secs_f64() * 1e3,
            "key groups handed over live (nothing rolled back)"
        );
        if let Some(c) = self.cluster.as_mut() {
            c.holding = false;
            if let Some(l) = c.leader {
                c.send(l, EpochMsg::Reconfigured { gen: c.gen });
            }
        }
        if let Some(c) = self.cluster.as_mut() {
            for epoch in std::mem::take(&mut c.deferred) {
                self.input(Input::Barrier { epoch });
            }
        }
    }

    fn failed(&mut self, epoch: u64, e: String) {
        self.router.metrics().checkpoint_failures.inc();
        tracing::warn!(epoch, error = %e, "checkpoint failed; retrying");
        self.status.lock().last_error = Some(e);
        self.input(Input::Failed {
            epoch,
            now_ms: now_ms(),
        });
    }

    fn action(&mut self, a: Action) {
        match a {
            Action::Barrier(e) => {
                self.soon.barrier(e);
                self.started_at.insert(e, Instant::now());
                self.status.lock().started = e;
                for s in &self.shards {
                    s.do_send(Barrier { epoch: e });
                }
            }
            Action::Write(e) => {
                let built = match self.built.get(&e) {
                    Some(b) => b.clone(),
                    None => {
                        let mut cuts = self.cuts.remove(&e).unwrap_or_default();
                        // Egress records read since the last epoch: delete them.
                        let consumed = self.router.egress().take_consumed();
                        if !consumed.is_empty() {
                            self.consumed.insert(e, consumed.clone());
                            cuts.push(ShardCut {
                                epoch: e,
                                shard: usize::MAX,
                                generation: self.shard_gen,
                                ops: consumed
                                    .into_iter()
                                    .map(|(k, v)| Change::Raw(k, v))
                                    .collect(),
                                pending: Vec::new(),
                            });
                        }
                        let placement = self.router.placement().clone();
                        let b = Arc::new(build(e, &self.opts.node_id, cuts, |kg| {
                            placement.kg_version(kg)
                        }));
                        self.built.insert(e, b.clone());
                        b
                    }
                };
                let tx = self.events.clone();
                let rollbacks = self.rollbacks;
                let to_log = self.log.as_ref().is_some_and(|l| l.active);
                match &self.cp {
                    // Logged at its commit.
                    Some(_) if to_log => {
                        let _ = tx.send(DriverEvent::Written {
                            epoch: e,
                            rollbacks,
                            result: Ok(None),
                        });
                    }
                    Some(cp) if !built.key_groups.is_empty() => {
                        let cp = cp.clone();
                        let encoded = prost::Message::encode_to_vec(&*built);
                        if encoded.len() <= INLINE_MAX {
                            // Small epochs ride in the manifest: one put per epoch.
                            let obj = cp.inline_node_epoch(&built, &encoded);
                            let (delay, result) =
                                match crate::failpoint::eval_delay("checkpoint-epoch-written") {
                                    Ok(delay) => (delay, Ok(Some(obj))),
                                    Err(err) => (None, Err(err)),
                                };
                            let written = DriverEvent::Written {
                                epoch: e,
                                rollbacks,
                                result,
                            };
                            match delay {
                                None => {
                                    let _ = tx.send(written);
                                }
                                Some(ms) => {
                                    self.rt.spawn(async move {
                                        tokio::time::sleep(Duration::from_millis(ms)).await;
                                        let _ = tx.send(written);
                                    });
                                }
                            }
                            return;
                        }
                        self.rt.spawn(async move {
                            let result = cp
                                .write_node_epoch(&built)
                                .await
                                .map(Some)
                                .map_err(|e| e.to_string());
                            let _ = tx.send(DriverEvent::Written {
                                epoch: e,
                                rollbacks,
                                result,
                            });
                        });
                    }
                    _ => {
                        let _ = tx.send(DriverEvent::Written {
                            epoch: e,
                            rollbacks,
                            result: Ok(None),
                        });
                    }
                }
            }
            Action::Commit(e) => {
                let tx = self.events.clone();
                let obj = self.objects.get(&e).cloned().flatten();
                if let Some(l) = &self.log {
                    let built = self.built.get(&e).filter(|b| !b.key_groups.is_empty());
                    match (&obj, built) {
                        // Written while the log was active: it commits there.
                        (None, Some(b)) => {
                            // On the driver's own thread (see `start`).
                            let record = prost::Message::encode_to_vec(&**b);
                            let result = crate::failpoint::eval("checkpoint-log-append")
                                .and_then(|()| l.log.append(e, &record))
                                .and_then(|()| {
                                    // Durable, acknowledgements not yet released.
                                    crate::failpoint::eval("checkpoint-after-commit")
                                })
                                .map(|()| None);
                            let _ = tx.send(DriverEvent::Committed {
                                epoch: e,
                                result,
                                logged: Some(record.len() as u64),
                            });
                            return;
                        }
                        // Written to blob storage after the log was left: its manifest comes
                        // after the log's epochs are uploaded (it names the last as previous).
                        // Also while an upload runs whose epochs the log no longer holds: it
                        // truncates the log before its manifest is known here, and a manifest
                        // committed meanwhile named the one before the upload's as previous:
                        // the chain skipped the upload, and with it the changes of its epochs
                        // (a delayed message fired then was loaded again from blob storage and
                        // fired twice; a chaos run, seed 1796402805311548147).
                        (Some(_), _) if l.uploading || l.log.last_epoch().is_some() => {
                            self.commit_after_upload = Some(e);
                            self.leave_log();
                            return;
                        }
                        _ => {}
                    }
                }
                match (&self.cp, obj) {
                    (Some(cp), Some(obj)) => {
                        let mut objects = vec![obj];
                        if let Some(full) = self.unlisted_full.take() {
                            objects.push(full.0.clone());
                            self.listing = Some(full);
                        }
                        let m = Manifest {
                            epoch: e,
                            previous: self.last_manifest,
                            created_ms: now_ms(),
                            objects,
                            writer: Some(self.opts.writer.clone()),
                        };
                        let cp = cp.clone();
                        self.rt.spawn(async move {
                            let result = cp
                                .commit(&m)
                                .await
                                .map_err(|e| match e {
                                    CheckpointError::AlreadyCommitted(_) => format!(
                                        "{e}: another node writes checkpoints to the same blob storage prefix; stop it or give this node its own prefix"
                                    ),
                                    e => e.to_string(),
                                })
                                .and_then(|stored| {
                                    // Stored, acknowledgements not yet released.
                                    crate::failpoint::eval("checkpoint-after-commit")
                                        .map(|()| stored)
                                });
                            let _ = tx.send(DriverEvent::Committed {
                                epoch: e,
                                result,
                                logged: None,
                            });
                        });
                    }
                    _ => {
                        let _ = tx.send(DriverEvent::Committed {
                            epoch: e,
                            result: Ok(None),
                            logged: None,
                        });
                    }
                }
            }
            Action::Release(e) => {
                self.last_released = e;
                if let Some(c) = self.cluster.as_mut().filter(|c| c.listing_epoch == Some(e)) {
                    c.listing_epoch = None;
                    if let Some((obj, label)) = self.listing.take() {
                        self.status.lock().last_full = Some((label, obj.size));
                    }
                }
                for (i, s) in self.shards.iter().enumerate() {
                    // Each output held in `e` or before was counted before its shard's cut.
                    if self.router.holding(i) {
                        s.do_send(Committed { epoch: e });
                    }
                }
                let built = self.built.remove(&e);
                let obj = self.objects.remove(&e).flatten();
                // Egress records removed by the epochs released: their readers get them.
                let later = self.consumed.split_off(&(e + 1));
                for (_, keys) in std::mem::replace(&mut self.consumed, later) {
                    self.router.egress().released(&keys);
                }
                let m = self.router.metrics();
                m.checkpoint_committed_epoch.set(e as i64);
                let duration = self
                    .started_at
                    .remove(&e)
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                m.checkpoint_seconds.observe(duration.as_secs_f64());
                if let Some(o) = &obj {
                    m.checkpoint_last_bytes.set(o.size as i64);
                }
                {
                    let mut s = self.status.lock();
                    s.committed = e;
                    s.last_commit_ms = now_ms();
                    s.last_error = None;
                    if let Some(b) = built
                        .as_ref()
                        .filter(|b| obj.is_some() || !b.key_groups.is_empty())
                    {
                        // An epoch committed to the epoch log has no object: its record's size.
                        let bytes = match (&obj, self.last_logged) {
                            (Some(o), _) => o.size,
                            (None, Some((l, n))) if l == e => n,
                            (None, _) => 0,
                        };
                        s.recent.push_back(EpochInfo {
                            epoch: e,
                            bytes,
                            key_groups: b.key_groups.len(),
                            entries: b
                                .key_groups
                                .iter()
                                .map(|k| k.puts.len() + k.deletes.len())
                                .sum(),
                            pending: b.key_groups.iter().map(|k| k.pending.len()).sum(),
                            duration_ms: duration.as_secs_f64() * 1e3,
                            committed_ms: now_ms(),
                        });
                        if s.recent.len() > 64 {
                            s.recent.pop_front();
                        }
                    }
                }
                if let Some(b) = &built {
                    self.last_pending = LastPending::Epoch(b.clone());
                }
                let changed = built.as_ref().is_some_and(|b| {
                    b.key_groups
                        .iter()
                        .any(|k| !k.puts.is_empty() || !k.deletes.is_empty())
                });
                if let Some(a) = &self.applier {
                    let _ = a.send((e, if changed { built } else { None }));
                    if !self.finish.is_empty() {
                        // A stop waits for this epoch in sled: not for the merge window.
                        self.router.want_apply();
                    }
                }
                if obj.is_some() {
                    self.commits_since_gc += 1;
                    self.epochs_since_full += 1;
                }
                self.maintain();
                self.maybe_upload();
            }
            Action::Cut(e) => {
                if let Some(c) = &self.cluster {
                    if let Some(l) = c.leader {
                        c.send(
                            l,
                            EpochMsg::Cut {
                                gen: c.gen,
                                epoch: e,
                            },
                        );
                    }
                }
            }
            Action::Report(e) => {
                let mut objects: Vec<ObjectRef> = self
                    .objects
                    .get(&e)
                    .cloned()
                    .flatten()
                    .into_iter()
                    .collect();
                if let Some(full) = self.unlisted_full.take() {
                    objects.push(full.0.clone());
                    self.listing = Some(full);
                    if let Some(c) = self.cluster.as_mut() {
                        c.listing_epoch = Some(e);
                    }
                }
                // The key groups it wrote as their owner, at its ownership versions: the
                // leader refuses the part if they are not the owners'.
                let mut owned: Vec<(u32, u64)> = self.built.get(&e).map_or(Vec::new(), |b| {
                    b.key_groups
                        .iter()
                        .filter(|s| s.version > 0)
                        .map(|s| (s.key_group, s.version))
                        .collect()
                });
                if !owned.is_empty() && crate::failpoint::eval("mesh-stale-part").is_err() {
                    tracing::warn!(
                        epoch = e,
                        "fault point: this part names stale ownership versions"
                    );
                    for (_, v) in &mut owned {
                        *v -= 1;
                    }
                }
                if let Some(c) = self.cluster.as_mut() {
                    if let Some(l) = c.leader {
                        c.send(
                            l,
                            EpochMsg::Part {
                                gen: c.gen,
                                epoch: e,
                                objects: serde_json::to_vec(&objects)
                                    .expect("object references serialize"),
                                owned,
                            },
                        );
                        // The snapshot of key groups about to move is listed in this part.
                        let listed = c.move_snapshot.as_ref().is_some_and(|m| {
                            m.gen == c.gen
                                && m.path
                                    .as_ref()
                                    .is_some_and(|p| objects.iter().any(|o| &o.path == p))
                        });
                        if listed {
                            c.move_snapshot = None;
                            c.send(l, EpochMsg::Prepared { gen: c.gen });
                        }
                    }
                }
            }
            Action::Backpressure(on) => {
                let reason = on.then(|| {
                    let s = self.status.lock();
                    format!(
                        "checkpoints are behind: {} epochs are cut but not committed to {} (last error: {})",
                        self.coord.started() - self.coord.committed(),
                        s.url,
                        s.last_error.as_deref().unwrap_or("none")
                    )
                });
                if let Some(r) = &reason {
                    tracing::warn!("{r}; refusing ingress until an epoch commits");
                }
                self.coord_backpressure = reason;
                self.set_backpressure();
            }
        }
    }

    /// Refuses ingress while the coordinator has too many epochs open or the epoch log is
    /// over its bound.
    fn set_backpressure(&mut self) {
        let reason = self
            .coord_backpressure
            .clone()
            .or_else(|| self.log.as_ref().and_then(|l| l.full.clone()));
        let mut s = self.status.lock();
        if s.backpressure != reason {
            s.backpressure = reason.clone();
            drop(s);
            self.router.set_backpressure(reason);
        }
    }

    /// Epochs commit to blob storage from now on (a second member joins, whose epochs are the
    /// cluster's), once the log's are uploaded.
    fn leave_log(&mut self) {
        if let Some(l) = self.log.as_mut().filter(|l| l.active) {
            l.active = false;
            tracing::info!(
                "the cluster grows: epochs commit to blob storage from now on; uploading the epoch log"
            );
            if let Some(s) = self.status.lock().log.as_mut() {
                s.active = false;
            }
        }
        self.maybe_upload();
    }

    /// Uploads the epoch log when an upload is due (every `upload_interval_ms` or
    /// `upload_bytes`, at once when the log was left) and none runs; keeps ingress refused
    /// while the log is over `log_max_bytes`.
    fn maybe_upload(&mut self) {
        let Some(cp) = self.cp.clone() else {
            return;
        };
        let Some(l) = self.log.as_mut() else {
            return;
        };
        let (epochs, bytes) = l.log.size();
        if l.shown != (epochs, bytes) {
            l.shown = (epochs, bytes);
            if let Some(ls) = self.status.lock().log.as_mut() {
                (ls.epochs, ls.bytes) = (epochs, bytes);
            }
        }
        let full = (bytes > l.max_bytes).then(|| {
            format!(
                "the epoch log holds {epochs} epochs ({bytes} bytes) that blob storage ({}) does not have yet, over [checkpoint] log_max_bytes ({}); last upload error: {}",
                cp.url(),
                l.max_bytes,
                self.status
                    .lock()
                    .log
                    .as_ref()
                    .and_then(|s| s.last_error.clone())
                    .unwrap_or_else(|| "none".into())
            )
        });
        if full.is_some() != l.full.is_some() {
            match &full {
                Some(r) => tracing::warn!("{r}; refusing ingress until it is uploaded"),
                None => tracing::info!("the epoch log is below its bound again"),
            }
        }
        if full != l.full {
            // Also when only the reason changed (a newer upload error).
            l.full = full;
            self.set_backpressure();
        }
        let through = self.last_released;
        let Some(l) = self.log.as_mut() else {
            return;
        };
        l.publish_busy();
        if !l.uploading && !l.flush.is_empty() && l.log.first_epoch().is_none_or(|f| f > through) {
            for tx in l.flush.drain(..) {
                let _ = tx.send(Ok(()));
            }
        }
        if l.uploading || epochs == 0 || l.log.first_epoch().is_none_or(|f| f > through) {
            return;
        }
        let now = Instant::now();
        if l.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let due = !l.active
            || !l.flush.is_empty()
            || bytes >= l.upload_bytes
            || now.duration_since(l.last_upload) >= l.interval;
        if !due {
            return;
        }
        l.uploading = true;
        let log = l.log.clone();
        // A full snapshot waiting to be listed, if its label is at most what this upload
        // carries (it reflects epochs up to its label).
        let last = log.last_epoch().unwrap_or(0).min(through);
        if self.unlisted_full.as_ref().is_some_and(|f| f.1 <= last) {
            self.listing = self.unlisted_full.take();
        }
        let full = self.listing.as_ref().map(|f| f.0.clone());
        let (previous, writer, tx) = (
            self.last_manifest,
            self.opts.writer.clone(),
            self.events.clone(),
        );
        self.rt.spawn(async move {
            let r = super::upload::upload(&cp, &log, previous, through, &writer, full).await;
            let _ = tx.send(DriverEvent::Uploaded(r));
        });
    }

    fn uploaded(&mut self, r: Result<Option<super::upload::Uploaded>, String>) {
        let Some(l) = self.log.as_mut() else {
            return;
        };
        l.uploading = false;
        match r {
            Ok(u) => {
                l.last_upload = Instant::now();
                l.retry_at = None;
                l.failures = 0;
                let (epochs, bytes) = l.log.size();
                if let Some(u) = u {
                    self.last_manifest = Some(u.epoch);
                    self.commits_since_gc += 1;
                    self.epochs_since_full += 1;
                    self.bytes_since_full += u.bytes;
                    self.router.metrics().checkpoint_bytes.inc_by(u.bytes);
                    tracing::debug!(
                        epoch = u.epoch,
                        epochs = u.epochs,
                        bytes = u.bytes,
                        "uploaded the epoch log"
                    );
                    if let Some((obj, label)) = self.listing.take() {
                        if u.stored
                            .as_ref()
                            .is_none_or(|m| m.objects.iter().any(|o| o.path == obj.path))
                        {
                            self.status.lock().last_full = Some((label, obj.size));
                        } else {
                            self.unlisted_full = Some((obj, label));
                        }
                    }
                    let mut s = self.status.lock();
                    if let Some(ls) = s.log.as_mut() {
                        ls.uploaded = Some(u.epoch);
                        ls.uploads += 1;
                        ls.last_error = None;
                    }
                } else if let Some(full) = self.listing.take() {
                    self.unlisted_full = Some(full);
                }
                if let Some(ls) = self.status.lock().log.as_mut() {
                    (ls.epochs, ls.bytes) = (epochs, bytes);
                }
                if let Some(l) = self.log.as_mut() {
                    l.shown = (epochs, bytes);
                }
                if epochs == 0 {
                    if let Some(e) = self.commit_after_upload.take() {
                        self.action(Action::Commit(e));
                    }
                }
                self.maybe_held();
                self.maintain();
            }
            Err(e) => {
                for tx in l.flush.drain(..) {
                    let _ = tx.send(Err(e.clone()));
                }
                l.failures += 1;
                let backoff = Duration::from_millis((100u64 << l.failures.min(6)).min(5_000));
                l.retry_at = Some(Instant::now() + backoff);
                if let Some(full) = self.listing.take() {
                    self.unlisted_full = Some(full);
                }
                self.router.metrics().checkpoint_failures.inc();
                tracing::warn!(error = %e, "uploading the epoch log failed; retrying");
                let e = format!("uploading the epoch log: {e}");
                let mut s = self.status.lock();
                s.last_error = Some(e.clone());
                if let Some(ls) = s.log.as_mut() {
                    ls.last_error = Some(e);
                }
            }
        }
        self.maybe_upload();
    }

    /// Starts a full snapshot or a garbage collection when one is due and none runs.
    fn maintain(&mut self) {
        let Some(cp) = self.cp.clone() else {
            return;
        };
        if self.maintenance_running || self.unlisted_full.is_some() || self.listing.is_some() {
            return;
        }
        // Sled is a key group's current copy only outside rollbacks and hand-overs (they
        // clear and rebuild key groups in it): no snapshot is scanned meanwhile.
        let rewriting = self.rolling_back.is_some() || self.reconfiguring.is_some() || self.handing;
        let tx = self.events.clone();
        // Key groups about to move first (a move waits for them).
        let moving = self
            .cluster
            .as_mut()
            .filter(|_| !rewriting)
            .and_then(|c| c.move_snapshot.as_mut())
            .filter(|m| !m.started && m.path.is_none())
            .map(|m| {
                m.started = true;
                m.key_groups.clone()
            });
        if let Some(key_groups) = moving {
            self.maintenance_running = true;
            self.snapshot(cp, key_groups, true);
            return;
        }
        let threshold = self.bytes_since_full > 0
            && (self.bytes_since_full >= (2 * self.last_full_bytes).max(self.opts.full_min)
                || self.epochs_since_full >= self.opts.full_max_epochs);
        if (self.force_full || threshold) && self.full_wanted_at.is_none() {
            self.full_wanted_at = Some(self.coord.committed());
        }
        // A snapshot of sled is worth taking once sled holds the epochs that made it due.
        let due_full = !rewriting
            && self
                .full_wanted_at
                .is_some_and(|e| self.router.applied() >= e);
        // In a cluster, one node collects, for every key group: the epochs' leader, which
        // wrote the manifests (its collections read none of them back from blob storage).
        let collects = self
            .cluster
            .as_ref()
            .is_none_or(|c| !c.active || c.leader == Some(c.me));
        let gc_due = collects
            && self.commits_since_gc >= self.opts.gc_every
            && !self.force_full
            && self
                .last_gc
                .is_none_or(|t| t.elapsed() >= self.opts.gc_min_interval);
        // When both are due they take turns.
        if gc_due && !(due_full && self.last_was_gc) {
            self.last_was_gc = true;
            self.last_gc = Some(Instant::now());
            self.commits_since_gc = 0;
            self.maintenance_running = true;
            let retain = self.opts.retain;
            // Everything every key group needs, whoever owns it now.
            let owned: Vec<u32> = (0..self.key_groups).collect();
            self.rt.spawn(async move {
                let r = cp
                    .gc_after(retain, &owned, GC_GRACE)
                    .await
                    .map(Maintenance::Gc)
                    .map_err(|e| e.to_string());
                let _ = tx.send(DriverEvent::Maintenance(r));
            });
        } else if due_full {
            self.last_was_gc = false;
            self.maintenance_running = true;
            // The key groups this node serves whose copy in sled is current (the table may
            // name it the owner of one before the synchronisation that loads it).
            let owned: Vec<u32> = self
                .router
                .placement()
                .owned(self.key_groups)
                .into_iter()
                .filter(|kg| self.loaded.contains(kg))
                .collect();
            self.snapshot(cp, owned, false);
        }
    }

    /// Writes a full snapshot of `owned` from sled (labelled with the newest epoch sled holds)
    /// in the background; [`Maintenance::Full`] reports it. Recovery takes a key group's
    /// newest full snapshot whoever wrote it, so sled must hold each of `owned` as of the
    /// label: a snapshot is never started during a rollback or hand-over, and one that a
    /// rollback or hand-over overtook is dropped (`rewrites`).
    fn snapshot(&mut self, cp: CheckpointStore, owned: Vec<u32>, partial: bool) {
        let tx = self.events.clone();
        let rewrites = self.sled_rewrites;
        {
            let (store, node) = (self.store.clone(), self.opts.node_id.clone());
            let label = self.router.applied();
            self.rt.spawn(async move {
                let built = tokio::task::spawn_blocking(move || {
                    crate::failpoint::eval("checkpoint-full-snapshot-scan")?;
                    let mut key_groups = Vec::with_capacity(owned.len());
                    for kg in owned {
                        let puts = store
                            .scan_key_group(kg)
                            .map_err(|e| e.to_string())?
                            .into_iter()
                            .map(|(key, value)| Entry { key, value })
                            .collect();
                        key_groups.push(KeyGroupSection {
                            key_group: kg,
                            full: true,
                            puts,
                            ..Default::default()
                        });
                    }
                    Ok::<_, String>(NodeEpoch {
                        epoch: label,
                        node,
                        key_groups,
                    })
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                let r = match built {
                    Ok(e) => cp
                        .write_full_snapshot(&e)
                        .await
                        .map(|object| Maintenance::Full {
                            object,
                            label,
                            partial,
                            rewrites,
                        })
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                let _ = tx.send(DriverEvent::Maintenance(r));
            });
        }
    }
}

/// What recovery hands the node.
pub(crate) struct Recovered {
    /// The last committed epoch.
    pub committed: u64,
    /// The newest manifest.
    pub last_manifest: Option<u64>,
    /// Pending messages to replay before ingress opens, by key group.
    pub pending: Vec<(u32, PendingMessage)>,
    /// The next epoch must be preceded by a full snapshot (blob storage lacks the base).
    pub force_full: bool,
    pub report: RecoveryReport,
}

/// At every start: every key group but the `owned` ones is marked stale. Recovery moves sled's
/// applied marker past deltas it applies to the owned key groups only, so whatever sled holds
/// of any other key group is stale (a new store holds nothing of it; a key group this node
/// owned once was moved away while it was down, and other owners changed it since) until a
/// load from blob storage writes it whole. Otherwise a key group gained later by a move, and
/// not loaded yet when the process died, would be recovered from the deltas after sled's
/// applied marker only, onto nothing or onto the old copy: every key written in between lost
/// (a chaos run lost 11 egress records of a key group its node had owned before a failover
/// and regained, seed 1796425082704779359).
pub(crate) fn mark_unowned_stale(
    store: &Store,
    key_groups: u32,
    owned: &[u32],
) -> Result<(), crate::store::StoreError> {
    store.set_stale((0..key_groups).filter(|kg| !owned.contains(kg)), true)
}

/// Brings sled to the newest committed epoch and returns what to replay. With no blob store
/// (checkpoints off) sled is taken as it is.
pub(crate) async fn recover(
    store: &Store,
    cp: Option<&CheckpointStore>,
    owned: &[u32],
) -> Result<Recovered, String> {
    let t0 = Instant::now();
    let applied = store.applied().map_err(|e| e.to_string())?;
    let Some(cp) = cp else {
        return Ok(Recovered {
            committed: applied.unwrap_or(0),
            last_manifest: None,
            pending: Vec::new(),
            force_full: false,
            report: RecoveryReport {
                source: "sled".into(),
                epoch: applied.unwrap_or(0),
                ..Default::default()
            },
        });
    };
    let latest = retry("read the newest manifest", || cp.latest())
        .await
        .map_err(|e| format!("cannot read the newest manifest: {e}"))?;
    let Some(latest) = latest else {
        let has_local = store.has_entries().map_err(|e| e.to_string())?;
        // Nothing in blob storage: a fresh node, or local state from before checkpoints (or
        // a new blob location): the first epoch needs a full snapshot.
        return Ok(Recovered {
            committed: applied.unwrap_or(0),
            last_manifest: None,
            pending: Vec::new(),
            force_full: has_local,
            report: RecoveryReport {
                source: if has_local { "sled" } else { "none" }.into(),
                epoch: applied.unwrap_or(0),
                duration_ms: t0.elapsed().as_millis() as u64,
                ..Default::default()
            },
        });
    };
    let e = latest.epoch;
    // Owned key groups sled does not hold (a load from blob storage or a give-up was
    // interrupted): rebuilt whole from blob storage.
    let stale = store.stale_key_groups().map_err(|e| e.to_string())?;
    let reload: Vec<u32> = owned
        .iter()
        .copied()
        .filter(|kg| stale.contains(kg))
        .collect();
    let mut reloaded = Vec::new();
    if !reload.is_empty() {
        tracing::info!(
            key_groups = reload.len(),
            "rebuilding key groups whose local copy was not complete from blob storage"
        );
        let (_, states) = retry("read the checkpoint chain", || {
            cp.recover_at(e, &reload, None)
        })
        .await
        .map_err(|e| format!("cannot read the checkpoint chain: {e}"))?;
        store
            .clear_key_groups(reload.iter().copied())
            .map_err(|e| e.to_string())?;
        for (kg, st) in states {
            write_state(store, &st)?;
            reloaded.extend(st.pending.into_iter().map(|m| (kg, m)));
        }
    }
    let all: Vec<u32> = owned
        .iter()
        .copied()
        .filter(|kg| !stale.contains(kg))
        .collect();
    let r = recover_held(store, cp, e, all, applied, t0, reloaded).await?;
    if !reload.is_empty() {
        // After the applied marker moved to `e` (the rebuilt copies are of `e`).
        store.set_stale(reload, false).map_err(|e| e.to_string())?;
    }
    Ok(r)
}

/// Recovers the key groups sled holds (`all`), `extra` being the pending messages of the ones
/// rebuilt whole.
async fn recover_held(
    store: &Store,
    cp: &CheckpointStore,
    e: u64,
    all: Vec<u32>,
    applied: Option<u64>,
    t0: Instant,
    extra: Vec<(u32, PendingMessage)>,
) -> Result<Recovered, String> {
    if all.is_empty() {
        // A member that owns no key groups: nothing of blob storage is its to recover.
        store.reset_applied(e).map_err(|e| e.to_string())?;
        return Ok(Recovered {
            committed: e,
            last_manifest: Some(e),
            pending: extra,
            force_full: false,
            report: RecoveryReport {
                source: "none".into(),
                epoch: e,
                duration_ms: t0.elapsed().as_millis() as u64,
                ..Default::default()
            },
        });
    }
    let (source, after) = match applied {
        Some(a) if a == e => ("sled", Some(e)),
        Some(a) if a < e => ("blob-deltas", Some(a)),
        Some(a) => {
            tracing::warn!(
                applied = a,
                committed = e,
                "local state is newer than blob storage's newest epoch; keeping it and writing a full snapshot"
            );
            return Ok(Recovered {
                committed: a,
                last_manifest: Some(e),
                pending: extra,
                force_full: true,
                report: RecoveryReport {
                    source: "sled".into(),
                    epoch: a,
                    duration_ms: t0.elapsed().as_millis() as u64,
                    ..Default::default()
                },
            });
        }
        None => ("blob-full", None),
    };
    let r = retry("read the checkpoint chain", || {
        cp.recover_at(e, &all, after)
    })
    .await;
    let (source, full, states) = match r {
        Ok((_, states)) => (source, after.is_none(), states),
        Err(err @ CheckpointError::HistoryTooShort { .. }) => {
            tracing::warn!(error = %err, "rebuilding local state from blob storage");
            let (_, states) = retry("read the checkpoint chain", || cp.recover_at(e, &all, None))
                .await
                .map_err(|e| format!("cannot read the checkpoint chain: {e}"))?;
            ("blob-full", true, states)
        }
        Err(err) => return Err(format!("cannot read the checkpoint chain: {err}")),
    };
    let mut entries = 0;
    if full {
        store
            .clear_key_groups(all.iter().copied())
            .map_err(|e| e.to_string())?;
    }
    let mut pending = extra;
    let half = states.len() / 2;
    if states.is_empty() {
        crate::failpoint::eval("checkpoint-recovery")?;
    }
    for (i, (kg, st)) in states.into_iter().enumerate() {
        if i == half {
            // Part of the local state is rebuilt, the applied marker not yet moved.
            crate::failpoint::eval("checkpoint-recovery")?;
        }
        if source != "sled" {
            entries += st.state.len() + st.deleted.len();
            write_state(store, &st)?;
        }
        pending.extend(st.pending.into_iter().map(|m| (kg, m)));
    }
    store.reset_applied(e).map_err(|e| e.to_string())?;
    let report = RecoveryReport {
        source: source.into(),
        epoch: e,
        pending: pending.len(),
        entries,
        duration_ms: t0.elapsed().as_millis() as u64,
    };
    tracing::info!(?report, "recovered");
    Ok(Recovered {
        committed: e,
        last_manifest: Some(e),
        pending,
        force_full: false,
        report,
    })
}

/// Whether the committed epoch `epoch` lists the object at `path` (no manifest covers it:
/// the epoch did not commit). The cluster's epoch log uploads runs of epochs merged into one
/// manifest labelled with the run's newest: a part that removed egress records is named in the
/// merged object's `merged`, and the manifest covering `epoch` is found walking back from
/// `newest` (the newest manifest the synchronisation read).
pub(super) async fn lists(
    cp: &CheckpointStore,
    epoch: u64,
    path: &str,
    newest: Option<u64>,
) -> Result<bool, String> {
    let read = |e: u64| {
        retry("read a manifest", move || async move {
            match cp.manifest(e).await {
                Ok(m) => Ok(Some(m)),
                Err(CheckpointError::Blob {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => Ok(None),
                Err(err) => Err(err),
            }
        })
    };
    let found = |m: &Manifest| {
        m.objects
            .iter()
            .any(|o| o.path == path || o.merged.iter().any(|p| p == path))
    };
    let failed =
        |e: u64, err: CheckpointError| format!("cannot read the manifest of epoch {e}: {err}");
    if let Some(m) = read(epoch).await.map_err(|err| failed(epoch, err))? {
        return Ok(found(&m));
    }
    let mut at = newest.filter(|&n| n > epoch);
    while let Some(n) = at {
        let Some(m) = read(n).await.map_err(|err| failed(n, err))? else {
            return Ok(false);
        };
        if m.previous.is_none_or(|p| p < epoch) {
            return Ok(found(&m));
        }
        at = m.previous;
    }
    Ok(false)
}

/// Retries a blob read a few times (a flaky network at start), then gives up with the last
/// error. Errors retrying cannot fix (missing, corrupt or truncated checkpoints, a history
/// too short) return at once.
async fn retry<T, F, Fut>(what: &str, f: F) -> Result<T, CheckpointError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, CheckpointError>>,
{
    let mut delay = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_permanent() || attempt >= 5 => return Err(e),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "cannot {what}; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::format::{Entry, KeyGroupSection, Manifest};

    /// A cut of the old generation is dropped, during a rollback and after it, even when its
    /// epoch is after the rollback's base (the number the next epoch takes): a crash test
    /// committed such a cut as the new epoch's, and a delayed message was applied twice (its
    /// sender's request replayed, and the old cut's effects kept), or lost. A cut of the new
    /// generation waits for the rollback's end if it comes early, else it is taken.
    #[test]
    fn a_cut_of_the_generation_before_a_rollback_is_dropped_whatever_its_epoch() {
        let (old, new, base) = (7, 8, 100);
        // Before the shards are told, every cut is the old generation's.
        for e in [base - 1, base, base + 1, base + 2] {
            assert_eq!(
                cut_fate(Some((false, base)), old, old, e),
                CutFate::Drop,
                "{e}"
            );
        }
        // Told: `shard_gen` is the new generation.
        assert_eq!(
            cut_fate(Some((true, base)), new, old, base + 1),
            CutFate::Drop
        );
        assert_eq!(cut_fate(Some((true, base)), new, old, base), CutFate::Drop);
        assert_eq!(
            cut_fate(Some((true, base)), new, new, base + 1),
            CutFate::AfterRollback
        );
        assert_eq!(cut_fate(Some((true, base)), new, new, base), CutFate::Drop);
        // After the rollback.
        assert_eq!(cut_fate(None, new, new, base + 1), CutFate::Take);
        assert_eq!(cut_fate(None, new, old, base + 1), CutFate::Drop);
    }

    /// An egress record asks for an epoch only after `COMMIT_SOON_MS` with its epoch not
    /// started, then again as often until it starts; the barrier of its epoch (a caller's)
    /// takes it along; a barrier of an earlier epoch does not (a shard that cut early on a
    /// peer's marker holds outputs in the next epoch before this node's barrier for the one it
    /// cut); after a rollback, an output of an abandoned epoch asks until its number comes round.
    #[test]
    fn an_output_wanting_a_commit_soon_rides_the_next_epoch_or_asks_after_a_while() {
        let mut s = CommitSoon::default();
        assert_eq!(s.poll(0, 10), Soon::Wait, "nothing held");
        // Held in epoch 5 at 10 ms; nothing starts: due at 12, then at 14.
        assert_eq!(s.poll(5, 10), Soon::Wait);
        assert_eq!(s.poll(5, 11), Soon::Wait);
        assert_eq!(s.poll(5, 12), Soon::Due);
        assert_eq!(s.poll(5, 13), Soon::Wait);
        assert_eq!(s.poll(5, 14), Soon::Due);
        // Epoch 5's barrier: covered, whenever asked.
        s.barrier(5);
        assert_eq!(s.poll(5, 20), Soon::Covered);
        // Held in epoch 6; a caller's epoch 6 starts within the delay: no epoch of its own.
        assert_eq!(s.poll(6, 30), Soon::Wait);
        s.barrier(6);
        assert_eq!(s.poll(6, 31), Soon::Covered);
        // A shard cut 7 early on a peer's marker and holds a record in 8; this node's barrier
        // for 7 comes after the record: not covered, it asks.
        s.barrier(7);
        assert_eq!(s.poll(8, 40), Soon::Wait);
        assert_eq!(s.poll(8, 41), Soon::Wait);
        assert_eq!(s.poll(8, 42), Soon::Due);
        // A barrier resets the wait: the record waits its full delay again.
        s.barrier(7);
        assert_eq!(s.poll(8, 43), Soon::Wait);
        assert_eq!(s.poll(8, 45), Soon::Due);
        s.barrier(8);
        assert_eq!(s.poll(8, 46), Soon::Covered);
        // A rollback to committed epoch 3 numbers epochs from 4 again: a mark of abandoned
        // epoch 8 asks (bounded: an epoch per delay) until 8 comes round.
        s.barrier(4);
        assert_eq!(s.poll(8, 50), Soon::Wait);
        assert_eq!(s.poll(8, 52), Soon::Due);
        s.barrier(8);
        assert_eq!(s.poll(8, 53), Soon::Covered);
    }

    /// A state key of key group `kg`.
    fn key(kg: u32, k: &str) -> Vec<u8> {
        let mut v = vec![b's'];
        v.extend_from_slice(&(kg as u16).to_be_bytes());
        v.extend_from_slice(k.as_bytes());
        v
    }

    /// A new store, and blob storage holding committed epochs 1, 2, … of one object each.
    async fn chain(
        epochs: Vec<Vec<KeyGroupSection>>,
    ) -> (tempfile::TempDir, Store, CheckpointStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), 16).unwrap();
        let cp = CheckpointStore::new(
            crate::checkpoint::blob::open("memory://", &Default::default(), false).unwrap(),
        );
        let mut previous = None;
        for (e, sections) in (1..).zip(epochs) {
            let o = cp
                .write_node_epoch(&NodeEpoch {
                    epoch: e,
                    node: "n".into(),
                    key_groups: sections,
                })
                .await
                .unwrap();
            commit(&cp, e, previous, o).await;
            previous = Some(e);
        }
        (dir, store, cp)
    }

    /// Commits epoch `e` (after `previous`) listing object `o`.
    async fn commit(
        cp: &CheckpointStore,
        e: u64,
        previous: Option<u64>,
        o: crate::checkpoint::format::ObjectRef,
    ) {
        cp.commit(&Manifest {
            epoch: e,
            previous,
            created_ms: 0,
            objects: vec![o],
            writer: Some("test/1".into()),
        })
        .await
        .unwrap();
    }

    /// `lists` finds an object in the manifest of its epoch, or in the merged manifest of a run
    /// of epochs (walking back from the newest manifest read); it names a manifest it cannot
    /// read rather than answering "not listed".
    #[tokio::test]
    async fn lists_walks_back_to_a_merged_manifest_and_names_one_it_cannot_read() {
        let blob = crate::checkpoint::blob::open("memory://", &Default::default(), false).unwrap();
        let cp = CheckpointStore::new(blob.clone());
        let object = |e: u64| NodeEpoch {
            epoch: e,
            node: "n".into(),
            key_groups: vec![section(3, key(3, "a"), b"1")],
        };
        let first = cp.write_node_epoch(&object(1)).await.unwrap();
        commit(&cp, 1, None, first.clone()).await;
        // Epochs 2 to 4 uploaded as one run: one manifest, labelled 4, whose merged object
        // names the parts of epochs 2 and 3 that removed egress records.
        let mut run = cp.write_node_epoch(&object(4)).await.unwrap();
        run.merged = vec!["part-2".into(), "part-3".into()];
        commit(&cp, 4, Some(1), run.clone()).await;
        assert!(lists(&cp, 1, &first.path, None).await.unwrap());
        assert!(!lists(&cp, 1, &run.path, Some(4)).await.unwrap());
        assert!(lists(&cp, 4, &run.path, None).await.unwrap());
        assert!(lists(&cp, 3, "part-3", Some(4)).await.unwrap());
        assert!(lists(&cp, 2, "part-2", Some(4)).await.unwrap());
        assert!(!lists(&cp, 3, "part-9", Some(4)).await.unwrap());
        // Nothing newer to walk back from: epoch 3 did not commit as far as this reader knows.
        assert!(!lists(&cp, 3, "part-3", None).await.unwrap());
        assert!(!lists(&cp, 5, "part-3", Some(4)).await.unwrap());
        // The manifest of the run is unreadable: an error naming it, not "not listed".
        let path = object_store::path::Path::from(crate::checkpoint::format::manifest_path(4));
        let path = if blob.prefix.as_ref().is_empty() {
            path
        } else {
            object_store::path::Path::from(format!("{}/{}", blob.prefix, path))
        };
        object_store::ObjectStoreExt::put(
            &*blob.store,
            &path,
            bytes::Bytes::from_static(b"not json").into(),
        )
        .await
        .unwrap();
        let e = lists(&cp, 3, "part-3", Some(4)).await.unwrap_err();
        assert!(e.contains("cannot read the manifest of epoch 4"), "{e}");
    }

    fn section(kg: u32, key: Vec<u8>, value: &[u8]) -> KeyGroupSection {
        KeyGroupSection {
            key_group: kg,
            puts: vec![Entry {
                key,
                value: value.to_vec(),
            }],
            ..Default::default()
        }
    }

    /// A key group this node owned moved away while the node was down (another owner wrote
    /// "c" in it); the node restarts without it (recovery moves the applied marker past that
    /// delta without applying it here), regains it by a move, and is killed before loading it.
    /// Its next start rebuilds the key group whole: the restart without it marked it stale.
    /// Before, only a new store's first start marked unowned key groups, and "c" was lost.
    #[tokio::test]
    async fn a_key_group_lost_while_down_and_regained_before_a_crash_is_rebuilt_whole() {
        let (_dir, store, cp) = chain(vec![
            vec![section(3, key(3, "a"), b"1"), section(4, key(4, "b"), b"1")],
            vec![section(4, key(4, "c"), b"2")],
            vec![section(3, key(3, "a"), b"3")],
        ])
        .await;
        // Sled as the node left it when it went down: epoch 1, owning key groups 3 and 4.
        let mut w = crate::store::WriteBatch::default();
        w.put_raw(key(3, "a"), Some(b"1".to_vec()));
        w.put_raw(key(4, "b"), Some(b"1".to_vec()));
        store.write(w).unwrap();
        store.set_applied(1).unwrap();
        // Its restart: key group 4 moved away meanwhile.
        mark_unowned_stale(&store, 16, &[3]).unwrap();
        assert!(store.stale_key_groups().unwrap().contains(&4));
        assert_eq!(recover(&store, Some(&cp), &[3]).await.unwrap().committed, 3);
        // Key group 4 moved back (the move applied), the node killed before loading it.
        mark_unowned_stale(&store, 16, &[3, 4]).unwrap();
        recover(&store, Some(&cp), &[3, 4]).await.unwrap();
        let entries: Vec<(Vec<u8>, Vec<u8>)> = store.scan_key_group(4).unwrap();
        assert_eq!(
            entries,
            vec![(key(4, "b"), b"1".to_vec()), (key(4, "c"), b"2".to_vec())]
        );
        assert!(!store.stale_key_groups().unwrap().contains(&4));
    }

    /// A node killed after a move gave it a key group and before it loaded it (sled holds
    /// nothing of it, its applied marker is newer than the key group's older keys) rebuilds
    /// it whole at its start: its first start marked every key group it did not own stale.
    #[tokio::test]
    async fn a_key_group_gained_by_a_move_and_not_loaded_before_a_crash_is_rebuilt_whole() {
        // Another node owned key group 4: its key "b" in epoch 1, key "c" in epoch 3. Key
        // group 3 is this node's from the start.
        let (_dir, store, cp) = chain(vec![
            vec![section(3, key(3, "a"), b"1"), section(4, key(4, "b"), b"1")],
            vec![section(3, key(3, "a"), b"2")],
            vec![section(4, key(4, "c"), b"3")],
        ])
        .await;
        // This node's first start, owning key group 3 at epoch 2.
        mark_unowned_stale(&store, 16, &[3]).unwrap();
        let stale = store.stale_key_groups().unwrap();
        assert_eq!(stale.len(), 15);
        assert!(!stale.contains(&3) && stale.contains(&4));
        let r = recover(&store, Some(&cp), &[3]).await.unwrap();
        assert_eq!(r.committed, 3);
        // It gains key group 4 by a move (the move applied) and is killed before it loaded
        // it. Its next start owns 3 and 4; the store is not new any more.
        mark_unowned_stale(&store, 16, &[3, 4]).unwrap();
        recover(&store, Some(&cp), &[3, 4]).await.unwrap();
        let mut entries: Vec<Vec<u8>> = store
            .scan_key_group(4)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            vec![b"1".to_vec(), b"3".to_vec()],
            "key group 4 rebuilt whole, not only the delta after the marker"
        );
        assert!(!store.stale_key_groups().unwrap().contains(&4));
    }

    /// A node killed while it loaded a key group it gained (sled holds a partial copy, its
    /// applied marker an older epoch) rebuilds that key group whole at its start, while the
    /// key groups it held take only the deltas after its marker.
    #[tokio::test]
    async fn a_start_rebuilds_stale_key_groups_whole() {
        // Epoch 1 writes key groups 3 and 4; epoch 2 only 3.
        let (_dir, store, cp) = chain(vec![
            vec![section(3, key(3, "a"), b"1"), section(4, key(4, "b"), b"1")],
            vec![section(3, key(3, "a"), b"2")],
        ])
        .await;
        // Sled holds epoch 1 of key group 3; key group 4 was being loaded (cleared, marked).
        store
            .write_ops([(key(3, "a").as_slice(), Some(&b"1"[..]))].into_iter())
            .unwrap();
        store.reset_applied(1).unwrap();
        store.set_stale([4], true).unwrap();
        assert_eq!(store.stale_key_groups().unwrap(), [4].into());
        let r = recover(&store, Some(&cp), &[3, 4]).await.unwrap();
        assert_eq!(r.committed, 2);
        assert_eq!(r.report.source, "blob-deltas");
        let entries = |kg| {
            store
                .scan_key_group(kg)
                .unwrap()
                .into_iter()
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            entries(3),
            vec![b"2".to_vec()],
            "the delta after the marker"
        );
        assert_eq!(
            entries(4),
            vec![b"1".to_vec()],
            "rebuilt whole (no delta after 1)"
        );
        assert!(store.stale_key_groups().unwrap().is_empty());
        // A stale key group the node does not own stays marked, untouched.
        store.set_stale([9], true).unwrap();
        recover(&store, Some(&cp), &[3, 4]).await.unwrap();
        assert_eq!(store.stale_key_groups().unwrap(), [9].into());
    }

    /// The applier waits out its merge window asleep: `Router::want_apply` ends the window at
    /// once, and the driver going away (its sender dropped, the applier unparked) ends the
    /// applier once it has written what it holds.
    #[test]
    fn the_applier_sleeps_out_its_merge_window_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16).unwrap();
        let metrics = crate::metrics::Metrics::new();
        let router = Router::new(
            1,
            16,
            1000,
            1 << 20,
            Arc::new(crate::registry::Registry::default()),
            crate::egress::Egress::new(16, metrics.clone()),
            metrics,
            true,
            Default::default(),
            Arc::new(crate::mesh::Placement::new(1)),
        );
        let (etx, mut erx) = mpsc::unbounded_channel();
        let (atx, arx) = std::sync::mpsc::channel();
        let thread = {
            let (store, router) = (store.clone(), router.clone());
            std::thread::spawn(move || applier(store, router, etx, arx, Duration::from_secs(60), 0))
        };
        router.set_applier(thread.thread().clone());
        let applied = |erx: &mut mpsc::UnboundedReceiver<DriverEvent>, what: &str| -> u64 {
            let start = Instant::now();
            loop {
                match erx.try_recv() {
                    Ok(DriverEvent::Applied { epoch, result }) => {
                        assert!(result.is_ok(), "{what}: {result:?}");
                        return epoch;
                    }
                    Ok(_) => panic!("{what}: an event other than Applied"),
                    Err(_) => {
                        assert!(
                            start.elapsed() < Duration::from_secs(5),
                            "{what}: not applied within 5 s"
                        );
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        };
        atx.send((1, None)).unwrap();
        atx.send((2, None)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            erx.try_recv().is_err(),
            "applied within its merge window, unasked"
        );
        router.want_apply();
        assert_eq!(applied(&mut erx, "asked to apply now"), 2);
        assert_eq!(router.applied(), 2);
        // The next window: the driver goes away (as `Stop` and `Drop for Driver` do it).
        atx.send((3, None)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(atx);
        router.want_apply();
        assert_eq!(applied(&mut erx, "the driver gone"), 3);
        let start = Instant::now();
        while !thread.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the applier outlives its driver"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
