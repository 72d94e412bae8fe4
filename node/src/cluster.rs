//! The node's replica of the control group (`statemesh_mesh::group`), run as a tokio task.
//!
//! A node started without `--join` on a new data directory bootstraps a new cluster with
//! itself as the only voter (its log in `<data_dir>/control`, raft-engine, fsynced; the first
//! state is a snapshot at index 1, so that every later member starts from it). A node started
//! with `--join` on a new data directory asks a member (`statemesh.mesh.v1.Mesh/Join`,
//! redirected to the leader) and is added as a learner; the leader then streams it the log
//! ([`crate::mesh::Link`]: one gRPC stream per peer carrying Raft messages as bytes). Every
//! start (re)joins: a `Join` entry proposed from any member (forwarded to the leader by
//! raft-rs) gives the node its next generation.
//!
//! The leader reconciles the Raft configuration with the members (ConfChangeV2, joint
//! consensus left explicitly): 1 voter for up to 2 members, 3 for 3–4, 5 from 5; the others
//! are learners. The key groups are all assigned to the first node when it bootstraps the
//! cluster (joins wait until they are). Then, while it leads the cluster's epochs, the leader
//! moves key groups to the members rendezvous hashing gives them, a round at a time (at most
//! every 2 s): an epoch after which no egress record is read commits, every participant
//! holds, the moves are proposed, and everyone resumes after rolling back to the last
//! committed epoch (new owners load their key groups from blob storage). Every node routes
//! every address to its owner ([`crate::mesh::Placement`]).
//!
//! The node id is kept in `<data_dir>/node-id`: generated on the first start unless
//! `--node-id` gives it, and a data directory of one node refuses to start as another.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use statemesh_mesh::control::{ClusterState, Command, EpochBytes, Member, Outcome, RaftConf, Role};
use statemesh_mesh::group::{ControlNode, Timing};
use statemesh_mesh::placement::NodeId;
use statemesh_mesh::storage::{open_in, EngineStorage};
use statemesh_proto::mesh_v1 as mpb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::checkpoint::driver::DriverEvent;
use crate::checkpoint::format::{Manifest, ObjectRef};
use crate::checkpoint::store::CheckpointStore;
use crate::mesh::{ControlInput, Link, Placement};
use statemesh_mesh::epoch::{EpochLeader, EpochMsg, LeadAction, LeadInput};
use statemesh_mesh::failure::{Detector, FailureConfig, Lease};

/// An epoch message on its way (to a peer, to this node's leader side or its participant
/// side), or a result for the leader's side.
pub(crate) enum EpochRoute {
    Send {
        from: NodeId,
        to: NodeId,
        msg: EpochMsg,
    },
    /// A read of the newest manifest for the synchronisation of generation `gen` ended
    /// (dropped unless the epochs' leader still waits in that generation: an earlier one's
    /// read, or an earlier leader's, may predate this one's fence).
    Latest {
        gen: u64,
        r: Result<Option<u64>, String>,
    },
    /// A manifest write of the epochs' leader numbered `lead` ended (dropped unless that one
    /// still leads).
    ManifestDone {
        lead: u64,
        epoch: u64,
        result: Result<bool, String>,
    },
    /// An upload of the cluster's epoch log ended (its number): the newest epoch uploaded.
    Uploaded(u64, Result<u64, String>),
}

/// `[checkpoint] cluster_log`: epochs commit through the control group, and the leader
/// uploads the log's tail to blob storage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogConfig {
    /// Epochs commit through the control group (off: by a manifest put; the leader still
    /// uploads a tail left by a leader that had it on).
    pub enabled: bool,
    pub upload_interval: Duration,
    pub upload_bytes: u64,
    pub max_bytes: u64,
}

/// The most the cluster's epoch log holds: its tail is in every snapshot of the control
/// group, whose messages between members are refused over 256 MiB.
pub(crate) const LOG_MAX_BYTES: u64 = 128 << 20;

/// The epochs' leader's side of the cluster's epoch log (see the checkpoint OVERVIEW).
struct LogLead {
    cfg: LogConfig,
    /// Epochs proposed whose entries have not applied yet.
    proposed: std::collections::BTreeSet<u64>,
    /// A synchronisation waits for the newest manifest: its generation, and whether its
    /// fence has applied (then the tail is uploaded before blob storage is read).
    sync: Option<(u64, bool)>,
    /// The number of the upload that runs.
    uploading: Option<u64>,
    /// When the last upload ended (or this leader started).
    last_upload: Instant,
    /// No upload before this (after a failure).
    retry_at: Instant,
    backoff: Duration,
    /// The tail is full (logged once per episode).
    full: bool,
}

impl LogLead {
    fn new(cfg: LogConfig) -> Self {
        LogLead {
            cfg,
            proposed: Default::default(),
            sync: None,
            uploading: None,
            last_upload: Instant::now(),
            retry_at: Instant::now(),
            backoff: Duration::from_millis(100),
            full: false,
        }
    }
}

/// What the control thread needs to lead cluster epochs.
pub(crate) struct EpochParams {
    /// Epoch messages and results for the control thread.
    pub tx: mpsc::UnboundedSender<EpochRoute>,
    pub rx: mpsc::UnboundedReceiver<EpochRoute>,
    /// This node's participant side.
    pub driver: mpsc::UnboundedSender<DriverEvent>,
    /// Blob storage (`None`: checkpoints off, no cluster epochs).
    pub cp: Option<CheckpointStore>,
    pub interval_ms: u64,
    pub max_uncommitted: u64,
    /// Failure detection and the ownership lease (`[mesh]`).
    pub failure: FailureConfig,
    /// This node's epoch log is active or holds epochs blob storage lacks: a second member
    /// joins only once it is uploaded (the members share blob storage's history).
    pub log_busy: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// `[checkpoint] cluster_log` and the upload settings.
    pub cluster_log: LogConfig,
}

/// An epoch that lacks a participant's part this long makes the leader synchronise again.
const EPOCH_STALL_MS: u64 = 10_000;
/// Committed epochs are recorded in the control group at most this often.
const RECORD_EVERY: Duration = Duration::from_millis(200);
/// Key groups moved per round (a round synchronises every participant: they roll back to the
/// last committed epoch and the new owners load their key groups from blob storage).
const MOVES_PER_ROUND: usize = 1024;
/// How long participants that own nothing wait for a move under way to end before they
/// leave the epochs the old way (a synchronisation that rolls everyone back).
const RETIRE_WAIT: Duration = Duration::from_secs(3);
/// How long the participants wait to drop a dead member until its key groups can be taken
/// over (its lease runs out `lease_ms` after the leader took over at the latest), so that the
/// synchronisation dropping it is the failover. Without the wait, a leader elected because the
/// old one died declares it dead before its lease ran out, drops it without moving its key
/// groups, and the failover waits for a later moment when no move or synchronisation is
/// under way (a busy, noisy cluster may not have one for seconds).
const ORPHAN_WAIT: Duration = Duration::from_secs(3);
/// How long removing a member from the Raft group waits for it to leave the cluster's epochs
/// (`RETIRE_WAIT`, then the drain of the open epochs).
const CONF_WAIT_FOR_RETIRE: Duration = Duration::from_secs(6);
/// How often a leader says why planned moves do not start.
const MOVES_STUCK_LOG: Duration = Duration::from_secs(10);
/// Rounds of moves start at most this often.
const MOVE_ROUND_EVERY: Duration = Duration::from_secs(2);

/// One tick of the control group.
const TICK: Duration = Duration::from_millis(50);
/// The longest an idle epoch leader goes without a tick (see the control loop).
const LEADER_IDLE_TICK: Duration = Duration::from_millis(100);
/// Applied entries kept behind a compaction (a member further behind is sent a snapshot).
const KEEP_ENTRIES: u64 = 1000;

/// A member as `GET /v1/cluster` shows it: its record and how many key groups it owns.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    /// The member (id, generation, addresses, role, alive).
    #[serde(flatten)]
    pub member: Member,
    /// Key groups it owns.
    pub key_groups: usize,
}

/// The cluster as this node sees it (`GET /v1/cluster`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterView {
    /// This node's id.
    pub node_id: NodeId,
    /// The cluster's id.
    pub cluster_id: String,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// Bumped by every change of the key-group table.
    pub placement_version: u64,
    /// The newest epoch committed (today the node's own checkpoint epochs).
    pub committed_epoch: u64,
    /// The highest epoch number the epochs' leaders reserved (with `cluster_log = false`;
    /// 0: none, see `Command::ReserveEpochs`).
    pub epochs_reserved: u64,
    /// The control log's applied index.
    pub applied_index: u64,
    /// Key groups without an owner yet.
    pub unassigned_key_groups: usize,
    /// The members.
    pub members: Vec<MemberView>,
    /// This node has left the cluster (the process stops).
    #[serde(skip)]
    pub left: bool,
    /// Members the leader has not heard from for the failure timeout (declared dead once the
    /// stability window passes); only the leader knows.
    pub suspected: Vec<NodeId>,
    /// A live move under way.
    pub moving: Option<MovingView>,
    /// The last changes of membership and ownership, newest last.
    pub history: Vec<Change>,
    /// The cluster's epoch log: committed epochs blob storage does not hold yet.
    pub epoch_log: EpochLogView,
}

/// The cluster's epoch log as a member sees it (it is part of the control group's state).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EpochLogView {
    /// Epochs it holds.
    pub epochs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The newest epoch uploaded to blob storage.
    pub uploaded: u64,
    /// `[checkpoint] log_max_bytes` of this node (epochs wait for an upload beyond it).
    pub max_bytes: u64,
}

impl EpochLogView {
    /// Why epochs cannot commit through the log now, if it is full.
    pub fn full(&self) -> Option<String> {
        (self.max_bytes > 0 && self.bytes >= self.max_bytes).then(|| {
            format!(
                "the cluster's epoch log holds {} epochs ({} bytes) that blob storage does not have yet, at [checkpoint] log_max_bytes ({}): epochs wait for an upload",
                self.epochs, self.bytes, self.max_bytes
            )
        })
    }
}

/// A change of membership or ownership as this node applied it (`GET /v1/cluster`'s
/// `history`, newest last; entries replayed at a start are dated then).
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// When this node applied it (ms since the Unix epoch).
    pub at_ms: u64,
    /// Its index in the control log.
    pub index: u64,
    /// `join`, `rejoin`, `failure` (declared dead), `stop` (it said it stopped: SIGTERM),
    /// `leave` (started), `left` (removed), `failover` (a dead or stopped member's key groups
    /// moved), `rebalance`.
    pub why: &'static str,
    /// The member concerned (none for moves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    /// Key groups moved (moves).
    #[serde(skip_serializing_if = "is_zero")]
    pub key_groups: usize,
    /// The generation (joins, deaths) or the receivers (moves).
    pub detail: String,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A key group moving live now, as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct MovingView {
    /// The epoch at whose cut the moving key groups stop at their old owners.
    pub at_epoch: u64,
    /// (key group, from, to).
    pub key_groups: Vec<(u32, Option<NodeId>, Option<NodeId>)>,
}

/// How many changes `GET /v1/cluster` keeps.
const HISTORY: usize = 64;

/// Shared with the admin endpoints.
pub type ClusterHandle = Arc<Mutex<ClusterView>>;

/// How a refused leave's UNAVAILABLE begins when it may be asked again at once: no leader is
/// known (an election, a majority down), or the proposal was dropped (a leadership change).
/// `statemesh cluster leave` asks again on these only (a node that is stopping, or that cannot
/// be reached, is not waited for).
pub const LEAVE_NOT_PROPOSED: &str = "the leave was not proposed";

/// Asks this node's control group to leave the cluster (see `ControlInput::Leave`).
pub(crate) async fn leave(mesh: &crate::mesh::MeshService) -> Result<(), Status> {
    let (tx, rx) = oneshot::channel();
    mesh.inbox
        .send(ControlInput::Leave { reply: tx })
        .await
        .map_err(|_| Status::unavailable("the control group is stopping"))?;
    rx.await
        .map_err(|_| Status::unavailable("the control group is stopping"))?
}

