//! The control group's state machine (pure): members with their generations, the key-group
//! table with an ownership version per key group, and the committed epochs. Every node applies
//! the same committed Raft entries in the same order, so every node holds the same state at
//! the same index (DESIGN.md, "The mesh").
//!
//! Entries are [`Command`]s (JSON, the control plane is low-volume); a snapshot is the whole
//! [`ClusterState`] (JSON), which carries the index it reflects so that a restart never
//! applies an entry twice and never sees `applied > committed`.
//!
//! The group also carries the cluster's **epoch log** ([`EpochTail`]): committed epochs that
//! blob storage does not hold yet, each an opaque byte string ([`Command::LogEpoch`], base64
//! in the entry), dropped once an upload covers them ([`Command::Uploaded`]). The tail is part
//! of the state, so a snapshot carries it: every member that has applied an index — a member
//! restored from a snapshot after it lost its disk, a new leader — holds the same tail, and an
//! epoch whose entry committed (is durable on a quorum of voters) survives the loss of any one
//! member's disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::placement::NodeId;

/// A member's part in the Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Votes and counts towards commits (1, 3 or 5 of them).
    Voter,
    /// Replicates the log only.
    Learner,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Bumped each time it (re)joins: messages and writes of an older generation are stale.
    pub generation: u64,
    /// Its gRPC address (ingress and the mesh transport).
    pub grpc_addr: String,
    /// Its HTTP address.
    pub http_addr: String,
    /// Its role in the Raft group.
    pub role: Role,
    /// Not declared dead.
    pub alive: bool,
    /// Leaving the cluster (`statemesh cluster leave`): its key groups move to the others,
    /// then it is removed from the Raft group and the members.
    #[serde(default)]
    pub leaving: bool,
    /// The process start that joined last (random per start): a node knows its own join is
    /// applied by finding it here, even when it learns the state from a snapshot.
    #[serde(default)]
    pub incarnation: u64,
}

/// Who owns a key group, and the version of that ownership (bumped by every move).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The owner (`None`: not assigned yet).
    pub owner: Option<NodeId>,
    /// Bumped on every change of owner; forwarded messages and durable writes carry it.
    pub version: u64,
}

/// One key group changing owner, valid only if its version is still `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveCommand {
    /// The key group.
    pub kg: u32,
    /// The owner it moves to.
    pub to: NodeId,
    /// The ownership version the proposer saw (compare-and-set).
    pub version: u64,
    /// A failover: the key group's owner was dead (or it had none) when the move was planned,
    /// and the move is refused if that owner is alive again when the entry applies (it
    /// rejoined meanwhile and serves the key group: moving it without a hand-over would give
    /// it two owners). Its version alone does not say so: a rejoin does not change it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub orphan: bool,
}

/// An entry of the control group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A node joins, or rejoins after a restart or after being declared dead: it gets the
    /// next generation.
    Join {
        /// Its id.
        id: NodeId,
        /// Its gRPC address.
        grpc_addr: String,
        /// Its HTTP address.
        http_addr: String,
        /// Its role (a membership change in Raft goes with it).
        role: Role,
        /// The joining process start (see [`Member::incarnation`]).
        #[serde(default)]
        incarnation: u64,
        /// A node with a new data directory (not a member restarting): refused if the id is
        /// already a member's (two new nodes given one id, racing).
        #[serde(default)]
        fresh: bool,
    },
    /// A member's role changed (after the Raft configuration change committed).
    SetRole {
        /// The member.
        id: NodeId,
        /// Its role now.
        role: Role,
    },
    /// A member is declared dead (its generation must still be current).
    MarkDead {
        /// The member.
        id: NodeId,
        /// The generation declared dead.
        generation: u64,
        /// The member said so itself, stopping (SIGTERM) with its last epoch committed: it
        /// gave up its ownership lease first, so its key groups may move at once (no wait for
        /// a lease it might hold). Refused unless a majority of the voters stays alive after
        /// it: the last members of a cluster stopped whole keep their key groups.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stopped: bool,
    },
    /// A member leaves: its key groups move to the others (it takes none any more); once it
    /// owns nothing it is removed from the Raft group, then from the members.
    Leave {
        /// The member.
        id: NodeId,
    },
    /// A member left for good.
    Remove {
        /// The member.
        id: NodeId,
    },
    /// Key groups change owner, all or none (each must still be at the version given).
    Move {
        /// The moves.
        moves: Vec<MoveCommand>,
    },
    /// An epoch committed cluster-wide (the commit point of a cluster epoch).
    CommitEpoch {
        /// The epoch; must be newer than the last committed.
        epoch: u64,
    },
    /// An epoch committed through the control group itself: its bytes join the epoch log's
    /// tail, and the entry's commit is the epoch's commit point.
    LogEpoch {
        /// The epoch; must be newer than the last committed.
        epoch: u64,
        /// The epochs' generation (a leader's synchronisation) it was cut in: the one the
        /// last [`Command::Fence`] opened, or the epoch does not commit.
        gen: u64,
        /// What blob storage will receive (opaque here).
        bytes: EpochBytes,
    },
    /// A synchronisation of the epochs begins (generation `gen`, newer than the last): no
    /// epoch of an earlier generation commits after this entry, so once it has applied the
    /// leader knows every committed epoch — one proposed by a deposed leader, or before the
    /// synchronisation, that lands later is refused.
    Fence {
        /// The new generation.
        gen: u64,
        /// The leader that fences hands the epochs over (it stops leading them: its Raft
        /// leadership goes to another voter next) and says where it left them, so that the
        /// next leader can resume the participants live (see [`EpochHandoff`]). A fence
        /// without one forgets an earlier hand-over. (Older members ignore the field.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handoff: Option<EpochHandoff>,
    },
    /// The epochs' leader may number epochs up to `through`; a later leader numbers its own
    /// above the highest reservation (manifest puts to blob storage: a deposed leader's
    /// manifest that lands late is never in its successor's chain; see
    /// `epoch::EpochLeader::reserve_epochs`). Members of a build without it skip the entry.
    ReserveEpochs {
        /// The highest epoch number reserved.
        through: u64,
    },
    /// Blob storage holds every epoch up to `through` (an upload's manifest): the tail drops
    /// them.
    Uploaded {
        /// The newest epoch uploaded; committed, and newer than the last upload.
        through: u64,
    },
}

