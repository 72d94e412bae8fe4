//! Writing, committing, reading and collecting checkpoints in a blob store (the I/O driver
//! of [`super::format`]).
//!
//! Invariants:
//! - epoch objects are immutable and written (create-only) before their manifest;
//! - a manifest is written create-only: of two writers of one epoch exactly one commits;
//!   a put whose outcome is unknown (an error after the server may have stored it, or an
//!   object_store retry that meets its own earlier attempt) is resolved by reading the object
//!   back: ours (same writer, or same bytes) → done, another writer's → fenced, absent → retry;
//! - only epochs with a manifest exist for readers;
//! - recovery never silently truncates: a manifest missing from the history (collected by
//!   garbage collection) is skipped only when every key group read has a full snapshot that
//!   covers it; a missing or corrupt object is an error naming it;
//! - garbage collection never removes an object a retained manifest's recovery needs, nor
//!   anything of an epoch newer than the latest commit (it may still be committing).

// `CheckpointError` carries object_store's error (136 bytes); it is returned on the rare
// failure path of blob I/O, where its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use prost::Message;

use super::blob::Blob;
use super::format::{
    epoch_object_path, epoch_of, manifest_path, KeyGroupState, Manifest, NodeEpoch, ObjectRef,
};

/// A walk back along the manifests reads this many one by one before it reads ahead.
const SEQUENTIAL_MANIFESTS: usize = 4;
/// At most this many manifests are read at once when a walk reads ahead.
const MANIFEST_BATCH: usize = 64;
/// At most this many epoch objects are read at once by a recovery.
const OBJECT_READS: usize = 32;

/// A checkpoint operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The blob store failed.
    #[error("blob store {url}: {op} {path}: {}", crate::error::error_chain(source))]
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
    /// An object a manifest lists is not in blob storage.
    #[error("checkpoint object {path} is missing (listed by manifest {epoch}); recovery cannot rebuild the state without it")]
    Missing {
        /// The object.
        path: String,
        /// The manifest listing it.
        epoch: u64,
    },
    /// The history has a gap that no full snapshot covers: recovering (or collecting) would
    /// lose state.
    #[error("manifest {missing} is missing from the checkpoint history and key group {key_group} has no full snapshot at or after epoch {missing} (newest: {base}); refusing to continue with truncated state")]
    Truncated {
        /// The missing manifest's epoch.
        missing: u64,
        /// A key group without a covering full snapshot.
        key_group: u32,
        /// Its newest full snapshot's label, if any.
        base: String,
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

impl CheckpointError {
    /// Retrying cannot help: the stored checkpoints themselves are wrong or incomplete.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CheckpointError::Missing { .. }
                | CheckpointError::Truncated { .. }
                | CheckpointError::Corrupt { .. }
                | CheckpointError::HistoryTooShort { .. }
        )
    }
}

/// The manifests from the newest back, and where the walk stopped.
struct History {
    /// Newest first.
    manifests: Vec<Manifest>,
    /// The epoch of a manifest that the walk needed but that is gone (collected by garbage
    /// collection, or lost), if it stopped at one rather than at the first manifest.
    missing: Option<u64>,
}

impl History {
    /// Each key group's newest full snapshot among the manifests read: (label, listing manifest).
    fn bases(&self) -> BTreeMap<u32, (u64, u64)> {
        let mut base: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for m in &self.manifests {
            for o in &m.objects {
                let label = epoch_of(&o.path).unwrap_or(m.epoch);
                for &kg in &o.full_key_groups {
                    let b = base.entry(kg).or_insert((label, m.epoch));
                    if label > b.0 {
                        *b = (label, m.epoch);
                    }
                }
            }
        }
        base
    }

