//! The leader's side of cluster epochs ([`EpochLeader`]) and its participants under a
//! deterministic, seeded simulation: 1 to 3 participants follow leaders that come and go (a new
//! leader with the next term takes over at random; the deposed one's manifest write in flight
//! may still land afterwards; now and then a leader hands the epochs over first — they stand
//! still, it says where in the control group, and its successor takes over a little later and
//! may resume them live, or another takes over abruptly before or after that), messages
//! between them are delayed, reordered across links and
//! lost now and then (each link is FIFO, as the node-pair streams are), part and manifest
//! writes take random times and fail (a manifest write may also fail after storing it), and participants restart (they lose everything blob
//! storage does not hold and come back with the newest manifest and another incarnation).
//! Leaders number epochs from reservations in the control group
//! ([`EpochLeader::reserve_epochs`]; a reservation applies a few steps after it is asked for,
//! or is lost, and a deposed leader's may still apply).
//!
//! The participants here model the node's participant side (`node/src/checkpoint/driver.rs`
//! and `coordinator::Participant`): `Hold` → `Held{committed, cut}`; `Resume` → release what
//! they wrote up to `committed`, roll back the rest (or read what they missed from blob
//! storage), go on after `base`; a barrier is cut (consecutively), its part written and
//! reported; `Committed` releases in order.
//!
//! Checked:
//! - **safety**: a participant releases (acknowledges) an epoch only if blob storage holds its
//!   manifest (or a later one naming it in its chain at the end), and every released epoch is
//!   in the final chain (following `previous` from the newest manifest): nothing acknowledged
//!   is lost or orphaned; each manifest lists a part of every participant that released it;
//!   releases per participant strictly increase between restarts;
//! - **live moves**: a participant is never asked to stop key groups at an epoch it has cut
//!   already, and a live `Resume` (nobody rolls back) comes only to participants that stopped
//!   at the committed epoch, released it and cut nothing after it (they answer `Stop` and
//!   `Resume` only now and then: the leader's timeouts move the old way);
//! - **liveness**: once failures stop, epochs commit again.
//!
//! **Deposed leaders run on.** A leader that is replaced goes on for a while (paused, cut off:
//! it has not learned of its successor yet). Its manifest writes in flight end, and it keeps
//! ticking: it may pass a write's end to its `EpochLeader`, whose `Committed` reaches a
//! participant that its successor's `Hold` has not reached yet (its own node's, in the real
//! cluster). That is the manifest-put mode's gap (`[checkpoint] cluster_log = false`: nothing
//! in the control group fences such a commit), closed as the node closes it
//! (`node/src/cluster.rs`, `Driver::manifest_done` and `lead_epochs`): a leader passes a
//! write's end on only while its lease stands (`LEASE` steps past its last confirmation, which
//! a deposed leader got before its successor was elected), and a new leader's read of the
//! newest manifest completes only `LEASE` steps after it took over. A second test runs the
//! schedules without these two rules and checks that some lose an acknowledged epoch: the
//! simulation finds the gap the rules close.
//!
//! `SIM_SEED=<n>` runs one schedule; `SIM_SEEDS=<n>` sets how many (default 2000);
//! `SIM_TRACE=1` prints its events. Every failing seed is printed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use statemesh_mesh::control::EpochHandoff;
use statemesh_mesh::epoch::{Epoch, EpochLeader, EpochMsg, LeadAction, LeadInput};
use statemesh_mesh::placement::NodeId;
use statemesh_mesh::sim::Rng;

/// The leader's node id in messages (leaders change; the node id does not matter here).
const LEADER: NodeId = 100;
/// Deposed leaders' messages to participants come on links of their own (another node's
/// connection, or the node's own participant: not behind its successor's `Hold`).
const DEPOSED: NodeId = 101;

/// A leader's lease lasts this many steps past its last confirmation; a new leader's first
/// read of the newest manifest waits as long after it took over.
const LEASE: u64 = 4;

/// Participants that do not answer a `Hold` within this many steps are left out (the others
/// go on; they are taken in when they answer).
const EXCLUDE_AFTER: u64 = 40;

/// A live move that does not get every `Stopping` (or `Reconfigured`) within this many steps
/// moves the old way (synchronises again: everyone rolls back).
const STOP_AFTER: u64 = 150;
const RECONFIGURE_AFTER: u64 = 150;

#[derive(Debug, Clone)]
struct Manifest {
    previous: Option<Epoch>,
    parts: BTreeSet<NodeId>,
}

