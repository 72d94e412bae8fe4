//! The control group under a deterministic, seeded simulation: 3 and 5 members on a network
//! that delays, reorders and drops messages, partitions (also one-way) and heals, while any
//! member — the leader included — crashes and restarts from its durable part (the Raft log
//! and hard state, and a state machine persisted at some applied index that may lag). A
//! workload of joins, deaths, rejoins, key-group moves (from the leader's placement plan, and
//! deliberately stale ones) and epoch commits runs throughout. The 5-member cluster has 3
//! voters and 2 learners, and the leader keeps swapping a learner for a voter through a joint
//! configuration (ConfChangeV2) that it leaves explicitly.
//!
//! Checked after every step:
//! - the state machine agrees: every member that has applied index `i` holds exactly the same
//!   state (so one owner per key group and version, and no committed epoch lost or reversed);
//! - every entry and its outcome agree across members;
//! - applied ≤ committed on every member, and a restart never finds applied > committed;
//! - at most one leader per term;
//! - ownership versions only grow, and a stale move is always rejected;
//! - the Raft configuration (part of the state) agrees too, and a restart from a lagging
//!   state starts from that state's configuration.
//!
//! And at the end, after healing: every member catches up, the configuration leaves any joint
//! state with 3 voters, and a new epoch commits (liveness).
//!
//! `SIM_SEED=<n>` runs one schedule; `SIM_SEEDS=<n>` sets how many (default 1000 per size).
//! The failing seed is printed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use raft::storage::MemStorage;
use statemesh_mesh::control::{
    ClusterState, Command, EpochBytes, EpochHandoff, MoveCommand, Outcome, Role,
};
use statemesh_mesh::group::{bootstrap, ControlNode, Timing};
use statemesh_mesh::placement::NodeId;
use statemesh_mesh::sim::Rng;

const KEY_GROUPS: u32 = 64;

struct Replica {
    node: Option<ControlNode>,
    /// The durable log and hard state (kept across a crash).
    storage: MemStorage,
    /// The durable state machine (persisted now and then: it may lag the applied index).
    durable: ClusterState,
}

struct Sim {
    rng: Rng,
    seed: u64,
    ids: Vec<NodeId>,
    replicas: Vec<Replica>,
    now: u64,
    seq: u64,
    net: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: HashMap<u64, (usize, usize, Vec<u8>)>,
    /// Links cut: (from, to).
    cut: BTreeSet<(usize, usize)>,
    cut_until: u64,
    drop_per_mille: u64,
    /// Per applied index: the state's bytes (the oracle every member must match).
    states: HashMap<u64, Vec<u8>>,
    /// Per entry index: the command and outcome applied.
    entries: HashMap<u64, (Command, Outcome)>,
    leaders: HashMap<u64, NodeId>,
    versions: Vec<u64>,
    /// Per replica: the applied index whose state was last checked.
    replicas_checked: Vec<u64>,
    stale_moves: usize,
    stale_rejected: usize,
    /// Voter/learner swaps proposed.
    swaps: usize,
    /// Moves proposed against a replaced version (encoded): never to be applied.
    stale: std::collections::HashSet<Vec<u8>>,
    crashes: usize,
}

