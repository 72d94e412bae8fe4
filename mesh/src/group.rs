//! One member's replica of the control group: a raft-rs `RawNode` driving the
//! [`ClusterState`] state machine, as pure input → output steps (no clock, no socket: the
//! caller ticks it, hands it the bytes of peer messages, and sends what it returns).
//!
//! `Ready` is handled in the order raft-rs documents (MESH.md, lesson 7): send the leader's
//! messages; apply a snapshot; apply committed entries; append the new entries and save the
//! hard state (durably: the storage is written before the call returns); only then send the
//! `persisted_messages`; `advance`; save the new commit index; send and apply what the light
//! ready holds; `advance_apply`. The applied index travels with the state machine, so a
//! restart from the same storage and state never applies an entry twice and never sees
//! `applied > committed`.
//!
//! The storage is any [`ControlLog`]: raft-engine ([`crate::storage::EngineStorage`], fsynced)
//! in a node, raft-rs's `MemStorage` in the simulation (which keeps it across a "crash" as
//! the durable part).

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType, Message, Snapshot,
};
use raft::storage::MemStorage;
use raft::{Config, RawNode, SnapshotStatus, StateRole};

use crate::control::{ClusterState, Command, Outcome, RaftConf, Role};
use crate::placement::NodeId;
use crate::storage::ControlLog;

/// How many of the newest committed entries a peer may lack and still count as caught up
/// ([`ControlNode::caught_up`]). Under load the leader appends an entry every few
/// milliseconds (the cluster's epoch log), so a learner has every committed entry only in the
/// moments between an append and its answer: a round of moves that found the new owner caught
/// up found it behind by one or two entries 30 ms later, when the move was proposed, and was
/// dropped (the next round starts 2 s later). A peer that far behind applies a move within
/// milliseconds; one that needs a snapshot, or stopped answering, is far further behind.
pub const CAUGHT_UP_SLACK: u64 = 16;

/// What a step produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to peers: (to, encoded `eraftpb.Message`).
    pub messages: Vec<(NodeId, Vec<u8>)>,
    /// Entries applied, in order: (index, command, outcome). Entries without a command
    /// (a new leader's empty entry, configuration changes) are not listed.
    pub applied: Vec<(u64, Command, Outcome)>,
    /// Read indexes confirmed (see [`ControlNode::read_index`]): (context, index).
    pub read_states: Vec<(Vec<u8>, u64)>,
}

/// The most entry bytes one append message carries (one entry at least, whatever its size).
pub const MAX_SIZE_PER_MSG: u64 = 1 << 20;

/// Timing of the group, in ticks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Ticks without a leader before a follower campaigns.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// A fixed election timeout in ticks (simulations): raft-rs otherwise draws each one in
    /// `[election_ticks, 2 × election_ticks)` from an unseeded generator, and a seed would not
    /// reproduce a schedule.
    pub fixed_election_ticks: Option<usize>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            election_ticks: 10,
            heartbeat_ticks: 3,
            fixed_election_ticks: None,
        }
    }
}

/// What [`ControlNode::step`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stepped {
    /// The member that created the message (a message forwarded by another member, a read
    /// index say, names its origin).
    pub origin: NodeId,
    /// The leader's replication (an append, a heartbeat or a snapshot): what a member stops
    /// getting once the group removed it. (A read index's answer is not: a leader answers one
    /// from a removed member too.)
    pub replication: bool,
    /// The sender's own campaign (a vote or pre-vote request): no sign that it hears the
    /// group. A member cut off from what the others send campaigns every election timeout,
    /// and still reaches them; counted as a sign of life, it was never declared dead. Every
    /// other message counts: the read indexes the leader answers above all, since the
    /// ownership leases start at them.
    pub campaign: bool,
}

impl Stepped {
    /// Whether the message shows that its sender hears the group (the failure detector's
    /// sign of life).
    pub fn sign_of_life(&self) -> bool {
        !self.campaign
    }
}

/// A member's replica of the control group.
pub struct ControlNode<S: ControlLog = MemStorage> {
    id: NodeId,
    raw: RawNode<S>,
    state: ClusterState,
}

