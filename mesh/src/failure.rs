//! Failures (issue 9), pure: the leader's failure detector, every member's ownership lease,
//! and the leader's choice of Raft configuration changes when members die.
//!
//! **Detection.** Raft's heartbeats are the heartbeats: the leader sends one to every member
//! each heartbeat interval and every member answers, so the leader hears from each live
//! member several times a second. A member the leader has not heard from for `timeout_ms` is
//! *suspected*; one still silent `stability_ms` later is declared dead (a `MarkDead` entry),
//! provided the leader itself heard from a majority of the voters meanwhile (a leader that is
//! the one cut off declares nobody dead; it steps down instead). A leader counts silence from
//! when it took over, and a member from when its current generation appeared.
//!
//! **Lease.** A member serves its key groups only while it can prove it still owns them: it
//! asks the leader for a read index (raft-rs `ReadIndex`, confirmed by a heartbeat round with
//! a majority) every `lease_ms / 4` (every `lease_ms / 20` while it holds none); once it has applied up to the index returned, it holds a
//! lease until `sent + lease_ms`, where `sent` is when it asked. The leader received the ask
//! after `sent`, so it heard from the member after `sent`, and declares it dead no earlier
//! than `sent + timeout_ms + stability_ms`: with `lease_ms < timeout_ms`, a member cut off
//! from the majority stops serving before the majority even proposes its death, let alone
//! moves its key groups. A member that applied its own death holds no lease.

use std::collections::BTreeMap;

use crate::control::{ClusterState, Role};
use crate::placement::NodeId;

/// The detector's and the lease's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureConfig {
    /// Silence after which a member is suspected.
    pub timeout_ms: u64,
    /// How long a suspicion must hold before the member is declared dead.
    pub stability_ms: u64,
    /// How long a confirmed read index lets a member serve (must be below `timeout_ms`).
    pub lease_ms: u64,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            timeout_ms: 1_500,
            stability_ms: 300,
            lease_ms: 1_000,
        }
    }
}

impl FailureConfig {
    /// Checks the timing; the error names what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.timeout_ms < 200 {
            return Err(format!(
                "failure_timeout_ms: {} is below 200 (heartbeats go every 150 ms)",
                self.timeout_ms
            ));
        }
        if self.lease_ms < 100 || self.lease_ms >= self.timeout_ms {
            return Err(format!(
                "lease_ms: {} must be at least 100 and below failure_timeout_ms ({}): a node cut off must stop serving before the others declare it dead",
                self.lease_ms, self.timeout_ms
            ));
        }
        Ok(())
    }

    /// How long after the last message from a member the leader declares it dead.
    pub fn detection_ms(&self) -> u64 {
        self.timeout_ms + self.stability_ms
    }
}

/// The leader's failure detector.
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: FailureConfig,
    /// Leading since (`None`: not leading, nothing is detected).
    since_ms: Option<u64>,
    /// Per member: the generation seen, and when the leader last heard from it.
    heard: BTreeMap<NodeId, (u64, u64)>,
    /// Per member: suspected since.
    suspected: BTreeMap<NodeId, u64>,
    /// When each member was last heard while this node did not lead (a follower hears the
    /// leader's heartbeats): a new leader counts the silence of the leader it replaces from
    /// its last heartbeat, not from its own election.
    heard_as_follower: BTreeMap<NodeId, u64>,
    /// While leading: when a message from each member last arrived (only messages: `heard`
    /// also holds the times a member's silence is counted from).
    last_message: BTreeMap<NodeId, u64>,
    /// Members that said they stopped (an applied `MarkDead { stopped: true }`), with the
    /// generation they stopped at: they gave up their leases first.
    released: BTreeMap<NodeId, u64>,
}

impl Detector {
    /// A detector with this timing.
    pub fn new(cfg: FailureConfig) -> Self {
        Detector {
            cfg,
            since_ms: None,
            heard: BTreeMap::new(),
            suspected: BTreeMap::new(),
            heard_as_follower: BTreeMap::new(),
            last_message: BTreeMap::new(),
            released: BTreeMap::new(),
        }
    }

    /// A message from `id` arrived.
    pub fn heard(&mut self, id: NodeId, now_ms: u64) {
        if self.since_ms.is_none() {
            let h = self.heard_as_follower.entry(id).or_insert(now_ms);
            *h = (*h).max(now_ms);
            return;
        }
        let h = self.heard.entry(id).or_insert((0, now_ms));
        h.1 = h.1.max(now_ms);
        let m = self.last_message.entry(id).or_insert(now_ms);
        *m = (*m).max(now_ms);
    }

    /// Whether this node leads now (`previous`: the leader it knew before). Taking over
    /// starts every member's count afresh, except the previous leader's: its silence counts
    /// from its last heartbeat heard here. (Its key groups still move only once
    /// [`Detector::may_take_over`], counted from the takeover.)
    pub fn leading(&mut self, leading: bool, now_ms: u64, previous: Option<NodeId>) {
        match (leading, self.since_ms) {
            (true, None) => {
                self.since_ms = Some(now_ms);
                self.heard.clear();
                self.last_message.clear();
                self.suspected.clear();
                if let Some((l, t)) =
                    previous.and_then(|l| self.heard_as_follower.get(&l).map(|t| (l, *t)))
                {
                    self.heard.insert(l, (0, t.min(now_ms)));
                }
                self.heard_as_follower.clear();
            }
            (false, Some(_)) => self.since_ms = None,
            _ => {}
        }
    }