impl Sim {
    fn new(seed: u64, members: usize) -> Sim {
        let ids: Vec<NodeId> = (1..=members as u64).collect();
        let (voters, learners) = ids.split_at(ids.len().min(3));
        let replicas = ids
            .iter()
            .map(|&id| {
                let (storage, durable) = bootstrap(voters, learners, KEY_GROUPS);
                Replica {
                    node: Some(
                        ControlNode::new(id, storage.clone(), durable.clone(), Timing::default())
                            .unwrap(),
                    ),
                    storage,
                    durable,
                }
            })
            .collect();
        let mut rng = Rng(seed | 1);
        let drop_per_mille = rng.below(60);
        Sim {
            rng,
            seed,
            ids,
            replicas,
            now: 0,
            seq: 0,
            net: BinaryHeap::new(),
            in_flight: HashMap::new(),
            cut: BTreeSet::new(),
            cut_until: 0,
            drop_per_mille,
            states: HashMap::new(),
            entries: HashMap::new(),
            leaders: HashMap::new(),
            versions: vec![0; KEY_GROUPS as usize],
            replicas_checked: vec![u64::MAX; members],
            stale_moves: 0,
            stale_rejected: 0,
            swaps: 0,
            stale: Default::default(),
            crashes: 0,
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} (SIM_SEED={} reproduces it), step {}: {what}",
            self.seed, self.seed, self.now
        )
    }

    fn idx(&self, id: NodeId) -> usize {
        (id - 1) as usize
    }

    fn leader(&self) -> Option<usize> {
        // The live leader with the highest term (a deposed one may not know yet).
        self.replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.node
                    .as_ref()
                    .filter(|n| n.is_leader())
                    .map(|n| (n.term(), i))
            })
            .max()
            .map(|(_, i)| i)
    }

    fn send(&mut self, from: usize, to: usize, bytes: Vec<u8>, chaos: bool) {
        let delay = if chaos { 1 + self.rng.below(5) } else { 1 };
        self.seq += 1;
        self.net.push(Reverse((self.now + delay, self.seq)));
        self.in_flight.insert(self.seq, (from, to, bytes));
    }

    fn deliver(&mut self, chaos: bool) {
        while let Some(Reverse((at, seq))) = self.net.peek().copied() {
            if at > self.now {
                break;
            }
            self.net.pop();
            let (from, to, bytes) = self.in_flight.remove(&seq).unwrap();
            if self.cut.contains(&(from, to)) || (chaos && self.rng.chance(self.drop_per_mille)) {
                continue;
            }
            if let Some(n) = self.replicas[to].node.as_mut() {
                // Errors (a message from an older configuration, say) leave the node as it was.
                let _ = n.step(&bytes);
            }
        }
    }

    /// Runs every live member's ready and checks the invariants.
    fn process(&mut self, chaos: bool) {
        for i in 0..self.replicas.len() {
            let Some(node) = self.replicas[i].node.as_mut() else {
                continue;
            };
            let out = match node.process() {
                Ok(o) => o,
                Err(e) => panic!(
                    "seed {}: node {} cannot write its log: {e}",
                    self.seed,
                    i + 1
                ),
            };
            let changed =
                !out.applied.is_empty() || node.state().applied_index != self.replicas_checked[i];
            let (applied, committed, term, leader) = (
                node.state().applied_index,
                node.committed(),
                node.term(),
                node.is_leader(),
            );
            let state = if changed || !chaos {
                Some(node.state().clone())
            } else {
                None
            };
            for (index, cmd, outcome) in out.applied {
                match self.entries.get(&index) {
                    Some((c, o)) if (c, o) != (&cmd, &outcome) => self.fail(format!(
                        "entry {index}: node {} applied {cmd:?} → {outcome:?}, another node {c:?} → {o:?}",
                        i + 1
                    )),
                    Some(_) => {}
                    None => {
                        if self.stale.contains(&cmd.encode()) {
                            if outcome == Outcome::Applied {
                                self.fail(format!("a stale move was applied at {index}: {cmd:?}"));
                            }
                            self.stale_rejected += 1;
                        }
                        self.entries.insert(index, (cmd, outcome));
                    }
                }
            }
            if applied > committed {
                self.fail(format!(
                    "node {}: applied {applied} > committed {committed}",
                    i + 1
                ));
            }
            if leader {
                if let Some(other) = self.leaders.insert(term, (i + 1) as NodeId) {
                    if other != (i + 1) as NodeId {
                        self.fail(format!("two leaders in term {term}: {other} and {}", i + 1));
                    }
                }
            }
            if let Some(state) = state {
                self.replicas_checked[i] = applied;
                let bytes = state.encode();
                match self.states.get(&applied) {
                Some(b) if *b != bytes => self.fail(format!(
                    "node {} at applied index {applied} holds another state than a node before it:\n{}\nvs\n{}",
                    i + 1,
                    String::from_utf8_lossy(&bytes),
                    String::from_utf8_lossy(b)
                )),
                Some(_) => {}
                None => {
                    self.states.insert(applied, bytes);
                }
            }
                for (kg, o) in state.table.iter().enumerate() {
                    self.versions[kg] = self.versions[kg].max(o.version);
                }
                // The state machine is persisted now and then (so it may lag after a crash).
                if !chaos || self.rng.chance(500) {
                    self.replicas[i].durable = state;
                }
            }
            for (to, bytes) in out.messages {
                let to = self.idx(to);
                self.send(i, to, bytes, chaos);
            }
        }
    }

    /// A command for the leader to propose, from what it knows.
    fn command(&mut self, state: &ClusterState) -> Command {
        let id = self.ids[self.rng.below(self.ids.len() as u64) as usize];
        match self.rng.below(10) {
            0..=2 => Command::Join {
                id,
                grpc_addr: format!("127.0.0.1:{}", 9000 + id),
                http_addr: format!("127.0.0.1:{}", 8000 + id),
                role: Role::Voter,
                incarnation: self.rng.below(1 << 20),
                fresh: false,
            },
            3 => match state.members.get(&id) {
                Some(m) => Command::MarkDead {
                    id,
                    generation: m.generation,
                    stopped: false,
                },
                None => Command::CommitEpoch {
                    epoch: state.committed_epoch + 1,
                },
            },
            4..=6 => Command::Move {
                moves: state.plan_moves(1 + self.rng.below(16) as usize),
            },
            7 => {
                // A move against a version already replaced: must be rejected.
                let kg = self.rng.below(KEY_GROUPS as u64) as u32;
                let v = state.table[kg as usize].version;
                if v == 0 {
                    return Command::CommitEpoch {
                        epoch: state.committed_epoch + 1,
                    };
                }
                self.stale_moves += 1;
                let cmd = Command::Move {
                    moves: vec![MoveCommand {
                        kg,
                        to: id,
                        version: v - 1,
                        orphan: false,
                    }],
                };
                self.stale.insert(cmd.encode());
                cmd
            }
            8 => {
                // An epoch through the epoch log (its bytes name it), mostly in the fenced
                // generation; a new generation now and then.
                let epoch = state.committed_epoch + 1;
                let mut bytes = epoch.to_be_bytes().to_vec();
                bytes.extend((0..self.rng.below(40)).map(|i| i as u8));
                match self.rng.below(8) {
                    0 => Command::Fence {
                        gen: state.log.gen + self.rng.below(2),
                        // Now and then a leader's hand-over rides along (replicas and
                        // snapshots must agree on it too).
                        handoff: (self.rng.below(2) == 0).then(|| EpochHandoff {
                            gen: state.log.gen,
                            committed: state.committed_epoch,
                            participants: [(1, 7), (2, 9)].into_iter().collect(),
                        }),
                    },
                    // A reservation of epoch numbers (one below the last now and then).
                    7 => Command::ReserveEpochs {
                        through: (state.epochs_reserved + self.rng.below(1 << 17))
                            .saturating_sub(1 << 15),
                    },
                    1 => Command::LogEpoch {
                        epoch,
                        gen: state.log.gen.saturating_sub(1),
                        bytes: EpochBytes::new(bytes),
                    },
                    _ => Command::LogEpoch {
                        epoch,
                        gen: state.log.gen,
                        bytes: EpochBytes::new(bytes),
                    },
                }
            }
            9 if self.rng.below(3) == 0 => {
                // An upload through some logged epoch (or a stale one: rejected).
                let logged: Vec<u64> = state.log.epochs().keys().copied().collect();
                let through = if logged.is_empty() || self.rng.below(5) == 0 {
                    state.log.uploaded
                } else {
                    logged[self.rng.below(logged.len() as u64) as usize]
                };
                Command::Uploaded { through }
            }
            _ => Command::CommitEpoch {
                epoch: state.committed_epoch + 1,
            },
        }
    }

    fn chaos_step(&mut self) {
        self.now += 1;
        for i in 0..self.replicas.len() {
            if self.rng.chance(900) {
                if let Some(n) = self.replicas[i].node.as_mut() {
                    n.tick();
                }
            }
        }
        self.deliver(true);
        // Proposals reach the leader (a follower forwards to it).
        if self.rng.chance(300) {
            if let Some(l) = self.leader() {
                let state = self.replicas[l].node.as_ref().unwrap().state().clone();
                let cmd = self.command(&state);
                let _ = self.replicas[l].node.as_mut().unwrap().propose(&cmd);
            }
        }
        // Membership churn (with learners): swap a learner and a voter that is not the leader
        // through a joint configuration, and leave it explicitly.
        if self.replicas.len() > 3 && self.rng.chance(20) {
            if let Some(l) = self.leader() {
                let node = self.replicas[l].node.as_mut().unwrap();
                if node.in_joint() {
                    let _ = node.propose_leave_joint();
                } else {
                    let cs = node.conf_state();
                    let me = node.id();
                    let voters: Vec<NodeId> = cs
                        .get_voters()
                        .iter()
                        .copied()
                        .filter(|v| *v != me)
                        .collect();
                    let learners = cs.get_learners().to_vec();
                    if !voters.is_empty() && !learners.is_empty() {
                        let v = voters[self.rng.below(voters.len() as u64) as usize];
                        let lr = learners[self.rng.below(learners.len() as u64) as usize];
                        let node = self.replicas[l].node.as_mut().unwrap();
                        if node
                            .propose_membership(&[
                                (lr, Some(Role::Voter)),
                                (v, Some(Role::Learner)),
                            ])
                            .is_ok()
                        {
                            self.swaps += 1;
                        }
                    }
                }
            }
        }
        // Garbage from a peer is refused and changes nothing.
        if self.rng.chance(5) {
            let i = self.rng.below(self.replicas.len() as u64) as usize;
            if let Some(n) = self.replicas[i].node.as_mut() {
                if n.step(b"\xff\x00garbage").is_ok() {
                    self.fail("a garbage message was accepted".into());
                }
            }
        }
        // Crash any member (the leader more often), restart crashed ones.
        let live = self.replicas.iter().filter(|r| r.node.is_some()).count();
        if self.rng.chance(8) && live > 1 {
            let victim = match self.leader() {
                Some(l) if self.rng.chance(500) => l,
                _ => self.rng.below(self.replicas.len() as u64) as usize,
            };
            if self.replicas[victim].node.take().is_some() {
                self.crashes += 1;
            }
        }
        for i in 0..self.replicas.len() {
            if self.replicas[i].node.is_none() && self.rng.chance(20) {
                self.restart(i);
            }
        }
        // Partitions, one-way ones included, and heal.
        if self.now >= self.cut_until && !self.cut.is_empty() {
            self.cut.clear();
        }
        if self.cut.is_empty() && self.rng.chance(10) {
            let n = self.replicas.len();
            let side: Vec<bool> = (0..n).map(|_| self.rng.chance(500)).collect();
            let one_way = self.rng.chance(300);
            for a in 0..n {
                for b in 0..n {
                    if side[a] != side[b] && (!one_way || side[a]) {
                        self.cut.insert((a, b));
                    }
                }
            }
            self.cut_until = self.now + 20 + self.rng.below(200);
        }
        self.process(true);
    }

    fn restart(&mut self, i: usize) {
        let r = &self.replicas[i];
        match ControlNode::new(
            (i + 1) as NodeId,
            r.storage.clone(),
            r.durable.clone(),
            Timing::default(),
        ) {
            Ok(n) => self.replicas[i].node = Some(n),
            Err(e) => self.fail(format!("node {} cannot restart: {e}", i + 1)),
        }
    }

    /// Heals everything and checks that the group makes progress again.
    fn heal_and_check_liveness(&mut self) {
        self.cut.clear();
        for i in 0..self.replicas.len() {
            if self.replicas[i].node.is_none() {
                self.restart(i);
            }
        }
        let mut target: Option<u64> = None;
        for step in 0..3000 {
            // A proposal can be lost with a leader change: the client proposes again.
            if step % 300 == 299 {
                target = None;
            }
            self.now += 1;
            for r in &mut self.replicas {
                r.node.as_mut().unwrap().tick();
            }
            self.deliver(false);
            self.process(false);
            let Some(l) = self.leader() else { continue };
            if self.replicas[l].node.as_ref().unwrap().in_joint() && step % 50 == 0 {
                let _ = self.replicas[l]
                    .node
                    .as_mut()
                    .unwrap()
                    .propose_leave_joint();
            }
            let state = self.replicas[l].node.as_ref().unwrap().state().clone();
            match target {
                None => {
                    let epoch = state.committed_epoch + 1;
                    if self.replicas[l]
                        .node
                        .as_mut()
                        .unwrap()
                        .propose(&Command::CommitEpoch { epoch })
                        .is_ok()
                    {
                        target = Some(epoch);
                    }
                }
                Some(epoch) => {
                    let done = self
                        .replicas
                        .iter()
                        .all(|r| r.node.as_ref().unwrap().state().committed_epoch >= epoch);
                    if done {
                        let applied: BTreeSet<u64> = self
                            .replicas
                            .iter()
                            .map(|r| r.node.as_ref().unwrap().state().applied_index)
                            .collect();
                        let joint = self
                            .replicas
                            .iter()
                            .any(|r| r.node.as_ref().unwrap().in_joint());
                        if applied.len() == 1 && !joint {
                            let cs = self.replicas[l].node.as_ref().unwrap().conf_state();
                            if cs.get_voters().len() != 3.min(self.replicas.len()) {
                                self.fail(format!(
                                    "the group ended with voters {:?}",
                                    cs.get_voters()
                                ));
                            }
                            return;
                        }
                    }
                }
            }
        }
        let status: Vec<_> = self
            .replicas
            .iter()
            .map(|r| {
                let n = r.node.as_ref().unwrap();
                (
                    n.id(),
                    n.term(),
                    n.is_leader(),
                    n.committed(),
                    n.state().applied_index,
                )
            })
            .collect();
        self.fail(format!("no progress after healing: {status:?}"));
    }
}