/// The durable parts of a member of a new group whose first members are `voters` and
/// `learners`: its storage, and its state machine with that configuration recorded (so that
/// a restart from any state starts from the configuration of that state).
pub fn bootstrap(
    voters: &[NodeId],
    learners: &[NodeId],
    key_groups: u32,
) -> (MemStorage, ClusterState) {
    let cs = ConfState::from((voters.to_vec(), learners.to_vec()));
    let mut state = ClusterState::new(key_groups);
    state.conf = Some(from_conf_state(&cs));
    (MemStorage::new_with_conf_state(cs), state)
}

impl<S: ControlLog> ControlNode<S> {
    /// Starts (or restarts) member `id` on `storage` (its durable log and hard state) with
    /// `state` (its durable state machine, at some applied index ≤ the storage's commit).
    pub fn new(
        id: NodeId,
        storage: S,
        state: ClusterState,
        timing: Timing,
    ) -> Result<ControlNode<S>, String> {
        let (min_election_tick, max_election_tick) = match timing.fixed_election_ticks {
            Some(t) => (t, t + 1),
            None => (0, 0),
        };
        let config = Config {
            id,
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            min_election_tick,
            max_election_tick,
            applied: state.applied_index,
            check_quorum: true,
            pre_vote: true,
            // A member that is behind gets its entries in batches of up to 1 MiB, at most 32
            // of them in flight (one entry per message, and 256 of them, made one leader's
            // step read hundreds of thousands of entries).
            max_size_per_msg: MAX_SIZE_PER_MSG,
            max_inflight_msgs: 32,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        // Validate before touching the storage.
        let Some(conf) = &state.conf else {
            return Err("control state without a Raft configuration (not bootstrapped)".into());
        };
        let committed = storage.hard_state().commit;
        if state.applied_index > committed {
            return Err(format!(
                "control state applied up to {} but the log has committed only {committed}",
                state.applied_index
            ));
        }
        let first = storage.first_index().map_err(|e| e.to_string())?;
        if state.applied_index + 1 < first {
            return Err(format!(
                "control state applied up to {} but the log starts at {first} (compacted): restart from its snapshot",
                state.applied_index
            ));
        }
        // The configuration as of the state's applied index: later changes are applied again.
        storage.set_conf_state(to_conf_state(conf))?;
        let raw = RawNode::new(&config, storage, &logger).map_err(|e| e.to_string())?;
        Ok(ControlNode { id, raw, state })
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The replicated state as applied here.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeId> {
        let l = self.raw.raft.leader_id;
        (l != raft::INVALID_ID).then_some(l)
    }

    /// Whether this member is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Whether peer `id` has (as the leader sees it) every committed entry but at most the
    /// last [`CAUGHT_UP_SLACK`], and answered recently: only such a learner is promoted to
    /// voter, takes part in the cluster's epochs, or is given key groups.
    pub fn caught_up(&self, id: NodeId) -> bool {
        self.is_leader()
            && self.raw.raft.prs().get(id).is_some_and(|p| {
                p.recent_active && p.matched + CAUGHT_UP_SLACK >= self.raw.raft.raft_log.committed
            })
    }

    /// Whether peer `id` has answered (as the leader sees it) since the last quorum check,
    /// at most an election timeout ago.
    pub fn peer_active(&self, id: NodeId) -> bool {
        self.is_leader() && self.raw.raft.prs().get(id).is_some_and(|p| p.recent_active)
    }

    /// The highest commit index peer `id` has reported (in its answers to appends and
    /// heartbeats; as the leader sees it, `None` elsewhere or for a peer outside the group):
    /// it knows every entry up to there committed.
    pub fn peer_committed(&self, id: NodeId) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        self.raw.raft.prs().get(id).map(|p| p.committed_index)
    }

    /// Asks (as the leader) that voter `to` lead instead: raft-rs brings it up to date, then
    /// has it campaign at once; proposals are dropped meanwhile (up to an election timeout).
    pub fn transfer_leader(&mut self, to: NodeId) {
        self.raw.transfer_leader(to);
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The highest log index known committed here.
    pub fn committed(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The storage (durable part) of this member.
    pub fn storage(&self) -> &S {
        self.raw.store()
    }

    /// The transport could not reach `peer`.
    pub fn report_unreachable(&mut self, peer: NodeId) {
        self.raw.report_unreachable(peer);
    }

    /// A snapshot sent to `peer` was delivered (or failed).
    pub fn report_snapshot(&mut self, peer: NodeId, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(peer, status);
    }

    /// Once more than `2 × keep` entries are applied beyond the log's start, keeps a snapshot
    /// of the state machine at the applied index and drops the entries before the last `keep`
    /// applied ones. A peer that needs dropped entries is sent the snapshot.
    pub fn compact(&mut self, keep: u64) -> Result<bool, String> {
        let first = self.raw.store().first_index().map_err(|e| e.to_string())?;
        if self.state.applied_index < first + 2 * keep {
            return Ok(false);
        }
        self.raw.store().compact(&self.state, keep)?;
        Ok(true)
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Hands over a peer's message (its encoded bytes); says which member sent it and what
    /// kind of message it is ([`Stepped`]). A message that does not decode is refused with an
    /// error naming it; the node is unaffected.
    pub fn step(&mut self, bytes: &[u8]) -> Result<Stepped, String> {
        let m = Message::parse_from_bytes(bytes).map_err(|e| format!("raft message: {e}"))?;
        use raft::prelude::MessageType as T;
        let t = m.get_msg_type();
        let replication = matches!(t, T::MsgAppend | T::MsgHeartbeat | T::MsgSnapshot);
        let campaign = matches!(t, T::MsgRequestVote | T::MsgRequestPreVote);
        if m.to != self.id {
            return Err(format!(
                "raft message for node {} reached node {}",
                m.to, self.id
            ));
        }
        let origin = m.from;
        self.raw
            .step(m)
            .map(|()| Stepped {
                origin,
                replication,
                campaign,
            })
            .map_err(|e| format!("raft step: {e}"))
    }

    /// Proposes a command; only the leader accepts (others answer with an error, and the
    /// caller forwards to [`ControlNode::leader`]).
    pub fn propose(&mut self, cmd: &Command) -> Result<(), String> {
        if !self.is_leader() {
            return Err(format!(
                "node {} is not the leader (leader: {:?})",
                self.id,
                self.leader()
            ));
        }
        self.raw
            .propose(Vec::new(), cmd.encode())
            .map_err(|e| format!("propose: {e}"))
    }

    /// Proposes a command from any member: a follower forwards it to the leader it knows
    /// (raft-rs's proposal forwarding; lost with a lost message, so the caller proposes again
    /// until it sees the entry applied). Fails when no leader is known.
    pub fn propose_anywhere(&mut self, cmd: &Command) -> Result<(), String> {
        if self.leader().is_none() {
            return Err(format!("node {}: no leader known", self.id));
        }
        self.raw
            .propose(Vec::new(), cmd.encode())
            .map_err(|e| format!("propose: {e}"))
    }

    /// Asks the leader for a read index (confirmed by a heartbeat round with a majority): the
    /// answer comes back in a later [`Output::read_states`] with `ctx`, or never (no leader,
    /// a leader that has not committed in its term yet, a lost message): ask again.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    /// Proposes a change of the Raft configuration (only on the leader).
    pub fn propose_conf_change(&mut self, cc: ConfChangeV2) -> Result<(), String> {
        if !self.is_leader() {
            return Err(format!("node {} is not the leader", self.id));
        }
        self.raw
            .propose_conf_change(Vec::new(), cc)
            .map_err(|e| format!("propose configuration change: {e}"))
    }

    /// The voters and learners of the current configuration.
    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    /// Whether the configuration is joint (entered, not yet left).
    pub fn in_joint(&self) -> bool {
        !self.conf_state().voters_outgoing.is_empty()
    }

    /// Proposes membership changes (`Some(role)`: add or change to that role; `None`:
    /// remove) as one joint-consensus change that is left explicitly with
    /// [`ControlNode::propose_leave_joint`] once applied (raft-rs's automatic leave can stick
    /// when the leader steps down in between).
    pub fn propose_membership(&mut self, changes: &[(NodeId, Option<Role>)]) -> Result<(), String> {
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Explicit);
        for (id, role) in changes {
            let mut c = ConfChangeSingle::default();
            c.set_node_id(*id);
            c.set_change_type(match role {
                Some(Role::Voter) => ConfChangeType::AddNode,
                Some(Role::Learner) => ConfChangeType::AddLearnerNode,
                None => ConfChangeType::RemoveNode,
            });
            cc.mut_changes().push(c);
        }
        self.propose_conf_change(cc)
    }

    /// Proposes leaving the joint configuration.
    pub fn propose_leave_joint(&mut self) -> Result<(), String> {
        self.propose_conf_change(ConfChangeV2::default())
    }

    /// Handles whatever raft-rs has ready, in its documented order. An error (the log cannot
    /// be written) is fatal for this replica: it must be restarted from its storage.
    pub fn process(&mut self) -> Result<Output, String> {
        let mut out = Output::default();
        if self.raw.store().snapshot_wanted() {
            self.raw.store().refresh_snapshot(&self.state)?;
        }
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        // 1. A leader may send before its own entries are durable.
        push_messages(&mut out, rd.take_messages());
        out.read_states.extend(
            rd.take_read_states()
                .into_iter()
                .map(|r| (r.request_ctx, r.index)),
        );
        // 2. A snapshot from the leader replaces the state machine.
        if !rd.snapshot().is_empty() {
            self.apply_snapshot(rd.snapshot().clone())?;
        }
        // 3. Entries committed earlier.
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut out)?;
        // 4. New entries and the hard state, durably, before anything that depends on them.
        self.raw.store().persist(rd.entries(), rd.hs())?;
        // 5. Messages that promise what was just persisted.
        push_messages(&mut out, rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.store().persist_commit(commit)?;
        }
        push_messages(&mut out, light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out)?;
        self.raw.advance_apply();
        Ok(out)
    }

    fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), String> {
        let state = ClusterState::decode(snap.get_data())?;
        self.raw.store().apply_snapshot(snap)?;
        self.state = state;
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), String> {
        for e in entries {
            let index = e.get_index();
            match e.get_entry_type() {
                EntryType::EntryNormal if e.get_data().is_empty() => {
                    self.state.applied_index = self.state.applied_index.max(index);
                }
                EntryType::EntryNormal => match Command::decode(e.get_data()) {
                    Ok(cmd) => {
                        let outcome = self.state.apply(index, &cmd);
                        out.applied.push((index, cmd, outcome));
                    }
                    Err(err) => {
                        // Deterministic on every member: the entry is skipped everywhere.
                        self.state.applied_index = self.state.applied_index.max(index);
                        out.applied.push((
                            index,
                            Command::CommitEpoch { epoch: 0 },
                            Outcome::Rejected(err),
                        ));
                    }
                },
                EntryType::EntryConfChange => {
                    if let Ok(cc) = ConfChange::parse_from_bytes(e.get_data()) {
                        if let Ok(cs) = self.raw.apply_conf_change(&cc) {
                            self.conf_applied(index, cs)?;
                        }
                    }
                    self.state.applied_index = self.state.applied_index.max(index);
                }
                EntryType::EntryConfChangeV2 => {
                    if let Ok(cc) = ConfChangeV2::parse_from_bytes(e.get_data()) {
                        if let Ok(cs) = self.raw.apply_conf_change(&cc) {
                            self.conf_applied(index, cs)?;
                        }
                    }
                    self.state.applied_index = self.state.applied_index.max(index);
                }
            }
        }
        Ok(())
    }
}

impl<S: ControlLog> ControlNode<S> {
    fn conf_applied(&mut self, index: u64, cs: ConfState) -> Result<(), String> {
        self.state.set_conf(index, from_conf_state(&cs));
        self.raw.store().set_conf_state(cs)
    }
}

/// Checks that `bytes` are a Raft message (what [`ControlNode::step`] accepts), so that a peer
/// sending anything else can be disconnected before its bytes reach the group.
pub fn check_message(bytes: &[u8]) -> Result<(), String> {
    Message::parse_from_bytes(bytes)
        .map(|_| ())
        .map_err(|e| format!("not a Raft message: {e}"))
}

fn from_conf_state(cs: &ConfState) -> RaftConf {
    let sorted = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    RaftConf {
        voters: sorted(cs.get_voters()),
        learners: sorted(cs.get_learners()),
        voters_outgoing: sorted(cs.get_voters_outgoing()),
        learners_next: sorted(cs.get_learners_next()),
        auto_leave: cs.get_auto_leave(),
    }
}

fn to_conf_state(c: &RaftConf) -> ConfState {
    let mut cs = ConfState::from((c.voters.clone(), c.learners.clone()));
    cs.set_voters_outgoing(c.voters_outgoing.clone());
    cs.set_learners_next(c.learners_next.clone());
    cs.set_auto_leave(c.auto_leave);
    cs
}

fn push_messages(out: &mut Output, msgs: Vec<Message>) {
    for m in msgs {
        let to = m.to;
        out.messages
            .push((to, m.write_to_bytes().expect("a raft message encodes")));
    }
}
