//! The epoch coordinator of one node, as a pure state machine (no clocks, sockets or files:
//! the driver feeds it [`Input`]s and performs its [`Action`]s). The mesh issue puts the same
//! decisions behind the Raft control group.
//!
//! Rules:
//! - a new epoch starts every `interval_ms`, or early when a caller waits on a commit and no
//!   epoch is open (group commit), as long as fewer than `max_uncommitted` epochs are open;
//! - an epoch starts only once every shard has finished cutting the previous one;
//! - epochs are written and committed strictly in order, one at a time, once every shard has
//!   cut them;
//! - a failed write or commit is retried with exponential backoff, never skipped;
//! - back-pressure is on while an epoch is due but `max_uncommitted` epochs are already open
//!   (the driver answers 429 and `/readyz` says why), off again once one commits.
//!
//! Invariant (checked in debug builds): `committed ≤ started`, and the epoch being persisted is
//! always `committed + 1`.

/// While an epoch is being persisted, a waiting caller starts the next one at most this
/// often.
const GROUP_MS: u64 = 2;

/// How long a failed write waits before it is retried, after `failures` failures in a row.
fn backoff_ms(failures: u32) -> u64 {
    (10u64 << failures.min(10)).min(5_000)
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed (driver ticks often, e.g. every few ms).
    Tick {
        /// Now, ms.
        now_ms: u64,
    },
    /// A caller waits for a commit (a committed `Send`/`Call`): start an epoch soon.
    CallerWaiting,
    /// A shard finished its cut of an epoch.
    ShardCut {
        /// The epoch.
        epoch: u64,
        /// The shard.
        shard: usize,
    },
    /// The node's epoch object is in blob storage.
    Written {
        /// The epoch.
        epoch: u64,
    },
    /// The manifest is in blob storage: the epoch is committed.
    Committed {
        /// The epoch.
        epoch: u64,
    },
    /// The cluster's leader starts `epoch` (a participant's coordinator; the local one
    /// ignores it).
    Barrier {
        /// The epoch.
        epoch: u64,
    },
    /// Writing the object or the manifest failed.
    Failed {
        /// The epoch.
        epoch: u64,
        /// Now, ms.
        now_ms: u64,
    },
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell every shard to cut this epoch.
    Barrier(u64),
    /// Write the node's object of this epoch (all shards have cut it).
    Write(u64),
    /// Write this epoch's manifest (create-only).
    Commit(u64),
    /// The epoch committed: release its acknowledgements, replies and egress; apply its
    /// state to the local store.
    Release(u64),
    /// Turn ingress back-pressure on or off.
    Backpressure(bool),
    /// Tell the cluster's leader that this node's part of the epoch is written (a
    /// participant's coordinator: the leader writes the manifest).
    Report(u64),
    /// Tell the cluster's leader that every shard has cut the epoch (it starts the next one
    /// once every participant has: a shard's cuts never overlap).
    Cut(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persisting {
    Idle,
    Writing(u64),
    Committing(u64),
    /// Waiting to retry the write of this epoch at this time.
    Backoff(u64, u64),
}

/// The decisions about epochs, as the epoch driver sees them: feed inputs, perform the
/// actions. One node uses [`Coordinator`]; the mesh puts the same state machine behind its
/// Raft control group (inputs proposed to the log, actions taken by the leader).
pub trait EpochCoordinator: Send {
    /// Feeds one input; returns the actions to perform, in order.
    fn handle(&mut self, input: Input) -> Vec<Action>;
    /// The last committed epoch.
    fn committed(&self) -> u64;
    /// The last started epoch.
    fn started(&self) -> u64;
    /// Starts no more epochs (see [`Coordinator::drain`]).
    fn drain(&mut self) {}
    /// When (ms, the clock of `Input::Tick`) the interval's next epoch is due, if this side
    /// starts epochs on an interval (0: at the next tick).
    fn next_start_ms(&self) -> Option<u64> {
        None
    }
}

impl EpochCoordinator for Coordinator {
    fn handle(&mut self, input: Input) -> Vec<Action> {
        Coordinator::handle(self, input)
    }
    fn committed(&self) -> u64 {
        self.committed
    }
    fn started(&self) -> u64 {
        self.started
    }
    fn drain(&mut self) {
        Coordinator::drain(self)
    }
    fn next_start_ms(&self) -> Option<u64> {
        Some(
            self.last_start_ms
                .map_or(0, |t| t.saturating_add(self.interval_ms)),
        )
    }
}

impl EpochCoordinator for Participant {
    fn handle(&mut self, input: Input) -> Vec<Action> {
        Participant::handle(self, input)
    }
    fn committed(&self) -> u64 {
        self.committed
    }
    fn started(&self) -> u64 {
        self.started
    }
}

/// The coordinator of one node.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shards: usize,
    interval_ms: u64,
    max_uncommitted: u64,
    started: u64,
    committed: u64,
    last_start_ms: Option<u64>,
    waiting: bool,
    /// cuts[i] = shards that cut epoch committed+1+i
    cuts: std::collections::VecDeque<Vec<bool>>,
    persisting: Persisting,
    failures: u32,
    backpressure: bool,
    draining: bool,
}

impl Coordinator {
    /// A coordinator for `shards` shards, resuming after `committed`.
    pub fn new(shards: usize, interval_ms: u64, max_uncommitted: u64, committed: u64) -> Self {
        Coordinator {
            shards: shards.max(1),
            interval_ms: interval_ms.max(1),
            max_uncommitted: max_uncommitted.max(1),
            started: committed,
            committed,
            last_start_ms: None,
            waiting: false,
            cuts: Default::default(),
            persisting: Persisting::Idle,
            failures: 0,
            backpressure: false,
            draining: false,
        }
    }

    /// Starts no more epochs (the node is handing its epochs over to the cluster's leader);
    /// the open ones are still written and committed.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// The last committed epoch.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The last started epoch.
    pub fn started(&self) -> u64 {
        self.started
    }

    fn open(&self) -> u64 {
        self.started - self.committed
    }

    fn backoff_ms(&self) -> u64 {
        backoff_ms(self.failures)
    }

    fn all_cut(&self, epoch: u64) -> bool {
        epoch > self.committed
            && self
                .cuts
                .get((epoch - self.committed - 1) as usize)
                .is_some_and(|c| c.iter().all(|x| *x))
    }

    fn maybe_persist(&mut self, out: &mut Vec<Action>) {
        let next = self.committed + 1;
        if self.persisting == Persisting::Idle && self.all_cut(next) {
            self.persisting = Persisting::Writing(next);
            out.push(Action::Write(next));
        }
    }

    /// On while an epoch is due but cannot start (the backlog is full); off once one can.
    fn set_backpressure(&mut self, blocked: bool, out: &mut Vec<Action>) {
        let on = blocked && self.open() >= self.max_uncommitted;
        if on != self.backpressure {
            self.backpressure = on;
            out.push(Action::Backpressure(on));
        }
    }

    /// Feeds one input; returns the actions to perform, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick { now_ms } => {
                if let Persisting::Backoff(e, at) = self.persisting {
                    if now_ms >= at {
                        self.persisting = Persisting::Writing(e);
                        out.push(Action::Write(e));
                    }
                }
                // A waiting caller starts an epoch at once when none is being persisted, else
                // at most every `GROUP_MS` and only while no more than one is open: what
                // arrives meanwhile goes into one epoch (group commit: epochs grow with the
                // load instead of multiplying). One epoch is cut while another persists; more
                // would only split the load into epochs that each wait for a whole commit
                // (on S3 without the epoch log, 30-40 ms each: 25 epochs a second of one call).
                let since_start = self
                    .last_start_ms
                    .map_or(u64::MAX, |t| now_ms.saturating_sub(t));
                let due = (self.waiting
                    && (self.open() == 0 || (since_start >= GROUP_MS && self.open() < 2)))
                    || since_start >= self.interval_ms;
                let blocked = due && self.open() >= self.max_uncommitted;
                // One cut at a time: shards finish cutting an epoch (every marker arrived)
                // before the next one starts, so their cuts never overlap.
                let cut_done = self.cuts.back().is_none_or(|c| c.iter().all(|x| *x));
                if due && !blocked && cut_done && !self.draining {
                    self.started += 1;
                    self.last_start_ms = Some(now_ms);
                    self.waiting = false;
                    self.cuts.push_back(vec![false; self.shards]);
                    out.push(Action::Barrier(self.started));
                }
                self.set_backpressure(blocked, &mut out);
            }
            Input::CallerWaiting => self.waiting = true,
            Input::Barrier { .. } => {}
            Input::ShardCut { epoch, shard } => {
                if epoch > self.committed && epoch <= self.started && shard < self.shards {
                    self.cuts[(epoch - self.committed - 1) as usize][shard] = true;
                    self.maybe_persist(&mut out);
                }
            }
            Input::Written { epoch } => {
                if self.persisting == Persisting::Writing(epoch) {
                    self.persisting = Persisting::Committing(epoch);
                    out.push(Action::Commit(epoch));
                }
            }
            Input::Committed { epoch } => {
                if self.persisting == Persisting::Committing(epoch) {
                    self.committed = epoch;
                    self.cuts.pop_front();
                    self.persisting = Persisting::Idle;
                    self.failures = 0;
                    out.push(Action::Release(epoch));
                    self.maybe_persist(&mut out);
                    self.set_backpressure(self.backpressure, &mut out);
                }
            }
            Input::Failed { epoch, now_ms } => {
                if matches!(self.persisting, Persisting::Writing(e) | Persisting::Committing(e) if e == epoch)
                {
                    self.failures += 1;
                    self.persisting = Persisting::Backoff(epoch, now_ms + self.backoff_ms());
                }
            }
        }
        debug_assert!(self.committed <= self.started);
        debug_assert!(match self.persisting {
            Persisting::Idle => true,
            Persisting::Writing(e) | Persisting::Committing(e) | Persisting::Backoff(e, _) =>
                e == self.committed + 1,
        });
        out
    }
}

