//! Failures under a deterministic, seeded simulation (issue 9): 3 and 5 members run the real
//! control group (raft-rs) with the node's policies on top — every member joins and rejoins
//! when declared dead, holds an ownership lease from read indexes
//! (`statemesh_mesh::failure::Lease`), and the leader runs the failure detector
//! (`failure::Detector`), declares silent members dead, moves their key groups to the
//! survivors by rendezvous hashing (failover), and replaces dead voters by learners
//! (`failure::conf_change`). Time runs in 10 ms steps, with the node's timing (a Raft tick
//! every 50 ms, the default `[mesh]` options). Meanwhile members crash and restart from their
//! durable part, pause (SIGSTOP: no ticks, nothing processed, their messages wait; their clock
//! jumps when they go on), and the network delays, drops and partitions (one-way ones too) and
//! heals.
//!
//! Checked at every step:
//! - **one owner at a time**: no two members serve a key group at the same moment (a member
//!   serves the key groups its applied table gives it, while its lease holds and its own
//!   record is alive);
//! - every member that applied index `i` holds the same state (no committed entry lost);
//! - an owner's write is accepted (by the leader of the moment, as the epoch leader accepts
//!   parts) only if the writer owns the key group at that version in the history and is
//!   alive in the leader's state: no stale owner commits.
//!
//! At the end, after healing: every key group is owned by a live member and served by exactly
//! one member, every member is alive again (rejoined), and the group has the voters it wants
//! (3 of 3–4 members, 5 of 5). With 4 members (3 voters, a learner), dead voters are swapped
//! for the learner.
//!
//! `SIM_SEED=<n>` runs one schedule; `SIM_SEEDS=<n>` sets how many (default 700 per size, of
//! 40 s of simulated time each, about 20 failures each).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use raft::storage::MemStorage;
use statemesh_mesh::control::{ClusterState, Command, Role};
use statemesh_mesh::failure::{conf_change, voters_wanted, Detector, FailureConfig, Lease};
use statemesh_mesh::group::{bootstrap, ControlNode, Timing};
use statemesh_mesh::placement::NodeId;
use statemesh_mesh::sim::Rng;

const KEY_GROUPS: u32 = 32;
const STEP_MS: u64 = 10;
const TICK_EVERY: u64 = 5;
/// How often a member proposes again what has not applied yet.
const REPROPOSE_MS: u64 = 300;

fn trace() -> bool {
    std::env::var_os("SIM_TRACE").is_some()
}

/// The node's timing, with an election timeout drawn from the seed (raft-rs would draw it
/// from an unseeded generator).
/// Each member's is distinct (`2 × (id - 1)` ticks apart, plus 0 or 1): with equal fixed
/// timeouts and the fixed delays of a healed network, candidates could split the vote forever.
fn timing(rng: &mut Rng, id: NodeId) -> Timing {
    let d = Timing::default();
    Timing {
        fixed_election_ticks: Some(
            d.election_ticks + 2 * (id as usize - 1) + rng.below(2) as usize,
        ),
        ..d
    }
}

struct Member {
    id: NodeId,
    node: Option<ControlNode>,
    storage: MemStorage,
    durable: ClusterState,
    detector: Detector,
    lease: Lease,
    lease_until: u64,
    incarnation: u64,
    join_at: u64,
    conf_at: u64,
    move_at: u64,
    dead_at: BTreeMap<NodeId, (u64, u64)>,
    /// Paused until (no ticks, no processing; messages wait in `inbox`).
    paused_until: Option<u64>,
    inbox: Vec<(usize, Vec<u8>)>,
    /// Crashed until.
    down_until: u64,
    /// The last leader other than itself it knew.
    last_leader: Option<NodeId>,
    /// Stopping gracefully (SIGTERM): until when it tries to say so before it goes down, and
    /// whether it led when it began.
    stopping: Option<(u64, bool)>,
    /// When it next proposes its stop (or asks for the leadership's transfer).
    stop_at: u64,
}

