//! A node's short-term epoch log on raft-engine: committed epochs (opaque bytes, in epoch
//! order) that blob storage does not have yet. An append is durable (fsync) when it returns;
//! the node acknowledges an epoch's messages then, and uploads the log to blob storage later,
//! in merged batches, truncating it behind each upload (`node/src/checkpoint/OVERVIEW.md`).
//!
//! One raft-engine group (id 1); entry `i` (consecutive from 1, across truncations) holds one
//! epoch: its number (8 bytes, big-endian) then its bytes. Epoch numbers rise but need not be
//! consecutive (empty and abandoned epochs are not logged). [`EpochLog::discard_after`] drops
//! a tail by overwriting its first entry with a tombstone (epoch `u64::MAX`, no bytes), which
//! raft-engine's append turns into a truncation of everything after it.

use std::path::Path;
use std::sync::Mutex;

use raft::prelude::Entry;
use raft_engine::{Config, Engine, LogBatch, ReadableSize};

use crate::storage::EntryExt;

const GROUP: u64 = 1;
/// The index the next append takes, saved with each truncation (an empty log has no last
/// index to count on).
const NEXT: &[u8] = b"next";
/// The epoch number of a tombstone entry.
const TOMBSTONE: u64 = u64::MAX;

fn err(e: impl std::fmt::Display) -> String {
    format!("epoch log: {e}")
}

/// What the log holds.
#[derive(Debug, Default)]
struct Tail {
    /// (entry index, epoch, size) of every entry kept, oldest first.
    entries: std::collections::VecDeque<(u64, u64, u64)>,
    /// The index the next append takes.
    next: u64,
    /// The bytes of the entries kept.
    bytes: u64,
}

/// The epoch log of one node.
pub struct EpochLog {
    engine: Engine,
    tail: Mutex<Tail>,
}

impl EpochLog {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<EpochLog, String> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        let cfg = Config {
            dir: dir.to_string_lossy().to_string(),
            // Files of truncated entries are deleted once the log exceeds this.
            purge_threshold: ReadableSize::mb(64),
            target_file_size: ReadableSize::mb(16),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(|e| {
            let e = e.to_string();
            if e.contains("Failed to lock file") {
                err(format!(
                    "{}: another statemesh node uses this data directory (its epoch log is locked)",
                    dir.display()
                ))
            } else {
                err(format!("{}: {e}", dir.display()))
            }
        })?;
        let saved = engine
            .get(GROUP, NEXT)
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(1, u64::from_be_bytes);
        let mut tail = Tail {
            next: engine.last_index(GROUP).map_or(1, |l| l + 1).max(saved),
            ..Default::default()
        };
        if let (Some(first), Some(last)) = (engine.first_index(GROUP), engine.last_index(GROUP)) {
            let mut v = Vec::new();
            engine
                .fetch_entries_to::<EntryExt>(GROUP, first, last + 1, None, &mut v)
                .map_err(err)?;
            for e in v {
                let epoch = epoch_of(&e)?;
                if epoch == TOMBSTONE {
                    continue;
                }
                tail.bytes += e.data.len() as u64 - 8;
                tail.entries
                    .push_back((e.index, epoch, e.data.len() as u64 - 8));
            }
        }
        Ok(EpochLog {
            engine,
            tail: Mutex::new(tail),
        })
    }

    /// Appends epoch `epoch` (newer than every epoch in the log), durably.
    pub fn append(&self, epoch: u64, bytes: &[u8]) -> Result<(), String> {
        let mut t = self.tail.lock().unwrap();
        if let Some(&(_, last, _)) = t.entries.back() {
            if epoch == last {
                // A retry of an append that was written.
                return Ok(());
            }
            if epoch < last {
                return Err(err(format!("epoch {epoch} appended after epoch {last}")));
            }
        }
        let mut data = Vec::with_capacity(8 + bytes.len());
        data.extend_from_slice(&epoch.to_be_bytes());
        data.extend_from_slice(bytes);
        let e = Entry {
            index: t.next,
            data: data.into(),
            ..Default::default()
        };
        let mut b = LogBatch::default();
        b.add_entries::<EntryExt>(GROUP, &[e]).map_err(err)?;
        self.engine.write(&mut b, true).map_err(err)?;
        let i = t.next;
        t.next += 1;
        t.entries.push_back((i, epoch, bytes.len() as u64));
        t.bytes += bytes.len() as u64;
        Ok(())
    }