/// An epoch's bytes in the epoch log: shared (a state clone copies no bytes), base64 in JSON,
/// shown by their size.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochBytes(pub Arc<Vec<u8>>);

impl EpochBytes {
    /// Wraps `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        EpochBytes(Arc::new(bytes))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for EpochBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for EpochBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.bytes()))
    }
}

impl<'de> Deserialize<'de> for EpochBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(EpochBytes::new)
            .map_err(serde::de::Error::custom)
    }
}

/// The cluster's epoch log: committed epochs blob storage does not hold yet, oldest first.
/// It counts the bytes it holds as epochs come and go (the leader asks at every epoch and
/// every tick).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "TailForm")]
pub struct EpochTail {
    /// The newest epoch blob storage holds through an upload (0: none).
    pub uploaded: u64,
    /// The generation the last [`Command::Fence`] opened (0: none).
    pub gen: u64,
    /// Epoch → its bytes: every epoch logged after `uploaded`.
    epochs: BTreeMap<u64, EpochBytes>,
    /// The bytes of `epochs`.
    #[serde(skip)]
    size: u64,
}

/// [`EpochTail`] as it is stored (its byte count is recomputed on reading).
#[derive(Deserialize)]
struct TailForm {
    uploaded: u64,
    #[serde(default)]
    gen: u64,
    epochs: BTreeMap<u64, EpochBytes>,
}

impl From<TailForm> for EpochTail {
    fn from(f: TailForm) -> Self {
        let mut t = EpochTail {
            uploaded: f.uploaded,
            gen: f.gen,
            ..Default::default()
        };
        t.extend(f.epochs);
        t
    }
}

impl EpochTail {
    /// The bytes the tail holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its epochs, oldest first.
    pub fn epochs(&self) -> &BTreeMap<u64, EpochBytes> {
        &self.epochs
    }

    /// Adds (or replaces) an epoch.
    pub fn insert(&mut self, epoch: u64, bytes: EpochBytes) {
        self.size += bytes.0.len() as u64;
        if let Some(old) = self.epochs.insert(epoch, bytes) {
            self.size -= old.0.len() as u64;
        }
    }

    /// Adds epochs (a member's saved tail, at a restart).
    pub fn extend(&mut self, epochs: impl IntoIterator<Item = (u64, EpochBytes)>) {
        for (e, b) in epochs {
            self.insert(e, b);
        }
    }

    /// Drops the epochs up to `through` (uploaded).
    pub fn drop_through(&mut self, through: u64) {
        let kept = self.epochs.split_off(&(through + 1));
        let dropped = std::mem::replace(&mut self.epochs, kept);
        self.size -= dropped.values().map(|b| b.0.len() as u64).sum::<u64>();
    }

    /// Drops every epoch.
    pub fn clear(&mut self) {
        self.epochs.clear();
        self.size = 0;
    }
}

impl Command {
    /// The entry's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command serializes")
    }

    /// A command from an entry's bytes.
    pub fn decode(b: &[u8]) -> Result<Command, String> {
        serde_json::from_slice(b).map_err(|e| format!("control entry: {e}"))
    }
}

/// What applying an entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied.
    Applied,
    /// Not applied (the state is unchanged), and why: a stale version, an unknown member, an
    /// epoch not newer than the last, …
    Rejected(String),
    /// Already applied before (an index at or below the applied index, after a restart).
    Duplicate,
}

/// The Raft configuration as of the applied index (raft-rs's `ConfState`): kept with the state
/// machine, so that a member restarting from a state that lags its log starts from the
/// configuration of that state and re-applies the later changes in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftConf {
    /// Voters (the incoming ones during a joint configuration).
    pub voters: Vec<NodeId>,
    /// Learners.
    pub learners: Vec<NodeId>,
    /// The outgoing voters of a joint configuration (empty otherwise).
    pub voters_outgoing: Vec<NodeId>,
    /// Voters becoming learners when the joint configuration is left.
    pub learners_next: Vec<NodeId>,
    /// Whether raft-rs leaves the joint configuration by itself.
    pub auto_leave: bool,
}

