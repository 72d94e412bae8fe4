//! Writing, committing, reading and collecting checkpoints in a blob store (the I/O driver
//! of [`super::format`]).
//!
//! Invariants:
//! - epoch objects are immutable and written (create-only) before their manifest;
//! - a manifest is written create-only: of two writers of one epoch exactly one commits;
//! - only epochs with a manifest exist for readers;
//! - garbage collection never removes an object a retained manifest's recovery needs, nor
//!   anything of an epoch newer than the latest commit (it may still be committing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use prost::Message;

use super::blob::Blob;
use super::format::{
    epoch_object_path, epoch_of, manifest_path, KeyGroupState, Manifest, NodeEpoch, ObjectRef,
};

/// A checkpoint operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The blob store failed.
    #[error("blob store {url}: {op} {path}: {source}")]
    Blob {
        /// The store.
        url: String,
        /// What was being done.
        op: &'static str,
        /// The object.
        path: String,
        /// Why.
        source: object_store::Error,
    },
    /// Another writer committed this epoch first.
    #[error("epoch {0} is already committed (another writer won)")]
    AlreadyCommitted(u64),
    /// The local store is older than the epochs blob storage keeps deltas for.
    #[error("the local store is at epoch {applied}, but blob storage keeps epochs from {oldest} on only")]
    HistoryTooShort {
        /// The local store's epoch.
        applied: u64,
        /// The oldest retained epoch.
        oldest: u64,
    },
    /// An object does not decode.
    #[error("corrupt checkpoint object {path}: {reason}")]
    Corrupt {
        /// The object.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Oldest epoch still needed by a retained manifest.
    pub oldest_needed: Option<u64>,
    /// Manifests deleted.
    pub manifests_deleted: usize,
    /// Epoch objects deleted (including orphans of epochs that never committed).
    pub objects_deleted: usize,
}

/// Checkpoints in one blob store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    blob: Blob,
    /// Manifests garbage collection has read, without inline objects (they never change).
    gc_cache: std::sync::Arc<parking_lot::Mutex<HashMap<u64, Manifest>>>,
}

static NONCE: AtomicU64 = AtomicU64::new(0);

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (NONCE.fetch_add(1, Ordering::Relaxed) << 48) ^ u64::from(std::process::id())
}

impl CheckpointStore {
    /// Checkpoints in `blob`.
    pub fn new(blob: Blob) -> Self {
        CheckpointStore {
            blob,
            gc_cache: Default::default(),
        }
    }

