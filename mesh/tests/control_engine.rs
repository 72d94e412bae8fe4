//! The control group on its real durable log (raft-engine files in temporary directories):
//! members stop and restart from their directories, a stopped member catches up through a
//! snapshot after the leader compacted its log, and the whole group restarts from disk with
//! nothing lost.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use raft::Storage;
use statemesh_mesh::control::{ClusterState, Command, EpochBytes, RaftConf, Role};
use statemesh_mesh::group::{ControlNode, Timing};
use statemesh_mesh::placement::NodeId;
use statemesh_mesh::storage::{open_in, ControlLog, EngineStorage};

const K: u32 = 16;

struct Member {
    dir: PathBuf,
    node: Option<ControlNode<EngineStorage>>,
}

fn conf() -> RaftConf {
    RaftConf {
        voters: vec![1, 2, 3],
        ..Default::default()
    }
}

fn start(dir: &Path, id: NodeId) -> ControlNode<EngineStorage> {
    let storage = open_in(dir, &conf()).unwrap();
    let state = storage.load_state().unwrap().unwrap_or_else(|| {
        let mut s = ClusterState::new(K);
        s.conf = Some(conf());
        s
    });
    ControlNode::new(id, storage, state, Timing::default()).unwrap()
}

/// Members 1, 2 and 3 on directories `n1`, `n2`, `n3` under `root`.
fn three(root: &Path) -> Vec<Member> {
    (1..=3u64)
        .map(|id| {
            let d = root.join(format!("n{id}"));
            Member {
                node: Some(start(&d, id)),
                dir: d,
            }
        })
        .collect()
}

/// Runs the members for `steps` ticks, delivering every message in order.
fn run(members: &mut [Member], steps: usize) {
    let mut net: VecDeque<(usize, Vec<u8>)> = VecDeque::new();
    for _ in 0..steps {
        for m in members.iter_mut() {
            if let Some(n) = m.node.as_mut() {
                n.tick();
            }
        }
        for _ in 0..4 {
            for (i, m) in members.iter_mut().enumerate() {
                let Some(n) = m.node.as_mut() else { continue };
                let out = n.process().unwrap();
                if !out.applied.is_empty() {
                    n.storage().save_state(n.state()).unwrap();
                }
                for (to, b) in out.messages {
                    net.push_back(((to - 1) as usize, b));
                    let _ = i;
                }
            }
            while let Some((to, b)) = net.pop_front() {
                if let Some(n) = members[to].node.as_mut() {
                    let _ = n.step(&b);
                }
            }
        }
    }
}

fn leader(members: &mut [Member]) -> &mut ControlNode<EngineStorage> {
    members
        .iter_mut()
        .filter_map(|m| m.node.as_mut())
        .find(|n| n.is_leader())
        .expect("a leader")
}

fn propose_epochs(members: &mut [Member], from: u64, to: u64) {
    for e in from..=to {
        leader(members)
            .propose(&Command::CommitEpoch { epoch: e })
            .unwrap();
        run(members, 1);
    }
    run(members, 20);
}