    /// The epochs after `after` (all with `None`), oldest first, with their bytes.
    pub fn after(&self, after: Option<u64>) -> Result<Vec<(u64, Vec<u8>)>, String> {
        let range = {
            let t = self.tail.lock().unwrap();
            let mut it = t
                .entries
                .iter()
                .filter(|(_, e, _)| after.is_none_or(|a| *e > a));
            match (it.next(), t.entries.back()) {
                (Some(f), Some(l)) => Some((f.0, l.0)),
                _ => None,
            }
        };
        let Some((first, last)) = range else {
            return Ok(Vec::new());
        };
        let mut v = Vec::new();
        self.engine
            .fetch_entries_to::<EntryExt>(GROUP, first, last + 1, None, &mut v)
            .map_err(err)?;
        let mut out = Vec::new();
        for e in v {
            let epoch = epoch_of(&e)?;
            if epoch != TOMBSTONE && after.is_none_or(|a| epoch > a) {
                out.push((epoch, e.data[8..].to_vec()));
            }
        }
        Ok(out)
    }

    /// Drops the epochs after `epoch` (abandoned: the node rolled back to `epoch`), durably.
    pub fn discard_after(&self, epoch: u64) -> Result<(), String> {
        let mut t = self.tail.lock().unwrap();
        let Some(&(from, _, _)) = t.entries.iter().find(|(_, e, _)| *e > epoch) else {
            return Ok(());
        };
        let e = Entry {
            index: from,
            data: TOMBSTONE.to_be_bytes().to_vec().into(),
            ..Default::default()
        };
        let mut b = LogBatch::default();
        b.add_entries::<EntryExt>(GROUP, &[e]).map_err(err)?;
        self.engine.write(&mut b, true).map_err(err)?;
        while t.entries.back().is_some_and(|l| l.0 >= from) {
            if let Some((_, _, n)) = t.entries.pop_back() {
                t.bytes -= n;
            }
        }
        t.next = from + 1;
        Ok(())
    }

    /// Drops the epochs up to `through` (blob storage has them), durably.
    pub fn truncate(&self, through: u64) -> Result<(), String> {
        let mut t = self.tail.lock().unwrap();
        let keep_from = t
            .entries
            .iter()
            .find(|(_, e, _)| *e > through)
            .map_or(t.next, |(i, _, _)| *i);
        if t.entries.front().is_none_or(|f| f.0 >= keep_from) {
            return Ok(());
        }
        // raft-engine's compaction drops the entries before `keep_from` (the command is
        // written to the log, and the files are purged once they are all compacted).
        let mut b = LogBatch::default();
        b.add_command(GROUP, raft_engine::Command::Compact { index: keep_from });
        b.put(GROUP, NEXT.to_vec(), t.next.to_be_bytes().to_vec())
            .map_err(err)?;
        self.engine.write(&mut b, true).map_err(err)?;
        while t.entries.front().is_some_and(|f| f.0 < keep_from) {
            if let Some((_, _, n)) = t.entries.pop_front() {
                t.bytes -= n;
            }
        }
        if let Err(e) = self.engine.purge_expired_files() {
            // The truncation stands (written above); the files go at a later purge. Not an
            // error: a caller told the truncation failed would take the epochs as still here.
            tracing::warn!(error = %e, "epoch log: truncated, but purging its files failed; a later truncation purges them");
        }
        Ok(())
    }

    /// The newest epoch logged, if any is kept.
    pub fn last_epoch(&self) -> Option<u64> {
        self.tail.lock().unwrap().entries.back().map(|e| e.1)
    }

    /// The oldest epoch kept.
    pub fn first_epoch(&self) -> Option<u64> {
        self.tail.lock().unwrap().entries.front().map(|e| e.1)
    }

    /// How many epochs and bytes the log keeps.
    pub fn size(&self) -> (usize, u64) {
        let t = self.tail.lock().unwrap();
        (t.entries.len(), t.bytes)
    }
}