#[derive(Default, Debug)]
struct Stats {
    crashes: usize,
    pauses: usize,
    partitions: usize,
    deaths: usize,
    failover_moves: usize,
    rejoins: usize,
    voter_swaps: usize,
    writes: usize,
    /// Graceful stops begun, and those the group took (`MarkDead { stopped: true }` applied).
    stops: usize,
    stops_taken: usize,
}

struct Sim {
    rng: Rng,
    seed: u64,
    cfg: FailureConfig,
    members: Vec<Member>,
    now: u64,
    step: u64,
    seq: u64,
    net: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: HashMap<u64, (usize, usize, Vec<u8>)>,
    cut: std::collections::BTreeSet<(usize, usize)>,
    cut_until: u64,
    drop_per_mille: u64,
    states: HashMap<u64, Vec<u8>>,
    /// (key group, version) → owner, from every applied state.
    owner_at: HashMap<(u32, u64), NodeId>,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let ids: Vec<NodeId> = (1..=n as u64).collect();
        let (voters, learners) = ids.split_at(ids.len().min(3));
        let cfg = FailureConfig::default();
        let mut rng = Rng(seed | 1);
        let members = ids
            .iter()
            .map(|&id| {
                let (storage, durable) = bootstrap(voters, learners, KEY_GROUPS);
                Member {
                    id,
                    node: Some(
                        ControlNode::new(
                            id,
                            storage.clone(),
                            durable.clone(),
                            timing(&mut rng, id),
                        )
                        .unwrap(),
                    ),
                    storage,
                    durable,
                    detector: Detector::new(cfg),
                    lease: Lease::new(cfg, rng.next()),
                    lease_until: 0,
                    incarnation: rng.next() | 1,
                    join_at: 0,
                    conf_at: 0,
                    move_at: 0,
                    dead_at: BTreeMap::new(),
                    paused_until: None,
                    inbox: Vec::new(),
                    down_until: 0,
                    last_leader: None,
                    stopping: None,
                    stop_at: 0,
                }
            })
            .collect();
        let drop_per_mille = rng.below(30);
        Sim {
            rng,
            seed,
            cfg,
            members,
            now: 0,
            step: 0,
            seq: 0,
            net: BinaryHeap::new(),
            in_flight: HashMap::new(),
            cut: Default::default(),
            cut_until: 0,
            drop_per_mille,
            states: HashMap::new(),
            owner_at: HashMap::new(),
            stats: Stats::default(),
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} (SIM_SEED={} reproduces it), at {} ms: {what}",
            self.seed, self.seed, self.now
        )
    }

    fn running(&self, i: usize) -> bool {
        self.members[i].node.is_some() && self.members[i].paused_until.is_none()
    }

    fn send(&mut self, from: usize, to: usize, bytes: Vec<u8>, chaos: bool) {
        let delay = if chaos { 1 + self.rng.below(3) } else { 1 };
        self.seq += 1;
        self.net.push(Reverse((self.step + delay, self.seq)));
        self.in_flight.insert(self.seq, (from, to, bytes));
    }

    fn deliver(&mut self, chaos: bool) {
        while let Some(Reverse((at, seq))) = self.net.peek().copied() {
            if at > self.step {
                break;
            }
            self.net.pop();
            let (from, to, bytes) = self.in_flight.remove(&seq).unwrap();
            if self.cut.contains(&(from, to)) || (chaos && self.rng.chance(self.drop_per_mille)) {
                continue;
            }
            let now = self.now;
            let m = &mut self.members[to];
            match (&mut m.node, m.paused_until) {
                (Some(_), Some(_)) => m.inbox.push((from, bytes)),
                (Some(n), None) => {
                    if let Ok(s) = n.step(&bytes) {
                        if s.sign_of_life() {
                            m.detector.heard(from as NodeId + 1, now);
                            m.detector.heard(s.origin, now);
                        }
                    }
                }
                (None, _) => {}
            }
        }
    }

    /// One member's round: Raft's ready, then the node's policies.
    fn round(&mut self, i: usize, chaos: bool) {
        let now = self.now;
        let out = {
            let m = &mut self.members[i];
            let node = m.node.as_mut().unwrap();
            match node.process() {
                Ok(o) => o,
                Err(e) => panic!(
                    "seed {}: node {} cannot write its log: {e}",
                    self.seed, m.id
                ),
            }
        };
        for (to, bytes) in out.messages {
            self.send(i, (to - 1) as usize, bytes, chaos);
        }
        let m = &mut self.members[i];
        for (_, cmd, outcome) in &out.applied {
            if let (
                Command::MarkDead {
                    id,
                    generation,
                    stopped: true,
                },
                statemesh_mesh::control::Outcome::Applied,
            ) = (cmd, outcome)
            {
                m.detector.stopped(*id, *generation);
                if *id == m.id && m.stopping.is_some() {
                    self.stats.stops_taken += 1;
                }
            }
            if let (
                Command::Join { id, .. } | Command::Remove { id },
                statemesh_mesh::control::Outcome::Applied,
            ) = (cmd, outcome)
            {
                m.detector.forget_stop(*id);
            }
        }
        let m = &mut self.members[i];
        for (ctx, index) in &out.read_states {
            m.lease.read_state(ctx, *index);
        }
        let node = m.node.as_mut().unwrap();
        let state = node.state().clone();
        // The state agrees with every other member's at the same index.
        let bytes = state.encode();
        match self.states.get(&state.applied_index) {
            Some(b) if *b != bytes => self.fail(format!(
                "node {} at applied index {} holds another state than a member before it",
                i + 1,
                state.applied_index
            )),
            Some(_) => {}
            None => {
                self.states.insert(state.applied_index, bytes);
                for (kg, o) in state.table.iter().enumerate() {
                    if let Some(owner) = o.owner {
                        if let Some(prev) = self.owner_at.insert((kg as u32, o.version), owner) {
                            if prev != owner {
                                self.fail(format!(
                                    "key group {kg} version {} had owners {prev} and {owner}",
                                    o.version
                                ));
                            }
                        }
                    }
                }
            }
        }
        let m = &mut self.members[i];
        if !chaos || self.rng.chance(300) {
            m.durable = state.clone();
        }
        let me = m.id;
        if let Some((until, led)) = m.stopping {
            // Stopping (SIGTERM, its last epoch committed): its lease was given up when the
            // stop began, before anything else. A leader first hands the leadership over; then
            // it proposes its own death, `stopped`, until that applies or its time is up, and
            // goes down. (Leading again after it began as a follower, it gives up: the others
            // then declare it dead when it is silent, as for a crash.)
            let node = m.node.as_mut().unwrap();
            let dead = state
                .members
                .get(&me)
                .is_none_or(|r| r.incarnation != m.incarnation || !r.alive);
            let leads = node.is_leader();
            if dead || now >= until || (leads && !led) {
                m.node = None;
                m.stopping = None;
                m.down_until = now + 300 + self.rng.below(5_000);
                m.inbox.clear();
                if trace() {
                    eprintln!("{now} ms: node {me} stops (taken: {dead})");
                }
                return;
            }
            m.lease_until = 0;
            if now >= m.stop_at {
                m.stop_at = now + REPROPOSE_MS;
                if leads {
                    let to = statemesh_mesh::failure::transfer_target(
                        &state,
                        me,
                        &[],
                        &|_| true,
                        &|v| node.peer_committed(v).unwrap_or(0),
                    );
                    if let Some(to) = to {
                        node.transfer_leader(to);
                    }
                } else if node.leader().is_some() {
                    let generation = state.members.get(&me).map_or(0, |r| r.generation);
                    let _ = node.propose_anywhere(&Command::MarkDead {
                        id: me,
                        generation,
                        stopped: true,
                    });
                }
            }
            return;
        }
        // Declared dead at this incarnation: join again as a new generation.
        if state
            .members
            .get(&me)
            .is_some_and(|r| r.incarnation == m.incarnation && !r.alive)
        {
            m.incarnation = self.rng.next() | 1;
            m.join_at = 0;
            m.lease.revoke();
            self.stats.rejoins += 1;
        }
        let m = &mut self.members[i];
        // Only this process's record (a new process waits for its Join): a stop its previous
        // process proposed may apply after this one started, and its key groups then move at
        // once.
        let alive_here = state
            .members
            .get(&me)
            .is_some_and(|r| r.alive && r.incarnation == m.incarnation);
        m.lease_until = m.lease.applied(state.applied_index, alive_here);
        let node = m.node.as_mut().unwrap();
        if let Some(ctx) = m.lease.due(now) {
            node.read_index(ctx);
        }
        let joined = state
            .members
            .get(&me)
            .is_some_and(|r| r.incarnation == m.incarnation);
        if !joined && node.leader().is_some() && now >= m.join_at {
            m.join_at = now + REPROPOSE_MS;
            let _ = node.propose_anywhere(&Command::Join {
                id: me,
                grpc_addr: String::new(),
                http_addr: String::new(),
                role: Role::Learner,
                incarnation: m.incarnation,
                fresh: false,
            });
        }
        let leading = node.is_leader() && joined;
        let previous = m.last_leader;
        m.detector.leading(leading, now, previous);
        if let Some(l) = node.leader().filter(|&l| l != me) {
            m.last_leader = Some(l);
        }
        if !leading {
            return;
        }
        for (id, generation) in m.detector.check(now, me, &state) {
            if m.dead_at
                .get(&id)
                .is_some_and(|(g, t)| *g == generation && now < *t)
            {
                continue;
            }
            m.dead_at.insert(id, (generation, now + REPROPOSE_MS));
            if trace() {
                eprintln!(
                    "{now} ms: node {me} (term {}) declares {id}/{generation} dead",
                    node.term()
                );
            }
            if node
                .propose(&Command::MarkDead {
                    id,
                    generation,
                    stopped: false,
                })
                .is_ok()
            {
                self.stats.deaths += 1;
            }
        }
        if now >= m.conf_at {
            if node.in_joint() {
                m.conf_at = now + REPROPOSE_MS;
                let _ = node.propose_leave_joint();
            } else if let Some(change) = conf_change(&state, me, &|id| node.caught_up(id)) {
                m.conf_at = now + REPROPOSE_MS;
                if change.iter().any(|(_, r)| *r == Some(Role::Learner))
                    && change.iter().any(|(_, r)| *r == Some(Role::Voter))
                {
                    self.stats.voter_swaps += 1;
                }
                let _ = node.propose_membership(&change);
            }
        }
        // Key groups without a live owner (unassigned, or their owner is dead) move to the
        // live members rendezvous hashing gives them. (Moves between live owners need the
        // epoch layer's live hand-over, simulated in `leader_sim.rs`: not here.)
        // (The first assignment waits a moment for every member to join, so that each gets
        // its share.)
        if now >= m.move_at && now >= 2_000 {
            let live = |n: Option<NodeId>| {
                n.is_some_and(|n| state.members.get(&n).is_some_and(|r| r.alive))
            };
            let detector = &m.detector;
            let moves: Vec<_> = state
                .plan_moves(KEY_GROUPS as usize)
                .into_iter()
                .filter(|mv| !live(state.table[mv.kg as usize].owner))
                // A dead owner's key groups once any lease it may hold has expired.
                .filter(|mv| {
                    state.table[mv.kg as usize].owner.is_none_or(|o| {
                        let generation = state.members.get(&o).map_or(0, |r| r.generation);
                        detector.may_take_over(o, generation, now)
                    })
                })
                .filter(|mv| mv.to == me || node.caught_up(mv.to))
                .collect();
            if !moves.is_empty() {
                m.move_at = now + REPROPOSE_MS;
                if state.table.iter().all(|o| o.owner.is_some()) {
                    self.stats.failover_moves += moves.len();
                }
                if trace() {
                    eprintln!(
                        "{now} ms: node {me} moves {:?}",
                        moves.iter().map(|m| (m.kg, m.to)).collect::<Vec<_>>()
                    );
                }
                let _ = node.propose(&Command::Move { moves });
            }
        }
    }

    /// Who serves what now: checks that no key group has two servers, and lets each server
    /// write (accepted by the leader of the moment as the epoch leader accepts parts).
    fn check_owners(&mut self) -> Vec<Option<NodeId>> {
        let mut served: Vec<Option<NodeId>> = vec![None; KEY_GROUPS as usize];
        let leader = (0..self.members.len())
            .filter(|&i| self.running(i))
            .filter_map(|i| {
                let n = self.members[i].node.as_ref().unwrap();
                n.is_leader().then(|| (n.term(), i))
            })
            .max()
            .map(|(_, i)| i);
        for i in 0..self.members.len() {
            if !self.running(i) {
                continue;
            }
            let m = &self.members[i];
            let state = m.node.as_ref().unwrap().state();
            if self.now >= m.lease_until || !state.members.get(&m.id).is_some_and(|r| r.alive) {
                continue;
            }
            for (kg, o) in state.table.iter().enumerate() {
                if o.owner != Some(m.id) {
                    continue;
                }
                if let Some(other) = served[kg] {
                    for mm in &self.members {
                        if let Some(n) = mm.node.as_ref() {
                            let st = n.state();
                            eprintln!(
                                "node {}: applied {} term {} leader {:?} lease_until {} kg {kg}: {:?}, members {:?}",
                                mm.id,
                                st.applied_index,
                                n.term(),
                                n.leader(),
                                mm.lease_until,
                                st.table[kg],
                                st.members.values().map(|r| (r.id, r.generation, r.alive)).collect::<Vec<_>>()
                            );
                        }
                    }
                    self.fail(format!(
                        "key group {kg} is served by nodes {other} and {} at once (node {}'s lease runs until {} ms)",
                        m.id, m.id, m.lease_until
                    ));
                }
                served[kg] = Some(m.id);
                // Its write of the key group at its version, judged by the leader's state.
                if let Some(l) = leader {
                    let ls = self.members[l].node.as_ref().unwrap().state();
                    let accepted = ls.members.get(&m.id).is_some_and(|r| r.alive)
                        && ls.stale_write(m.id, &[(kg as u32, o.version)]).is_none();
                    if accepted {
                        self.stats.writes += 1;
                        if self.owner_at.get(&(kg as u32, o.version)) != Some(&m.id) {
                            self.fail(format!(
                                "node {}'s write of key group {kg} at version {} was accepted, but the history gives that version to {:?}",
                                m.id,
                                o.version,
                                self.owner_at.get(&(kg as u32, o.version))
                            ));
                        }
                    }
                }
            }
        }
        served
    }

    fn advance(&mut self, chaos: bool) {
        self.step += 1;
        self.now = self.step * STEP_MS;
        for i in 0..self.members.len() {
            // Paused members go on (their clock jumped); crashed ones restart.
            if self.members[i].paused_until.is_some_and(|t| self.now >= t) {
                self.members[i].paused_until = None;
                // Processed now, so heard now, as `deliver` does: the lease argument needs every
                // message the leader answers (a read-index ask above all) to reach the
                // detector. Without it, a leader resumed from a pause answered a member's asks
                // (granting it a lease) while its detector still had the member last heard
                // before the pause, declared it dead and took its key group inside that lease
                // (seed 2559869571011411332: key group 6 served by nodes 1 and 4 at once).
                let now = self.now;
                let inbox = std::mem::take(&mut self.members[i].inbox);
                let m = &mut self.members[i];
                if let Some(n) = m.node.as_mut() {
                    for (from, b) in inbox {
                        if let Ok(s) = n.step(&b) {
                            if s.sign_of_life() {
                                m.detector.heard(from as NodeId + 1, now);
                                m.detector.heard(s.origin, now);
                            }
                        }
                    }
                }
            }
            if self.members[i].node.is_none() && self.now >= self.members[i].down_until {
                self.restart(i);
            }
            if self.running(i) && self.step.is_multiple_of(TICK_EVERY) {
                self.members[i].node.as_mut().unwrap().tick();
            }
        }
        self.deliver(chaos);
        for i in 0..self.members.len() {
            if self.running(i) {
                self.round(i, chaos);
            }
        }
        self.check_owners();
    }

    fn restart(&mut self, i: usize) {
        let t = timing(&mut self.rng, self.members[i].id);
        let m = &mut self.members[i];
        match ControlNode::new(m.id, m.storage.clone(), m.durable.clone(), t) {
            Ok(n) => {
                m.node = Some(n);
                // A new process: a new incarnation, a fresh lease and detector.
                m.incarnation = self.rng.next() | 1;
                m.join_at = 0;
                m.lease = Lease::new(self.cfg, self.rng.next());
                m.lease_until = 0;
                m.detector = Detector::new(self.cfg);
                m.dead_at.clear();
                m.last_leader = None;
                m.stopping = None;
            }
            Err(e) => self.fail(format!("node {} cannot restart: {e}", i + 1)),
        }
    }

    /// A failure now and then: a crash, a pause, a partition.
    fn chaos(&mut self) {
        let n = self.members.len();
        if self.now >= self.cut_until && !self.cut.is_empty() {
            self.cut.clear();
        }
        // About one event every 2 s.
        if !self.rng.chance(5) {
            return;
        }
        let down = (0..n).filter(|&i| !self.running(i)).count();
        match self.rng.below(4) {
            0 if down < 2 => {
                let i = self.rng.below(n as u64) as usize;
                if self.members[i].node.take().is_some() {
                    self.members[i].down_until = self.now + 300 + self.rng.below(5_000);
                    self.members[i].inbox.clear();
                    self.members[i].paused_until = None;
                    self.stats.crashes += 1;
                    if trace() {
                        eprintln!(
                            "{} ms: node {} crashes until {}",
                            self.now,
                            i + 1,
                            self.members[i].down_until
                        );
                    }
                }
            }
            1 if down < 2 => {
                let i = self.rng.below(n as u64) as usize;
                if self.running(i) {
                    self.members[i].paused_until = Some(self.now + 300 + self.rng.below(4_000));
                    self.stats.pauses += 1;
                    if trace() {
                        eprintln!(
                            "{} ms: node {} paused until {:?}",
                            self.now,
                            i + 1,
                            self.members[i].paused_until
                        );
                    }
                }
            }
            2 if self.cut.is_empty() => {
                let side: Vec<bool> = (0..n).map(|_| self.rng.chance(350)).collect();
                let one_way = self.rng.chance(300);
                for a in 0..n {
                    for b in 0..n {
                        if side[a] != side[b] && (!one_way || side[a]) {
                            self.cut.insert((a, b));
                        }
                    }
                }
                self.cut_until = self.now + 300 + self.rng.below(5_000);
                self.stats.partitions += 1;
                if trace() {
                    eprintln!(
                        "{} ms: cut {:?} until {}",
                        self.now, self.cut, self.cut_until
                    );
                }
            }
            3 if down < 2 => {
                // A graceful stop (SIGTERM): its lease goes at once.
                let i = self.rng.below(n as u64) as usize;
                let now = self.now;
                let m = &mut self.members[i];
                if m.stopping.is_none() && m.paused_until.is_none() {
                    if let Some(node) = m.node.as_ref() {
                        m.stopping = Some((now + 1_000, node.is_leader()));
                        m.stop_at = now;
                        m.lease.revoke();
                        m.lease_until = 0;
                        self.stats.stops += 1;
                        if trace() {
                            eprintln!("{now} ms: node {} is stopping", i + 1);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Heals everything; within 30 s every member is alive again, every key group is served
    /// by exactly one member, and the group has the voters it wants (3 of 3–4, 5 of 5).
    fn heal_and_check(&mut self) {
        self.cut.clear();
        for i in 0..self.members.len() {
            self.members[i].paused_until = self.members[i].paused_until.map(|_| self.now);
            self.members[i].down_until = self.now;
        }
        let mut last = String::new();
        for _ in 0..3_000 {
            self.advance(false);
            let served = self.check_owners();
            let Some(l) = (0..self.members.len())
                .find(|&i| self.running(i) && self.members[i].node.as_ref().unwrap().is_leader())
            else {
                continue;
            };
            let s = self.members[l].node.as_ref().unwrap().state().clone();
            let all_alive =
                s.members.len() == self.members.len() && s.members.values().all(|m| m.alive);
            let conf = s.conf.clone().unwrap_or_default();
            let voters_ok = conf.voters.len() == voters_wanted(self.members.len())
                && conf.voters_outgoing.is_empty();
            let served_ok = served.iter().all(|o| o.is_some());
            if all_alive && voters_ok && served_ok {
                return;
            }
            let unserved: Vec<(usize, Option<NodeId>)> = served
                .iter()
                .enumerate()
                .filter(|(_, o)| o.is_none())
                .map(|(kg, _)| (kg, s.table[kg].owner))
                .collect();
            let leases: Vec<(NodeId, u64, u64, Option<NodeId>)> = self
                .members
                .iter()
                .filter_map(|m| {
                    let n = m.node.as_ref()?;
                    Some((m.id, m.lease_until, n.state().applied_index, n.leader()))
                })
                .collect();
            last = format!(
                "unserved (key group, owner) {unserved:?}; (member, lease until, applied, leader) {leases:?}; now {}; members {:?}, voters {:?}, served {}/{}",
                self.now,
                s.members
                    .values()
                    .map(|m| (m.id, m.generation, m.alive))
                    .collect::<Vec<_>>(),
                conf.voters,
                served.iter().filter(|o| o.is_some()).count(),
                KEY_GROUPS
            );
        }
        self.fail(format!("no recovery 30 s after healing: {last}"));
    }
}

fn run(seed: u64, members: usize, steps: u64) -> Stats {
    let mut sim = Sim::new(seed, members);
    // First the cluster forms (every key group assigned) in a quiet network.
    for _ in 0..300 {
        sim.advance(false);
    }
    for _ in 0..steps {
        sim.chaos();
        sim.advance(true);
    }
    sim.heal_and_check();
    sim.stats
}

fn many(members: usize) {
    let seeds = statemesh_mesh::sim::seeds(700);
    println!(
        "{} schedules of {members} members from seed {} (SIM_SEED=<seed> runs one)",
        seeds.len(),
        seeds[0]
    );
    let mut total = Stats::default();
    for &seed in &seeds {
        // 40 s of simulated time each.
        let s = run(seed, members, 4_000);
        total.crashes += s.crashes;
        total.pauses += s.pauses;
        total.partitions += s.partitions;
        total.deaths += s.deaths;
        total.failover_moves += s.failover_moves;
        total.rejoins += s.rejoins;
        total.voter_swaps += s.voter_swaps;
        total.writes += s.writes;
        total.stops += s.stops;
        total.stops_taken += s.stops_taken;
    }
    println!("{} schedules: {total:?}", seeds.len());
    if seeds.len() >= 20 {
        assert!(total.deaths > 0 && total.failover_moves > 0 && total.rejoins > 0);
        assert!(total.crashes > 0 && total.pauses > 0 && total.partitions > 0);
        assert!(
            total.stops_taken > 0,
            "no graceful stop was taken: {total:?}"
        );
        if members == 4 {
            assert!(total.voter_swaps > 0, "{total:?}");
        }
    }
}

#[test]
fn three_members_fail_over_without_two_owners() {
    many(3);
}

#[test]
fn four_members_swap_dead_voters_for_the_learner() {
    many(4);
}

#[test]
fn five_members_fail_over_without_two_owners() {
    many(5);
}
