//! The node's replica of the control group (`statemesh_mesh::group`), run as a tokio task.
//!
//! A node without peers is a cluster of one: it bootstraps a group with itself as the only
//! voter (its log in `<data_dir>/control`, raft-engine, fsynced), joins it on every start (a
//! new generation per start), and, as leader, assigns the key groups by rendezvous placement,
//! at most `MOVES_PER_ROUND` per round. `GET /v1/cluster` shows the result. Joining other
//! nodes (the mesh transport), routing and cluster-wide epochs come next (issue 8).
//!
//! The node id is kept in `<data_dir>/node-id`: generated on the first start unless
//! `--node-id` gives it, and a data directory of one node refuses to start as another.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use statemesh_mesh::control::{ClusterState, Command, Member, Outcome, RaftConf, Role};
use statemesh_mesh::group::{ControlNode, Timing};
use statemesh_mesh::placement::NodeId;
use statemesh_mesh::storage::{open_in, EngineStorage};

/// Key groups moved per round of placement (a round is a Raft commit).
const MOVES_PER_ROUND: usize = 128;
/// One tick of the control group.
const TICK: Duration = Duration::from_millis(50);
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
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// Bumped by every change of the key-group table.
    pub placement_version: u64,
    /// The newest epoch committed (today the node's own checkpoint epochs).
    pub committed_epoch: u64,
    /// The control log's applied index.
    pub applied_index: u64,
    /// Key groups without an owner yet.
    pub unassigned_key_groups: usize,
    /// The members.
    pub members: Vec<MemberView>,
}

/// Shared with the admin endpoints.
pub type ClusterHandle = Arc<Mutex<ClusterView>>;

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
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    // Positive and printable as a JSON number without loss.
    (h.finish() >> 12).max(1)
}

/// Starts the control group of this node. `committed_epoch` reads the checkpoint driver's
/// committed epoch for the view.
pub fn start(
    data_dir: &Path,
    id: NodeId,
    key_groups: u32,
    grpc_addr: String,
    http_addr: String,
    handle: ClusterHandle,
    committed_epoch: Box<dyn Fn() -> u64 + Send>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let bootstrap = RaftConf {
        voters: vec![id],
        ..Default::default()
    };
    let storage = open_in(data_dir, &bootstrap)?;
    let state = match storage.load_state()? {
        Some(s) => s,
        None => {
            let mut s = ClusterState::new(key_groups);
            s.conf = Some(bootstrap);
            s
        }
    };
    if state.table.len() != key_groups as usize {
        return Err(format!(
            "the control group of this data directory has {} key groups, the configuration {key_groups}",
            state.table.len()
        ));
    }
    let node = ControlNode::new(id, storage, state, Timing::default())?;
    handle.lock().node_id = id;
    let h = handle;
    let task = tokio::spawn(async move {
        let mut c = Driver {
            node,
            joined: false,
            join_proposed: None,
            grpc_addr,
            http_addr,
        };
        let mut tick = tokio::time::interval(TICK);
        // After a stall (an fsync, say) no burst of ticks: it would look like lost heartbeats.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = c.round() {
                tracing::error!(error = %e, "control group: cannot write its log; stopping it");
                return;
            }
            *h.lock() = c.view(committed_epoch());
        }
    });
    Ok(task)
}

struct Driver {
    node: ControlNode<EngineStorage>,
    /// This start's Join has been applied.
    joined: bool,
    /// The term in which this start's Join was last proposed.
    join_proposed: Option<u64>,
    grpc_addr: String,
    http_addr: String,
}

impl Driver {
    fn round(&mut self) -> Result<(), String> {
        self.node.tick();
        let out = self.node.process()?;
        for (to, _) in &out.messages {
            // No transport yet: a lone node has no peers to reach.
            self.node.report_unreachable(*to);
        }
        if !out.applied.is_empty() {
            for (index, cmd, outcome) in &out.applied {
                tracing::debug!(index, ?cmd, ?outcome, "control entry applied");
                if matches!(cmd, Command::Join { id, .. } if *id == self.node.id())
                    && *outcome == Outcome::Applied
                {
                    self.joined = true;
                    self.join_proposed = None;
                }
            }
            self.node.storage().save_state(self.node.state())?;
            self.node.compact(KEEP_ENTRIES)?;
        }
        if self.node.is_leader() {
            // A proposal can be dropped (a leader change, a transfer): proposed again later.
            if let Err(e) = self.lead() {
                tracing::debug!(error = %e, "control proposal not taken; retried");
            }
        }
        Ok(())
    }

    /// What the leader proposes: its own (re)join, then the placement of key groups.
    fn lead(&mut self) -> Result<(), String> {
        let id = self.node.id();
        if !self.joined {
            // Proposed once per term until applied (a proposal lost with a leader change is
            // proposed again by the next leader's round).
            if self.join_proposed != Some(self.node.term()) {
                self.join_proposed = Some(self.node.term());
                self.node.propose(&Command::Join {
                    id,
                    grpc_addr: self.grpc_addr.clone(),
                    http_addr: self.http_addr.clone(),
                    role: Role::Voter,
                })?;
            }
            return Ok(());
        }
        let state = self.node.state();
        if !state.members.contains_key(&id) {
            return Ok(());
        }
        let moves = state.plan_moves(MOVES_PER_ROUND);
        if !moves.is_empty() {
            // Rejected (a stale version) when an earlier round is still being applied: the
            // next round plans again from the applied table.
            self.node.propose(&Command::Move { moves })?;
        }
        Ok(())
    }

    fn view(&self, committed_epoch: u64) -> ClusterView {
        let s = self.node.state();
        ClusterView {
            node_id: self.node.id(),
            leader: self.node.leader(),
            term: self.node.term(),
            placement_version: s.placement_version,
            committed_epoch,
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
        }
    }
}