impl RaftConf {
    /// Whether `id` is in the group in any role: a voter or a learner, or during a joint
    /// configuration an outgoing voter or a voter becoming a learner.
    pub fn lists(&self, id: NodeId) -> bool {
        [
            &self.voters,
            &self.learners,
            &self.voters_outgoing,
            &self.learners_next,
        ]
        .iter()
        .any(|l| l.contains(&id))
    }
}

/// Where a leader that hands the cluster's epochs over left them: it started no epoch after
/// `committed`, which every epoch it started before has reached, in generation `gen` with
/// these participants (id → incarnation), and it starts none again in that generation. A
/// next leader whose first synchronisation finds exactly these participants holding exactly
/// there, in that generation, resumes them live: nobody rolls back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHandoff {
    /// The generation the participants followed.
    pub gen: u64,
    /// The last epoch, committed.
    pub committed: u64,
    /// The participants, with their incarnations.
    pub participants: BTreeMap<NodeId, u64>,
}

/// The replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster's id, chosen by the node that bootstrapped it: a data directory or a peer
    /// of another cluster is refused by comparing it.
    #[serde(default)]
    pub cluster_id: String,
    /// The members by id.
    pub members: BTreeMap<NodeId, Member>,
    /// Ownership per key group (index = key group).
    pub table: Vec<Ownership>,
    /// Bumped by every applied change of the table.
    pub placement_version: u64,
    /// The newest epoch committed cluster-wide.
    pub committed_epoch: u64,
    /// The index of the last entry applied.
    pub applied_index: u64,
    /// The Raft configuration as of `applied_index` (`None`: the bootstrap configuration).
    #[serde(default)]
    pub conf: Option<RaftConf>,
    /// The blob location every member writes its checkpoints to (the bootstrapping node's;
    /// empty: checkpoints are off).
    #[serde(default)]
    pub checkpoint_url: String,
    /// The epoch log's tail: committed epochs blob storage does not hold yet.
    #[serde(default)]
    pub log: EpochTail,
    /// The epochs as the last fence's leader handed them over (see [`Command::Fence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<EpochHandoff>,
    /// The highest epoch number reserved by an epochs' leader (see
    /// [`Command::ReserveEpochs`]; 0: none).
    #[serde(default)]
    pub epochs_reserved: u64,
}

impl ClusterState {
    /// An empty cluster of `key_groups` unassigned key groups.
    pub fn new(key_groups: u32) -> Self {
        ClusterState {
            cluster_id: String::new(),
            members: BTreeMap::new(),
            table: vec![
                Ownership {
                    owner: None,
                    version: 0
                };
                key_groups as usize
            ],
            placement_version: 0,
            committed_epoch: 0,
            applied_index: 0,
            conf: None,
            checkpoint_url: String::new(),
            log: EpochTail::default(),
            handoff: None,
            epochs_reserved: 0,
        }
    }

    /// Records the Raft configuration a configuration change at `index` produced, and the
    /// members' roles from it.
    pub fn set_conf(&mut self, index: u64, conf: RaftConf) {
        self.applied_index = self.applied_index.max(index);
        for m in self.members.values_mut() {
            if conf.voters.contains(&m.id) {
                m.role = Role::Voter;
            } else if conf.learners.contains(&m.id) || conf.learners_next.contains(&m.id) {
                m.role = Role::Learner;
            }
        }
        self.conf = Some(conf);
    }

    /// The owner per key group.
    pub fn owners(&self) -> Vec<Option<NodeId>> {
        self.table.iter().map(|o| o.owner).collect()
    }

    /// The live members' ids.
    pub fn live_members(&self) -> Vec<NodeId> {
        self.members
            .values()
            .filter(|m| m.alive)
            .map(|m| m.id)
            .collect()
    }

    /// The members that take key groups: alive and not leaving.
    pub fn placement_members(&self) -> Vec<NodeId> {
        self.members
            .values()
            .filter(|m| m.alive && !m.leaving)
            .map(|m| m.id)
            .collect()
    }

    /// The next round of placement: at most `limit` moves towards rendezvous placement over
    /// the members that take key groups, each at the version it has now (see
    /// [`crate::placement::plan`]).
    pub fn plan_moves(&self, limit: usize) -> Vec<MoveCommand> {
        self.plan_moves_among(limit, &self.placement_members())
    }

    /// [`plan_moves`](Self::plan_moves) over `members` (those that take key groups, less the
    /// members that stop and are being drained).
    pub fn plan_moves_among(&self, limit: usize, members: &[NodeId]) -> Vec<MoveCommand> {
        crate::placement::plan(&self.owners(), members, limit)
            .into_iter()
            .map(|m| MoveCommand {
                kg: m.kg,
                to: m.to,
                version: self.table[m.kg as usize].version,
                // Not from a live member (a dead one, or none): a failover. (A member leaving
                // is alive: its key groups are handed over live.)
                orphan: !self.table[m.kg as usize]
                    .owner
                    .is_some_and(|o| self.members.get(&o).is_some_and(|x| x.alive)),
            })
            .collect()
    }