#[test]
fn members_restart_from_disk_and_catch_up_through_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = three(dir.path());
    run(&mut members, 60);
    leader(&mut members)
        .propose(&Command::Join {
            id: 1,
            grpc_addr: "127.0.0.1:1".into(),
            http_addr: "127.0.0.1:2".into(),
            role: Role::Voter,
            incarnation: 7,
            fresh: false,
        })
        .unwrap();
    propose_epochs(&mut members, 1, 30);
    for m in &members {
        assert_eq!(m.node.as_ref().unwrap().state().committed_epoch, 30);
    }

    // Member 3 stops (its engine closes); the others go on and compact their logs.
    let stopped = members
        .iter()
        .position(|m| !m.node.as_ref().unwrap().is_leader())
        .unwrap();
    members[stopped].node = None;
    propose_epochs(&mut members, 31, 80);
    let mut compacted = 0;
    for m in members.iter_mut() {
        if let Some(n) = m.node.as_mut() {
            if n.compact(2).unwrap() {
                compacted += 1;
            }
            assert!(
                n.storage().first_index().unwrap() > 31,
                "the log was compacted"
            );
        }
    }
    assert_eq!(compacted, 2);
    propose_epochs(&mut members, 81, 85);

    // It restarts from its directory; the entries it lacks are gone: it gets a snapshot.
    members[stopped].node = Some(start(&members[stopped].dir.clone(), (stopped + 1) as u64));
    run(&mut members, 100);
    let want = members[(stopped + 1) % 3]
        .node
        .as_ref()
        .unwrap()
        .state()
        .clone();
    assert_eq!(want.committed_epoch, 85);
    assert_eq!(members[stopped].node.as_ref().unwrap().state(), &want);
    assert!(
        members[stopped]
            .node
            .as_ref()
            .unwrap()
            .storage()
            .first_index()
            .unwrap()
            > 31,
        "caught up from a snapshot, not from entries"
    );

    // A member whose saved state machine was lost (it is written without fsync) restarts
    // from the snapshot kept at compaction and replays the rest of its log.
    let other = (stopped + 1) % 3;
    members[other].node = None;
    {
        let storage = open_in(&members[other].dir, &conf()).unwrap();
        let mut old = ClusterState::new(K);
        old.conf = want.conf.clone();
        storage.save_state(&old).unwrap();
    }
    members[other].node = Some(start(&members[other].dir.clone(), (other + 1) as u64));
    assert!(
        members[other]
            .node
            .as_ref()
            .unwrap()
            .state()
            .committed_epoch
            >= 80
    );
    run(&mut members, 40);
    assert_eq!(
        members[other]
            .node
            .as_ref()
            .unwrap()
            .state()
            .committed_epoch,
        85
    );

    // The whole group stops and restarts from disk: nothing is lost, and it goes on.
    for m in members.iter_mut() {
        m.node = None;
    }
    for (i, m) in members.iter_mut().enumerate() {
        m.node = Some(start(&m.dir, (i + 1) as u64));
        let n = m.node.as_ref().unwrap();
        assert!(n.state().applied_index <= n.storage().hard_state().commit);
    }
    run(&mut members, 60);
    propose_epochs(&mut members, 86, 90);
    for m in &members {
        let s = m.node.as_ref().unwrap().state();
        assert_eq!(s.committed_epoch, 90);
        assert_eq!(s.members[&1].grpc_addr, "127.0.0.1:1");
    }

    // A state older than the (compacted) log's start cannot be replayed forward: refused.
    let i = members
        .iter()
        .position(|m| m.node.as_ref().unwrap().storage().first_index().unwrap() > 2)
        .expect("a compacted log");
    members[i].node = None;
    let storage = open_in(&members[i].dir, &conf()).unwrap();
    let mut old = ClusterState::new(K);
    old.conf = Some(conf());
    let e = ControlNode::new((i + 1) as u64, storage, old, Timing::default())
        .err()
        .expect("refused");
    assert!(e.contains("compacted"), "{e}");
}

#[test]
fn an_unreadable_log_directory_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("control"), b"not a directory").unwrap();
    let e = open_in(dir.path(), &conf()).err().expect("refused");
    assert!(e.contains("control"), "{e}");
}

