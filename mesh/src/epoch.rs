//! Cluster-wide epochs (issue 8, item 6) as pure state machines: [`NodeCut`] runs on every
//! node (when its cut of an epoch happens, which messages from peers are in flight across the
//! cut, when its part of the epoch is complete), [`ClusterCoordinator`] on the leader (when an
//! epoch starts, when every part is written, when to write the manifest and propose the commit
//! entry, and which epochs to abandon when a participant dies or restarts). The single-node
//! coordinator (`node/src/checkpoint/coordinator.rs`) is the case of one participant with no
//! peers. [`EpochLeader`] wraps the coordinator with the synchronisation of the participants
//! and is what the node's control thread runs (`node/src/cluster.rs`); [`NodeCut`] and
//! [`Outbox`] are not wired into the node yet (one participant so far).
//!
//! **The cut** is Chandy–Lamport over the FIFO node-pair streams. A node cuts epoch `e` when
//! the leader's barrier of `e` or the first peer marker of `e` reaches it, whichever comes
//! first (a node that waited for the barrier could process, inside its `e`, a message a peer
//! sent after cutting `e`: an orphan that recovery to `e` would apply twice). Its shards pass
//! their cuts one after another; once all have, it sends a marker of `e` to every peer, behind
//! everything they sent before their cuts, and messages shards sent after their cut wait for
//! it ([`Outbox`]). (Sending the marker at the node's cut, before the shards had cut, loses
//! messages: a shard still in `e` sends behind the marker, and the peer takes the message for
//! one of `e + 1`. `tests/epoch_sim.rs` finds that schedule at once.) A message from peer `p`
//! that arrives after this node's cut of `e` but before `p`'s marker of `e` was sent before
//! `p`'s cut and received after this node's: it is in flight across `e` and is logged into
//! this node's part of `e` (replayed on recovery to `e`). The part of `e` is complete once the
//! local shards have cut `e` and a marker of `e` came from every peer that takes part in `e`.
//!
//! **The commit**: parts are written to blob storage by their nodes; once every participant's
//! part of the next epoch is written, the leader writes the manifest (create-only) naming them
//! and the previous committed epoch, then proposes the commit entry; nodes release what the
//! epoch holds when the entry applies. A written manifest *is* a commit (blob storage alone
//! restores it), so an epoch whose manifest was written is never abandoned. When a participant
//! dies or restarts, the open epochs it takes part in (and all later ones) are abandoned: every
//! node rolls back to the last committed epoch and replays its pending messages. Epoch numbers
//! are never reused; a manifest names its predecessor, so the chain skips abandoned numbers.

use std::collections::{BTreeMap, BTreeSet};

use crate::control::EpochHandoff;
use crate::placement::NodeId;

/// An epoch number.
pub type Epoch = u64;

/// What a node's cut learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutInput {
    /// The leader starts `epoch` with these participants.
    Barrier {
        /// The epoch.
        epoch: Epoch,
        /// Its participants (this node among them).
        members: BTreeSet<NodeId>,
    },
    /// Peer `from`'s marker of `epoch`, on its stream (behind all it sent before its cut).
    Marker {
        /// The peer.
        from: NodeId,
        /// The epoch.
        epoch: Epoch,
        /// The epoch's participants (a node that cuts on a marker learns them from it).
        members: BTreeSet<NodeId>,
    },
    /// Every local shard has cut `epoch`.
    ShardsCut {
        /// The epoch.
        epoch: Epoch,
    },
    /// Epochs after `committed` were abandoned: the node rolled back to `committed`; cuts
    /// restart after the highest epoch ever started.
    Abandoned {
        /// The last committed epoch.
        committed: Epoch,
        /// The highest epoch started so far (numbers are never reused).
        started: Epoch,
    },
}

/// What a node does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutAction {
    /// Cut `epoch` on the local shards (each reports when done: [`CutInput::ShardsCut`]).
    CutShards(Epoch),
    /// Send the marker of `epoch` to these peers, behind everything already sent to them, then
    /// what their [`Outbox`] releases; the streams to other peers pass `epoch` without a marker
    /// (`to` may be empty).
    SendMarkers {
        /// The epoch.
        epoch: Epoch,
        /// The peers.
        to: Vec<NodeId>,
        /// The epoch's participants (carried on the marker).
        members: BTreeSet<NodeId>,
    },
    /// This node's part of `epoch` is complete: write it (its local delta, its pending
    /// messages, and the messages logged in flight for it).
    WritePart(Epoch),
}

#[derive(Debug, Clone)]
struct Open {
    members: BTreeSet<NodeId>,
    shards_cut: bool,
    markers: BTreeSet<NodeId>,
}

/// A node's side of the cluster cut.
#[derive(Debug, Clone)]
pub struct NodeCut {
    me: NodeId,
    /// The last epoch cut here.
    cut: Epoch,
    /// The last epoch whose part was complete (parts complete in order).
    complete: Epoch,
    /// Epochs cut here whose part is not complete yet.
    open: BTreeMap<Epoch, Open>,
    /// The newest marker from each peer.
    markers: BTreeMap<NodeId, Epoch>,
    /// Epochs at or below this were abandoned or committed: their markers are stale.
    floor: Epoch,
}

impl NodeCut {
    /// A node `me` that has cut every epoch up to `cut` (its last committed or started one).
    pub fn new(me: NodeId, cut: Epoch) -> Self {
        NodeCut {
            me,
            cut,
            complete: cut,
            open: BTreeMap::new(),
            markers: BTreeMap::new(),
            floor: cut,
        }
    }

    /// The last epoch cut here.
    pub fn cut(&self) -> Epoch {
        self.cut
    }

    /// The epochs a message from `from` arriving now is in flight for (its part logs it):
    /// those this node has cut and `from` had not cut when it sent the message, among the
    /// epochs `from` takes part in. Empty for a message that belongs to the current epoch.
    pub fn in_flight(&self, from: NodeId) -> Vec<Epoch> {
        let seen = self.markers.get(&from).copied().unwrap_or(self.floor);
        self.open
            .range(seen.max(self.floor) + 1..)
            .filter(|(_, o)| o.members.contains(&from))
            .map(|(e, _)| *e)
            .collect()
    }

    /// Feeds one input; returns the actions, in order.
    pub fn handle(&mut self, input: CutInput) -> Vec<CutAction> {
        let mut out = Vec::new();
        match input {
            CutInput::Barrier { epoch, members } => self.cut_to(epoch, &members, &mut out),
            CutInput::Marker {
                from,
                epoch,
                members,
            } => {
                if epoch <= self.floor {
                    return out;
                }
                let m = self.markers.entry(from).or_insert(self.floor);
                *m = (*m).max(epoch);
                self.cut_to(epoch, &members, &mut out);
                // FIFO streams: a marker of `epoch` follows the peer's earlier markers.
                for (_, o) in self.open.range_mut(..=epoch) {
                    o.markers.insert(from);
                }
            }
            CutInput::ShardsCut { epoch } => {
                if let Some(o) = self.open.get_mut(&epoch) {
                    o.shards_cut = true;
                    // Every message the shards sent before their cuts is on the streams now:
                    // the markers go behind them (and the held later ones behind the markers:
                    // see [`Outbox`]).
                    // Also with no peer in `epoch`: every stream passes it ([`Outbox::marker`]).
                    let to: Vec<NodeId> = o
                        .members
                        .iter()
                        .copied()
                        .filter(|p| *p != self.me)
                        .collect();
                    out.push(CutAction::SendMarkers {
                        epoch,
                        to,
                        members: o.members.clone(),
                    });
                }
            }
            CutInput::Abandoned { committed, started } => {
                self.open.clear();
                self.markers.clear();
                self.cut = self.cut.max(started);
                self.complete = self.cut;
                self.floor = self.cut;
                let _ = committed;
            }
        }
        // Parts complete in order.
        while let Some((&e, o)) = self.open.iter().next() {
            let peers_done = o
                .members
                .iter()
                .all(|p| *p == self.me || o.markers.contains(p));
            if !(o.shards_cut && peers_done) {
                break;
            }
            self.open.remove(&e);
            self.complete = e;
            out.push(CutAction::WritePart(e));
        }
        out
    }

    fn cut_to(&mut self, epoch: Epoch, members: &BTreeSet<NodeId>, out: &mut Vec<CutAction>) {
        while self.cut < epoch {
            self.cut += 1;
            let e = self.cut;
            self.open.insert(
                e,
                Open {
                    members: members.clone(),
                    shards_cut: false,
                    markers: BTreeSet::new(),
                },
            );
            out.push(CutAction::CutShards(e));
        }
    }
}

/// This node's stream to one peer, as the cut sees it: application messages tagged with the
/// epoch their sending shard was in (its last cut + 1), and this node's markers.
///
/// A node's shards pass their cut of an epoch one after another, so around a cut the node
/// sends in two epochs at once. The marker of `e` goes out once every shard has cut `e`
/// ([`CutAction::SendMarkers`] follows [`CutInput::ShardsCut`]), behind every message sent in
/// `e` or before; a message sent in `e + 1` by a shard that cut early is held until then, so
/// that no message of a later epoch reaches a peer ahead of the marker that closes the earlier
/// one (the peer would take it for a message of the earlier epoch: an orphan, applied twice
/// after a rollback). Messages of one shard keep their order (tags never decrease per shard);
/// a message may overtake held messages of another shard.
#[derive(Debug, Clone)]
pub struct Outbox<T> {
    /// The last epoch whose marker went out.
    marked: Epoch,
    held: std::collections::VecDeque<(Epoch, T)>,
}

impl<T> Outbox<T> {
    /// A stream whose markers up to `marked` are sent (the node's last cut at start, or after
    /// a rollback).
    pub fn new(marked: Epoch) -> Self {
        Outbox {
            marked,
            held: Default::default(),
        }
    }

    /// A message sent in epoch `tag`: returned to be sent now, or held (`None`) until the
    /// marker of `tag - 1` is sent.
    pub fn push(&mut self, tag: Epoch, msg: T) -> Option<T> {
        if tag <= self.marked + 1 {
            Some(msg)
        } else {
            self.held.push_back((tag, msg));
            None
        }
    }

    /// The marker of `epoch` is sent now (or, to a peer outside `epoch`, the epoch passes
    /// without one): the held messages that may follow it, in order.
    pub fn marker(&mut self, epoch: Epoch) -> Vec<T> {
        self.marked = self.marked.max(epoch);
        // By epoch, not first-in-first-out: a message of `epoch + 1` held behind one of
        // `epoch + 2` (another shard's) goes now. Per shard the order holds (its tags never
        // decrease).
        let limit = self.marked + 1;
        let mut out = Vec::new();
        let mut keep = std::collections::VecDeque::with_capacity(self.held.len());
        for (t, m) in self.held.drain(..) {
            if t <= limit {
                out.push(m);
            } else {
                keep.push_back((t, m));
            }
        }
        self.held = keep;
        out
    }

    /// Messages held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A rollback: held messages belong to abandoned epochs and are dropped; markers count from
    /// `cut` (the node's cut after the rollback).
    pub fn reset(&mut self, cut: Epoch) {
        self.held.clear();
        self.marked = cut;
    }
}