    /// The failover moves: every key group whose owner is dead (or gone) goes to the member
    /// rendezvous hashing picks among the members that take key groups *and* can take one now
    /// (`ready`: its control log has caught up). A key group whose wanted owner cannot take it
    /// yet (a member still starting) is served meanwhile by the next in its ranking, and moves
    /// on later by a live handover, instead of staying unserved until that member is ready.
    /// Only key groups with a dead owner move; unassigned ones follow `plan_moves`.
    pub fn plan_failover(&self, ready: &dyn Fn(NodeId) -> bool) -> Vec<MoveCommand> {
        let dead = |n: NodeId| !self.members.get(&n).is_some_and(|m| m.alive);
        let members: Vec<NodeId> = self
            .placement_members()
            .into_iter()
            .filter(|&m| ready(m))
            .collect();
        self.table
            .iter()
            .enumerate()
            .filter(|(_, o)| o.owner.is_some_and(dead))
            .filter_map(|(kg, o)| {
                let to = crate::placement::owner_of(kg as u32, &members)?;
                Some(MoveCommand {
                    kg: kg as u32,
                    to,
                    version: o.version,
                    orphan: true,
                })
            })
            .collect()
    }

    /// Why a part of member `from` that wrote key groups as their owner (`(key group,
    /// ownership version)`, the versions its table had) must be refused: a key group it does
    /// not own, or owns at another version (its table and this one disagree: a move it has not
    /// seen, or one this node has not applied yet). `None`: every write is the owner's.
    pub fn stale_write(&self, from: NodeId, owned: &[(u32, u64)]) -> Option<String> {
        owned.iter().find_map(|&(kg, version)| {
            let o = self.table.get(kg as usize)?;
            (o.owner != Some(from) || o.version != version).then(|| {
                format!(
                    "node {from} wrote key group {kg} as its owner at ownership version {version}, but {} owns it at version {}",
                    o.owner
                        .map_or("nobody".to_string(), |n| format!("node {n}")),
                    o.version
                )
            })
        })
    }

    /// How many key groups a member owns.
    pub fn owned_by(&self, id: NodeId) -> usize {
        self.table.iter().filter(|o| o.owner == Some(id)).count()
    }

    /// Applies the entry at `index` (entries must come in index order; an index at or below
    /// the applied one is a duplicate and changes nothing).
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Outcome {
        if index <= self.applied_index {
            return Outcome::Duplicate;
        }
        self.applied_index = index;
        match self.check(cmd) {
            Err(why) => Outcome::Rejected(why),
            Ok(()) => {
                self.change(cmd);
                Outcome::Applied
            }
        }
    }

    /// The live voters other than `id`, and the voters: a stop of `id` is taken only while
    /// the first is a majority of the second.
    pub fn voters_alive_without(&self, id: NodeId) -> (usize, usize) {
        let voters = self.conf.as_ref().map_or(&[][..], |c| &c.voters[..]);
        let alive = voters
            .iter()
            .filter(|&&v| v != id && self.members.get(&v).is_some_and(|m| m.alive))
            .count();
        (alive, voters.len())
    }