fn run(seed: u64, members: usize, steps: u64) -> (usize, usize, usize, u64, usize, usize) {
    let mut sim = Sim::new(seed, members);
    for _ in 0..steps {
        sim.chaos_step();
    }
    sim.heal_and_check_liveness();
    // The epoch log: every epoch logged and not uploaded since is in every member's tail,
    // with its bytes; nothing else is.
    let end = sim.replicas[0].node.as_ref().unwrap().state().clone();
    let mut want = std::collections::BTreeMap::new();
    let mut indexes: Vec<&u64> = sim.entries.keys().collect();
    indexes.sort();
    for i in indexes {
        if let (Command::LogEpoch { epoch, bytes, .. }, Outcome::Applied) = &sim.entries[i] {
            if *epoch > end.log.uploaded {
                want.insert(*epoch, bytes.clone());
            }
        }
    }
    let uploads = sim
        .entries
        .values()
        .filter(|(c, o)| matches!(c, Command::Uploaded { .. }) && *o == Outcome::Applied)
        .count();
    for r in &sim.replicas {
        let tail = &r.node.as_ref().unwrap().state().log.epochs();
        if *tail != &want {
            sim.fail(format!(
                "the epoch log lost or kept epochs: {:?} != {:?}",
                tail.keys(),
                want.keys()
            ));
        }
    }
    let epoch = sim.replicas[0]
        .node
        .as_ref()
        .unwrap()
        .state()
        .committed_epoch;
    (
        sim.crashes,
        sim.stale_rejected,
        sim.entries.len(),
        epoch,
        sim.swaps,
        uploads,
    )
}