#[derive(Debug, Default)]
struct Participant {
    incarnation: u64,
    gen: u64,
    holding: bool,
    /// The last epoch released (durable in blob storage or abandoned numbering).
    released: Epoch,
    /// Epochs released since the last restart, in order.
    releases: Vec<Epoch>,
    /// The last epoch the leader announced and the last one cut.
    announced: Epoch,
    cut: Epoch,
    /// Epochs up to this are released or abandoned (numbers are not reused).
    floor: Epoch,
    /// Written parts not yet released.
    written: BTreeSet<Epoch>,
    /// Parts being written: (epoch, done at).
    writing: Option<(Epoch, u64)>,
    /// The generation its open epochs were cut in (that of the last `Resume` it followed).
    cut_gen: u64,
    /// A live move asked it to stop the moving key groups at the cut of this epoch.
    stop_at: Option<Epoch>,
    /// It cut the epoch it was asked to stop at.
    stopped: Option<Epoch>,
    /// The generation of the last `Resume` that rolled it back (its shards').
    shard_gen: u64,
    /// A member that has not joined the epochs yet (it owns nothing): the leader does not know
    /// it until it joins.
    waiting: bool,
    /// A member that left the epochs (it owns nothing: a leave handed its key groups over):
    /// it still answers for the epochs it took part in.
    retired: bool,
    /// Paused with the deposed leader on its node until then: it handles nothing, and what
    /// the current leader sent it meanwhile comes a random while after the pause (its own
    /// leader's messages may come first).
    paused_until: u64,
}

/// A leader replaced that has not learned it yet.
struct Deposed {
    leader: EpochLeader,
    term: u64,
    /// Its lease's end (its last confirmation came before its successor took over).
    lease_until: u64,
    /// When it learns of its successor (and stops).
    until: u64,
    /// Paused (SIGSTOP, a frozen VM) until then, with a participant on its node: its
    /// manifest puts not yet sent land after it, and it does nothing meanwhile.
    paused_until: u64,
}

struct World {
    rng: Rng,
    /// The two rules that keep a deposed leader's commits in its successor's chain (see the
    /// module's documentation); off only to show that the simulation finds the gap.
    lease_guard: bool,
    /// Deposed leaders still running.
    deposed: Vec<Deposed>,
    /// When the current leader took over.
    lead_since: u64,
    /// Manifest writes' ends a deposed leader passed on (within its lease), and held (its
    /// lease had lapsed).
    deposed_passed: u64,
    deposed_held: u64,
    /// Deposed leaders paused (with a participant).
    pauses: u64,
    /// A deposed leader's `Committed` that reached a participant still on its generation.
    deposed_followed: u64,
    now: u64,
    trace: bool,
    leader: EpochLeader,
    term: u64,
    parts: BTreeMap<NodeId, Participant>,
    /// FIFO links: (from, to) → (deliver at, message).
    links: BTreeMap<(NodeId, NodeId), VecDeque<(u64, EpochMsg)>>,
    /// Blob storage: the manifests.
    blob: BTreeMap<Epoch, Manifest>,
    /// The term of each manifest's writer.
    writers: BTreeMap<Epoch, u64>,
    /// Manifest writes in flight: (done at, term of the writer, epoch, manifest, fails).
    manifest_writes: Vec<(u64, u64, Epoch, Manifest, bool)>,
    /// Reads of the newest manifest in flight: (done at, term).
    reads: Vec<(u64, u64)>,
    /// Moves of key groups proposed (every participant holds): (applied at, term).
    moves: Vec<(u64, u64)>,
    /// Every epoch any participant released: (participant, epoch).
    released: Vec<(NodeId, Epoch)>,
    lossy: bool,
    /// Manifests of deposed leaders that landed after a newer leader took over.
    late: u64,
    takeovers: u64,
    restarts: u64,
    /// Rounds of moves that reached their proposal.
    moves_proposed: u64,
    /// Steps during which the leader left a participant out.
    excluded_steps: u64,
    /// `Resume`s that let a participant release epochs of its own still open.
    released_open: u64,
    /// Broken streams the leader is told of at the next step.
    unreachable: Vec<NodeId>,
    /// Live `Resume`s (moves that rolled nobody back) participants followed.
    live: u64,
    /// Participants new to the epochs taken in by a live `Resume`.
    joined_live: u64,
    /// The participant being taken out (`Retire`) until the others resume.
    retiring: Option<NodeId>,
    /// Participants taken out with the others resuming live (nobody rolled back).
    retired_live: u64,
    /// The control group's record of the last leader's hand-over (its fence; the next
    /// fence clears it), and when its successor takes over.
    handoff: Option<EpochHandoff>,
    transfer_at: Option<u64>,
    /// The term of a leader that took over after a hand-over.
    handoff_term: u64,
    /// Manifest writes failed per epoch once failures stopped.
    calm_failures: BTreeMap<Epoch, u32>,
    /// Hand-overs, and live resumes of participants by the leader after one.
    handoffs: u64,
    handed_live: u64,
    /// The control group's reservation of epoch numbers, and reservations proposed:
    /// (applied at, term of the proposer, through). One proposed by a deposed leader may
    /// still apply (Raft commits it later) or be lost, as one of the leader's own may.
    reserved: Epoch,
    reserves: Vec<(u64, u64, Epoch)>,
    reservations: u64,
}

