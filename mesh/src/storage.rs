//! The control group's durable log: raft-rs's `Storage` over raft-engine (which fsyncs; sled's
//! flush is not an fsync), plus the writes a replica makes ([`ControlLog`]).
//!
//! One raft-engine group (id 1) holds the entries and these keys: `hs` (hard state), `cs`
//! (configuration), `snap` (the newest snapshot: metadata and the state machine's bytes) and
//! `sm` (the state machine as last persisted, with its applied index; it may lag the log,
//! never lead its commit) without the epoch log's epochs, which are saved one per key beside it
//! (`tail/` ‖ epoch, big-endian; in the same batch, so the two always agree): a save writes
//! only the epochs logged and deletes the ones uploaded since the last. Entries and the hard state of one `Ready` go in one fsynced batch;
//! the commit index is fsynced before any entry it commits is applied, so a restart never finds
//! `applied > committed`. A snapshot received from the leader replaces the whole log in one
//! batch; compaction keeps a snapshot at the compaction point, which is what a lagging
//! follower is sent.

use std::path::Path;
use std::sync::{Arc, RwLock};

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use raft_engine::{Command as EngineCommand, Config, Engine, LogBatch, MessageExt, ReadableSize};

use std::collections::BTreeMap;

use crate::control::{ClusterState, EpochBytes, RaftConf};

const GROUP: u64 = 1;
const HARD_STATE: &[u8] = b"hs";
const CONF_STATE: &[u8] = b"cs";
const SNAPSHOT: &[u8] = b"snap";
const STATE: &[u8] = b"sm";
/// The prefix of the saved epoch log's keys.
const TAIL: &[u8] = b"tail/";

fn tail_key(epoch: u64) -> Vec<u8> {
    let mut k = TAIL.to_vec();
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

/// The writes a control-group replica makes to its log, on top of raft-rs's reads.
pub trait ControlLog: Storage {
    /// Appends entries (replacing any conflicting tail) and saves the hard state, durably.
    fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), String>;
    /// Saves a newer commit index, durably.
    fn persist_commit(&self, commit: u64) -> Result<(), String>;
    /// Saves the configuration a configuration change produced.
    fn set_conf_state(&self, cs: ConfState) -> Result<(), String>;
    /// Replaces the log by a snapshot from the leader.
    fn apply_snapshot(&self, snap: Snapshot) -> Result<(), String>;
    /// The saved hard state.
    fn hard_state(&self) -> HardState;
    /// Keeps a snapshot of the state machine at `state.applied_index` and drops the entries
    /// before the last `keep` of it (no-op for storages that cannot): a member at most `keep`
    /// entries behind still catches up from entries, one further behind gets the snapshot.
    fn compact(&self, state: &ClusterState, keep: u64) -> Result<(), String>;
    /// Whether the leader needed a snapshot its kept one cannot serve (it predates the
    /// configuration that added the peer); [`ControlLog::refresh_snapshot`] then keeps one.
    fn snapshot_wanted(&self) -> bool {
        false
    }
    /// Keeps a snapshot of `state` at its applied index (no compaction).
    fn refresh_snapshot(&self, _state: &ClusterState) -> Result<(), String> {
        Ok(())
    }
}

impl ControlLog for MemStorage {
    fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), String> {
        let mut w = self.wl();
        if !entries.is_empty() {
            w.append(entries).map_err(|e| e.to_string())?;
        }
        if let Some(hs) = hs {
            w.set_hardstate(hs.clone());
        }
        Ok(())
    }

    fn persist_commit(&self, commit: u64) -> Result<(), String> {
        self.wl().mut_hard_state().set_commit(commit);
        Ok(())
    }

    fn set_conf_state(&self, cs: ConfState) -> Result<(), String> {
        self.wl().set_conf_state(cs);
        Ok(())
    }

    fn apply_snapshot(&self, snap: Snapshot) -> Result<(), String> {
        self.wl().apply_snapshot(snap).map_err(|e| e.to_string())
    }

    fn hard_state(&self) -> HardState {
        self.rl().hard_state().clone()
    }

    fn compact(&self, _state: &ClusterState, _keep: u64) -> Result<(), String> {
        Ok(())
    }
}

/// raft-engine's view of raft-rs entries (also the epoch log's).
#[derive(Clone)]
pub(crate) struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

struct Cached {
    hs: HardState,
    cs: ConfState,
    snap: Snapshot,
}