    /// Proves that the manifests read hold everything of `key_groups`: when the walk stopped
    /// at a missing manifest `m`, each key group needs a full snapshot labelled `≥ m` (every
    /// delta after it is in a manifest read); otherwise names the first that has none.
    fn check_covered(&self, key_groups: &[u32]) -> Result<(), CheckpointError> {
        let Some(missing) = self.missing else {
            return Ok(());
        };
        let bases = self.bases();
        for &kg in key_groups {
            match bases.get(&kg) {
                Some((label, _)) if *label >= missing => {}
                other => {
                    return Err(CheckpointError::Truncated {
                        missing,
                        key_group: kg,
                        base: match other {
                            Some((label, listed)) => {
                                format!("labelled {label}, listed by manifest {listed}")
                            }
                            None => "none".into(),
                        },
                    })
                }
            }
        }
        Ok(())
    }
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

/// The most manifests garbage collection's cache holds (see `CheckpointStore::remember`).
const GC_CACHE_MAX: usize = 20_000;

/// Checkpoints in one blob store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    blob: Blob,
    /// Manifests garbage collection has read, without inline objects (they never change).
    gc_cache: std::sync::Arc<parking_lot::Mutex<HashMap<u64, Manifest>>>,
    /// Checkpoint writes (puts and deletes, leases aside) since start: the lease is renewed
    /// often only while they happen.
    writes: std::sync::Arc<AtomicU64>,
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
            writes: Default::default(),
        }
    }

    /// Checkpoint writes (puts and deletes of anything but leases) since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// A lease object's body.
    pub async fn lease_body(&self, rel: &str) -> Result<Bytes, CheckpointError> {
        self.get(rel).await
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

    pub(crate) async fn get(&self, rel: &str) -> Result<Bytes, CheckpointError> {
        let r = self
            .blob
            .store
            .get(&self.path(rel))
            .await
            .map_err(|e| self.err("get", rel, e))?;
        r.bytes().await.map_err(|e| self.err("get", rel, e))
    }

    async fn list(&self, dir: &str) -> Result<Vec<String>, CheckpointError> {
        Ok(self
            .list_meta(dir)
            .await?
            .into_iter()
            .map(|(rel, _)| rel)
            .collect())
    }

    /// The objects under `dir`, each with when it was last modified.
    async fn list_meta(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, std::time::SystemTime)>, CheckpointError> {
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
            .map(|m| {
                (
                    self.rel(&m.location).to_string(),
                    std::time::SystemTime::from(m.last_modified),
                )
            })
            .collect())
    }

    /// The URL of the location (for messages).
    pub fn url(&self) -> &str {
        &self.blob.url
    }

    /// How its writes are durable (see [`Blob::durability`]).
    pub fn durability(&self) -> &'static str {
        self.blob.durability
    }

    /// The cluster leases at the location (see [`super::lease`]), each with its metadata.
    pub async fn leases(&self) -> Result<Vec<super::lease::LeaseObj>, CheckpointError> {
        let prefix = self.path("leases");
        let metas: Vec<object_store::ObjectMeta> =
            match self.blob.store.list(Some(&prefix)).try_collect().await {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(self.err("list", "leases", e)),
            };
        Ok(metas
            .iter()
            .filter_map(|m| {
                let tag = format!(
                    "{}/{:?}/{:?}/{}",
                    m.last_modified.timestamp_nanos_opt().unwrap_or_default(),
                    m.e_tag,
                    m.version,
                    m.size
                );
                super::lease::parse_lease(self.rel(&m.location), tag)
            })
            .collect())
    }

    /// Deletes a lease object (a new cluster that does not start after all).
    pub async fn delete_lease(&self, rel: &str) -> Result<(), CheckpointError> {
        self.blob
            .store
            .delete(&self.path(rel))
            .await
            .map_err(|e| self.err("delete", rel, e))
    }

    /// Writes (overwrites) a lease object.
    pub async fn put_lease(&self, rel: &str, body: Bytes) -> Result<(), CheckpointError> {
        self.blob
            .store
            .put(&self.path(rel), PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(|e| self.err("put", rel, e))
    }

    /// Writes a node's epoch object (create-only) and returns its manifest entry.
    pub async fn write_node_epoch(&self, e: &NodeEpoch) -> Result<ObjectRef, CheckpointError> {
        self.put_node_epoch(e, "checkpoint-object-put").await
    }

    /// Writes a full snapshot (a node epoch object labelled with the epoch it reflects).
    pub async fn write_full_snapshot(&self, e: &NodeEpoch) -> Result<ObjectRef, CheckpointError> {
        self.put_node_epoch(e, "checkpoint-full-snapshot-put").await
    }

    async fn put_node_epoch(
        &self,
        e: &NodeEpoch,
        failpoint: &'static str,
    ) -> Result<ObjectRef, CheckpointError> {
        let rel = epoch_object_path(e.epoch, &e.node, nonce());
        let bytes = Bytes::from(e.encode_to_vec());
        let size = bytes.len() as u64;
        let outcome = self
            .put_create(&rel, bytes.clone())
            .await
            .and_then(|()| crate::failpoint::eval(failpoint).map_err(|m| self.injected(&rel, m)));
        match outcome {
            Ok(()) => Ok(e.object_ref(rel, size)),
            // Unknown outcome: the object's path carries our nonce, so whatever is stored
            // there is an earlier attempt of this very put.
            Err(err) => match self.read_back(&rel).await {
                Some(stored) if stored == bytes => Ok(e.object_ref(rel, size)),
                Some(_) => Err(CheckpointError::Corrupt {
                    path: rel,
                    reason:
                        "after an ambiguous put, the stored object differs from what was written"
                            .into(),
                }),
                None => Err(err),
            },
        }
    }

    /// A create-only put; `AlreadyExists` and `Precondition` map to a blob error the caller
    /// resolves by reading back.
    async fn put_create(&self, rel: &str, body: Bytes) -> Result<(), CheckpointError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.blob
            .store
            .put_opts(&self.path(rel), PutPayload::from(body), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.err("put", rel, e))
    }

    fn injected(&self, rel: &str, message: String) -> CheckpointError {
        self.err(
            "put",
            rel,
            object_store::Error::Generic {
                store: "failpoint",
                source: message.into(),
            },
        )
    }

    /// The object at `rel` if it can be read now; `None` if it is absent or unreadable (then
    /// the caller keeps its original error and retries).
    async fn read_back(&self, rel: &str) -> Option<Bytes> {
        match self.get(rel).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!(path = rel, error = %e, "read-back after an ambiguous put");
                None
            }
        }
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
    ///
    /// When the put's outcome is unknown (an error, or a create conflict that may be this
    /// writer's own earlier attempt), the manifest is read back: if it is ours (the same
    /// `writer`, or the same contents when no writer is named) the epoch is committed and the
    /// stored manifest is returned as `Some` (it may be an earlier attempt's, listing other
    /// objects); if another writer's, `AlreadyCommitted`; if absent or unreadable, the put's
    /// error. `Ok(None)`: `m` itself was stored.
    pub async fn commit(&self, m: &Manifest) -> Result<Option<Manifest>, CheckpointError> {
        let rel = manifest_path(m.epoch);
        let body = Bytes::from(serde_json::to_vec(m).expect("a manifest serializes"));
        let outcome = self.put_create(&rel, body).await.and_then(|()| {
            crate::failpoint::eval("checkpoint-manifest-put")
                .map_err(|msg| self.injected(&rel, msg))
        });
        let err = match outcome {
            Ok(()) => {
                self.remember(m);
                return Ok(None);
            }
            Err(e) => e,
        };
        let Some(stored) = self.read_back(&rel).await else {
            return Err(err);
        };
        let stored: Manifest =
            serde_json::from_slice(&stored).map_err(|e| CheckpointError::Corrupt {
                path: rel.clone(),
                reason: e.to_string(),
            })?;
        let ours = match (&m.writer, &stored.writer) {
            (Some(a), Some(b)) => a == b,
            (None, None) => stored == *m,
            _ => false,
        };
        if ours {
            tracing::info!(epoch = m.epoch, error = %err, "the manifest put reported an error, but the manifest stored is ours: committed");
            self.remember(&stored);
            Ok(Some(stored))
        } else {
            Err(CheckpointError::AlreadyCommitted(m.epoch))
        }
    }

    /// A manifest this store committed goes into garbage collection's cache (stripped of
    /// inline objects), so that a collection does not read it back: with a commit every
    /// 30-40 ms on S3 that was a GET per commit. Only on a store that collects (its cache is
    /// in use, and each collection prunes it), and never past `GC_CACHE_MAX` manifests.
    fn remember(&self, m: &Manifest) {
        let mut cache = self.gc_cache.lock();
        if cache.is_empty() || cache.len() >= GC_CACHE_MAX {
            return;
        }
        let mut m = m.clone();
        for o in &mut m.objects {
            o.inline = None;
        }
        cache.insert(m.epoch, m);
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
    /// collection keeps this history short: see [`CheckpointStore::gc`]), and the missing
    /// manifest the walk stopped at, if any: whether skipping it is safe is for the caller to
    /// prove ([`History::check_covered`]). With `cached` (garbage collection), manifests read
    /// before come from memory, stripped of inline objects (manifests never change), so a
    /// collection reads only the new ones.
    async fn history(&self, latest: u64, cached: bool) -> Result<History, CheckpointError> {
        self.history_after(latest, cached, None, None).await
    }

    /// The chain of manifests from `latest` back, down to the first missing one — or only
    /// those after `after` (and `latest` itself): a reader of the deltas after `after` needs
    /// no older manifest. Likewise a reader of the key groups `wanted` whole stops once each
    /// has a full snapshot listed and the manifests after the oldest of them are read.
    async fn history_after(
        &self,
        latest: u64,
        cached: bool,
        after: Option<u64>,
        wanted: Option<&BTreeSet<u32>>,
    ) -> Result<History, CheckpointError> {
        let mut out = Vec::new();
        let mut missing = None;
        let mut cur = Some(latest);
        // Per wanted key group, the label of the newest full snapshot listed so far.
        let mut fulls: BTreeMap<u32, u64> = BTreeMap::new();
        // A short walk reads its manifests one by one along the chain. A long one (a
        // recovery from blob storage alone) lists the committed epochs and reads the next
        // older ones concurrently, in batches that double (one round trip per batch rather
        // than per manifest); what it read beyond where the walk stops is dropped.
        let mut read = 0usize;
        let mut listed: Option<Vec<u64>> = None;
        let mut batch = 2usize;
        let mut ahead: HashMap<u64, Result<Manifest, CheckpointError>> = HashMap::new();
        while let Some(e) = cur {
            if e != latest && after.is_some_and(|a| e <= a) {
                break;
            }
            if e != latest
                && wanted.is_some_and(|w| !w.is_empty() && fulls.len() == w.len())
                && fulls.values().all(|&l| e <= l)
            {
                break;
            }
            let hit = if cached {
                self.gc_cache.lock().get(&e).cloned()
            } else {
                None
            };
            let m = match hit {
                Some(m) => m,
                None => match match ahead.remove(&e) {
                    Some(r) => r,
                    None if read < SEQUENTIAL_MANIFESTS => {
                        read += 1;
                        self.manifest(e).await
                    }
                    None => {
                        if listed.is_none() {
                            listed = Some(self.committed_epochs().await?);
                        }
                        let l = listed.as_deref().unwrap_or_default();
                        let below = l.partition_point(|&x| x < e);
                        let mut epochs = vec![e];
                        epochs.extend(l[below.saturating_sub(batch - 1)..below].iter().rev());
                        batch = (batch * 2).min(MANIFEST_BATCH);
                        let got =
                            futures::future::join_all(epochs.iter().map(|&x| self.manifest(x)))
                                .await;
                        ahead.extend(epochs.into_iter().zip(got));
                        ahead.remove(&e).expect("read in this batch")
                    }
                } {
                    Ok(mut m) => {
                        if m.epoch != e {
                            return Err(CheckpointError::Corrupt {
                                path: manifest_path(e),
                                reason: format!("it names epoch {}", m.epoch),
                            });
                        }
                        if cached {
                            for o in &mut m.objects {
                                o.inline = None;
                            }
                            self.gc_cache.lock().insert(e, m.clone());
                        }
                        m
                    }
                    Err(CheckpointError::Blob {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) if e != latest => {
                        missing = Some(e);
                        break;
                    }
                    Err(err) => return Err(err),
                },
            };
            if m.previous.is_some_and(|p| p >= e) {
                return Err(CheckpointError::Corrupt {
                    path: manifest_path(e),
                    reason: format!("its previous epoch {:?} is not older", m.previous),
                });
            }
            if let Some(w) = wanted {
                for o in m.objects.iter().filter(|o| !o.full_key_groups.is_empty()) {
                    let label = epoch_of(&o.path).unwrap_or(m.epoch);
                    for kg in o.full_key_groups.iter().filter(|k| w.contains(k)) {
                        let l = fulls.entry(*kg).or_insert(label);
                        *l = (*l).max(label);
                    }
                }
            }
            cur = m.previous;
            out.push(m);
        }
        Ok(History {
            manifests: out,
            missing,
        })
    }

    /// Rebuilds `key_groups` as of the newest committed epoch: returns that epoch (if any)
    /// and each key group's state and pending messages.
    ///
    /// A key group's chain is its newest full snapshot (labelled with the epoch it reflects),
    /// then every delta of a later epoch, oldest first. Pending messages come from the newest
    /// epoch only (a key group without a section in it had none at that cut). Fails with
    /// [`CheckpointError::Truncated`] if the history has a gap not covered by a full snapshot
    /// of every key group, and with [`CheckpointError::Missing`] or
    /// [`CheckpointError::Corrupt`] for an object it cannot read.
    pub async fn recover(
        &self,
        key_groups: &[u32],
    ) -> Result<(Option<u64>, BTreeMap<u32, KeyGroupState>), CheckpointError> {
        self.recover_after(key_groups, None).await
    }

    /// Like [`CheckpointStore::recover`], but when `after` is given only the deltas of epochs
    /// after it are read (the local store already holds the state as of `after`); fails with
    /// [`CheckpointError::HistoryTooShort`] if the retained history does not reach back that
    /// far.
    pub async fn recover_after(
        &self,
        key_groups: &[u32],
        after: Option<u64>,
    ) -> Result<(Option<u64>, BTreeMap<u32, KeyGroupState>), CheckpointError> {
        let Some(&epoch) = self.committed_epochs().await?.last() else {
            return Ok((None, BTreeMap::new()));
        };
        self.recover_at(epoch, key_groups, after).await
    }

    /// Like [`CheckpointStore::recover_after`], at a committed `epoch` the caller already
    /// knows (no listing of the manifests).
    pub async fn recover_at(
        &self,
        epoch: u64,
        key_groups: &[u32],
        after: Option<u64>,
    ) -> Result<(Option<u64>, BTreeMap<u32, KeyGroupState>), CheckpointError> {
        let wanted: BTreeSet<u32> = key_groups.iter().copied().collect();
        let history = self
            .history_after(epoch, false, after, after.is_none().then_some(&wanted))
            .await?;
        match (after, history.missing) {
            (Some(a), Some(missing)) if missing > a => {
                let oldest = history.manifests.last().map(|m| m.epoch).unwrap_or(epoch);
                return Err(CheckpointError::HistoryTooShort { applied: a, oldest });
            }
            (Some(_), _) => {}
            (None, _) => history.check_covered(key_groups)?,
        }
        // Per key group: (label, full, path, listing manifest) of every object with a section
        // of it.
        let mut per_kg: BTreeMap<u32, Vec<(u64, bool, String, u64)>> = BTreeMap::new();
        let mut listed = BTreeSet::new();
        let mut inline: HashMap<String, &str> = HashMap::new();
        for m in &history.manifests {
            for o in &m.objects {
                if !listed.insert(o.path.clone()) {
                    continue;
                }
                if let Some(b) = &o.inline {
                    inline.insert(o.path.clone(), b);
                }
                let label = epoch_of(&o.path).unwrap_or(m.epoch);
                for &kg in o.key_groups.iter().filter(|k| wanted.contains(k)) {
                    per_kg.entry(kg).or_default().push((
                        label,
                        o.full_key_groups.contains(&kg),
                        o.path.clone(),
                        m.epoch,
                    ));
                }
            }
        }
        // A key group's chain: its base (the newest full snapshot, or the local store as of
        // `after`) and the deltas after it, oldest first.
        type Entry = (u64, bool, String, u64);
        fn chain_of(entries: &[Entry], after: Option<u64>, epoch: u64) -> Vec<&Entry> {
            let base = match after {
                Some(a) => Some(a),
                None => entries.iter().filter(|e| e.1).map(|e| e.0).max(),
            };
            let mut chain: Vec<&Entry> = entries
                .iter()
                .filter(|(label, full, _, _)| match base {
                    Some(b) if after.is_none() => (*full && *label == b) || (!*full && *label > b),
                    // The newest epoch's delta always: it holds the pending messages.
                    Some(b) => !*full && (*label > b || *label == epoch),
                    None => !*full,
                })
                .collect();
            chain.sort_by_key(|(label, full, _, _)| (*label, !*full));
            chain
        }
        // The objects of every chain not inline in a manifest, read concurrently.
        let need: BTreeSet<String> = per_kg
            .values()
            .flat_map(|entries| chain_of(entries, after, epoch))
            .map(|(_, _, path, _)| path)
            .filter(|path| !inline.contains_key(*path))
            .cloned()
            .collect();
        let reads: Vec<_> = need
            .into_iter()
            .map(|path| async move {
                let r = self.get(&path).await;
                (path, r)
            })
            .collect();
        let mut fetched: HashMap<String, Result<Bytes, CheckpointError>> =
            futures::stream::iter(reads)
                .buffer_unordered(OBJECT_READS)
                .collect()
                .await;
        let mut objects: HashMap<String, NodeEpoch> = HashMap::new();
        let mut out = BTreeMap::new();
        for (kg, entries) in &per_kg {
            let kg = *kg;
            let chain = chain_of(entries, after, epoch);
            let mut state = KeyGroupState::default();
            let mut last = 0;
            for (label, full, path, listed_by) in chain {
                if !objects.contains_key(path) {
                    let b = match inline.get(path) {
                        Some(b64) => {
                            use base64::Engine;
                            Bytes::from(
                                base64::engine::general_purpose::STANDARD
                                    .decode(b64)
                                    .map_err(|e| CheckpointError::Corrupt {
                                        path: format!("{} (inline in manifest {listed_by})", path),
                                        reason: e.to_string(),
                                    })?,
                            )
                        }
                        None => match fetched.remove(path) {
                            Some(r) => r,
                            None => self.get(path).await,
                        }
                        .map_err(|e| match e {
                            CheckpointError::Blob {
                                source: object_store::Error::NotFound { .. },
                                ..
                            } => CheckpointError::Missing {
                                path: path.clone(),
                                epoch: *listed_by,
                            },
                            e => e,
                        })?,
                    };
                    let e = NodeEpoch::decode(b).map_err(|e| CheckpointError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    objects.insert(path.clone(), e);
                }
                match objects[path].key_groups.iter().find(|s| s.key_group == kg) {
                    // Several nodes' parts of one epoch: the owner's has the state, any of
                    // them pending messages for the key group (sent to it while its owner took
                    // no part, or in flight).
                    Some(s) if *label == last && last != 0 && !*full => {
                        state.pending.extend(s.pending.iter().cloned());
                        let mut s = s.clone();
                        s.pending.clear();
                        let pending = std::mem::take(&mut state.pending);
                        if !s.puts.is_empty() || !s.deletes.is_empty() {
                            state.apply(s);
                        }
                        state.pending = pending;
                    }
                    Some(s) => {
                        state.apply(s.clone());
                        last = *label;
                    }
                    None => {
                        return Err(CheckpointError::Corrupt {
                            path: path.clone(),
                            reason: format!(
                                "manifest {listed_by} lists key group {kg} in it, but it has no section for it"
                            ),
                        })
                    }
                }
            }
            if last != epoch {
                state.pending.clear();
            }
            out.insert(kg, state);
        }
        Ok((Some(epoch), out))
    }

    /// Keeps the newest `keep` committed epochs and everything recovering `key_groups` at
    /// the newest one reads (each key group's newest full snapshot and the deltas after it);
    /// deletes older manifests (oldest first, so a collection stopped half-way leaves a
    /// recoverable history) and then every object no kept manifest references, including
    /// orphans of epochs that never committed. Objects of epochs newer than the latest commit
    /// are left alone (they may still be committing). Refuses to delete anything
    /// ([`CheckpointError::Truncated`]) when the history it finds already has a gap that a full
    /// snapshot does not cover. Callers must not write full snapshots concurrently.
    pub async fn gc(&self, keep: usize, key_groups: &[u32]) -> Result<GcReport, CheckpointError> {
        self.gc_after(keep, key_groups, std::time::Duration::ZERO)
            .await
    }

    /// [`Self::gc`], but an object no manifest lists is deleted only once it is older than
    /// `grace`: a full snapshot is written before the manifest that lists it (by any member
    /// of a cluster, while another one collects), and must survive until it is listed.
    pub async fn gc_after(
        &self,
        keep: usize,
        key_groups: &[u32],
        grace: std::time::Duration,
    ) -> Result<GcReport, CheckpointError> {
        let epochs = self.committed_epochs().await?;
        let Some(&latest) = epochs.last() else {
            return Ok(GcReport::default());
        };
        let keep = keep.max(1);
        let oldest_kept = epochs[epochs.len().saturating_sub(keep)];
        let history = self.history(latest, true).await?;
        history.check_covered(key_groups)?;
        let base = history.bases();
        let seen: BTreeSet<u32> = history
            .manifests
            .iter()
            .flat_map(|m| m.objects.iter().flat_map(|o| o.key_groups.iter().copied()))
            .chain(key_groups.iter().copied())
            .collect();
        let oldest_history = history.manifests.last().map(|m| m.epoch).unwrap_or(latest);
        let oldest_needed = if seen.iter().any(|k| !base.contains_key(k)) {
            // Some key group's chain starts at the first delta: keep the whole history.
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
        for m in history
            .manifests
            .iter()
            .filter(|m| m.epoch >= oldest_needed)
        {
            referenced.extend(m.objects.iter().map(|o| o.path.clone()));
        }
        for e in epochs.iter().copied().filter(|e| *e < oldest_needed) {
            let rel = manifest_path(e);
            self.delete(&rel).await?;
            report.manifests_deleted += 1;
            self.gc_cache.lock().remove(&e);
        }
        let now = std::time::SystemTime::now();
        for (rel, modified) in self.list_meta("epochs").await? {
            let Some(e) = epoch_of(&rel) else { continue };
            let age = now.duration_since(modified).unwrap_or_default();
            if e <= latest && !referenced.contains(&rel) && age >= grace {
                self.delete(&rel).await?;
                report.objects_deleted += 1;
            }
        }
        Ok(report)
    }

    async fn delete(&self, rel: &str) -> Result<(), CheckpointError> {
        crate::failpoint::eval("checkpoint-gc-delete").map_err(|m| {
            self.err(
                "delete",
                rel,
                object_store::Error::Generic {
                    store: "failpoint",
                    source: m.into(),
                },
            )
        })?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.blob
            .store
            .delete(&self.path(rel))
            .await
            .map_err(|err| self.err("delete", rel, err))
    }
}