fn many(members: usize) {
    let seeds = statemesh_mesh::sim::seeds(1000);
    println!(
        "{} schedules of {members} members from seed {} (SIM_SEED=<seed> runs one)",
        seeds.len(),
        seeds[0]
    );
    let (mut crashes, mut stale, mut entries, mut epochs, mut swaps, mut uploads) =
        (0, 0, 0, 0, 0, 0);
    for &seed in &seeds {
        let (c, s, e, ep, sw, up) = run(seed, members, 1500);
        uploads += up;
        crashes += c;
        stale += s;
        entries += e;
        epochs += ep;
        swaps += sw;
    }
    println!(
        "{} schedules: {crashes} crashes, {entries} entries applied, {stale} stale moves rejected, {epochs} epochs committed, {swaps} voter/learner swaps proposed, {uploads} uploads of the epoch log",
        seeds.len()
    );
    assert!(crashes > 0 && stale > 0 && entries > 0 && epochs > 0 && uploads > 0);
    if members > 3 {
        assert!(swaps > 0);
    }
}

#[test]
fn three_members_under_chaos() {
    many(3);
}

#[test]
fn five_members_under_chaos() {
    many(5);
}

#[test]
fn a_restart_never_applies_past_the_commit() {
    let (storage, mut state) = bootstrap(&[1], &[], 4);
    state.applied_index = 5;
    let e = ControlNode::new(1, storage, state, Timing::default())
        .err()
        .expect("refused");
    assert!(e.contains("applied up to 5"), "{e}");
}