/// What the leader's coordinator learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordInput {
    /// Time passed.
    Tick {
        /// Now, ms.
        now_ms: u64,
    },
    /// A caller waits for a commit somewhere: start an epoch soon.
    CallerWaiting,
    /// The participants of the epochs started from now on (the live members).
    Members(BTreeSet<NodeId>),
    /// Every shard of `node` has cut `epoch` (it has every marker of it): the next epoch may
    /// start once all participants have (a shard's cuts never overlap).
    CutDone {
        /// The epoch.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// `node` wrote its part of `epoch`.
    PartWritten {
        /// The epoch.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// The manifest of `epoch` is in blob storage (the epoch is committed).
    ManifestWritten {
        /// The epoch.
        epoch: Epoch,
    },
    /// The commit entry of `epoch` was applied (nodes release what it holds).
    Committed {
        /// The epoch.
        epoch: Epoch,
    },
    /// Writing the manifest or proposing the entry failed: retried after a backoff.
    Failed {
        /// The epoch.
        epoch: Epoch,
        /// Now, ms.
        now_ms: u64,
    },
    /// A participant died or restarted (a new generation): what it had not written is gone.
    Left {
        /// The node.
        node: NodeId,
    },
}

/// What the leader does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordAction {
    /// Start `epoch` on these participants.
    Barrier {
        /// The epoch.
        epoch: Epoch,
        /// Its participants.
        members: BTreeSet<NodeId>,
    },
    /// Write the manifest of `epoch` (create-only) naming the parts of these nodes and its
    /// predecessor.
    WriteManifest {
        /// The epoch.
        epoch: Epoch,
        /// The last committed epoch before it.
        previous: Epoch,
        /// Whose parts it lists.
        parts: BTreeSet<NodeId>,
    },
    /// Propose the commit entry of `epoch`.
    ProposeCommit(Epoch),
    /// Every epoch after `committed` up to `started` is abandoned: nodes roll back to
    /// `committed` and replay.
    Abandon {
        /// The last committed (or manifest-written) epoch.
        committed: Epoch,
        /// The highest epoch started.
        started: Epoch,
    },
    /// Ingress back-pressure on or off (too many epochs open).
    Backpressure(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persisting {
    Idle,
    Manifest(Epoch),
    Proposing(Epoch),
    Backoff(Epoch, u64, bool),
}

/// The leader's side of cluster epochs.
#[derive(Debug, Clone)]
pub struct ClusterCoordinator {
    interval_ms: u64,
    max_uncommitted: u64,
    committed: Epoch,
    started: Epoch,
    members: BTreeSet<NodeId>,
    /// Open epochs: participants and the parts written so far.
    open: BTreeMap<Epoch, (BTreeSet<NodeId>, BTreeSet<NodeId>)>,
    /// The participants that have not finished cutting the last epoch started.
    cutting: BTreeSet<NodeId>,
    persisting: Persisting,
    last_start_ms: Option<u64>,
    waiting: bool,
    failures: u32,
    backpressure: bool,
    /// No epoch starts (a live move waits for the open ones to commit, or for its own).
    paused: bool,
    /// No epoch above this one starts (see [`EpochLeader::reserve_epochs`]).
    limit: Epoch,
}

impl ClusterCoordinator {
    /// A coordinator resuming after `committed`, with `started` the highest epoch any leader
    /// started (numbers are never reused).
    pub fn new(interval_ms: u64, max_uncommitted: u64, committed: Epoch, started: Epoch) -> Self {
        ClusterCoordinator {
            interval_ms: interval_ms.max(1),
            max_uncommitted: max_uncommitted.max(1),
            committed,
            started: started.max(committed),
            members: BTreeSet::new(),
            open: BTreeMap::new(),
            cutting: BTreeSet::new(),
            persisting: Persisting::Idle,
            last_start_ms: None,
            waiting: false,
            failures: 0,
            backpressure: false,
            paused: false,
            limit: Epoch::MAX,
        }
    }

    /// Starts no epoch above `through` (the open ones go on committing).
    pub fn limit(&mut self, through: Epoch) {
        self.limit = through;
    }

    /// Starts no epoch while `on` (the open ones go on committing).
    pub fn pause(&mut self, on: bool) {
        self.paused = on;
    }

    /// Whether every epoch started is committed.
    pub fn drained(&self) -> bool {
        self.open.is_empty() && self.cutting.is_empty()
    }

    /// The last committed epoch.
    pub fn committed(&self) -> Epoch {
        self.committed
    }

    /// The highest epoch started.
    pub fn started(&self) -> Epoch {
        self.started
    }

    /// Whether a participant has not finished cutting the last epoch started.
    pub fn cutting(&self) -> bool {
        !self.cutting.is_empty()
    }

    /// Whether nothing is open, being cut or written, or waited for.
    pub fn quiet(&self) -> bool {
        self.drained() && !self.waiting && self.persisting == Persisting::Idle
    }

    fn next_open(&self) -> Option<Epoch> {
        self.open.keys().next().copied()
    }

    /// When (ms, the clock of `CoordInput::Tick`) the interval's next epoch is due (0: at
    /// the next tick, no epoch started yet).
    pub fn next_start_ms(&self) -> u64 {
        self.last_start_ms
            .map_or(0, |t| t.saturating_add(self.interval_ms))
    }

    fn maybe_persist(&mut self, out: &mut Vec<CoordAction>) {
        if self.persisting != Persisting::Idle {
            return;
        }
        if let Some((&e, (members, written))) = self.open.iter().next() {
            if members.is_subset(written) {
                self.persisting = Persisting::Manifest(e);
                out.push(CoordAction::WriteManifest {
                    epoch: e,
                    previous: self.committed,
                    parts: members.clone(),
                });
            }
        }
    }

    /// Feeds one input; returns the actions, in order.
    pub fn handle(&mut self, input: CoordInput) -> Vec<CoordAction> {
        let mut out = Vec::new();
        match input {
            CoordInput::Tick { now_ms } => {
                if let Persisting::Backoff(e, at, proposing) = self.persisting {
                    if now_ms >= at {
                        if proposing {
                            self.persisting = Persisting::Proposing(e);
                            out.push(CoordAction::ProposeCommit(e));
                        } else {
                            self.persisting = Persisting::Manifest(e);
                            out.push(CoordAction::WriteManifest {
                                epoch: e,
                                previous: self.committed,
                                parts: self.open[&e].0.clone(),
                            });
                        }
                    }
                }
                let since = self
                    .last_start_ms
                    .map_or(u64::MAX, |t| now_ms.saturating_sub(t));
                // A waiting caller starts an epoch at once when none is open, else at most
                // every 2 ms and only while no more than one is open (group commit: what
                // arrives while an epoch persists goes into one more, instead of epochs of a
                // call or two that each wait for a whole commit and cost every participant a
                // blob write).
                let due = (self.waiting
                    && (self.open.is_empty() || (since >= 2 && self.open.len() < 2)))
                    || since >= self.interval_ms;
                let blocked = due && self.open.len() as u64 >= self.max_uncommitted;
                if due
                    && !blocked
                    && !self.paused
                    && self.started < self.limit
                    && !self.members.is_empty()
                    && self.cutting.is_empty()
                {
                    self.started += 1;
                    self.cutting = self.members.clone();
                    self.last_start_ms = Some(now_ms);
                    self.waiting = false;
                    self.open
                        .insert(self.started, (self.members.clone(), BTreeSet::new()));
                    out.push(CoordAction::Barrier {
                        epoch: self.started,
                        members: self.members.clone(),
                    });
                }
                let on = blocked;
                if on != self.backpressure {
                    self.backpressure = on;
                    out.push(CoordAction::Backpressure(on));
                }
            }
            CoordInput::CallerWaiting => self.waiting = true,
            CoordInput::Members(m) => self.members = m,
            CoordInput::CutDone { epoch, node } => {
                if epoch == self.started {
                    self.cutting.remove(&node);
                }
            }
            CoordInput::PartWritten { epoch, node } => {
                if let Some((members, written)) = self.open.get_mut(&epoch) {
                    if members.contains(&node) {
                        written.insert(node);
                    }
                }
                self.maybe_persist(&mut out);
            }
            CoordInput::ManifestWritten { epoch } => {
                if self.persisting == Persisting::Manifest(epoch) {
                    self.persisting = Persisting::Proposing(epoch);
                    out.push(CoordAction::ProposeCommit(epoch));
                }
            }
            CoordInput::Committed { epoch } => {
                if self.next_open() == Some(epoch)
                    && matches!(self.persisting, Persisting::Proposing(e) | Persisting::Backoff(e, _, true) if e == epoch)
                {
                    self.open.remove(&epoch);
                    self.committed = epoch;
                    self.persisting = Persisting::Idle;
                    self.failures = 0;
                    self.maybe_persist(&mut out);
                }
            }
            CoordInput::Failed { epoch, now_ms } => {
                let proposing = match self.persisting {
                    Persisting::Manifest(e) if e == epoch => false,
                    Persisting::Proposing(e) if e == epoch => true,
                    _ => return out,
                };
                self.failures += 1;
                let backoff = (10u64 << self.failures.min(9)).min(5_000);
                self.persisting = Persisting::Backoff(epoch, now_ms + backoff, proposing);
            }
            CoordInput::Left { node } => {
                // What the node received since its last written part is gone, and peers may
                // have sent it messages in the epoch not started yet: unless it was no
                // participant at all, every node rolls back to the newest epoch whose
                // manifest is written (committed, or sealed: only its entry is pending), and
                // every other open epoch is abandoned.
                let was_member = self.members.remove(&node);
                let sealed = match self.persisting {
                    Persisting::Proposing(e) | Persisting::Backoff(e, _, true) => Some(e),
                    _ => None,
                };
                let involved = was_member
                    || self
                        .open
                        .iter()
                        .any(|(e, (m, _))| Some(*e) != sealed && m.contains(&node));
                self.cutting.remove(&node);
                if involved {
                    // Everyone rolls back: cuts start afresh.
                    self.cutting.clear();
                    self.open.retain(|e, _| Some(*e) == sealed);
                    if sealed.is_none() {
                        self.persisting = Persisting::Idle;
                    }
                    out.push(CoordAction::Abandon {
                        committed: sealed.unwrap_or(self.committed),
                        started: self.started,
                    });
                }
            }
        }
        debug_assert!(self.committed <= self.started);
        out
    }
}

/// A message of the cluster-epoch protocol between the leader and the participants (the
/// members that own key groups), carried on the node-pair control streams. Every message
/// names the leader's synchronisation generation `gen` (term-based, increasing): a message of
/// an older one is stale and ignored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EpochMsg {
    /// Leader → participant: stop cutting epochs of older generations and report where you
    /// stand (a node that commits its own epochs first finishes the one it is committing).
    Hold {
        /// The new generation.
        gen: u64,
    },
    /// Participant → leader: its last committed (released) epoch and its last cut one.
    Held {
        /// The generation answered.
        gen: u64,
        /// Its last committed epoch.
        committed: Epoch,
        /// The last epoch it cut.
        cut: Epoch,
        /// Its shards (each is a source of the cut: its markers are awaited).
        #[serde(default)]
        shards: u32,
        /// The generation its open epochs were cut in (that of the last `Resume` it
        /// followed; 0: none).
        #[serde(default)]
        cut_gen: u64,
        /// The generation its shards took at their last rollback (messages between shards
        /// carry it; a participant that joins the epochs live takes the others').
        #[serde(default)]
        shard_gen: u64,
    },
    /// Leader → participant: epochs up to `committed` are committed (release them); the ones
    /// after it are abandoned (roll back to `committed` and replay its pending messages);
    /// epochs go on after `base`.
    Resume {
        /// The generation.
        gen: u64,
        /// The last committed epoch.
        committed: Epoch,
        /// The highest epoch cut anywhere (numbers are never reused).
        base: Epoch,
        /// The newest manifest of the chain (a participant behind `committed` reads the
        /// epochs it missed from there).
        manifest: Option<Epoch>,
        /// Every participant rolls back to `committed`, what it did since its last cut
        /// included (several participants: work since then may depend on messages of work
        /// that was lost). A lone participant keeps what it did since its last cut.
        #[serde(default)]
        roll_back: bool,
        /// The participants until the next synchronisation, with their shards.
        #[serde(default)]
        members: Vec<(NodeId, u32)>,
        /// The control group's key-group table version the leader resumes at: a participant
        /// whose table is older waits until it has applied it (it decides which key groups
        /// it serves from it).
        #[serde(default)]
        placement_version: u64,
        /// The participant's own open epochs up to `committed` are the committed ones: it
        /// took part in the generation that cut them. Otherwise (it was left out meanwhile,
        /// or this leader does not know) it releases none of its open epochs: others'
        /// epochs of the same numbers may have committed without it, and it reads the
        /// committed ones back from blob storage.
        #[serde(default)]
        release: bool,
        /// A live move: every participant stopped the moving key groups at their cut of
        /// `committed` (the leader's [`EpochMsg::Stop`]) and cut nothing after it. Nobody rolls
        /// back: each participant hands the moving key groups over (their new owners read
        /// them, and their messages pending at `committed`, from blob storage), sends on what
        /// it kept for them since, and answers [`EpochMsg::Reconfigured`]; epochs start again
        /// once all did.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        live: bool,
        /// With `live`: the generation of the shards of the participants that took part
        /// before (a participant new to the epochs, which owns nothing, rolls back to it).
        #[serde(default, skip_serializing_if = "is_zero")]
        shards_gen: u64,
    },
    /// Leader → participant: key groups `key_groups` are about to move; every shard stops
    /// them at its cut of epoch `at` (the next one the leader starts): from then on none of
    /// their messages is processed (those sent after the sender's cut are kept by the
    /// sender), and requests for them are refused until the move is done. Answered by
    /// [`EpochMsg::Stopping`].
    Stop {
        /// The generation.
        gen: u64,
        /// The epoch at whose cut they stop.
        at: Epoch,
        /// The key groups.
        key_groups: Vec<u32>,
    },
    /// Participant → leader: it will stop the key groups at the cut of the `Stop`'s epoch.
    Stopping {
        /// The generation.
        gen: u64,
    },
    /// Participant → leader: after a live `Resume`, it handed the moving key groups over and
    /// sent on the messages it kept for them.
    Reconfigured {
        /// The generation.
        gen: u64,
    },
    /// Leader → participant: cut `epoch` (its participants are `members`).
    Barrier {
        /// The generation.
        gen: u64,
        /// The epoch.
        epoch: Epoch,
        /// Its participants.
        members: Vec<NodeId>,
        /// Key groups move once this epoch commits: from now until the next `Resume`, egress
        /// records are not read (every record read is then deleted in a committed epoch, and
        /// a new owner loads exactly the unread ones).
        #[serde(default)]
        quiesce: bool,
        /// Key groups about to move (the control group's plan): each participant writes a
        /// full snapshot of the ones it owns and answers [`EpochMsg::Prepared`] once one of
        /// its parts lists it, so that their new owners read a short chain, not every
        /// manifest since the last periodic full snapshot.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        snapshot: Vec<u32>,
    },
    /// Participant → leader: the full snapshot of the key groups about to move that it owns
    /// (the barrier's `snapshot`) is listed in a part it reported (or it owns none of them).
    Prepared {
        /// The generation.
        gen: u64,
    },
    /// Participant → leader: every shard of it has cut `epoch` (has every marker of it).
    Cut {
        /// The generation.
        gen: u64,
        /// The epoch.
        epoch: Epoch,
    },
    /// Participant → leader: a caller waits for a commit (start an epoch soon).
    Wanted {
        /// The generation.
        gen: u64,
    },
    /// Participant → leader: its part of `epoch` is in blob storage; `objects` is what the
    /// manifest lists for it (opaque here: the node's encoding of its object references).
    Part {
        /// The generation.
        gen: u64,
        /// The epoch.
        epoch: Epoch,
        /// What the manifest lists for this part.
        #[serde(with = "text_bytes")]
        objects: Vec<u8>,
        /// The key groups it wrote as their owner, with its ownership versions (the leader
        /// refuses the part if it does not own them at those versions).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        owned: Vec<(u32, u64)>,
    },
    /// Leader → participant: `epoch` is committed (its manifest is written): release it and
    /// every earlier one.
    Committed {
        /// The generation.
        gen: u64,
        /// The epoch.
        epoch: Epoch,
    },
    /// Participant → leader: its open epochs are lost (a local failure): synchronise again.
    Reset {
        /// The generation.
        gen: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Opaque bytes that are text in practice (a part's object references are JSON): carried as a
/// JSON string, not as an array of numbers (several times larger, and parsed number by
/// number); other bytes as the array.
mod text_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(t) => s.serialize_str(t),
            Err(_) => s.collect_seq(b),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(match Form::deserialize(d)? {
            Form::Text(t) => t.into_bytes(),
            Form::Bytes(b) => b,
        })
    }
}

impl EpochMsg {
    /// Whether the leader's side takes this message (else a participant's).
    pub fn to_leader(&self) -> bool {
        matches!(
            self,
            EpochMsg::Held { .. }
                | EpochMsg::Cut { .. }
                | EpochMsg::Wanted { .. }
                | EpochMsg::Part { .. }
                | EpochMsg::Prepared { .. }
                | EpochMsg::Reset { .. }
                | EpochMsg::Stopping { .. }
                | EpochMsg::Reconfigured { .. }
        )
    }

    /// The generation the message belongs to.
    pub fn gen(&self) -> u64 {
        match self {
            EpochMsg::Hold { gen }
            | EpochMsg::Held { gen, .. }
            | EpochMsg::Resume { gen, .. }
            | EpochMsg::Barrier { gen, .. }
            | EpochMsg::Wanted { gen }
            | EpochMsg::Prepared { gen }
            | EpochMsg::Cut { gen, .. }
            | EpochMsg::Part { gen, .. }
            | EpochMsg::Committed { gen, .. }
            | EpochMsg::Stop { gen, .. }
            | EpochMsg::Stopping { gen }
            | EpochMsg::Reconfigured { gen }
            | EpochMsg::Reset { gen } => *gen,
        }
    }

    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an epoch message serializes")
    }

    /// A message from its bytes.
    pub fn decode(b: &[u8]) -> Result<EpochMsg, String> {
        serde_json::from_slice(b).map_err(|e| format!("epoch message: {e}"))
    }
}

/// What the leader's epoch side learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadInput {
    /// Time passed.
    Tick {
        /// Now, ms.
        now_ms: u64,
    },
    /// The participants now (members that own key groups) with their incarnations: a new
    /// participant, one gone, or one restarted (another incarnation) makes the leader
    /// synchronise again.
    Participants(BTreeMap<NodeId, u64>),
    /// Move key groups (the plan is the control group's): the next barrier asks the
    /// participants for a full snapshot of the key groups in `snapshot` (the plan's; empty:
    /// none); once every participant answers [`EpochMsg::Prepared`] (or after
    /// [`PREPARE_TIMEOUT_MS`]) an epoch is quiesced, and once it commits the leader
    /// synchronises: once every participant holds, [`LeadAction::ProposeMove`]; everyone
    /// resumes after it.
    Handover {
        /// The key groups about to move.
        snapshot: Vec<u32>,
    },
    /// Participants died (declared dead: their key groups have no live owner): the
    /// participants now. The synchronisation that drops them also moves their key groups:
    /// once every remaining participant holds, [`LeadAction::ProposeMove`]; everyone rolls
    /// back to the last committed epoch after it, and the new owners load the key groups from
    /// blob storage (failover). Also taken when the participants did not change but key
    /// groups have no live owner (a leader that took over after the death).
    Failover(BTreeMap<NodeId, u64>),
    /// The participants now, without some that own no key groups and are alive (a member
    /// that is leaving, once its key groups were handed over): taken out live once the open
    /// epochs drained (they still take part in those), so that nobody rolls back. Anything
    /// else (not a subset of the participants, another incarnation, a move under way, someone
    /// left out) is taken as [`LeadInput::Participants`].
    Retire(BTreeMap<NodeId, u64>),
    /// The move proposed was applied (or refused): the synchronisation goes on.
    Moved,
    /// The stream to a node broke (messages queued on it are lost): a participant taking
    /// part in the epochs makes the leader synchronise at once.
    Unreachable(NodeId),
    /// This leader is about to hand its Raft leadership over (its node stops): it starts no
    /// epoch from now on, and once every open one has committed (and nothing else is under
    /// way) says where it left them ([`LeadAction::HandedOff`]); it never starts another one
    /// in this generation. Not taken while a move, an intake or a synchronisation is under
    /// way, or a participant is left out (asked again); given up (epochs go on) when the open
    /// epochs do not drain within the stop timeout.
    HandOff,
    /// The hand-over is given up (the leadership stays, or the node stops without handing it
    /// over): epochs go on. Once it said where it left them ([`LeadAction::HandedOff`]) —
    /// its fence may have applied, after which no epoch of that generation commits — they go
    /// on in a new generation (a synchronisation: everyone rolls back); before, they just
    /// start again.
    CancelHandOff,
    /// A participant's message.
    Msg {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: EpochMsg,
    },
    /// The newest manifest in blob storage (read for a synchronisation; `Err`: the read
    /// failed, retried).
    Latest(Result<Option<Epoch>, String>),
    /// The manifest write of `epoch` finished (`wrote`: a manifest was stored; every part was
    /// empty otherwise, and the epoch commits without one).
    ManifestDone {
        /// The epoch.
        epoch: Epoch,
        /// `Ok(wrote)`, or the error.
        result: Result<bool, String>,
    },
    /// The control group holds a reservation of epoch numbers up to `through` (an answer to
    /// [`LeadAction::Reserve`], or the control group's reservation as it stands, given with
    /// every [`LeadInput::Latest`]; see [`EpochLeader::reserve_epochs`]).
    Reserved {
        /// The highest epoch number reserved.
        through: Epoch,
    },
}

/// What the leader's epoch side does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadAction {
    /// Send a message to a participant (this node included).
    Send {
        /// The participant.
        to: NodeId,
        /// The message.
        msg: EpochMsg,
    },
    /// Read the newest manifest ([`LeadInput::Latest`] answers).
    ReadLatest,
    /// Every participant holds (nothing commits): propose the planned moves now
    /// ([`LeadInput::Moved`] answers once they are applied or refused).
    ProposeMove,
    /// Write the manifest of `epoch` (create-only) listing the parts, after `previous`
    /// ([`LeadInput::ManifestDone`] answers). With nothing in any part, write nothing.
    WriteManifest {
        /// The epoch.
        epoch: Epoch,
        /// The last epoch with a manifest.
        previous: Option<Epoch>,
        /// The parts (what each participant listed).
        parts: Vec<Vec<u8>>,
    },
    /// `epoch` is committed: record it in the control group (bookkeeping for later leaders;
    /// the manifest is the commit point).
    Record(Epoch),
    /// The epochs made no progress (why, naming the participants waited for): a
    /// synchronisation follows (every participant rolls back to the last committed epoch).
    Stalled(String),
    /// [`LeadInput::HandOff`] is done: the epochs stand still here, for the next leader
    /// (it goes in the control group's fence, `Command::Fence::handoff`).
    HandedOff(EpochHandoff),
    /// Reserve epoch numbers up to `through` in the control group
    /// (`Command::ReserveEpochs`; [`LeadInput::Reserved`] answers once it applied). See
    /// [`EpochLeader::reserve_epochs`].
    Reserve {
        /// The highest epoch number to reserve.
        through: Epoch,
    },
}

#[derive(Debug, Clone)]
enum Phase {
    /// No participants.
    Idle,
    /// Waiting for every participant's `Held`, then for the newest manifest.
    Syncing {
        /// Per participant: its committed epoch, its cut, its shards, its cut's generation,
        /// its shards' generation.
        held: BTreeMap<NodeId, (Epoch, Epoch, u32, u64, u64)>,
        reading: bool,
        last_hold_ms: Option<u64>,
        /// Key groups move once everyone holds (`Some(true)`: the move is proposed).
        moving: Option<bool>,
        /// When the synchronisation started.
        since_ms: u64,
    },
    Running {
        coord: ClusterCoordinator,
        /// The manifest being written.
        writing: Option<Epoch>,
        /// When each open epoch started (a stalled one makes the leader synchronise again).
        since: BTreeMap<Epoch, u64>,
    },
}

/// How long a move waits for the participants' snapshots of the key groups about to move
/// before it goes on without them (their new owners then read a longer chain).
pub const PREPARE_TIMEOUT_MS: u64 = 3_000;

/// A move's request for snapshots of the key groups about to move.
#[derive(Debug, Clone)]
struct Prepare {
    /// The key groups.
    key_groups: Vec<u32>,
    /// The barrier that asked (`None`: the next one asks).
    asked: Option<Epoch>,
    /// The participants whose snapshot is listed.
    ready: BTreeSet<NodeId>,
    since_ms: u64,
}

/// How long a live move waits for every participant's [`EpochMsg::Stopping`] (counted from
/// when it asked for the open epochs to drain) before it moves the old way: every participant
/// rolls back to the quiesced epoch.
pub const STOP_TIMEOUT_MS: u64 = 3_000;

/// How long the leader waits for every participant's [`EpochMsg::Reconfigured`] after a live
/// move before it synchronises again (everyone rolls back to the last committed epoch).
pub const RECONFIGURE_TIMEOUT_MS: u64 = 10_000;

/// A live move being prepared: the open epochs drain, then every participant is asked to stop
/// the moving key groups at the cut of the next epoch.
#[derive(Debug, Clone)]
struct Stop {
    key_groups: Vec<u32>,
    /// The epoch they stop at, once asked.
    at: Option<Epoch>,
    /// The participants that answered `Stopping`.
    answered: BTreeSet<NodeId>,
    since_ms: u64,
    /// When `Stop` last went out (sent again to those that did not answer).
    sent_ms: u64,
}