    /// Whether the key groups of member `id` (declared dead) may move to others now: every
    /// ownership lease it may hold has expired. A lease runs `lease_ms` from an ask that the
    /// leader received, and so heard, later; asks answered by an earlier leader were sent
    /// before this one took over. (Its death may have been proposed before an ask arrived and
    /// committed after the answer: the answer then let it serve on, up to `lease_ms`.)
    ///
    /// At once for a member that said it stopped at `generation` ([`Detector::stopped`]): it
    /// gave up its lease before it said so, and a later lease would be a later generation's.
    pub fn may_take_over(&self, id: NodeId, generation: u64, now_ms: u64) -> bool {
        let Some(since) = self.since_ms else {
            return false;
        };
        if self.released.get(&id) == Some(&generation) {
            return true;
        }
        // (From the takeover at the earliest, whatever was heard as a follower: a lease the
        // previous leader confirmed with others' heartbeats may have run past the last one
        // heard here.)
        let last = self.heard.get(&id).map_or(since, |h| h.1.max(since));
        now_ms >= last + self.cfg.lease_ms
    }

    /// Member `id` said it stopped at `generation` (an applied `MarkDead { stopped: true }`,
    /// which it proposed after giving up its ownership lease): told on every member, as the
    /// entry applies, so that whichever leads may move its key groups at once.
    pub fn stopped(&mut self, id: NodeId, generation: u64) {
        self.released.insert(id, generation);
    }

    /// Member `id` joined again or was removed (an applied `Join` or `Remove`): its stop no
    /// longer counts (a node given the same id later starts again at generation 1).
    pub fn forget_stop(&mut self, id: NodeId) {
        self.released.remove(&id);
    }

    /// Whether this leader heard from member `id` in the last `within_ms` (a sign of life
    /// that lasts: Raft's own `recent_active` is cleared for every peer at each quorum check,
    /// so right after one every voter reads as silent). False when not leading.
    pub fn heard_within(&self, id: NodeId, now_ms: u64, within_ms: u64) -> bool {
        self.since_ms.is_some()
            && self
                .last_message
                .get(&id)
                .is_some_and(|&t| now_ms.saturating_sub(t) <= within_ms)
    }

    /// The members suspected now (for the view).
    pub fn suspected(&self) -> Vec<NodeId> {
        self.suspected.keys().copied().collect()
    }

    /// The live members of `state` (other than `me`) to declare dead now, with their
    /// generations. Called often (each round); the caller proposes `MarkDead` for each.
    pub fn check(&mut self, now_ms: u64, me: NodeId, state: &ClusterState) -> Vec<(NodeId, u64)> {
        let Some(since) = self.since_ms else {
            return Vec::new();
        };
        // Members to watch, each counted from when its generation appeared (or from now).
        let live: BTreeMap<NodeId, u64> = state
            .members
            .values()
            .filter(|m| m.alive && m.id != me)
            .map(|m| (m.id, m.generation))
            .collect();
        // (Dead members stay: `may_take_over` needs when they were last heard.)
        self.heard.retain(|id, _| state.members.contains_key(id));
        self.last_message
            .retain(|id, _| state.members.contains_key(id));
        self.suspected.retain(|id, _| live.contains_key(id));
        for (&id, &generation) in &live {
            let h = self.heard.entry(id).or_insert((generation, since));
            if h.0 == 0 {
                // Heard before its record was seen (or the previous leader, heard as a
                // follower).
                h.0 = generation;
            } else if h.0 != generation {
                // A new generation (it rejoined): counted from now.
                *h = (generation, now_ms.max(h.1));
            }
        }
        // A member not yet in the Raft group (joined while a change of the group was under
        // way, say) gets no replication to answer, so it cannot be heard: its silence counts
        // from when it is added, not from its join (declared dead before that, it would never
        // be added, nor learn that it was declared dead).
        if let Some(c) = &state.conf {
            for (id, h) in self.heard.iter_mut() {
                if live.contains_key(id) && !c.lists(*id) {
                    h.1 = h.1.max(now_ms);
                }
            }
        }
        // The leader counts as heard; a majority of the voters must have been heard lately.
        let voters: Vec<NodeId> = match &state.conf {
            Some(c) => c.voters.clone(),
            None => Vec::new(),
        };
        let recent = voters
            .iter()
            .filter(|v| {
                **v == me
                    || self
                        .heard
                        .get(v)
                        .is_some_and(|h| now_ms < h.1 + self.cfg.timeout_ms)
            })
            .count();
        let quorum = !voters.is_empty() && recent > voters.len() / 2;
        let mut dead = Vec::new();
        for (&id, &(generation, last)) in self.heard.iter().filter(|(id, _)| live.contains_key(id))
        {
            if now_ms >= last + self.cfg.timeout_ms {
                let s = *self.suspected.entry(id).or_insert(now_ms);
                if quorum && now_ms >= s + self.cfg.stability_ms {
                    dead.push((id, generation));
                }
            } else {
                self.suspected.remove(&id);
            }
        }
        dead
    }
}

/// A member's ownership lease (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Lease {
    cfg: FailureConfig,
    /// Part of every context: the leader keeps one pending read per context, so two members
    /// (or two starts of one) must never ask with the same one.
    salt: u64,
    next_ctx: u64,
    /// Read indexes asked and not answered: ctx → sent.
    asked: BTreeMap<u64, u64>,
    /// Answered, waiting to be applied: (index, sent).
    answered: Vec<(u64, u64)>,
    last_ask_ms: Option<u64>,
    until_ms: u64,
}