impl World {
    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("{:>6} {}", self.now, what());
        }
    }

    fn latest(&self) -> Option<Epoch> {
        self.blob.keys().next_back().copied()
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: EpochMsg) {
        if self.lossy && self.rng.chance(30) {
            self.log(|| format!("drop {from}->{to} {msg:?}"));
            // Now and then the leader learns that the stream broke.
            if self.rng.chance(2) && from != DEPOSED {
                self.unreachable
                    .push(if from == LEADER { to } else { from });
            }
            return;
        }
        let mut at = self.now + 1 + self.rng.below(8);
        if from == LEADER {
            if let Some(p) = self.parts.get(&to).filter(|p| p.paused_until > self.now) {
                at = at.max(p.paused_until + self.rng.below(10));
            }
        }
        let q = self.links.entry((from, to)).or_default();
        // FIFO per link.
        let at = q.back().map_or(at, |(t, _)| at.max(*t));
        q.push_back((at, msg));
    }

    fn lead(&mut self, input: LeadInput) {
        let acts = self.leader.handle(input);
        for a in acts {
            match a {
                LeadAction::Send { to, msg } => self.send(LEADER, to, msg),
                LeadAction::ReadLatest => {
                    // (Its fence, which forgets a hand-over.)
                    self.handoff = None;
                    let mut at = self.now + 1 + self.rng.below(5);
                    if self.lease_guard {
                        // (The node starts leading the epochs only then: a stronger rule.)
                        at = at.max(self.lead_since + LEASE);
                    }
                    self.reads.push((at, self.term));
                }
                LeadAction::HandedOff(h) => {
                    self.log(|| format!("the leader hands the epochs over: {h:?}"));
                    self.handoff = Some(h);
                    self.handoffs += 1;
                    self.transfer_at = Some(self.now + 1 + self.rng.below(5));
                }
                LeadAction::WriteManifest {
                    epoch,
                    previous,
                    parts,
                } => self.write_manifest(self.term, epoch, previous, &parts),
                LeadAction::Reserve { through } => {
                    let at = self.now + 1 + self.rng.below(5);
                    self.reserves.push((at, self.term, through));
                }
                LeadAction::Record(_) | LeadAction::Stalled(_) => {}
                LeadAction::ProposeMove => {
                    let at = self.now + 1 + self.rng.below(10);
                    self.moves.push((at, self.term));
                    self.moves_proposed += 1;
                }
            }
        }
    }

    /// The leader of `term` writes epoch `epoch`'s manifest.
    fn write_manifest(
        &mut self,
        term: u64,
        epoch: Epoch,
        previous: Option<Epoch>,
        parts: &[Vec<u8>],
    ) {
        let parts: BTreeSet<NodeId> = parts
            .iter()
            .map(|p| String::from_utf8(p.clone()).unwrap().parse().unwrap())
            .collect();
        let at = self.now + 1 + self.rng.below(10);
        // Once failures stop, a write still fails now and then, but an epoch's at most 3
        // times (a schedule's retries of one quiesced epoch all failed).
        let fails = self.rng.chance(100)
            && (self.lossy || {
                let n = self.calm_failures.entry(epoch).or_default();
                *n += 1;
                *n <= 3
            });
        self.manifest_writes
            .push((at, term, epoch, Manifest { previous, parts }, fails));
    }

    /// Deposed leader `i` handles `input`: it still writes manifests, asks for reservations
    /// and sends to participants (on links of its own); it hears from nobody.
    fn run_deposed(&mut self, i: usize, input: LeadInput) {
        let term = self.deposed[i].term;
        let acts = self.deposed[i].leader.handle(input);
        for a in acts {
            match a {
                LeadAction::Send { to, msg } => {
                    self.log(|| format!("deposed leader of term {term}: {msg:?} to {to}"));
                    self.send(DEPOSED, to, msg);
                }
                LeadAction::WriteManifest {
                    epoch,
                    previous,
                    parts,
                } => self.write_manifest(term, epoch, previous, &parts),
                LeadAction::Reserve { through } => {
                    let at = self.now + 1 + self.rng.below(5);
                    self.reserves.push((at, term, through));
                }
                _ => {}
            }
        }
    }

    /// The participants the control group knows: those that joined the epochs and did not
    /// leave them, with their incarnations.
    fn participants(&self) -> BTreeMap<NodeId, u64> {
        self.parts
            .iter()
            .filter(|(_, p)| !p.waiting && !p.retired)
            .map(|(id, p)| (*id, p.incarnation))
            .collect()
    }

    fn participants_input(&mut self) {
        let p = self.participants();
        self.lead(LeadInput::Participants(p));
    }

    /// Participant `id` owns nothing and leaves the epochs.
    fn retire(&mut self, id: NodeId) {
        self.log(|| format!("node {id} retires from the epochs"));
        self.parts.get_mut(&id).unwrap().retired = true;
        self.retiring = Some(id);
        let p = self.participants();
        self.lead(LeadInput::Retire(p));
    }

    fn release(&mut self, id: NodeId, upto: Epoch) -> Result<(), String> {
        let p = self.parts.get_mut(&id).unwrap();
        let mut out = Vec::new();
        while let Some(&e) = p.written.iter().next() {
            if e > upto {
                break;
            }
            p.written.remove(&e);
            if let Some(&last) = p.releases.last() {
                if e <= last {
                    return Err(format!("node {id} released {e} after {last}"));
                }
            }
            p.releases.push(e);
            p.released = e;
            out.push(e);
        }
        for e in out {
            // Safety: acknowledged only once blob storage holds the epoch's manifest with a
            // part of this node.
            match self.blob.get(&e) {
                Some(m) if m.parts.contains(&id) => {}
                Some(m) => {
                    return Err(format!(
                        "node {id} released {e}, whose manifest lists {:?}",
                        m.parts
                    ))
                }
                None => return Err(format!("node {id} released {e} without a manifest")),
            }
            self.log(|| format!("node {id} releases {e}"));
            self.released.push((id, e));
        }
        Ok(())
    }

    fn deliver_to_participant(&mut self, id: NodeId, msg: EpochMsg) -> Result<(), String> {
        let p = self.parts.get_mut(&id).unwrap();
        let gen = msg.gen();
        match msg {
            EpochMsg::Hold { .. } if gen > p.gen || (gen == p.gen && p.holding) => {
                p.gen = gen;
                p.holding = true;
                let held = EpochMsg::Held {
                    gen,
                    committed: p.released,
                    cut: p.cut,
                    shards: 1,
                    cut_gen: p.cut_gen,
                    shard_gen: p.shard_gen,
                };
                self.send(id, LEADER, held);
            }
            EpochMsg::Stop { at, .. } if gen == p.gen && !p.holding => {
                // Safety: no shard may have cut the epoch it is asked to stop at.
                if p.cut >= at {
                    return Err(format!(
                        "node {id} is asked to stop at epoch {at}, but it cut {} already",
                        p.cut
                    ));
                }
                p.stop_at = Some(at);
                // Now and then the answer never comes (the leader's timeout moves the old way).
                if !self.rng.chance(20) {
                    self.send(id, LEADER, EpochMsg::Stopping { gen });
                }
            }
            EpochMsg::Resume {
                committed,
                live,
                shards_gen,
                ..
            } if gen == p.gen && p.holding && live && p.shard_gen == 0 && p.releases.is_empty() => {
                // New to the epochs (it owns nothing): it takes the others' shard generation
                // and goes on after `committed` (the node rolls back to it, losing nothing).
                if p.cut > committed {
                    return Err(format!(
                        "node {id} joins live at {committed}, but it cut {} of its own",
                        p.cut
                    ));
                }
                p.shard_gen = shards_gen;
                p.cut_gen = gen;
                p.released = committed;
                p.cut = committed;
                p.announced = committed;
                p.floor = committed;
                p.holding = false;
                p.stop_at = None;
                p.stopped = None;
                self.joined_live += 1;
                self.send(id, LEADER, EpochMsg::Reconfigured { gen });
            }
            EpochMsg::Resume {
                committed,
                live,
                shards_gen,
                ..
            } if gen == p.gen && p.holding && live => {
                if shards_gen != p.shard_gen {
                    return Err(format!(
                        "node {id} resumes live with shard generation {shards_gen}, but its shards have {}",
                        p.shard_gen
                    ));
                }
                // Safety: a live move rolls nobody back, so every participant must have
                // stopped the moving key groups at its cut of `committed`, released it, and
                // cut nothing after it.
                // (A participant taken in live moves nothing: nobody was asked to stop.)
                let stopped_ok = p.stop_at.is_none() || p.stopped == Some(committed);
                if !stopped_ok || p.cut != committed || p.released != committed {
                    return Err(format!(
                        "node {id} resumes live at {committed}, but it stopped at {:?}, cut {} and released {}",
                        p.stopped, p.cut, p.released
                    ));
                }
                p.cut_gen = gen;
                p.holding = false;
                p.stop_at = None;
                p.stopped = None;
                self.live += 1;
                // (The first synchronisation of a leader that took over after a hand-over.)
                if self.handoff_term == self.term && gen == (self.term << 32) + 1 {
                    self.handed_live += 1;
                }
                if self.retiring.is_some_and(|r| r != id) {
                    self.retiring = None;
                    self.retired_live += 1;
                }
                // Now and then it never answers (the leader's timeout synchronises again).
                if !self.rng.chance(15) {
                    self.send(id, LEADER, EpochMsg::Reconfigured { gen });
                }
            }
            EpochMsg::Resume {
                committed,
                base,
                manifest,
                release,
                ..
            } if gen == p.gen && p.holding => {
                if self.retiring.is_some_and(|r| r != id) {
                    // Taken out the old way (a rollback).
                    self.retiring = None;
                }
                let p = self.parts.get_mut(&id).unwrap();
                p.stop_at = None;
                p.stopped = None;
                p.shard_gen = gen;
                // Epochs of its own still open are released only when the leader says they
                // are the committed ones: otherwise they may have been abandoned while it was
                // left out (another participant's epochs of the same numbers committed
                // since); committed ones come back from blob storage, and their callers retry
                // (as `node/src/checkpoint/driver.rs` does).
                let open = p.cut > p.released.max(p.floor);
                if !open || release {
                    if open && committed > p.released {
                        self.released_open += 1;
                    }
                    self.release(id, committed)?;
                }
                let p = self.parts.get_mut(&id).unwrap();
                p.cut_gen = gen;
                // Committed epochs it missed are read from blob storage (their chain).
                if manifest.is_some_and(|m| m > p.released) {
                    p.released = committed;
                }
                // Open epochs are abandoned; epochs go on after `base`.
                p.written.clear();
                p.writing = None;
                p.cut = base.max(p.cut);
                p.announced = p.cut;
                p.floor = p.cut;
                p.holding = false;
            }
            EpochMsg::Barrier {
                epoch, snapshot, ..
            } if gen == p.gen && !p.holding && epoch == p.announced + 1 => {
                p.announced = epoch;
                // A move's snapshot is listed (in the node, with a later part), or it is
                // never answered (the leader's timeout goes on without it).
                if !snapshot.is_empty() && !self.rng.chance(10) {
                    self.send(id, LEADER, EpochMsg::Prepared { gen });
                }
            }
            EpochMsg::Committed { epoch, .. } if gen == p.gen && !p.holding => {
                self.release(id, epoch)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn step_participants(&mut self) {
        let ids: Vec<NodeId> = self.parts.keys().copied().collect();
        for id in ids {
            let now = self.now;
            if self.parts[&id].paused_until > now {
                continue;
            }
            let (cut_now, write_done) = {
                let p = &self.parts[&id];
                (
                    !p.holding && p.cut < p.announced,
                    p.writing.is_some_and(|(_, at)| at <= now),
                )
            };
            if cut_now && self.rng.chance(500) {
                let p = self.parts.get_mut(&id).unwrap();
                p.cut += 1;
                if p.stop_at == Some(p.cut) {
                    p.stopped = Some(p.cut);
                }
                let msg = EpochMsg::Cut {
                    gen: p.gen,
                    epoch: p.cut,
                };
                self.send(id, LEADER, msg);
            }
            if write_done {
                let fails = self.rng.chance(50);
                let p = self.parts.get_mut(&id).unwrap();
                let (e, _) = p.writing.take().unwrap();
                if fails {
                    // Retried.
                    p.writing = Some((e, now + 3));
                } else {
                    p.written.insert(e);
                    let msg = EpochMsg::Part {
                        gen: p.gen,
                        epoch: e,
                        objects: id.to_string().into_bytes(),
                        owned: Vec::new(),
                    };
                    self.send(id, LEADER, msg);
                }
            }
            let d = self.rng.below(6);
            let p = self.parts.get_mut(&id).unwrap();
            if p.writing.is_none() && !p.holding {
                let next = p
                    .written
                    .iter()
                    .next_back()
                    .copied()
                    .unwrap_or(0)
                    .max(p.released)
                    .max(p.floor)
                    + 1;
                if next <= p.cut && next > p.released {
                    p.writing = Some((next, now + 1 + d));
                }
            }
        }
    }

    fn restart(&mut self, id: NodeId) {
        let latest = self.latest().unwrap_or(0);
        let p = self.parts.get_mut(&id).unwrap();
        p.incarnation += 1;
        p.paused_until = 0;
        p.gen = 0;
        p.shard_gen = 0;
        p.holding = true;
        p.released = p.released.max(latest);
        p.releases.clear();
        p.cut = p.released;
        p.announced = p.cut;
        p.floor = p.cut;
        p.written.clear();
        p.writing = None;
        p.stop_at = None;
        p.stopped = None;
        let at = p.released;
        // Messages to and from the old process are gone.
        for ((from, to), q) in self.links.iter_mut() {
            if *from == id || *to == id {
                q.clear();
            }
        }
        self.log(|| format!("node {id} restarts at {at}"));
        self.restarts += 1;
        self.participants_input();
    }

    fn new_leader(&mut self) {
        let old_term = self.term;
        self.term += 1;
        // A new leader knows what the control group recorded: at most the newest manifest.
        let recorded = self.latest().unwrap_or(0).saturating_sub(self.rng.below(3));
        let old = std::mem::replace(
            &mut self.leader,
            EpochLeader::new(self.term << 32, 5, 4, 200, recorded)
                .reserve_epochs()
                .exclude_after(Some(EXCLUDE_AFTER))
                .move_timeouts(STOP_AFTER, RECONFIGURE_AFTER),
        );
        // The old one runs on for a while; its last confirmation came at most now. Now and
        // then it is paused, with the participant on its node, long enough for its successor
        // to leave that participant out (`EXCLUDE_AFTER`) and read the newest manifest.
        let lease_until = self.now + LEASE - self.rng.below(2);
        let ids: Vec<NodeId> = self.participants().into_keys().collect();
        let paused_until = if self.lossy && ids.len() > 1 && self.rng.chance(400) {
            let until = self.now + 10 + self.rng.below(80);
            let host = ids[self.rng.below(ids.len() as u64) as usize];
            self.log(|| {
                format!("the leader of term {old_term} is paused with node {host} until {until}")
            });
            let p = self.parts.get_mut(&host).unwrap();
            p.paused_until = p.paused_until.max(until);
            for w in self.manifest_writes.iter_mut().filter(|w| w.1 == old_term) {
                w.0 = w.0.max(until + 1);
            }
            self.pauses += 1;
            until
        } else {
            0
        };
        let until = self.now.max(paused_until) + 1 + self.rng.below(20);
        self.deposed.push(Deposed {
            leader: old,
            term: old_term,
            lease_until,
            until,
            paused_until,
        });
        self.lead_since = self.now;
        if let Some(h) = self.handoff.clone() {
            self.leader.handed_over(h);
            self.handoff_term = self.term;
        }
        self.transfer_at = None;
        self.reads.clear();
        for ((from, to), q) in self.links.iter_mut() {
            if *from == LEADER || *to == LEADER {
                q.clear();
            }
        }
        self.log(|| format!("leader of term {} takes over", self.term));
        self.takeovers += 1;
        self.participants_input();
    }

    fn step(&mut self, chaos: bool) -> Result<(), String> {
        self.now += 1;
        self.lossy = chaos;
        if chaos && self.rng.chance(4) {
            self.new_leader();
        }
        // A leader about to hand its leadership over (its node stops): the epochs stand still
        // first, and its successor takes over once it says where.
        if self.rng.chance(if chaos { 8 } else { 2 }) {
            self.log(|| "the leader is asked to hand the epochs over".to_string());
            self.lead(LeadInput::HandOff);
        }
        if self.transfer_at.is_some_and(|t| t <= self.now) {
            self.new_leader();
        }
        if (chaos && self.rng.chance(5)) || (!chaos && self.rng.chance(3)) {
            // The control group plans a move of key groups (also once failures stopped: those
            // moves go live). Without a plan a move quiesces an epoch and rolls back.
            let snapshot = if !self.rng.chance(300) {
                vec![1, 2]
            } else {
                Vec::new()
            };
            self.lead(LeadInput::Handover { snapshot });
        }
        let now = self.now;
        let (done, left): (Vec<_>, Vec<_>) = std::mem::take(&mut self.moves)
            .into_iter()
            .partition(|m| m.0 <= now);
        self.moves = left;
        for (_, term) in done {
            if term == self.term {
                self.lead(LeadInput::Moved);
            }
        }
        if chaos && self.rng.chance(3) {
            let ids: Vec<NodeId> = self.parts.keys().copied().collect();
            let id = ids[self.rng.below(ids.len() as u64) as usize];
            self.restart(id);
        }
        // Manifest writes, the deposed leaders' included.
        let now = self.now;
        let (done, left): (Vec<_>, Vec<_>) = std::mem::take(&mut self.manifest_writes)
            .into_iter()
            .partition(|w| w.0 <= now);
        self.manifest_writes = left;
        for (_, term, epoch, m, fails) in done {
            let result = if fails {
                Err("injected".to_string())
            } else if self.writers.get(&epoch) == Some(&term) {
                // Its own earlier attempt, recognised by its writer id (as the node's
                // `CheckpointStore::commit` does after an ambiguous put).
                Ok(true)
            } else if self.blob.contains_key(&epoch) {
                Err(format!("manifest {epoch} exists"))
            } else {
                self.log(|| format!("manifest {epoch} written (term {term}): {m:?}"));
                if term < self.term {
                    self.late += 1;
                }
                self.blob.insert(epoch, m);
                self.writers.insert(epoch, term);
                if self.rng.chance(80) {
                    // Stored, but the writer saw an error (an ambiguous put).
                    self.log(|| format!("manifest {epoch}: stored, the writer sees an error"));
                    Err("ambiguous".to_string())
                } else {
                    Ok(true)
                }
            };
            if term == self.term {
                self.lead(LeadInput::ManifestDone { epoch, result });
            } else if let Some(i) = self
                .deposed
                .iter()
                .position(|d| d.term == term && d.until > now)
            {
                // A deposed leader passes it on only within its lease (once held, every later
                // one is held too: its lease is not renewed again).
                if !self.lease_guard || now < self.deposed[i].lease_until {
                    self.log(|| {
                        format!("deposed leader of term {term} passes manifest {epoch}'s end on")
                    });
                    self.deposed_passed += 1;
                    self.run_deposed(i, LeadInput::ManifestDone { epoch, result });
                } else {
                    self.log(|| format!("deposed leader of term {term} holds manifest {epoch}'s end (its lease lapsed)"));
                    self.deposed_held += 1;
                    self.deposed[i].lease_until = 0;
                }
            }
        }
        let (done, left): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| r.0 <= now);
        self.reads = left;
        for (_, term) in done {
            if term == self.term {
                let r = if chaos && self.rng.chance(50) {
                    Err("injected".into())
                } else {
                    Ok(self.latest())
                };
                // The control group's reservation as it stands once the leader's fence
                // applied (every reservation an earlier leader used is in it).
                self.lead(LeadInput::Reserved {
                    through: self.reserved,
                });
                self.lead(LeadInput::Latest(r));
            }
        }
        // Reservations of epoch numbers applying (or lost).
        let (done, left): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reserves)
            .into_iter()
            .partition(|r| r.0 <= now);
        self.reserves = left;
        for (_, term, through) in done {
            if chaos && self.rng.chance(50) {
                self.log(|| format!("reservation through {through} (term {term}) lost"));
                continue;
            }
            self.log(|| format!("reservation through {through} (term {term}) applied"));
            self.reserved = self.reserved.max(through);
            self.reservations += 1;
            if term == self.term {
                let through = self.reserved;
                self.lead(LeadInput::Reserved { through });
            }
        }
        // Deliveries due, link by link (FIFO).
        let keys: Vec<(NodeId, NodeId)> = self.links.keys().copied().collect();
        for k in keys {
            while let Some((at, _)) = self.links[&k].front() {
                let paused = self.parts.get(&k.1).is_some_and(|p| p.paused_until > now);
                if *at > now || paused {
                    break;
                }
                let (_, msg) = self.links.get_mut(&k).unwrap().pop_front().unwrap();
                let (from, to) = k;
                self.log(|| format!("{from}->{to} {msg:?}"));
                if to == LEADER {
                    self.lead(LeadInput::Msg { from, msg });
                } else {
                    if from == DEPOSED
                        && matches!(msg, EpochMsg::Committed { .. })
                        && self.parts[&to].gen == msg.gen()
                        && !self.parts[&to].holding
                    {
                        // (A deposed leader's commit that the participant follows.)
                        self.deposed_followed += 1;
                    }
                    self.deliver_to_participant(to, msg)?;
                }
            }
        }
        self.step_participants();
        for n in std::mem::take(&mut self.unreachable) {
            self.lead(LeadInput::Unreachable(n));
        }
        self.lead(LeadInput::Tick { now_ms: now });
        self.deposed.retain(|d| d.until > now);
        for i in 0..self.deposed.len() {
            if self.deposed[i].paused_until <= now {
                self.run_deposed(i, LeadInput::Tick { now_ms: now });
            }
        }
        if !self.leader.excluded().is_empty() {
            self.excluded_steps += 1;
        }
        Ok(())
    }

    /// The epochs of the chain from the newest manifest.
    fn chain(&self) -> BTreeSet<Epoch> {
        let mut out = BTreeSet::new();
        let mut cur = self.latest();
        while let Some(e) = cur {
            out.insert(e);
            cur = self.blob.get(&e).and_then(|m| m.previous);
        }
        out
    }
}