/// The coordinator of a node in a cluster of several (a participant: it owns key groups). The
/// leader decides when epochs start ([`Input::Barrier`], numbered consecutively) and when they
/// commit ([`Input::Committed`]); the node cuts them, writes its part of each (one at a time,
/// in order, without waiting for commits), reports it ([`Action::Report`]) and releases
/// epochs in order as the leader commits them. Shards cut one epoch at a time: a barrier that
/// arrives while they still cut the previous one waits. Back-pressure is on while
/// `max_uncommitted` epochs are open (the leader starts no more).
#[derive(Debug, Clone)]
pub struct Participant {
    shards: usize,
    max_uncommitted: u64,
    started: u64,
    /// The last epoch the leader started (barriers after `started` wait for the shards).
    announced: u64,
    committed: u64,
    /// The last epoch whose part was written and reported.
    written: u64,
    /// cuts[i] = shards that cut epoch committed+1+i
    cuts: std::collections::VecDeque<Vec<bool>>,
    /// Shards that cut an epoch not started here yet (another node's marker reached them
    /// before the leader's barrier reached this node).
    early: std::collections::BTreeMap<u64, Vec<usize>>,
    persisting: Persisting,
    failures: u32,
    backpressure: bool,
}

impl Participant {
    /// A participant of `shards` shards whose last committed epoch is `committed` and whose
    /// epochs go on after `started`.
    pub fn new(shards: usize, max_uncommitted: u64, committed: u64, started: u64) -> Self {
        let started = started.max(committed);
        Participant {
            shards: shards.max(1),
            max_uncommitted: max_uncommitted.max(1),
            started,
            announced: started,
            // Epochs between `committed` and `started` were abandoned: counted as done.
            committed: started,
            written: started,
            cuts: Default::default(),
            early: Default::default(),
            persisting: Persisting::Idle,
            failures: 0,
            backpressure: false,
        }
    }