    fn check(&self, cmd: &Command) -> Result<(), String> {
        let member = |id: &NodeId| {
            self.members
                .get(id)
                .ok_or_else(|| format!("node {id} is not a member"))
        };
        match cmd {
            Command::Join { id, .. } if *id == 0 => Err("node id 0 is reserved".into()),
            // The same start's Join proposed again (its first proposal's outcome was not seen
            // in time): one generation per start.
            Command::Join {
                id, incarnation, ..
            } if *incarnation != 0
                && self
                    .members
                    .get(id)
                    .is_some_and(|m| m.incarnation == *incarnation) =>
            {
                Err(format!("node {id} already joined with this start"))
            }
            Command::Join {
                id, fresh: true, ..
            } if self.members.contains_key(id) => Err(format!(
                "node id {id} is already used by a member of this cluster (at {})",
                self.members[id].grpc_addr
            )),
            Command::Join { .. } => Ok(()),
            Command::SetRole { id, .. } | Command::Remove { id } => member(id).map(|_| ()),
            Command::Leave { id } => {
                let m = member(id)?;
                if !m.alive {
                    return Err(format!("node {id} is dead: it cannot leave"));
                }
                if self.placement_members() == [*id] {
                    return Err(format!(
                        "node {id} is the only member that can own key groups: it cannot leave (stop it instead)"
                    ));
                }
                Ok(())
            }
            Command::MarkDead {
                id,
                generation,
                stopped,
            } => {
                let m = member(id)?;
                if m.generation != *generation {
                    return Err(format!(
                        "node {id} is at generation {}, not {generation}",
                        m.generation
                    ));
                }
                if *stopped && m.alive {
                    let (alive_after, voters) = self.voters_alive_without(*id);
                    if alive_after <= voters / 2 {
                        return Err(format!(
                            "node {id} stops: only {alive_after} of {voters} voters would stay alive (the cluster is stopping; its key groups stay where they are)"
                        ));
                    }
                }
                Ok(())
            }
            Command::Move { moves } if moves.is_empty() => Err("no key group to move".into()),
            Command::Move { moves } => {
                let mut seen = std::collections::BTreeSet::new();
                for m in moves {
                    let Some(cur) = self.table.get(m.kg as usize) else {
                        return Err(format!("key group {} does not exist", m.kg));
                    };
                    if !seen.insert(m.kg) {
                        return Err(format!("key group {} moves twice", m.kg));
                    }
                    if cur.version != m.version {
                        return Err(format!(
                            "key group {} is at version {}, not {}",
                            m.kg, cur.version, m.version
                        ));
                    }
                    match self.members.get(&m.to) {
                        Some(t) if t.alive && !t.leaving => {}
                        Some(t) if t.alive => {
                            return Err(format!("node {} is leaving the cluster", m.to))
                        }
                        _ => return Err(format!("node {} is not a live member", m.to)),
                    }
                    if let Some(o) = cur.owner.filter(|_| m.orphan) {
                        if self.members.get(&o).is_some_and(|x| x.alive) {
                            return Err(format!(
                                "key group {}'s owner node {o} is alive again: its failover move is stale",
                                m.kg
                            ));
                        }
                    }
                }
                Ok(())
            }
            Command::CommitEpoch { epoch } if *epoch <= self.committed_epoch => Err(format!(
                "epoch {epoch} is not newer than the committed epoch {}",
                self.committed_epoch
            )),
            Command::CommitEpoch { .. } => Ok(()),
            Command::LogEpoch { epoch, .. } if *epoch <= self.committed_epoch => Err(format!(
                "epoch {epoch} is not newer than the committed epoch {}",
                self.committed_epoch
            )),
            Command::LogEpoch { epoch, gen, .. } if *gen != self.log.gen => Err(format!(
                "epoch {epoch} was cut in generation {gen}, not in the fenced one ({})",
                self.log.gen
            )),
            Command::LogEpoch { .. } => Ok(()),
            Command::Fence { gen, .. } if *gen <= self.log.gen => Err(format!(
                "generation {gen} is not newer than the fenced one ({})",
                self.log.gen
            )),
            Command::Fence { .. } => Ok(()),
            Command::ReserveEpochs { .. } => Ok(()),
            Command::Uploaded { through } if *through > self.committed_epoch => Err(format!(
                "epoch {through} is not committed (the committed epoch is {})",
                self.committed_epoch
            )),
            Command::Uploaded { through } if *through <= self.log.uploaded => Err(format!(
                "epoch {through} is not newer than the last upload ({})",
                self.log.uploaded
            )),
            Command::Uploaded { .. } => Ok(()),
        }
    }

    fn change(&mut self, cmd: &Command) {
        match cmd {
            Command::Join {
                id,
                grpc_addr,
                http_addr,
                role,
                incarnation,
                ..
            } => {
                let generation = self.members.get(id).map_or(1, |m| m.generation + 1);
                // A member that restarts while it leaves goes on leaving.
                let leaving = self.members.get(id).is_some_and(|m| m.leaving);
                // The Raft configuration decides the role of a node it already lists.
                let role = match &self.conf {
                    Some(c) if c.voters.contains(id) => &Role::Voter,
                    Some(c) if c.learners.contains(id) || c.learners_next.contains(id) => {
                        &Role::Learner
                    }
                    _ => role,
                };
                self.members.insert(
                    *id,
                    Member {
                        id: *id,
                        generation,
                        grpc_addr: grpc_addr.clone(),
                        http_addr: http_addr.clone(),
                        role: *role,
                        alive: true,
                        leaving,
                        incarnation: *incarnation,
                    },
                );
            }
            Command::SetRole { id, role } => {
                if let Some(m) = self.members.get_mut(id) {
                    m.role = *role;
                }
            }
            Command::MarkDead { id, .. } => {
                if let Some(m) = self.members.get_mut(id) {
                    m.alive = false;
                }
            }
            Command::Remove { id } => {
                self.members.remove(id);
            }
            Command::Leave { id } => {
                if let Some(m) = self.members.get_mut(id) {
                    m.leaving = true;
                }
            }
            Command::Move { moves } => {
                for m in moves {
                    let o = &mut self.table[m.kg as usize];
                    o.owner = Some(m.to);
                    o.version += 1;
                }
                self.placement_version += 1;
            }
            Command::CommitEpoch { epoch } => self.committed_epoch = *epoch,
            Command::Fence { gen, handoff } => {
                self.log.gen = *gen;
                self.handoff = handoff.clone();
            }
            Command::LogEpoch { epoch, bytes, .. } => {
                self.committed_epoch = *epoch;
                self.log.insert(*epoch, bytes.clone());
            }
            Command::ReserveEpochs { through } => {
                self.epochs_reserved = self.epochs_reserved.max(*through);
            }
            Command::Uploaded { through } => {
                self.log.drop_through(*through);
                self.log.uploaded = *through;
            }
        }
    }