/// A new cluster's first node bootstraps its log with a snapshot at index 1; a node that joins
/// later starts with an empty configuration and catches up from a snapshot made for it (the
/// bootstrap one does not list it), learning the cluster id and the first configuration,
/// which no entry carries; it is then promoted to voter by joint consensus.
#[test]
fn a_joining_node_starts_from_a_snapshot_that_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = dir.path().join("n1");
    let d2 = dir.path().join("n2");
    let s1 = open_in(&d1, &RaftConf::default()).unwrap();
    assert!(s1.is_new());
    let mut st = ClusterState::new(K);
    st.cluster_id = "c-1".into();
    st.conf = Some(RaftConf {
        voters: vec![1],
        ..Default::default()
    });
    s1.bootstrap(&st).unwrap();
    assert!(!s1.is_new());
    assert!(s1.bootstrap(&st).is_err(), "bootstrapped twice");
    assert_eq!(s1.first_index().unwrap(), 2);
    let mut st1 = s1.load_state().unwrap().unwrap();
    assert_eq!(st1.applied_index, 1);
    st1.conf = st.conf.clone();
    let n1 = ControlNode::new(1, s1, st1, Timing::default()).unwrap();
    // The joiner: an empty log and an empty configuration.
    let s2 = open_in(&d2, &RaftConf::default()).unwrap();
    let mut st2 = ClusterState::new(K);
    st2.conf = Some(RaftConf::default());
    let n2 = ControlNode::new(2, s2, st2, Timing::default()).unwrap();
    let mut members = vec![
        Member {
            dir: d1,
            node: Some(n1),
        },
        Member {
            dir: d2,
            node: Some(n2),
        },
    ];
    run(&mut members, 30);
    assert!(leader(&mut members).id() == 1);
    propose_epochs(&mut members, 1, 3);
    leader(&mut members)
        .propose_membership(&[(2, Some(Role::Learner))])
        .unwrap();
    run(&mut members, 30);
    // Every change enters a joint configuration, left explicitly.
    leader(&mut members).propose_leave_joint().unwrap();
    run(&mut members, 10);
    let n2 = members[1].node.as_ref().unwrap();
    assert_eq!(n2.state().cluster_id, "c-1");
    assert_eq!(n2.state().committed_epoch, 3);
    assert_eq!(n2.state().conf.as_ref().unwrap().learners, vec![2]);
    assert_eq!(n2.state(), members[0].node.as_ref().unwrap().state());
    // Promoted: joint configuration, then left explicitly.
    leader(&mut members)
        .propose_membership(&[(2, Some(Role::Voter))])
        .unwrap();
    run(&mut members, 10);
    assert!(leader(&mut members).in_joint());
    leader(&mut members).propose_leave_joint().unwrap();
    run(&mut members, 10);
    for m in &members {
        let n = m.node.as_ref().unwrap();
        assert_eq!(n.state().conf.as_ref().unwrap().voters, vec![1, 2]);
        assert!(!n.in_joint());
    }
    propose_epochs(&mut members, 4, 5);
    // The joiner restarts from its directory with everything.
    let d = members[1].dir.clone();
    members[1].node = None;
    let s = open_in(&d, &RaftConf::default()).unwrap();
    let st = s.load_state().unwrap().unwrap();
    members[1].node = Some(ControlNode::new(2, s, st, Timing::default()).unwrap());
    propose_epochs(&mut members, 6, 6);
    assert_eq!(members[1].node.as_ref().unwrap().state().committed_epoch, 6);
}

fn epoch_bytes(e: u64) -> Vec<u8> {
    (0..2048u64).map(|i| (e * 31 + i) as u8).collect()
}

fn log_epochs(members: &mut [Member], from: u64, to: u64) {
    for e in from..=to {
        leader(members)
            .propose(&Command::LogEpoch {
                epoch: e,
                gen: 1,
                bytes: EpochBytes::new(epoch_bytes(e)),
            })
            .unwrap();
        run(members, 1);
    }
    run(members, 20);
}

fn tail_of(n: &ControlNode<EngineStorage>) -> Vec<(u64, Vec<u8>)> {
    n.state()
        .log
        .epochs()
        .iter()
        .map(|(e, b)| (*e, b.bytes().to_vec()))
        .collect()
}