    fn mark_cut(&mut self, epoch: u64, shard: usize, out: &mut Vec<Action>) {
        let i = (epoch - self.committed - 1) as usize;
        let before = self.cuts[i].iter().all(|x| *x);
        self.cuts[i][shard] = true;
        if !before && self.cuts[i].iter().all(|x| *x) {
            out.push(Action::Cut(epoch));
        }
    }

    fn all_cut(&self, epoch: u64) -> bool {
        epoch > self.committed
            && self
                .cuts
                .get((epoch - self.committed - 1) as usize)
                .is_some_and(|c| c.iter().all(|x| *x))
    }

    fn maybe_write(&mut self, out: &mut Vec<Action>) {
        let next = self.written + 1;
        if self.persisting == Persisting::Idle && next <= self.started && self.all_cut(next) {
            self.persisting = Persisting::Writing(next);
            out.push(Action::Write(next));
        }
    }

    /// Starts the announced epochs, one cut at a time.
    fn start_next(&mut self, out: &mut Vec<Action>) {
        while self.started < self.announced && self.cuts.back().is_none_or(|c| c.iter().all(|x| *x))
        {
            self.started += 1;
            self.cuts.push_back(vec![false; self.shards]);
            out.push(Action::Barrier(self.started));
            for shard in self.early.remove(&self.started).unwrap_or_default() {
                self.mark_cut(self.started, shard, out);
                self.maybe_write(out);
            }
        }
    }