/// How many epoch numbers a leader reserves at a time (see [`EpochLeader::reserve_epochs`]):
/// it asks for more once half of them are used, and a new leader numbers its epochs above the
/// reservation, so that a leader change skips at most this many numbers (at 500 epochs a second,
/// a reservation every minute; a cluster generation has 2^44 numbers, `lease::EPOCH_BITS`).
pub const RESERVE_STEP: Epoch = 1 << 16;

/// How long a reservation not answered waits before it is asked for again (a proposal lost
/// with a leadership change, or refused).
const RESERVE_RESEND_MS: u64 = 1_000;

/// Epoch numbers reserved in the control group (see [`EpochLeader::reserve_epochs`]).
#[derive(Debug, Clone, Default)]
struct Reservation {
    /// The highest number reserved (the control group's reservation as last known).
    through: Epoch,
    /// The reservation asked for and not answered yet, and when.
    asked: Option<(Epoch, u64)>,
    /// The first synchronisation numbered its epochs above the earlier leaders' reservation.
    floored: bool,
    /// Propose the reservation again, as it stands (after each synchronisation: a member that
    /// restarted, perhaps from a build without reservations, which skipped them, learns it).
    refresh: bool,
}

/// How often participants left out are sent `Hold` while epochs run.
const EXCLUDED_HOLD_EVERY_MS: u64 = 1_000;

/// How often a leader that waits for `Held` answers sends `Hold` again.
const HOLD_RESEND_MS: u64 = 100;
/// A participant that has not answered `Hold` after this long is left out of the epochs
/// until it answers (it died, or cannot be reached): the others go on. Its key groups wait.
pub const HOLD_TIMEOUT_MS: u64 = 3_000;

/// The leader's side of cluster epochs: synchronises the participants (after it took over, or
/// when they change), then runs a [`ClusterCoordinator`] over them. A participant that does
/// not answer, or an epoch that makes no progress for `stall_ms`, makes it synchronise again
/// (lost messages, a participant that restarted): every participant rolls back to the last
/// committed epoch.
#[derive(Debug, Clone)]
pub struct EpochLeader {
    gen: u64,
    interval_ms: u64,
    max_uncommitted: u64,
    stall_ms: u64,
    participants: BTreeMap<NodeId, u64>,
    phase: Phase,
    /// The parts received per open epoch.
    parts: BTreeMap<Epoch, BTreeMap<NodeId, Vec<u8>>>,
    /// The newest manifest written (the next one names it).
    previous: Option<Epoch>,
    /// The last committed epoch known.
    committed: Epoch,
    /// The highest epoch started or cut anywhere (numbers are never reused).
    base: Epoch,
    /// A synchronisation is due once the manifest being written is done.
    resync: bool,
    /// It moves key groups.
    handover: bool,
    /// A move waits for the participants' snapshots of the key groups about to move.
    prepare: Option<Prepare>,
    /// A move waits for a quiesced epoch: `Some(None)` until the next barrier, then
    /// `Some(Some(e))` until `e` commits.
    quiesce: Option<Option<Epoch>>,
    /// The quiesced epoch committed: synchronise to move.
    move_now: bool,
    /// The key groups of the move under way (the control group's plan).
    plan: Vec<u32>,
    /// A live move asking the participants to stop the moving key groups.
    stop: Option<Stop>,
    /// Every participant stops the moving key groups at the cut of this epoch (the quiesced
    /// one): the move after it is live unless something else happened meanwhile.
    live: Option<Epoch>,
    /// The generation the participants were asked to stop in (their `Held` names it).
    live_gen: u64,
    /// After a live `Resume`: the participants that have not answered `Reconfigured` yet, and
    /// since when the leader waits (no epoch starts until all did).
    reconfiguring: Option<(BTreeSet<NodeId>, u64)>,
    /// Participants new to the epochs (members that own nothing yet) being taken in live, or
    /// participants that own nothing being taken out ([`LeadInput::Retire`]): the open epochs
    /// drain first (since when), then a synchronisation rolls nobody back.
    adding: Option<u64>,
    /// The participants the synchronisation under way takes in live.
    joining: BTreeSet<NodeId>,
    /// A grown participant set (new members that own nothing) that came while the leader
    /// could not take it in live (a synchronisation, an intake or a move under way): taken in
    /// once it can ([`EpochLeader::can_take_in`]), or by the next synchronisation that moves
    /// nothing, or the old way (everyone rolls back) once epochs run with a participant left
    /// out (that may last; every other blocker ends by itself or by its own timeout).
    grown: Option<BTreeMap<NodeId, u64>>,
    /// See [`STOP_TIMEOUT_MS`] and [`RECONFIGURE_TIMEOUT_MS`].
    stop_timeout_ms: u64,
    reconfigure_timeout_ms: u64,
    /// Participants that do not answer a `Hold` within this long are left out (`None`:
    /// never; see [`HOLD_TIMEOUT_MS`]).
    exclude_after_ms: Option<u64>,
    /// The participants left out: a synchronisation does not wait for them (they are sent
    /// `Hold` all the same, and now and then while epochs run; one that answers is taken in).
    excluded: BTreeSet<NodeId>,
    /// When `Hold` last went to the participants left out, while epochs run.
    last_excluded_hold_ms: u64,
    /// The participants that take part in the epochs (those that answered the last
    /// synchronisation).
    active: BTreeSet<NodeId>,
    /// Epoch numbers reserved in the control group (`None`: not used, see
    /// [`EpochLeader::reserve_epochs`]).
    reserve: Option<Reservation>,
    /// When the last epoch started.
    last_barrier_ms: u64,
    /// This leader knows the newest manifest (see [`EpochLeader::read_latest`]).
    latest_known: bool,
    /// Every synchronisation asks for the newest manifest ([`LeadAction::ReadLatest`]), even
    /// when this leader knows it: the cluster's epoch log fences the generation and uploads
    /// its tail then.
    always_read: bool,
    /// The generation this leader cut `committed` in (0: not known, e.g. read from blob
    /// storage): a participant that followed it releases its open epochs up to `committed`.
    committed_gen: u64,
    /// Handing the epochs over ([`LeadInput::HandOff`]): since when it waits for the open
    /// epochs to drain; and whether it said where it left them (then nothing starts again).
    handing: Option<u64>,
    handed: bool,
    /// Where the last leader left the epochs (see [`EpochLeader::handed_over`]): its first
    /// synchronisation resumes the participants live if they hold exactly there.
    handoff: Option<EpochHandoff>,
    now_ms: u64,
    /// A tick told the time (until then `now_ms` is not known: a synchronisation started
    /// before the first tick counts its timeouts from it).
    ticked: bool,
}

impl EpochLeader {
    /// Whether nothing is under way that its ticks move on, so that it need not be ticked
    /// before the interval's next epoch is due ([`EpochLeader::next_start_ms`]): epochs
    /// running with none open, being cut or written and no caller waiting, and no
    /// synchronisation, move, stop, reconfiguration or intake under way or due, nobody left
    /// out. What changes that comes as an input (a caller's `Wanted` starts its epoch at once).
    pub fn idle(&self) -> bool {
        matches!(&self.phase, Phase::Running { coord, writing, since }
            if coord.quiet() && writing.is_none() && since.is_empty())
            && !self.resync
            && !self.handover
            && !self.move_now
            && self.prepare.is_none()
            && self.quiesce.is_none()
            && self.stop.is_none()
            && self.live.is_none()
            && self.reconfiguring.is_none()
            && self.adding.is_none()
            && self.joining.is_empty()
            && self.grown.is_none()
            && self.excluded.is_empty()
            && self.handing.is_none()
    }

    /// When (ms, the clock of `LeadInput::Tick`) the interval's next epoch is due, while
    /// epochs run: an idle leader (see [`EpochLeader::idle`]) need not be ticked before.
    pub fn next_start_ms(&self) -> Option<u64> {
        match &self.phase {
            Phase::Running { coord, .. } => Some(coord.next_start_ms()),
            _ => None,
        }
    }

    /// The time (ms) for an input that is not a tick: an idle leader is ticked only when its
    /// next epoch is due, and what an input starts (a caller's epoch) counts from now. Never goes back;
    /// before the first tick the time is not known yet (see `ticked`).
    pub fn set_now(&mut self, now_ms: u64) {
        if self.ticked {
            self.now_ms = self.now_ms.max(now_ms);
        }
    }

    /// A leader whose generations start above `gen` (its term, shifted: every leader's are
    /// above every earlier leader's), knowing `committed` from the control group.
    pub fn new(
        gen: u64,
        interval_ms: u64,
        max_uncommitted: u64,
        stall_ms: u64,
        committed: Epoch,
    ) -> Self {
        EpochLeader {
            gen,
            interval_ms,
            max_uncommitted,
            stall_ms: stall_ms.max(1),
            participants: BTreeMap::new(),
            phase: Phase::Idle,
            parts: BTreeMap::new(),
            previous: None,
            committed,
            base: committed,
            resync: false,
            handover: false,
            prepare: None,
            quiesce: None,
            move_now: false,
            plan: Vec::new(),
            stop: None,
            live: None,
            live_gen: 0,
            reconfiguring: None,
            adding: None,
            joining: BTreeSet::new(),
            grown: None,
            stop_timeout_ms: STOP_TIMEOUT_MS,
            reconfigure_timeout_ms: RECONFIGURE_TIMEOUT_MS,
            exclude_after_ms: Some(HOLD_TIMEOUT_MS),
            excluded: BTreeSet::new(),
            last_excluded_hold_ms: 0,
            active: BTreeSet::new(),
            reserve: None,
            last_barrier_ms: 0,
            latest_known: false,
            always_read: false,
            committed_gen: 0,
            handing: None,
            handed: false,
            handoff: None,
            now_ms: 0,
            ticked: false,
        }
    }

    /// Number epochs from reservations in the control group (for manifest puts to blob
    /// storage, where a deposed leader's manifest may land late). A deposed leader can write
    /// the manifest of any epoch every participant cut for it, and a participant that
    /// restarted forgot its cuts: without reservations its successor, which numbers its
    /// epochs above the cuts it is told of, could reuse or pass those numbers, and a late
    /// manifest would then collide with its own (nothing commits again) or become the newest
    /// in blob storage and hide its committed epochs from the next reader (acknowledged
    /// messages lost). So no epoch starts above the control group's reservation
    /// ([`LeadAction::Reserve`], asked for [`RESERVE_STEP`] numbers at a time), and the first
    /// synchronisation of a leader numbers its epochs above the reservation the control group
    /// holds when it reads the newest manifest (after its fence applied, so every earlier
    /// leader's reservation is in it) — unless it resumes the participants live after a
    /// hand-over, which proves the last leader started nothing after the hand-over's epoch.
    pub fn reserve_epochs(mut self) -> Self {
        self.reserve = Some(Reservation::default());
        self
    }

    /// Asks for more epoch numbers once half of those reserved are used.
    fn reserve_more(&mut self, out: &mut Vec<LeadAction>) {
        let (Some(r), Phase::Running { coord, .. }) = (self.reserve.as_mut(), &mut self.phase)
        else {
            return;
        };
        coord.limit(r.through);
        let started = coord.started();
        let short = r.through < started + RESERVE_STEP / 2;
        let refresh = std::mem::take(&mut r.refresh);
        if !short && !refresh {
            return;
        }
        if !refresh
            && r.asked
                .is_some_and(|(_, at)| self.now_ms < at + RESERVE_RESEND_MS)
        {
            return;
        }
        let through = if short {
            r.through.max(started) + RESERVE_STEP
        } else {
            r.through
        };
        r.asked = Some((through, self.now_ms));
        out.push(LeadAction::Reserve { through });
    }

    /// The last leader handed the epochs over ([`EpochHandoff`], from the control group's
    /// last fence): this leader's first synchronisation resumes the participants live —
    /// nobody rolls back — if they are the same ones (same incarnations), all answer, and
    /// each holds with its committed epoch and its cut at the hand-over's epoch, in the
    /// hand-over's generation, with the same shards' generation. Otherwise it rolls them back
    /// as every new leader does (it cannot know what was lost with the last one).
    pub fn handed_over(&mut self, h: EpochHandoff) {
        self.handoff = Some(h);
    }

    /// Participants that do not answer a `Hold` within `ms` are left out of the epochs until
    /// they answer (`None`: the others wait for them).
    pub fn exclude_after(mut self, ms: Option<u64>) -> Self {
        self.exclude_after_ms = ms;
        self
    }

    /// How long a live move waits for the participants' `Stopping`, and for their
    /// `Reconfigured` (defaults: [`STOP_TIMEOUT_MS`], [`RECONFIGURE_TIMEOUT_MS`]).
    pub fn move_timeouts(mut self, stop_ms: u64, reconfigure_ms: u64) -> Self {
        self.stop_timeout_ms = stop_ms;
        self.reconfigure_timeout_ms = reconfigure_ms;
        self
    }

    /// Whether a round of moves can start now ([`LeadInput::Handover`] is taken): epochs run,
    /// nobody is left out, and no move or live addition is under way.
    pub fn ready_to_move(&self) -> bool {
        self.running() && self.excluded.is_empty() && self.no_move_under_way()
    }

    /// Why a round of moves cannot start now (`None`: it can), for the logs.
    pub fn move_blocker(&self) -> Option<String> {
        let phase = match &self.phase {
            Phase::Running { .. } => None,
            Phase::Syncing { .. } => Some("the participants are synchronising"),
            _ => Some("epochs are not running"),
        };
        let under_way = [
            (self.prepare.is_some(), "a move's snapshot"),
            (self.quiesce.is_some(), "a move's quiescing epoch"),
            (self.stop.is_some(), "a move's stop"),
            (self.live.is_some(), "a live synchronisation"),
            (self.reconfiguring.is_some(), "a live hand-over"),
            (self.adding.is_some(), "participants joining or leaving"),
            (self.grown.is_some(), "participants waiting to join"),
            (self.move_now || self.handover, "a move's synchronisation"),
        ];
        let mut why: Vec<String> = phase.into_iter().map(String::from).collect();
        if !self.excluded.is_empty() {
            why.push(format!("participants left out: {:?}", self.excluded));
        }
        why.extend(
            under_way
                .iter()
                .filter(|(b, _)| *b)
                .map(|(_, w)| format!("{w} under way")),
        );
        (!why.is_empty()).then(|| why.join("; "))
    }

    fn no_move_under_way(&self) -> bool {
        self.prepare.is_none()
            && self.quiesce.is_none()
            && self.stop.is_none()
            && self.live.is_none()
            && self.reconfiguring.is_none()
            && self.adding.is_none()
            && self.grown.is_none()
            && !self.move_now
            && !self.handover
            && self.handing.is_none()
    }

    /// Whether new participants that own nothing can be taken in live now: epochs run and no
    /// move, live synchronisation or hand-over is under way (an intake under way takes them
    /// too), nobody left out.
    fn can_take_in(&self) -> bool {
        self.running()
            && !self.move_now
            && !self.handover
            && self.excluded.is_empty()
            && self.stop.is_none()
            && self.live.is_none()
            && self.reconfiguring.is_none()
            && self.prepare.is_none()
            && self.quiesce.is_none()
            && self.handing.is_none()
    }

    /// Whether node `n` may be given key groups: a participant, not one being taken in. A
    /// member that catches up while a move is under way waits to join (it is no participant
    /// yet): the move's plan, drawn again when it is proposed, must not name it.
    pub fn may_own(&self, n: NodeId) -> bool {
        self.participants.contains_key(&n) && !self.joining.contains(&n)
    }

    /// Whether `p` is the participants plus new ones (every participant still there, the
    /// same incarnation).
    fn grows(&self, p: &BTreeMap<NodeId, u64>) -> bool {
        p.len() > self.participants.len()
            && self.participants.iter().all(|(n, i)| p.get(n) == Some(i))
    }

    /// The participants that take part in the epochs now (a participant that
    /// [`LeadInput::Retire`] takes out stays in until the open epochs drained).
    pub fn active(&self) -> &BTreeSet<NodeId> {
        &self.active
    }

    /// Every synchronisation asks for the newest manifest (the cluster's epoch log fences
    /// and uploads then), even when this leader knows it.
    pub fn read_latest_always(&mut self) {
        self.always_read = true;
    }

    /// The participants left out of the epochs now (they did not answer).
    pub fn excluded(&self) -> &BTreeSet<NodeId> {
        &self.excluded
    }

    /// The current generation.
    pub fn gen(&self) -> u64 {
        self.gen
    }

    /// The last committed epoch.
    pub fn committed(&self) -> Epoch {
        self.committed
    }

    /// Whether epochs run (every participant is synchronised).
    pub fn running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    fn sync(&mut self, out: &mut Vec<LeadAction>) {
        self.resync = false;
        // A hand-over under way is given up (one done stays done: nothing starts again in
        // its generation, and this synchronisation opens another).
        self.handing = None;
        // A resynchronisation drops a pending move (the next round plans again).
        self.prepare = None;
        self.quiesce = None;
        self.move_now = false;
        self.stop = None;
        self.live = None;
        self.reconfiguring = None;
        self.adding = None;
        self.joining.clear();
        // New participants waiting to join are taken in by this synchronisation (it holds
        // everyone anyway), as owning nothing, so that their numbering does not count; not by
        // a move's (one slow to answer would be left out, and the move would roll back).
        if let Some(p) = self.grown.take_if(|_| !self.handover) {
            debug_assert!(
                self.grows(&p),
                "{p:?} does not grow {:?}",
                self.participants
            );
            if !self.participants.is_empty() && self.grows(&p) {
                self.joining = p
                    .keys()
                    .filter(|n| !self.participants.contains_key(n))
                    .copied()
                    .collect();
                self.participants = p;
            }
        }
        let moving = std::mem::take(&mut self.handover).then_some(false);
        self.parts.clear();
        if self.participants.is_empty() {
            self.phase = Phase::Idle;
            return;
        }
        // The first synchronisation after the last leader handed the epochs over: live if
        // everyone holds where it left them (checked with the answers, `LeadInput::Latest`).
        if let Some(h) = self.handoff.take() {
            if moving.is_none() && self.joining.is_empty() && h.participants == self.participants {
                self.live = Some(h.committed);
                self.live_gen = h.gen;
            }
        }
        self.gen += 1;
        self.phase = Phase::Syncing {
            held: BTreeMap::new(),
            reading: false,
            last_hold_ms: Some(self.now_ms),
            moving,
            since_ms: self.now_ms,
        };
        for &to in self.participants.keys() {
            out.push(LeadAction::Send {
                to,
                msg: EpochMsg::Hold { gen: self.gen },
            });
        }
    }

