//! The checkpoint store against real blob backends: local files, memory, and an
//! S3-compatible server (moto's, from PyPI, started on a loopback port by the harness).
//!
//! Garbage collection is checked by the exact paths it leaves, the manifest race by the
//! stored winner, recovery by the state it rebuilds — and by the errors it gives instead of
//! rebuilding from a history with a gap, a missing or a corrupt object. Ambiguous puts (stored,
//! then an error) are injected with the store's fault points.

mod common;

use std::collections::BTreeSet;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use statemesh_node::checkpoint::blob::{self, Blob, S3Options};
use statemesh_node::checkpoint::format::{
    manifest_path, Entry, KeyGroupSection, Manifest, NodeEpoch, ObjectRef, PendingMessage,
};
use statemesh_node::checkpoint::store::{CheckpointError, CheckpointStore};

/// Fault points are process-wide: the tests of this binary take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KGS: &[u32] = &[0, 1];

fn section(kg: u32, full: bool, puts: &[(&str, &str)], deletes: &[&str]) -> KeyGroupSection {
    KeyGroupSection {
        key_group: kg,
        full,
        puts: puts
            .iter()
            .map(|(k, v)| Entry {
                key: k.as_bytes().to_vec(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
        deletes: deletes.iter().map(|k| k.as_bytes().to_vec()).collect(),
        pending: if full {
            vec![]
        } else {
            vec![PendingMessage {
                target: "a/b/c".into(),
                caller: String::new(),
                typename: "x/y".into(),
                value: vec![kg as u8],
                has_value: true,
                idempotency_key: String::new(),
            }]
        },
        timers: vec![],
        idempotency: vec![Entry {
            key: format!("key-{kg}").into_bytes(),
            value: vec![0; 9],
        }],
        version: 0,
    }
}

fn node(n: &str, epoch: u64, sections: Vec<KeyGroupSection>) -> NodeEpoch {
    NodeEpoch {
        epoch,
        node: n.into(),
        key_groups: sections,
    }
}

fn manifest(epoch: u64, previous: Option<u64>, objects: Vec<ObjectRef>) -> Manifest {
    Manifest {
        epoch,
        previous,
        created_ms: 0,
        objects,
        writer: Some("test/1".into()),
    }
}

/// Writes the nodes' objects and commits the epoch; returns the objects' paths.
async fn commit_epoch(
    store: &CheckpointStore,
    epoch: u64,
    previous: Option<u64>,
    nodes: Vec<NodeEpoch>,
) -> Vec<String> {
    let mut objects = Vec::new();
    for n in nodes {
        objects.push(store.write_node_epoch(&n).await.unwrap());
    }
    let paths = objects.iter().map(|o| o.path.clone()).collect();
    store
        .commit(&manifest(epoch, previous, objects))
        .await
        .unwrap();
    paths
}

/// Puts an unreadable manifest of `epoch` (or removes it again).
async fn corrupt_manifest(blob: &Blob, epoch: u64, corrupt: bool) {
    let path = full_path(blob, &manifest_path(epoch));
    if corrupt {
        let garbage = bytes::Bytes::from_static(b"not json");
        blob.store.put(&path, garbage.into()).await.unwrap();
    } else {
        blob.store.delete(&path).await.unwrap();
    }
}

/// Every path below the blob's prefix.
async fn paths(blob: &Blob) -> BTreeSet<String> {
    let prefix = blob.prefix.as_ref().to_string();
    let metas: Vec<_> = blob
        .store
        .list(Some(&blob.prefix))
        .try_collect()
        .await
        .unwrap();
    metas
        .iter()
        .map(|m| {
            let p = m.location.as_ref();
            p.strip_prefix(&prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(p)
                .to_string()
        })
        .collect()
}

fn full_path(blob: &Blob, rel: &str) -> ObjectPath {
    if blob.prefix.as_ref().is_empty() {
        ObjectPath::from(rel)
    } else {
        ObjectPath::from(format!("{}/{rel}", blob.prefix))
    }
}

fn set(items: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    items.into_iter().collect()
}

fn kv(state: &statemesh_node::checkpoint::format::KeyGroupState) -> Vec<(String, String)> {
    state
        .state
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).to_string(),
                String::from_utf8_lossy(v).to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The whole life of a few epochs: two nodes, full snapshots and deltas, racing writers of a
/// manifest, recovery, an orphan, retention checked path by path, a full snapshot listed
/// later than its label, inline epochs, and a local store too old for the history.
async fn scenario(blob: Blob) {
    let store = CheckpointStore::new(blob.clone());
    assert_eq!(store.latest().await.unwrap(), None);
    let e1 = commit_epoch(
        &store,
        1,
        None,
        vec![
            node(
                "n1",
                1,
                vec![section(0, true, &[("a", "1"), ("b", "1")], &[])],
            ),
            node("n2", 1, vec![section(1, true, &[("z", "1")], &[])]),
        ],
    )
    .await;
    let e2 = commit_epoch(
        &store,
        2,
        Some(1),
        vec![node(
            "n1",
            2,
            vec![section(0, false, &[("a", "2")], &["b"])],
        )],
    )
    .await;
    let e3 = commit_epoch(
        &store,
        3,
        Some(2),
        vec![node("n2", 3, vec![section(1, false, &[("y", "3")], &[])])],
    )
    .await;

    // Four racing writers of epoch 4, each with its own contents: exactly one commits, every
    // other one is told `AlreadyCommitted`, and the stored manifest is the winner's.
    let racers = futures::future::join_all((0..4).map(|i| {
        let s = store.clone();
        let m = Manifest {
            epoch: 4,
            previous: Some(3),
            created_ms: i,
            objects: vec![],
            writer: Some(format!("racer-{i}/0")),
        };
        async move { (m.clone(), s.commit(&m).await) }
    }))
    .await;
    let winners: Vec<&Manifest> = racers
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(m, _)| m)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one writer commits: {racers:?}");
    for (m, r) in &racers {
        if m != winners[0] {
            assert!(
                matches!(r, Err(CheckpointError::AlreadyCommitted(4))),
                "loser {:?} got {r:?}",
                m.writer
            );
        }
    }
    assert_eq!(&store.manifest(4).await.unwrap(), winners[0]);
    // Epoch 3 again: another writer is fenced; the same writer (a retry) is told it committed.
    let m3 = store.manifest(3).await.unwrap();
    let other = Manifest {
        writer: Some("other/2".into()),
        ..m3.clone()
    };
    assert!(matches!(
        store.commit(&other).await,
        Err(CheckpointError::AlreadyCommitted(3))
    ));
    assert_eq!(store.commit(&m3).await.unwrap(), Some(m3.clone()));

    let (epoch, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(epoch, Some(4));
    assert_eq!(kv(&kgs[&0]), pairs(&[("a", "2")]));
    assert_eq!(kv(&kgs[&1]), pairs(&[("y", "3"), ("z", "1")]));
    assert!(
        kgs[&1].pending.is_empty(),
        "epoch 4 has no section of key group 1: nothing was pending at its cut"
    );
    assert_eq!(kgs[&1].idempotency[0].key, b"key-1");
    let (_, only0) = store.recover(&[0]).await.unwrap();
    assert_eq!(only0.keys().copied().collect::<Vec<_>>(), vec![0]);

    // Epoch 5 writes an object but never commits (a crash): an orphan once epoch 6 commits.
    let orphan = store
        .write_node_epoch(&node(
            "n1",
            5,
            vec![section(0, false, &[("a", "orphan")], &[])],
        ))
        .await
        .unwrap()
        .path;
    let e6 = commit_epoch(
        &store,
        6,
        Some(4),
        vec![
            node("n1", 6, vec![section(0, true, &[("a", "6")], &[])]),
            node("n2", 6, vec![section(1, true, &[("y", "6")], &[])]),
        ],
    )
    .await;
    // Epoch 7 is being written (newer than the latest commit): GC must leave it alone.
    let e7 = store
        .write_node_epoch(&node("n1", 7, vec![section(0, false, &[("a", "7")], &[])]))
        .await
        .unwrap()
        .path;
    let before = paths(&blob).await;
    let mut all = set(e1.iter().chain(&e2).chain(&e3).chain(&e6).cloned());
    all.extend([orphan.clone(), e7.clone()]);
    all.extend([1, 2, 3, 4, 6].map(manifest_path));
    assert_eq!(before, all);

    let report = store.gc(1, KGS).await.unwrap();
    assert_eq!(
        report.oldest_needed,
        Some(6),
        "both key groups have a full snapshot at 6"
    );
    let mut left = set(e6.iter().cloned());
    left.extend([e7.clone(), manifest_path(6)]);
    assert_eq!(
        paths(&blob).await,
        left,
        "GC keeps exactly epoch 6 and epoch 7's object"
    );
    let (epoch, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(epoch, Some(6));
    assert_eq!(kv(&kgs[&0]), pairs(&[("a", "6")]));

    // A delta chain keeps its base alive; epoch 7's object is now an orphan.
    let e8 = commit_epoch(
        &store,
        8,
        Some(6),
        vec![node("n1", 8, vec![section(0, false, &[("b", "8")], &[])])],
    )
    .await;
    let report = store.gc(1, KGS).await.unwrap();
    assert_eq!(report.oldest_needed, Some(6));
    let mut left = set(e6.iter().chain(&e8).cloned());
    left.extend([manifest_path(6), manifest_path(8)]);
    assert_eq!(paths(&blob).await, left);
    let (_, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(kv(&kgs[&0]), pairs(&[("a", "6"), ("b", "8")]));

    // A full snapshot labelled 9 but listed only by manifest 11 (as the driver does: the
    // snapshot is written while later epochs commit). Epoch 10's delta lies between its
    // label and its listing: GC must keep it, and recovery must apply it.
    let e9 = commit_epoch(
        &store,
        9,
        Some(8),
        vec![node("n1", 9, vec![section(0, false, &[("a", "9")], &[])])],
    )
    .await;
    let e10 = commit_epoch(
        &store,
        10,
        Some(9),
        vec![node("n2", 10, vec![section(1, false, &[("y", "10")], &[])])],
    )
    .await;
    let snapshot = store
        .write_full_snapshot(&node(
            "n1",
            9,
            vec![
                section(0, true, &[("a", "9"), ("b", "8")], &[]),
                section(1, true, &[("y", "6")], &[]),
            ],
        ))
        .await
        .unwrap();
    let delta11 = store
        .write_node_epoch(&node(
            "n1",
            11,
            vec![section(0, false, &[("c", "11")], &[])],
        ))
        .await
        .unwrap();
    let e11 = vec![delta11.path.clone(), snapshot.path.clone()];
    store
        .commit(&manifest(11, Some(10), vec![delta11, snapshot]))
        .await
        .unwrap();
    let report = store.gc(1, KGS).await.unwrap();
    assert_eq!(
        report.oldest_needed,
        Some(10),
        "the snapshot's label + 1: epoch 10's delta is needed"
    );
    let mut left = set(e10.iter().chain(&e11).cloned());
    left.extend([manifest_path(10), manifest_path(11)]);
    assert_eq!(paths(&blob).await, left);
    assert!(!paths(&blob).await.contains(&e9[0]));
    let (epoch, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(epoch, Some(11));
    assert_eq!(kv(&kgs[&0]), pairs(&[("a", "9"), ("b", "8"), ("c", "11")]));
    assert_eq!(
        kv(&kgs[&1]),
        pairs(&[("y", "10")]),
        "epoch 10's delta applied"
    );

    // Epochs kept inline in their manifest (what the driver writes for small epochs): no
    // object is stored, recovery reads them from the manifest, GC leaves the rest alone.
    let e12 = node("n2", 12, vec![section(1, false, &[("x", "12")], &[])]);
    let encoded = prost::Message::encode_to_vec(&e12);
    let inline = store.inline_node_epoch(&e12, &encoded);
    assert!(inline.inline.is_some());
    store
        .commit(&manifest(12, Some(11), vec![inline.clone()]))
        .await
        .unwrap();
    assert!(
        !paths(&blob).await.contains(&inline.path),
        "nothing stored apart"
    );
    let (epoch, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(epoch, Some(12));
    assert_eq!(kv(&kgs[&1]), pairs(&[("x", "12"), ("y", "10")]));
    assert_eq!(
        kgs[&1].pending.len(),
        1,
        "pending messages of the inline epoch"
    );
    store.gc(1, KGS).await.unwrap();
    left.insert(manifest_path(12));
    assert_eq!(paths(&blob).await, left);

    // A local store at epoch 5 is older than the history (manifest 8, before 10, is gone):
    // too short, and recovery says so instead of applying part of it; a full rebuild works.
    // A local store at 9 only needs the deltas after it.
    assert!(matches!(
        store.recover_after(KGS, Some(5)).await,
        Err(CheckpointError::HistoryTooShort { applied: 5, .. })
    ));
    let (_, since9) = store.recover_after(KGS, Some(9)).await.unwrap();
    assert_eq!(kv(&since9[&0]), pairs(&[("c", "11")]));
    assert_eq!(kv(&since9[&1]), pairs(&[("x", "12"), ("y", "10")]));
    let (_, full) = store.recover(KGS).await.unwrap();
    assert_eq!(kv(&full[&0]), pairs(&[("a", "9"), ("b", "8"), ("c", "11")]));

    // A full snapshot labelled 12 that no manifest lists yet (its writer lists it in a later
    // part; in a cluster another member collects meanwhile): within the grace GC keeps it,
    // after it (here: none) it is an orphan.
    let unlisted = store
        .write_full_snapshot(&node(
            "n2",
            12,
            vec![section(1, true, &[("x", "12"), ("y", "10")], &[])],
        ))
        .await
        .unwrap()
        .path;
    store
        .gc_after(1, KGS, std::time::Duration::from_secs(300))
        .await
        .unwrap();
    assert!(
        paths(&blob).await.contains(&unlisted),
        "GC deleted a snapshot not listed yet"
    );
    store.gc(1, KGS).await.unwrap();
    assert!(!paths(&blob).await.contains(&unlisted));
}

async fn memory() -> Blob {
    blob::open("memory://", &S3Options::default(), false).unwrap()
}

#[tokio::test]
async fn memory_backend() {
    let _g = SERIAL.lock().await;
    scenario(memory().await).await;
}

#[tokio::test]
async fn file_backend() {
    let _g = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/checkpoints", dir.path().display());
    scenario(blob::open(&url, &S3Options::default(), true).unwrap()).await;
}

#[tokio::test]
async fn s3_backend_on_moto() {
    let _g = SERIAL.lock().await;
    let m = common::python::moto();
    // moto accepts unsigned bucket creation.
    let (status, _, _) = common::http(
        &format!("{}/checkpoints", m.endpoint),
        "PUT",
        None,
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    let opts = S3Options {
        endpoint: Some(m.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
    };
    scenario(blob::open("s3://checkpoints/cluster-a", &opts, true).unwrap()).await;
}

/// A history of four epochs: full snapshots of both key groups at 1, then deltas.
async fn four_epochs(store: &CheckpointStore) -> Vec<Vec<String>> {
    vec![
        commit_epoch(
            store,
            1,
            None,
            vec![node(
                "n1",
                1,
                vec![
                    section(0, true, &[("a", "1")], &[]),
                    section(1, true, &[("z", "1")], &[]),
                ],
            )],
        )
        .await,
        commit_epoch(
            store,
            2,
            Some(1),
            vec![node("n1", 2, vec![section(0, false, &[("a", "2")], &[])])],
        )
        .await,
        commit_epoch(
            store,
            3,
            Some(2),
            vec![node("n1", 3, vec![section(1, false, &[("z", "3")], &[])])],
        )
        .await,
        commit_epoch(
            store,
            4,
            Some(3),
            vec![node("n1", 4, vec![section(0, false, &[("b", "4")], &[])])],
        )
        .await,
    ]
}

/// A lost manifest in the middle of the history is not "collected by GC": recovery names it
/// and stops, and GC refuses to delete anything.
#[tokio::test]
async fn a_gap_in_the_history_is_an_error_not_a_truncation() {
    let _g = SERIAL.lock().await;
    let blob = memory().await;
    let store = CheckpointStore::new(blob.clone());
    four_epochs(&store).await;
    blob.store
        .delete(&full_path(&blob, &manifest_path(2)))
        .await
        .unwrap();
    let before = paths(&blob).await;
    match store.recover(KGS).await {
        Err(e @ CheckpointError::Truncated { missing: 2, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("manifest 2 is missing"), "{msg}");
        }
        other => panic!("expected a truncation error, got {other:?}"),
    }
    assert!(matches!(
        store.gc(1, KGS).await,
        Err(CheckpointError::Truncated { missing: 2, .. })
    ));
    assert_eq!(paths(&blob).await, before, "GC deleted nothing");
    // A local store at epoch 2 or later needs nothing older: that still recovers.
    let (_, since2) = store.recover_after(KGS, Some(2)).await.unwrap();
    assert_eq!(kv(&since2[&1]), pairs(&[("z", "3")]));
    // ... and reads no manifest at or before its epoch (a corrupt one there is not seen).
    corrupt_manifest(&blob, 2, true).await;
    let (_, since3) = store.recover_after(KGS, Some(3)).await.unwrap();
    assert_eq!(kv(&since3[&0]), pairs(&[("b", "4")]));
    corrupt_manifest(&blob, 2, false).await;

    // A full snapshot of every key group at or after the gap makes skipping it safe.
    let snapshot = store
        .write_full_snapshot(&node(
            "n1",
            3,
            vec![
                section(0, true, &[("a", "2")], &[]),
                section(1, true, &[("z", "3")], &[]),
            ],
        ))
        .await
        .unwrap();
    store
        .commit(&manifest(5, Some(4), vec![snapshot]))
        .await
        .unwrap();
    let (_, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(kv(&kgs[&0]), pairs(&[("a", "2"), ("b", "4")]));
    // Rebuilding key groups whole reads no manifest at or before their full snapshots' labels
    // (a corrupt one there is not seen).
    corrupt_manifest(&blob, 2, true).await;
    let (_, kgs) = store.recover(KGS).await.unwrap();
    assert_eq!(kv(&kgs[&1]), pairs(&[("z", "3")]));
    corrupt_manifest(&blob, 2, false).await;
    // ... but only for the key groups it covers.
    assert!(matches!(
        store.recover(&[0, 1, 2]).await,
        Err(CheckpointError::Truncated { key_group: 2, .. })
    ));
}

/// A missing or corrupt object, or a corrupt manifest, is an error naming it.
/// A collection does not read back the manifests its own store committed since the last one
/// (they are in its cache; on S3 that was a GET per commit): those manifests are overwritten
/// with garbage behind the store's back, and its next collection still succeeds, while a store
/// without that cache names the first one it reads corrupt.
#[tokio::test]
async fn a_collection_does_not_read_back_the_manifests_its_store_committed() {
    let _g = SERIAL.lock().await;
    let blob = memory().await;
    let store = CheckpointStore::new(blob.clone());
    let first = four_epochs(&store).await;
    assert!(!first.is_empty());
    // The first collection reads what is there (the cache comes into use).
    store.gc(10, KGS).await.unwrap();
    for e in 5..=8 {
        commit_epoch(
            &store,
            e,
            Some(e - 1),
            vec![node(
                "n1",
                e,
                vec![section(0, false, &[("a", &e.to_string())], &[])],
            )],
        )
        .await;
    }
    for e in 5..=8 {
        blob.store
            .put(
                &full_path(&blob, &manifest_path(e)),
                PutPayload::from_static(b"\xff garbage"),
            )
            .await
            .unwrap();
    }
    let report = store.gc(10, KGS).await.unwrap();
    assert_eq!(report.oldest_needed, Some(1), "{report:?}");
    match CheckpointStore::new(blob.clone()).gc(10, KGS).await {
        Err(CheckpointError::Corrupt { path, .. }) => assert_eq!(path, manifest_path(8)),
        other => panic!("a store without the cache reads the manifests: {other:?}"),
    }
}

#[tokio::test]
async fn missing_and_corrupt_objects_are_named() {
    let _g = SERIAL.lock().await;
    let blob = memory().await;
    let store = CheckpointStore::new(blob.clone());
    let epochs = four_epochs(&store).await;
    let e3 = &epochs[2][0];

    blob.store
        .put(
            &full_path(&blob, e3),
            PutPayload::from_static(b"\xff\xff garbage"),
        )
        .await
        .unwrap();
    match store.recover(KGS).await {
        Err(CheckpointError::Corrupt { path, .. }) => assert_eq!(&path, e3),
        other => panic!("expected a corrupt object, got {other:?}"),
    }

    blob.store.delete(&full_path(&blob, e3)).await.unwrap();
    match store.recover(KGS).await {
        Err(e @ CheckpointError::Missing { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(e3.as_str()) && msg.contains("manifest 3"),
                "{msg}"
            );
        }
        other => panic!("expected a missing object, got {other:?}"),
    }

    blob.store
        .put(
            &full_path(&blob, &manifest_path(3)),
            PutPayload::from_static(b"{\"epoch\": 3, truncated"),
        )
        .await
        .unwrap();
    match store.recover(KGS).await {
        Err(CheckpointError::Corrupt { path, .. }) => assert_eq!(path, manifest_path(3)),
        other => panic!("expected a corrupt manifest, got {other:?}"),
    }
    assert!(
        store.gc(1, KGS).await.is_err(),
        "GC stops at a corrupt manifest"
    );
}

/// A put the server stored but the client saw fail (fault point `checkpoint-manifest-put`:
/// store, then return an error) is resolved by reading back: ours → committed; another
/// writer's → fenced. Likewise epoch objects. A put that really failed stays an error.
#[tokio::test]
async fn ambiguous_puts_are_resolved_by_reading_back() {
    let _g = SERIAL.lock().await;
    let blob = memory().await;
    let store = CheckpointStore::new(blob.clone());
    statemesh_node::failpoint::configure(
        "checkpoint-manifest-put=return(connection reset);checkpoint-object-put=return",
    )
    .unwrap();
    let obj = store
        .write_node_epoch(&node("n1", 1, vec![section(0, true, &[("a", "1")], &[])]))
        .await;
    let m1 = manifest(1, None, vec![obj.expect("the stored object is ours")]);
    let committed = store.commit(&m1).await;
    let other = store
        .commit(&Manifest {
            writer: Some("other/9".into()),
            ..m1.clone()
        })
        .await;
    let anonymous = store
        .commit(&Manifest {
            writer: None,
            ..m1.clone()
        })
        .await;
    // Without a writer, the same contents are ours and different ones are not.
    let m2 = Manifest {
        writer: None,
        ..manifest(2, Some(1), vec![])
    };
    let same = store.commit(&m2).await;
    let different = store
        .commit(&Manifest {
            created_ms: 1,
            ..m2.clone()
        })
        .await;
    fail::remove("checkpoint-manifest-put");
    fail::remove("checkpoint-object-put");
    assert_eq!(
        committed.unwrap(),
        Some(m1.clone()),
        "stored, then an error: committed (read back)"
    );
    assert!(matches!(other, Err(CheckpointError::AlreadyCommitted(1))));
    assert!(matches!(
        anonymous,
        Err(CheckpointError::AlreadyCommitted(1))
    ));
    assert_eq!(same.unwrap(), Some(m2.clone()));
    assert!(matches!(
        different,
        Err(CheckpointError::AlreadyCommitted(2))
    ));
    let (epoch, kgs) = store.recover(&[0]).await.unwrap();
    assert_eq!(epoch, Some(2));
    assert_eq!(kv(&kgs[&0]), pairs(&[("a", "1")]));

    // A put that fails without storing anything (the manifests "directory" is a file):
    // an error, not a commit and not a fence.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cp");
    let file = blob::open(root.to_str().unwrap(), &S3Options::default(), true).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("manifests"), b"not a directory").unwrap();
    let store = CheckpointStore::new(file);
    match store.commit(&manifest(1, None, vec![])).await {
        Err(CheckpointError::Blob { op: "put", .. }) => {}
        other => panic!("expected a failed put, got {other:?}"),
    }
    std::fs::remove_file(root.join("manifests")).unwrap();
    store.commit(&manifest(1, None, vec![])).await.unwrap();
}

/// A recovery from blob storage alone walks a long chain of manifests reading ahead
/// concurrently, not one GET after another: 200 epochs (a manifest and an object each) behind a
/// store that adds 20 ms to every GET are read in a fraction of the 8 s a sequential walk
/// takes, and the state is the same.
#[tokio::test]
async fn a_long_history_is_read_ahead_concurrently() {
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let throttled = Arc::new(ThrottledStore::new(
        object_store::memory::InMemory::new(),
        ThrottleConfig::default(),
    ));
    let store = CheckpointStore::new(Blob {
        store: throttled.clone(),
        prefix: ObjectPath::from("cp"),
        url: "memory://throttled".into(),
        durability: "none",
    });
    // A full snapshot of key group 0 at epoch 1, then a delta in each of 199 epochs.
    let mut previous = None;
    for e in 1..=200u64 {
        let v = e.to_string();
        let s = section(0, e == 1, &[(&format!("k{}", e % 7), &v)], &[]);
        commit_epoch(&store, e, previous, vec![node("n1", e, vec![s])]).await;
        previous = Some(e);
    }
    let (at, expected) = store.recover(&[0]).await.unwrap();
    assert_eq!(at, Some(200));
    throttled.config_mut(|c| c.wait_get_per_call = Duration::from_millis(20));
    let t = Instant::now();
    let (at, states) = store.recover(&[0]).await.unwrap();
    let took = t.elapsed();
    assert_eq!(at, Some(200));
    assert_eq!(states[&0].state, expected[&0].state);
    assert_eq!(states[&0].state.len(), 7);
    assert!(
        took < Duration::from_millis(2000),
        "200 epochs took {took:?} to read (one GET after another: at least 8 s)"
    );
}
