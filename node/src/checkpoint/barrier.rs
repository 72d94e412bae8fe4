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

/// One shard's view of the epoch being cut.
#[derive(Debug, Clone)]
pub struct Barrier {
    me: usize,
    shards: usize,
    /// The epoch this shard has snapshotted, if its cut is still open.
    cutting: Option<u64>,
    /// markers[j] = the newest epoch whose marker arrived from shard j.
    markers: Vec<u64>,
}

impl Barrier {
    /// Shard `me` of `shards`, after `committed` epochs.
    pub fn new(me: usize, shards: usize, committed: u64) -> Self {
        Barrier {
            me,
            shards,
            cutting: None,
            markers: vec![committed; shards],
        }
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
                    .all(|j| self.markers[j] >= e) =>
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
}
