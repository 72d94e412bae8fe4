//! Uploading the epoch log to blob storage (see OVERVIEW.md, "The epoch log").
//!
//! A node alone commits its epochs to its local log (`statemesh_mesh::epochlog`, fsynced) and
//! uploads them every few seconds or megabytes as one merged delta: the epochs after the last
//! uploaded manifest `p`, up to the newest logged `l`, become one object (each changed key's
//! last value or deletion; the pending messages of `l`) and a manifest `l` whose previous
//! is `p`. A reader of the chain cannot tell it from a single epoch `l` written after `p`.
//! Applying it over a state newer than `p` (a full snapshot labelled inside `(p, l]`, or sled
//! applied that far) is also right: it carries the newest value of every key changed after `p`.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::sync::Arc;

use prost::Message;
use statemesh_mesh::control::EpochBytes;
use statemesh_mesh::epochlog::EpochLog;

use super::format::{Entry, KeyGroupSection, Manifest, NodeEpoch, NodeEpochChanges, ObjectRef};
use super::store::{CheckpointError, CheckpointStore};

/// Merges consecutive committed epochs of one node (oldest first) into one delta labelled with
/// the newest: per key group, every key's last write or deletion, and the newest epoch's
/// pending messages (an epoch's sections hold all of a key group's pending messages at its
/// cut; a key group without a section in the newest epoch had none). Several parts of the
/// same epoch (participants that share a name: `[checkpoint] node_id` defaults to `node-0` on
/// every node) are applied in order and their pending messages all kept.
pub(crate) fn merge(epochs: Vec<NodeEpoch>) -> Option<NodeEpoch> {
    let last = epochs.last()?;
    let (epoch, node) = (last.epoch, last.node.clone());
    #[derive(Default)]
    struct Kg {
        changes: FxHashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
        seq: u64,
        pending: Vec<super::format::PendingMessage>,
        version: u64,
    }
    let mut kgs: BTreeMap<u32, Kg> = BTreeMap::new();
    for e in epochs {
        let newest = e.epoch == epoch;
        for s in e.key_groups {
            let k = kgs.entry(s.key_group).or_default();
            // Deletes then puts, as a section is applied.
            for d in s.deletes {
                k.seq += 1;
                k.changes.insert(d, (k.seq, None));
            }
            for p in s.puts {
                k.seq += 1;
                k.changes.insert(p.key, (k.seq, Some(p.value)));
            }
            if newest {
                k.pending.extend(s.pending);
            }
            if s.version > 0 {
                k.version = s.version;
            }
        }
    }
    let key_groups = kgs
        .into_iter()
        .map(|(key_group, k)| {
            let mut changes: Vec<_> = k.changes.into_iter().collect();
            changes.sort_by_key(|(_, (seq, _))| *seq);
            let mut s = KeyGroupSection {
                key_group,
                version: k.version,
                pending: k.pending,
                ..Default::default()
            };
            for (key, (_, v)) in changes {
                match v {
                    Some(value) => s.puts.push(Entry { key, value }),
                    None => s.deletes.push(key),
                }
            }
            s
        })
        .collect();
    Some(NodeEpoch {
        epoch,
        node,
        key_groups,
    })
}

/// What one upload wrote.
#[derive(Debug)]
pub(crate) struct Uploaded {
    /// The manifest written (the newest epoch uploaded).
    pub epoch: u64,
    /// Epochs merged into it.
    pub epochs: usize,
    /// Bytes of its object.
    pub bytes: u64,
    /// The manifest stored, when an earlier attempt's was found after an ambiguous put.
    pub stored: Option<Manifest>,
}

/// Epoch objects up to this size ride inline in the manifest.
pub(crate) const INLINE_MAX: usize = 64 << 10;