impl Lease {
    /// No lease yet. `salt` must be unique to this member and process start (the leader
    /// drops a read index asked with a context it already has pending).
    pub fn new(cfg: FailureConfig, salt: u64) -> Self {
        Lease {
            cfg,
            salt,
            next_ctx: 1,
            asked: BTreeMap::new(),
            answered: Vec::new(),
            last_ask_ms: None,
            until_ms: 0,
        }
    }

    /// The read index to ask now, if one is due (its context, to hand to `read_index`): every
    /// `lease_ms / 4` while it holds a lease, every `lease_ms / 20` while it holds none (a
    /// member that just joined, and may be given key groups at once, serves them within tens of
    /// milliseconds, not a quarter of the lease later).
    pub fn due(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        // Unanswered asks older than the lease cannot extend it any more.
        self.asked
            .retain(|_, sent| now_ms < *sent + self.cfg.lease_ms);
        let every = if now_ms < self.until_ms {
            self.cfg.lease_ms / 4
        } else {
            self.cfg.lease_ms / 20
        };
        if self.last_ask_ms.is_some_and(|t| now_ms < t + every) {
            return None;
        }
        self.last_ask_ms = Some(now_ms);
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        self.asked.insert(ctx, now_ms);
        Some(lease_ctx(self.salt, ctx))
    }

    /// A read state came back (`ctx` as asked, the leader's commit index).
    pub fn read_state(&mut self, ctx: &[u8], index: u64) {
        let Some((salt, ctx)) = parse_ctx(ctx) else {
            return;
        };
        if salt != self.salt {
            return;
        }
        if let Some(sent) = self.asked.remove(&ctx) {
            self.answered.push((index, sent));
        }
    }

    /// This member has applied up to `applied`; `alive` is whether its own record (its
    /// current generation) is alive in that state. Returns the lease's end.
    pub fn applied(&mut self, applied: u64, alive: bool) -> u64 {
        if !alive {
            self.answered.clear();
            self.until_ms = 0;
            return 0;
        }
        let lease = self.cfg.lease_ms;
        let mut until = self.until_ms;
        self.answered.retain(|&(index, sent)| {
            if index <= applied {
                until = until.max(sent + lease);
                false
            } else {
                true
            }
        });
        self.until_ms = until;
        until
    }

    /// Until when this member may serve (ms, the caller's clock).
    pub fn until_ms(&self) -> u64 {
        self.until_ms
    }

    /// Ends the lease now (the member learned it was declared dead, say).
    pub fn revoke(&mut self) {
        self.until_ms = 0;
        self.answered.clear();
        self.asked.clear();
    }
}

const LEASE_TAG: &[u8; 6] = b"lease:";

fn lease_ctx(salt: u64, n: u64) -> Vec<u8> {
    let mut v = LEASE_TAG.to_vec();
    v.extend_from_slice(&salt.to_be_bytes());
    v.extend_from_slice(&n.to_be_bytes());
    v
}

fn parse_ctx(b: &[u8]) -> Option<(u64, u64)> {
    let rest = b.strip_prefix(LEASE_TAG.as_slice())?;
    if rest.len() != 16 {
        return None;
    }
    let (salt, n) = rest.split_at(8);
    Some((
        u64::from_be_bytes(salt.try_into().ok()?),
        u64::from_be_bytes(n.try_into().ok()?),
    ))
}

/// The number of voters wanted for `live` live members: 1 for up to 2, 3 for 3–4, 5 from 5.
pub fn voters_wanted(live: usize) -> usize {
    match live {
        0..=2 => 1,
        3 | 4 => 3,
        _ => 5,
    }
}