    fn set_backpressure(&mut self, out: &mut Vec<Action>) {
        let on = self.announced - self.committed >= self.max_uncommitted;
        if on != self.backpressure {
            self.backpressure = on;
            out.push(Action::Backpressure(on));
        }
    }

    /// Feeds one input; returns the actions to perform, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick { now_ms } => {
                if let Persisting::Backoff(e, at) = self.persisting {
                    if now_ms >= at {
                        self.persisting = Persisting::Writing(e);
                        out.push(Action::Write(e));
                    }
                }
            }
            Input::CallerWaiting => {}
            Input::Barrier { epoch } => {
                // Consecutive within a leader's generation; a gap (a lost barrier) leaves the
                // epoch without this part, and the leader synchronises again.
                if epoch == self.announced + 1 {
                    self.announced = epoch;
                    self.start_next(&mut out);
                    self.set_backpressure(&mut out);
                }
            }
            Input::ShardCut { epoch, shard } => {
                if epoch > self.started && shard < self.shards {
                    self.early.entry(epoch).or_default().push(shard);
                } else if epoch > self.committed && shard < self.shards {
                    self.mark_cut(epoch, shard, &mut out);
                    self.maybe_write(&mut out);
                    self.start_next(&mut out);
                }
            }
            Input::Written { epoch } => {
                if self.persisting == Persisting::Writing(epoch) {
                    self.persisting = Persisting::Idle;
                    self.written = epoch;
                    self.failures = 0;
                    out.push(Action::Report(epoch));
                    self.maybe_write(&mut out);
                }
            }
            Input::Committed { epoch } => {
                while self.committed < epoch.min(self.written) {
                    self.committed += 1;
                    self.cuts.pop_front();
                    out.push(Action::Release(self.committed));
                }
                self.set_backpressure(&mut out);
            }
            Input::Failed { epoch, now_ms } => {
                if self.persisting == Persisting::Writing(epoch) {
                    self.failures += 1;
                    self.persisting =
                        Persisting::Backoff(epoch, now_ms + backoff_ms(self.failures));
                }
            }
        }
        debug_assert!(
            self.committed <= self.written
                && self.written <= self.started
                && self.started <= self.announced
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_all(c: &mut Coordinator, epoch: u64, shards: usize) -> Vec<Action> {
        (0..shards)
            .flat_map(|s| c.handle(Input::ShardCut { epoch, shard: s }))
            .collect()
    }

    #[test]
    fn epochs_start_on_the_interval_and_commit_in_order() {
        let mut c = Coordinator::new(2, 100, 4, 0);
        // When the interval's next epoch is due (the driver sleeps until then): at once.
        assert_eq!(c.next_start_ms(), Some(0));
        assert_eq!(
            c.handle(Input::Tick { now_ms: 0 }),
            vec![Action::Barrier(1)]
        );
        assert_eq!(c.next_start_ms(), Some(100));
        assert_eq!(c.handle(Input::Tick { now_ms: 50 }), vec![]);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 100 }),
            vec![],
            "epoch 2 waits until every shard has cut epoch 1"
        );
        assert_eq!(c.handle(Input::ShardCut { epoch: 1, shard: 0 }), vec![]);
        assert_eq!(
            c.handle(Input::ShardCut { epoch: 1, shard: 1 }),
            vec![Action::Write(1)]
        );
        assert_eq!(
            c.handle(Input::Tick { now_ms: 101 }),
            vec![Action::Barrier(2)]
        );
        assert_eq!(c.next_start_ms(), Some(201));
        // Epoch 2 is cut while epoch 1 is still being written: it waits its turn.
        assert_eq!(cut_all(&mut c, 2, 2), vec![]);
        assert_eq!(
            c.handle(Input::Written { epoch: 1 }),
            vec![Action::Commit(1)]
        );
        assert_eq!(
            c.handle(Input::Committed { epoch: 1 }),
            vec![Action::Release(1), Action::Write(2)]
        );
        assert_eq!(
            c.handle(Input::Written { epoch: 2 }),
            vec![Action::Commit(2)]
        );
        assert_eq!(
            c.handle(Input::Committed { epoch: 2 }),
            vec![Action::Release(2)]
        );
        assert_eq!(c.committed(), 2);
    }

    #[test]
    fn a_waiting_caller_starts_an_epoch_early() {
        let mut c = Coordinator::new(1, 1_000, 4, 7);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 0 }),
            vec![Action::Barrier(8)]
        );
        assert_eq!(cut_all(&mut c, 8, 1), vec![Action::Write(8)]);
        c.handle(Input::CallerWaiting);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 1 }),
            vec![],
            "while epoch 8 is persisted, waiting callers gather in the next epoch"
        );
        assert_eq!(
            c.handle(Input::Written { epoch: 8 }),
            vec![Action::Commit(8)]
        );
        assert_eq!(
            c.handle(Input::Committed { epoch: 8 }),
            vec![Action::Release(8)]
        );
        assert_eq!(
            c.handle(Input::Tick { now_ms: 1 }),
            vec![Action::Barrier(9)],
            "and it starts as soon as nothing is open"
        );
        assert_eq!(cut_all(&mut c, 9, 1), vec![Action::Write(9)]);
        c.handle(Input::CallerWaiting);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 3 }),
            vec![Action::Barrier(10)],
            "or, under load, every 2 ms while one is persisted"
        );
        assert_eq!(cut_all(&mut c, 10, 1), vec![]);
        c.handle(Input::CallerWaiting);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 50 }),
            vec![],
            "but no third while epoch 9 is still persisted: callers gather in the next"
        );
        assert_eq!(
            c.handle(Input::Written { epoch: 9 }),
            vec![Action::Commit(9)]
        );
        assert_eq!(
            c.handle(Input::Committed { epoch: 9 }),
            vec![Action::Release(9), Action::Write(10)]
        );
        assert_eq!(
            c.handle(Input::Tick { now_ms: 51 }),
            vec![Action::Barrier(11)]
        );
    }

    #[test]
    fn failures_retry_with_backoff_and_backlog_backpressures() {
        let mut c = Coordinator::new(1, 10, 2, 0);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 0 }),
            vec![Action::Barrier(1)]
        );
        assert_eq!(cut_all(&mut c, 1, 1), vec![Action::Write(1)]);
        assert_eq!(
            c.handle(Input::Failed {
                epoch: 1,
                now_ms: 5
            }),
            vec![]
        );
        // Two epochs open: back-pressure, and no third epoch starts.
        assert_eq!(
            c.handle(Input::Tick { now_ms: 10 }),
            vec![Action::Barrier(2)],
            "two open epochs are normal"
        );
        assert_eq!(
            c.handle(Input::Tick { now_ms: 20 }),
            vec![Action::Backpressure(true)],
            "a third is due but cannot start"
        );
        assert_eq!(
            c.handle(Input::Tick { now_ms: 25 }),
            vec![Action::Write(1)],
            "retried after its 20 ms backoff"
        );
        assert_eq!(
            c.handle(Input::Written { epoch: 1 }),
            vec![Action::Commit(1)]
        );
        assert_eq!(
            c.handle(Input::Committed { epoch: 1 }),
            vec![Action::Release(1), Action::Backpressure(false)]
        );
        assert_eq!(cut_all(&mut c, 2, 1), vec![Action::Write(2)]);
        assert_eq!(
            c.handle(Input::Tick { now_ms: 30 }),
            vec![Action::Barrier(3)]
        );
    }

    #[test]
    fn stale_and_unknown_inputs_are_ignored() {
        let mut c = Coordinator::new(1, 10, 4, 3);
        assert_eq!(c.handle(Input::ShardCut { epoch: 2, shard: 0 }), vec![]);
        assert_eq!(c.handle(Input::ShardCut { epoch: 9, shard: 0 }), vec![]);
        assert_eq!(c.handle(Input::Committed { epoch: 4 }), vec![]);
        assert_eq!(c.handle(Input::Written { epoch: 4 }), vec![]);
    }

    #[test]
    fn a_participant_cuts_on_the_leaders_barriers_reports_parts_and_releases_in_order() {
        let mut p = Participant::new(2, 2, 5, 7);
        assert_eq!(p.handle(Input::Barrier { epoch: 9 }), vec![], "a gap");
        assert_eq!(
            p.handle(Input::Barrier { epoch: 8 }),
            vec![Action::Barrier(8)]
        );
        assert_eq!(
            p.handle(Input::Barrier { epoch: 9 }),
            vec![Action::Backpressure(true)],
            "epoch 9 waits until the shards have cut 8"
        );
        assert_eq!(p.handle(Input::ShardCut { epoch: 8, shard: 1 }), vec![]);
        assert_eq!(
            p.handle(Input::ShardCut { epoch: 8, shard: 0 }),
            vec![Action::Cut(8), Action::Write(8), Action::Barrier(9)]
        );
        assert_eq!(p.handle(Input::ShardCut { epoch: 9, shard: 0 }), vec![]);
        assert_eq!(
            p.handle(Input::ShardCut { epoch: 9, shard: 1 }),
            vec![Action::Cut(9)]
        );
        assert_eq!(
            p.handle(Input::Written { epoch: 8 }),
            vec![Action::Report(8), Action::Write(9)]
        );
        // Only written epochs are released.
        assert_eq!(
            p.handle(Input::Committed { epoch: 9 }),
            vec![Action::Release(8), Action::Backpressure(false)]
        );
        assert_eq!(
            p.handle(Input::Failed {
                epoch: 9,
                now_ms: 0
            }),
            vec![]
        );
        assert_eq!(p.handle(Input::Tick { now_ms: 25 }), vec![Action::Write(9)]);
        assert_eq!(
            p.handle(Input::Written { epoch: 9 }),
            vec![Action::Report(9)]
        );
        assert_eq!(
            p.handle(Input::Committed { epoch: 9 }),
            vec![Action::Release(9)]
        );
        assert_eq!((p.committed(), p.started()), (9, 9));
    }
}
