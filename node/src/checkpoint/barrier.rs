//! A shard's side of the epoch cut (Chandy–Lamport over the FIFO shard-to-shard channels), as
//! pure bookkeeping; `shard/mod.rs` drives it.
//!
//! When shard `i` receives `Barrier(e)` it snapshots (overlay delta, inboxes, timers), sends
//! `Marker(e)` to every other shard on the same channel as its messages, and from then on
//! tags what it sends with `e + 1`. A message from shard `j` that arrives after `i`'s snapshot
//! but before `j`'s marker was in flight across the cut: it is processed normally **and**
//! logged into `e`, so recovery at `e` replays it. The cut of `e` on `i` is complete once every
//! other shard's marker has arrived. A marker can arrive before the barrier (the other shard
//! cut first); then nothing from that channel is logged for `e`.

/// What to do with a message arriving from another shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Process it; it belongs to the state after the cut (or no cut is open).
    Process,
    /// Process it and log it as in flight of this epoch.
    ProcessAndLog(u64),
}

/// A shard of another node (node id, shard index): in a cluster of several participants,
/// each is a source of the cut like a local shard (its stream to this node is FIFO).
pub type RemoteShard = (u64, u32);

/// One shard's view of the epoch being cut.
#[derive(Debug, Clone)]
pub struct Barrier {
    me: usize,
    shards: usize,
    /// The epoch this shard has snapshotted, if its cut is still open.
    cutting: Option<u64>,
    /// markers[j] = the newest epoch whose marker arrived from shard j.
    markers: Vec<u64>,
    /// The other participants' shards and the newest marker of each.
    remote: std::collections::BTreeMap<RemoteShard, u64>,
}

impl Barrier {
    /// Shard `me` of `shards`, after `committed` epochs.
    pub fn new(me: usize, shards: usize, committed: u64) -> Self {
        Barrier {
            me,
            shards,
            cutting: None,
            markers: vec![committed; shards],
            remote: Default::default(),
        }
    }

    /// The other participants' shards (until the next rollback): their markers are awaited
    /// too.
    pub fn set_remote(&mut self, sources: impl IntoIterator<Item = RemoteShard>, committed: u64) {
        self.remote = sources.into_iter().map(|s| (s, committed)).collect();
    }

    /// A message from another node's shard arrives.
    pub fn arrival_remote(&self, from: RemoteShard) -> Arrival {
        match (self.cutting, self.remote.get(&from)) {
            (Some(e), Some(m)) if *m < e => Arrival::ProcessAndLog(e),
            _ => Arrival::Process,
        }
    }

    /// Another node's shard's marker for `e` arrives; returns whether this shard's cut of `e`
    /// is now complete.
    pub fn marker_remote(&mut self, from: RemoteShard, e: u64) -> bool {
        if let Some(m) = self.remote.get_mut(&from) {
            *m = (*m).max(e);
        }
        self.check_complete()
    }

    /// The shard snapshots epoch `e` now; returns whether its cut is already complete (every
    /// other shard's marker for `e` came first).
    pub fn snapshot(&mut self, e: u64) -> bool {
        self.cutting = Some(e);
        self.check_complete()
    }

    /// A message from shard `from` arrives.
    pub fn arrival(&self, from: usize) -> Arrival {
        match self.cutting {
            Some(e) if from != self.me && self.markers[from] < e => Arrival::ProcessAndLog(e),
            _ => Arrival::Process,
        }
    }

    /// Shard `from`'s marker for `e` arrives; returns whether this shard's cut of `e` is now
    /// complete.
    pub fn marker(&mut self, from: usize, e: u64) -> bool {
        if from < self.shards && e > self.markers[from] {
            self.markers[from] = e;
        }
        self.check_complete()
    }

    fn check_complete(&mut self) -> bool {
        match self.cutting {
            Some(e)
                if (0..self.shards)
                    .filter(|j| *j != self.me)
                    .all(|j| self.markers[j] >= e)
                    && self.remote.values().all(|m| *m >= e) =>
            {
                self.cutting = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_before_the_senders_marker_are_logged() {
        let mut b = Barrier::new(0, 3, 0);
        assert_eq!(b.arrival(1), Arrival::Process, "no cut open");
        assert!(!b.snapshot(1));
        assert_eq!(b.arrival(1), Arrival::ProcessAndLog(1));
        assert_eq!(
            b.arrival(0),
            Arrival::Process,
            "its own messages are in its snapshot"
        );
        assert!(!b.marker(1, 1));
        assert_eq!(b.arrival(1), Arrival::Process, "after shard 1's marker");
        assert_eq!(b.arrival(2), Arrival::ProcessAndLog(1));
        assert!(b.marker(2, 1), "complete with all markers");
        assert_eq!(b.arrival(2), Arrival::Process);
    }

    #[test]
    fn markers_may_come_before_the_barrier() {
        let mut b = Barrier::new(1, 2, 4);
        assert!(!b.marker(0, 5));
        assert_eq!(b.arrival(0), Arrival::Process);
        assert!(b.snapshot(5), "shard 0 already cut 5: nothing is in flight");
        assert_eq!(b.arrival(0), Arrival::Process);
        // A single shard has no channels: its cut completes at once.
        assert!(Barrier::new(0, 1, 0).snapshot(1));
    }

    #[test]
    fn other_nodes_shards_are_sources_of_the_cut() {
        let mut b = Barrier::new(0, 2, 0);
        b.set_remote([(7, 0), (7, 1)], 0);
        assert!(!b.marker_remote((7, 1), 1), "before the snapshot");
        assert!(!b.snapshot(1));
        assert_eq!(b.arrival_remote((7, 0)), Arrival::ProcessAndLog(1));
        assert_eq!(
            b.arrival_remote((7, 1)),
            Arrival::Process,
            "its marker came"
        );
        assert_eq!(
            b.arrival_remote((9, 0)),
            Arrival::Process,
            "not a participant"
        );
        assert!(!b.marker(1, 1));
        assert!(b.marker_remote((7, 0), 1), "complete with every marker");
    }
}