    /// The moving key groups' snapshots are listed (or given up on): a live move drains the
    /// open epochs, then asks every participant to stop them at the next cut; a move without
    /// a plan quiesces the next epoch at once.
    fn begin_stop(&mut self) {
        if self.plan.is_empty() {
            self.quiesce = Some(None);
            return;
        }
        self.stop = Some(Stop {
            key_groups: self.plan.clone(),
            at: None,
            answered: BTreeSet::new(),
            since_ms: self.now_ms,
            sent_ms: 0,
        });
        if let Phase::Running { coord, .. } = &mut self.phase {
            coord.pause(true);
        }
    }

    /// Another participant set, the old way (a synchronisation follows): one that restarted
    /// (another incarnation) or left is no longer left out; nobody waits to join any more.
    fn set_participants(&mut self, p: BTreeMap<NodeId, u64>) {
        self.grown = None;
        let old = std::mem::take(&mut self.participants);
        self.excluded
            .retain(|n| p.get(n).is_some_and(|i| old.get(n) == Some(i)));
        self.participants = p;
    }

    fn want_sync(&mut self, out: &mut Vec<LeadAction>) {
        match &self.phase {
            Phase::Running {
                writing: Some(_), ..
            } => self.resync = true,
            _ => self.sync(out),
        }
    }

    fn coord_actions(&mut self, acts: Vec<CoordAction>, out: &mut Vec<LeadAction>) {
        for a in acts {
            match a {
                CoordAction::Barrier { epoch, members } => {
                    self.base = self.base.max(epoch);
                    self.last_barrier_ms = self.now_ms;
                    let quiesce = self.quiesce == Some(None);
                    if quiesce {
                        self.quiesce = Some(Some(epoch));
                        if let Some(at) = self.live {
                            if at == epoch {
                                // Nothing starts after it until the move is done.
                                if let Phase::Running { coord, .. } = &mut self.phase {
                                    coord.pause(true);
                                }
                            } else {
                                self.live = None;
                            }
                        }
                    }
                    let snapshot = match &mut self.prepare {
                        Some(p) if p.asked.is_none() => {
                            p.asked = Some(epoch);
                            p.key_groups.clone()
                        }
                        _ => Vec::new(),
                    };
                    if let Phase::Running { since, .. } = &mut self.phase {
                        since.insert(epoch, self.now_ms);
                    }
                    for &to in &members {
                        out.push(LeadAction::Send {
                            to,
                            msg: EpochMsg::Barrier {
                                gen: self.gen,
                                epoch,
                                members: members.iter().copied().collect(),
                                quiesce,
                                snapshot: snapshot.clone(),
                            },
                        });
                    }
                }
                CoordAction::WriteManifest { epoch, parts, .. } => {
                    if let Phase::Running { writing, .. } = &mut self.phase {
                        *writing = Some(epoch);
                    }
                    let got = self.parts.get(&epoch);
                    out.push(LeadAction::WriteManifest {
                        epoch,
                        previous: self.previous,
                        parts: parts
                            .iter()
                            .filter_map(|n| got.and_then(|g| g.get(n)).cloned())
                            .collect(),
                    });
                }
                CoordAction::ProposeCommit(epoch) => {
                    if self.quiesce.is_some_and(|q| q.is_some_and(|e| epoch >= e)) {
                        // The quiesced epoch committed: the moves happen now.
                        self.quiesce = None;
                        self.move_now = true;
                    }
                    // The manifest is the commit point: release at once, record in the
                    // control group for later leaders.
                    self.committed = epoch;
                    self.committed_gen = self.gen;
                    self.parts.remove(&epoch);
                    if let Phase::Running { since, .. } = &mut self.phase {
                        since.remove(&epoch);
                    }
                    for &to in &self.active {
                        out.push(LeadAction::Send {
                            to,
                            msg: EpochMsg::Committed {
                                gen: self.gen,
                                epoch,
                            },
                        });
                    }
                    out.push(LeadAction::Record(epoch));
                    let more = match &mut self.phase {
                        Phase::Running { coord, .. } => {
                            coord.handle(CoordInput::Committed { epoch })
                        }
                        _ => Vec::new(),
                    };
                    self.coord_actions(more, out);
                }
                CoordAction::Abandon { .. } | CoordAction::Backpressure(_) => {}
            }
        }
    }

    /// The newest manifest, for a synchronisation: read from blob storage, unless this leader
    /// knows it (it read it once, and every manifest write of its since returned). A deposed
    /// leader's manifest landing later is never released by anyone, read or not: the
    /// participants follow this leader's generation by then.
    fn read_latest(&mut self, out: &mut Vec<LeadAction>) {
        if self.latest_known && !self.always_read {
            let more = self.handle(LeadInput::Latest(Ok(self.previous)));
            out.extend(more);
        } else {
            out.push(LeadAction::ReadLatest);
        }
    }