/// The next Raft configuration change the leader proposes (one joint change at a time), given
/// the state and which learners are caught up. `None`: the configuration fits.
///
/// - Live members not in the configuration are added as learners.
/// - A dead voter is swapped for a caught-up live learner in one change (the group keeps its
///   size). Without such a learner it stays a voter: it may come back, and removing it would
///   shrink the group below what its members were promised. (Except when a voter leaves and
///   the voters that stay would have no live majority: then the dead ones become learners
///   with it.)
/// - A leaving member that owns nothing leaves the group (a voter's seat to a caught-up
///   learner).
/// - Live learners are promoted (caught up) while fewer voters than wanted are live and no
///   voter is dead.
pub fn conf_change(
    state: &ClusterState,
    me: NodeId,
    caught_up: &dyn Fn(NodeId) -> bool,
) -> Option<Vec<(NodeId, Option<Role>)>> {
    let conf = state.conf.clone().unwrap_or_default();
    let listed = |id: &NodeId| conf.voters.contains(id) || conf.learners.contains(id);
    // Members that stay: alive and not leaving.
    let alive = state.placement_members();
    let new: Vec<(NodeId, Option<Role>)> = alive
        .iter()
        .filter(|id| !listed(id))
        .map(|&id| (id, Some(Role::Learner)))
        .collect();
    if !new.is_empty() {
        return Some(new);
    }
    let mut candidates = alive
        .iter()
        .filter(|id| conf.learners.contains(id) && caught_up(**id));
    // A member leaving that owns nothing any more leaves the Raft group; a voter's seat goes
    // to a caught-up learner in the same change. The last voter stays until a caught-up
    // learner has become a voter beside it (a change of its own: the next one removes it).
    let departing = state
        .members
        .values()
        .find(|m| m.leaving && listed(&m.id) && state.owned_by(m.id) == 0)
        .map(|m| m.id);
    if departing.is_some_and(|d| conf.voters == [d]) {
        if let Some(&c) = candidates.next() {
            return Some(vec![(c, Some(Role::Voter))]);
        }
    }
    if let Some(d) = departing.filter(|d| conf.voters != [*d]) {
        let mut change = vec![(d, None)];
        let live_voters = conf
            .voters
            .iter()
            .filter(|v| **v != d && alive.contains(v))
            .count();
        if conf.voters.contains(&d) && live_voters < voters_wanted(alive.len()) {
            if let Some(&c) = candidates.next() {
                change.push((c, Some(Role::Voter)));
            }
        }
        if !conf.voters.contains(&d) {
            return Some(change);
        }
        // The voters that stay must hold a live majority of their own: the joint
        // configuration's new half commits nothing otherwise, so the change never completes,
        // the leader steps down, and no leader is elected until a dead voter comes back
        // (voters A, B and X with A dead: X leaving left A and B, B alone could not commit).
        // Dead ones among them become learners in the same change (once back and caught up,
        // they are voters again if fewer voters than wanted are live). With no live voter left
        // beside it, it does not leave the group yet.
        let is_alive = |v: &NodeId| state.members.get(v).is_some_and(|m| m.alive);
        let stay: Vec<NodeId> = conf
            .voters
            .iter()
            .filter(|v| **v != d)
            .chain(change.iter().filter(|(_, r)| r.is_some()).map(|(n, _)| n))
            .copied()
            .collect();
        let live = stay.iter().filter(|v| is_alive(v)).count();
        if live == 0 {
            // (Falls through: nothing below removes it.)
        } else {
            if 2 * live <= stay.len() {
                change.extend(
                    stay.iter()
                        .filter(|v| !is_alive(v))
                        .map(|&v| (v, Some(Role::Learner))),
                );
            }
            return Some(change);
        }
    }
    let dead_voter = conf
        .voters
        .iter()
        .find(|v| state.members.get(v).is_some_and(|m| !m.alive));
    if let Some(&d) = dead_voter {
        if let Some(&c) = candidates.next() {
            return Some(vec![(c, Some(Role::Voter)), (d, Some(Role::Learner))]);
        }
    }
    // (A voter leaving keeps its seat until it departs, then hands it over.)
    let want = voters_wanted(alive.len());
    // (Counting dead members too: a dead voter keeps its seat until a learner can take it.)
    let members = state.members.values().filter(|m| !m.leaving).count();
    if conf.voters.len() > voters_wanted(members) {
        // More voters than the members want (voters listed before they joined, say): a dead
        // one, or one that is not a member, becomes a learner first; else a live one other
        // than the leader.
        let excess = conf
            .voters
            .iter()
            .find(|v| !state.members.get(v).is_some_and(|m| m.alive))
            .or_else(|| conf.voters.iter().rev().find(|v| **v != me));
        if let Some(&v) = excess {
            return Some(vec![(v, Some(Role::Learner))]);
        }
    }
    if dead_voter.is_some() {
        return None;
    }
    let live = state.live_members();
    let voters = conf.voters.iter().filter(|v| live.contains(v)).count();
    let promote: Vec<(NodeId, Option<Role>)> = candidates
        .take(want.saturating_sub(voters))
        .map(|&id| (id, Some(Role::Voter)))
        .collect();
    (!promote.is_empty()).then_some(promote)
}