/// What a schedule went through: (releases, leader takeovers, participant restarts, late
/// manifests of deposed leaders, rounds of moves proposed).
fn run(seed: u64, lease_guard: bool) -> Result<[u64; 17], String> {
    let mut rng = Rng(seed.max(1));
    let n = 1 + rng.below(3);
    let mut w = World {
        lease_guard,
        deposed: Vec::new(),
        lead_since: 0,
        deposed_passed: 0,
        deposed_held: 0,
        pauses: 0,
        deposed_followed: 0,
        trace: std::env::var("SIM_TRACE").is_ok(),
        leader: EpochLeader::new(1 << 32, 5, 4, 200, 0)
            .reserve_epochs()
            .exclude_after(Some(EXCLUDE_AFTER))
            .move_timeouts(STOP_AFTER, RECONFIGURE_AFTER),
        rng,
        now: 0,
        term: 1,
        parts: (1..=n)
            .map(|id| {
                (
                    id,
                    Participant {
                        holding: true,
                        ..Default::default()
                    },
                )
            })
            .collect(),
        links: BTreeMap::new(),
        blob: BTreeMap::new(),
        writers: BTreeMap::new(),
        manifest_writes: Vec::new(),
        reads: Vec::new(),
        moves: Vec::new(),
        released: Vec::new(),
        lossy: false,
        late: 0,
        takeovers: 0,
        restarts: 0,
        moves_proposed: 0,
        excluded_steps: 0,
        released_open: 0,
        unreachable: Vec::new(),
        live: 0,
        joined_live: 0,
        retiring: None,
        retired_live: 0,
        handoff: None,
        transfer_at: None,
        handoff_term: 0,
        calm_failures: BTreeMap::new(),
        handoffs: 0,
        handed_live: 0,
        reserved: 0,
        reserves: Vec::new(),
        reservations: 0,
    };
    // Now and then the last member joins the epochs later (it owns nothing until then).
    let joins_at = (n > 1 && w.rng.chance(500)).then(|| 1 + w.rng.below(5_000));
    if joins_at.is_some() {
        w.parts.get_mut(&n).unwrap().waiting = true;
    }
    // Now and then (three members) another joins soon after it, often while the first is
    // being taken in (a cluster scaled out by two members at once).
    let second_at = joins_at
        .filter(|_| n == 3 && w.rng.chance(500))
        .map(|at| at + w.rng.below(60));
    if second_at.is_some() {
        w.parts.get_mut(&(n - 1)).unwrap().waiting = true;
    }
    // Now and then (three members, none joining later) the last one leaves the epochs, as a
    // member whose key groups were handed over by a leave does.
    let retires_at =
        (n == 3 && joins_at.is_none() && w.rng.chance(500)).then(|| 1 + w.rng.below(5_000));
    w.participants_input();
    let join = |w: &mut World| {
        if joins_at == Some(w.now) {
            w.log(|| format!("node {n} joins the epochs"));
            w.parts.get_mut(&n).unwrap().waiting = false;
            w.participants_input();
        }
        if second_at == Some(w.now) {
            w.log(|| format!("node {} joins the epochs", n - 1));
            w.parts.get_mut(&(n - 1)).unwrap().waiting = false;
            w.participants_input();
        }
        // As the node's leader does, the retirement waits for a move under way (for a while).
        if let Some(at) = retires_at.filter(|&at| w.now >= at && !w.parts[&n].retired) {
            if w.leader.ready_to_move() || w.now >= at + 300 {
                w.retire(n);
            }
        }
    };
    for _ in 0..3_000 {
        w.step(true)?;
        join(&mut w);
    }
    // Failures stop: epochs commit again.
    let before = w.released.len();
    for _ in 0..3_000 {
        w.step(false)?;
        join(&mut w);
    }
    // Leftover manifest writes of deposed leaders land (or not) before the final check.
    while !w.manifest_writes.is_empty() || !w.deposed.is_empty() {
        w.step(false)?;
    }
    if w.released.len() <= before + n as usize {
        return Err(format!(
            "no progress once failures stopped: {} releases before, {} after",
            before,
            w.released.len()
        ));
    }
    // Nothing acknowledged is orphaned: every released epoch is in the final chain.
    let chain = w.chain();
    for (id, e) in &w.released {
        if !chain.contains(e) {
            return Err(format!(
                "node {id} released epoch {e}, which the final chain skips (newest manifest {:?})",
                w.latest()
            ));
        }
    }
    Ok([
        w.released.len() as u64,
        w.takeovers,
        w.restarts,
        w.late,
        w.moves_proposed,
        w.excluded_steps,
        w.released_open,
        w.live,
        w.joined_live,
        w.retired_live,
        w.handoffs,
        w.handed_live,
        w.reservations,
        w.deposed_passed,
        w.deposed_held,
        w.pauses,
        w.deposed_followed,
    ])
}