    /// Feeds one input; returns the actions, in order.
    pub fn handle(&mut self, input: LeadInput) -> Vec<LeadAction> {
        let mut out = Vec::new();
        // The newest manifest is wanted (a synchronisation: every participant holds).
        let mut read = false;
        match input {
            LeadInput::Tick { now_ms } => {
                self.now_ms = now_ms;
                if !std::mem::replace(&mut self.ticked, true) {
                    // The time a synchronisation started before it was known.
                    if let Phase::Syncing { since_ms, .. } = &mut self.phase {
                        *since_ms = now_ms;
                    }
                }
                if let Some(p) = self.grown.take() {
                    if self.can_take_in() {
                        out.extend(self.handle(LeadInput::Participants(p)));
                    } else if self.running() && !self.excluded.is_empty() {
                        // A participant is left out, which may last: the old way (everyone
                        // rolls back), as when they came with one left out.
                        self.set_participants(p);
                        self.want_sync(&mut out);
                    } else {
                        self.grown = Some(p);
                    }
                }
                match &mut self.phase {
                    Phase::Idle => {}
                    Phase::Syncing {
                        held,
                        reading,
                        last_hold_ms,
                        moving,
                        since_ms,
                    } => {
                        // Participants that do not answer are left out (the others go on).
                        if self
                            .exclude_after_ms
                            .is_some_and(|t| now_ms >= *since_ms + t)
                            && !*reading
                            && *moving != Some(true)
                            && !held.is_empty()
                        {
                            // Those that did not answer are left out; the others go on.
                            let missing: Vec<NodeId> = self
                                .participants
                                .keys()
                                .filter(|n| !held.contains_key(n))
                                .copied()
                                .collect();
                            self.excluded.extend(missing);
                            *moving = None;
                            *reading = true;
                            read = true;
                        }
                        if !*reading && last_hold_ms.is_none_or(|t| now_ms >= t + HOLD_RESEND_MS) {
                            *last_hold_ms = Some(now_ms);
                            for &to in self.participants.keys() {
                                if !held.contains_key(&to) {
                                    out.push(LeadAction::Send {
                                        to,
                                        msg: EpochMsg::Hold { gen: self.gen },
                                    });
                                }
                            }
                        }
                    }
                    Phase::Running {
                        coord,
                        since,
                        writing,
                    } => {
                        // The oldest open epoch still lacks a part after `stall_ms` (a lost
                        // barrier or part, a participant that restarted): synchronise again.
                        // A manifest that keeps failing is retried instead.
                        let n = self.active.len();
                        // Or a participant never reported its cut of the last epoch.
                        let stalled = writing.is_none()
                            && (since.iter().next().is_some_and(|(e, &t)| {
                                now_ms >= t + self.stall_ms
                                    && self.parts.get(e).map_or(0, |p| p.len()) < n
                            }) || (coord.cutting()
                                && now_ms >= self.last_barrier_ms + self.stall_ms));
                        if self
                            .prepare
                            .as_ref()
                            .is_some_and(|p| now_ms >= p.since_ms + PREPARE_TIMEOUT_MS)
                        {
                            // Snapshots missing: the move goes on (their new owners read more).
                            self.prepare = None;
                            if self.plan.is_empty() {
                                self.quiesce = Some(None);
                            } else {
                                self.stop = Some(Stop {
                                    key_groups: self.plan.clone(),
                                    at: None,
                                    answered: BTreeSet::new(),
                                    since_ms: now_ms,
                                    sent_ms: 0,
                                });
                                coord.pause(true);
                            }
                        }
                        let mut stop_asked = None;
                        if let Some(st) = self.stop.as_mut() {
                            if now_ms >= st.since_ms + self.stop_timeout_ms {
                                // A participant did not answer: the move goes the old way.
                                self.stop = None;
                                self.quiesce = Some(None);
                                coord.pause(false);
                            } else if st.at.is_none() && coord.drained() && writing.is_none() {
                                let at = coord.started() + 1;
                                st.at = Some(at);
                                st.sent_ms = now_ms;
                                self.live_gen = self.gen;
                                stop_asked = Some((at, st.key_groups.clone()));
                            } else if let Some(at) =
                                st.at.filter(|_| now_ms >= st.sent_ms + HOLD_RESEND_MS)
                            {
                                // Lost on the way (or its answer was): asked again.
                                st.sent_ms = now_ms;
                                stop_asked = Some((at, st.key_groups.clone()));
                            }
                        }
                        if let Some((at, key_groups)) = stop_asked {
                            let answered = self
                                .stop
                                .as_ref()
                                .map(|s| s.answered.clone())
                                .unwrap_or_default();
                            for &to in self.active.iter().filter(|n| !answered.contains(n)) {
                                out.push(LeadAction::Send {
                                    to,
                                    msg: EpochMsg::Stop {
                                        gen: self.gen,
                                        at,
                                        key_groups: key_groups.clone(),
                                    },
                                });
                            }
                        }
                        let stalled = stalled
                            || self
                                .reconfiguring
                                .as_ref()
                                .is_some_and(|(_, t)| now_ms >= t + self.reconfigure_timeout_ms)
                            || self
                                .adding
                                .is_some_and(|t| now_ms >= t + self.stop_timeout_ms);
                        if self.adding.is_some() && !stalled && coord.drained() && writing.is_none()
                        {
                            // Nothing open: take the new participants in, rolling nobody back.
                            let at = coord.committed();
                            let joining = std::mem::take(&mut self.joining);
                            let was = self.gen;
                            self.sync(&mut out);
                            self.live = Some(at);
                            self.live_gen = was;
                            self.joining.extend(joining);
                            return out;
                        }
                        if let Some(t) = self.handing.filter(|_| !self.handed) {
                            if coord.drained() && writing.is_none() {
                                // Nothing open: the epochs stand still here for the next
                                // leader.
                                self.handed = true;
                                out.push(LeadAction::HandedOff(EpochHandoff {
                                    gen: self.gen,
                                    committed: coord.committed(),
                                    participants: self.participants.clone(),
                                }));
                                // The hand-over's fence takes the next generation: a later
                                // synchronisation of this leader fences one above it (and so
                                // forgets the hand-over).
                                self.gen += 1;
                            } else if now_ms >= t + self.stop_timeout_ms {
                                // The open epochs did not drain: epochs go on here.
                                self.handing = None;
                                coord.pause(false);
                            }
                        }
                        if !self.excluded.is_empty()
                            && now_ms >= self.last_excluded_hold_ms + EXCLUDED_HOLD_EVERY_MS
                        {
                            // A participant left out that can be reached again answers, and
                            // is taken in.
                            self.last_excluded_hold_ms = now_ms;
                            for &to in &self.excluded {
                                out.push(LeadAction::Send {
                                    to,
                                    msg: EpochMsg::Hold { gen: self.gen },
                                });
                            }
                        }
                        if stalled {
                            let oldest = since.iter().next().map(|(e, _)| *e);
                            let lacking = |e: Epoch| -> Vec<NodeId> {
                                let got = self.parts.get(&e);
                                self.active
                                    .iter()
                                    .filter(|n| !got.is_some_and(|p| p.contains_key(n)))
                                    .copied()
                                    .collect()
                            };
                            let why = if let Some((waiting, _)) = &self.reconfiguring {
                                format!("a live move: no Reconfigured from {waiting:?}")
                            } else if self.adding.is_some() {
                                "participants joining or leaving: the open epochs did not drain"
                                    .to_string()
                            } else if let Some(e) = oldest.filter(|e| !lacking(*e).is_empty()) {
                                format!("epoch {e} lacks the parts of {:?}", lacking(e))
                            } else {
                                format!(
                                    "a cut not reported (active participants {:?})",
                                    self.active
                                )
                            };
                            out.push(LeadAction::Stalled(why));
                            self.sync(&mut out);
                        } else {
                            let acts = coord.handle(CoordInput::Tick { now_ms });
                            self.coord_actions(acts, &mut out);
                        }
                    }
                }
            }
            LeadInput::Handover { snapshot } => {
                // First the participants snapshot the key groups about to move; then an epoch
                // after which no egress record is read commits; then the synchronisation that
                // moves key groups.
                if self.running() && !self.participants.is_empty() && self.no_move_under_way() {
                    self.plan = snapshot.clone();
                    if snapshot.is_empty() {
                        self.quiesce = Some(None);
                    } else {
                        self.prepare = Some(Prepare {
                            key_groups: snapshot,
                            asked: None,
                            ready: BTreeSet::new(),
                            since_ms: self.now_ms,
                        });
                    }
                }
            }
            LeadInput::Failover(p) => {
                self.set_participants(p);
                // `sync` takes the move (now, or once the manifest being written is done).
                self.handover = true;
                self.want_sync(&mut out);
            }
            LeadInput::Moved => {
                if let Phase::Syncing {
                    moving, reading, ..
                } = &mut self.phase
                {
                    if *moving == Some(true) && !*reading {
                        *moving = None;
                        *reading = true;
                        read = true;
                    }
                }
            }
            LeadInput::Unreachable(n) => {
                if self.running() && self.active.contains(&n) && self.participants.contains_key(&n)
                {
                    self.want_sync(&mut out);
                }
            }
            LeadInput::HandOff => {
                if self.handing.is_none()
                    && !self.handed
                    && self.ready_to_move()
                    && self.joining.is_empty()
                {
                    self.handing = Some(self.now_ms);
                    if let Phase::Running { coord, .. } = &mut self.phase {
                        coord.pause(true);
                    }
                }
            }
            LeadInput::CancelHandOff => {
                if self.handed {
                    self.handed = false;
                    self.want_sync(&mut out);
                } else if self.handing.take().is_some() {
                    if let Phase::Running { coord, .. } = &mut self.phase {
                        coord.pause(false);
                    }
                }
            }
            LeadInput::Retire(p) => {
                let shrinks = !p.is_empty()
                    && p.len() < self.participants.len()
                    && p.iter().all(|(n, i)| self.participants.get(n) == Some(i));
                if shrinks && self.ready_to_move() {
                    // The coordinator still counts the ones retiring (`active`) until the
                    // synchronisation after the drain, which holds only those that stay.
                    self.participants = p;
                    self.adding = Some(self.now_ms);
                    if let Phase::Running { coord, .. } = &mut self.phase {
                        coord.pause(true);
                    }
                } else {
                    return self.handle(LeadInput::Participants(p));
                }
            }
            LeadInput::Participants(p) => {
                // Only new members that own nothing (as far as the leader knows: every
                // participant it had is still there, the same incarnation): taken in live once
                // the open epochs drained.
                let grows = !self.participants.is_empty() && self.grows(&p);
                if grows && self.can_take_in() {
                    self.grown = None;
                    let new: BTreeSet<NodeId> = p
                        .keys()
                        .filter(|n| !self.participants.contains_key(n))
                        .copied()
                        .collect();
                    self.participants = p;
                    self.joining.extend(new);
                    if self.adding.is_none() {
                        self.adding = Some(self.now_ms);
                        if let Phase::Running { coord, .. } = &mut self.phase {
                            coord.pause(true);
                        }
                    }
                } else if grows && self.excluded.is_empty() {
                    // Not now (a synchronisation, an intake or a move is under way): they
                    // own nothing, so the epochs go on without them until then.
                    self.grown = Some(p);
                } else if p != self.participants {
                    self.set_participants(p);
                    self.want_sync(&mut out);
                } else {
                    self.grown = None;
                }
            }
            LeadInput::Msg { from, msg } => {
                // (One retiring still takes part in the open epochs: see `Retire`.)
                if msg.gen() != self.gen
                    || !(self.participants.contains_key(&from) || self.active.contains(&from))
                {
                    return out;
                }
                match (msg, &mut self.phase) {
                    (
                        EpochMsg::Held {
                            committed,
                            cut,
                            shards,
                            cut_gen,
                            shard_gen,
                            ..
                        },
                        Phase::Syncing {
                            held,
                            reading,
                            moving,
                            ..
                        },
                    ) => {
                        held.insert(from, (committed, cut, shards.max(1), cut_gen, shard_gen));
                        self.excluded.remove(&from);
                        let all = self
                            .participants
                            .keys()
                            .all(|n| held.contains_key(n) || self.excluded.contains(n));
                        if !*reading && all {
                            match moving {
                                Some(false) => {
                                    *moving = Some(true);
                                    out.push(LeadAction::ProposeMove);
                                }
                                Some(true) => {}
                                None => {
                                    *reading = true;
                                    read = true;
                                }
                            }
                        }
                    }
                    // A participant left out answers at last: take it in.
                    (EpochMsg::Held { .. }, Phase::Running { .. })
                        if !self.active.contains(&from) =>
                    {
                        // The next synchronisation waits for it.
                        self.excluded.remove(&from);
                        self.want_sync(&mut out)
                    }
                    (EpochMsg::Cut { epoch, .. }, Phase::Running { coord, .. }) => {
                        coord.handle(CoordInput::CutDone { epoch, node: from });
                        let acts = coord.handle(CoordInput::Tick {
                            now_ms: self.now_ms,
                        });
                        self.coord_actions(acts, &mut out);
                    }
                    (EpochMsg::Wanted { .. }, Phase::Running { coord, .. }) => {
                        coord.handle(CoordInput::CallerWaiting);
                        let acts = coord.handle(CoordInput::Tick {
                            now_ms: self.now_ms,
                        });
                        self.coord_actions(acts, &mut out);
                    }
                    (EpochMsg::Part { epoch, objects, .. }, Phase::Running { coord, .. })
                        if epoch > self.committed =>
                    {
                        self.parts.entry(epoch).or_default().insert(from, objects);
                        let acts = coord.handle(CoordInput::PartWritten { epoch, node: from });
                        self.coord_actions(acts, &mut out);
                    }
                    (EpochMsg::Prepared { .. }, Phase::Running { .. }) => {
                        if let Some(p) = self.prepare.as_mut().filter(|p| p.asked.is_some()) {
                            p.ready.insert(from);
                            if self.active.iter().all(|n| p.ready.contains(n)) {
                                // Every snapshot is listed: stop the moving key groups at the
                                // next cut.
                                self.prepare = None;
                                self.begin_stop();
                            }
                        }
                    }
                    (EpochMsg::Stopping { .. }, Phase::Running { coord, .. }) => {
                        let all = match self.stop.as_mut().filter(|s| s.at.is_some()) {
                            Some(st) => {
                                st.answered.insert(from);
                                self.active.iter().all(|n| st.answered.contains(n))
                            }
                            None => false,
                        };
                        if all {
                            // Every participant stops them at the cut of `at`: it is the
                            // quiesced epoch, and nothing starts after it until the move.
                            self.live = self.stop.take().and_then(|s| s.at);
                            self.quiesce = Some(None);
                            coord.pause(false);
                            let acts = coord.handle(CoordInput::CallerWaiting);
                            self.coord_actions(acts, &mut out);
                            if let Phase::Running { coord, .. } = &mut self.phase {
                                let acts = coord.handle(CoordInput::Tick {
                                    now_ms: self.now_ms,
                                });
                                self.coord_actions(acts, &mut out);
                            }
                        }
                    }
                    (EpochMsg::Reconfigured { .. }, Phase::Running { coord, .. }) => {
                        if let Some((waiting, _)) = self.reconfiguring.as_mut() {
                            waiting.remove(&from);
                            if waiting.is_empty() {
                                // Every participant handed the key groups over: epochs go on.
                                self.reconfiguring = None;
                                coord.pause(false);
                                let acts = coord.handle(CoordInput::Tick {
                                    now_ms: self.now_ms,
                                });
                                self.coord_actions(acts, &mut out);
                            }
                        }
                    }
                    (EpochMsg::Reset { .. }, _) => self.want_sync(&mut out),
                    _ => {}
                }
            }
            LeadInput::Latest(r) => {
                let Phase::Syncing { held, reading, .. } = &mut self.phase else {
                    return out;
                };
                if !*reading {
                    return out;
                }
                match r {
                    Err(_) => {
                        // Read again at the next tick's resend time.
                        *reading = false;
                        held.clear();
                    }
                    Ok(latest) => {
                        self.latest_known = true;
                        if latest.is_some() {
                            self.previous = latest.max(self.previous);
                        }
                        let committed = held
                            .values()
                            .map(|(c, _, _, _, _)| *c)
                            .chain(latest)
                            .fold(self.committed, Epoch::max);
                        // (The cuts of participants new to the epochs count only if they have
                        // committed epochs of their own the chain does not know.)
                        let base = held
                            .iter()
                            .filter(|(n, (c, _, _, _, _))| {
                                !self.joining.contains(n) || *c > committed
                            })
                            .map(|(_, (_, cut, _, _, _))| *cut)
                            .fold(self.base.max(committed), Epoch::max);
                        let members: Vec<(NodeId, u32)> =
                            held.iter().map(|(n, (_, _, s, _, _))| (*n, *s)).collect();
                        // Several participants (or several before, or others left out: a new
                        // leader does not know who took part before): work since the last
                        // cut may depend on work that was lost elsewhere.
                        // A live move: every participant stopped the moving key groups at the cut
                        // of the quiesced epoch, which committed, and cut nothing after it.
                        // Participants new to the epochs (they own nothing) take the others'
                        // shard generation.
                        let before: Vec<_> = held
                            .iter()
                            .filter(|(n, _)| !self.joining.contains(n))
                            .map(|(_, h)| *h)
                            .collect();
                        let shards_gen = before.first().map_or(0, |h| h.4);
                        // (A participant taken in whose shards are of a newer generation would
                        // go back to an older one, whose messages its peers may refuse.)
                        let live = self.live.is_some_and(|at| at == committed && base == at)
                            && self.excluded.is_empty()
                            && held.len() == self.participants.len()
                            && shards_gen != 0
                            && before.iter().all(|&(c, cut, _, g, sg)| {
                                c == committed
                                    && cut == committed
                                    && g == self.live_gen
                                    && sg == shards_gen
                            })
                            && held
                                .iter()
                                .filter(|(n, _)| self.joining.contains(n))
                                .all(|(_, h)| h.4 <= shards_gen);
                        // The first synchronisation of a leader that reserves numbers: above
                        // every earlier leader's reservation (see `reserve_epochs`).
                        let base = match self.reserve.as_mut() {
                            Some(r) if !r.floored => {
                                r.floored = true;
                                if live {
                                    base
                                } else {
                                    base.max(r.through)
                                }
                            }
                            _ => base,
                        };
                        let roll_back = !live
                            && (self.active.len() > 1
                                || held.len() > 1
                                || self.participants.len() > 1);
                        // Who may release its open epochs up to `committed`: a participant
                        // that cut them in the generation this leader committed `committed`
                        // in (it followed that generation's `Resume`, so it was one of its
                        // participants and every epoch of it has its part; generations are
                        // unique across leaders, their term is in them).
                        let cut_by: BTreeMap<NodeId, u64> =
                            held.iter().map(|(n, (_, _, _, g, _))| (*n, *g)).collect();
                        let known_gen = if committed == self.committed {
                            self.committed_gen
                        } else {
                            0
                        };
                        self.active = held.keys().copied().collect();
                        self.committed = committed;
                        self.committed_gen = known_gen;
                        self.base = base;
                        for &to in &self.active {
                            out.push(LeadAction::Send {
                                to,
                                msg: EpochMsg::Resume {
                                    gen: self.gen,
                                    committed,
                                    base,
                                    manifest: self.previous,
                                    roll_back,
                                    members: members.clone(),
                                    placement_version: 0,
                                    release: known_gen != 0 && cut_by.get(&to) == Some(&known_gen),
                                    live,
                                    shards_gen: if live { shards_gen } else { 0 },
                                },
                            });
                        }
                        let mut coord = ClusterCoordinator::new(
                            self.interval_ms,
                            self.max_uncommitted,
                            base,
                            base,
                        );
                        if let Some(r) = self.reserve.as_mut() {
                            coord.limit(r.through);
                            r.refresh = true;
                        }
                        coord.handle(CoordInput::Members(self.active.clone()));
                        self.live = None;
                        // Those taken in are participants like the others from now on.
                        self.joining.clear();
                        if live {
                            // No epoch starts until every participant handed over.
                            coord.pause(true);
                            self.reconfiguring = Some((self.active.clone(), self.now_ms));
                        }
                        self.phase = Phase::Running {
                            coord,
                            writing: None,
                            since: BTreeMap::new(),
                        };
                    }
                }
            }
            LeadInput::Reserved { through } => {
                if let Some(r) = self.reserve.as_mut() {
                    r.through = r.through.max(through);
                    if r.asked.is_some_and(|(t, _)| t <= r.through) {
                        r.asked = None;
                    }
                    if let Phase::Running { coord, .. } = &mut self.phase {
                        coord.limit(r.through);
                        // Epochs waiting for the numbers start now.
                        let acts = coord.handle(CoordInput::Tick {
                            now_ms: self.now_ms,
                        });
                        self.coord_actions(acts, &mut out);
                    }
                }
            }
            LeadInput::ManifestDone { epoch, result } => {
                let Phase::Running { coord, writing, .. } = &mut self.phase else {
                    return out;
                };
                if *writing != Some(epoch) {
                    return out;
                }
                *writing = None;
                match result {
                    Ok(wrote) => {
                        if wrote {
                            self.previous = Some(epoch);
                        }
                        let acts = coord.handle(CoordInput::ManifestWritten { epoch });
                        self.coord_actions(acts, &mut out);
                    }
                    Err(_) => {
                        // It may be stored all the same (an ambiguous put): read at the next
                        // synchronisation.
                        self.latest_known = false;
                        let acts = coord.handle(CoordInput::Failed {
                            epoch,
                            now_ms: self.now_ms,
                        });
                        self.coord_actions(acts, &mut out);
                    }
                }
                if self.resync
                    && !matches!(
                        self.phase,
                        Phase::Running {
                            writing: Some(_),
                            ..
                        }
                    )
                {
                    self.sync(&mut out);
                }
            }
        }
        if read {
            self.read_latest(&mut out);
        }
        self.reserve_more(&mut out);
        if self.move_now
            && !matches!(
                self.phase,
                Phase::Running {
                    writing: Some(_),
                    ..
                }
            )
        {
            self.move_now = false;
            self.handover = true;
            let live = self.live;
            self.sync(&mut out);
            self.live = live;
            // `sync` cleared the flags; the round moves.
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_carries_its_object_references_as_text() {
        let part = |objects: Vec<u8>| EpochMsg::Part {
            gen: 3,
            epoch: 9,
            objects,
            owned: vec![(4, 2)],
        };
        let json = br#"[{"node":"2","path":"e/9","size":5}]"#.to_vec();
        let m = part(json.clone());
        let wire = m.encode();
        let text = String::from_utf8(wire.clone()).unwrap();
        assert!(text.contains(r#""objects":"[{\"node\""#), "{text}");
        assert_eq!(EpochMsg::decode(&wire).unwrap(), m);
        // Bytes that are not text travel as numbers.
        let m = part(vec![0xff, 0, 7]);
        let wire = m.encode();
        assert!(String::from_utf8_lossy(&wire).contains("[255,0,7]"));
        assert_eq!(EpochMsg::decode(&wire).unwrap(), m);
    }

    fn set(v: &[NodeId]) -> BTreeSet<NodeId> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_marker_before_the_barrier_cuts_and_messages_after_the_cut_are_in_flight() {
        let mut n = NodeCut::new(2, 0);
        let members = set(&[1, 2, 3]);
        // Node 1's marker arrives before the leader's barrier: node 2 cuts at once.
        let a = n.handle(CutInput::Marker {
            from: 1,
            epoch: 1,
            members: members.clone(),
        });
        assert_eq!(a, vec![CutAction::CutShards(1)]);
        // A message from 3 (no marker yet) is in flight for epoch 1; one from 1 is not.
        assert_eq!(n.in_flight(3), vec![1]);
        assert!(n.in_flight(1).is_empty());
        // The barrier now changes nothing.
        assert!(n
            .handle(CutInput::Barrier {
                epoch: 1,
                members: members.clone()
            })
            .is_empty());
        // Its markers go out once its shards have cut.
        let a = n.handle(CutInput::ShardsCut { epoch: 1 });
        assert!(
            matches!(&a[..], [CutAction::SendMarkers { epoch: 1, to, .. }] if to == &vec![1, 3])
        );
        let a = n.handle(CutInput::Marker {
            from: 3,
            epoch: 1,
            members,
        });
        assert_eq!(a, vec![CutAction::WritePart(1)]);
        assert!(n.in_flight(3).is_empty());
    }

    #[test]
    fn an_outbox_holds_messages_of_a_later_epoch_until_the_marker() {
        let mut o = Outbox::new(0);
        // Shard A is still in epoch 1; shard B has cut 1 (and 2) and sends in 2 and 3.
        assert_eq!(o.push(1, "a1"), Some("a1"));
        assert_eq!(o.push(2, "b2"), None);
        assert_eq!(o.push(3, "b3"), None);
        // A's messages of epoch 1 overtake B's held ones.
        assert_eq!(o.push(1, "a1'"), Some("a1'"));
        assert_eq!(o.held(), 2);
        assert_eq!(o.marker(1), vec!["b2"]);
        assert_eq!(o.marker(2), vec!["b3"]);
        assert_eq!(o.push(3, "x"), Some("x"));
        // Released by epoch: B's 5 does not hold back A's 4.
        assert_eq!(o.push(5, "b5"), None);
        assert_eq!(o.push(4, "a4"), None);
        assert_eq!(o.marker(3), vec!["a4"]);
        assert_eq!(o.marker(4), vec!["b5"]);
        assert_eq!(o.push(6, "y"), None);
        o.reset(4);
        assert_eq!(o.held(), 0);
        assert_eq!(o.push(5, "z"), Some("z"));
    }

    #[test]
    fn the_leader_commits_in_order_and_abandons_what_a_dead_node_held() {
        let mut c = ClusterCoordinator::new(10, 4, 0, 0);
        c.handle(CoordInput::Members(set(&[1, 2])));
        let a = c.handle(CoordInput::Tick { now_ms: 100 });
        assert!(matches!(&a[0], CoordAction::Barrier { epoch: 1, .. }));
        c.handle(CoordInput::CutDone { epoch: 1, node: 1 });
        assert!(
            c.handle(CoordInput::Tick { now_ms: 110 }).is_empty(),
            "epoch 2 waits until every participant has cut epoch 1"
        );
        c.handle(CoordInput::CutDone { epoch: 1, node: 2 });
        c.handle(CoordInput::Tick { now_ms: 110 });
        c.handle(CoordInput::PartWritten { epoch: 2, node: 1 });
        c.handle(CoordInput::PartWritten { epoch: 2, node: 2 });
        c.handle(CoordInput::PartWritten { epoch: 1, node: 1 });
        let a = c.handle(CoordInput::PartWritten { epoch: 1, node: 2 });
        assert_eq!(
            a,
            vec![CoordAction::WriteManifest {
                epoch: 1,
                previous: 0,
                parts: set(&[1, 2])
            }]
        );
        assert_eq!(
            c.handle(CoordInput::ManifestWritten { epoch: 1 }),
            vec![CoordAction::ProposeCommit(1)]
        );
        let a = c.handle(CoordInput::Committed { epoch: 1 });
        assert!(matches!(
            &a[0],
            CoordAction::WriteManifest {
                epoch: 2,
                previous: 1,
                ..
            }
        ));
        c.handle(CoordInput::ManifestWritten { epoch: 2 });
        c.handle(CoordInput::CutDone { epoch: 2, node: 1 });
        c.handle(CoordInput::CutDone { epoch: 2, node: 2 });
        c.handle(CoordInput::Tick { now_ms: 120 });
        // Node 2 dies: epoch 2's manifest is written (kept), epoch 3 is abandoned.
        let a = c.handle(CoordInput::Left { node: 2 });
        assert_eq!(
            a,
            vec![CoordAction::Abandon {
                committed: 2,
                started: 3
            }]
        );
        c.handle(CoordInput::Committed { epoch: 2 });
        assert_eq!(c.committed(), 2);
        // The next epoch is 4, on node 1 alone, and names 2 as its predecessor.
        let a = c.handle(CoordInput::Tick { now_ms: 200 });
        assert!(
            matches!(&a[0], CoordAction::Barrier { epoch: 4, members } if members == &set(&[1]))
        );
        let a = c.handle(CoordInput::PartWritten { epoch: 4, node: 1 });
        assert!(matches!(
            &a[0],
            CoordAction::WriteManifest {
                epoch: 4,
                previous: 2,
                ..
            }
        ));
    }

    #[test]
    fn waiting_callers_start_at_most_one_epoch_while_another_persists() {
        let mut c = ClusterCoordinator::new(1000, 8, 0, 0);
        c.handle(CoordInput::Members(set(&[1, 2])));
        let cut = |c: &mut ClusterCoordinator, epoch: Epoch| {
            c.handle(CoordInput::CutDone { epoch, node: 1 });
            c.handle(CoordInput::CutDone { epoch, node: 2 });
        };
        c.handle(CoordInput::CallerWaiting);
        let a = c.handle(CoordInput::Tick { now_ms: 5 });
        assert!(
            matches!(&a[..], [CoordAction::Barrier { epoch: 1, .. }]),
            "a waiting caller starts an epoch at once when none is open: {a:?}"
        );
        cut(&mut c, 1);
        c.handle(CoordInput::CallerWaiting);
        assert!(
            c.handle(CoordInput::Tick { now_ms: 6 }).is_empty(),
            "the next one waits 2 ms"
        );
        let a = c.handle(CoordInput::Tick { now_ms: 7 });
        assert!(matches!(&a[..], [CoordAction::Barrier { epoch: 2, .. }]));
        cut(&mut c, 2);
        c.handle(CoordInput::CallerWaiting);
        assert!(
            c.handle(CoordInput::Tick { now_ms: 50 }).is_empty(),
            "no third while epoch 1 persists: callers gather in the next"
        );
        c.handle(CoordInput::PartWritten { epoch: 1, node: 1 });
        c.handle(CoordInput::PartWritten { epoch: 1, node: 2 });
        c.handle(CoordInput::ManifestWritten { epoch: 1 });
        c.handle(CoordInput::Committed { epoch: 1 });
        let a = c.handle(CoordInput::Tick { now_ms: 51 });
        assert!(
            matches!(&a[..], [CoordAction::Barrier { epoch: 3, .. }]),
            "once it committed: {a:?}"
        );
        // Without waiting callers, the interval still starts epochs (up to the bound).
        cut(&mut c, 3);
        let a = c.handle(CoordInput::Tick { now_ms: 1051 });
        assert!(matches!(&a[..], [CoordAction::Barrier { epoch: 4, .. }]));
    }

    /// A participant's `Held` with one shard.
    fn held_msg(gen: u64, committed: Epoch, cut: Epoch, cut_gen: u64) -> EpochMsg {
        EpochMsg::Held {
            gen,
            committed,
            cut,
            shards: 1,
            cut_gen,
            shard_gen: 7,
        }
    }

    fn sends(a: &[LeadAction]) -> Vec<(NodeId, EpochMsg)> {
        a.iter()
            .filter_map(|x| match x {
                LeadAction::Send { to, msg } => Some((*to, msg.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_leader_synchronises_then_commits_epochs_and_resyncs_when_participants_change() {
        let mut l = EpochLeader::new(7 << 32, 10, 4, 1_000, 3);
        l.handle(LeadInput::Tick { now_ms: 0 });
        let a = l.handle(LeadInput::Participants([(1, 11), (2, 22)].into()));
        let g = l.gen();
        assert_eq!(
            sends(&a),
            vec![
                (1, EpochMsg::Hold { gen: g }),
                (2, EpochMsg::Hold { gen: g })
            ]
        );
        // Answers of another generation are stale.
        assert!(l
            .handle(LeadInput::Msg {
                from: 1,
                msg: held_msg(g - 1, 3, 3, 0)
            })
            .is_empty());
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g, 4, 6, 0),
        });
        let a = l.handle(LeadInput::Msg {
            from: 2,
            msg: held_msg(g, 3, 3, 0),
        });
        assert_eq!(a, vec![LeadAction::ReadLatest]);
        let a = l.handle(LeadInput::Latest(Ok(Some(5))));
        // Manifest 5 is committed (node 1 had not heard yet); 6 is abandoned.
        assert_eq!(
            sends(&a)[0],
            (
                1,
                EpochMsg::Resume {
                    gen: g,
                    committed: 5,
                    base: 6,
                    manifest: Some(5),
                    roll_back: true,
                    live: false,
                    shards_gen: 0,
                    members: vec![(1, 1), (2, 1)],
                    placement_version: 0,
                    release: false,
                }
            )
        );
        assert!(l.running());
        let a = l.handle(LeadInput::Tick { now_ms: 100 });
        assert!(matches!(
            &sends(&a)[0],
            (1, EpochMsg::Barrier { epoch: 7, members, .. }) if members == &vec![1, 2]
        ));
        l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Part {
                gen: g,
                epoch: 7,
                objects: b"b".to_vec(),
                owned: Vec::new(),
            },
        });
        let a = l.handle(LeadInput::Msg {
            from: 1,
            msg: EpochMsg::Part {
                gen: g,
                epoch: 7,
                objects: b"a".to_vec(),
                owned: Vec::new(),
            },
        });
        assert_eq!(
            a,
            vec![LeadAction::WriteManifest {
                epoch: 7,
                previous: Some(5),
                parts: vec![b"a".to_vec(), b"b".to_vec()]
            }]
        );
        // A participant restarts while the manifest is written: the write finishes first.
        assert!(l
            .handle(LeadInput::Participants([(1, 11), (2, 23)].into()))
            .is_empty());
        let a = l.handle(LeadInput::ManifestDone {
            epoch: 7,
            result: Ok(true),
        });
        let s = sends(&a);
        assert_eq!(
            &s[..2],
            &[
                (1, EpochMsg::Committed { gen: g, epoch: 7 }),
                (2, EpochMsg::Committed { gen: g, epoch: 7 })
            ]
        );
        assert!(a.contains(&LeadAction::Record(7)));
        assert_eq!(s[2], (1, EpochMsg::Hold { gen: g + 1 }));
        assert_eq!(l.committed(), 7);
    }

    /// A running leader over participants 1 and 2 (synchronised at epoch 0).
    fn running_leader() -> (EpochLeader, u64) {
        running_leader_every(10)
    }

    fn running_leader_every(interval_ms: u64) -> (EpochLeader, u64) {
        let mut l = EpochLeader::new(1 << 32, interval_ms, 4, 100_000, 0);
        l.handle(LeadInput::Tick { now_ms: 0 });
        l.handle(LeadInput::Participants([(1, 1), (2, 1)].into()));
        let g = l.gen();
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g, 0, 0, 0),
            });
        }
        l.handle(LeadInput::Latest(Ok(None)));
        assert!(l.running());
        (l, g)
    }