/// The voter a leader that leaves hands the leadership to: one that stays in the group
/// (`change` does not remove it), preferring one that is alive (not marked dead), then one
/// that answered recently (`active`: heard within a fraction of the failure timeout, which
/// notices a dead peer before the failure detector's mark commits), then the one furthest
/// along (the commit index it reported). Without the first two, a dead voter could win on a
/// tie of commit indexes (an idle log), and a transfer to it only stalls proposals for an
/// election timeout, again and again. `None`: no other voter stays.
pub fn transfer_target(
    state: &ClusterState,
    me: NodeId,
    change: &[(NodeId, Option<Role>)],
    active: &dyn Fn(NodeId) -> bool,
    committed: &dyn Fn(NodeId) -> u64,
) -> Option<NodeId> {
    let conf = state.conf.as_ref()?;
    conf.voters
        .iter()
        .copied()
        .filter(|&v| v != me && !change.iter().any(|(n, r)| *n == v && r.is_none()))
        .max_by_key(|&v| {
            let alive = state.members.get(&v).is_some_and(|m| m.alive);
            (alive, active(v), committed(v))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Command, RaftConf};

    fn cluster(ids: &[NodeId], voters: &[NodeId]) -> ClusterState {
        let mut s = ClusterState::new(8);
        for (i, &id) in ids.iter().enumerate() {
            s.apply(
                i as u64 + 1,
                &Command::Join {
                    id,
                    grpc_addr: String::new(),
                    http_addr: String::new(),
                    role: Role::Learner,
                    incarnation: id,
                    fresh: false,
                },
            );
        }
        let learners = ids
            .iter()
            .filter(|i| !voters.contains(i))
            .copied()
            .collect();
        let n = s.applied_index + 1;
        s.set_conf(
            n,
            RaftConf {
                voters: voters.to_vec(),
                learners,
                ..Default::default()
            },
        );
        s
    }

    fn kill(s: &mut ClusterState, id: NodeId) {
        mark_dead(s, id, false);
    }

    /// Applies `MarkDead` of `id` at its generation (`stopped`: it said so itself).
    fn mark_dead(s: &mut ClusterState, id: NodeId, stopped: bool) -> crate::control::Outcome {
        let g = s.members[&id].generation;
        let n = s.applied_index + 1;
        s.apply(
            n,
            &Command::MarkDead {
                id,
                generation: g,
                stopped,
            },
        )
    }

    fn leave(s: &mut ClusterState, id: NodeId) {
        let n = s.applied_index + 1;
        s.apply(n, &Command::Leave { id });
    }

    /// The voters once `change` is applied (a removed or demoted voter goes, a promoted
    /// learner comes).
    fn voters_after(s: &ClusterState, change: &[(NodeId, Option<Role>)]) -> Vec<NodeId> {
        let conf = s.conf.clone().unwrap_or_default();
        let mut v: Vec<NodeId> = conf
            .voters
            .iter()
            .copied()
            .filter(|v| {
                !change
                    .iter()
                    .any(|(n, r)| n == v && *r != Some(Role::Voter))
            })
            .collect();
        for (n, r) in change {
            if *r == Some(Role::Voter) && !v.contains(n) {
                v.push(*n);
            }
        }
        v
    }

    /// A member heard lately counts as active for as long as the window, whatever Raft's
    /// quorum checks do; nothing counts while not leading.
    #[test]
    fn a_member_heard_lately_counts_as_active_for_the_window() {
        let mut d = Detector::new(FailureConfig::default());
        d.heard(2, 1_000);
        assert!(!d.heard_within(2, 1_000, 500), "not leading");
        d.leading(true, 1_000, None);
        d.heard(2, 1_100);
        assert!(d.heard_within(2, 1_100, 500));
        assert!(d.heard_within(2, 1_600, 500));
        assert!(!d.heard_within(2, 1_601, 500));
        assert!(!d.heard_within(3, 1_100, 500), "never heard");
        // An older message arriving late does not move the last time back.
        d.heard(2, 900);
        assert!(d.heard_within(2, 1_600, 500));
        d.leading(false, 1_700, None);
        assert!(!d.heard_within(2, 1_700, 500));
        // A member never heard since the takeover is not heard, though its silence is
        // counted from the takeover (`check` gives it that time).
        let s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let mut d = Detector::new(FailureConfig::default());
        d.leading(true, 5_000, None);
        d.heard(2, 5_010);
        assert!(d.check(5_020, 1, &s).is_empty());
        assert!(d.heard_within(2, 5_020, 500));
        assert!(!d.heard_within(3, 5_020, 500));
    }

    fn live_majority(s: &ClusterState, voters: &[NodeId]) -> bool {
        let live = voters
            .iter()
            .filter(|v| s.members.get(v).is_some_and(|m| m.alive))
            .count();
        2 * live > voters.len()
    }

    #[test]
    fn a_voter_leaving_takes_dead_voters_out_with_it_rather_than_leave_no_majority() {
        // Voters 1, 2 and 3, learner 4; 1 and 4 died; 3 leaves and owns nothing. Removing 3
        // alone would leave voters 1 and 2, and 2 alone commits nothing.
        let mut s = cluster(&[1, 2, 3, 4], &[1, 2, 3]);
        leave(&mut s, 3);
        kill(&mut s, 1);
        kill(&mut s, 4);
        let change = conf_change(&s, 2, &|_| true).expect("a change");
        assert_eq!(change, vec![(3, None), (1, Some(Role::Learner))]);
        assert_eq!(voters_after(&s, &change), vec![2]);
        // The last live voter beside dead ones does not leave the group (nothing can take
        // its seat).
        let mut s = cluster(&[1, 2, 3], &[1, 2, 3]);
        leave(&mut s, 3);
        kill(&mut s, 1);
        kill(&mut s, 2);
        let change = conf_change(&s, 3, &|_| true);
        assert!(
            change
                .as_ref()
                .is_none_or(|c| c.iter().all(|(n, r)| *n != 3 || r.is_some())),
            "{change:?}"
        );
    }

    /// Every change `conf_change` proposes keeps a live majority in the configuration it
    /// leads to, whenever the current one has one (a joint change needs both halves): over
    /// every cluster of 2 to 6 members, every set of voters, every set of dead members, a
    /// leaving member or none, learners caught up or not.
    #[test]
    fn no_change_leaves_the_voters_without_a_live_majority() {
        let mut checked = 0;
        for n in 2..=6u64 {
            let ids: Vec<NodeId> = (1..=n).collect();
            for voter_mask in 1u32..(1 << n) {
                let voters: Vec<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|i| voter_mask & (1 << (i - 1)) != 0)
                    .collect();
                for dead_mask in 0u32..(1 << n) {
                    for leaving in 0..=n {
                        for caught in [true, false] {
                            let mut s = cluster(&ids, &voters);
                            if leaving > 0 {
                                leave(&mut s, leaving);
                            }
                            for &i in &ids {
                                if dead_mask & (1 << (i - 1)) != 0 {
                                    kill(&mut s, i);
                                }
                            }
                            if !live_majority(&s, &voters) {
                                continue;
                            }
                            // The leader is a live voter.
                            let me = *voters
                                .iter()
                                .find(|v| s.members[v].alive)
                                .expect("a live voter");
                            let Some(change) = conf_change(&s, me, &|_| caught) else {
                                continue;
                            };
                            checked += 1;
                            let after = voters_after(&s, &change);
                            assert!(
                                live_majority(&s, &after),
                                "{n} members, voters {voters:?}, dead mask {dead_mask:b}, leaving {leaving}, caught up {caught}: {change:?} leaves voters {after:?}"
                            );
                        }
                    }
                }
            }
        }
        assert!(checked > 1000, "only {checked} changes checked");
    }

    #[test]
    fn a_leaving_leader_hands_over_to_a_live_active_voter_that_stays() {
        let mut s = cluster(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]);
        let leave = vec![(1, None)];
        let all = |_: NodeId| true;
        // Furthest along wins; on a tie, the last voter listed.
        let c = |v: NodeId| [0, 0, 7, 9, 9, 9][v as usize];
        assert_eq!(transfer_target(&s, 1, &leave, &all, &c), Some(5));
        // Not one that the same change removes.
        let both = vec![(1, None), (5, None)];
        assert_eq!(transfer_target(&s, 1, &both, &all, &c), Some(4));
        // Not one that has not answered lately, even ahead of the others (a voter that just
        // died while the log was idle keeps the commit index it last reported).
        let quiet = |v: NodeId| v != 5;
        assert_eq!(transfer_target(&s, 1, &leave, &quiet, &c), Some(4));
        // Nor one marked dead, even if Raft still counts it as active.
        kill(&mut s, 4);
        kill(&mut s, 5);
        assert_eq!(transfer_target(&s, 1, &leave, &all, &c), Some(3));
        // A dead or silent voter only when no other stays.
        assert_eq!(
            transfer_target(&s, 1, &[(1, None), (2, None), (3, None)], &all, &c),
            Some(5)
        );
        let s = cluster(&[1], &[1]);
        assert_eq!(transfer_target(&s, 1, &leave, &all, &c), None);
    }

    #[test]
    fn a_silent_member_is_declared_dead_after_the_timeout_and_the_window() {
        let cfg = FailureConfig::default();
        let s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let mut d = Detector::new(cfg);
        // Not leading: nothing.
        assert!(d.check(10_000, 1, &s).is_empty());
        d.leading(true, 1_000, None);
        for t in (1_000..=4_000).step_by(50) {
            d.heard(2, t);
            // Node 3 is heard until 1 200 only.
            if t <= 1_200 {
                d.heard(3, t);
            }
            let dead = d.check(t, 1, &s);
            if t < 1_200 + cfg.timeout_ms + cfg.stability_ms {
                assert!(dead.is_empty(), "{t}: {dead:?}");
            } else {
                assert_eq!(dead, vec![(3, 1)], "{t}");
                break;
            }
        }
        assert_eq!(d.suspected(), vec![3]);
        // Heard again within the window: no longer suspected.
        let mut d = Detector::new(cfg);
        d.leading(true, 0, None);
        d.heard(2, 0);
        assert!(d.check(0, 1, &s).is_empty());
        assert!(d.check(cfg.timeout_ms, 1, &s).is_empty());
        assert_eq!(d.suspected(), vec![2, 3]);
        d.heard(2, cfg.timeout_ms + 10);
        d.heard(3, cfg.timeout_ms + 10);
        assert!(d
            .check(cfg.timeout_ms + cfg.stability_ms + 20, 1, &s)
            .is_empty());
        assert!(d.suspected().is_empty());
    }

    /// A chaos run: node 7 joined while the leader's change removing node 2 was under way, so it
    /// was not added to the Raft group at once; with nothing to answer, it was declared dead
    /// 1.8 s later, was then never added (only live members are), and the cluster never settled.
    #[test]
    fn a_member_not_yet_in_the_raft_group_is_not_declared_dead_until_it_is() {
        let cfg = FailureConfig::default();
        let mut s = cluster(&[1, 2, 3], &[1, 2, 3]);
        // Node 4 joins; the configuration does not list it yet.
        let n = s.applied_index + 1;
        s.apply(
            n,
            &Command::Join {
                id: 4,
                grpc_addr: String::new(),
                http_addr: String::new(),
                role: Role::Learner,
                incarnation: 4,
                fresh: true,
            },
        );
        let mut d = Detector::new(cfg);
        d.leading(true, 0, None);
        let end = 10 * (cfg.timeout_ms + cfg.stability_ms);
        for t in (0..=end).step_by(50) {
            d.heard(2, t);
            d.heard(3, t);
            assert!(d.check(t, 1, &s).is_empty(), "{t}");
        }
        // Added as a learner: from now on it must answer.
        let conf = s.conf.clone().unwrap();
        let n = s.applied_index + 1;
        s.set_conf(
            n,
            RaftConf {
                learners: vec![4],
                ..conf
            },
        );
        let mut declared = None;
        for t in (end..=2 * end).step_by(50) {
            d.heard(2, t);
            d.heard(3, t);
            let dead = d.check(t, 1, &s);
            if !dead.is_empty() {
                assert_eq!(dead, vec![(4, s.members[&4].generation)]);
                declared = Some(t);
                break;
            }
        }
        let t = declared.expect("a silent learner is declared dead");
        assert!(
            t >= end + cfg.timeout_ms + cfg.stability_ms,
            "declared at {t}: counted from before it was added ({end})"
        );
    }

    #[test]
    fn a_dead_members_key_groups_move_only_once_its_lease_must_have_expired() {
        let cfg = FailureConfig::default();
        let mut s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let mut d = Detector::new(cfg);
        assert!(!d.may_take_over(3, 1, 100_000), "not leading");
        d.leading(true, 0, None);
        d.check(0, 1, &s);
        d.heard(2, 1_500);
        d.check(1_500, 1, &s);
        assert_eq!(d.check(1_800, 1, &s), vec![(3, 1)]);
        kill(&mut s, 3);
        // Silent since this leader took over, at 0: any lease ended at 1 000.
        assert!(d.may_take_over(3, 1, 1_800));
        // An ask from it arrives after its death was proposed (it restarted): the answer may
        // let it serve until 1 000 ms after the ask.
        d.heard(3, 1_850);
        d.check(1_900, 1, &s);
        assert!(!d.may_take_over(3, 1, 2_800));
        assert!(d.may_take_over(3, 1, 2_850));
        // A new leader counts from when it took over.
        let mut d = Detector::new(cfg);
        d.leading(true, 5_000, None);
        assert!(!d.may_take_over(3, 1, 5_999));
        assert!(d.may_take_over(3, 1, 6_000));
    }

    #[test]
    fn a_stop_is_taken_only_while_a_majority_of_the_voters_stays_alive() {
        use crate::control::Outcome;
        let stop = |s: &mut ClusterState, id: NodeId| mark_dead(s, id, true);
        // Three voters and a learner: one voter stops (two of three stay), the learner
        // stops (it is no voter), a second voter is refused (one of three would stay): the
        // cluster is being stopped whole, and its last members keep their key groups.
        let mut s = cluster(&[1, 2, 3, 4], &[1, 2, 3]);
        assert_eq!(stop(&mut s, 3), Outcome::Applied);
        assert!(!s.members[&3].alive);
        assert_eq!(stop(&mut s, 4), Outcome::Applied);
        match stop(&mut s, 2) {
            Outcome::Rejected(why) => assert!(why.contains("only 1 of 3 voters"), "{why}"),
            o => panic!("{o:?}"),
        }
        assert!(s.members[&2].alive);
        // Declared dead by the leader's detector: no such rule (it is gone already).
        kill(&mut s, 2);
        assert!(!s.members[&2].alive);
        // The field is left out of the entry when false, and an entry without it reads as
        // not stopped (entries written before it existed).
        let old = Command::MarkDead {
            id: 1,
            generation: 1,
            stopped: false,
        };
        let bytes = old.encode();
        assert!(!String::from_utf8_lossy(&bytes).contains("stopped"));
        assert_eq!(Command::decode(&bytes).unwrap(), old);
    }

    #[test]
    fn a_member_that_said_it_stopped_has_its_key_groups_moved_at_once_at_that_generation_only() {
        let cfg = FailureConfig::default();
        let mut d = Detector::new(cfg);
        d.stopped(3, 2);
        assert!(!d.may_take_over(3, 2, 100_000), "not leading");
        d.leading(true, 5_000, None);
        d.heard(3, 5_100);
        // Heard a moment ago, so a lease it asked for could run until 6 100; but it gave up
        // its lease before saying it stopped.
        assert!(d.may_take_over(3, 2, 5_100));
        // Another generation (it rejoined, and was declared dead later) waits for its lease.
        assert!(!d.may_take_over(3, 3, 5_100));
        assert!(d.may_take_over(3, 3, 6_100));
        // Not another member.
        assert!(!d.may_take_over(2, 2, 5_100));
        // Once it joined again (or was removed), not even that generation: a node given its
        // id later starts again at generation 1.
        d.forget_stop(3);
        assert!(!d.may_take_over(3, 2, 5_100));
    }

    #[test]
    fn a_new_leader_counts_the_old_leaders_silence_from_its_last_heartbeat() {
        let cfg = FailureConfig::default();
        let s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let mut d = Detector::new(cfg);
        // Node 2 follows node 1: heartbeats until 10 000, then node 1 dies; node 2 is
        // elected at 10 700.
        for t in (0..=10_000).step_by(150) {
            d.heard(1, t);
        }
        d.heard(3, 10_650);
        d.leading(true, 10_700, Some(1));
        assert!(d.check(10_700, 2, &s).is_empty());
        d.heard(3, 11_500);
        assert!(d.check(11_500, 2, &s).is_empty(), "suspected from 11 500");
        assert_eq!(d.check(11_800, 2, &s), vec![(1, 1)]);
        // Its key groups move only a lease after the takeover.
        assert!(!d.may_take_over(1, 1, 11_699));
        assert!(d.may_take_over(1, 1, 11_700));
        // Node 3, never heard as a follower, counts from the takeover.
        assert!(!d.suspected().contains(&3));
    }

    #[test]
    fn a_leader_that_hears_no_majority_declares_nobody_dead() {
        let cfg = FailureConfig::default();
        let s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let mut d = Detector::new(cfg);
        d.leading(true, 0, None);
        assert!(d.check(0, 1, &s).is_empty());
        // Nobody heard: the leader is the one cut off.
        assert!(d.check(10_000, 1, &s).is_empty());
        // One voter heard: a majority with the leader.
        d.heard(2, 10_000);
        assert!(d.check(10_100, 1, &s).is_empty(), "the window starts");
        assert_eq!(d.check(10_400, 1, &s), vec![(3, 1)]);
    }

    #[test]
    fn a_new_leader_or_a_new_generation_counts_afresh() {
        let cfg = FailureConfig::default();
        let mut s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let mut d = Detector::new(cfg);
        d.leading(true, 0, None);
        d.check(0, 1, &s);
        d.heard(2, 5_000);
        assert!(d.check(5_000, 1, &s).is_empty(), "suspected from now on");
        assert_eq!(d.check(5_300, 1, &s), vec![(3, 1)]);
        // Node 3 restarted: a new generation, counted from now.
        let n = s.applied_index + 1;
        s.apply(
            n,
            &Command::Join {
                id: 3,
                grpc_addr: String::new(),
                http_addr: String::new(),
                role: Role::Learner,
                incarnation: 99,
                fresh: false,
            },
        );
        assert!(d.check(5_100, 1, &s).is_empty());
        // Leadership lost and taken again: counted from then.
        d.leading(false, 6_000, None);
        assert!(d.check(9_000, 1, &s).is_empty());
        d.leading(true, 9_000, None);
        d.heard(2, 10_000);
        assert!(d.check(10_000, 1, &s).is_empty());
        assert!(
            d.check(10_800, 1, &s).is_empty(),
            "suspected from 10 500 on"
        );
        assert_eq!(d.check(11_100, 1, &s), vec![(3, 2)]);
    }

    #[test]
    fn a_lease_runs_from_when_the_read_index_was_asked_and_needs_it_applied() {
        let cfg = FailureConfig::default();
        let mut l = Lease::new(cfg, 7);
        let ctx = l.due(100).unwrap();
        assert!(
            l.due(140).is_none(),
            "asked at most every lease/20 without a lease"
        );
        let again = l.due(150).unwrap();
        l.read_state(&ctx, 7);
        assert_eq!(l.applied(6, true), 0, "not applied up to the index");
        assert_eq!(l.applied(7, true), 100 + cfg.lease_ms);
        assert!(l.due(300).is_none(), "asked at most every lease/4 with one");
        l.read_state(&again, 7);
        assert_eq!(l.applied(7, true), 150 + cfg.lease_ms);
        // An answer to an ask older than the lease extends nothing.
        let ctx = l.due(400).unwrap();
        l.due(400 + cfg.lease_ms);
        l.read_state(&ctx, 8);
        assert_eq!(l.applied(9, true), 150 + cfg.lease_ms);
        // Foreign contexts (another member's, with the same counter) are ignored; a member
        // that applied its own death holds nothing.
        l.read_state(b"other", 1);
        let theirs = Lease::new(cfg, 8).due(0).unwrap();
        l.read_state(&theirs, 1);
        assert!(l.answered.is_empty());
        let ctx = l.due(2_000).unwrap();
        l.read_state(&ctx, 9);
        assert_eq!(l.applied(9, false), 0);
        assert_eq!(l.until_ms(), 0);
    }

    #[test]
    fn timing_is_checked() {
        assert!(FailureConfig::default().check().is_ok());
        assert!(FailureConfig::default().detection_ms() <= 2_000);
        let bad = FailureConfig {
            lease_ms: 2_000,
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("lease_ms"));
        let bad = FailureConfig {
            timeout_ms: 100,
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("failure_timeout_ms"));
    }

    #[test]
    fn a_dead_voter_is_swapped_for_a_learner_and_kept_without_one() {
        let yes = |_| true;
        // 3 voters, one dead, no learner: nothing changes.
        let mut s = cluster(&[1, 2, 3], &[1, 2, 3]);
        kill(&mut s, 3);
        assert_eq!(conf_change(&s, 1, &yes), None);
        // With a learner: promoted, the dead voter demoted, in one change.
        let mut s = cluster(&[1, 2, 3, 4], &[1, 2, 3]);
        kill(&mut s, 2);
        assert_eq!(
            conf_change(&s, 1, &yes),
            Some(vec![(4, Some(Role::Voter)), (2, Some(Role::Learner))])
        );
        // Not caught up: waits.
        assert_eq!(conf_change(&s, 1, &|_| false), None);
        // A voter leaving: once it owns nothing, out of the group, its seat to the learner.
        let mut s = cluster(&[1, 2, 3, 4], &[1, 2, 3]);
        let n = s.applied_index + 1;
        let moves = s.plan_moves(8);
        s.apply(n, &Command::Move { moves });
        assert!(s.owned_by(2) > 0);
        let n = s.applied_index + 1;
        s.apply(n, &Command::Leave { id: 2 });
        assert!(s.members[&2].leaving);
        assert_eq!(conf_change(&s, 1, &yes), None, "it still owns key groups");
        let n = s.applied_index + 1;
        let moves = s.plan_moves(8);
        assert!(moves.iter().all(|m| m.to != 2 && !m.orphan), "{moves:?}");
        s.apply(n, &Command::Move { moves });
        assert_eq!(s.owned_by(2), 0);
        assert_eq!(
            conf_change(&s, 1, &yes),
            Some(vec![(2, None), (4, Some(Role::Voter))])
        );
        // The only voter leaving (two members: one voter, one learner): the learner becomes a
        // voter first, then the leaver is removed (its leadership handed over before).
        let mut s = cluster(&[1, 2], &[1]);
        let n = s.applied_index + 1;
        s.apply(n, &Command::Leave { id: 1 });
        assert_eq!(s.owned_by(1), 0);
        assert_eq!(conf_change(&s, 1, &|_| false), None, "no caught-up learner");
        assert_eq!(conf_change(&s, 1, &yes), Some(vec![(2, Some(Role::Voter))]));
        s.conf.as_mut().unwrap().voters = vec![1, 2];
        s.conf.as_mut().unwrap().learners.clear();
        assert_eq!(conf_change(&s, 1, &yes), Some(vec![(1, None)]));
        // Without a learner the group shrinks.
        let mut s = cluster(&[1, 2, 3], &[1, 2, 3]);
        let n = s.applied_index + 1;
        s.apply(n, &Command::Leave { id: 3 });
        assert_eq!(conf_change(&s, 1, &yes), Some(vec![(3, None)]));
        // Too many voters (one listed before it joined, say): the dead or missing one first.
        let mut s = cluster(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(
            conf_change(&s, 1, &yes),
            Some(vec![(4, Some(Role::Learner))])
        );
        kill(&mut s, 2);
        assert_eq!(
            conf_change(&s, 1, &yes),
            Some(vec![(2, Some(Role::Learner))])
        );
        // Growth: learners promoted up to the size wanted.
        let s = cluster(&[1, 2, 3, 4, 5], &[1]);
        assert_eq!(
            conf_change(&s, 1, &yes),
            Some(vec![
                (2, Some(Role::Voter)),
                (3, Some(Role::Voter)),
                (4, Some(Role::Voter)),
                (5, Some(Role::Voter))
            ])
        );
    }
}
