//! The checkpoint store against real blob backends: local files, memory, and an
//! S3-compatible server (moto's, from PyPI, started on a loopback port by the harness).

mod common;

use statemesh_node::checkpoint::blob::{self, S3Options};
use statemesh_node::checkpoint::format::{
    Entry, KeyGroupSection, Manifest, NodeEpoch, PendingMessage,
};
use statemesh_node::checkpoint::store::{CheckpointError, CheckpointStore};

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
        pending: vec![PendingMessage {
            target: "a/b/c".into(),
            caller: String::new(),
            typename: "x/y".into(),
            value: vec![kg as u8],
            has_value: true,
        }],
        timers: vec![],
        idempotency: vec![Entry {
            key: format!("key-{kg}").into_bytes(),
            value: vec![0; 9],
        }],
    }
}

async fn commit_epoch(
    store: &CheckpointStore,
    epoch: u64,
    previous: Option<u64>,
    nodes: Vec<NodeEpoch>,
) {
    let mut objects = Vec::new();
    for n in nodes {
        objects.push(store.write_node_epoch(&n).await.unwrap());
    }
    store
        .commit(&Manifest {
            epoch,
            previous,
            created_ms: 0,
            objects,
        })
        .await
        .unwrap();
}

/// The whole life of a few epochs: two nodes, full snapshots and deltas, a racing second
/// writer of a manifest, recovery, an orphan, and retention.
async fn scenario(store: CheckpointStore) {
    assert_eq!(store.latest().await.unwrap(), None);
    let node = |n: &str, epoch, sections| NodeEpoch {
        epoch,
        node: n.into(),
        key_groups: sections,
    };
    commit_epoch(
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
    commit_epoch(
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
    commit_epoch(
        &store,
        3,
        Some(2),
        vec![node("n2", 3, vec![section(1, false, &[("y", "3")], &[])])],
    )
    .await;

    // A racing second writer of epoch 3's manifest loses cleanly.
    let m3 = store.manifest(3).await.unwrap();
    let racers = futures::future::join_all((0..4).map(|_| {
        let s = store.clone();
        let m = Manifest {
            epoch: 4,
            previous: Some(3),
            created_ms: 0,
            objects: vec![],
        };
        async move { s.commit(&m).await }
    }))
    .await;
    assert_eq!(
        racers.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one writer commits: {racers:?}"
    );
    assert!(racers
        .iter()
        .any(|r| matches!(r, Err(CheckpointError::AlreadyCommitted(4)))));
    assert!(matches!(
        store.commit(&m3).await,
        Err(CheckpointError::AlreadyCommitted(3))
    ));

    let (epoch, kgs) = store.recover(&|_| true).await.unwrap();
    assert_eq!(epoch, Some(4));
    let kv = |kg: u32| {
        kgs[&kg]
            .state
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).to_string(),
                    String::from_utf8_lossy(v).to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(kv(0), vec![("a".into(), "2".into())]);
    assert_eq!(
        kv(1),
        vec![("y".into(), "3".into()), ("z".into(), "1".into())]
    );
    assert!(
        kgs[&1].pending.is_empty(),
        "epoch 4 has no section of key group 1: nothing was pending at its cut"
    );
    assert_eq!(kgs[&1].idempotency[0].key, b"key-1");
    let (_, only0) = store.recover(&|kg| kg == 0).await.unwrap();
    assert_eq!(only0.keys().copied().collect::<Vec<_>>(), vec![0]);

    // Epoch 5 writes objects but never commits (a crash): an orphan once epoch 6 commits.
    store
        .write_node_epoch(&node(
            "n1",
            5,
            vec![section(0, false, &[("a", "orphan")], &[])],
        ))
        .await
        .unwrap();
    commit_epoch(
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
    store
        .write_node_epoch(&node("n1", 7, vec![section(0, false, &[("a", "7")], &[])]))
        .await
        .unwrap();

    let report = store.gc(1).await.unwrap();
    assert_eq!(
        report.oldest_needed,
        Some(6),
        "both key groups have a full snapshot at 6"
    );
    assert_eq!(report.manifests_deleted, 4);
    assert_eq!(
        report.objects_deleted, 5,
        "epochs 1-3 (4 objects) and the orphan of 5"
    );
    assert_eq!(store.committed_epochs().await.unwrap(), vec![6]);
    let (epoch, kgs) = store.recover(&|_| true).await.unwrap();
    assert_eq!(epoch, Some(6));
    assert_eq!(kgs[&0].state[b"a".as_slice()], b"6");
    // A delta chain keeps its base alive.
    commit_epoch(
        &store,
        8,
        Some(6),
        vec![node("n1", 8, vec![section(0, false, &[("b", "8")], &[])])],
    )
    .await;
    let report = store.gc(1).await.unwrap();
    assert_eq!(report.oldest_needed, Some(6));
    assert_eq!(report.manifests_deleted, 0);
    let (_, kgs) = store.recover(&|_| true).await.unwrap();
    assert_eq!(
        kgs[&0].state.len(),
        2,
        "a from the full snapshot at 6, b from the delta at 8"
    );
}

#[tokio::test]
async fn memory_backend() {
    scenario(CheckpointStore::new(
        blob::open("memory://", &S3Options::default()).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/checkpoints", dir.path().display());
    scenario(CheckpointStore::new(
        blob::open(&url, &S3Options::default()).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn s3_backend_on_moto() {
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
    scenario(CheckpointStore::new(
        blob::open("s3://checkpoints/cluster-a", &opts).unwrap(),
    ))
    .await;
}