    /// Ticks until the leader starts an epoch: (epoch, quiesce, snapshot) of its barrier.
    fn next_barrier(l: &mut EpochLeader, now: &mut u64) -> (Epoch, bool, Vec<u32>) {
        for _ in 0..1_000 {
            *now += 10;
            for (to, m) in sends(&l.handle(LeadInput::Tick { now_ms: *now })) {
                if let (
                    1,
                    EpochMsg::Barrier {
                        epoch,
                        quiesce,
                        snapshot,
                        ..
                    },
                ) = (to, m)
                {
                    return (epoch, quiesce, snapshot);
                }
            }
        }
        panic!("no barrier");
    }

    /// Participants 1 and 2 cut `epoch` and report their parts; its manifest is written.
    /// Participant `from` cuts `epoch` and reports its part (`objects`); the leader's actions.
    fn cut_and_report(
        l: &mut EpochLeader,
        g: u64,
        epoch: Epoch,
        from: NodeId,
        objects: Vec<u8>,
    ) -> Vec<LeadAction> {
        let mut a = l.handle(LeadInput::Msg {
            from,
            msg: EpochMsg::Cut { gen: g, epoch },
        });
        a.extend(l.handle(LeadInput::Msg {
            from,
            msg: EpochMsg::Part {
                gen: g,
                epoch,
                objects,
                owned: Vec::new(),
            },
        }));
        a
    }

    fn commit(l: &mut EpochLeader, g: u64, epoch: Epoch) {
        for from in [1, 2] {
            cut_and_report(l, g, epoch, from, vec![from as u8]);
        }
        l.handle(LeadInput::ManifestDone {
            epoch,
            result: Ok(true),
        });
        assert_eq!(l.committed(), epoch);
    }