    fn path(&self, rel: &str) -> ObjectPath {
        if self.blob.prefix.as_ref().is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.blob.prefix))
        }
    }

    fn rel<'a>(&self, p: &'a ObjectPath) -> &'a str {
        let s = p.as_ref();
        let prefix = self.blob.prefix.as_ref();
        if prefix.is_empty() {
            s
        } else {
            s.strip_prefix(prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(s)
        }
    }

    fn err(&self, op: &'static str, path: &str, source: object_store::Error) -> CheckpointError {
        CheckpointError::Blob {
            url: self.blob.url.clone(),
            op,
            path: path.to_string(),
            source,
        }
    }

    async fn get(&self, rel: &str) -> Result<Bytes, CheckpointError> {
        let r = self
            .blob
            .store
            .get(&self.path(rel))
            .await
            .map_err(|e| self.err("get", rel, e))?;
        r.bytes().await.map_err(|e| self.err("get", rel, e))
    }

    async fn list(&self, dir: &str) -> Result<Vec<String>, CheckpointError> {
        let prefix = self.path(dir);
        let metas: Vec<_> = self
            .blob
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.err("list", dir, e))?;
        Ok(metas
            .iter()
            .map(|m| self.rel(&m.location).to_string())
            .collect())
    }

    /// Writes a node's epoch object (create-only) and returns its manifest entry.
    pub async fn write_node_epoch(&self, e: &NodeEpoch) -> Result<ObjectRef, CheckpointError> {
        let rel = epoch_object_path(e.epoch, &e.node, nonce());
        let bytes = e.encode_to_vec();
        let size = bytes.len() as u64;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.blob
            .store
            .put_opts(&self.path(&rel), PutPayload::from(bytes), opts)
            .await
            .map_err(|err| self.err("put", &rel, err))?;
        Ok(e.object_ref(rel, size))
    }

    /// The manifest entry of a node's epoch object kept inline in the manifest (no put).
    pub fn inline_node_epoch(&self, e: &NodeEpoch, encoded: &[u8]) -> ObjectRef {
        use base64::Engine;
        let rel = epoch_object_path(e.epoch, &e.node, nonce());
        let mut r = e.object_ref(rel, encoded.len() as u64);
        r.inline = Some(base64::engine::general_purpose::STANDARD.encode(encoded));
        r
    }

    /// Commits an epoch by writing its manifest, create-only. Exactly one of several writers
    /// of the same epoch succeeds; the others get [`CheckpointError::AlreadyCommitted`].
    pub async fn commit(&self, m: &Manifest) -> Result<(), CheckpointError> {
        let rel = manifest_path(m.epoch);
        let body = serde_json::to_vec(m).expect("a manifest serializes");
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .blob
            .store
            .put_opts(&self.path(&rel), PutPayload::from(body), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                Err(CheckpointError::AlreadyCommitted(m.epoch))
            }
            Err(e) => Err(self.err("put", &rel, e)),
        }
    }

    /// The committed epochs, oldest first.
    pub async fn committed_epochs(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut v: Vec<u64> = self
            .list("manifests")
            .await?
            .iter()
            .filter_map(|p| epoch_of(p))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// The manifest of a committed epoch.
    pub async fn manifest(&self, epoch: u64) -> Result<Manifest, CheckpointError> {
        let rel = manifest_path(epoch);
        let b = self.get(&rel).await?;
        serde_json::from_slice(&b).map_err(|e| CheckpointError::Corrupt {
            path: rel,
            reason: e.to_string(),
        })
    }

    /// The newest committed manifest, if any.
    pub async fn latest(&self) -> Result<Option<Manifest>, CheckpointError> {
        match self.committed_epochs().await?.last() {
            Some(&e) => Ok(Some(self.manifest(e).await?)),
            None => Ok(None),
        }
    }

    /// The manifests back from `latest` to the oldest retained one, newest first (garbage
    /// collection keeps this history short: see [`CheckpointStore::gc`]). With `cached`
    /// (garbage collection), manifests read before come from memory, stripped of inline
    /// objects (manifests never change), so a collection reads only the new ones.
    async fn history(&self, latest: u64, cached: bool) -> Result<Vec<Manifest>, CheckpointError> {
        let mut out = Vec::new();
        let mut cur = Some(latest);
        while let Some(e) = cur {
            let hit = if cached {
                self.gc_cache.lock().get(&e).cloned()
            } else {
                None
            };
            let m = match hit {
                Some(m) => m,
                None => match self.manifest(e).await {
                    Ok(mut m) => {
                        if cached {
                            for o in &mut m.objects {
                                o.inline = None;
                            }
                            self.gc_cache.lock().insert(e, m.clone());
                        }
                        m
                    }
                    // Collected by GC: everything a recovery needs is newer.
                    Err(CheckpointError::Blob {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) if e != latest => break,
                    Err(err) => return Err(err),
                },
            };
            cur = m.previous;
            out.push(m);
        }
        Ok(out)
    }

    /// Rebuilds the key groups `wanted` selects as of the newest committed epoch: returns that
    /// epoch (if any) and each key group's state and pending messages.
    ///
    /// A key group's chain is its newest full snapshot (labelled with the epoch it reflects),
    /// then every delta of a later epoch, oldest first. Pending messages come from the newest
    /// epoch only (a key group without a section in it had none at that cut).
    pub async fn recover(
        &self,
        wanted: &dyn Fn(u32) -> bool,
    ) -> Result<(Option<u64>, BTreeMap<u32, KeyGroupState>), CheckpointError> {
        self.recover_after(wanted, None).await
    }

    /// Like [`CheckpointStore::recover`], but when `after` is given only the deltas of epochs
    /// after it are read (the local store already holds the state as of `after`); returns
    /// `None` as the state map if the retained history does not reach back that far.
    pub async fn recover_after(
        &self,
        wanted: &dyn Fn(u32) -> bool,
        after: Option<u64>,
    ) -> Result<(Option<u64>, BTreeMap<u32, KeyGroupState>), CheckpointError> {
        let Some(latest) = self.latest().await? else {
            return Ok((None, BTreeMap::new()));
        };
        let epoch = latest.epoch;
        let manifests = self.history(latest.epoch, false).await?;
        let oldest = manifests.last().map(|m| m.epoch).unwrap_or(epoch);
        if let Some(a) = after {
            if oldest > a + 1 && manifests.last().and_then(|m| m.previous).is_some() {
                return Err(CheckpointError::HistoryTooShort { applied: a, oldest });
            }
        }
        // Per key group: (label, full, path) of every object holding a section of it.
        let mut per_kg: BTreeMap<u32, Vec<(u64, bool, String)>> = BTreeMap::new();
        let mut listed = BTreeSet::new();
        let mut inline: HashMap<String, &str> = HashMap::new();
        for m in &manifests {
            for o in &m.objects {
                if !listed.insert(o.path.clone()) {
                    continue;
                }
                if let Some(b) = &o.inline {
                    inline.insert(o.path.clone(), b);
                }
                let label = epoch_of(&o.path).unwrap_or(m.epoch);
                for &kg in o.key_groups.iter().filter(|k| wanted(**k)) {
                    per_kg.entry(kg).or_default().push((
                        label,
                        o.full_key_groups.contains(&kg),
                        o.path.clone(),
                    ));
                }
            }
        }
        let mut objects: HashMap<String, NodeEpoch> = HashMap::new();
        let mut out = BTreeMap::new();
        for (kg, entries) in per_kg {
            let base = match after {
                Some(a) => Some(a),
                None => entries.iter().filter(|e| e.1).map(|e| e.0).max(),
            };
            let mut chain: Vec<&(u64, bool, String)> = entries
                .iter()
                .filter(|(label, full, _)| match base {
                    Some(b) if after.is_none() => (*full && *label == b) || (!*full && *label > b),
                    // The newest epoch's delta always: it holds the pending messages.
                    Some(b) => !*full && (*label > b || *label == epoch),
                    None => !*full,
                })
                .collect();
            chain.sort_by_key(|(label, full, _)| (*label, !*full));
            let mut state = KeyGroupState::default();
            let mut last = 0;
            for (label, _, path) in chain {
                if !objects.contains_key(path) {
                    let b = match inline.get(path) {
                        Some(b64) => {
                            use base64::Engine;
                            Bytes::from(
                                base64::engine::general_purpose::STANDARD
                                    .decode(b64)
                                    .map_err(|e| CheckpointError::Corrupt {
                                        path: path.clone(),
                                        reason: format!("inline object: {e}"),
                                    })?,
                            )
                        }
                        None => self.get(path).await?,
                    };
                    let e = NodeEpoch::decode(b).map_err(|e| CheckpointError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    objects.insert(path.clone(), e);
                }
                if let Some(s) = objects[path].key_groups.iter().find(|s| s.key_group == kg) {
                    state.apply(s.clone());
                    last = *label;
                }
            }
            if last != epoch {
                state.pending.clear();
            }
            out.insert(kg, state);
        }
        Ok((Some(epoch), out))
    }

    /// Keeps the newest `keep` committed epochs and everything recovering at the newest one
    /// reads (each key group's newest full snapshot and the deltas after it); deletes older
    /// manifests and every object no kept manifest references, including orphans of epochs
    /// that never committed. Objects of epochs newer than the latest commit are left alone
    /// (they may still be committing). Callers must not write full snapshots concurrently.
    pub async fn gc(&self, keep: usize) -> Result<GcReport, CheckpointError> {
        let epochs = self.committed_epochs().await?;
        let Some(&latest) = epochs.last() else {
            return Ok(GcReport::default());
        };
        let keep = keep.max(1);
        let oldest_kept = epochs[epochs.len().saturating_sub(keep)];
        let history = self.history(latest, true).await?;
        let mut seen = BTreeSet::new();
        // Per key group: the label of its newest full snapshot and the manifest listing it.
        let mut base: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for m in &history {
            for o in &m.objects {
                seen.extend(o.key_groups.iter().copied());
                let label = epoch_of(&o.path).unwrap_or(m.epoch);
                for &kg in &o.full_key_groups {
                    let b = base.entry(kg).or_insert((label, m.epoch));
                    if label > b.0 {
                        *b = (label, m.epoch);
                    }
                }
            }
        }
        let oldest_history = history.last().map(|m| m.epoch).unwrap_or(latest);
        let oldest_needed = if seen.iter().any(|k| !base.contains_key(k)) {
            oldest_history
        } else {
            // The manifest listing the full snapshot, and every manifest after its label.
            base.values()
                .map(|(label, listed)| (*listed).min(label + 1))
                .min()
                .unwrap_or(oldest_kept)
                .min(oldest_kept)
                .max(oldest_history)
        };
        let mut report = GcReport {
            oldest_needed: Some(oldest_needed),
            ..Default::default()
        };
        let mut referenced = BTreeSet::new();
        for m in history.iter().filter(|m| m.epoch >= oldest_needed) {
            referenced.extend(m.objects.iter().map(|o| o.path.clone()));
        }
        for e in epochs.iter().copied().filter(|e| *e < oldest_needed) {
            let rel = manifest_path(e);
            self.blob
                .store
                .delete(&self.path(&rel))
                .await
                .map_err(|err| self.err("delete", &rel, err))?;
            report.manifests_deleted += 1;
            self.gc_cache.lock().remove(&e);
        }
        for rel in self.list("epochs").await? {
            let Some(e) = epoch_of(&rel) else { continue };
            if e <= latest && !referenced.contains(&rel) {
                self.blob
                    .store
                    .delete(&self.path(&rel))
                    .await
                    .map_err(|err| self.err("delete", &rel, err))?;
                report.objects_deleted += 1;
            }
        }
        Ok(report)
    }
}