fn epoch_of(e: &Entry) -> Result<u64, String> {
    let b: [u8; 8] = e
        .data
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            err(format!(
                "entry {} is shorter than its epoch number",
                e.index
            ))
        })?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_survive_a_reopen_and_truncation_drops_the_uploaded_prefix() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EpochLog::open(dir.path()).unwrap();
            assert_eq!(log.after(None).unwrap(), Vec::<(u64, Vec<u8>)>::new());
            log.append(3, b"three").unwrap();
            log.append(5, b"five").unwrap();
            log.append(9, b"nine").unwrap();
            log.append(9, b"nine").unwrap();
            assert!(log
                .append(8, b"eight")
                .unwrap_err()
                .contains("after epoch 9"));
            assert_eq!(log.size(), (3, 13));
            assert_eq!(
                log.after(Some(3)).unwrap(),
                vec![(5, b"five".to_vec()), (9, b"nine".to_vec())]
            );
            log.truncate(5).unwrap();
            assert_eq!(log.first_epoch(), Some(9));
        }
        let log = EpochLog::open(dir.path()).unwrap();
        assert_eq!(log.after(None).unwrap(), vec![(9, b"nine".to_vec())]);
        log.append(10, b"ten").unwrap();
        log.truncate(10).unwrap();
        assert_eq!(log.last_epoch(), None);
        log.append(11, b"eleven").unwrap();
        drop(log);
        let log = EpochLog::open(dir.path()).unwrap();
        assert_eq!(log.after(Some(10)).unwrap(), vec![(11, b"eleven".to_vec())]);
        assert_eq!(log.size(), (1, 6));
    }

    #[test]
    fn a_discarded_tail_stays_discarded_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EpochLog::open(dir.path()).unwrap();
            for e in [1, 2, 4, 5] {
                log.append(e, &[e as u8]).unwrap();
            }
            log.discard_after(2).unwrap();
            assert_eq!(log.last_epoch(), Some(2));
            assert_eq!(log.size(), (2, 2));
            // Numbers after the abandoned ones, as a coordinator restarting after them takes.
            log.append(7, &[7]).unwrap();
            assert_eq!(
                log.after(None).unwrap(),
                vec![(1, vec![1]), (2, vec![2]), (7, vec![7])]
            );
        }
        let log = EpochLog::open(dir.path()).unwrap();
        assert_eq!(
            log.after(Some(1)).unwrap(),
            vec![(2, vec![2]), (7, vec![7])]
        );
        log.discard_after(0).unwrap();
        assert_eq!(log.after(None).unwrap(), vec![]);
        log.append(9, &[9]).unwrap();
        drop(log);
        let log = EpochLog::open(dir.path()).unwrap();
        assert_eq!(log.after(None).unwrap(), vec![(9, vec![9])]);
        log.truncate(9).unwrap();
        assert_eq!(log.size(), (0, 0));
    }

    /// A discarded tail stays discarded across purges and reopens of a log past raft-engine's
    /// 64 MiB purge threshold (140 MiB in nine files), with the tombstone and the epoch before
    /// it live in the oldest file. (raft-engine did not rewrite that file's live entries here:
    /// its forced rewrite of lagging groups comes after more purges than this test runs.)
    #[test]
    fn a_discarded_tail_stays_discarded_across_purges_past_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        // 1 MiB that raft-engine's compression cannot shrink (an xorshift stream per epoch).
        let big = |e: u64| {
            let mut x = e.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..1 << 17)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect::<Vec<u8>>()
        };
        let want: Vec<u64> = std::iter::once(5).chain(71..=140).collect();
        {
            let log = EpochLog::open(dir.path()).unwrap();
            for e in 1..=70 {
                log.append(e, &big(e)).unwrap();
            }
            log.discard_after(5).unwrap();
            for e in 71..=140 {
                log.append(e, &big(e)).unwrap();
            }
            log.truncate(4).unwrap();
            let got: Vec<u64> = log.after(None).unwrap().iter().map(|(e, _)| *e).collect();
            assert_eq!(got, want);
        }
        for _ in 0..2 {
            let log = EpochLog::open(dir.path()).unwrap();
            let got = log.after(None).unwrap();
            assert_eq!(got.iter().map(|(e, _)| *e).collect::<Vec<_>>(), want);
            assert!(got.iter().all(|(e, b)| *b == big(*e)));
            // A purge at the next truncation, then a reopen again.
            log.truncate(4).unwrap();
        }
    }

    #[test]
    fn a_second_opener_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let _log = EpochLog::open(dir.path()).unwrap();
        let e = EpochLog::open(dir.path()).err().unwrap();
        assert!(e.contains("another statemesh node"), "{e}");
    }
}