/// The epoch log's tail (committed epochs blob storage lacks) lives in the control group's
/// state: it survives the loss of the leader's whole disk, reaches a member restored from a
/// snapshot, is saved beside the state across restarts, and goes once an upload covers it.
#[test]
fn the_epoch_log_survives_the_loss_of_the_leaders_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = three(dir.path());
    run(&mut members, 60);
    leader(&mut members)
        .propose(&Command::Fence {
            gen: 1,
            handoff: None,
        })
        .unwrap();
    run(&mut members, 20);
    log_epochs(&mut members, 1, 40);
    leader(&mut members)
        .propose(&Command::Uploaded { through: 10 })
        .unwrap();
    run(&mut members, 20);
    let want: Vec<(u64, Vec<u8>)> = (11..=40).map(|e| (e, epoch_bytes(e))).collect();
    for m in &members {
        assert_eq!(tail_of(m.node.as_ref().unwrap()), want);
    }

    // The leader's disk is lost: the others elect a leader that has every logged epoch.
    let lost = members
        .iter()
        .position(|m| m.node.as_ref().unwrap().is_leader())
        .unwrap();
    members[lost].node = None;
    std::fs::remove_dir_all(&members[lost].dir).unwrap();
    run(&mut members, 80);
    let l = leader(&mut members);
    assert_eq!(tail_of(l), want);
    assert_eq!(l.state().log.uploaded, 10);

    // More epochs, and the survivors compact their logs past every logged epoch.
    log_epochs(&mut members, 41, 60);
    for m in members.iter_mut() {
        if let Some(n) = m.node.as_mut() {
            assert!(n.compact(2).unwrap());
            assert!(n.storage().first_index().unwrap() > 40);
        }
    }
    let want: Vec<(u64, Vec<u8>)> = (11..=60).map(|e| (e, epoch_bytes(e))).collect();

    // The lost member comes back empty: it gets the tail from a snapshot, not from entries.
    // (In a node it joins as a new member; here its id comes back, which raft allows while
    // no election runs.)
    members[lost].node = Some(start(&members[lost].dir.clone(), (lost + 1) as u64));
    run(&mut members, 100);
    assert_eq!(tail_of(members[lost].node.as_ref().unwrap()), want);

    // Every member restarts from its directory with the tail it saved.
    for m in members.iter_mut() {
        m.node = None;
    }
    for (i, m) in members.iter_mut().enumerate() {
        m.node = Some(start(&m.dir, (i + 1) as u64));
        let n = m.node.as_ref().unwrap();
        let s = n.storage().load_state().unwrap().unwrap();
        assert_eq!(
            s.log.epochs().keys().copied().collect::<Vec<_>>(),
            (11..=60).collect::<Vec<_>>()
        );
    }
    run(&mut members, 60);
    for m in &members {
        assert_eq!(tail_of(m.node.as_ref().unwrap()), want);
    }

    // An upload through 60 empties the tail, on disk too.
    leader(&mut members)
        .propose(&Command::Uploaded { through: 60 })
        .unwrap();
    run(&mut members, 20);
    for m in members.iter_mut() {
        let n = m.node.as_ref().unwrap();
        assert!(n.state().log.epochs().is_empty());
        assert_eq!(n.state().log.uploaded, 60);
        m.node = None;
        let storage = open_in(&m.dir, &conf()).unwrap();
        let s = storage.load_state().unwrap().unwrap();
        assert!(
            s.log.epochs().is_empty() && s.log.uploaded == 60,
            "{:?}",
            s.log
        );
    }
}

/// A member far behind gets the entries it lacks in batches: the leader reads each entry about
/// once, not once per message. (With one entry per message and 256 messages in flight, every
/// message read everything from the member's next index on: a leader's step took seconds
/// for a member 650 entries behind, its leadership lapsed meanwhile, and the next leader did
/// the same; a five-node chaos run never settled.)
#[test]
fn a_member_far_behind_catches_up_in_batches_and_the_leader_reads_each_entry_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = three(dir.path());
    run(&mut members, 60);
    let stopped = members
        .iter()
        .position(|m| !m.node.as_ref().unwrap().is_leader())
        .unwrap();
    members[stopped].node = None;
    const BEHIND: u64 = 600;
    propose_epochs(&mut members, 1, BEHIND);
    let l = members
        .iter()
        .position(|m| m.node.as_ref().is_some_and(|n| n.is_leader()))
        .unwrap();
    let before = members[l].node.as_ref().unwrap().storage().entries_read();

    members[stopped].node = Some(start(&members[stopped].dir.clone(), (stopped + 1) as u64));
    run(&mut members, 60);
    let caught_up = members[stopped]
        .node
        .as_ref()
        .unwrap()
        .state()
        .committed_epoch;
    assert_eq!(caught_up, BEHIND);
    let n = members[l].node.as_ref().unwrap();
    assert!(n.is_leader(), "the leader kept its leadership");
    let read = n.storage().entries_read() - before;
    assert!(
        read <= 3 * BEHIND,
        "the leader read {read} entries to send {BEHIND} to a member behind"
    );
}