    /// A running leader with nothing open is idle; an epoch started (by the interval or by a
    /// caller's `Wanted`) makes it busy until it commits; a synchronisation is busy.
    #[test]
    fn a_leader_is_idle_only_with_nothing_under_way() {
        let mut l = EpochLeader::new(1 << 32, 10, 4, 100_000, 0);
        l.handle(LeadInput::Tick { now_ms: 0 });
        assert!(!l.idle(), "no participants yet");
        assert_eq!(l.next_start_ms(), None, "not running");
        l.handle(LeadInput::Participants([(1, 1), (2, 1)].into()));
        assert!(!l.idle(), "synchronising");
        let (mut l, g) = running_leader();
        assert!(l.idle(), "running, nothing open");
        assert_eq!(
            l.next_start_ms(),
            Some(0),
            "no epoch yet: due at the next tick"
        );
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        assert!(!l.idle(), "epoch {e} open");
        commit(&mut l, g, e);
        assert!(l.idle(), "epoch {e} committed");
        // The interval (10 ms) counts from the barrier's tick; no tick before that starts one.
        assert_eq!(l.next_start_ms(), Some(now + 10));
        let early = l.handle(LeadInput::Tick { now_ms: now + 9 });
        assert!(sends(&early).is_empty(), "{early:?}");
        let a = l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Wanted { gen: g },
        });
        assert!(
            sends(&a)
                .iter()
                .any(|(_, m)| matches!(m, EpochMsg::Barrier { .. })),
            "a caller's epoch starts at once, without a tick: {a:?}"
        );
        assert!(!l.idle(), "the caller's epoch is open");
        commit(&mut l, g, e + 1);
        assert!(l.idle());
        l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        assert!(!l.idle(), "a participant joins");
    }

    /// An idle leader is ticked every few ms; a caller's epoch counts from when its `Wanted`
    /// came (`set_now`), not from the last tick: a second caller a millisecond later waits for
    /// the 2 ms group-commit window, even if a tick comes meanwhile.
    #[test]
    fn a_callers_epoch_counts_from_when_it_was_wanted_not_from_the_last_tick() {
        let (mut l, g) = running_leader_every(1_000);
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        commit(&mut l, g, e);
        assert!(l.idle());
        let barriers = |a: &[LeadAction]| {
            sends(a)
                .into_iter()
                .filter_map(|(to, m)| match m {
                    EpochMsg::Barrier { epoch, .. } if to == 1 => Some(epoch),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let wanted = |l: &mut EpochLeader, from, at| {
            l.set_now(at);
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Wanted { gen: g },
            })
        };
        // 9 ms after the last tick: the caller's epoch starts at once.
        assert_eq!(barriers(&wanted(&mut l, 2, now + 9)), [e + 1]);
        // Its participants cut it (it persists now: a second epoch may start beside it).
        l.set_now(now + 9);
        for from in [1, 2] {
            let a = l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Cut {
                    gen: g,
                    epoch: e + 1,
                },
            });
            assert_eq!(barriers(&a), [] as [u64; 0]);
        }
        // 1 ms later another caller, and the idle tick: within the window, nothing starts.
        assert_eq!(barriers(&wanted(&mut l, 1, now + 10)), [] as [u64; 0]);
        let a = l.handle(LeadInput::Tick { now_ms: now + 10 });
        assert_eq!(barriers(&a), [] as [u64; 0], "{a:?}");
        // 2 ms after the first: the second caller's epoch.
        let a = l.handle(LeadInput::Tick { now_ms: now + 11 });
        assert_eq!(barriers(&a), [e + 2], "{a:?}");
    }

    #[test]
    fn a_move_asks_for_snapshots_then_stops_the_moving_key_groups_and_hands_them_over_live() {
        let (mut l, g) = running_leader();
        let mut now = 0;
        l.handle(LeadInput::Handover {
            snapshot: vec![3, 4],
        });
        // The next barrier asks for the snapshots, once.
        let (e, quiesce, snapshot) = next_barrier(&mut l, &mut now);
        assert_eq!((quiesce, snapshot), (false, vec![3, 4]));
        commit(&mut l, g, e);
        l.handle(LeadInput::Msg {
            from: 1,
            msg: EpochMsg::Prepared { gen: g },
        });
        // Participant 2's snapshot is not listed yet: epochs go on.
        let (e, quiesce, snapshot) = next_barrier(&mut l, &mut now);
        assert_eq!((quiesce, snapshot), (false, vec![]));
        // A stale answer (another generation) does not count.
        l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Prepared { gen: g - 1 },
        });
        commit(&mut l, g, e);
        let (e, quiesce, _) = next_barrier(&mut l, &mut now);
        assert!(!quiesce);
        l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Prepared { gen: g },
        });
        // Every snapshot is listed: no epoch starts until the open one commits; then every
        // participant is asked to stop the moving key groups at the next cut.
        let a = tick(&mut l, &mut now, 5);
        assert!(
            a.iter()
                .all(|(_, m)| !matches!(m, EpochMsg::Barrier { .. } | EpochMsg::Stop { .. })),
            "{a:?}"
        );
        commit(&mut l, g, e);
        let at = e + 1;
        let a = tick(&mut l, &mut now, 1);
        let stop = EpochMsg::Stop {
            gen: g,
            at,
            key_groups: vec![3, 4],
        };
        assert_eq!(a, vec![(1, stop.clone()), (2, stop)]);
        // Until both answer, nothing starts.
        l.handle(LeadInput::Msg {
            from: 1,
            msg: EpochMsg::Stopping { gen: g },
        });
        assert!(tick(&mut l, &mut now, 5).is_empty());
        let a = l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Stopping { gen: g },
        });
        assert!(
            sends(&a).iter().any(
                |(_, m)| matches!(m, EpochMsg::Barrier { epoch, quiesce: true, .. } if *epoch == at)
            ),
            "the stop epoch is quiesced: {a:?}"
        );
        // Nothing starts after it.
        assert!(tick(&mut l, &mut now, 5).is_empty());
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Cut { gen: g, epoch: at },
            });
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Part {
                    gen: g,
                    epoch: at,
                    objects: vec![from as u8],
                    owned: Vec::new(),
                },
            });
        }
        let a = l.handle(LeadInput::ManifestDone {
            epoch: at,
            result: Ok(true),
        });
        // Once it commits, the leader holds everyone to move.
        assert!(sends(&a).contains(&(1, EpochMsg::Hold { gen: g + 1 })));
        let g1 = l.gen();
        let mut a = Vec::new();
        for from in [1, 2] {
            a = l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g1, at, at, g),
            });
        }
        assert_eq!(a, vec![LeadAction::ProposeMove]);
        // This leader knows the newest manifest: it resumes at once.
        let a = l.handle(LeadInput::Moved);
        let resumes: Vec<_> = sends(&a)
            .into_iter()
            .filter_map(|(to, m)| match m {
                EpochMsg::Resume {
                    roll_back, live, ..
                } => Some((to, roll_back, live)),
                _ => None,
            })
            .collect();
        assert_eq!(resumes, vec![(1, false, true), (2, false, true)]);
        // Epochs start again once every participant has handed over.
        l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Reconfigured { gen: g1 },
        });
        assert!(tick(&mut l, &mut now, 5).is_empty());
        let a = l.handle(LeadInput::Msg {
            from: 1,
            msg: EpochMsg::Reconfigured { gen: g1 },
        });
        assert!(
            sends(&a)
                .iter()
                .any(|(_, m)| matches!(m, EpochMsg::Barrier { epoch, .. } if *epoch == at + 1)),
            "{a:?}"
        );
    }

    /// A running leader over participants 1 and 2 planning to move key group 5, whose
    /// snapshots both listed in a committed epoch: (leader, generation, that epoch, now).
    fn prepared_leader() -> (EpochLeader, u64, Epoch, u64) {
        let (mut l, g) = running_leader();
        let mut now = 0;
        l.handle(LeadInput::Handover { snapshot: vec![5] });
        let (e, _, _) = next_barrier(&mut l, &mut now);
        commit(&mut l, g, e);
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Prepared { gen: g },
            });
        }
        (l, g, e, now)
    }

    /// A running leader over participants 1 and 2 that moved key group 5 up to its stop epoch
    /// (both answered `Stopping`) and committed it: (leader, generation of the stop, the stop
    /// epoch, now).
    fn stopped_leader() -> (EpochLeader, u64, Epoch, u64) {
        let (mut l, g, e, mut now) = prepared_leader();
        tick(&mut l, &mut now, 1);
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Stopping { gen: g },
            });
        }
        let at = e + 1;
        commit(&mut l, g, at);
        (l, g, at, now)
    }

    /// Ticks `n` times 10 ms apart; the messages sent.
    fn tick(l: &mut EpochLeader, now: &mut u64, n: usize) -> Vec<(NodeId, EpochMsg)> {
        let mut out = Vec::new();
        for _ in 0..n {
            *now += 10;
            out.extend(sends(&l.handle(LeadInput::Tick { now_ms: *now })));
        }
        out
    }

    #[test]
    fn a_live_move_falls_back_to_a_rollback_when_a_participant_does_not_stop_or_does_not_hand_over()
    {
        // Participant 2 never answers `Stop`: after the timeout the move goes the old way.
        let (mut l, g) = running_leader();
        let mut now = 0;
        l.handle(LeadInput::Handover { snapshot: vec![] });
        // (no snapshots asked: the plan is empty, the next epoch is quiesced)
        let (e, quiesce, _) = next_barrier(&mut l, &mut now);
        assert!(quiesce);
        commit(&mut l, g, e);

        let (mut l, g, _, mut now) = prepared_leader();
        let a = tick(&mut l, &mut now, 1);
        assert!(a.iter().any(|(_, m)| matches!(m, EpochMsg::Stop { .. })));
        l.handle(LeadInput::Msg {
            from: 1,
            msg: EpochMsg::Stopping { gen: g },
        });
        let start = now;
        let (e, quiesce, _) = next_barrier(&mut l, &mut now);
        assert!(
            quiesce && now >= start + STOP_TIMEOUT_MS - 20,
            "quiesced at {now}"
        );
        commit(&mut l, g, e);
        let g1 = l.gen();
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g1, e, e, g),
            });
        }
        l.handle(LeadInput::Moved);
        let a = l.handle(LeadInput::Latest(Ok(Some(e))));
        assert!(sends(&a).iter().all(|(_, m)| matches!(
            m,
            EpochMsg::Resume {
                roll_back: true,
                live: false,
                ..
            }
        )));

        // Both stop, but participant 1 never hands over: the leader synchronises again (a
        // rollback) after the timeout.
        let (mut l, g, at, mut now) = stopped_leader();
        let g1 = l.gen();
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                // Participant 2 cut an epoch the leader never started: not live.
                msg: held_msg(g1, at, at, g),
            });
        }
        l.handle(LeadInput::Moved);
        let a = l.handle(LeadInput::Latest(Ok(Some(at))));
        assert!(sends(&a)
            .iter()
            .all(|(_, m)| matches!(m, EpochMsg::Resume { live: true, .. })));
        l.handle(LeadInput::Msg {
            from: 2,
            msg: EpochMsg::Reconfigured { gen: g1 },
        });
        let mut held_again = false;
        for _ in 0..(RECONFIGURE_TIMEOUT_MS / 10 + 10) {
            let a = tick(&mut l, &mut now, 1);
            assert!(a
                .iter()
                .all(|(_, m)| !matches!(m, EpochMsg::Barrier { .. })));
            if a.iter().any(|(_, m)| matches!(m, EpochMsg::Hold { .. })) {
                held_again = true;
                break;
            }
        }
        assert!(
            held_again,
            "no synchronisation after the handover timed out"
        );
    }

    #[test]
    fn a_member_that_owns_nothing_is_taken_in_without_a_rollback_once_the_open_epochs_drain() {
        let (mut l, g) = running_leader();
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        // Node 3 (new, owns nothing) wants in while epoch `e` is open: nothing starts, and
        // nobody is held until it commits.
        let a = l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        assert!(a.is_empty());
        assert!(tick(&mut l, &mut now, 3).is_empty());
        commit(&mut l, g, e);
        let a = tick(&mut l, &mut now, 1);
        let g1 = l.gen();
        assert_eq!(
            a,
            vec![
                (1, EpochMsg::Hold { gen: g1 }),
                (2, EpochMsg::Hold { gen: g1 }),
                (3, EpochMsg::Hold { gen: g1 })
            ]
        );
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g1, e, e, g),
            });
        }
        // Its own numbering and shard generation do not matter: it owns nothing.
        let a = l.handle(LeadInput::Msg {
            from: 3,
            msg: EpochMsg::Held {
                gen: g1,
                committed: 0,
                cut: 0,
                shards: 2,
                cut_gen: 0,
                shard_gen: 0,
            },
        });
        assert_eq!(a.len(), 3, "{a:?}");
        for (to, m) in sends(&a) {
            match m {
                EpochMsg::Resume {
                    roll_back,
                    live,
                    shards_gen,
                    committed,
                    base,
                    members,
                    ..
                } => {
                    assert!(!roll_back && live, "to {to}");
                    assert_eq!((shards_gen, committed, base), (7, e, e));
                    assert_eq!(members, vec![(1, 1), (2, 1), (3, 2)]);
                }
                m => panic!("{m:?}"),
            }
        }
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Reconfigured { gen: g1 },
            });
        }
        assert!(tick(&mut l, &mut now, 3).is_empty());
        let a = l.handle(LeadInput::Msg {
            from: 3,
            msg: EpochMsg::Reconfigured { gen: g1 },
        });
        assert!(sends(&a)
            .iter()
            .any(|(to, m)| *to == 3
                && matches!(m, EpochMsg::Barrier { epoch, .. } if *epoch == e + 1)));

        // A participant that restarted (another incarnation) is not taken in live.
        let (mut l, g) = running_leader();
        let a = l.handle(LeadInput::Participants([(1, 2), (2, 1), (3, 1)].into()));
        assert!(sends(&a).contains(&(1, EpochMsg::Hold { gen: g + 1 })));

        // Nor one whose shards are of a newer generation than the others' (7): taking theirs,
        // it would go back to an older one. Everyone rolls back instead (to the leader's).
        let (mut l, g) = running_leader();
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        commit(&mut l, g, e);
        tick(&mut l, &mut now, 1);
        let g1 = l.gen();
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g1, e, e, g),
            });
        }
        let a = l.handle(LeadInput::Msg {
            from: 3,
            msg: EpochMsg::Held {
                gen: g1,
                committed: 0,
                cut: 0,
                shards: 2,
                cut_gen: 0,
                shard_gen: 9,
            },
        });
        let resumes = sends(&a);
        assert_eq!(resumes.len(), 3, "{resumes:?}");
        for (to, m) in resumes {
            assert!(
                matches!(
                    m,
                    EpochMsg::Resume {
                        roll_back: true,
                        live: false,
                        ..
                    }
                ),
                "to {to}: {m:?}"
            );
        }
    }

    /// A leader about to hand its Raft leadership over stops starting epochs, waits for the
    /// open one to commit, then says where it left them (once) and starts nothing again; the
    /// next leader, told so, resumes the participants live if they hold exactly there, in
    /// that generation, and rolls them back as any new leader otherwise.
    #[test]
    fn a_leader_that_hands_the_epochs_over_stops_them_and_the_next_one_resumes_them_live() {
        let (mut l, g) = running_leader();
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        assert!(l.handle(LeadInput::HandOff).is_empty());
        assert!(!l.ready_to_move() && !l.idle(), "a hand-over is under way");
        let mut a = Vec::new();
        for _ in 0..5 {
            now += 10;
            a.extend(l.handle(LeadInput::Tick { now_ms: now }));
        }
        assert!(
            !a.iter().any(|x| matches!(x, LeadAction::HandedOff(_))),
            "epoch {e} is open: {a:?}"
        );
        assert!(sends(&a).is_empty(), "nothing starts: {a:?}");
        commit(&mut l, g, e);
        now += 10;
        let a = l.handle(LeadInput::Tick { now_ms: now });
        let handed: Vec<_> = a
            .iter()
            .filter_map(|x| match x {
                LeadAction::HandedOff(h) => Some(h.clone()),
                _ => None,
            })
            .collect();
        let h = EpochHandoff {
            gen: g,
            committed: e,
            participants: [(1, 1), (2, 1)].into(),
        };
        assert_eq!(handed, vec![h.clone()]);
        // Nothing starts again, not even for a caller; it is said once.
        l.handle(LeadInput::Msg {
            from: 1,
            msg: EpochMsg::Wanted { gen: g },
        });
        let mut a = Vec::new();
        for _ in 0..50 {
            now += 10;
            a.extend(l.handle(LeadInput::Tick { now_ms: now }));
        }
        assert!(a.is_empty(), "{a:?}");
        // Given up after that (the leadership stayed): a synchronisation in a generation
        // above the hand-over's fence (`g + 1`), which forgets it.
        let mut given_up = l.clone();
        let a = sends(&given_up.handle(LeadInput::CancelHandOff));
        assert_eq!(
            a,
            vec![
                (1, EpochMsg::Hold { gen: g + 2 }),
                (2, EpochMsg::Hold { gen: g + 2 })
            ]
        );
        // Given up before (an epoch still open): epochs just go on.
        let (mut l2, g2) = running_leader();
        let mut now2 = 0;
        let (e2, _, _) = next_barrier(&mut l2, &mut now2);
        l2.handle(LeadInput::HandOff);
        assert!(tick(&mut l2, &mut now2, 3).is_empty());
        l2.handle(LeadInput::CancelHandOff);
        assert!(l2.ready_to_move(), "no hand-over under way");
        let mut a = Vec::new();
        for from in [1, 2] {
            a.extend(cut_and_report(&mut l2, g2, e2, from, vec![from as u8]));
        }
        a.extend(l2.handle(LeadInput::ManifestDone {
            epoch: e2,
            result: Ok(true),
        }));
        for _ in 0..3 {
            now2 += 10;
            a.extend(l2.handle(LeadInput::Tick { now_ms: now2 }));
        }
        assert!(
            !a.iter().any(|x| matches!(x, LeadAction::HandedOff(_)))
                && sends(&a)
                    .iter()
                    .any(|(_, m)| matches!(m, EpochMsg::Barrier { epoch, .. } if *epoch == e2 + 1)),
            "{a:?}"
        );

        // The next leader's first synchronisation: (participants, their answers (cut,
        // generation followed), hand-over live).
        let three: BTreeMap<NodeId, u64> = [(1, 1), (2, 1), (3, 1)].into();
        type Case = (BTreeMap<NodeId, u64>, [(Epoch, u64); 2], bool);
        let cases: Vec<Case> = vec![
            (h.participants.clone(), [(e, g), (e, g)], true),
            // Participant 2 cut the next epoch (a barrier the last leader did send).
            (h.participants.clone(), [(e, g), (e + 1, g)], false),
            // Participant 1 followed another generation since.
            (h.participants.clone(), [(e, g + 1), (e, g)], false),
            // Other participants than those it left.
            (three, [(e, g), (e, g)], false),
        ];
        for (p, answers, live) in cases {
            let mut n = EpochLeader::new(2 << 32, 10, 4, 100_000, e);
            n.handed_over(h.clone());
            n.handle(LeadInput::Tick { now_ms: 0 });
            n.handle(LeadInput::Participants(p.clone()));
            let g2 = n.gen();
            for (i, (cut, cut_gen)) in answers.into_iter().enumerate() {
                n.handle(LeadInput::Msg {
                    from: i as NodeId + 1,
                    msg: held_msg(g2, e, cut, cut_gen),
                });
            }
            if p.len() == 3 {
                n.handle(LeadInput::Msg {
                    from: 3,
                    msg: held_msg(g2, e, e, g),
                });
            }
            let a = sends(&n.handle(LeadInput::Latest(Ok(Some(e)))));
            assert_eq!(a.len(), p.len(), "{a:?}");
            for (to, m) in a {
                assert!(
                    matches!(m, EpochMsg::Resume { roll_back, live: l, .. } if l == live && roll_back != live),
                    "{answers:?} to {to}: {m:?}"
                );
            }
        }
    }

    /// A new leader whose participants restarted (they forgot what they cut for its
    /// predecessor, which may still write those epochs' manifests) numbers its epochs above
    /// the control group's reservation, starts none until its own reservation applied, asks
    /// for more once half are used (and again if unanswered), and does not renumber a live
    /// resumption after a hand-over.
    #[test]
    fn a_leader_that_reserves_epoch_numbers_starts_above_its_predecessors_reservation() {
        let reserves = |a: &[LeadAction]| -> Vec<Epoch> {
            a.iter()
                .filter_map(|x| match x {
                    LeadAction::Reserve { through } => Some(*through),
                    _ => None,
                })
                .collect()
        };
        let barriers = |a: &[LeadAction]| -> Vec<Epoch> {
            sends(a)
                .into_iter()
                .filter_map(|(to, m)| match m {
                    EpochMsg::Barrier { epoch, .. } if to == 1 => Some(epoch),
                    _ => None,
                })
                .collect()
        };
        let synced = |reserve: bool| {
            let mut l = EpochLeader::new(2 << 32, 10, 4, 100_000, 5);
            if reserve {
                l = l.reserve_epochs();
            }
            l.handle(LeadInput::Tick { now_ms: 0 });
            l.handle(LeadInput::Participants([(1, 2), (2, 2)].into()));
            let g = l.gen();
            for from in [1, 2] {
                l.handle(LeadInput::Msg {
                    from,
                    msg: held_msg(g, 5, 5, 0),
                });
            }
            // The predecessor reserved up to 1,000 (and may have cut up to there).
            let mut a = l.handle(LeadInput::Reserved { through: 1_000 });
            a.extend(l.handle(LeadInput::Latest(Ok(Some(5)))));
            (l, g, a)
        };
        let (mut l, g, a) = synced(true);
        for (_, m) in sends(&a) {
            assert!(
                matches!(
                    m,
                    EpochMsg::Resume {
                        committed: 5,
                        base: 1_000,
                        roll_back: true,
                        ..
                    }
                ),
                "{m:?}"
            );
        }
        assert_eq!(reserves(&a), vec![1_000 + RESERVE_STEP]);
        // Nothing starts until the reservation applied; unanswered, it is asked for again.
        let mut a = Vec::new();
        let mut now = 0;
        for _ in 0..99 {
            now += 10;
            a.extend(l.handle(LeadInput::Tick { now_ms: now }));
        }
        assert!(barriers(&a).is_empty() && reserves(&a).is_empty(), "{a:?}");
        now += 20;
        let a = l.handle(LeadInput::Tick { now_ms: now });
        assert_eq!(reserves(&a), vec![1_000 + RESERVE_STEP], "asked again");
        // A reservation that applied, short of what was asked (another's): epochs start up to
        // it; the ask stands.
        let a = l.handle(LeadInput::Reserved { through: 1_002 });
        assert_eq!(barriers(&a), vec![1_001]);
        assert!(reserves(&a).is_empty(), "{a:?}");
        commit(&mut l, g, 1_001);
        let (e, _, _) = next_barrier(&mut l, &mut now);
        assert_eq!(e, 1_002);
        commit(&mut l, g, 1_002);
        let a = tick(&mut l, &mut now, 20);
        assert!(
            a.iter()
                .all(|(_, m)| !matches!(m, EpochMsg::Barrier { .. })),
            "{a:?}"
        );
        let a = l.handle(LeadInput::Reserved {
            through: 1_000 + RESERVE_STEP,
        });
        assert_eq!(barriers(&a), vec![1_003]);
        assert!(reserves(&a).is_empty(), "enough numbers: {a:?}");

        // Without reservations (the epoch log fences late epochs): above the cuts only.
        let (_, _, a) = synced(false);
        for (_, m) in sends(&a) {
            assert!(matches!(m, EpochMsg::Resume { base: 5, .. }), "{m:?}");
        }
        assert!(reserves(&a).is_empty());

        // A live resumption after a hand-over keeps its numbers (the last leader started
        // nothing after the hand-over's epoch); the epochs go on under the reservation.
        let h = EpochHandoff {
            gen: 1 << 32,
            committed: 5,
            participants: [(1, 2), (2, 2)].into(),
        };
        let mut n = EpochLeader::new(2 << 32, 10, 4, 100_000, 5).reserve_epochs();
        n.handed_over(h.clone());
        n.handle(LeadInput::Tick { now_ms: 0 });
        n.handle(LeadInput::Participants(h.participants.clone()));
        let g = n.gen();
        for from in [1, 2] {
            n.handle(LeadInput::Msg {
                from,
                msg: held_msg(g, 5, 5, h.gen),
            });
        }
        let through = 5 + RESERVE_STEP / 2 + 1;
        n.handle(LeadInput::Reserved { through });
        let a = n.handle(LeadInput::Latest(Ok(Some(5))));
        for (_, m) in sends(&a) {
            assert!(
                matches!(
                    m,
                    EpochMsg::Resume {
                        base: 5,
                        live: true,
                        roll_back: false,
                        ..
                    }
                ),
                "{m:?}"
            );
        }
        // Enough numbers: the reservation as it stands is proposed again (for members that
        // skipped it).
        assert_eq!(reserves(&a), vec![through], "{a:?}");
        n.handle(LeadInput::Reserved { through });
        // More is asked for once half the numbers are used (at the start of epoch 7).
        let mut a = Vec::new();
        for from in [1, 2] {
            a.extend(n.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Reconfigured { gen: g },
            }));
        }
        let mut now = 0;
        for e in [6, 7] {
            for _ in 0..100 {
                if barriers(&a).contains(&e) {
                    break;
                }
                now += 10;
                a.extend(n.handle(LeadInput::Tick { now_ms: now }));
            }
            assert!(barriers(&a).contains(&e), "{a:?}");
            if e == 6 {
                assert!(reserves(&a).is_empty(), "{a:?}");
            }
            commit(&mut n, g, e);
        }
        assert_eq!(reserves(&a), vec![through + RESERVE_STEP], "{a:?}");
    }

    /// The participants' answers to the synchronisation of generation `g` (committed and cut
    /// at `e`, in `cut_gen`; `new`: those that own nothing, with their own numbering).
    fn held_all(
        l: &mut EpochLeader,
        g: u64,
        e: Epoch,
        cut_gen: u64,
        old: &[NodeId],
        new: &[NodeId],
    ) -> Vec<(NodeId, EpochMsg)> {
        let mut a = Vec::new();
        for &from in old {
            a.extend(l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g, e, e, cut_gen),
            }));
        }
        for &from in new {
            a.extend(l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Held {
                    gen: g,
                    committed: 0,
                    cut: 0,
                    shards: 1,
                    cut_gen: 0,
                    shard_gen: 0,
                },
            }));
        }
        sends(&a)
    }

    fn reconfigured_all(l: &mut EpochLeader, g: u64, from: &[NodeId]) -> Vec<(NodeId, EpochMsg)> {
        let mut a = Vec::new();
        for &from in from {
            a.extend(l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Reconfigured { gen: g },
            }));
        }
        sends(&a)
    }

    /// Commits each epoch that starts (participants `from` cut it and report their parts; `a`:
    /// the messages so far, then each tick's), from after `e`, until the leader sends something
    /// else: (the last committed epoch, those messages).
    fn commit_until_other(
        l: &mut EpochLeader,
        g: u64,
        mut e: Epoch,
        mut a: Vec<(NodeId, EpochMsg)>,
        now: &mut u64,
        from: &[NodeId],
    ) -> (Epoch, Vec<(NodeId, EpochMsg)>) {
        for _ in 0..1_000 {
            if let Some(&(_, EpochMsg::Barrier { epoch, .. })) = a.first() {
                assert!(epoch > e, "{a:?}");
                e = epoch;
                for &n in from {
                    cut_and_report(l, g, e, n, vec![n as u8]);
                }
                l.handle(LeadInput::ManifestDone {
                    epoch: e,
                    result: Ok(true),
                });
                assert_eq!(l.committed(), e);
            } else if !a.is_empty() {
                return (e, a);
            }
            *now += 10;
            a = sends(&l.handle(LeadInput::Tick { now_ms: *now }));
        }
        panic!("the leader sends nothing but epochs");
    }

    /// Every `Resume` in `s` is live, rolls nobody back, at `e`, to exactly `to`.
    fn assert_live_resumes(s: &[(NodeId, EpochMsg)], e: Epoch, to: &[NodeId]) {
        let got: Vec<NodeId> = s.iter().map(|(n, _)| *n).collect();
        assert_eq!(got, to, "{s:?}");
        for (n, m) in s {
            assert!(
                matches!(m, EpochMsg::Resume { roll_back: false, live: true, committed, .. }
                    if *committed == e),
                "to {n}: {m:?}"
            );
        }
    }

    #[test]
    fn a_member_that_wants_in_while_another_is_taken_in_waits_and_is_taken_in_live_too() {
        let (mut l, g) = running_leader();
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        commit(&mut l, g, e);
        let a = tick(&mut l, &mut now, 1);
        let g1 = l.gen();
        assert_eq!(a.len(), 3, "{a:?}");
        // Node 4 wants in while node 3's intake synchronises: nothing is held again, no
        // generation is skipped, and the intake goes on.
        let a = l.handle(LeadInput::Participants(
            [(1, 1), (2, 1), (3, 1), (4, 1)].into(),
        ));
        assert!(a.is_empty(), "{a:?}");
        assert!(tick(&mut l, &mut now, 3).is_empty());
        assert_eq!(l.gen(), g1);
        assert!(!l.ready_to_move(), "no move before node 4 is in");
        assert!(!l.may_own(3) && !l.may_own(4));
        let s = held_all(&mut l, g1, e, g, &[1, 2], &[3]);
        assert_live_resumes(&s, e, &[1, 2, 3]);
        let a = reconfigured_all(&mut l, g1, &[1, 2, 3]);
        // Then node 4 is taken in the same way once the open epochs drain: nobody rolls back.
        let (e, a) = commit_until_other(&mut l, g1, e, a, &mut now, &[1, 2, 3]);
        let g2 = l.gen();
        assert_eq!(g2, g1 + 1, "{a:?}");
        let held: Vec<NodeId> = a.iter().map(|(n, _)| *n).collect();
        assert_eq!(held, vec![1, 2, 3, 4], "{a:?}");
        let s = held_all(&mut l, g2, e, g1, &[1, 2, 3], &[4]);
        assert_live_resumes(&s, e, &[1, 2, 3, 4]);
        let a = reconfigured_all(&mut l, g2, &[1, 2, 3, 4]);
        assert!(l.ready_to_move() && l.may_own(3) && l.may_own(4));
        // Once its epochs commit, nothing is under way: the leader is idle again.
        if let Some(&(_, EpochMsg::Barrier { epoch, .. })) = a.first() {
            for from in [1, 2, 3, 4] {
                cut_and_report(&mut l, g2, epoch, from, vec![from as u8]);
            }
            l.handle(LeadInput::ManifestDone {
                epoch,
                result: Ok(true),
            });
        }
        assert!(l.idle(), "not idle after the intakes");

        // One that wants in while a live move is under way waits: the move's synchronisation
        // holds only the others, and it may be given nothing; then it is taken in live.
        let (mut l, g, e, mut now) = prepared_leader();
        tick(&mut l, &mut now, 1);
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Stopping { gen: g },
            });
        }
        let a = l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        assert!(a.is_empty(), "{a:?}");
        assert!(!l.may_own(3));
        let at = e + 1;
        for from in [1, 2] {
            cut_and_report(&mut l, g, at, from, vec![from as u8]);
        }
        let a = sends(&l.handle(LeadInput::ManifestDone {
            epoch: at,
            result: Ok(true),
        }));
        let g1 = l.gen();
        assert_eq!(
            a.iter()
                .filter(|(_, m)| matches!(m, EpochMsg::Hold { .. }))
                .map(|(n, _)| *n)
                .collect::<Vec<_>>(),
            vec![1, 2],
            "{a:?}"
        );
        let mut a = Vec::new();
        for from in [1, 2] {
            a = l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g1, at, at, g),
            });
        }
        assert_eq!(a, vec![LeadAction::ProposeMove]);
        assert!(!l.may_own(3), "the move's plan may not name it");
        let s = sends(&l.handle(LeadInput::Moved));
        assert_live_resumes(&s, at, &[1, 2]);
        let a = reconfigured_all(&mut l, g1, &[1, 2]);
        let (e, a) = commit_until_other(&mut l, g1, at, a, &mut now, &[1, 2]);
        let held: Vec<NodeId> = a.iter().map(|(n, _)| *n).collect();
        assert_eq!(held, vec![1, 2, 3], "{a:?}");
        let g2 = l.gen();
        let s = held_all(&mut l, g2, e, g1, &[1, 2], &[3]);
        assert_live_resumes(&s, e, &[1, 2, 3]);
        assert!(l.may_own(3));

        // One that wants in while a synchronisation that rolls back is under way waits for
        // it, then is taken in live.
        let (mut l, g) = running_leader();
        let mut now = 0;
        l.handle(LeadInput::Unreachable(2));
        let g1 = l.gen();
        assert_eq!(g1, g + 1);
        let a = l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        assert!(a.is_empty(), "{a:?}");
        let s = held_all(&mut l, g1, 0, g, &[1, 2], &[]);
        assert_eq!(s.len(), 2, "{s:?}");
        let a = tick(&mut l, &mut now, 1);
        let g2 = l.gen();
        let held: Vec<NodeId> = a.iter().map(|(n, _)| *n).collect();
        assert_eq!(held, vec![1, 2, 3], "{a:?}");
        let s = held_all(&mut l, g2, 0, g1, &[1, 2], &[3]);
        assert_live_resumes(&s, 0, &[1, 2, 3]);

        // A synchronisation that starts while one waits (here: a move's snapshot is under way,
        // then a participant's stream breaks) takes it in.
        let (mut l, g) = running_leader();
        l.handle(LeadInput::Handover { snapshot: vec![1] });
        assert!(!l.ready_to_move());
        let a = l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        assert!(a.is_empty(), "{a:?}");
        assert!(!l.may_own(3));
        let a = sends(&l.handle(LeadInput::Unreachable(2)));
        let held: Vec<NodeId> = a.iter().map(|(n, _)| *n).collect();
        assert_eq!(held, vec![1, 2, 3], "{a:?}");
        assert!(!l.may_own(3), "being taken in");
        let s = held_all(&mut l, g + 1, 0, g, &[1, 2], &[3]);
        let to: Vec<NodeId> = s.iter().map(|(n, _)| *n).collect();
        assert_eq!(to, vec![1, 2, 3], "{s:?}");
        assert!(l.may_own(3));

        // With a participant left out (which may last), one that waits is taken in the old way.
        let (mut l, g) = running_leader();
        l.handle(LeadInput::Unreachable(2));
        l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g + 1, 0, 0, g),
        });
        let mut now = 0;
        let mut holds = Vec::new();
        while holds.is_empty() && now < 2 * HOLD_TIMEOUT_MS {
            now += 10;
            holds = sends(&l.handle(LeadInput::Tick { now_ms: now }))
                .into_iter()
                .filter(|(to, m)| *to == 3 && matches!(m, EpochMsg::Hold { .. }))
                .collect();
        }
        assert_eq!(l.excluded(), &BTreeSet::from([2]));
        assert_eq!(holds, vec![(3, EpochMsg::Hold { gen: g + 2 })]);
    }

    #[test]
    fn a_participant_that_owns_nothing_is_taken_out_without_a_rollback_once_the_open_epochs_drain()
    {
        let mut l = EpochLeader::new(1 << 32, 10, 4, 100_000, 0);
        l.handle(LeadInput::Tick { now_ms: 0 });
        l.handle(LeadInput::Participants([(1, 1), (2, 1), (3, 1)].into()));
        let g = l.gen();
        for from in [1, 2, 3] {
            l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g, 0, 0, 0),
            });
        }
        l.handle(LeadInput::Latest(Ok(None)));
        assert!(l.running());
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        // Node 3 left its key groups behind while epoch `e` is open: it still takes part in
        // `e` (the leader waits for its cut and part), nothing else starts.
        let a = l.handle(LeadInput::Retire([(1, 1), (2, 1)].into()));
        assert!(a.is_empty(), "{a:?}");
        assert!(tick(&mut l, &mut now, 3).is_empty());
        for from in [1, 2] {
            cut_and_report(&mut l, g, e, from, vec![1]);
        }
        for _ in 0..3 {
            now += 10;
            let a = l.handle(LeadInput::Tick { now_ms: now });
            assert!(a.is_empty(), "without node 3's part: {a:?}");
        }
        let a = cut_and_report(&mut l, g, e, 3, Vec::new());
        assert!(
            a.iter()
                .any(|x| matches!(x, LeadAction::WriteManifest { epoch, .. } if *epoch == e)),
            "{a:?}"
        );
        l.handle(LeadInput::ManifestDone {
            epoch: e,
            result: Ok(true),
        });
        // Drained: only the two that stay are held, and resume live where they are.
        let a = tick(&mut l, &mut now, 1);
        let g1 = l.gen();
        assert_eq!(
            a,
            vec![
                (1, EpochMsg::Hold { gen: g1 }),
                (2, EpochMsg::Hold { gen: g1 })
            ]
        );
        // (This leader wrote every manifest since it read the newest: no read.)
        let mut a = Vec::new();
        for from in [1, 2] {
            a.extend(l.handle(LeadInput::Msg {
                from,
                msg: held_msg(g1, e, e, g),
            }));
        }
        let resumes = sends(&a);
        assert_eq!(resumes.len(), 2, "{resumes:?}");
        for (_, m) in resumes {
            assert!(
                matches!(m, EpochMsg::Resume { roll_back: false, live: true, ref members, committed, .. }
                    if committed == e && members == &vec![(1, 1), (2, 1)]),
                "{m:?}"
            );
        }
        let mut a = Vec::new();
        for from in [1, 2] {
            a.extend(l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Reconfigured { gen: g1 },
            }));
        }
        let barriers: Vec<_> = sends(&a)
            .into_iter()
            .filter_map(|(to, m)| match m {
                EpochMsg::Barrier { epoch, members, .. } => Some((to, epoch, members)),
                _ => None,
            })
            .collect();
        assert_eq!(
            barriers,
            vec![(1, e + 1, vec![1, 2]), (2, e + 1, vec![1, 2])],
            "{a:?}"
        );

        // Not a subset (another incarnation): the old way, everyone rolls back.
        let (mut l, g) = running_leader();
        let a = l.handle(LeadInput::Retire([(1, 2)].into()));
        assert!(
            sends(&a).contains(&(1, EpochMsg::Hold { gen: g + 1 })),
            "{a:?}"
        );
    }

    #[test]
    fn a_participant_that_cut_past_the_stop_epoch_makes_the_move_roll_back() {
        let (mut l, g, at, _) = stopped_leader();
        let g1 = l.gen();
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g1, at, at, g),
        });
        l.handle(LeadInput::Msg {
            from: 2,
            msg: held_msg(g1, at, at + 1, g),
        });
        l.handle(LeadInput::Moved);
        let a = l.handle(LeadInput::Latest(Ok(Some(at))));
        assert!(sends(&a).iter().all(|(_, m)| matches!(
            m,
            EpochMsg::Resume {
                roll_back: true,
                live: false,
                ..
            }
        )));
    }

    /// Participants 1 and 2 answer the current generation's `Hold`.
    fn held(l: &mut EpochLeader, committed: Epoch) -> Vec<LeadAction> {
        let g = l.gen();
        let mut out = Vec::new();
        for from in [1, 2] {
            out.extend(l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Held {
                    gen: g,
                    committed,
                    cut: committed,
                    shards: 1,
                    cut_gen: 0,
                    shard_gen: 7,
                },
            }));
        }
        out
    }

    #[test]
    fn a_leader_reads_the_newest_manifest_again_only_after_a_manifest_write_failed() {
        let (mut l, g) = running_leader();
        let mut now = 0;
        let (e, _, _) = next_barrier(&mut l, &mut now);
        commit(&mut l, g, e);
        // A participant restarts: this leader wrote every manifest since it read the newest,
        // so it resumes at once.
        l.handle(LeadInput::Participants([(1, 1), (2, 2)].into()));
        let a = held(&mut l, e);
        assert!(!a.contains(&LeadAction::ReadLatest));
        assert!(l.running());
        assert!(sends(&a).iter().any(|(to, m)| *to == 1
            && matches!(m, EpochMsg::Resume { committed, manifest, .. } if *committed == e && *manifest == Some(e))));
        // A manifest write fails (it may be stored all the same): the next synchronisation
        // reads.
        let g = l.gen();
        let (e2, _, _) = next_barrier(&mut l, &mut now);
        for from in [1, 2] {
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Cut { gen: g, epoch: e2 },
            });
            l.handle(LeadInput::Msg {
                from,
                msg: EpochMsg::Part {
                    gen: g,
                    epoch: e2,
                    objects: vec![1],
                    owned: Vec::new(),
                },
            });
        }
        l.handle(LeadInput::ManifestDone {
            epoch: e2,
            result: Err("timed out".into()),
        });
        l.handle(LeadInput::Participants([(1, 2), (2, 2)].into()));
        let a = held(&mut l, e);
        assert_eq!(a, vec![LeadAction::ReadLatest]);
        // It was stored: the participants resume at it.
        let a = l.handle(LeadInput::Latest(Ok(Some(e2))));
        assert!(sends(&a).iter().any(|(to, m)| *to == 1
            && matches!(m, EpochMsg::Resume { committed, .. } if *committed == e2)));
    }

    #[test]
    fn a_participant_that_does_not_answer_is_left_out_then_taken_in_when_it_answers() {
        let (mut l, _) = running_leader();
        // The stream to node 2 broke: synchronise at once.
        let a = l.handle(LeadInput::Unreachable(2));
        let g = l.gen();
        assert!(sends(&a).contains(&(2, EpochMsg::Hold { gen: g })));
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g, 0, 0, 0),
        });
        // Node 2 does not answer: after the timeout it is left out, node 1 goes on alone.
        let a = l.handle(LeadInput::Tick {
            now_ms: HOLD_TIMEOUT_MS - 1,
        });
        assert!(!a.contains(&LeadAction::ReadLatest) && !l.running());
        let a = l.handle(LeadInput::Tick {
            now_ms: HOLD_TIMEOUT_MS,
        });
        assert!(l.running());
        assert_eq!(l.excluded(), &BTreeSet::from([2]));
        let s = sends(&a);
        assert!(s.iter().any(|(to, m)| *to == 1
            && matches!(m, EpochMsg::Resume { members, .. } if members == &vec![(1, 1)])));
        assert!(!s.iter().any(|(to, _)| *to == 2));
        // Epochs run without it; it is sent `Hold` now and then.
        let mut now = HOLD_TIMEOUT_MS;
        let mut holds = 0;
        for _ in 0..150 {
            now += 10;
            for (to, m) in sends(&l.handle(LeadInput::Tick { now_ms: now })) {
                match (to, m) {
                    (2, EpochMsg::Hold { gen }) if gen == g => holds += 1,
                    (2, m) => panic!("node 2 is left out, yet sent {m:?}"),
                    _ => {}
                }
            }
        }
        assert!(holds >= 1, "no Hold to the participant left out");
        // It answers: the next synchronisation waits for it.
        let a = l.handle(LeadInput::Msg {
            from: 2,
            msg: held_msg(g, 0, 4, 0),
        });
        assert!(l.excluded().is_empty());
        let g2 = l.gen();
        assert!(g2 > g && sends(&a).contains(&(2, EpochMsg::Hold { gen: g2 })));
    }

    /// The `release` of each participant in a `Resume` of generation `g`.
    fn releases(a: &[LeadAction], g: u64) -> BTreeMap<NodeId, bool> {
        sends(a)
            .into_iter()
            .filter_map(|(to, m)| match m {
                EpochMsg::Resume { gen, release, .. } if gen == g => Some((to, release)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn only_a_participant_that_took_part_in_the_committed_epochs_releases_its_open_ones() {
        let (mut l, g0) = running_leader();
        let mut now = 0;
        let (e1, _, _) = next_barrier(&mut l, &mut now);
        commit(&mut l, g0, e1);
        // Both cut the next epoch; node 2 stops answering.
        let (e2, _, _) = next_barrier(&mut l, &mut now);
        let a = l.handle(LeadInput::Unreachable(2));
        let g1 = l.gen();
        assert!(sends(&a).contains(&(1, EpochMsg::Hold { gen: g1 })));
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g1, e1 - 1, e2, g0),
        });
        now += HOLD_TIMEOUT_MS;
        let a = l.handle(LeadInput::Tick { now_ms: now });
        assert_eq!(l.excluded(), &BTreeSet::from([2]));
        // Node 1 cut its open epochs in the generation that committed e1: it releases them.
        assert_eq!(releases(&a, g1), BTreeMap::from([(1, true)]));
        // Node 1 goes on alone, after e2.
        let mut e = e2;
        for _ in 0..2 {
            let (next, _, _) = next_barrier(&mut l, &mut now);
            assert!(next > e);
            e = next;
            l.handle(LeadInput::Msg {
                from: 1,
                msg: EpochMsg::Cut { gen: g1, epoch: e },
            });
            l.handle(LeadInput::Msg {
                from: 1,
                msg: EpochMsg::Part {
                    gen: g1,
                    epoch: e,
                    objects: vec![1],
                    owned: Vec::new(),
                },
            });
            l.handle(LeadInput::ManifestDone {
                epoch: e,
                result: Ok(true),
            });
            assert_eq!(l.committed(), e);
        }
        // Node 2 answers: it still holds its epochs of generation g0, the committed ones are
        // of g1 without it. It releases none of its own; node 1 releases its own.
        l.handle(LeadInput::Msg {
            from: 2,
            msg: held_msg(g1, e1, e2, g0),
        });
        let g2 = l.gen();
        assert!(g2 > g1);
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g2, e - 1, e, g1),
        });
        let a = l.handle(LeadInput::Msg {
            from: 2,
            msg: held_msg(g2, e1, e2, g0),
        });
        assert_eq!(releases(&a, g2), BTreeMap::from([(1, true), (2, false)]));
        // A new leader does not know which generation cut the committed epochs: nobody
        // releases open epochs of its own (they read the committed ones back).
        let mut l2 = EpochLeader::new(2 << 32, 10, 4, 100_000, 0);
        l2.handle(LeadInput::Participants([(1, 1), (2, 1)].into()));
        let g3 = l2.gen();
        for from in [1, 2] {
            l2.handle(LeadInput::Msg {
                from,
                msg: held_msg(g3, e1, e + 1, g2),
            });
        }
        let a = l2.handle(LeadInput::Latest(Ok(Some(e))));
        assert_eq!(releases(&a, g3), BTreeMap::from([(1, false), (2, false)]));
    }

    #[test]
    fn a_move_goes_on_without_the_snapshots_after_the_prepare_timeout() {
        let (mut l, g) = running_leader();
        let mut now = 0;
        l.handle(LeadInput::Handover { snapshot: vec![9] });
        let (e, _, snapshot) = next_barrier(&mut l, &mut now);
        assert_eq!(snapshot, vec![9]);
        commit(&mut l, g, e);
        // A second plan while one waits is not taken.
        l.handle(LeadInput::Handover { snapshot: vec![10] });
        let start = now;
        loop {
            let a = tick(&mut l, &mut now, 1);
            if a.iter().any(
                |(_, m)| matches!(m, EpochMsg::Stop { key_groups, .. } if key_groups == &vec![9]),
            ) {
                assert!(now >= start + PREPARE_TIMEOUT_MS - 20, "stopped at {now}");
                break;
            }
            for (to, m) in a {
                if let (
                    1,
                    EpochMsg::Barrier {
                        epoch,
                        quiesce,
                        snapshot,
                        ..
                    },
                ) = (to, m)
                {
                    assert!(snapshot.is_empty() && !quiesce);
                    commit(&mut l, g, epoch);
                }
            }
            assert!(now < start + PREPARE_TIMEOUT_MS + 100, "never stopped");
        }
    }

    #[test]
    fn a_new_leader_waits_the_full_timeout_from_its_first_tick_and_a_lone_survivor_rolls_back() {
        // A leader is made and given its participants before its first tick (as the control
        // group's driver does): the time is not known yet.
        let mut l = EpochLeader::new(3 << 32, 10, 4, 100_000, 0);
        l.handle(LeadInput::Participants([(1, 1), (2, 1)].into()));
        let g = l.gen();
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g, 0, 2, 0),
        });
        let t0 = 1_764_000_000_000;
        for now_ms in [t0, t0 + HOLD_TIMEOUT_MS - 1] {
            let a = l.handle(LeadInput::Tick { now_ms });
            assert!(
                l.excluded().is_empty() && !a.contains(&LeadAction::ReadLatest),
                "node 2 left out at {} ms",
                now_ms - t0
            );
        }
        l.handle(LeadInput::Tick {
            now_ms: t0 + HOLD_TIMEOUT_MS,
        });
        assert_eq!(l.excluded(), &BTreeSet::from([2]));
        let a = l.handle(LeadInput::Latest(Ok(None)));
        // Node 1 resumes alone, but it may have exchanged messages with node 2 since its
        // last cut (this leader cannot know): it rolls back.
        assert!(sends(&a).iter().any(|(to, m)| *to == 1
            && matches!(m, EpochMsg::Resume { roll_back: true, members, .. } if members == &vec![(1, 1)])));
    }

    #[test]
    fn an_epoch_missing_a_part_for_too_long_makes_the_leader_resync() {
        let mut l = EpochLeader::new(1 << 32, 10, 4, 1_000, 0);
        l.handle(LeadInput::Participants([(1, 1)].into()));
        let g = l.gen();
        l.handle(LeadInput::Msg {
            from: 1,
            msg: held_msg(g, 0, 0, 0),
        });
        l.handle(LeadInput::Latest(Ok(None)));
        l.handle(LeadInput::Tick { now_ms: 10 });
        assert!(l
            .handle(LeadInput::Tick { now_ms: 500 })
            .iter()
            .all(|a| !matches!(
                a,
                LeadAction::Send {
                    msg: EpochMsg::Hold { .. },
                    ..
                }
            )));
        let a = l.handle(LeadInput::Tick { now_ms: 1_010 });
        assert_eq!(sends(&a), vec![(1, EpochMsg::Hold { gen: g + 1 })]);
        assert!(!l.running());
    }
}