/// Uploads the log's epochs after `previous` (the newest manifest) up to `through` (the
/// newest the node released: a later one may still be abandoned by a rollback) as one merged
/// delta and its manifest, listing `full` too (a full snapshot waiting to be listed, whose label
/// is at most the newest epoch uploaded), then truncates the log behind it. `Ok(None)`: the log
/// holds nothing in that range.
pub(crate) async fn upload(
    cp: &CheckpointStore,
    log: &Arc<EpochLog>,
    previous: Option<u64>,
    through: u64,
    writer: &str,
    full: Option<ObjectRef>,
) -> Result<Option<Uploaded>, String> {
    let l = log.clone();
    let mut entries = tokio::task::spawn_blocking(move || l.after(previous))
        .await
        .map_err(|e| e.to_string())??;
    entries.retain(|(e, _)| *e <= through);
    if entries.is_empty() {
        return Ok(None);
    }
    let count = entries.len();
    let newest = entries.last().map(|(e, _)| *e);
    let mut epochs = Vec::with_capacity(count);
    for (e, bytes) in entries {
        let corrupt =
            |err| format!("epoch log: epoch {e} cannot be decoded ({err}); the log is corrupt");
        // Only the newest epoch's pending messages are uploaded: the others' are not read.
        epochs.push(if Some(e) == newest {
            NodeEpoch::decode(bytes.as_slice()).map_err(corrupt)?
        } else {
            NodeEpochChanges::decode(bytes.as_slice())
                .map_err(corrupt)?
                .into()
        });
    }
    let merged = merge(epochs).expect("not empty");
    let epoch = merged.epoch;
    let encoded = merged.encode_to_vec();
    let obj = if encoded.len() <= INLINE_MAX {
        cp.inline_node_epoch(&merged, &encoded)
    } else {
        cp.write_node_epoch(&merged)
            .await
            .map_err(|e| e.to_string())?
    };
    crate::failpoint::eval("checkpoint-upload")?;
    let bytes = obj.size;
    let mut objects = vec![obj];
    objects.extend(full);
    let m = Manifest {
        epoch,
        previous,
        created_ms: super::driver::now_ms(),
        objects,
        writer: Some(writer.to_string()),
    };
    let stored = cp.commit(&m).await.map_err(|e| match e {
        CheckpointError::AlreadyCommitted(_) => format!(
            "{e}: another node writes checkpoints to the same blob storage prefix; stop it or give this node its own prefix"
        ),
        e => e.to_string(),
    })?;
    // Uploaded; the log not yet truncated (a restart drops what blob storage has). From here
    // on the upload stands whatever the truncation does: reported as failed, the driver would
    // keep `previous` as the newest manifest and chain the next upload to it, past this one,
    // while the log no longer held this one's epochs (a truncation that wrote its compaction,
    // then failed to purge files, did that: the chain skipped them). A truncation that did not
    // happen is done by the next upload's, which drops everything up to its own manifest.
    let truncated = match crate::failpoint::eval("checkpoint-log-truncate") {
        Ok(()) => {
            let l = log.clone();
            tokio::task::spawn_blocking(move || l.truncate(epoch))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = truncated {
        tracing::warn!(
            epoch,
            error = %e,
            "uploaded, but the epoch log was not truncated behind the upload; the next upload truncates it"
        );
    }
    // (`return(<ms>)`: the driver learns of the upload that much later, the log already
    // empty; other actions do nothing: the upload stands.)
    let _ = crate::failpoint::eval_slow("checkpoint-log-truncated").await;
    Ok(Some(Uploaded {
        epoch,
        epochs: count,
        bytes,
        stored,
    }))
}

/// At start, before recovery: uploads what the log holds beyond blob storage's newest
/// manifest (the epochs this node acknowledged before it stopped), so that recovery reads one
/// history. Returns the epoch uploaded. A failure is tried again (5 attempts, 0.1 s to 1.6 s
/// apart: a blob store that blips does not fail the start); the last error is returned.
pub(crate) async fn upload_at_start(
    cp: &CheckpointStore,
    log: &Arc<EpochLog>,
    writer: &str,
) -> Result<Option<u64>, String> {
    retried_at_start("the epoch log", || upload_at_start_once(cp, log, writer)).await
}

/// At start, before recovery, for a member that starts alone: uploads what its cluster's
/// epoch log (`tail`, the control group's) holds beyond blob storage — a node alone leads no
/// cluster epochs, so nothing else would (it led its own epochs through that log once the
/// others had left, or they left just after it committed some). Tried again as
/// [`upload_at_start`]. Returns the epoch uploaded (`None`: nothing to upload).
pub(crate) async fn upload_cluster_tail_at_start(
    cp: &CheckpointStore,
    tail: Vec<(u64, EpochBytes)>,
    writer: &str,
) -> Result<Option<u64>, String> {
    if tail.is_empty() {
        return Ok(None);
    }
    retried_at_start("the cluster's epoch log", || async {
        upload_tail(cp, tail.clone(), writer).await.map(Some)
    })
    .await
}

/// Runs `step` up to 5 times, 0.1 s to 1.6 s apart (a blob store that blips does not fail the
/// start); the last error is returned.
async fn retried_at_start<T, F, Fut>(what: &str, mut step: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut delay = std::time::Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match step().await {
            Err(e) if attempt < 5 => {
                tracing::warn!(attempt, error = %e, "cannot upload {what} at start; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

async fn upload_at_start_once(
    cp: &CheckpointStore,
    log: &Arc<EpochLog>,
    writer: &str,
) -> Result<Option<u64>, String> {
    if log.last_epoch().is_none() {
        return Ok(None);
    }
    let latest = cp
        .latest()
        .await
        .map_err(|e| format!("cannot read the newest manifest: {e}"))?
        .map(|m| m.epoch);
    // Every epoch in the log committed (it was durable before anything of it was released).
    match upload(cp, log, latest, u64::MAX, writer, None).await? {
        Some(u) => {
            tracing::info!(
                epoch = u.epoch,
                epochs = u.epochs,
                bytes = u.bytes,
                "uploaded the epoch log's committed epochs to blob storage"
            );
            Ok(Some(u.epoch))
        }
        None => {
            // Everything logged is in blob storage already (a stop between an upload and the
            // truncation).
            if let Some(l) = latest {
                let log = log.clone();
                tokio::task::spawn_blocking(move || log.truncate(l))
                    .await
                    .map_err(|e| e.to_string())??;
            }
            Ok(None)
        }
    }
}

/// Uploads the cluster's epoch log tail (`statemesh_mesh::control::EpochTail`: epoch → its
/// manifest as the leader logged it, JSON), oldest first, and returns the newest epoch
/// uploaded. Consecutive manifests whose objects are all deltas (participants' parts, inline
/// or written to blob storage) are merged: each participant's parts as a node alone's epochs
/// are (see [`merge`]; a participant without a part in the run's newest epoch had nothing
/// pending then, so its merged part is relabelled with that epoch and carries no pending
/// messages), into one manifest labelled with the run's newest epoch whose previous is its
/// first's. A run ends before a manifest in which a key group's changes come from another
/// writer or ownership version than earlier in the run (it moved: two merged parts with the
/// same label must never both change it). A manifest listing a full snapshot (or a part with
/// key groups written in full) is written as logged, after the run before it. So a tail under
/// load costs one or two puts. A manifest another writer stored for the same epochs (a deposed
/// leader uploading the same log) counts as uploaded.
pub(crate) async fn upload_tail(
    cp: &CheckpointStore,
    tail: Vec<(u64, EpochBytes)>,
    writer: &str,
) -> Result<u64, String> {
    let mut manifests = Vec::with_capacity(tail.len());
    for (e, bytes) in tail {
        let m: Manifest = serde_json::from_slice(bytes.bytes())
            .map_err(|err| format!("the cluster's epoch log: epoch {e} does not decode ({err})"))?;
        if m.epoch != e {
            return Err(format!(
                "the cluster's epoch log: the entry of epoch {e} holds the manifest of epoch {}",
                m.epoch
            ));
        }
        manifests.push(m);
    }
    let Some(l) = manifests.last().map(|m| m.epoch) else {
        return Err("the cluster's epoch log is empty: nothing to upload".into());
    };
    crate::failpoint::eval("checkpoint-upload")?;
    let mut run: Vec<(Manifest, Vec<NodeEpoch>)> = Vec::new();
    // Per key group changed in the run: its writer and ownership version.
    let mut writers: HashMap<u32, (String, u64)> = HashMap::new();
    for m in manifests {
        if !m.objects.iter().all(|o| o.full_key_groups.is_empty()) {
            upload_run(cp, std::mem::take(&mut run), writer).await?;
            writers.clear();
            commit_logged(cp, &m).await?;
            continue;
        }
        let parts = read_parts(cp, &m).await?;
        let moved = parts.iter().any(|p| {
            p.key_groups.iter().any(|s| {
                s.version > 0
                    && writers
                        .get(&s.key_group)
                        .is_some_and(|w| w.0 != p.node || w.1 != s.version)
            })
        });
        if moved {
            upload_run(cp, std::mem::take(&mut run), writer).await?;
            writers.clear();
        }
        for p in &parts {
            for s in p.key_groups.iter().filter(|s| s.version > 0) {
                writers.insert(s.key_group, (p.node.clone(), s.version));
            }
        }
        run.push((m, parts));
    }
    upload_run(cp, run, writer).await?;
    Ok(l)
}

/// The parts a logged manifest lists, decoded (inline, or read from blob storage).
async fn read_parts(cp: &CheckpointStore, m: &Manifest) -> Result<Vec<NodeEpoch>, String> {
    use base64::Engine as _;
    let mut parts = Vec::with_capacity(m.objects.len());
    for o in &m.objects {
        let bytes: bytes::Bytes = match &o.inline {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|err| {
                    format!(
                        "the cluster's epoch log: a part of epoch {} is not base64 ({err})",
                        m.epoch
                    )
                })?
                .into(),
            None => cp
                .get(&o.path)
                .await
                .map_err(|e| format!("cannot read a part of epoch {}: {e}", m.epoch))?,
        };
        let mut part = NodeEpoch::decode(bytes).map_err(|err| {
            format!(
                "the cluster's epoch log: a part of epoch {} does not decode ({err})",
                m.epoch
            )
        })?;
        part.node = o.node.clone();
        parts.push(part);
    }
    Ok(parts)
}

/// Writes a logged manifest as it is.
async fn commit_logged(cp: &CheckpointStore, m: &Manifest) -> Result<(), String> {
    match cp.commit(m).await {
        Ok(_) | Err(CheckpointError::AlreadyCommitted(_)) => Ok(()),
        Err(e) => Err(format!("cannot upload epoch {}: {e}", m.epoch)),
    }
}

/// Uploads consecutive logged manifests of deltas as one (see [`upload_tail`]).
async fn upload_run(
    cp: &CheckpointStore,
    run: Vec<(Manifest, Vec<NodeEpoch>)>,
    writer: &str,
) -> Result<(), String> {
    match run.len() {
        0 => return Ok(()),
        1 => return commit_logged(cp, &run[0].0).await,
        _ => {}
    }
    let l = run.last().expect("not empty").0.epoch;
    let previous = run[0].0.previous;
    // Per node: its parts, and the paths of those that removed egress records.
    let mut by_node: BTreeMap<String, (Vec<NodeEpoch>, Vec<String>)> = BTreeMap::new();
    for (m, parts) in run {
        for (o, p) in m.objects.iter().zip(parts) {
            let n = by_node.entry(p.node.clone()).or_default();
            let read_egress = p
                .key_groups
                .iter()
                .any(|s| s.deletes.iter().any(|k| k.first() == Some(&b'e')));
            if read_egress {
                n.1.push(o.path.clone());
            }
            n.0.push(p);
        }
    }
    let mut objects = Vec::with_capacity(by_node.len());
    for (_, (parts, read_egress)) in by_node {
        let mut merged = merge(parts).expect("not empty");
        if merged.epoch != l {
            merged.epoch = l;
            for s in &mut merged.key_groups {
                s.pending.clear();
            }
        }
        let encoded = merged.encode_to_vec();
        let mut o = if encoded.len() <= INLINE_MAX {
            cp.inline_node_epoch(&merged, &encoded)
        } else {
            cp.write_node_epoch(&merged)
                .await
                .map_err(|e| format!("cannot upload epoch {l}: {e}"))?
        };
        o.merged = read_egress;
        objects.push(o);
    }
    crate::failpoint::eval("checkpoint-upload")?;
    let m = Manifest {
        epoch: l,
        previous,
        created_ms: super::driver::now_ms(),
        objects,
        writer: Some(writer.to_string()),
    };
    match cp.commit(&m).await {
        Ok(_) => Ok(()),
        Err(CheckpointError::AlreadyCommitted(_)) => {
            tracing::info!(
                epoch = l,
                "the epoch log's upload was stored by another writer (an earlier leader)"
            );
            Ok(())
        }
        Err(e) => Err(format!("cannot upload epoch {l}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::PendingMessage;
    use super::*;

    fn section(
        kg: u32,
        puts: &[(&str, &str)],
        deletes: &[&str],
        pending: &[&str],
    ) -> KeyGroupSection {
        KeyGroupSection {
            key_group: kg,
            puts: puts
                .iter()
                .map(|(k, v)| Entry {
                    key: k.as_bytes().to_vec(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
            deletes: deletes.iter().map(|k| k.as_bytes().to_vec()).collect(),
            pending: pending
                .iter()
                .map(|t| PendingMessage {
                    target: t.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn epoch(e: u64, sections: Vec<KeyGroupSection>) -> NodeEpoch {
        NodeEpoch {
            epoch: e,
            node: "n".into(),
            key_groups: sections,
        }
    }

    /// The tests calling `upload`, one at a time: one of them sets a (process-wide) fault point
    /// that `upload` evaluates.
    static UPLOADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// An upload reads the pending messages of its newest epoch only (the others' are
    /// skipped undecoded), and merges every epoch's changes.
    #[tokio::test]
    async fn an_upload_carries_every_change_and_the_newest_pending_messages() {
        let _serial = UPLOADS.lock().await;
        let cp = CheckpointStore::new(
            super::super::blob::open("memory://", &Default::default(), false).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EpochLog::open(dir.path()).unwrap());
        let logged = [
            epoch(1, vec![section(1, &[("a", "1")], &[], &["p1"])]),
            epoch(
                2,
                vec![
                    section(1, &[("b", "2")], &["a"], &["p2"]),
                    section(2, &[("c", "3")], &[], &["q2"]),
                ],
            ),
            epoch(3, vec![section(1, &[("a", "4")], &[], &["p3", "p3b"])]),
        ];
        for e in &logged {
            log.append(e.epoch, &e.encode_to_vec()).unwrap();
        }
        let up = upload(&cp, &log, None, 3, "w", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((up.epoch, up.epochs), (3, 3));
        let parts = read_parts(&cp, &cp.manifest(3).await.unwrap())
            .await
            .unwrap();
        let merged = merge(logged.to_vec()).unwrap();
        assert_eq!(parts, vec![merged.clone()]);
        let kg1 = &merged.key_groups[0];
        assert_eq!(kg1.pending, section(1, &[], &[], &["p3", "p3b"]).pending);
        assert!(
            merged.key_groups[1].pending.is_empty(),
            "key group 2 had none at epoch 3"
        );
        // The lighter decoding is the full one without pending messages.
        let light: NodeEpoch = NodeEpochChanges::decode(logged[1].encode_to_vec().as_slice())
            .unwrap()
            .into();
        let mut want = logged[1].clone();
        want.key_groups.iter_mut().for_each(|s| s.pending.clear());
        assert_eq!(light, want);
    }

    /// An upload whose manifest committed stands even when truncating the log behind it
    /// fails: reported as failed, the driver kept the manifest before it as the newest, and
    /// the next upload chained to that one, past this one (whose epochs a truncation that
    /// wrote its compaction and then failed to purge files had dropped from the log: a crash
    /// test lost an acknowledged message from blob storage this way). The next upload chains
    /// to it and truncates everything behind itself.
    #[tokio::test]
    async fn an_upload_whose_truncation_fails_stands_and_the_next_chains_to_it() {
        let _serial = UPLOADS.lock().await;
        let cp = CheckpointStore::new(
            super::super::blob::open("memory://", &Default::default(), false).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EpochLog::open(dir.path()).unwrap());
        let append = |e: u64, key: &str| {
            let ne = epoch(e, vec![section(1, &[(key, "v")], &[], &[])]);
            log.append(e, &ne.encode_to_vec()).unwrap();
        };
        append(1, "a");
        append(2, "b");
        crate::failpoint::configure("checkpoint-log-truncate=1*return(injected)").unwrap();
        let first = upload(&cp, &log, None, 2, "w", None).await;
        crate::failpoint::configure("checkpoint-log-truncate=off").unwrap();
        let first = first.expect("the upload stands").expect("epochs uploaded");
        assert_eq!((first.epoch, first.epochs), (2, 2));
        // Not truncated: the next upload skips what the manifest has.
        assert_eq!(log.first_epoch(), Some(1));
        append(3, "c");
        let next = upload(&cp, &log, Some(first.epoch), 3, "w", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((next.epoch, next.epochs), (3, 1));
        assert_eq!(cp.manifest(3).await.unwrap().previous, Some(2));
        assert_eq!(
            log.first_epoch(),
            None,
            "truncated behind the newest upload"
        );
    }

    #[test]
    fn a_merge_keeps_each_keys_last_change_and_the_newest_pending_messages() {
        let merged = merge(vec![
            epoch(
                3,
                vec![
                    section(1, &[("a", "1"), ("b", "1")], &[], &["x"]),
                    section(2, &[("c", "1")], &[], &["y"]),
                ],
            ),
            epoch(5, vec![section(1, &[("a", "2")], &["b"], &[])]),
            epoch(8, vec![section(1, &[("b", "3")], &["a"], &["z"])]),
        ])
        .unwrap();
        assert_eq!(merged.epoch, 8);
        let s1 = &merged.key_groups[0];
        assert_eq!(s1.key_group, 1);
        assert_eq!(s1.deletes, vec![b"a".to_vec()]);
        assert_eq!(s1.puts.len(), 1);
        assert_eq!(
            (s1.puts[0].key.as_slice(), s1.puts[0].value.as_slice()),
            (&b"b"[..], &b"3"[..])
        );
        assert_eq!(s1.pending.len(), 1);
        assert_eq!(s1.pending[0].target, "z");
        // Key group 2 changed in epoch 3 only; at 8 it had nothing pending.
        let s2 = &merged.key_groups[1];
        assert_eq!(s2.puts.len(), 1);
        assert!(s2.pending.is_empty());
        assert!(merge(Vec::new()).is_none());
    }

    #[test]
    fn a_merged_delta_over_a_state_inside_its_range_gives_the_newest_state() {
        // The state after epoch 5 (a full snapshot labelled 5, or sled applied to 5), then the
        // merge of 3..=8 on top: the same as applying 8 alone.
        let e3 = epoch(3, vec![section(1, &[("a", "1"), ("b", "1")], &[], &[])]);
        let e5 = epoch(5, vec![section(1, &[("a", "2")], &["b"], &[])]);
        let e8 = epoch(8, vec![section(1, &[("c", "3")], &[], &[])]);
        let mut at5: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for e in [&e3, &e5] {
            for s in &e.key_groups {
                for d in &s.deletes {
                    at5.remove(d);
                }
                for p in &s.puts {
                    at5.insert(p.key.clone(), p.value.clone());
                }
            }
        }
        let apply = |mut st: BTreeMap<Vec<u8>, Vec<u8>>, e: &NodeEpoch| {
            for s in &e.key_groups {
                for d in &s.deletes {
                    st.remove(d);
                }
                for p in &s.puts {
                    st.insert(p.key.clone(), p.value.clone());
                }
            }
            st
        };
        let want = apply(at5.clone(), &e8);
        let merged = merge(vec![e3, e5, e8.clone()]).unwrap();
        assert_eq!(apply(at5, &merged), want);
    }

    /// A tail of epochs 2..=6 over blob storage's manifest 1: the deltas of 2..=4 become
    /// one manifest 4 (a participant without a part in 4 carries no pending messages), 5
    /// lists a full snapshot and is written as logged, 6 alone too; recovery reads the same
    /// state as from the epochs one by one.
    #[tokio::test]
    async fn the_clusters_tail_uploads_merged_runs_and_full_snapshots_as_logged() {
        let cp = CheckpointStore::new(
            super::super::blob::open("memory://", &Default::default(), false).unwrap(),
        );
        let part = |e: u64, node: &str, sections: Vec<KeyGroupSection>| {
            let ne = NodeEpoch {
                epoch: e,
                node: node.into(),
                key_groups: sections,
            };
            let enc = ne.encode_to_vec();
            cp.inline_node_epoch(&ne, &enc)
        };
        let manifest = |e: u64, previous: u64, objects: Vec<ObjectRef>| Manifest {
            epoch: e,
            previous: Some(previous).filter(|p| *p > 0),
            created_ms: 0,
            objects,
            writer: Some("leader/1".into()),
        };
        cp.commit(&manifest(
            1,
            0,
            vec![part(1, "a", vec![section(1, &[("k", "1")], &[], &[])])],
        ))
        .await
        .unwrap();
        let full = cp
            .write_full_snapshot(&NodeEpoch {
                epoch: 4,
                node: "a".into(),
                key_groups: vec![KeyGroupSection {
                    full: true,
                    ..section(1, &[("k", "4")], &[], &[])
                }],
            })
            .await
            .unwrap();
        let tail = [
            manifest(
                2,
                1,
                vec![part(2, "a", vec![section(1, &[("k", "2")], &[], &[])])],
            ),
            manifest(
                3,
                2,
                vec![
                    part(3, "a", vec![section(1, &[("k", "3")], &[], &[])]),
                    part(3, "b", vec![section(2, &[("j", "1")], &[], &["stale"])]),
                ],
            ),
            manifest(
                4,
                3,
                vec![part(4, "a", vec![section(1, &[("k", "4")], &[], &["q"])])],
            ),
            manifest(
                5,
                4,
                vec![
                    full,
                    part(5, "b", vec![section(2, &[("j", "5")], &[], &[])]),
                ],
            ),
            manifest(
                6,
                5,
                vec![part(6, "a", vec![section(1, &[("k", "6")], &[], &["r"])])],
            ),
        ];
        let tail: Vec<(u64, EpochBytes)> = tail
            .iter()
            .map(|m| (m.epoch, EpochBytes::new(serde_json::to_vec(m).unwrap())))
            .collect();
        assert_eq!(upload_tail(&cp, tail.clone(), "leader/2").await.unwrap(), 6);
        assert_eq!(cp.committed_epochs().await.unwrap(), vec![1, 4, 5, 6]);
        let m4 = cp.manifest(4).await.unwrap();
        assert_eq!(m4.previous, Some(1));
        assert_eq!(m4.objects.len(), 2);
        let b = m4.objects.iter().find(|o| o.node == "b").unwrap();
        use base64::Engine as _;
        let b = NodeEpoch::decode(
            base64::engine::general_purpose::STANDARD
                .decode(b.inline.as_ref().unwrap())
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(b.epoch, 4);
        assert!(
            b.key_groups[0].pending.is_empty(),
            "b had nothing pending at 4"
        );
        assert_eq!(cp.manifest(5).await.unwrap().previous, Some(4));
        let (_, states) = cp.recover_at(6, &[1, 2], None).await.unwrap();
        assert_eq!(states[&1].state.get(&b"k"[..]), Some(&b"6".to_vec()));
        assert_eq!(states[&2].state.get(&b"j"[..]), Some(&b"5".to_vec()));
        let pending: Vec<&str> = states[&1]
            .pending
            .iter()
            .map(|p| p.target.as_str())
            .collect();
        assert_eq!(pending, vec!["r"]);
        // Uploading the same tail again (the record of the first upload was lost, or another
        // leader does it) changes nothing.
        assert_eq!(upload_tail(&cp, tail, "leader/3").await.unwrap(), 6);
        assert_eq!(cp.committed_epochs().await.unwrap(), vec![1, 4, 5, 6]);
    }

    /// A key group that moved inside the tail (written by node a at version 1, then by node b
    /// at version 2) ends the run: the two writers' changes are never merged under one label.
    #[tokio::test]
    async fn a_run_ends_where_a_key_group_changes_writer() {
        let cp = CheckpointStore::new(
            super::super::blob::open("memory://", &Default::default(), false).unwrap(),
        );
        let part = |e: u64, node: &str, version: u64, v: &str| {
            let ne = NodeEpoch {
                epoch: e,
                node: node.into(),
                key_groups: vec![KeyGroupSection {
                    version,
                    ..section(1, &[("k", v)], &[], &[])
                }],
            };
            let enc = ne.encode_to_vec();
            cp.inline_node_epoch(&ne, &enc)
        };
        let tail: Vec<(u64, EpochBytes)> = [
            (2, None, part(2, "a", 1, "2")),
            (3, Some(2), part(3, "a", 1, "3")),
            (4, Some(3), part(4, "b", 2, "4")),
            (5, Some(4), part(5, "b", 2, "5")),
        ]
        .into_iter()
        .map(|(e, previous, o)| {
            let m = Manifest {
                epoch: e,
                previous,
                created_ms: 0,
                objects: vec![o],
                writer: Some("leader/1".into()),
            };
            (e, EpochBytes::new(serde_json::to_vec(&m).unwrap()))
        })
        .collect();
        assert_eq!(upload_tail(&cp, tail, "leader/1").await.unwrap(), 5);
        assert_eq!(cp.committed_epochs().await.unwrap(), vec![3, 5]);
        assert_eq!(cp.manifest(5).await.unwrap().previous, Some(3));
        let (_, states) = cp.recover_at(5, &[1], None).await.unwrap();
        assert_eq!(states[&1].state.get(&b"k"[..]), Some(&b"5".to_vec()));
    }

    /// Participants that share a name (`[checkpoint] node_id` defaults to `node-0` on every
    /// node): their parts of the run's newest epoch all keep their pending messages (a chaos
    /// run lost two acknowledged messages when the last part overwrote the others'), and a
    /// merged part that removed egress records is still found by its path.
    #[tokio::test]
    async fn participants_sharing_a_name_keep_all_their_pending_messages() {
        let cp = CheckpointStore::new(
            super::super::blob::open("memory://", &Default::default(), false).unwrap(),
        );
        let part = |e: u64, sections: Vec<KeyGroupSection>| {
            let ne = NodeEpoch {
                epoch: e,
                node: "node-0".into(),
                key_groups: sections,
            };
            let enc = ne.encode_to_vec();
            cp.inline_node_epoch(&ne, &enc)
        };
        let read = part(2, vec![section(7, &[], &["e\0\u{7}r1"], &["p0"])]);
        let read_path = read.path.clone();
        let tail: Vec<(u64, EpochBytes)> = [
            (
                2,
                vec![read, part(2, vec![section(9, &[("s", "1")], &[], &[])])],
            ),
            (
                3,
                vec![
                    part(3, vec![section(7, &[], &[], &["p1"])]),
                    part(3, vec![section(7, &[], &[], &["p2", "p3"])]),
                    part(3, vec![section(9, &[("s", "3")], &[], &["p4"])]),
                ],
            ),
        ]
        .into_iter()
        .map(|(e, objects)| {
            let m = Manifest {
                epoch: e,
                previous: (e > 2).then_some(e - 1),
                created_ms: 0,
                objects,
                writer: Some("leader/1".into()),
            };
            (e, EpochBytes::new(serde_json::to_vec(&m).unwrap()))
        })
        .collect();
        assert_eq!(upload_tail(&cp, tail, "leader/1").await.unwrap(), 3);
        assert_eq!(cp.committed_epochs().await.unwrap(), vec![3]);
        let (_, states) = cp.recover_at(3, &[7, 9], None).await.unwrap();
        let targets = |kg: u32| -> Vec<String> {
            let mut t: Vec<String> = states[&kg]
                .pending
                .iter()
                .map(|p| p.target.clone())
                .collect();
            t.sort();
            t
        };
        assert_eq!(targets(7), vec!["p1", "p2", "p3"]);
        assert_eq!(targets(9), vec!["p4"]);
        assert_eq!(states[&9].state.get(&b"s"[..]), Some(&b"3".to_vec()));
        // Epoch 2 has no manifest of its own; its part that read egress records is found.
        let lists = super::super::driver::lists;
        assert!(lists(&cp, 2, &read_path, Some(3)).await.unwrap());
        assert!(!lists(&cp, 2, "epochs/2/other", Some(3)).await.unwrap());
        assert!(!lists(&cp, 4, &read_path, Some(3)).await.unwrap());
    }
}