/// The control group's log in a raft-engine directory. Cheap to clone.
#[derive(Clone)]
pub struct EngineStorage {
    engine: Arc<Engine>,
    cached: Arc<RwLock<Cached>>,
    /// Set by `snapshot` when the kept snapshot does not list the peer asking.
    wanted: Arc<std::sync::atomic::AtomicBool>,
    /// The epochs of the epoch log saved beside the state (`tail/` keys).
    saved_tail: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    /// Entries read from the log for Raft (see [`EngineStorage::entries_read`]).
    read: Arc<std::sync::atomic::AtomicU64>,
}

fn engine_err(e: impl std::fmt::Display) -> String {
    format!("control log: {e}")
}

fn to_raft(e: String) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.into()))
}

impl EngineStorage {
    /// Opens (or creates) the log in `dir`. A new log starts with the configuration
    /// `bootstrap` (the first voters and learners).
    pub fn open(dir: &Path, bootstrap: &ConfState) -> Result<EngineStorage, String> {
        let cfg = Config {
            dir: dir.to_string_lossy().to_string(),
            // raft-engine deletes files of compacted entries only once the log exceeds this
            // (default 10 GiB); the control log is small.
            purge_threshold: ReadableSize::mb(64),
            target_file_size: ReadableSize::mb(8),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(engine_err)?;
        let hs: Option<HardState> = engine.get_message(GROUP, HARD_STATE).map_err(engine_err)?;
        let cs: Option<ConfState> = engine.get_message(GROUP, CONF_STATE).map_err(engine_err)?;
        let snap: Option<Snapshot> = engine.get_message(GROUP, SNAPSHOT).map_err(engine_err)?;
        let s = EngineStorage {
            engine: Arc::new(engine),
            cached: Arc::new(RwLock::new(Cached {
                hs: hs.unwrap_or_default(),
                cs: cs.unwrap_or_else(|| bootstrap.clone()),
                snap: snap.unwrap_or_default(),
            })),
            wanted: Default::default(),
            saved_tail: Default::default(),
            read: Default::default(),
        };
        *s.saved_tail.lock().unwrap() = s.saved_epochs()?.into_keys().collect();
        if s.engine.get(GROUP, CONF_STATE).is_none() {
            s.set_conf_state(bootstrap.clone())?;
        }
        Ok(s)
    }

    /// The state machine to restart from: the newer of the one last saved
    /// ([`EngineStorage::save_state`], not synced) and the snapshot kept when the log was
    /// compacted (synced), so a restart can always replay the log from its applied index.
    pub fn load_state(&self) -> Result<Option<ClusterState>, String> {
        let saved = match self.engine.get(GROUP, STATE) {
            None => None,
            Some(b) => {
                let mut s = ClusterState::decode(&b)?;
                s.log.extend(self.saved_epochs()?);
                Some(s)
            }
        };
        let snap = self.cached.read().unwrap().snap.clone();
        let from_snap = if snap.get_data().is_empty() {
            None
        } else {
            Some(ClusterState::decode(snap.get_data())?)
        };
        Ok(match (saved, from_snap) {
            (Some(a), Some(b)) => Some(if a.applied_index >= b.applied_index {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        })
    }

    /// Saves the state machine (not synced: a state that lags the log is replayed forward):
    /// the state without its epoch log, plus the epochs logged and minus the epochs uploaded
    /// since the last save.
    pub fn save_state(&self, state: &ClusterState) -> Result<(), String> {
        let mut saved = self.saved_tail.lock().unwrap();
        let mut b = LogBatch::default();
        b.put(GROUP, STATE.to_vec(), state.encode_without_log())
            .map_err(engine_err)?;
        let gone: Vec<u64> = saved
            .iter()
            .filter(|e| !state.log.epochs().contains_key(e))
            .copied()
            .collect();
        for e in &gone {
            b.delete(GROUP, tail_key(*e));
        }
        let mut added = Vec::new();
        for (e, bytes) in state.log.epochs() {
            if !saved.contains(e) {
                b.put(GROUP, tail_key(*e), bytes.bytes().to_vec())
                    .map_err(engine_err)?;
                added.push(*e);
            }
        }
        self.engine.write(&mut b, false).map_err(engine_err)?;
        for e in gone {
            saved.remove(&e);
        }
        saved.extend(added);
        Ok(())
    }

    /// The epochs of the epoch log saved beside the state.
    fn saved_epochs(&self) -> Result<BTreeMap<u64, EpochBytes>, String> {
        let mut out = BTreeMap::new();
        let mut end = TAIL.to_vec();
        *end.last_mut().expect("a prefix") += 1;
        let mut bad = None;
        self.engine
            .scan_raw_messages(GROUP, Some(TAIL), Some(&end), false, |k, v| {
                match k[TAIL.len()..].try_into() {
                    Ok(b) => {
                        out.insert(u64::from_be_bytes(b), EpochBytes::new(v.to_vec()));
                        true
                    }
                    Err(_) => {
                        bad = Some(k.to_vec());
                        false
                    }
                }
            })
            .map_err(engine_err)?;
        match bad {
            Some(k) => Err(engine_err(format!(
                "a saved epoch's key is malformed: {}",
                String::from_utf8_lossy(&k)
            ))),
            None => Ok(out),
        }
    }

    /// Whether nothing was ever written (no hard state, no snapshot, no entry).
    pub fn is_new(&self) -> bool {
        let c = self.cached.read().unwrap();
        c.hs == HardState::default()
            && c.snap.get_metadata().index == 0
            && self.engine.last_index(GROUP).is_none()
    }

    /// Starts a new group's log with `state` as a snapshot at index 1 (term 1) holding its
    /// configuration (`state.conf`): the log then starts at 2, so a member that joins later always catches
    /// up from a snapshot first and so learns the first configuration and the cluster id,
    /// which no entry carries (raft-rs's "non-zero first index" initialisation, as TiKV's).
    pub fn bootstrap(&self, state: &ClusterState) -> Result<(), String> {
        if !self.is_new() {
            return Err("control log: bootstrap of a log that is not new".into());
        }
        let mut state = state.clone();
        state.applied_index = 1;
        let conf = state.conf.clone().unwrap_or_default();
        let cs = ConfState::from((conf.voters, conf.learners));
        let mut snap = Snapshot::default();
        snap.set_data(state.encode().into());
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(cs);
        self.apply_snapshot(snap)
    }

    fn snapshot_index(&self) -> u64 {
        self.cached.read().unwrap().snap.get_metadata().index
    }

    fn write(&self, b: &mut LogBatch) -> Result<(), String> {
        self.engine.write(b, true).map(|_| ()).map_err(engine_err)
    }
}

impl Storage for EngineStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.cached.read().unwrap();
        Ok(RaftState::new(c.hs.clone(), c.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index()? {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index()? + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        // Only what the size limit lets through is read: a leader sending a member that is
        // far behind its entries asks for everything from its next index on, once per
        // message, and reading it all each time held the control thread up for seconds (its
        // leadership lapsed meanwhile, and the next leader did the same).
        let max_size: Option<u64> = max_size.into();
        let mut v = Vec::new();
        let n = self
            .engine
            .fetch_entries_to::<EntryExt>(
                GROUP,
                low,
                high,
                max_size.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
                &mut v,
            )
            .map_err(|e| to_raft(engine_err(e)))?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        raft::util::limit_size(&mut v, max_size);
        Ok(v)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        {
            let c = self.cached.read().unwrap();
            if idx == c.snap.get_metadata().index {
                return Ok(c.snap.get_metadata().term);
            }
        }
        if idx < self.first_index()? {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index()? {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self
            .engine
            .get_entry::<EntryExt>(GROUP, idx)
            .map_err(|e| to_raft(engine_err(e)))?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self
            .engine
            .first_index(GROUP)
            .unwrap_or(self.snapshot_index() + 1))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self
            .engine
            .last_index(GROUP)
            .unwrap_or(self.snapshot_index()))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let c = self.cached.read().unwrap();
        let cs = c.snap.get_metadata().get_conf_state();
        // A peer the snapshot's configuration does not list would refuse it (raft-rs): a
        // newer one is made by the replica's next round and sent on the next try.
        let lists = cs
            .get_voters()
            .iter()
            .chain(cs.get_learners())
            .chain(cs.get_voters_outgoing())
            .chain(cs.get_learners_next())
            .any(|&id| id == to);
        if c.snap.get_metadata().index < request_index || c.snap.get_data().is_empty() || !lists {
            self.wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(c.snap.clone())
    }
}

impl ControlLog for EngineStorage {
    fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), String> {
        let mut b = LogBatch::default();
        if !entries.is_empty() {
            b.add_entries::<EntryExt>(GROUP, entries)
                .map_err(engine_err)?;
        }
        if let Some(hs) = hs {
            b.put_message(GROUP, HARD_STATE.to_vec(), hs)
                .map_err(engine_err)?;
        }
        if b.is_empty() {
            return Ok(());
        }
        self.write(&mut b)?;
        if let Some(hs) = hs {
            self.cached.write().unwrap().hs = hs.clone();
        }
        Ok(())
    }

    fn persist_commit(&self, commit: u64) -> Result<(), String> {
        let mut hs = self.cached.read().unwrap().hs.clone();
        if commit <= hs.commit {
            return Ok(());
        }
        hs.set_commit(commit);
        self.persist(&[], Some(&hs))
    }

    fn set_conf_state(&self, cs: ConfState) -> Result<(), String> {
        let mut b = LogBatch::default();
        b.put_message(GROUP, CONF_STATE.to_vec(), &cs)
            .map_err(engine_err)?;
        self.write(&mut b)?;
        self.cached.write().unwrap().cs = cs;
        Ok(())
    }

    fn apply_snapshot(&self, snap: Snapshot) -> Result<(), String> {
        let meta = snap.get_metadata().clone();
        let mut hs = self.cached.read().unwrap().hs.clone();
        hs.set_term(hs.term.max(meta.term));
        hs.set_commit(hs.commit.max(meta.index));
        let mut b = LogBatch::default();
        // The whole log goes (entries and keys), then the new keys, in one batch.
        b.add_command(GROUP, EngineCommand::Clean);
        b.put_message(GROUP, HARD_STATE.to_vec(), &hs)
            .map_err(engine_err)?;
        b.put_message(GROUP, CONF_STATE.to_vec(), meta.get_conf_state())
            .map_err(engine_err)?;
        b.put_message(GROUP, SNAPSHOT.to_vec(), &snap)
            .map_err(engine_err)?;
        // The state as `save_state` keeps it: without its epoch log, whose epochs go beside it.
        let mut saved = self.saved_tail.lock().unwrap();
        let mut tail = std::collections::BTreeSet::new();
        if let Ok(state) = ClusterState::decode(snap.get_data()) {
            b.put(GROUP, STATE.to_vec(), state.encode_without_log())
                .map_err(engine_err)?;
            for (e, bytes) in state.log.epochs() {
                b.put(GROUP, tail_key(*e), bytes.bytes().to_vec())
                    .map_err(engine_err)?;
                tail.insert(*e);
            }
        }
        self.write(&mut b)?;
        *saved = tail;
        drop(saved);
        let mut c = self.cached.write().unwrap();
        c.hs = hs;
        c.cs = meta.get_conf_state().clone();
        c.snap = snap;
        Ok(())
    }

    fn hard_state(&self) -> HardState {
        self.cached.read().unwrap().hs.clone()
    }

    fn snapshot_wanted(&self) -> bool {
        self.wanted.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn refresh_snapshot(&self, state: &ClusterState) -> Result<(), String> {
        self.wanted
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.keep_snapshot(state, None)
    }

    fn compact(&self, state: &ClusterState, keep: u64) -> Result<(), String> {
        self.keep_snapshot(state, Some(keep))
    }
}

impl EngineStorage {
    /// Entries read from the log for Raft since it was opened (a leader reads them to send
    /// them to the other members).
    pub fn entries_read(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps a snapshot of `state` at its applied index and, with `keep`, drops the entries
    /// before the last `keep` applied ones.
    fn keep_snapshot(&self, state: &ClusterState, keep: Option<u64>) -> Result<(), String> {
        let index = state.applied_index;
        if index <= self.snapshot_index() {
            return Ok(());
        }
        let term = self.term(index).map_err(|e| e.to_string())?;
        let mut snap = Snapshot::default();
        snap.set_data(state.encode().into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.cached.read().unwrap().cs.clone());
        let mut b = LogBatch::default();
        b.put_message(GROUP, SNAPSHOT.to_vec(), &snap)
            .map_err(engine_err)?;
        if let Some(keep) = keep {
            let keep_from = (index + 1).saturating_sub(keep).max(1);
            b.add_command(GROUP, EngineCommand::Compact { index: keep_from });
        }
        self.write(&mut b)?;
        self.cached.write().unwrap().snap = snap;
        if keep.is_none() {
            return Ok(());
        }
        // Log files holding only compacted entries are deleted (raft-engine does it on request,
        // once the log is over `purge_threshold`). A failure here loses nothing: retried at the
        // next compaction.
        if let Err(e) = self.engine.purge_expired_files() {
            return Err(engine_err(format!("purging compacted log files: {e}")));
        }
        Ok(())
    }
}

/// Opens the control log in `<data_dir>/control` (created with the configuration
/// `bootstrap` if new); an unusable directory is refused with its name.
pub fn open_in(data_dir: &Path, bootstrap: &RaftConf) -> Result<EngineStorage, String> {
    let dir = data_dir.join("control");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cs = ConfState::from((bootstrap.voters.clone(), bootstrap.learners.clone()));
    EngineStorage::open(&dir, &cs).map_err(|e| {
        if e.contains("Failed to lock file") {
            format!(
                "{}: another statemesh node uses this data directory (its control log is locked)",
                dir.display()
            )
        } else {
            format!("{}: {e}", dir.display())
        }
    })
}