/// Reads or creates the node id kept in the data directory.
pub fn node_id(data_dir: &Path, given: Option<NodeId>) -> Result<NodeId, String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let stored: NodeId = s.trim().parse().map_err(|_| {
                format!(
                    "{}: expected a node id (a positive integer), found {s:?}",
                    path.display()
                )
            })?;
            match given {
                Some(g) if g != stored => Err(format!(
                    "the data directory {} belongs to node {stored}, not {g}",
                    data_dir.display()
                )),
                _ => Ok(stored),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = match given {
                Some(0) => return Err("--node-id: 0 is reserved; use a positive integer".into()),
                Some(g) => g,
                None => generated_id(),
            };
            std::fs::write(&path, format!("{id}\n"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn generated_id() -> NodeId {
    // Positive and printable as a JSON number without loss.
    (random_u64() >> 12).max(1)
}

/// The control group of this node, opened (and joined) but not started yet.
pub(crate) struct Opened {
    /// This node.
    pub id: NodeId,
    /// The state machine as of the last start (or the new cluster's).
    pub state: ClusterState,
    storage: EngineStorage,
    /// The cluster's id.
    pub cluster_id: Arc<str>,
    /// This process start.
    incarnation: u64,
    /// This start bootstrapped a new cluster in a new data directory.
    pub bootstrapped: bool,
    /// The cluster's blob location (empty: not known, or checkpoints are off).
    pub checkpoint_url: String,
    /// The transport's inbox (the mesh service sends here) and its receiving end.
    pub inbox: mpsc::Sender<ControlInput>,
    inbox_rx: mpsc::Receiver<ControlInput>,
    /// A restarting member whose `--join` members did not confirm the cluster: where, and
    /// what, it tells them again while it knows no leader ([`Driver::announce`]).
    announce: Option<Announce>,
}

/// How long a restarting member waits for a member named by `--join` to confirm the cluster
/// id; when none answers (the whole cluster restarts), it starts anyway.
const REJOIN_CHECK: Duration = Duration::from_secs(3);
/// How long a new node tries to join before giving up.
const JOIN_PATIENCE: Duration = Duration::from_secs(10);

/// Opens the control group in `data_dir` and finds this node's place: a new data directory
/// without `join` bootstraps a new cluster; with `join`, it joins the cluster there (refused:
/// an error naming why, nothing joined); an existing one restarts as the member it was
/// (checking, when `join` is given, that the cluster there is the same).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn open(
    data_dir: &Path,
    id: NodeId,
    key_groups: u32,
    join: &[String],
    grpc_addr: &str,
    http_addr: &str,
    checkpoint_url: &str,
    explicit_url: bool,
) -> Result<Opened, String> {
    let storage = open_in(data_dir, &RaftConf::default())?;
    let saved = storage.load_state()?;
    let mut announce = None;
    // A new node's join that may have been applied without an answer is finished by the next
    // start with the same incarnation (kept in `joining` until the join succeeds).
    let joining = data_dir.join("joining");
    let mut incarnation = random_u64().max(1);
    let mut finishing = false;
    if saved.is_none() && !join.is_empty() {
        if let Some(i) = std::fs::read_to_string(&joining)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            incarnation = i;
            finishing = true;
        }
        std::fs::write(&joining, format!("{incarnation}\n"))
            .map_err(|e| format!("{}: {e}", joining.display()))?;
    }
    let request = |cluster_id: &str| mpb::JoinRequest {
        id,
        grpc_addr: grpc_addr.to_string(),
        http_addr: http_addr.to_string(),
        cluster_id: cluster_id.to_string(),
        incarnation,
        key_groups,
        checkpoint_url: if explicit_url {
            checkpoint_url.to_string()
        } else {
            String::new()
        },
    };
    let fresh_bootstrap = saved.is_none() && join.is_empty();
    let state = match saved {
        None if join.is_empty() => {
            let mut s = ClusterState::new(key_groups);
            s.cluster_id = format!("{:016x}", random_u64());
            s.checkpoint_url = checkpoint_url.to_string();
            s.conf = Some(RaftConf {
                voters: vec![id],
                ..Default::default()
            });
            storage.bootstrap(&s)?;
            s.applied_index = 1;
            tracing::info!(cluster = %s.cluster_id, node = id, "bootstrapped a new cluster");
            s
        }
        None => {
            let reply = match crate::mesh::join(join, request(""), JOIN_PATIENCE).await {
                Ok(r) => r,
                Err(e) if e.maybe_applied => {
                    return Err(format!(
                        "cannot join the cluster: {e} (the join may have been applied: start this node again on the same data directory to finish it)"
                    ))
                }
                Err(e) => {
                    // Not a member: the data directory is left as it was.
                    drop(storage);
                    let _ = std::fs::remove_dir_all(data_dir.join("control"));
                    let _ = std::fs::remove_file(data_dir.join("node-id"));
                    let _ = std::fs::remove_file(&joining);
                    return Err(format!("cannot join the cluster: {e}"));
                }
            };
            let mut s = ClusterState::new(key_groups);
            s.cluster_id = reply.cluster_id.clone();
            s.checkpoint_url = reply.checkpoint_url.clone();
            s.conf = Some(RaftConf::default());
            // Kept before anything else: a restart rejoins as this member of this cluster.
            storage.save_state(&s)?;
            let _ = std::fs::remove_file(&joining);
            if finishing {
                // The join applied was an earlier start's, with that start's addresses: this
                // start proposes its own Join (as a restarting member does) to record its own.
                incarnation = random_u64().max(1);
            }
            tracing::info!(cluster = %s.cluster_id, node = id, via = %join.join(","), "joined the cluster");
            s
        }
        Some(s) => {
            // Not this node itself (it does not serve yet: asking it would only wait).
            let join: Vec<String> = join
                .iter()
                .filter(|j| {
                    j.trim_start_matches("http://")
                        .trim_start_matches("https://")
                        != grpc_addr
                })
                .cloned()
                .collect();
            if !join.is_empty() {
                match crate::mesh::join(&join, request(&s.cluster_id), REJOIN_CHECK).await {
                    Ok(_) => {}
                    Err(e) if e.refused => return Err(format!("cannot rejoin the cluster: {e}")),
                    Err(e) => {
                        tracing::warn!(error = %e, "no member confirmed the cluster; starting on the local control log (the cluster may be restarting)");
                        announce = Some(Announce {
                            seeds: join.clone(),
                            req: request(&s.cluster_id),
                            asked: None,
                            refused: Arc::default(),
                        });
                    }
                }
            }
            s
        }
    };
    if state.table.len() != key_groups as usize {
        return Err(format!(
            "the control group of this data directory has {} key groups, the configuration {key_groups}",
            state.table.len()
        ));
    }
    let (inbox, inbox_rx) = mpsc::channel(crate::mesh::INBOX);
    Ok(Opened {
        checkpoint_url: state.checkpoint_url.clone(),
        bootstrapped: fresh_bootstrap,
        id,
        cluster_id: state.cluster_id.clone().into(),
        state,
        storage,
        incarnation,
        inbox,
        inbox_rx,
        announce,
    })
}

impl Opened {
    /// Undoes the bootstrap of a new cluster that must not start after all: the data
    /// directory is left as it was before this start.
    pub(crate) fn undo_bootstrap(self, data_dir: &Path, node_id_was_new: bool) {
        if self.bootstrapped {
            drop(self);
            let _ = std::fs::remove_dir_all(data_dir.join("control"));
            if node_id_was_new {
                let _ = std::fs::remove_file(data_dir.join("node-id"));
            }
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Starts the control group of this node as a task. `committed_epoch` reads the checkpoint
/// driver's committed epoch for the view; `placement` is kept current with the key-group
/// table.
pub(crate) fn start(
    opened: Opened,
    grpc_addr: String,
    http_addr: String,
    handle: ClusterHandle,
    placement: Arc<Placement>,
    committed_epoch: Box<dyn Fn() -> u64 + Send>,
    epochs: EpochParams,
) -> Result<Control, String> {
    let Opened {
        id,
        state,
        storage,
        cluster_id,
        incarnation,
        inbox,
        mut inbox_rx,
        announce,
        ..
    } = opened;
    placement.update(&state);
    let stop_inbox = inbox.clone();
    let node = ControlNode::new(id, storage, state, Timing::default())?;
    handle.lock().node_id = id;
    let h = handle;
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let left = Arc::new(tokio::sync::Notify::new());
    let left_tx = left.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the control group's runtime: {e}"))?;
    // Its own thread: the log's fsyncs never hold up ingress, and ingress never delays
    // heartbeats. The peer links run here too.
    let EpochParams {
        tx: epoch_tx,
        rx: mut epoch_rx,
        driver: epoch_driver,
        cp: epoch_cp,
        interval_ms,
        max_uncommitted,
        failure,
        log_busy,
        cluster_log,
    } = epochs;
    let main = async move {
        let mut c = Driver {
            lead: None,
            participants: None,
            epoch_tx,
            epoch_driver,
            epoch_cp,
            epoch_cfg: (interval_ms, max_uncommitted),
            log_cfg: cluster_log,
            uploads: 0,
            leads: 0,
            unconfirmed_done: Vec::new(),
            log_lead: None,
            kick: false,
            log_busy,
            writer: format!("{id}/{:016x}", random_u64()),
            record_wanted: 0,
            recorded_at: None,
            move_round: None,
            left_out: Default::default(),
            move_proposed: None,
            moves_stuck_logged: None,
            move_plan: Vec::new(),
            retire_wait: None,
            lead_wanted: None,
            alone: false,
            lead_after_alone: false,
            several: false,
            orphan_wait: None,
            conf_wait: None,
            leave_synced: HashMap::new(),
            failover_plan: Vec::new(),
            node,
            incarnation,
            joined: false,
            join_proposed: None,
            leave_proposed: None,
            removal_asked: None,
            announce,
            grpc_addr,
            http_addr,
            cluster_id,
            links: HashMap::new(),
            learned: HashMap::new(),
            seen_incarnations: HashMap::new(),
            inbox,
            pending_joins: HashMap::new(),
            conf_proposed: None,
            published: u64::MAX,
            detector: Detector::new(failure),
            lease: Lease::new(failure, random_u64()),
            failure,
            dead_proposed: HashMap::new(),
            lease_until: 0,
            remove_proposed: HashMap::new(),
            removed: BTreeSet::new(),
            transfer_asked: None,
            stopping: None,
            drain: None,
            handed_off: None,
            stop_begun: false,
            draining: HashMap::new(),
            left: false,
            last_heard: Instant::now(),
            last_leader: None,
            lease_lapsed: false,
            history: Default::default(),
        };
        // A restarted member says it is back: its peers' links to it, waiting out their
        // backoff, try again now (the leader's heartbeats and epochs reach it sooner).
        // (Members it knows as alive and staying: a link, once started, retries for as long
        // as the process runs.)
        let me = c.node.id();
        let peers: Vec<NodeId> = c
            .node
            .state()
            .members
            .values()
            .filter(|m| m.id != me && m.alive && !m.leaving)
            .map(|m| m.id)
            .collect();
        for id in peers {
            if let Some(link) = c.link(id) {
                link.hello();
            }
        }
        let mut tick = tokio::time::interval(TICK);
        // After a stall (an fsync, say) no burst of ticks: it would look like lost heartbeats.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The leader's epoch tick: every 1 ms, or while nothing is under way
        // (`EpochLeader::idle`: what changes that comes as an input and runs at once) 1 ms
        // after the interval's next epoch is due, at most every `LEADER_IDLE_TICK` (the
        // epoch log's uploads are looked at on these ticks).
        let mut epoch_tick = crate::ticker::Ticker::new(Duration::from_millis(1));
        let mut last_tick = Instant::now();
        // The members of the last published state: a link to one removed since is dropped.
        let mut members: BTreeSet<NodeId> = c.node.state().members.keys().copied().collect();
        loop {
            epoch_tick.arm(match c.lead.as_ref().filter(|l| l.idle()) {
                Some(l) => crate::ticker::until_due(
                    epoch_tick.since_last(),
                    l.next_start_ms(),
                    crate::shard::now_ms(),
                    Duration::from_millis(1),
                    LEADER_IDLE_TICK,
                ),
                None => Duration::from_millis(1),
            });
            tokio::select! {
                _ = &mut stop_rx => return,
                // Epoch messages and ticks do not run a Raft round (it runs on its own tick).
                r = epoch_rx.recv() => {
                    if let Some(r) = r {
                        c.epoch_route(r);
                    }
                    while let Ok(r) = epoch_rx.try_recv() {
                        c.epoch_route(r);
                    }
                    // Unless something was proposed (an epoch to log): its round runs now.
                    if !std::mem::take(&mut c.kick) {
                        continue;
                    }
                }
                _ = epoch_tick.tick(), if c.lead.is_some() => {
                    c.pass_confirmed_done();
                    c.lead_input(LeadInput::Tick { now_ms: crate::shard::now_ms() });
                    c.log_tick();
                    if !std::mem::take(&mut c.kick) {
                        continue;
                    }
                }
                _ = tick.tick() => {
                    // A thread held up for an election timeout (a long step, a stopped process,
                    // a starved CPU) costs this node its leadership or its lease: worth a line.
                    let gap = last_tick.elapsed();
                    last_tick = Instant::now();
                    if gap >= TICK * 10 {
                        tracing::warn!(
                            ms = gap.as_millis() as u64,
                            "the control thread was held up: no Raft tick for {} ms (heartbeats and elections waited)",
                            gap.as_millis()
                        );
                    }
                    c.node.tick();
                }
                input = inbox_rx.recv() => match input {
                    Some(i) => c.input(i),
                    None => return,
                },
            }
            // Whatever else arrived meanwhile, in one round.
            for _ in 0..256 {
                match inbox_rx.try_recv() {
                    Ok(i) => c.input(i),
                    Err(_) => break,
                }
            }
            if let Err(e) = c.round() {
                tracing::error!(error = %e, "control group: cannot write its log; stopping it");
                return;
            }
            let applied = c.node.state().applied_index;
            if applied != c.published {
                c.published = applied;
                placement.update(c.node.state());
                // A member removed (it left): its link goes (it stayed, idle, for as long as
                // this process ran). Only removals: a node catching up knows fewer members
                // than it links to.
                let now: BTreeSet<NodeId> = c.node.state().members.keys().copied().collect();
                for &gone in members.difference(&now) {
                    if c.links.remove(&gone).is_some() {
                        tracing::debug!(node = gone, "a member was removed: its link is dropped");
                    }
                    c.learned.remove(&gone);
                    c.removed.insert(gone);
                }
                c.removed.retain(|id| !now.contains(id));
                members = now;
            }
            let lone = c.node.state().members.keys().all(|&m| m == id);
            placement.set_lease(
                if lone { u64::MAX } else { c.lease_until },
                c.failure.lease_ms,
            );
            // A stop proposes itself only once its lease given up is published: at once then.
            if let Some(s) = c
                .stopping
                .as_mut()
                .filter(|s| !s.published && c.lease_until == 0)
            {
                s.published = true;
                if let Err(e) = c.round() {
                    tracing::error!(error = %e, "control group: cannot write its log; stopping it");
                    return;
                }
            }
            // A lapse while it owns key groups is worth a line (a cut-off node, or a control
            // thread held up): requests for them are refused until it is renewed.
            let lapsed = !lone
                && c.lease_until != 0
                && crate::mesh::mono_ms() >= c.lease_until
                && c.node.state().owned_by(id) > 0;
            if lapsed && !c.lease_lapsed {
                tracing::warn!(
                    leader = ?c.node.leader(),
                    applied = c.node.state().applied_index,
                    "this node's ownership lease lapsed: no read index confirmed by a majority within {} ms; its key groups are refused until it is renewed",
                    c.failure.lease_ms
                );
            }
            c.lease_lapsed = lapsed;
            *h.lock() = c.view(committed_epoch(), placement.moving());
            if c.left {
                // The view says so now (`Control::left`).
                left_tx.notify_waiters();
            }
        }
    };
    let thread = std::thread::Builder::new()
        .name("statemesh-control".into())
        .spawn(move || rt.block_on(main))
        .map_err(|e| format!("cannot start the control group's thread: {e}"))?;
    Ok(Control {
        stop: Some(stop_tx),
        thread: Some(thread),
        left,
        inbox: stop_inbox,
    })
}

/// The running control group (its thread).
pub(crate) struct Control {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Told after every round that publishes a view with `left` set.
    left: Arc<tokio::sync::Notify>,
    /// The control task's inbox (for [`Control::stopping`]).
    inbox: mpsc::Sender<ControlInput>,
}

impl Control {
    /// Resolves once `view` (the handle this group publishes to) says this node has left.
    pub(crate) async fn left(&self, view: &ClusterHandle) {
        loop {
            // Made before the look, so that a round publishing it in between is not missed.
            let told = self.left.notified();
            if view.lock().left {
                return;
            }
            told.await;
        }
    }

    /// This node stops (SIGTERM) with its last epoch committed: it gives up its ownership
    /// lease and tells the cluster, so that its key groups move to the others at once rather
    /// than after the failure timeout, during which the cluster's epochs (and so every
    /// acknowledgement, on every node) wait for its part (see `Driver::stop_step`). Returns
    /// once the group has taken it, or it gave up (`STOP_WAIT`).
    pub(crate) async fn stopping(&self) {
        self.wait_for(|reply| ControlInput::Stopping { reply }, STOP_WAIT * 2)
            .await
    }

    /// This node stops (SIGTERM), first of all: the cluster hands its key groups over to the
    /// others live and takes it out of its epochs while it goes on serving, so that its stop
    /// rolls nobody back (see `Driver::drain_step`). Returns once that is done, or it gave up
    /// (`DRAIN_WAIT`; the stop then moves its key groups by failover, as before).
    pub(crate) async fn drain(&self) {
        self.wait_for(
            |reply| ControlInput::Draining { reply },
            DRAIN_WAIT + Duration::from_secs(1),
        )
        .await
    }

    /// Gives the control task `input` and waits (at most `wait`) for its answer.
    async fn wait_for(
        &self,
        input: impl FnOnce(oneshot::Sender<()>) -> ControlInput,
        wait: Duration,
    ) {
        let (tx, rx) = oneshot::channel();
        if self.inbox.send(input(tx)).await.is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }

    /// Stops the control group and waits for its thread.
    pub(crate) async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

struct Driver {
    /// The leader's side of cluster epochs (while this node leads a cluster of several).
    lead: Option<EpochLeader>,
    /// The participants last given to `lead`.
    participants: Option<std::collections::BTreeMap<NodeId, u64>>,
    /// Since when this node should lead cluster epochs but does not yet, and how long it waits
    /// before it does (0; the fault point `mesh-lead-epochs`: a busy control thread).
    lead_wanted: Option<(Instant, u64)>,
    /// This node was alone in its cluster (it committed its own epochs) since it last led
    /// cluster epochs; and whether the epoch leader it leads now started so (see
    /// `lead_epochs`: its first synchronisation holds only this node).
    alone: bool,
    lead_after_alone: bool,
    /// This process has seen its cluster with several members: its participant side may
    /// follow a leader's epochs (it never goes back to committing its own), so the epochs
    /// are led even once the others have left.
    several: bool,
    epoch_tx: mpsc::UnboundedSender<EpochRoute>,
    epoch_driver: mpsc::UnboundedSender<DriverEvent>,
    epoch_cp: Option<CheckpointStore>,
    epoch_cfg: (u64, u64),
    /// `[checkpoint] cluster_log` and the upload settings.
    log_cfg: LogConfig,
    /// Uploads of the epoch log started (numbers them).
    uploads: u64,
    /// The epochs' leaders this node has been (numbers them: a manifest write answers the
    /// one that started it only).
    leads: u64,
    /// Manifest puts (`cluster_log = false`) of the epochs' leader that ended while its lease
    /// (`Lease::until_ms`) had lapsed, in order: passed on once it is confirmed again, dropped with
    /// the leader (see [`Driver::manifest_done`]).
    unconfirmed_done: Vec<(u64, Result<bool, String>)>,
    /// While it leads the epochs with the cluster's epoch log.
    log_lead: Option<LogLead>,
    /// Something was proposed outside a round: run one now.
    kick: bool,
    /// See [`EpochParams::log_busy`].
    log_busy: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Names this process in the manifests it writes.
    writer: String,
    /// The newest committed epoch to record in the control group, and when one last was.
    record_wanted: u64,
    recorded_at: Option<Instant>,
    /// When the last round of moves started, and the move proposed in it (the placement
    /// version it was proposed at, when).
    move_round: Option<Instant>,
    /// The participants the epoch leader leaves out now (logged when it changes).
    left_out: std::collections::BTreeSet<NodeId>,
    move_proposed: Option<(u64, Instant)>,
    /// When it last logged why planned moves do not start (every `MOVES_STUCK_LOG`).
    moves_stuck_logged: Option<Instant>,
    /// The key groups of the move round under way.
    move_plan: Vec<u32>,
    /// Since when participants that own nothing wait to leave the epochs live (a move is
    /// under way).
    retire_wait: Option<Instant>,
    /// Since when the participants wait to drop a dead member whose key groups cannot be taken
    /// over yet (the lease it may hold runs on): the synchronisation that drops it then moves
    /// them too (failover), for up to `ORPHAN_WAIT`.
    orphan_wait: Option<Instant>,
    /// Since when a change of the Raft group waits for a member it removes to leave the
    /// cluster's epochs, or to learn that its leave applied.
    conf_wait: Option<Instant>,
    /// Per member that leaves: the commit index it must report before it is removed from
    /// the Raft group (this leader's when its removal was first due, its leave among them).
    leave_synced: HashMap<NodeId, u64>,
    /// The moves of the failover in progress (empty for a handover round, whose moves are
    /// planned again when proposed).
    failover_plan: Vec<statemesh_mesh::control::MoveCommand>,
    node: ControlNode<EngineStorage>,
    /// This process start (see `Member::incarnation`).
    incarnation: u64,
    /// This start's Join has been applied.
    joined: bool,
    /// When this start's Join was last proposed.
    join_proposed: Option<Instant>,
    /// When this node last proposed its own `Leave` (a leave was asked for here): proposed
    /// again until it applies (a proposal forwarded to the leader can be lost).
    leave_proposed: Option<Instant>,
    grpc_addr: String,
    http_addr: String,
    cluster_id: Arc<str>,
    /// The stream to each peer.
    links: HashMap<NodeId, Link>,
    /// Addresses given by nodes' current processes (their streams, their join calls), used
    /// before the applied members' until the node's next Join applies: joiners, and members
    /// restarted at another address.
    learned: HashMap<NodeId, String>,
    /// Each member's incarnation as last seen applied (members only).
    seen_incarnations: HashMap<NodeId, u64>,
    /// For the links to report failures.
    inbox: mpsc::Sender<ControlInput>,
    /// Join calls waiting for their entry (id → incarnation, reply).
    pending_joins: HashMap<NodeId, (u64, oneshot::Sender<Result<mpb::JoinReply, Status>>)>,
    /// The configuration when a configuration change was last proposed, and when.
    conf_proposed: Option<(Option<RaftConf>, Instant)>,
    /// The applied index the placement was last updated at.
    published: u64,
    /// The leader's failure detector.
    detector: Detector,
    /// This node's lease: its end is the ownership lease's (`lease_until`, in `mono_ms`; 0
    /// while it stops) and, also while it stops, that of the epochs' leader with manifest puts
    /// (`cluster_log = false`: it still leads until its successor does, see
    /// [`Driver::manifest_done`]).
    lease: Lease,
    lease_until: u64,
    failure: FailureConfig,
    /// Deaths proposed (member → generation, when), proposed again after `REPROPOSE`.
    dead_proposed: HashMap<NodeId, (u64, Instant)>,
    /// When the Raft leader's replication (an append, a heartbeat, a snapshot) last arrived.
    last_heard: Instant,
    /// The last leader other than this node it knew.
    last_leader: Option<NodeId>,
    /// The lease lapsed while it owned key groups (logged once per lapse).
    lease_lapsed: bool,
    /// The last changes (see [`Change`]).
    history: std::collections::VecDeque<Change>,
    /// Members removed from the published state (until they join again): no link to them is
    /// started again (a removed node that does not know it yet still sends, and its
    /// pre-votes are answered; a link made for an answer would retry for ever).
    removed: BTreeSet<NodeId>,
    /// Removals proposed (members that left), and when: each is proposed again only after
    /// `REPROPOSE` (two members that left at once were proposed again every round).
    remove_proposed: HashMap<NodeId, Instant>,
    /// When this leader, leaving, last handed its leadership over (see `reconcile_conf`).
    transfer_asked: Option<Instant>,
    /// Stopping (SIGTERM): see [`Driver::stop_step`].
    stopping: Option<Stopping>,
    /// Stopping (SIGTERM), first: its key groups handed over live (see [`Driver::drain_step`]).
    drain: Option<Drain>,
    /// The hand-over of the epochs this leader proposed (its fence, `Command::Fence`).
    handed_off: Option<statemesh_mesh::control::EpochHandoff>,
    /// This process is stopping (SIGTERM): as the leader it drains nobody (see
    /// `drain_asked`).
    stop_begun: bool,
    /// As the leader: the members that stop and asked to be drained (`Mesh.Drain`), by id:
    /// the process (incarnation) and when it last asked. Placement leaves them out, and so do
    /// the cluster's epochs once they own nothing; a drain not asked again for `DRAIN_TTL` is
    /// forgotten (the member is gone, or gave up).
    draining: HashMap<NodeId, (u64, Instant)>,
    /// This node left the cluster (`statemesh cluster leave`): it owns nothing and is out of
    /// the Raft group; the process stops.
    left: bool,
    /// When this node, leaving and hearing nothing from the group, last asked its peers
    /// whether it is still a member (`ask_if_removed`), and the task asking.
    removal_asked: Option<(Instant, tokio::task::JoinHandle<()>)>,
    /// A restarting member that found no member of its `--join` list confirming the cluster
    /// (the whole cluster restarting): those members, its join request, and the task telling
    /// them again, an attempt a second while this node knows no leader, until its own `Join`
    /// applies or a member refuses it. A member records where a restarting member serves now
    /// from its request even without a leader, so a whole cluster restarted on new addresses
    /// finds itself again, whichever order its members start in.
    announce: Option<Announce>,
}

/// Why a node configured as `req` says cannot be a member of the cluster of `state` (its key
/// groups, or its blob location), if it cannot.
fn join_misfit(req: &mpb::JoinRequest, state: &ClusterState) -> Option<String> {
    let id = req.id;
    if req.key_groups != 0 && req.key_groups as usize != state.table.len() {
        return Some(format!(
            "node {id} is configured with {} key groups, this cluster has {}",
            req.key_groups,
            state.table.len()
        ));
    }
    if !req.checkpoint_url.is_empty()
        && !state.checkpoint_url.is_empty()
        && req.checkpoint_url != state.checkpoint_url
    {
        return Some(format!(
            "node {id} is configured with the blob location {:?}, this cluster uses {:?}: every member writes its checkpoints to the cluster's (leave --checkpoint-url out to use it)",
            req.checkpoint_url, state.checkpoint_url
        ));
    }
    None
}

/// What [`Driver::announce`] tells, to whom, its last attempt, and whether a member refused it.
struct Announce {
    seeds: Vec<String>,
    req: mpb::JoinRequest,
    asked: Option<(Instant, tokio::task::JoinHandle<()>)>,
    refused: Arc<std::sync::atomic::AtomicBool>,
}

/// A member leaving that owns nothing and has had no replication from the Raft group's
/// leader this long has left (the group stopped sending to it; the leader still answers its
/// read indexes, which kept a chaos run's removed member waiting for ever).
const LEFT_SILENCE: Duration = Duration::from_secs(3);

/// How long a proposal that changed nothing waits before it is proposed again.
const REPROPOSE: Duration = Duration::from_secs(2);

/// How long a stopping member tries to have its stop taken (a leader: its leadership handed
/// over first) before it exits all the same; the others then declare it dead once it has been
/// silent for the failure timeout, as after a crash.
const STOP_WAIT: Duration = Duration::from_millis(1_500);

/// How often a stopping member proposes its stop again.
const STOP_REPROPOSE: Duration = Duration::from_millis(100);

/// How often a stopping leader asks again for the transfer of its leadership (raft-rs gives a
/// transfer an election timeout, 0.5 s here, before it drops it).
const STOP_TRANSFER_AGAIN: Duration = Duration::from_millis(500);

/// Member `id`'s generation in `state` (0 if it is not a member).
fn generation_of(state: &ClusterState, id: NodeId) -> u64 {
    state.members.get(&id).map_or(0, |m| m.generation)
}

/// Whether a majority of the voters stays alive once member `me` is dead (the control group
/// refuses a stop otherwise: `ClusterState`'s check of `MarkDead { stopped }`).
fn alive_after_stop(state: &ClusterState, me: NodeId) -> bool {
    let (alive, voters) = state.voters_alive_without(me);
    alive > voters / 2
}

/// How long a stopping member waits for the cluster to hand its key groups over before it
/// stops as before (its key groups fail over, and every participant rolls back).
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// How often a stopping member asks the leader to drain it (and how it learns it is done).
const DRAIN_ASK_EVERY: Duration = Duration::from_millis(100);
/// A stopping member that sees no leader for this long stops as before (an election takes
/// 0.5–1 s; a cluster stopped as a whole elects none).
const DRAIN_LEADERLESS: Duration = Duration::from_secs(2);
/// How long a stopping leader waits for the cluster's epochs to stand still for the next
/// leader (the open ones commit; see `LeadInput::HandOff`) before it hands its leadership over
/// all the same.
const HANDOFF_WAIT: Duration = Duration::from_secs(1);
/// A leader that stops waits this long before it moves its own key groups away: members that
/// stop with it (the whole cluster is being stopped) ask for their drains meanwhile, and it
/// then gives its own up, so that no move runs while they stop.
const LEADER_DRAIN_GRACE: Duration = Duration::from_millis(200);
/// A drain the leader was not asked again for this long is forgotten.
const DRAIN_TTL: Duration = Duration::from_secs(2);

/// A member's drain under way (`ControlInput::Draining`): the leader hands its key groups over
/// to the others live and takes it out of the cluster's epochs, as for a leave, but it stays
/// a member (restarted, it gets its share back).
struct Drain {
    since: Instant,
    /// When it last asked the leader (or asked for a leadership transfer), and whether an
    /// ask is in flight.
    asked: Option<Instant>,
    in_flight: bool,
    /// The voter it hands the leadership to, when it leads (as for a stop), and when it last
    /// asked for the transfer.
    transfer_to: Option<NodeId>,
    transfer_asked: Option<Instant>,
    /// When it leads: since when it asks the epochs to stand still for the next leader
    /// (`LeadInput::HandOff`; `asked`: when it last asked).
    handoff: Option<Instant>,
    /// Since when it has seen no leader (`DRAIN_LEADERLESS`).
    leaderless: Option<Instant>,
    /// The leader's last answer (logged when it changes).
    last: Option<(u32, bool)>,
    /// The leader said it is drained: the stop goes on, and the member keeps asking, so
    /// that the leader does not give it key groups again before its stop applies.
    done: bool,
    /// It leads, and its own key groups move away (after `LEADER_DRAIN_GRACE`).
    moving_own: bool,
    reply: Option<oneshot::Sender<()>>,
}

/// A member's graceful stop under way (`ControlInput::Stopping`).
struct Stopping {
    since: Instant,
    /// It led the group when the stop began (only then does it hand the leadership over).
    led: bool,
    /// When it last proposed its stop or asked for the transfer, and whether that was the
    /// transfer (once it follows, its stop is proposed at once).
    asked: Option<(Instant, bool)>,
    /// The voter it hands the leadership to (kept while it stays live: asking another would
    /// abort the transfer under way).
    transfer_to: Option<NodeId>,
    /// The placement has been told that its lease is given up: only then is its stop
    /// proposed (the leader moves its key groups at once on it).
    published: bool,
    reply: Option<oneshot::Sender<()>>,
}

impl Driver {
    fn input(&mut self, i: ControlInput) {
        match i {
            ControlInput::Raft { from, addr, msgs } => {
                if !addr.is_empty() {
                    self.learned.insert(from, addr);
                }
                for m in msgs {
                    match self.node.step(&m) {
                        // The member that created it (a read index forwarded by another member
                        // names its origin): what the ownership leases are bounded by. Not a
                        // campaign: a member that hears nothing still sends those.
                        Ok(s) => {
                            if s.sign_of_life() {
                                let now = crate::mesh::mono_ms();
                                self.detector.heard(from, now);
                                self.detector.heard(s.origin, now);
                            }
                            if s.replication {
                                self.last_heard = Instant::now();
                            }
                        }
                        Err(e) => tracing::debug!(from, error = %e, "raft message not taken"),
                    }
                }
            }
            ControlInput::Unreachable(peer) => {
                self.node.report_unreachable(peer);
                self.node.report_snapshot(peer, false);
                // Epoch messages queued on the broken stream are gone: synchronise now rather
                // than when the epoch stalls (a dead participant is left out after a while).
                self.lead_input(LeadInput::Unreachable(peer));
            }
            ControlInput::PeerStream { from, addr } => {
                // At the address it serves on now (a restart may have moved it): the link
                // starts again there, or is woken where it is.
                if !addr.is_empty() {
                    self.learned.insert(from, addr);
                }
                if self.links.contains_key(&from) {
                    if let Some(link) = self.link(from) {
                        link.wake();
                    }
                }
            }
            ControlInput::Join { req, reply } => self.join_request(req, reply),
            ControlInput::Leave { reply } => {
                let _ = reply.send(self.leave());
            }
            ControlInput::Stopping { reply } => self.begin_stop(reply),
            ControlInput::Draining { reply } => self.begin_drain(reply),
            ControlInput::DrainAsk {
                id,
                incarnation,
                reply,
            } => {
                let _ = reply.send(self.drain_asked(id, incarnation));
            }
            ControlInput::DrainAnswer(answer) => self.drain_answer(answer),
            ControlInput::Membership { id, reply } => {
                let s = self.node.state();
                let _ = reply.send(mpb::MembershipReply {
                    applied_index: s.applied_index,
                    member: s.members.contains_key(&id),
                });
            }
            ControlInput::RemovedAt {
                peer,
                applied_index,
            } => {
                // Its own applied state lists it (else it would have counted as gone): the
                // peer's, further along the same log, applied its removal since. Only a leave
                // removes a member, and this node is leaving: this process asked, or its
                // applied state says so (an earlier process asked). (As with its own log's
                // removal: a Remove meant for an earlier process of this node that applies
                // after this process's leave was asked would stop it too.)
                let mine = self.node.state().applied_index;
                if self.leaving() && !self.left && applied_index > mine {
                    tracing::info!(
                        node = self.node.id(),
                        peer,
                        peer_applied = applied_index,
                        applied = mine,
                        "this node has left the cluster: a peer has applied its removal, which this node never heard of (the group stops sending to a removed member); stopping"
                    );
                    self.left = true;
                }
            }
        }
    }

    /// This node stops (SIGTERM), its last epoch committed: unless it has nothing to tell (a
    /// node alone, one not or no longer a live member, one that leaves), it gives up its
    /// ownership lease now (published at the end of this round: requests for its key groups
    /// are refused from then on) and proposes its own death, `stopped`, in the next rounds
    /// ([`Driver::stop_step`]).
    fn begin_stop(&mut self, reply: oneshot::Sender<()>) {
        let me = self.node.id();
        let state = self.node.state();
        let live_peer = state.members.values().any(|m| m.id != me && m.alive);
        let live_member = state
            .members
            .get(&me)
            .is_some_and(|m| m.alive && m.incarnation == self.incarnation);
        if !live_peer || !live_member || !self.joined || self.leaving() || self.left {
            let _ = reply.send(());
            return;
        }
        tracing::info!(
            node = me,
            leader = self.node.is_leader(),
            "stopping: this node gives up its ownership lease and tells the cluster, so that its key groups move to the others now"
        );
        // (Its lease itself goes on being renewed while it leads the epochs: see `lease_stands`.)
        self.lease_until = 0;
        self.stopping = Some(Stopping {
            since: Instant::now(),
            led: self.node.is_leader(),
            asked: None,
            transfer_to: None,
            published: false,
            reply: Some(reply),
        });
    }

    /// This node stops (SIGTERM), before anything else: unless it has nothing to hand over (a
    /// node alone, one not or no longer a live member, one that leaves, one that owns nothing
    /// and takes no part in the epochs) or the cluster is being stopped (a majority of the
    /// voters would not stay alive after it), it asks the leader to hand its key groups over to
    /// the others live and take it out of the epochs ([`Driver::drain_step`]), so that its stop
    /// rolls nobody back. It goes on serving meanwhile; the reply goes once the leader says it
    /// is drained, or it gave up (`DRAIN_WAIT`; the stop then goes as before).
    fn begin_drain(&mut self, reply: oneshot::Sender<()>) {
        self.stop_begun = true;
        let me = self.node.id();
        let state = self.node.state();
        let live_peer = state.members.values().any(|m| m.id != me && m.alive);
        let live_member = state
            .members
            .get(&me)
            .is_some_and(|m| m.alive && m.incarnation == self.incarnation);
        // (Without checkpoints there are no cluster epochs, and no live moves.)
        if !live_peer
            || !live_member
            || !self.joined
            || self.leaving()
            || self.left
            || self.epoch_cp.is_none()
            || !alive_after_stop(state, me)
        {
            let _ = reply.send(());
            return;
        }
        tracing::info!(
            node = me,
            owned = state.owned_by(me),
            leader = self.node.is_leader(),
            "stopping: asking the cluster to hand this node's key groups over to the others before it exits (nobody rolls back)"
        );
        self.drain = Some(Drain {
            since: Instant::now(),
            asked: None,
            in_flight: false,
            transfer_to: None,
            transfer_asked: None,
            handoff: None,
            leaderless: None,
            last: None,
            done: false,
            moving_own: false,
            reply: Some(reply),
        });
    }

    /// A draining member's step, each round: a leader hands the Raft group's leadership over
    /// first (as for a stop: only a follower is drained); a follower asks the leader every
    /// `DRAIN_ASK_EVERY` until it answers that the member owns nothing and is out of the
    /// epochs. It gives up after `DRAIN_WAIT`, when the leader refuses (no other member can
    /// take its key groups; a leader of an older build), or when it has seen no leader for
    /// `DRAIN_LEADERLESS`.
    fn drain_step(&mut self) {
        let Some(d) = self.drain.as_mut() else {
            return;
        };
        let me = self.node.id();
        if !d.done && d.since.elapsed() >= DRAIN_WAIT {
            tracing::warn!(
                node = me,
                "stopping: the cluster did not hand this node's key groups over within {} ms; stopping as before (its key groups fail over)",
                DRAIN_WAIT.as_millis()
            );
            self.end_drain();
            return;
        }
        if self.node.leader().is_some() {
            d.leaderless = None;
        }
        let leads = self.node.is_leader();
        if leads && d.done {
            // (It leads again: a transfer came back to it. Its stop exits without telling.)
            return;
        }
        if leads {
            // First its own key groups move to the others (it leads their rounds: placement
            // leaves it out, `drained`) and it leaves the epochs; members that stop meanwhile
            // (the whole cluster is being stopped) make it give that up (`drain_asked`), so
            // that the leader stays while they commit their last epochs.
            let state = self.node.state();
            let in_epochs = self.lead.as_ref().is_some_and(|l| l.active().contains(&me))
                || self
                    .participants
                    .as_ref()
                    .is_some_and(|p| p.contains_key(&me));
            if self.lead.is_some() && (state.owned_by(me) > 0 || in_epochs) {
                if d.since.elapsed() >= LEADER_DRAIN_GRACE && !d.moving_own {
                    d.moving_own = true;
                    // Its own key groups' round does not wait for the pace of rounds.
                    self.move_round = None;
                    self.kick = true;
                }
                return;
            }
            // Then the cluster's epochs stand still where the next leader can resume them
            // live (`LeadInput::HandOff`, then its fence), for up to `HANDOFF_WAIT`; then the
            // leadership goes (the next leader's first synchronisation rolls everyone back
            // unless it finds them where this one left them).
            let handed = self.handed_off.is_some()
                && self.node.state().handoff.as_ref() == self.handed_off.as_ref();
            let now = Instant::now();
            let since = *d.handoff.get_or_insert(now);
            if !handed && self.lead.is_some() && since.elapsed() < HANDOFF_WAIT {
                if d.asked.is_none_or(|t| t.elapsed() >= DRAIN_ASK_EVERY) {
                    d.asked = Some(now);
                    self.lead_input(LeadInput::HandOff);
                }
                return;
            }
            if d.transfer_asked
                .is_some_and(|t| t.elapsed() < STOP_TRANSFER_AGAIN)
            {
                return;
            }
            let first = d.transfer_asked.replace(now).is_none();
            let before = d.transfer_to;
            if !handed && first {
                // (Epochs go on here until the leadership has gone.)
                self.lead_input(LeadInput::CancelHandOff);
                tracing::info!(
                    node = me,
                    "stopping: the epochs did not stand still for the next leader within {} ms; it will roll everyone back",
                    HANDOFF_WAIT.as_millis()
                );
            }
            let to = self.hand_leadership_over(before);
            if to.is_some() && to != before {
                tracing::info!(
                    node = me,
                    to,
                    "stopping: handing the Raft group's leadership over"
                );
            }
            match to {
                Some(t) => {
                    if let Some(d) = self.drain.as_mut() {
                        d.transfer_to = to;
                    }
                    // The next leader knows the drain before it leads.
                    self.ask_drain(t);
                }
                None => {
                    tracing::info!(
                        node = me,
                        "stopping: no live voter to hand the leadership to; stopping as before"
                    );
                    self.end_drain();
                }
            }
            return;
        }
        let Some(leader) = self.node.leader() else {
            // No leader: an election is under way, or the others stopped too and none can be
            // elected (the whole cluster is being stopped: its leader refused this drain or
            // never saw it, and handed its leadership to a member that exited at once).
            let since = *d.leaderless.get_or_insert_with(Instant::now);
            if !d.done && since.elapsed() >= DRAIN_LEADERLESS {
                tracing::warn!(
                    node = me,
                    "stopping: the cluster has had no leader for {} ms (the others stop too, or a majority is gone), so nobody hands this node's key groups over; stopping as before",
                    DRAIN_LEADERLESS.as_millis()
                );
                self.end_drain();
            }
            return;
        };
        if d.in_flight || d.asked.is_some_and(|t| t.elapsed() < DRAIN_ASK_EVERY) {
            return;
        }
        if self.ask_drain(leader) {
            if let Some(d) = self.drain.as_mut() {
                d.asked = Some(Instant::now());
                d.in_flight = true;
            }
        }
    }

    /// Asks member `to` to drain this node (`Mesh.Drain`; the answer comes as
    /// `ControlInput::DrainAnswer`); false if `to` is no member.
    fn ask_drain(&self, to: NodeId) -> bool {
        let Some(addr) = self
            .node
            .state()
            .members
            .get(&to)
            .map(|m| m.grpc_addr.clone())
        else {
            return false;
        };
        let req = mpb::DrainRequest {
            cluster_id: self.cluster_id.to_string(),
            id: self.node.id(),
            incarnation: self.incarnation,
        };
        tokio::spawn(crate::mesh::ask_drain(req, addr, self.inbox.clone()));
        true
    }

    /// The leader's answer to this node's drain.
    fn drain_answer(&mut self, answer: Result<mpb::DrainReply, Status>) {
        let me = self.node.id();
        let Some(d) = self.drain.as_mut() else {
            return;
        };
        d.in_flight = false;
        if d.done {
            // Asking on until the stop applies; a refusal now (the member is dead: its stop
            // applied) ends it.
            if matches!(&answer, Ok(r) if !r.refused.is_empty()) {
                self.drain = None;
            }
            return;
        }
        match answer {
            Ok(r) if !r.refused.is_empty() => {
                tracing::info!(
                    node = me,
                    why = %r.refused,
                    "stopping: the leader does not hand this node's key groups over; stopping as before"
                );
                self.end_drain();
            }
            Ok(r) if !r.leads => {}
            Ok(r) if r.owned == 0 && !r.in_epochs => {
                tracing::info!(
                    node = me,
                    ms = d.since.elapsed().as_millis() as u64,
                    "stopping: this node's key groups are handed over and it is out of the cluster's epochs"
                );
                d.done = true;
                if let Some(r) = d.reply.take() {
                    let _ = r.send(());
                }
            }
            Ok(r) => {
                if d.last != Some((r.owned, r.in_epochs)) {
                    d.last = Some((r.owned, r.in_epochs));
                    tracing::debug!(
                        node = me,
                        owned = r.owned,
                        in_epochs = r.in_epochs,
                        "stopping: being drained"
                    );
                }
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    node = me,
                    "stopping: the leader cannot hand key groups over for a stop (an older build); stopping as before"
                );
                self.end_drain();
            }
            Err(e) => tracing::debug!(node = me, error = %e, "drain not asked; asked again"),
        }
    }

    fn end_drain(&mut self) {
        if let Some(r) = self.drain.as_mut().and_then(|d| d.reply.take()) {
            let _ = r.send(());
        }
        self.drain = None;
        // A leader that gives its drain up leads the epochs on (they may stand still for a
        // hand-over that will not happen).
        if self.node.is_leader() {
            self.lead_input(LeadInput::CancelHandOff);
        }
    }

    /// As the leader: member `id` (process `incarnation`) stops and asks to be drained. The
    /// answer says how far it is; placement leaves it out from now on (`placing`), and the
    /// epochs once it owns nothing (`lead_epochs`' participants).
    fn drain_asked(&mut self, id: NodeId, incarnation: u64) -> mpb::DrainReply {
        let state = self.node.state();
        if !self.node.is_leader() {
            // A leader that stops asks the voter it hands its leadership to first: it knows
            // the drain as soon as it leads (or it would give the member key groups again).
            if state
                .members
                .get(&id)
                .is_some_and(|m| m.alive && m.incarnation == incarnation && !m.leaving)
            {
                self.draining.insert(id, (incarnation, Instant::now()));
            }
            return mpb::DrainReply::default();
        }
        let refused = |why: String| mpb::DrainReply {
            leads: true,
            refused: why,
            ..Default::default()
        };
        match state.members.get(&id) {
            None => return refused(format!("node {id} is not a member")),
            Some(m) if !m.alive || m.incarnation != incarnation => {
                return refused(format!(
                    "node {id}'s process that asks is not the live member (incarnation {incarnation}, the member's {}, alive {})",
                    m.incarnation, m.alive
                ))
            }
            Some(m) if m.leaving => return refused(format!("node {id} is leaving")),
            Some(_) => {}
        }
        if id == self.node.id() {
            return refused(format!("node {id} leads the cluster"));
        }
        if self.stop_begun {
            // The whole cluster is being stopped, most likely (members stopped together): its
            // stops go as before — the members commit their last epochs while this leader
            // still runs, and the last ones keep their key groups. This leader's own drain, if
            // it has not handed its leadership over yet, is given up too.
            if self.drain.as_ref().is_some_and(|d| !d.done) {
                tracing::info!(
                    node = self.node.id(),
                    other = id,
                    "stopping: another member stops too (the cluster is being stopped): this node stops as before"
                );
                self.end_drain();
            }
            return refused(format!(
                "the leader (node {}) is stopping too",
                self.node.id()
            ));
        }
        // A majority of the voters must stay alive after it, counting those being drained as
        // gone (members stopped together: the last ones keep their key groups, as their stops
        // would be refused).
        let voters = state.conf.as_ref().map_or(&[][..], |c| &c.voters[..]);
        let staying = voters
            .iter()
            .filter(|&&v| {
                v != id && state.members.get(&v).is_some_and(|m| m.alive) && !self.drained(v)
            })
            .count();
        if staying <= voters.len() / 2 {
            return refused(format!(
                "a majority of the voters would not stay alive after node {id} and those stopping"
            ));
        }
        if !self
            .placing(state)
            .iter()
            .any(|&n| n != id && self.node.caught_up(n))
        {
            return refused(format!(
                "no other member can take node {id}'s key groups now"
            ));
        }
        if self
            .draining
            .insert(id, (incarnation, Instant::now()))
            .is_none()
        {
            tracing::info!(
                node = id,
                owned = state.owned_by(id),
                "node {id} stops: handing its key groups over to the others"
            );
            // A stop waits for it: its round of moves does not wait for the pace of rounds.
            self.move_round = None;
            self.kick = true;
        }
        mpb::DrainReply {
            leads: true,
            refused: String::new(),
            owned: state.owned_by(id) as u32,
            // (Still in while the epoch leader counts it: a retirement waits for the open
            // epochs, which need its parts.)
            in_epochs: self.lead.as_ref().is_none_or(|l| l.active().contains(&id))
                || self
                    .participants
                    .as_ref()
                    .is_none_or(|p| p.contains_key(&id)),
        }
    }

    /// Whether member `id` is being drained (see `draining`: the process that asked is the
    /// member's now), or is this node while it drains (it leads: it took the leadership back,
    /// or got it while it drains).
    fn drained(&self, id: NodeId) -> bool {
        if id == self.node.id() {
            return self
                .drain
                .as_ref()
                .is_some_and(|d| d.since.elapsed() >= LEADER_DRAIN_GRACE);
        }
        self.draining.get(&id).is_some_and(|(incarnation, _)| {
            self.node
                .state()
                .members
                .get(&id)
                .is_some_and(|m| m.incarnation == *incarnation)
        })
    }

    /// The members that take key groups: alive, not leaving, not being drained.
    fn placing(&self, state: &ClusterState) -> Vec<NodeId> {
        state
            .placement_members()
            .into_iter()
            .filter(|&n| !self.drained(n))
            .collect()
    }

    /// The next round of placement over [`placing`](Self::placing) (see
    /// `ClusterState::plan_moves`).
    fn plan_moves(&self, limit: usize) -> Vec<statemesh_mesh::control::MoveCommand> {
        let state = self.node.state();
        state.plan_moves_among(limit, &self.placing(state))
    }

    /// Hands the Raft group's leadership to a live voter: `before` while it stays live, else
    /// the one furthest along. Returns the voter asked (none: no live voter).
    fn hand_leadership_over(&mut self, before: Option<NodeId>) -> Option<NodeId> {
        let state = self.node.state();
        let now = crate::mesh::mono_ms();
        let live = |v: NodeId| {
            state.members.get(&v).is_some_and(|m| m.alive) && self.answered_lately(v, now)
        };
        let to = before
            .filter(|&v| live(v))
            .or_else(|| self.transfer_target(&[]).filter(|&v| live(v)));
        if let Some(to) = to {
            self.node.transfer_leader(to);
        }
        to
    }

    /// A stopping member's step, each round. A leader first hands the Raft group's leadership
    /// to a live voter (a new election would leave the cluster without a leader, and so
    /// without epochs, for an election timeout); then, from any member, `MarkDead { stopped }`
    /// of itself is proposed (forwarded to the leader) until it applies. The leader moves its
    /// key groups on it at once (the lease is given up: `Detector::stopped`), and the others
    /// roll back to the last committed epoch, which holds everything this node acknowledged.
    /// It gives up (and exits all the same) after `STOP_WAIT`, when the group refuses it (a
    /// majority of the voters would not stay alive: the cluster is being stopped whole), or
    /// when it leads again after it began as a follower (a transfer came back to it).
    fn stop_step(&mut self) {
        let Some(s) = self.stopping.as_mut() else {
            return;
        };
        if !s.published || s.reply.is_none() {
            return;
        }
        let me = self.node.id();
        let state = self.node.state();
        let Some(m) = state.members.get(&me) else {
            // Removed meanwhile (an earlier leave of this node applied): nothing to tell.
            if let Some(r) = s.reply.take() {
                let _ = r.send(());
            }
            return;
        };
        let leads = self.node.is_leader();
        let done = if !m.alive {
            tracing::info!(
                node = me,
                ms = s.since.elapsed().as_millis() as u64,
                "the cluster has taken this node's stop: its key groups move to the others"
            );
            true
        } else if s.since.elapsed() >= STOP_WAIT {
            tracing::warn!(
                node = me,
                "the cluster did not take this node's stop within {} ms; exiting all the same (the others declare it dead after the failure timeout)",
                STOP_WAIT.as_millis()
            );
            true
        } else if leads && !s.led {
            tracing::info!(
                node = me,
                "stopping: this node leads the group again; exiting without telling it (the others declare it dead after the failure timeout)"
            );
            true
        } else if !alive_after_stop(state, me) {
            tracing::info!(
                node = me,
                "stopping: a majority of the voters would not stay alive after this node (the cluster is being stopped): its key groups stay where they are"
            );
            true
        } else {
            false
        };
        if done {
            if let Some(r) = s.reply.take() {
                let _ = r.send(());
            }
            return;
        }
        let again = if leads {
            STOP_TRANSFER_AGAIN
        } else {
            STOP_REPROPOSE
        };
        if s.asked
            .is_some_and(|(t, transfer)| t.elapsed() < again && transfer == leads)
        {
            return;
        }
        s.asked = Some((Instant::now(), leads));
        let before = s.transfer_to;
        let generation = m.generation;
        if leads {
            let live = self.hand_leadership_over(before);
            if let Some(s) = self.stopping.as_mut() {
                s.transfer_to = live;
            }
            match live {
                Some(to) => {
                    tracing::info!(
                        node = me,
                        to,
                        "stopping: handing the Raft group's leadership over"
                    );
                }
                None => {
                    tracing::info!(
                        node = me,
                        "stopping: no live voter to hand the leadership to; exiting without telling the cluster"
                    );
                    if let Some(r) = self.stopping.as_mut().and_then(|s| s.reply.take()) {
                        let _ = r.send(());
                    }
                }
            }
        } else if self.node.leader().is_some() {
            if let Err(e) = crate::failpoint::eval("mesh-stop-propose") {
                tracing::debug!(error = %e, "stop not proposed");
            } else if let Err(e) = self.node.propose_anywhere(&Command::MarkDead {
                id: me,
                generation,
                stopped: true,
            }) {
                tracing::debug!(error = %e, "stop not proposed; retried");
            }
        }
    }

    /// Whether voter `v` answered lately: Raft's view, or heard within a third of the failure
    /// timeout (raft-rs clears its view at each quorum check, so for a while after one every
    /// voter reads as silent, and a dead voter could win on a tie). At least two heartbeats'
    /// time (150 ms apart).
    fn answered_lately(&self, v: NodeId, now: u64) -> bool {
        let window = (self.failure.timeout_ms / 3)
            .max(300)
            .min(self.failure.timeout_ms);
        self.node.peer_active(v) || self.detector.heard_within(v, now, window)
    }

    /// The voter a leader hands its leadership to before `change` (see
    /// `failure::transfer_target`): alive, answered lately, furthest along.
    fn transfer_target(&self, change: &[(NodeId, Option<Role>)]) -> Option<NodeId> {
        let now = crate::mesh::mono_ms();
        statemesh_mesh::failure::transfer_target(
            self.node.state(),
            self.node.id(),
            change,
            &|v| self.answered_lately(v, now),
            &|v| self.node.peer_committed(v).unwrap_or(0),
        )
    }

    /// Proposes this node's `Leave` (from any member: forwarded to the leader).
    fn leave(&mut self) -> Result<(), Status> {
        let me = self.node.id();
        let state = self.node.state();
        let Some(m) = state.members.get(&me) else {
            return Err(Status::failed_precondition(format!(
                "node {me} is not a member of a cluster"
            )));
        };
        if m.leaving {
            self.leave_proposed.get_or_insert_with(Instant::now);
            return Ok(());
        }
        if state.placement_members() == [me] {
            return Err(Status::failed_precondition(format!(
                "node {me} is the only member that can own key groups: it cannot leave (stop it instead)"
            )));
        }
        self.node
            .propose_anywhere(&Command::Leave { id: me })
            .map_err(|e| Status::unavailable(format!("{LEAVE_NOT_PROPOSED} ({e}); retry")))?;
        self.leave_proposed = Some(Instant::now());
        tracing::info!(
            node = me,
            "leaving the cluster: its key groups move to the others"
        );
        Ok(())
    }

    fn join_request(
        &mut self,
        req: mpb::JoinRequest,
        reply: oneshot::Sender<Result<mpb::JoinReply, Status>>,
    ) {
        let state = self.node.state();
        // A member restarting (its data names this cluster) says where it serves now: kept
        // whether or not this node can take its join. When a whole cluster restarts on new
        // addresses, no member knows where the others are, and no leader can be elected until
        // one does: the members it joins through reach it, and it learns their addresses from
        // their streams.
        // (Not from a start that is then refused for its configuration.)
        let misfit = join_misfit(&req, state);
        if *req.cluster_id == *self.cluster_id
            && misfit.is_none()
            && !req.grpc_addr.is_empty()
            && req.id != self.node.id()
            && state.members.contains_key(&req.id)
            && self.learned.get(&req.id) != Some(&req.grpc_addr)
        {
            tracing::info!(node = req.id, addr = %req.grpc_addr, "a member restarting says where it serves now");
            self.learned.insert(req.id, req.grpc_addr.clone());
        }
        let accepted = mpb::JoinReply {
            accepted: true,
            cluster_id: self.cluster_id.to_string(),
            leader: self.node.id(),
            leader_addr: self.grpc_addr.clone(),
            checkpoint_url: state.checkpoint_url.clone(),
        };
        if !self.node.is_leader() {
            let leader = self.node.leader().filter(|&l| l != self.node.id());
            let leader_addr = leader
                .and_then(|l| {
                    // Where its current process said it is first, as `link()` does.
                    self.learned
                        .get(&l)
                        .cloned()
                        .or_else(|| state.members.get(&l).map(|m| m.grpc_addr.clone()))
                })
                .unwrap_or_default();
            let _ = reply.send(Ok(mpb::JoinReply {
                accepted: false,
                cluster_id: self.cluster_id.to_string(),
                leader: leader.unwrap_or(0),
                leader_addr,
                checkpoint_url: String::new(),
            }));
            return;
        }
        let id = req.id;
        if !req.cluster_id.is_empty() && *req.cluster_id != *self.cluster_id {
            let _ = reply.send(Err(Status::failed_precondition(format!(
                "the data directory of node {id} belongs to cluster {:?}, not to this cluster ({:?}); start it on an empty data directory to join this one",
                req.cluster_id, self.cluster_id
            ))));
            return;
        }
        if let Some(why) = misfit {
            let _ = reply.send(Err(Status::failed_precondition(why)));
            return;
        }
        if state.table.iter().any(|o| o.owner.is_none()) {
            let _ = reply.send(Err(Status::unavailable(
                "the cluster is still assigning its key groups; retry",
            )));
            return;
        }
        // A node alone commits to its epoch log; the members of a cluster share blob
        // storage's history, so the log goes there before a second member joins.
        if state.members.len() <= 1
            && !state.members.contains_key(&id)
            && self
                .log_busy
                .as_ref()
                .is_some_and(|b| b.load(std::sync::atomic::Ordering::SeqCst))
        {
            let _ = self.epoch_driver.send(DriverEvent::LeaveLog);
            let _ = reply.send(Err(Status::unavailable(
                "the node is uploading its epoch log to blob storage before a second member joins; retry",
            )));
            return;
        }
        match state.members.get(&id) {
            // A restarting member: it proposes its own Join. Until that applies, its current
            // address is the one it gave (learned above).
            Some(_) if !req.cluster_id.is_empty() => {
                let _ = reply.send(Ok(accepted));
            }
            // A retry of the same join (its reply was lost), possibly from a later start at
            // another address: the cluster's state reaches it there.
            Some(m) if m.incarnation == req.incarnation => {
                if !req.grpc_addr.is_empty() {
                    self.learned.insert(id, req.grpc_addr.clone());
                }
                let _ = reply.send(Ok(accepted));
            }
            Some(m) => {
                let _ = reply.send(Err(Status::already_exists(format!(
                    "node id {id} is already used by a member of this cluster (at {}); give the new node another --node-id, or restart that member on its own data directory",
                    m.grpc_addr
                ))));
            }
            None => {
                if req.grpc_addr.is_empty() {
                    let _ = reply.send(Err(Status::invalid_argument(
                        "a joining node must give its gRPC address",
                    )));
                    return;
                }
                self.learned.insert(id, req.grpc_addr.clone());
                let cmd = Command::Join {
                    id,
                    grpc_addr: req.grpc_addr,
                    http_addr: req.http_addr,
                    role: Role::Learner,
                    incarnation: req.incarnation,
                    fresh: true,
                };
                match self.node.propose(&cmd) {
                    Ok(()) => {
                        self.pending_joins.insert(id, (req.incarnation, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Status::unavailable(format!(
                            "the join was not proposed ({e}); retry"
                        ))));
                    }
                }
            }
        }
    }

    /// Whether this node is leaving: this process asked to, or its applied state says it
    /// does (an earlier process of this node asked, and this one restarted meanwhile).
    fn leaving(&self) -> bool {
        self.leave_proposed.is_some()
            || self
                .node
                .state()
                .members
                .get(&self.node.id())
                .is_some_and(|m| m.leaving)
    }

    /// A member that leaves and has heard nothing from the group's leader for `LEFT_SILENCE`
    /// asks its peers, every `REPROPOSE`, whether it is still a member. A member cut off
    /// while its leave applied, for longer than the leader waits for it to catch up
    /// (`CONF_WAIT_FOR_RETIRE`), is removed without having applied its leave; the group then
    /// sends it nothing, so its own log never says it left, and it would run on for ever. So
    /// is one restarted after its leave applied and cut off before it could rejoin: it never
    /// asked in this process, and knows no leader to rejoin through.
    fn ask_if_removed(&mut self) {
        let silent = self.leaving()
            && !self.left
            && !self.node.is_leader()
            && self.last_heard.elapsed() > LEFT_SILENCE;
        if !silent {
            if self.left {
                if let Some((_, task)) = self.removal_asked.take() {
                    task.abort();
                }
            }
            return;
        }
        if self
            .removal_asked
            .as_ref()
            .is_some_and(|(t, task)| t.elapsed() < REPROPOSE || !task.is_finished())
        {
            return;
        }
        let me = self.node.id();
        let state = self.node.state();
        let peers: Vec<(NodeId, String)> = state
            .members
            .values()
            .filter(|m| m.id != me)
            .map(|m| {
                let addr = self.learned.get(&m.id).unwrap_or(&m.grpc_addr);
                (m.id, addr.clone())
            })
            .collect();
        let task = tokio::spawn(crate::mesh::ask_if_removed(
            me,
            self.cluster_id.clone(),
            state.applied_index,
            peers,
            self.inbox.clone(),
        ));
        self.removal_asked = Some((Instant::now(), task));
    }

    /// Tells the members of `--join` again where this node serves ([`Driver::announce`]): an
    /// attempt a second while it knows no leader. Ends once its own `Join` has applied (the
    /// address is in the replicated state then), or when a member refuses it.
    fn announce(&mut self) {
        let refused = self
            .announce
            .as_ref()
            .is_some_and(|a| a.refused.load(std::sync::atomic::Ordering::Relaxed));
        if self.joined || refused {
            if let Some((_, task)) = self.announce.take().and_then(|a| a.asked) {
                task.abort();
            }
            return;
        }
        if self.node.leader().is_some() {
            return;
        }
        let Some(Announce {
            seeds,
            req,
            asked,
            refused,
        }) = self.announce.as_mut()
        else {
            return;
        };
        if asked
            .as_ref()
            .is_some_and(|(t, task)| t.elapsed() < Duration::from_secs(1) || !task.is_finished())
        {
            return;
        }
        let (seeds, req, refused) = (seeds.clone(), req.clone(), refused.clone());
        let task = tokio::spawn(async move {
            // Its side effect is what counts: the member asked records this node's address.
            // (`join` goes over the seeds again every 200 ms within its 900 ms.)
            if let Err(e) = crate::mesh::join(&seeds, req, Duration::from_millis(900)).await {
                if e.refused {
                    tracing::warn!(error = %e, "a member of --join refuses this node's cluster now; no longer telling it where this node serves");
                    refused.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        *asked = Some((Instant::now(), task));
    }

    /// Handles what the group has ready (twice: proposals made in between go out at once).
    fn round(&mut self) -> Result<(), String> {
        self.process()?;
        self.ask_if_removed();
        self.announce();
        let now = crate::mesh::mono_ms();
        if self.stopping.is_none() || (self.lead.is_some() && !self.log_cfg.enabled) {
            if let Some(ctx) = self.lease.due(now) {
                // `return`: lost, as when the majority does not answer.
                if crate::failpoint::eval("mesh-lease-ask").is_ok() {
                    self.node.read_index(ctx);
                }
            }
        }
        self.detect(now);
        self.drain_step();
        self.stop_step();
        let state = self.node.state();
        self.draining.retain(|id, (incarnation, asked)| {
            let keep = asked.elapsed() < DRAIN_TTL;
            if !keep
                && state
                    .members
                    .get(id)
                    .is_some_and(|m| m.alive && m.incarnation == *incarnation)
            {
                // (A member whose stop applied, or that restarted, is not news.)
                tracing::info!(
                    node = *id,
                    "node {id} no longer asks to be drained (it gave up its stop's hand-over): it takes key groups again"
                );
            }
            keep
        });
        // A new member first needs the cluster's state (the leader's snapshot).
        let bootstrapped = self
            .node
            .state()
            .conf
            .as_ref()
            .is_some_and(|c| !c.voters.is_empty());
        if !self.joined && bootstrapped && self.node.leader().is_some() {
            // Proposed (forwarded to the leader from any member) until seen applied.
            if self.join_proposed.is_none_or(|t| t.elapsed() >= REPROPOSE) {
                self.join_proposed = Some(Instant::now());
                let cmd = Command::Join {
                    id: self.node.id(),
                    grpc_addr: self.grpc_addr.clone(),
                    http_addr: self.http_addr.clone(),
                    role: Role::Learner,
                    incarnation: self.incarnation,
                    fresh: false,
                };
                if let Err(e) = self.node.propose_anywhere(&cmd) {
                    tracing::debug!(error = %e, "own join not proposed; retried");
                }
            }
        }
        // Its own leave, likewise: forwarded to the leader, it can be lost (the link was down;
        // a chaos run's leave never applied and the node was given key groups again).
        if let Some(t) = self.leave_proposed {
            let me = self.node.id();
            let applied = self.node.state().members.get(&me).is_none_or(|m| m.leaving);
            if !applied && self.joined && self.node.leader().is_some() && t.elapsed() >= REPROPOSE {
                self.leave_proposed = Some(Instant::now());
                tracing::info!(
                    node = me,
                    "this node's leave has not applied yet: proposing it again"
                );
                if let Err(e) = self.node.propose_anywhere(&Command::Leave { id: me }) {
                    tracing::debug!(error = %e, "own leave not proposed; retried");
                }
            }
        }
        if self.node.is_leader() && self.joined {
            // A proposal can be dropped (a leader change, a transfer): proposed again later.
            if let Err(e) = self.lead() {
                tracing::debug!(error = %e, "control proposal not taken; retried");
            }
        } else {
            // A leader's waits start again with its next term (one kept from an earlier term
            // would be over at once: a leave's removal proposed before the member was sent
            // anything).
            self.conf_wait = None;
            self.leave_synced.clear();
            self.transfer_asked = None;
        }
        self.lead_epochs();
        self.process()
    }

    /// The leader declares dead the members it has not heard from (see
    /// `statemesh_mesh::failure`): a `MarkDead` entry each, proposed again until applied.
    fn detect(&mut self, now: u64) {
        let leading = self.node.is_leader() && self.joined;
        self.detector.leading(leading, now, self.last_leader);
        if let Some(l) = self.node.leader().filter(|&l| l != self.node.id()) {
            self.last_leader = Some(l);
        }
        if !leading {
            self.dead_proposed.clear();
            return;
        }
        let me = self.node.id();
        for (id, generation) in self.detector.check(now, me, self.node.state()) {
            if self
                .dead_proposed
                .get(&id)
                .is_some_and(|(g, t)| *g == generation && t.elapsed() < REPROPOSE)
            {
                continue;
            }
            tracing::warn!(
                node = id,
                generation,
                "node {id} has not been heard from for {} ms: declaring it dead (its key groups move to the others)",
                self.failure.detection_ms()
            );
            self.dead_proposed.insert(id, (generation, Instant::now()));
            if let Err(e) = self.node.propose(&Command::MarkDead {
                id,
                generation,
                stopped: false,
            }) {
                tracing::debug!(error = %e, "death not proposed; retried");
            }
        }
    }

    /// The planned moves (up to a round's) whose new owner can take them now: its control log
    /// has caught up (its process runs and has the table). A joiner still starting would hold
    /// every participant's synchronisation, and so every key group, until it answers: moves
    /// to it wait for a later round (the others go now). Also the first member waited for.
    /// Whether a round of moves may give key groups to `to`: this node, or a member whose
    /// control log has caught up; and one the epochs' leader has taken in (a member that
    /// caught up while a move was under way waits to join).
    fn may_move_to(&self, to: NodeId) -> bool {
        (to == self.node.id() || self.node.caught_up(to))
            && self.lead.as_ref().is_some_and(|l| l.may_own(to))
    }

    fn ready_moves(&self) -> (Vec<statemesh_mesh::control::MoveCommand>, Option<NodeId>) {
        let state = self.node.state();
        let mut waiting = None;
        let moves = self
            .plan_moves(state.table.len())
            .into_iter()
            // Key groups of dead members move by failover only (`orphan_moves`).
            .filter(|m| {
                state.table[m.kg as usize]
                    .owner
                    .is_none_or(|o| state.members.get(&o).is_some_and(|x| x.alive))
            })
            .filter(|m| {
                let ok = self.may_move_to(m.to);
                if !ok && waiting.is_none() {
                    waiting = Some(m.to);
                }
                ok
            })
            .take(MOVES_PER_ROUND)
            .collect();
        (moves, waiting)
    }

    /// The failover moves of key groups whose owner is dead (or gone), once every ownership
    /// lease the dead owner may hold has expired (`Detector::may_take_over`), to members that
    /// can take them now (`ClusterState::plan_failover`: a wanted owner whose control log has
    /// not caught up is skipped for the next in the ranking; it gets them later by handover).
    fn orphan_moves(&self) -> Vec<statemesh_mesh::control::MoveCommand> {
        let state = self.node.state();
        let me = self.node.id();
        let dead = |n: NodeId| !state.members.get(&n).is_some_and(|m| m.alive);
        if !state.table.iter().any(|o| o.owner.is_some_and(dead)) {
            return Vec::new();
        }
        let now = crate::mesh::mono_ms();
        state
            .plan_failover(&|n| (n == me || self.node.caught_up(n)) && !self.drained(n))
            .into_iter()
            .filter(|m| {
                state.table[m.kg as usize]
                    .owner
                    .is_some_and(|o| self.detector.may_take_over(o, generation_of(state, o), now))
            })
            .collect()
    }

    /// Moves the key groups of dead members (`plan`) in a synchronisation of the participants
    /// `p`: every participant holds, the moves are proposed, and everyone rolls back to the
    /// last committed epoch; the new owners load the key groups from blob storage.
    fn failover(
        &mut self,
        p: std::collections::BTreeMap<NodeId, u64>,
        plan: Vec<statemesh_mesh::control::MoveCommand>,
    ) {
        let state = self.node.state();
        let dead: std::collections::BTreeSet<NodeId> = plan
            .iter()
            .filter_map(|m| state.table[m.kg as usize].owner)
            .collect();
        let members = state.placement_members();
        let interim = plan
            .iter()
            .filter(|m| statemesh_mesh::placement::owner_of(m.kg, &members) != Some(m.to))
            .count();
        tracing::warn!(
            key_groups = plan.len(),
            ?dead,
            interim,
            "failover: moving the key groups of dead members to the others (every node rolls back to the last committed epoch)"
        );
        if interim > 0 {
            tracing::info!(
                interim,
                "failover: key groups whose wanted owner cannot take them yet go to the next in their ranking (they move on later)"
            );
        }
        self.move_round = Some(Instant::now());
        self.move_plan = plan.iter().map(|m| m.kg).collect();
        self.failover_plan = plan;
        self.lead_input(LeadInput::Failover(p));
    }

    /// Leads cluster epochs while this node leads a cluster of several members, or one that
    /// had several since this process started (its participant side follows a leader's
    /// epochs: the others left). A lone node commits its own.
    fn lead_epochs(&mut self) {
        let state = self.node.state();
        if state.members.len() > 1 {
            self.several = true;
        }
        let want = self.epoch_cp.is_some()
            && self.node.is_leader()
            && self.joined
            && (state.members.len() > 1 || self.several);
        if !want {
            if self.joined && state.members.len() <= 1 && !self.several {
                self.alone = true;
            }
            self.lead_wanted = None;
            self.log_lead = None;
            self.unconfirmed_done.clear();
            if self.lead.take().is_some() {
                tracing::info!("no longer leading cluster epochs");
            }
            self.participants = None;
            return;
        }
        if self.lead.is_none() {
            // With manifest puts, a new leader waits out the lease of any leader before it
            // first (see `manifest_done`). Also after a hand-over: whether the hand-over record
            // is current is known only once this leader's state has caught up with its term.
            let deposed_lease = if !self.log_cfg.enabled {
                self.failure.lease_ms
            } else {
                0
            };
            let (since, delay) = *self.lead_wanted.get_or_insert_with(|| {
                if deposed_lease > 0 {
                    tracing::info!(
                        ms = deposed_lease,
                        "to lead the cluster's epochs (committed by manifest puts): waiting out the lease of any earlier leader first"
                    );
                }
                let delay = crate::failpoint::eval_delay("mesh-lead-epochs");
                let delay = delay.ok().flatten().unwrap_or(0).max(deposed_lease);
                (Instant::now(), delay)
            });
            if since.elapsed() < Duration::from_millis(delay) {
                return;
            }
            self.lead_wanted = None;
            self.lead_after_alone = std::mem::take(&mut self.alone);
            let (interval, max) = self.epoch_cfg;
            tracing::info!(
                term = self.node.term(),
                "leading cluster epochs: synchronising the members that own key groups"
            );
            // Above every generation of earlier leaders and of an earlier leader of this term
            // (members 2 → 1 → 2), which the epoch log's fence may hold.
            let mut lead = EpochLeader::new(
                (self.node.term() << 32).max(state.log.gen),
                interval,
                max,
                EPOCH_STALL_MS,
                state.committed_epoch,
            );
            // Every synchronisation fences its generation and uploads the tail first (also
            // with the log off here: a tail another leader left is uploaded).
            lead.read_latest_always();
            if !self.log_cfg.enabled {
                // Manifest puts: a deposed leader's may land late; epoch numbers come from
                // reservations in the control group, and this leader's are above its
                // predecessors' (`EpochLeader::reserve_epochs`).
                lead = lead.reserve_epochs();
            }
            if let Some(h) = state.handoff.clone() {
                tracing::info!(
                    committed = h.committed,
                    gen = h.gen,
                    "the last leader handed the epochs over: they resume live if every participant holds where it left them"
                );
                lead.handed_over(h);
            }
            self.log_lead = Some(LogLead::new(self.log_cfg));
            self.lead = Some(lead);
            self.leads += 1;
            self.unconfirmed_done.clear();
            self.participants = None;
        }
        // The members that own key groups, and those that can take some (their control log
        // has caught up; once in, they stay while alive): a new member takes part in the
        // epochs before key groups move to it, so that the move rolls nobody back.
        let before = self.participants.clone().unwrap_or_default();
        let p: std::collections::BTreeMap<NodeId, u64> = state
            .members
            .values()
            .filter(|m| {
                m.alive
                    && (state.owned_by(m.id) > 0
                        || (!m.leaving
                            && !self.drained(m.id)
                            && (before.get(&m.id) == Some(&m.incarnation)
                                || self.node.caught_up(m.id))))
            })
            .map(|m| (m.id, m.incarnation))
            .collect();
        let recorded = state.committed_epoch;
        let version = state.placement_version;
        let planned = !self.plan_moves(1).is_empty();
        // Key groups whose owner is dead move at once, in the synchronisation that drops it
        // (failover); the others a round at a time.
        let orphans = self.orphan_moves();
        // The first synchronisation of the epoch leader of a node that was alone until now (it
        // gets its first member) holds only this node, which owns every key group: a lone
        // participant keeps what it did since its last cut (it took part in no epochs with
        // others, so no other member's lost work can be behind it), and the new members, which
        // own nothing, are taken in live after it. Nothing rolls back.
        let p = match self.participants {
            None if self.lead_after_alone && orphans.is_empty() => {
                let owners: std::collections::BTreeMap<NodeId, u64> = p
                    .iter()
                    .filter(|(n, _)| state.owned_by(**n) > 0)
                    .map(|(n, i)| (*n, *i))
                    .collect();
                if owners.len() == 1 && owners.contains_key(&self.node.id()) {
                    let later: Vec<NodeId> = p
                        .keys()
                        .filter(|n| !owners.contains_key(n))
                        .copied()
                        .collect();
                    tracing::info!(
                        ?later,
                        "alone until now: the first synchronisation holds only this node; the new members are taken in live after it"
                    );
                    owners
                } else {
                    p
                }
            }
            _ => p,
        };
        // Participants that own nothing and are alive leave the epochs live (a member whose
        // key groups a leave handed over): once no move is under way, for up to
        // `RETIRE_WAIT`; then the old way (everyone rolls back).
        let retire = orphans.is_empty()
            && p.len() < before.len()
            && p.iter().all(|(n, i)| before.get(n) == Some(i))
            && before
                .keys()
                .filter(|n| !p.contains_key(n))
                .all(|n| state.members.get(n).is_some_and(|m| m.alive) && state.owned_by(*n) == 0);
        let wait_retire = retire
            && !self.lead.as_ref().is_some_and(|l| l.ready_to_move())
            && self.retire_wait.get_or_insert_with(Instant::now).elapsed() < RETIRE_WAIT;
        // A dead member about to be dropped whose key groups cannot be taken over yet.
        let wait_orphans = orphans.is_empty()
            && self.participants.as_ref() != Some(&p)
            && before.keys().any(|n| {
                !p.contains_key(n)
                    && state.members.get(n).is_some_and(|m| !m.alive)
                    && state.owned_by(*n) > 0
            })
            && self.orphan_wait.get_or_insert_with(Instant::now).elapsed() < ORPHAN_WAIT;
        if !wait_orphans {
            self.orphan_wait = None;
        }
        if self.participants.as_ref() != Some(&p) && !wait_retire && !wait_orphans {
            self.retire_wait = None;
            self.participants = Some(p.clone());
            if !orphans.is_empty() {
                self.failover(p, orphans);
            } else if retire {
                tracing::info!(
                    participants = ?p.keys().collect::<Vec<_>>(),
                    "members that own nothing leave the cluster's epochs (nobody rolls back)"
                );
                self.lead_input(LeadInput::Retire(p));
            } else {
                self.lead_input(LeadInput::Participants(p));
            }
        } else if wait_retire || wait_orphans {
            // Not while the participants are about to change.
        } else if !orphans.is_empty()
            && self.move_proposed.is_none()
            && self.lead.as_ref().is_some_and(|l| l.ready_to_move())
        {
            // (Whenever it can: a failover does not wait for the pace of handover rounds.)
            self.failover(p, orphans);
        }
        // Key groups move to the members rendezvous hashing gives them, a round at a time.
        if let Some((v, t)) = self.move_proposed {
            if version != v || t.elapsed() >= REPROPOSE {
                self.move_proposed = None;
                self.lead_input(LeadInput::Moved);
            }
        } else if planned
            // Not while a participant is left out (a move's synchronisation would wait for it).
            && self
                .lead
                .as_ref()
                .is_some_and(|l| l.ready_to_move())
            && self
                .move_round
                .is_none_or(|t| t.elapsed() >= MOVE_ROUND_EVERY)
        {
            let (moves, waiting) = self.ready_moves();
            if let Some(n) = waiting {
                tracing::debug!(
                    node = n,
                    "key groups wait to move: their new owner has not caught up with the control log, or is not in the epochs yet"
                );
                if moves.is_empty() && self.moves_stuck_due() {
                    self.moves_stuck(format!(
                        "their new owner (node {n}) has not caught up with the control log, or is not in the epochs yet"
                    ));
                }
            }
            if !moves.is_empty() {
                self.move_round = Some(Instant::now());
                // Their owners first snapshot the key groups about to move: their new owners
                // then read a short chain.
                let plan: Vec<u32> = moves.iter().map(|m| m.kg).collect();
                self.move_plan = plan.clone();
                self.failover_plan.clear();
                tracing::info!(
                    key_groups = plan.len(),
                    "moving key groups to the members that should own them"
                );
                self.lead_input(LeadInput::Handover { snapshot: plan });
            }
        }
        if planned && self.moves_stuck_due() {
            let blocker = if self.move_proposed.is_some() {
                Some("the last round's move has not applied".to_string())
            } else {
                self.lead.as_ref().and_then(|l| l.move_blocker())
            };
            if let Some(why) = blocker {
                self.moves_stuck(why);
            }
        }
        // Recorded for later leaders (the manifests are the commit points).
        if self.record_wanted > recorded
            && self.recorded_at.is_none_or(|t| t.elapsed() >= RECORD_EVERY)
        {
            self.recorded_at = Some(Instant::now());
            let cmd = Command::CommitEpoch {
                epoch: self.record_wanted,
            };
            if let Err(e) = self.node.propose(&cmd) {
                tracing::debug!(error = %e, "committed epoch not recorded; retried");
            }
        }
    }

    /// Planned moves cannot start: says why, at most every `MOVES_STUCK_LOG`, once no round
    /// has started for that long (a leave or a rebalance that hangs shows its reason).
    /// (Callers check `moves_stuck_due` first, before working out `why`.)
    fn moves_stuck(&mut self, why: String) {
        self.moves_stuck_logged = Some(Instant::now());
        tracing::info!("key groups wait to move to the members that should own them: {why}");
    }

    /// Whether `moves_stuck` would log now (no round and no line for `MOVES_STUCK_LOG`).
    fn moves_stuck_due(&self) -> bool {
        let quiet = |t: Option<Instant>| t.is_none_or(|t| t.elapsed() >= MOVES_STUCK_LOG);
        quiet(self.move_round) && quiet(self.moves_stuck_logged)
    }

    fn lead_input(&mut self, i: LeadInput) {
        let Some(l) = self.lead.as_mut() else {
            return;
        };
        if !matches!(i, LeadInput::Tick { .. }) {
            l.set_now(crate::shard::now_ms());
        }
        let mut acts = Vec::new();
        if !self.log_cfg.enabled && matches!(i, LeadInput::Latest(Ok(_))) {
            // The reservation as it stands once this synchronisation's fence applied: every
            // earlier leader's is in it.
            acts = l.handle(LeadInput::Reserved {
                through: self.node.state().epochs_reserved,
            });
        }
        acts.extend(l.handle(i));
        if l.excluded() != &self.left_out {
            let now = l.excluded().clone();
            for n in now.difference(&self.left_out) {
                tracing::warn!(
                    node = n,
                    "node {n} does not answer: left out of the cluster's epochs (the others go on; requests for its key groups wait for it, messages to them are kept)"
                );
            }
            for n in self.left_out.difference(&now) {
                tracing::info!(
                    node = n,
                    "node {n} answers again: taken back into the cluster's epochs"
                );
            }
            self.left_out = now;
        }
        for a in acts {
            self.lead_action(a);
        }
    }

    /// Reads blob storage's newest manifest for the synchronisation of generation `gen`
    /// (whose fence applied).
    fn read_latest(&self, gen: u64) {
        let (cp, tx) = (self.epoch_cp.clone(), self.epoch_tx.clone());
        tokio::spawn(async move {
            let r = match cp {
                Some(cp) => cp
                    .latest()
                    .await
                    .map(|m| m.map(|m| m.epoch))
                    .map_err(|e| e.to_string()),
                None => Err("checkpoints are off".into()),
            };
            if let Err(e) = &r {
                tracing::warn!(error = %e, "cannot read the newest manifest; retrying");
            }
            let _ = tx.send(EpochRoute::Latest { gen, r });
        });
    }

    /// Commits an epoch through the control group: its manifest is logged
    /// (`Command::LogEpoch`); the epoch has committed once the entry applies.
    fn log_epoch(&mut self, m: Manifest) {
        let epoch = m.epoch;
        let size = self.node.state().log.size();
        let Some(ll) = self.log_lead.as_mut() else {
            return;
        };
        if size >= ll.cfg.max_bytes {
            if !ll.full {
                ll.full = true;
                tracing::warn!(
                    bytes = size,
                    "the cluster's epoch log holds {size} bytes blob storage lacks (log_max_bytes = {}): epochs wait for an upload",
                    ll.cfg.max_bytes
                );
            }
            let why = format!("the cluster's epoch log is full ({size} bytes blob storage lacks)");
            self.lead_input(LeadInput::ManifestDone {
                epoch,
                result: Err(why),
            });
            return;
        }
        ll.full = false;
        let gen = self.lead.as_ref().map_or(0, |l| l.gen());
        let cmd = Command::LogEpoch {
            epoch,
            gen,
            bytes: EpochBytes::new(serde_json::to_vec(&m).expect("a manifest serializes")),
        };
        match self.node.propose(&cmd) {
            Ok(()) => {
                if let Some(ll) = self.log_lead.as_mut() {
                    ll.proposed.insert(epoch);
                }
                self.kick = true;
            }
            Err(e) => {
                tracing::warn!(epoch, error = %e, "cannot log an epoch; retrying");
                self.lead_input(LeadInput::ManifestDone {
                    epoch,
                    result: Err(e),
                });
            }
        }
    }

    /// An entry of the cluster's epoch log applied.
    fn log_applied(&mut self, cmd: &Command, outcome: &Outcome) {
        let Some(ll) = self.log_lead.as_mut() else {
            return;
        };
        match cmd {
            Command::LogEpoch { epoch, .. } if ll.proposed.remove(epoch) => {
                let result = match outcome {
                    Outcome::Applied => Ok(true),
                    Outcome::Duplicate if self.node.state().log.epochs().contains_key(epoch) => {
                        Ok(true)
                    }
                    Outcome::Duplicate => Err("the epoch's entry applied before".into()),
                    Outcome::Rejected(why) => {
                        // After a fence, an epoch of the generation before (expected).
                        tracing::debug!(epoch, "an epoch was not logged: {why}");
                        Err(why.clone())
                    }
                };
                self.lead_input(LeadInput::ManifestDone {
                    epoch: *epoch,
                    result,
                });
            }
            Command::Fence { gen, .. }
                if ll.sync == Some((*gen, false)) && self.node.state().log.gen >= *gen =>
            {
                self.log_fenced(*gen);
            }
            Command::ReserveEpochs { .. } => {
                let through = self.node.state().epochs_reserved;
                self.lead_input(LeadInput::Reserved { through });
            }
            _ => {}
        }
    }

    /// The synchronisation of generation `gen` is fenced: no earlier epoch commits any more.
    /// Blob storage receives the whole tail before it is read.
    fn log_fenced(&mut self, gen: u64) {
        let Some(ll) = self.log_lead.as_mut() else {
            return;
        };
        ll.sync = Some((gen, true));
        if ll.uploading.is_none() {
            self.log_upload();
        }
    }

    /// Uploads the tail (if it holds epochs); for a fenced synchronisation with nothing to
    /// upload, reads blob storage.
    fn log_upload(&mut self) {
        // (Shared bytes: nothing of the tail is copied.)
        let tail: Vec<(u64, EpochBytes)> = self
            .node
            .state()
            .log
            .epochs()
            .iter()
            .map(|(e, b)| (*e, b.clone()))
            .collect();
        let Some(ll) = self.log_lead.as_mut() else {
            return;
        };
        if tail.is_empty() {
            if let Some((gen, true)) = ll.sync {
                ll.sync = None;
                self.read_latest(gen);
            }
            return;
        }
        let Some(cp) = self.epoch_cp.clone() else {
            return;
        };
        self.uploads += 1;
        let n = self.uploads;
        ll.uploading = Some(n);
        let (tx, writer) = (self.epoch_tx.clone(), self.writer.clone());
        let task = tokio::spawn(async move {
            crate::checkpoint::upload::upload_tail(&cp, tail, &writer).await
        });
        // Answered even if the upload's task fails.
        tokio::spawn(async move {
            let r = task
                .await
                .unwrap_or_else(|e| Err(format!("the upload's task failed: {e}")));
            let _ = tx.send(EpochRoute::Uploaded(n, r));
        });
    }

    fn log_uploaded(&mut self, n: u64, r: Result<u64, String>) {
        let uploaded = self.node.state().log.uploaded;
        let Some(ll) = self.log_lead.as_mut() else {
            return;
        };
        if ll.uploading != Some(n) {
            // Started while this node led before (or a result already handled).
            return;
        }
        ll.uploading = None;
        ll.last_upload = Instant::now();
        match r {
            Ok(l) => {
                ll.backoff = Duration::from_millis(100);
                tracing::debug!(epoch = l, "the cluster's epoch log uploaded");
                if l > uploaded {
                    if let Err(e) = self.node.propose(&Command::Uploaded { through: l }) {
                        tracing::debug!(error = %e, "upload not recorded; the next upload repeats it");
                    }
                    self.kick = true;
                }
                if let Some((gen, true)) = self.log_lead.as_ref().and_then(|ll| ll.sync) {
                    let more = self.node.state().log.epochs().keys().any(|e| *e > l);
                    if more {
                        self.log_upload();
                    } else {
                        if let Some(ll) = self.log_lead.as_mut() {
                            ll.sync = None;
                        }
                        self.read_latest(gen);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot upload the cluster's epoch log; retrying");
                ll.retry_at = Instant::now() + ll.backoff;
                ll.backoff = (ll.backoff * 2).min(Duration::from_secs(5));
                // A synchronisation waiting for this upload reads again later (its fence has
                // applied); one whose fence has not applied yet goes on waiting for it.
                if matches!(ll.sync, Some((_, true))) {
                    ll.sync = None;
                    self.lead_input(LeadInput::Latest(Err(e)));
                }
            }
        }
    }

    /// Uploads the tail every `upload_interval` or `upload_bytes`.
    fn log_tick(&mut self) {
        let Some(ll) = self.log_lead.as_ref() else {
            return;
        };
        let log = &self.node.state().log;
        if ll.uploading.is_some() || log.epochs().is_empty() || Instant::now() < ll.retry_at {
            return;
        }
        if ll.last_upload.elapsed() >= ll.cfg.upload_interval || log.size() >= ll.cfg.upload_bytes {
            self.log_upload();
        }
    }

    fn lead_action(&mut self, a: LeadAction) {
        let me = self.node.id();
        match a {
            LeadAction::Send { to, mut msg } => {
                if let EpochMsg::Resume {
                    placement_version, ..
                } = &mut msg
                {
                    *placement_version = self.node.state().placement_version;
                }
                self.epoch_route(EpochRoute::Send { from: me, to, msg })
            }
            LeadAction::ReadLatest if self.log_lead.is_some() => {
                // Fence the generation, upload the tail, then read blob storage.
                let gen = self.lead.as_ref().map_or(0, |l| l.gen());
                if self.node.state().log.gen >= gen {
                    self.log_fenced(gen);
                } else {
                    match self.node.propose(&Command::Fence { gen, handoff: None }) {
                        Ok(()) => {
                            if let Some(ll) = self.log_lead.as_mut() {
                                ll.sync = Some((gen, false));
                            }
                            self.kick = true;
                        }
                        Err(e) => self.lead_input(LeadInput::Latest(Err(e))),
                    }
                }
            }
            LeadAction::ReadLatest => {
                let gen = self.lead.as_ref().map_or(0, |l| l.gen());
                self.read_latest(gen)
            }
            LeadAction::WriteManifest {
                epoch,
                previous,
                parts,
            } => {
                let mut objects: Vec<ObjectRef> = Vec::new();
                let mut bad = None;
                for p in &parts {
                    match serde_json::from_slice::<Vec<ObjectRef>>(p) {
                        Ok(mut v) => objects.append(&mut v),
                        Err(e) => {
                            bad = Some(format!("a part of epoch {epoch} does not decode: {e}"))
                        }
                    }
                }
                if let Some(e) = bad {
                    tracing::error!("{e}");
                    self.manifest_done(epoch, Err(e));
                    return;
                }
                if objects.is_empty() {
                    // Nothing changed anywhere: committed without a manifest (in order with
                    // the others).
                    self.manifest_done(epoch, Ok(false));
                    return;
                }
                let m = Manifest {
                    epoch,
                    previous,
                    created_ms: crate::shard::now_ms(),
                    objects,
                    writer: Some(self.writer.clone()),
                };
                if self.log_lead.as_ref().is_some_and(|ll| ll.cfg.enabled) {
                    self.log_epoch(m);
                    return;
                }
                let (cp, tx, lead) = (self.epoch_cp.clone(), self.epoch_tx.clone(), self.leads);
                tokio::spawn(async move {
                    let _ = crate::failpoint::eval_slow("mesh-manifest-put").await;
                    let result = match cp {
                        Some(cp) => cp.commit(&m).await.map(|_| true).map_err(|e| e.to_string()),
                        None => Err("checkpoints are off".into()),
                    };
                    if let Err(e) = &result {
                        tracing::warn!(epoch, error = %e, "cannot write an epoch's manifest; retrying");
                    }
                    let _ = tx.send(EpochRoute::ManifestDone {
                        lead,
                        epoch,
                        result,
                    });
                });
            }
            LeadAction::Record(e) => self.record_wanted = self.record_wanted.max(e),
            LeadAction::Reserve { through } => {
                // Answered by `LeadInput::Reserved` once it applies; asked again if lost.
                match self.node.propose(&Command::ReserveEpochs { through }) {
                    Ok(()) => self.kick = true,
                    Err(e) => {
                        tracing::debug!(through, error = %e, "epoch numbers not reserved; retrying")
                    }
                }
            }
            LeadAction::HandedOff(h) => {
                // The fence says where the epochs stand: the next leader resumes them there.
                let gen = self.node.state().log.gen.max(h.gen) + 1;
                tracing::info!(
                    committed = h.committed,
                    gen = h.gen,
                    participants = ?h.participants.keys().collect::<Vec<_>>(),
                    "the epochs stand still for the next leader (nothing rolls back if they resume there)"
                );
                match self.node.propose(&Command::Fence {
                    gen,
                    handoff: Some(h.clone()),
                }) {
                    Ok(()) => self.handed_off = Some(h),
                    Err(e) => {
                        tracing::info!(error = %e, "the hand-over of the epochs was not proposed: they go on here");
                        self.lead_input(LeadInput::CancelHandOff);
                    }
                }
            }
            LeadAction::Stalled(why) => tracing::warn!(
                "cluster epochs made no progress: synchronising the participants again ({why})"
            ),
            LeadAction::ProposeMove => {
                // The round's plan (its new owners had caught up when it started; the
                // participants stopped these key groups), as far as it still stands.
                // A failover's moves were planned over the members ready then; they still
                // stand while the key group's version and the target's membership do, and
                // while every lease the dead owner may hold has expired (checked when planned;
                // checked again, since an owner that came back, took a lease and was declared
                // dead again meanwhile leaves the version as it was).
                let state = self.node.state();
                let now = crate::mesh::mono_ms();
                let moves: Vec<_> = if self.failover_plan.is_empty() {
                    // Planned again: a member that joined meanwhile may be the new owner now,
                    // and one whose control log has not caught up would hold every
                    // participant until it answers (`ready_moves`' filter, again); one the
                    // epochs' leader has not taken in yet would own key groups no epoch
                    // covers.
                    self.plan_moves(state.table.len())
                        .into_iter()
                        .filter(|m| self.move_plan.contains(&m.kg))
                        .filter(|m| self.may_move_to(m.to))
                        .collect()
                } else {
                    std::mem::take(&mut self.failover_plan)
                        .into_iter()
                        .filter(|m| {
                            let o = &state.table[m.kg as usize];
                            o.version == m.version
                                && o.owner.is_some_and(|d| {
                                    !state.members.get(&d).is_some_and(|x| x.alive)
                                        && self.detector.may_take_over(
                                            d,
                                            generation_of(state, d),
                                            now,
                                        )
                                })
                                && state
                                    .members
                                    .get(&m.to)
                                    .is_some_and(|t| t.alive && !t.leaving)
                        })
                        .collect()
                };
                let version = self.node.state().placement_version;
                if moves.is_empty() {
                    // Nothing of the round's plan stands now: the participants resume, and the
                    // next round plans again.
                    let targets: std::collections::BTreeSet<NodeId> = self
                        .plan_moves(state.table.len())
                        .into_iter()
                        .filter(|m| self.move_plan.contains(&m.kg))
                        .map(|m| m.to)
                        .collect();
                    let why: Vec<String> = targets
                        .iter()
                        .map(|&n| {
                            format!(
                                "node {n}: caught up {}, may own {}",
                                n == self.node.id() || self.node.caught_up(n),
                                self.lead.as_ref().is_some_and(|l| l.may_own(n))
                            )
                        })
                        .collect();
                    tracing::info!(
                        planned = self.move_plan.len(),
                        ?why,
                        "every participant holds, but none of the round's moves stands now; the next round plans again"
                    );
                    self.lead_input(LeadInput::Moved);
                    return;
                }
                tracing::info!(
                    moves = moves.len(),
                    "every participant holds: moving key groups"
                );
                match self.node.propose(&Command::Move { moves }) {
                    Ok(()) => self.move_proposed = Some((version, Instant::now())),
                    Err(e) => {
                        tracing::warn!(error = %e, "key-group moves not proposed; the participants resume");
                        self.lead_input(LeadInput::Moved);
                    }
                }
            }
        }
    }

    /// A manifest put of this epochs' leader ended. With manifest puts (`cluster_log =
    /// false`) nothing in the control group fences a deposed leader's commit: a leader that
    /// was paused (or cut off) while its put was under way may find it landed after its
    /// successor read the newest manifest, so that the successor's chain lacks it, and its
    /// `Committed` would have the participants acknowledge what the cluster then loses. So it
    /// is passed on only while the leader's lease stands (`Lease::until_ms`: a read index confirmed
    /// by a majority within `lease_ms` of when it was asked, renewed also while the node
    /// stops), and a successor starts leading the epochs — and so reads the newest manifest —
    /// only `lease_ms` after it became the Raft leader (`lead_epochs`; also after a hand-over,
    /// whose record it may not have applied yet when it is elected). The successor
    /// was elected after the last read index this leader got confirmed (a voter that moved to
    /// the successor's term acknowledges no heartbeat of this one), so this leader's lease ran
    /// out before the successor's read, and whatever it passed on, its manifest landed before
    /// that read. Otherwise the answer waits, in order, until the lease is renewed (a busy
    /// control thread) or the leadership is gone (it is dropped with the leader).
    fn manifest_done(&mut self, epoch: u64, result: Result<bool, String>) {
        if self.log_cfg.enabled {
            self.lead_input(LeadInput::ManifestDone { epoch, result });
            return;
        }
        if self.unconfirmed_done.is_empty() && !self.lease_stands() {
            tracing::warn!(
                epoch,
                "the epochs' leader holds the commit of epoch {epoch} until a majority confirms its leadership again (no read index confirmed within the lease: it may have been deposed meanwhile)"
            );
        }
        self.unconfirmed_done.push((epoch, result));
        self.pass_confirmed_done();
    }

    /// The epochs' leader's lease stands (a read index a majority confirmed, asked within
    /// `lease_ms`).
    fn lease_stands(&self) -> bool {
        crate::mesh::mono_ms() < self.lease.until_ms()
    }

    /// Passes the manifest puts held by [`Driver::manifest_done`] on, in order, once the
    /// leader's lease stands again.
    fn pass_confirmed_done(&mut self) {
        if self.unconfirmed_done.is_empty() || !self.lease_stands() {
            return;
        }
        for (epoch, result) in std::mem::take(&mut self.unconfirmed_done) {
            self.lead_input(LeadInput::ManifestDone { epoch, result });
        }
    }

    fn epoch_route(&mut self, r: EpochRoute) {
        if let EpochRoute::Send { from, to, msg } = &r {
            tracing::trace!(from, to, ?msg, "epoch message");
        }
        match r {
            EpochRoute::Latest { gen, r } => {
                if self.lead.as_ref().is_some_and(|l| l.gen() == gen) {
                    self.lead_input(LeadInput::Latest(r));
                } else {
                    tracing::debug!(gen, "a read of the newest manifest for an earlier synchronisation ended: dropped");
                }
            }
            EpochRoute::ManifestDone {
                lead,
                epoch,
                result,
            } => {
                if lead == self.leads && self.lead.is_some() {
                    self.manifest_done(epoch, result);
                } else {
                    tracing::debug!(
                        epoch,
                        "a manifest write of an earlier epochs' leader ended: dropped"
                    );
                }
            }
            EpochRoute::Uploaded(n, r) => self.log_uploaded(n, r),
            EpochRoute::Send { from, to, msg } if to == self.node.id() => {
                if msg.to_leader() {
                    // A part that wrote key groups its sender does not own at the versions of
                    // this node's table is refused (never listed by a manifest): the
                    // participants synchronise again, and roll back to the last commit.
                    let stale = match &msg {
                        EpochMsg::Part { owned, .. } if !owned.is_empty() => {
                            self.node.state().stale_write(from, owned)
                        }
                        _ => None,
                    };
                    let msg = match (msg, stale) {
                        (EpochMsg::Part { gen, epoch, .. }, Some(why)) => {
                            tracing::error!(
                                node = from,
                                epoch,
                                "a part is refused: {why}; the participants synchronise again"
                            );
                            EpochMsg::Reset { gen }
                        }
                        (msg, _) => msg,
                    };
                    self.lead_input(LeadInput::Msg { from, msg });
                } else {
                    let _ = self.epoch_driver.send(DriverEvent::Epoch { from, msg });
                }
            }
            EpochRoute::Send { to, msg, .. } => {
                if let Some(link) = self.link(to) {
                    if !link.send_epoch(msg.encode().into()) {
                        tracing::warn!(
                            peer = to,
                            "epoch message dropped (the link's queue is full)"
                        );
                    }
                }
            }
        }
    }

    fn process(&mut self) -> Result<(), String> {
        let out = self.node.process()?;
        for (to, bytes) in out.messages {
            self.send(to, bytes);
        }
        for (ctx, index) in &out.read_states {
            self.lease.read_state(ctx, *index);
        }
        if !out.applied.is_empty() {
            for (index, cmd, outcome) in &out.applied {
                tracing::debug!(index, ?cmd, ?outcome, "control entry applied");
                self.log_applied(cmd, outcome);
                if *outcome == Outcome::Applied {
                    self.record(*index, cmd);
                    match cmd {
                        Command::MarkDead {
                            id,
                            generation,
                            stopped: true,
                        } => self.detector.stopped(*id, *generation),
                        Command::Join { id, .. } | Command::Remove { id } => {
                            self.detector.forget_stop(*id)
                        }
                        _ => {}
                    }
                }
                // A join refused when its entry applied (its id taken meanwhile): answered now.
                if let (
                    Command::Join {
                        id, incarnation, ..
                    },
                    Outcome::Rejected(why),
                ) = (cmd, outcome)
                {
                    if self
                        .pending_joins
                        .get(id)
                        .is_some_and(|(i, _)| i == incarnation)
                    {
                        if let Some((_, reply)) = self.pending_joins.remove(id) {
                            let _ = reply.send(Err(Status::already_exists(why.clone())));
                        }
                    }
                }
            }
            self.node.storage().save_state(self.node.state())?;
            self.node.compact(KEEP_ENTRIES)?;
        }
        let me = self.node.id();
        let state = self.node.state();
        let mine = state
            .members
            .get(&me)
            .filter(|m| m.incarnation == self.incarnation);
        if mine.is_some_and(|m| !m.alive) && self.stopping.is_none() {
            // Declared dead (it was paused, or cut off from the majority, for longer than the
            // failure timeout): its key groups have moved. It joins again as a new generation;
            // the rollback that takes it back into the epochs drops what it held.
            tracing::warn!(
                node = me,
                "this node was declared dead by the cluster (it did not answer for longer than the failure timeout): its key groups have moved to the others; joining again"
            );
            self.incarnation = random_u64().max(1);
            self.join_proposed = None;
            self.lease.revoke();
        }
        // Left: it was leaving, owns nothing, and the Raft group has let it go (or the
        // members have). Also when this process asked to leave before its own join was
        // applied (it restarted and was told to leave at once): the leave applies to its id,
        // and once removed it hears nothing more (a chaos run waited 90 s for it).
        // A leader hears no replication: its silence counts from when it stopped leading. (A
        // leader that left owned nothing counted as gone at once, before it proposed its own
        // removal: it stopped and left its seat in the group, and a chaos run's cluster,
        // losing one more voter, never elected a leader again.)
        if self.node.is_leader() {
            self.last_heard = Instant::now();
        }
        if (self.joined || self.leave_proposed.is_some()) && !self.left {
            let listed = state.conf.as_ref().is_some_and(|c| c.lists(me));
            let gone = match state.members.get(&me) {
                None => true,
                Some(m) => {
                    m.leaving
                        && state.owned_by(me) == 0
                        && (!listed
                            // A learner removed from the group may not learn that the
                            // change committed: the leader stops sending to it.
                            || self.last_heard.elapsed() > LEFT_SILENCE)
                }
            };
            if gone {
                tracing::info!(node = me, "this node has left the cluster: it owns nothing and is out of the Raft group; stopping");
                self.left = true;
            }
        }
        // Only this process's record counts: a new process of a member that stopped (it said
        // so at its generation, whose key groups then move at once) holds no lease until its
        // own Join has applied, as the next generation.
        let alive_here = state
            .members
            .get(&me)
            .is_some_and(|m| m.alive && m.incarnation == self.incarnation);
        let until = self.lease.applied(state.applied_index, alive_here);
        self.lease_until = if self.stopping.is_some() { 0 } else { until };
        self.joined = state
            .members
            .get(&me)
            .is_some_and(|m| m.incarnation == self.incarnation);
        // An applied Join records a member's current address: forget what was learned before.
        for (id, m) in &state.members {
            if let Some(seen) = self.seen_incarnations.insert(*id, m.incarnation) {
                if seen != m.incarnation {
                    self.learned.remove(id);
                }
            }
        }
        if self.seen_incarnations.len() > state.members.len() {
            // Removed members (one that joins again is seen anew).
            self.seen_incarnations
                .retain(|id, _| state.members.contains_key(id));
        }
        if !self.pending_joins.is_empty() {
            let done: Vec<NodeId> = self
                .pending_joins
                .iter()
                .filter(|(id, (inc, _))| {
                    state.members.get(id).is_some_and(|m| m.incarnation == *inc)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                if let Some((_, reply)) = self.pending_joins.remove(&id) {
                    if let Err(e) = crate::failpoint::eval("mesh-join-reply") {
                        // The join is applied but the joiner is not told.
                        tracing::warn!(node = id, "{e}");
                        continue;
                    }
                    let _ = reply.send(Ok(mpb::JoinReply {
                        accepted: true,
                        cluster_id: self.cluster_id.to_string(),
                        leader: me,
                        leader_addr: self.grpc_addr.clone(),
                        checkpoint_url: self.node.state().checkpoint_url.clone(),
                    }));
                }
            }
            // A lost leadership drops the waiting calls (the joiner retries elsewhere), and so
            // does a caller that gave up.
            if !self.node.is_leader() {
                self.pending_joins.clear();
            }
            self.pending_joins.retain(|_, (_, r)| !r.is_closed());
        }
        Ok(())
    }

    /// The link to a peer (started, or restarted at its current address).
    fn link(&mut self, to: NodeId) -> Option<&Link> {
        if self.removed.contains(&to) {
            return None;
        }
        // What the peer's current process said (its stream, its join) is newer than its last
        // applied Join, until the next one applies.
        let addr = self.learned.get(&to).cloned().or_else(|| {
            self.node
                .state()
                .members
                .get(&to)
                .map(|m| m.grpc_addr.clone())
        })?;
        if self.links.get(&to).is_none_or(|l| l.addr != addr) {
            let link = Link::start(
                self.node.id(),
                self.grpc_addr.clone(),
                self.cluster_id.clone(),
                to,
                addr,
                self.inbox.clone(),
            );
            self.links.insert(to, link);
        }
        self.links.get(&to)
    }

    fn send(&mut self, to: NodeId, bytes: Vec<u8>) {
        let sent = self.link(to).map(|l| l.send(bytes.into()));
        if sent != Some(true) {
            self.node.report_unreachable(to);
        }
    }

    /// What the leader proposes: the Raft configuration that fits the members, then the
    /// placement of unowned key groups.
    fn lead(&mut self) -> Result<(), String> {
        self.reconcile_conf()?;
        // Members that left the Raft group after leaving leave the members.
        let state = self.node.state();
        let gone: Vec<NodeId> = state
            .members
            .values()
            .filter(|m| m.leaving && state.owned_by(m.id) == 0)
            .filter(|m| !state.conf.as_ref().is_some_and(|c| c.lists(m.id)))
            .map(|m| m.id)
            .collect();
        self.remove_proposed
            .retain(|id, t| gone.contains(id) && t.elapsed() < REPROPOSE);
        for id in gone {
            if self.remove_proposed.contains_key(&id) {
                continue;
            }
            tracing::info!(node = id, "node {id} left: removing it from the members");
            self.remove_proposed.insert(id, Instant::now());
            self.node.propose(&Command::Remove { id })?;
        }
        let state = self.node.state();
        // Key groups are assigned when the cluster is bootstrapped, all to its first node, in
        // one entry (nothing moves yet, so nothing to rate-limit). Owned key groups move only
        // with live handover (not built yet), so a cluster that has grown keeps its owners.
        if state.live_members() != [self.node.id()] {
            return Ok(());
        }
        let moves: Vec<_> = state
            .plan_moves(state.table.len())
            .into_iter()
            .filter(|m| state.table[m.kg as usize].owner.is_none())
            .collect();
        if !moves.is_empty() {
            // Rejected (a stale version) when an earlier round is still being applied: the
            // next round plans again from the applied table.
            self.node.propose(&Command::Move { moves })?;
        }
        Ok(())
    }

    /// Members join as learners; voters are added (joint consensus, left explicitly) up to 3
    /// of 3–4 live members and 5 of 5 or more; a dead voter is swapped for a caught-up
    /// learner (`statemesh_mesh::failure::conf_change`). One change at a time.
    fn reconcile_conf(&mut self) -> Result<(), String> {
        let state = self.node.state();
        if let Some((c, t)) = &self.conf_proposed {
            if *c == state.conf && t.elapsed() < REPROPOSE {
                return Ok(());
            }
        }
        let mark = Some((state.conf.clone(), Instant::now()));
        if self.node.in_joint() {
            self.conf_proposed = mark;
            return self.node.propose_leave_joint();
        }
        let node = &self.node;
        let change =
            statemesh_mesh::failure::conf_change(state, node.id(), &|id| node.caught_up(id));
        let Some(change) = change else {
            self.conf_wait = None;
            return Ok(());
        };
        // A leader does not remove itself: raft-rs keeps a removed leader leading (dropping
        // every proposal) and parts of it assume the leader is in the group. It hands the
        // leadership to a voter that stays, alive and furthest along, which removes it; it then
        // learns from its log that it is out, and stops.
        let me = node.id();
        if change.iter().any(|(n, role)| *n == me && role.is_none()) {
            if let Some(to) = self.transfer_target(&change) {
                if self.transfer_asked.is_none_or(|t| t.elapsed() >= REPROPOSE) {
                    self.transfer_asked = Some(Instant::now());
                    tracing::info!(
                        node = me,
                        to,
                        "leaving: handing the Raft group's leadership over before being removed"
                    );
                    self.node.transfer_leader(to);
                }
            }
            return Ok(());
        }
        // A member that leaves stops once it is out of the group: not while it still takes
        // part in the cluster's epochs (it leaves them live once it owns nothing, and the open
        // epochs need its parts), for up to `CONF_WAIT_FOR_RETIRE`.
        let takes_part = |n: &NodeId| {
            self.participants
                .as_ref()
                .is_some_and(|p| p.contains_key(n))
                || self.lead.as_ref().is_some_and(|l| l.active().contains(n))
        };
        // Nor before it knows that its leave committed (it reports a commit index at or past
        // it): it stops on its own once it sees its leave applied and then hears nothing more
        // (`LEFT_SILENCE`). Removed before its log held the leave (a chaos run: it had just
        // restarted and the leader had not sent it anything yet), it waited for ever. Also up
        // to `CONF_WAIT_FOR_RETIRE`: a dead member never answers.
        let leave_synced = &mut self.leave_synced;
        leave_synced.retain(|n, _| change.iter().any(|(c, role)| c == n && role.is_none()));
        let mut unsynced = false;
        for (n, role) in &change {
            if role.is_some() || !state.members.get(n).is_some_and(|m| m.leaving) {
                continue;
            }
            // Once it reports that commit index, it knows its leave committed and applies it.
            let target = *leave_synced.entry(*n).or_insert_with(|| node.committed());
            unsynced |= node.peer_committed(*n).is_none_or(|c| c < target);
        }
        if (unsynced
            || change
                .iter()
                .any(|(n, role)| role.is_none() && takes_part(n)))
            && self.conf_wait.get_or_insert_with(Instant::now).elapsed() < CONF_WAIT_FOR_RETIRE
        {
            return Ok(());
        }
        self.conf_wait = None;
        tracing::info!(
            ?change,
            "changing the Raft group (node, new role; None: removed)"
        );
        self.conf_proposed = mark;
        self.node.propose_membership(&change)
    }

    fn view(&self, committed_epoch: u64, moving: Option<crate::mesh::Moving>) -> ClusterView {
        let s = self.node.state();
        // (Only the moving key groups' targets, only during a move: the view is rebuilt at
        // every turn of the control loop.)
        let moving = moving.map(|m| {
            let members = s.placement_members();
            let mut key_groups: Vec<_> = m
                .key_groups
                .iter()
                .map(|&kg| {
                    (
                        kg,
                        s.table.get(kg as usize).and_then(|o| o.owner),
                        statemesh_mesh::placement::owner_of(kg, &members),
                    )
                })
                .collect();
            key_groups.sort_unstable();
            MovingView {
                at_epoch: m.at,
                key_groups,
            }
        });
        ClusterView {
            node_id: self.node.id(),
            cluster_id: s.cluster_id.clone(),
            leader: self.node.leader(),
            term: self.node.term(),
            placement_version: s.placement_version,
            committed_epoch,
            epochs_reserved: s.epochs_reserved,
            applied_index: s.applied_index,
            unassigned_key_groups: s.table.iter().filter(|o| o.owner.is_none()).count(),
            members: s
                .members
                .values()
                .map(|m| MemberView {
                    member: m.clone(),
                    key_groups: s.owned_by(m.id),
                })
                .collect(),
            left: self.left,
            suspected: self.detector.suspected(),
            moving,
            history: self.history.iter().cloned().collect(),
            epoch_log: EpochLogView {
                epochs: s.log.epochs().len(),
                bytes: s.log.size(),
                uploaded: s.log.uploaded,
                max_bytes: if self.log_cfg.enabled {
                    self.log_cfg.max_bytes
                } else {
                    0
                },
            },
        }
    }

    /// Records the changes an applied entry made.
    fn record(&mut self, index: u64, cmd: &Command) {
        let state = self.node.state();
        let change = |why, node, key_groups, detail: String| Change {
            at_ms: crate::shard::now_ms(),
            index,
            why,
            node,
            key_groups,
            detail,
        };
        let c = match cmd {
            Command::Join { id, .. } => {
                let g = state.members.get(id).map_or(0, |m| m.generation);
                let why = if g > 1 { "rejoin" } else { "join" };
                change(why, Some(*id), 0, format!("generation {g}"))
            }
            Command::MarkDead {
                id,
                generation,
                stopped: false,
            } => change(
                "failure",
                Some(*id),
                0,
                format!("generation {generation} declared dead"),
            ),
            Command::MarkDead {
                id,
                generation,
                stopped: true,
            } => change(
                "stop",
                Some(*id),
                0,
                format!("generation {generation} stopped (SIGTERM)"),
            ),
            Command::Leave { id } => change("leave", Some(*id), 0, "leaving".into()),
            Command::Remove { id } => change("left", Some(*id), 0, "removed".into()),
            Command::Move { moves } => {
                let why = if moves.iter().any(|m| m.orphan) {
                    "failover"
                } else if state.members.values().any(|m| m.leaving) {
                    "leave"
                } else {
                    "rebalance"
                };
                let to: std::collections::BTreeSet<NodeId> = moves.iter().map(|m| m.to).collect();
                change(why, None, moves.len(), format!("to {to:?}"))
            }
            Command::SetRole { .. }
            | Command::CommitEpoch { .. }
            | Command::LogEpoch { .. }
            | Command::ReserveEpochs { .. }
            | Command::Fence { .. }
            | Command::Uploaded { .. } => return,
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(c);
    }
}