    /// The snapshot's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the cluster state serializes")
    }

    /// The state's bytes without the epoch log's epochs (its `uploaded` mark stays): what a
    /// member saves after each step, beside the epochs it saves one by one.
    pub fn encode_without_log(&self) -> Vec<u8> {
        if self.log.epochs().is_empty() {
            return self.encode();
        }
        let mut s = self.clone();
        s.log.clear();
        s.encode()
    }

    /// A state from a snapshot's bytes.
    pub fn decode(b: &[u8]) -> Result<ClusterState, String> {
        serde_json::from_slice(b).map_err(|e| format!("control snapshot: {e}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_epoch_log_holds_committed_epochs_until_an_upload_covers_them() {
        use super::{ClusterState, Command, EpochBytes, Outcome};
        let mut s = ClusterState::new(4);
        let log = |e: u64, b: &[u8]| Command::LogEpoch {
            epoch: e,
            gen: 7,
            bytes: EpochBytes::new(b.to_vec()),
        };
        // Nothing is logged before a generation is fenced.
        assert!(
            matches!(s.apply(1, &log(3, b"three")), Outcome::Rejected(ref w) if w.contains("not in the fenced one"))
        );
        assert_eq!(
            s.apply(
                2,
                &Command::Fence {
                    gen: 7,
                    handoff: None
                }
            ),
            Outcome::Applied
        );
        assert_eq!(s.apply(3, &log(3, b"three")), Outcome::Applied);
        assert_eq!(s.apply(4, &log(5, &[0, 255, 7])), Outcome::Applied);
        assert_eq!(s.committed_epoch, 5);
        assert!(
            matches!(s.apply(5, &log(5, b"again")), Outcome::Rejected(ref w) if w.contains("not newer"))
        );
        assert!(
            matches!(s.apply(6, &Command::Uploaded { through: 6 }), Outcome::Rejected(ref w) if w.contains("not committed"))
        );
        // A snapshot carries the tail, bytes and all; the state saved beside it does not.
        let back = ClusterState::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.log.epochs()[&5].bytes(), &[0, 255, 7]);
        assert_eq!(s.log.size(), 8);
        assert_eq!(
            back.log.size(),
            8,
            "the byte count is recomputed on reading"
        );
        let lean = ClusterState::decode(&s.encode_without_log()).unwrap();
        assert!(lean.log.epochs().is_empty());
        assert_eq!(lean.log.size(), 0);
        // Counted as epochs are replaced, added and dropped.
        let mut t = back.log.clone();
        t.insert(5, EpochBytes::new(vec![1; 10]));
        t.extend([(6, EpochBytes::new(vec![2; 4]))]);
        assert_eq!(t.size(), 5 + 10 + 4);
        t.drop_through(5);
        assert_eq!(t.size(), 4);
        t.clear();
        assert_eq!(t.size(), 0);
        assert_eq!(
            format!("{:?}", log(9, b"abc")),
            "LogEpoch { epoch: 9, gen: 7, bytes: <3 bytes> }"
        );
        // An upload through 3 drops 3; one through 5 the rest; an older one is refused.
        assert_eq!(
            s.apply(7, &Command::Uploaded { through: 3 }),
            Outcome::Applied
        );
        assert_eq!(s.log.epochs().keys().copied().collect::<Vec<_>>(), vec![5]);
        assert_eq!(s.log.size(), 3);
        assert_eq!(
            s.apply(8, &Command::Uploaded { through: 5 }),
            Outcome::Applied
        );
        assert!(s.log.epochs().is_empty() && s.log.uploaded == 5 && s.log.size() == 0);
        assert!(
            matches!(s.apply(9, &Command::Uploaded { through: 4 }), Outcome::Rejected(ref w) if w.contains("not newer than the last upload"))
        );
        // A new generation fences the old one: its epochs landing late do not commit.
        assert_eq!(
            s.apply(
                10,
                &Command::Fence {
                    gen: 9,
                    handoff: None
                }
            ),
            Outcome::Applied
        );
        assert!(
            matches!(s.apply(11, &log(6, b"late")), Outcome::Rejected(ref w) if w.contains("cut in generation 7"))
        );
        assert!(
            matches!(s.apply(12, &Command::Fence { gen: 9, handoff: None }), Outcome::Rejected(ref w) if w.contains("not newer than the fenced"))
        );
        assert_eq!((s.committed_epoch, s.applied_index), (5, 12));
        // Reservations of epoch numbers only grow; a state without one reads as none.
        for (i, (through, now)) in [(70_000, 70_000), (60_000, 70_000), (90_000, 90_000)]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                s.apply(13 + i as u64, &Command::ReserveEpochs { through }),
                Outcome::Applied
            );
            assert_eq!(s.epochs_reserved, now);
        }
        let mut old: serde_json::Value = serde_json::from_slice(&s.encode()).unwrap();
        old.as_object_mut().unwrap().remove("epochs_reserved");
        let old = ClusterState::decode(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(old.epochs_reserved, 0);
    }

    #[test]
    fn a_write_by_a_node_that_does_not_own_the_key_group_at_that_version_is_stale() {
        let mut s = ClusterState::new(4);
        for (i, id) in [1, 2].into_iter().enumerate() {
            s.apply(
                1 + i as u64,
                &Command::Join {
                    id,
                    grpc_addr: String::new(),
                    http_addr: String::new(),
                    role: Role::Voter,
                    incarnation: 0,
                    fresh: false,
                },
            );
        }
        let mv = |kg, to, version| MoveCommand {
            kg,
            to,
            version,
            orphan: false,
        };
        s.apply(
            3,
            &Command::Move {
                moves: vec![mv(0, 1, 0), mv(1, 2, 0)],
            },
        );
        assert_eq!(s.stale_write(1, &[(0, 1)]), None);
        assert_eq!(s.stale_write(2, &[(1, 1)]), None);
        assert_eq!(s.stale_write(1, &[]), None);
        // Another owner's key group.
        let w = s.stale_write(1, &[(0, 1), (1, 1)]).expect("stale");
        assert!(
            w.contains("key group 1") && w.contains("node 2 owns it"),
            "{w}"
        );
        // The key group moved on: the old owner's version is stale.
        s.apply(
            4,
            &Command::Move {
                moves: vec![mv(0, 2, 1)],
            },
        );
        let w = s.stale_write(1, &[(0, 1)]).expect("stale");
        assert!(
            w.contains("version 1") && w.contains("node 2 owns it at version 2"),
            "{w}"
        );
        // The new owner at an older version (its table was behind when it cut) too.
        assert!(s.stale_write(2, &[(0, 1)]).is_some());
        assert_eq!(s.stale_write(2, &[(0, 2)]), None);
        // Unassigned.
        assert!(s.stale_write(1, &[(3, 0)]).unwrap().contains("nobody"));
    }

    use super::*;

    fn join(id: NodeId) -> Command {
        Command::Join {
            id,
            grpc_addr: format!("127.0.0.1:{}", 9000 + id),
            http_addr: format!("127.0.0.1:{}", 8000 + id),
            role: Role::Voter,
            incarnation: id,
            fresh: false,
        }
    }

    #[test]
    fn a_failover_move_is_refused_once_the_dead_owner_is_alive_again() {
        let mut s = ClusterState::new(2);
        s.apply(1, &join(1));
        s.apply(2, &join(2));
        let mv = |kg, to, version, orphan| MoveCommand {
            kg,
            to,
            version,
            orphan,
        };
        s.apply(
            3,
            &Command::Move {
                moves: vec![mv(0, 1, 0, true), mv(1, 1, 0, true)],
            },
        );
        s.apply(
            4,
            &Command::MarkDead {
                id: 1,
                generation: 1,
                stopped: false,
            },
        );
        // Planned while node 1 is dead: a failover.
        let plan = s.plan_moves(2);
        assert!(plan.iter().all(|m| m.orphan && m.to == 2), "{plan:?}");
        // Node 1 rejoins before the move applies: refused, it keeps its key groups.
        let mut rejoin = join(1);
        if let Command::Join { incarnation, .. } = &mut rejoin {
            *incarnation = 42;
        }
        s.apply(5, &rejoin);
        let r = s.apply(
            6,
            &Command::Move {
                moves: plan.clone(),
            },
        );
        assert!(
            matches!(r, Outcome::Rejected(ref w) if w.contains("alive again")),
            "{r:?}"
        );
        assert_eq!(s.owned_by(1), 2);
        // Dead again: the same plan applies.
        s.apply(
            7,
            &Command::MarkDead {
                id: 1,
                generation: 2,
                stopped: false,
            },
        );
        assert_eq!(s.apply(8, &Command::Move { moves: plan }), Outcome::Applied);
        assert_eq!(s.owned_by(2), 2);
        // A move between live owners is not a failover.
        assert!(s.plan_moves(2).is_empty());
        s.apply(9, &rejoin_with(1, 43));
        assert!(s.plan_moves(2).iter().all(|m| !m.orphan));
    }

    #[test]
    fn a_dead_members_key_groups_go_to_ready_members_only_and_move_on_later() {
        let mut s = ClusterState::new(64);
        for (i, id) in [1, 2, 3].into_iter().enumerate() {
            s.apply(i as u64 + 1, &join(id));
        }
        let n = s.applied_index + 1;
        let moves = s.plan_moves(64);
        s.apply(n, &Command::Move { moves });
        let n = s.applied_index + 1;
        s.apply(
            n,
            &Command::MarkDead {
                id: 1,
                generation: 1,
                stopped: false,
            },
        );
        let of_1: Vec<u32> = (0..64)
            .filter(|&kg| s.table[kg as usize].owner == Some(1))
            .collect();
        assert!(!of_1.is_empty());
        // Everyone ready: the rendezvous owners over the live members, as `plan_moves` has.
        let all = s.plan_failover(&|_| true);
        let mut planned = s.plan_moves(64);
        planned.retain(|m| m.orphan);
        assert_eq!(all, planned);
        // Node 3 not caught up: all of node 1's key groups go to node 2, none waits.
        let plan = s.plan_failover(&|n| n != 3);
        assert_eq!(plan.iter().map(|m| m.kg).collect::<Vec<_>>(), of_1);
        assert!(plan.iter().all(|m| m.to == 2 && m.orphan), "{plan:?}");
        let n = s.applied_index + 1;
        assert_eq!(s.apply(n, &Command::Move { moves: plan }), Outcome::Applied);
        assert!(s.plan_failover(&|_| true).is_empty());
        // Later, the ones node 3 should own move to it as live handovers (not failovers).
        let later = s.plan_moves(64);
        assert!(!later.is_empty());
        assert!(later.iter().all(|m| m.to == 3 && !m.orphan), "{later:?}");
        // Nobody ready: nothing planned.
        let mut s2 = s.clone();
        let n = s2.applied_index + 1;
        s2.apply(
            n,
            &Command::MarkDead {
                id: 2,
                generation: 1,
                stopped: false,
            },
        );
        assert!(s2.plan_failover(&|_| false).is_empty());
    }

    fn rejoin_with(id: NodeId, incarnation: u64) -> Command {
        let mut c = join(id);
        if let Command::Join { incarnation: i, .. } = &mut c {
            *i = incarnation;
        }
        c
    }

    #[test]
    fn members_generations_moves_and_epochs() {
        let mut s = ClusterState::new(4);
        assert_eq!(s.apply(1, &join(1)), Outcome::Applied);
        assert_eq!(s.apply(2, &join(2)), Outcome::Applied);
        assert_eq!(s.members[&1].generation, 1);
        let mv = |kg, to, version| MoveCommand {
            kg,
            to,
            version,
            orphan: false,
        };
        assert_eq!(
            s.apply(
                3,
                &Command::Move {
                    moves: vec![mv(0, 1, 0), mv(1, 2, 0)]
                }
            ),
            Outcome::Applied
        );
        assert_eq!(
            s.table[0],
            Ownership {
                owner: Some(1),
                version: 1
            }
        );
        // A move proposed against an older version is refused, all or nothing.
        let r = s.apply(
            4,
            &Command::Move {
                moves: vec![mv(2, 1, 0), mv(0, 2, 0)],
            },
        );
        assert!(
            matches!(r, Outcome::Rejected(ref w) if w.contains("key group 0 is at version 1")),
            "{r:?}"
        );
        assert_eq!(s.table[2].owner, None);
        assert_eq!(s.placement_version, 1);
        // The same start's join again changes nothing; a new start bumps the generation; a
        // stale death is refused.
        assert!(
            matches!(s.apply(5, &join(1)), Outcome::Rejected(ref w) if w.contains("already joined"))
        );
        let mut rejoin = join(1);
        if let Command::Join { incarnation, .. } = &mut rejoin {
            *incarnation = 99;
        }
        assert_eq!(s.apply(6, &rejoin), Outcome::Applied);
        // A new node given a member's id is refused when its entry applies.
        let mut twin = join(2);
        if let Command::Join {
            incarnation, fresh, ..
        } = &mut twin
        {
            *incarnation = 77;
            *fresh = true;
        }
        let before = s.members[&2].clone();
        assert!(
            matches!(s.apply(7, &twin), Outcome::Rejected(ref w) if w.contains("already used"))
        );
        assert_eq!(s.members[&2], before);
        assert_eq!(s.members[&1].generation, 2);
        assert!(matches!(
            s.apply(
                8,
                &Command::MarkDead {
                    id: 1,
                    generation: 1,
                    stopped: false,
                }
            ),
            Outcome::Rejected(_)
        ));
        assert_eq!(
            s.apply(
                9,
                &Command::MarkDead {
                    id: 1,
                    generation: 2,
                    stopped: false,
                }
            ),
            Outcome::Applied
        );
        assert!(matches!(
            s.apply(10, &Command::Move { moves: vec![mv(3, 1, 0)] }),
            Outcome::Rejected(ref w) if w.contains("not a live member")
        ));
        assert!(matches!(
            ClusterState::new(1).apply(1, &Command::Move { moves: vec![] }),
            Outcome::Rejected(_)
        ));
        // Epochs only move forward.
        assert_eq!(
            s.apply(11, &Command::CommitEpoch { epoch: 5 }),
            Outcome::Applied
        );
        assert!(matches!(
            s.apply(12, &Command::CommitEpoch { epoch: 5 }),
            Outcome::Rejected(_)
        ));
        // Replayed entries are duplicates; the snapshot carries the applied index.
        assert_eq!(
            s.apply(11, &Command::CommitEpoch { epoch: 6 }),
            Outcome::Duplicate
        );
        let back = ClusterState::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.applied_index, 12);
        assert_eq!(Command::decode(&join(3).encode()).unwrap(), join(3));
        assert!(Command::decode(b"{}").is_err());
    }
}