#[test]
fn the_leader_synchronises_participants_safely_through_leader_changes_losses_and_restarts() {
    if let Ok(s) = std::env::var("SIM_SEED") {
        let seed: u64 = s.parse().expect("SIM_SEED is a number");
        // (`SIM_NO_LEASE=1`: without the lease rules, as the second test runs them.)
        if let Err(e) = run(seed, std::env::var("SIM_NO_LEASE").is_err()) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut total = [0u64; 17];
    let mut failed = Vec::new();
    for seed in 1..=seeds {
        match run(seed, true) {
            Ok(t) => (0..17).for_each(|i| total[i] += t[i]),
            Err(e) => {
                eprintln!("seed {seed} (SIM_SEED={seed} reproduces it): {e}");
                failed.push(seed);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} schedules failed: {failed:?}",
        failed.len()
    );
    println!(
        "{seeds} schedules passed: {} releases, {} leader takeovers, {} participant restarts, {} manifests of deposed leaders landing late, {} rounds of moves proposed, {} steps with a participant left out, {} resumes releasing open epochs, {} live resumes (moves that rolled nobody back), {} participants taken in live, {} taken out live, {} hand-overs of the epochs by a leader, {} participants resumed live by its successor, {} reservations of epoch numbers applied, {} manifest writes' ends passed on by a deposed leader within its lease, {} held by one whose lease had lapsed, {} deposed leaders paused with a participant, {} of their commits followed by a participant",
        total[0], total[1], total[2], total[3], total[4], total[5], total[6], total[7], total[8], total[9], total[10], total[11], total[12], total[13], total[14], total[15], total[16]
    );
    assert!(
        total[16] > 0,
        "no participant followed a deposed leader's commit"
    );
    assert!(total[15] > 0, "no deposed leader was paused");
    assert!(
        total[13] > 0,
        "no deposed leader passed a manifest write's end on"
    );
    assert!(
        total[14] > 0,
        "no deposed leader held a manifest write's end"
    );
    assert!(total[12] > 0, "no reservation of epoch numbers applied");
    assert!(total[10] > 0, "no leader handed the epochs over");
    assert!(
        total[11] > 0,
        "no leader resumed the participants live after a hand-over"
    );
    assert!(total[9] > 0, "no participant was taken out live");
    assert!(total[8] > 0, "no participant was taken in live");
    assert!(total[7] > 0, "no move was handed over live");
    assert!(
        total[6] > 0,
        "no resume let a participant release its open epochs"
    );
    assert!(total[5] > 0, "no schedule left a participant out");
    assert!(total[4] > 0, "no schedule proposed a move");
    assert!(
        total[3] > 0,
        "no schedule let a deposed leader's manifest land late"
    );
}

/// The schedules without the lease rules (a deposed leader passes every manifest write's end
/// on, and a new leader reads the newest manifest at once): some lose an acknowledged epoch,
/// so the simulation does find the gap the rules close. (It searches the first 5,000 seeds
/// and stops at the first loss; `SIM_NO_LEASE=1 SIM_SEED=<n>` traces one with `SIM_TRACE=1`.)
#[test]
fn without_the_lease_rules_a_deposed_leaders_commit_can_be_lost() {
    const SEEDS: u64 = 5000;
    for seed in 1..=SEEDS {
        match run(seed, false) {
            Err(e)
                if e.contains("which the final chain skips")
                    || e.contains("without a manifest") =>
            {
                println!("seed {seed} without the lease rules: {e}");
                return;
            }
            Err(e) => panic!("seed {seed} failed otherwise without the lease rules: {e}"),
            Ok(_) => {}
        }
    }
    panic!("no schedule of {SEEDS} lost anything without the lease rules");
}
