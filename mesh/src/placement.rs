//! Placement of key groups on members: rendezvous (highest-random-weight) hashing, and the
//! rate-limited plan of moves from the table in force to the placement wanted (pure).
//!
//! Each key group goes to the member with the highest `score(kg, member)`. When a member
//! joins, only the key groups it now wins move (to it); when one leaves, only its key groups
//! move (each to its runner-up). No ring, no tokens to tune (MESH.md, lesson 5). The score is
//! part of the cluster's behaviour, not of a stored format: changing it moves key groups.

use std::collections::BTreeMap;

use crate::keygroup::fmix64;

/// A member's id in the cluster (also its Raft id; never 0).
pub type NodeId = u64;

/// The rendezvous score of a key group on a member.
pub fn score(kg: u32, node: NodeId) -> u64 {
    fmix64(fmix64(node ^ 0x9E37_79B9_7F4A_7C15) ^ u64::from(kg).wrapping_mul(0xA24B_AED4_963E_E407))
}

/// The member a key group belongs on among `members` (`None` if there are none). Ties (of
/// 64-bit scores) go to the lower id.
pub fn owner_of(kg: u32, members: &[NodeId]) -> Option<NodeId> {
    members
        .iter()
        .copied()
        .max_by_key(|&m| (score(kg, m), std::cmp::Reverse(m)))
}

/// The wanted owner of every key group `0..key_groups`.
pub fn desired(key_groups: u32, members: &[NodeId]) -> Vec<Option<NodeId>> {
    (0..key_groups).map(|kg| owner_of(kg, members)).collect()
}

/// A key group changing owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The key group.
    pub kg: u32,
    /// Its owner now (`None`: unassigned, or owned by a member that is gone).
    pub from: Option<NodeId>,
    /// Its owner to be.
    pub to: NodeId,
}

/// The moves that bring `current` (owner per key group) to the placement wanted over
/// `members`, at most `limit` of them: key groups without a live owner first (nobody serves
/// them), then the others in key-group order, spread so that no member receives more than
/// its share of the limit while others wait (a join does not stall the cluster).
pub fn plan(current: &[Option<NodeId>], members: &[NodeId], limit: usize) -> Vec<Move> {
    let live = |n: &Option<NodeId>| n.is_some_and(|n| members.contains(&n));
    let mut orphans = Vec::new();
    let mut rebalance: BTreeMap<NodeId, Vec<Move>> = BTreeMap::new();
    for (kg, cur) in current.iter().enumerate() {
        let kg = kg as u32;
        let Some(to) = owner_of(kg, members) else {
            return Vec::new();
        };
        if *cur == Some(to) {
            continue;
        }
        let m = Move {
            kg,
            from: cur.filter(|_| live(cur)),
            to,
        };
        if live(cur) {
            rebalance.entry(to).or_default().push(m);
        } else {
            orphans.push(m);
        }
    }
    let mut out: Vec<Move> = orphans.into_iter().take(limit).collect();
    // Round-robin over the receiving members.
    let mut queues: Vec<std::vec::IntoIter<Move>> =
        rebalance.into_values().map(Vec::into_iter).collect();
    while out.len() < limit {
        let before = out.len();
        for q in &mut queues {
            if out.len() == limit {
                break;
            }
            if let Some(m) = q.next() {
                out.push(m);
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u32 = 1024;

    fn counts(t: &[Option<NodeId>]) -> BTreeMap<NodeId, usize> {
        let mut c = BTreeMap::new();
        for o in t.iter().flatten() {
            *c.entry(*o).or_default() += 1;
        }
        c
    }

    #[test]
    fn balanced_enough() {
        for members in [
            vec![1, 2, 3],
            vec![1, 2, 3, 4, 5],
            vec![7, 19, 23, 42, 99, 1000, 3],
        ] {
            let c = counts(&desired(K, &members));
            let fair = K as f64 / members.len() as f64;
            for (m, n) in &c {
                let dev = (*n as f64 - fair).abs() / fair;
                assert!(dev < 0.2, "member {m} owns {n} of {K} ({members:?}: {c:?})");
            }
            assert_eq!(c.values().sum::<usize>(), K as usize);
        }
    }

    #[test]
    fn a_join_moves_only_what_the_new_member_wins() {
        let before = desired(K, &[1, 2, 3]);
        let after = desired(K, &[1, 2, 3, 4]);
        let moved: Vec<usize> = (0..K as usize).filter(|&k| before[k] != after[k]).collect();
        assert!(
            moved.iter().all(|&k| after[k] == Some(4)),
            "moves go to the new member only"
        );
        let share = moved.len() as f64 / K as f64;
        assert!(
            (0.18..0.32).contains(&share),
            "about a quarter moves: {share}"
        );
    }

    #[test]
    fn a_leave_moves_only_the_leavers_key_groups() {
        let before = desired(K, &[1, 2, 3, 4, 5]);
        let after = desired(K, &[1, 2, 4, 5]);
        for k in 0..K as usize {
            if before[k] != Some(3) {
                assert_eq!(before[k], after[k], "key group {k} moved without need");
            } else {
                assert_ne!(after[k], Some(3));
            }
        }
    }

    #[test]
    fn plans_are_rate_limited_orphans_first_and_converge() {
        let mut table = desired(K, &[1, 2]);
        // Member 2 is gone and 3, 4 joined.
        let members = [1, 3, 4];
        let orphaned = table.iter().filter(|o| **o == Some(2)).count();
        let mut rounds = 0;
        let mut first = true;
        loop {
            let p = plan(&table, &members, 64);
            if p.is_empty() {
                break;
            }
            assert!(p.len() <= 64);
            if first {
                assert!(p.iter().all(|m| m.from.is_none()), "orphans first: {p:?}");
                first = false;
            }
            for m in p {
                assert_eq!(table[m.kg as usize].filter(|o| members.contains(o)), m.from);
                table[m.kg as usize] = Some(m.to);
            }
            rounds += 1;
            assert!(rounds < 100);
        }
        assert_eq!(table, desired(K, &members));
        assert!(rounds >= orphaned.div_ceil(64), "{rounds} rounds");
        // A round of rebalancing spreads over the receivers.
        let table = desired(K, &[1, 2]);
        let p = plan(&table, &[1, 2, 3, 4], 10);
        let to3 = p.iter().filter(|m| m.to == 3).count();
        assert!((4..=6).contains(&to3), "{p:?}");
        assert!(plan(&table, &[], 10).is_empty());
    }

    #[test]
    fn deterministic() {
        assert_eq!(desired(K, &[5, 6, 7]), desired(K, &[7, 6, 5]));
        assert_eq!(score(1, 2), score(1, 2));
        assert_ne!(score(1, 2), score(2, 1));
    }
}
