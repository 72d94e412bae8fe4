//! Which cluster writes a blob location (issue 8, item 8): every cluster that checkpoints to a
//! location keeps a lease object there, `leases/<generation>-<cluster id>`, rewritten by each of
//! its nodes that writes checkpoints every [`RENEW`] while the node writes checkpoints, and every
//! `[checkpoint] lease_idle_renew_ms` (30 s; written in the lease) while it writes nothing, so an
//! idle node costs blob storage two requests (a put and a listing) per idle period, not one a
//! second. Liveness is read from the object's metadata (modification time, e-tag, size) changing
//! between two listings, never from comparing clocks.
//!
//! - **Start.** A node whose cluster has a lease there keeps its generation, unless a newer
//!   generation of another cluster is there: that cluster restored from the location after
//!   this one was lost (disaster recovery), and this one must not write there again (refused).
//!   A node whose cluster has no lease there yet (a new cluster) and finds other clusters'
//!   leases watches them for [`WATCH`], or longer when a lease says its cluster renews less
//!   often when idle ([`watch_for`]): one that changes belongs to a running cluster
//!   (refused: a second running cluster); otherwise the new cluster takes the location over with
//!   the next generation (disaster recovery of a lost cluster).
//! - **Running.** Each renewal also lists the leases: a lease of a newer generation (or of the
//!   same generation and a greater cluster id: two new clusters started at once) that changed
//!   since the previous listing belongs to a running cluster that took the location over, and
//!   this node stops at once (it has lost the location; nothing it has not committed is
//!   acknowledged, so stopping loses nothing).
//!
//! Leases are never deleted: a stopped cluster's lease records that the location was its, so
//! that it cannot restart on it once another cluster took it over. A stopped cluster's lease
//! costs a new cluster one [`WATCH`] at start.
//!
//! A cluster paused for longer than [`WATCH`] (SIGSTOP, a frozen VM) looks lost; if a new
//! cluster takes the location over meanwhile, the old one stops at its first renewal after it
//! resumes and may commit epochs until then (at most [`RENEW`] plus one listing). Those never
//! reach the new cluster: every generation numbers its epochs from its own floor
//! ([`Lease::epoch_floor`], kept across restarts since it follows from the lease), above any
//! number an older generation reaches, and manifests name their predecessors, so the old
//! cluster's late manifests are in nobody's chain.
//!
//! Two new clusters started at the same moment on one location: each looks again [`CONFIRM`]
//! after writing its first lease, and the one outranked (lower generation, or the same and a
//! smaller cluster id) removes its lease and does not start. (If one of them took longer than
//! [`CONFIRM`] between listing and writing, both start and the outranked one exits at its
//! first renewal.)

use std::time::Duration;

use super::store::{CheckpointError, CheckpointStore};

/// How often a node rewrites its cluster's lease.
pub const RENEW: Duration = Duration::from_secs(2);
/// How long a new cluster watches other clusters' leases before taking a location over (at
/// least; see [`watch_for`]).
pub const WATCH: Duration = Duration::from_millis(5_500);

/// How long to watch leases whose clusters renew at least every `idle_renew` (the longest of
/// the watched leases' `idle_renew_ms`): a renewal comes on the first [`RENEW`] tick within a
/// second of that, and a put and a listing take a moment.
pub fn watch_for(idle_renew: Duration) -> Duration {
    (idle_renew + Duration::from_millis(3_500)).max(WATCH)
}

/// The idle renewal period a lease body names (`idle_renew_ms`; [`RENEW`] when it names none:
/// written before leases said so, when every renewal came every [`RENEW`]).
pub fn idle_renew_of(body: &[u8]) -> Duration {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["idle_renew_ms"].as_u64())
        .map_or(RENEW, Duration::from_millis)
}

/// How long a cluster that wrote its first lease on a location waits before it looks again
/// for another cluster that started there at the same moment.
pub const CONFIRM: Duration = Duration::from_secs(1);

/// Epoch numbers of lease generation `g` start at `(g - 1) << EPOCH_BITS`: a cluster that only
/// looked lost and commits a few more epochs before it stops writes numbers below the cluster
/// that took over, which no manifest of that cluster names as its predecessor (2^44 epochs per
/// generation: 5,000 years at 100 a second).
pub const EPOCH_BITS: u32 = 44;

/// One lease object, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseObj {
    /// Its generation (the number of clusters that took the location over before, plus one).
    pub generation: u64,
    /// The cluster holding it.
    pub cluster: String,
    /// Its metadata (modification time, e-tag, size): changes on every renewal.
    pub tag: String,
}

/// The object's path below the location's prefix.
pub fn lease_path(generation: u64, cluster: &str) -> String {
    format!("leases/{generation:010}-{cluster}")
}

/// A lease from its path (`None`: not a lease).
pub fn parse_lease(path: &str, tag: String) -> Option<LeaseObj> {
    let name = path.strip_prefix("leases/")?;
    let (g, c) = name.split_once('-')?;
    Some(LeaseObj {
        generation: g.parse().ok()?,
        cluster: c.to_string(),
        tag,
    })
}

/// `a` outranks `b`: newer generation, or the same and a greater cluster id.
pub(crate) fn outranks(a: &LeaseObj, generation: u64, cluster: &str) -> bool {
    (a.generation, a.cluster.as_str()) > (generation, cluster)
}

/// The start decision from one listing: `Ok(Some(g))` — this cluster holds generation `g`;
/// `Ok(None)` — it holds none and other clusters' leases must be watched (or there are none:
/// see [`after_watch`]); `Err` — refused.
pub fn on_start(url: &str, ours: &str, leases: &[LeaseObj]) -> Result<Option<u64>, String> {
    let Some(own) = leases
        .iter()
        .filter(|l| l.cluster == ours)
        .map(|l| l.generation)
        .max()
    else {
        return Ok(None);
    };
    match leases
        .iter()
        .filter(|l| l.cluster != ours && outranks(l, own, ours))
        .max_by_key(|l| l.generation)
    {
        Some(l) => Err(format!(
            "the blob location {url} was taken over by cluster {} (lease generation {}; this cluster {ours} has generation {own}): a newer cluster restored from it, so this cluster must not write there again. Start this node on an empty data directory with --join to a member of cluster {}, or give it another --checkpoint-url",
            l.cluster, l.generation, l.cluster
        )),
        None => Ok(Some(own)),
    }
}

/// Another cluster's lease in `after` that is new or changed since `before`.
fn renewed<'a>(ours: &str, before: &[LeaseObj], after: &'a [LeaseObj]) -> Vec<&'a LeaseObj> {
    after
        .iter()
        .filter(|l| l.cluster != ours)
        .filter(|l| !before.contains(l))
        .collect()
}

/// The start decision of a cluster without a lease, from listings `before` and `after` one
/// watch (`watched`) apart: the generation to take (one above every lease there), or refused
/// when another cluster renewed its lease meanwhile.
pub fn after_watch(
    url: &str,
    ours: &str,
    before: &[LeaseObj],
    after: &[LeaseObj],
    watched: Duration,
) -> Result<u64, String> {
    if let Some(l) = renewed(ours, before, after).first() {
        return Err(format!(
            "the blob location {url} is in use by running cluster {}: its lease {} was renewed within the last {:.1} s. Stop that cluster first (a new cluster started on a blob location that holds data restores it: disaster recovery), or give this cluster another --checkpoint-url",
            l.cluster,
            lease_path(l.generation, &l.cluster),
            watched.as_secs_f64()
        ));
    }
    Ok(after
        .iter()
        .chain(before)
        .map(|l| l.generation)
        .max()
        .unwrap_or(0)
        + 1)
}

/// While running: `Some(why)` when a cluster that outranks this one renewed its lease between
/// two listings (this node must stop writing).
pub fn fenced(
    url: &str,
    ours: &str,
    generation: u64,
    before: &[LeaseObj],
    after: &[LeaseObj],
) -> Option<String> {
    renewed(ours, before, after)
        .into_iter()
        .find(|l| outranks(l, generation, ours))
        .map(|l| {
            format!(
                "the blob location {url} was taken over by running cluster {} (lease generation {}; this cluster {ours} has generation {generation}); this node stops writing to it and exits",
                l.cluster, l.generation
            )
        })
}

/// This cluster's lease on a blob location, held by one node (see the module documentation).
pub struct Lease {
    cp: CheckpointStore,
    cluster: String,
    generation: u64,
    node: u64,
    seq: u64,
    /// The last listing.
    last: Vec<LeaseObj>,
    /// Renewed at least this often, also while the node writes nothing.
    idle_renew: Duration,
}

/// Lists the leases, retrying a failed listing a few times (a blob store hiccup at start).
async fn list(cp: &CheckpointStore, url: &str) -> Result<Vec<LeaseObj>, String> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match cp.leases().await {
            Ok(l) => return Ok(l),
            Err(e) if attempt < 4 && !e.is_permanent() => {
                tracing::warn!(url, attempt, error = %e, "cannot list the cluster leases; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => {
                return Err(format!(
                    "cannot list the cluster leases of the blob location {url}: {e}"
                ))
            }
        }
    }
}

/// Takes (or keeps) this cluster's lease on the checkpoint location, or refuses with the reason
/// (another running cluster writes there, or a newer cluster took it over).
pub async fn acquire(
    cp: &CheckpointStore,
    cluster: &str,
    node: u64,
    idle_renew: Duration,
) -> Result<Lease, String> {
    let url = cp.url().to_string();
    let before = list(cp, &url).await?;
    let mut fresh = false;
    let generation = match on_start(&url, cluster, &before)? {
        Some(g) => g,
        None => {
            fresh = true;
            let others: Vec<&str> = before
                .iter()
                .filter(|l| l.cluster != cluster)
                .map(|l| l.cluster.as_str())
                .collect();
            // As long as the slowest of them renews when idle (a lease that cannot be read
            // counts as renewed every 30 s at least).
            let mut idle = RENEW;
            for l in before.iter().filter(|l| l.cluster != cluster) {
                let i = match cp.lease_body(&lease_path(l.generation, &l.cluster)).await {
                    Ok(b) => idle_renew_of(&b),
                    Err(_) => idle_renew.max(Duration::from_secs(30)),
                };
                idle = idle.max(i);
            }
            let watch = watch_for(idle);
            let after = if others.is_empty() {
                before.clone()
            } else {
                tracing::info!(url = %url, clusters = ?others, watch_s = watch.as_secs_f64(), "the blob location holds other clusters' leases; checking that none of them is running");
                tokio::time::sleep(watch).await;
                list(cp, &url).await?
            };
            let g = after_watch(&url, cluster, &before, &after, watch)?;
            if !others.is_empty() {
                tracing::warn!(url = %url, clusters = ?others, generation = g, "taking over the blob location of clusters that are not running (disaster recovery)");
            }
            g
        }
    };
    let mut lease = Lease {
        cp: cp.clone(),
        cluster: cluster.to_string(),
        generation,
        node,
        seq: 0,
        last: Vec::new(),
        idle_renew: idle_renew.max(RENEW),
    };
    lease.write().await.map_err(|e| {
        format!("cannot write this cluster's lease on the blob location {url}: {e}")
    })?;
    if fresh {
        // Another new cluster may have listed before this one wrote: look again.
        tokio::time::sleep(CONFIRM).await;
        let now = list(cp, &url).await?;
        if let Some(l) = now
            .iter()
            .find(|l| l.cluster != cluster && outranks(l, generation, cluster))
        {
            let why = format!(
                "the blob location {url} was taken by cluster {} (lease generation {}), started there at the same moment as this cluster {cluster}; this one does not start. Give it another --checkpoint-url, or join cluster {}",
                l.cluster, l.generation, l.cluster
            );
            let _ = cp.delete_lease(&lease_path(generation, cluster)).await;
            return Err(why);
        }
    }
    lease.last = list(cp, &url).await?;
    Ok(lease)
}

impl Lease {
    /// The generation held.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The lowest epoch number this cluster's generation uses (see [`EPOCH_BITS`]).
    pub fn epoch_floor(&self) -> u64 {
        self.generation.saturating_sub(1) << EPOCH_BITS
    }

    async fn write(&mut self) -> Result<(), CheckpointError> {
        self.seq += 1;
        let body = serde_json::json!({
            "cluster_id": self.cluster,
            "generation": self.generation,
            "node": self.node,
            "seq": self.seq,
            "renewed_ms": crate::shard::now_ms(),
            "idle_renew_ms": self.idle_renew.as_millis() as u64,
        });
        self.cp
            .put_lease(
                &lease_path(self.generation, &self.cluster),
                serde_json::to_vec(&body).unwrap_or_default().into(),
            )
            .await
    }

    /// Renews the lease in the background (see [`Lease::renew`]); exits the process at once
    /// when a cluster that took the location over is seen renewing its own.
    pub fn spawn(self) {
        tokio::spawn(async move {
            let why = self.renew().await;
            tracing::error!("{why}");
            eprintln!("statemesh: {why}");
            std::process::exit(3);
        });
    }

    /// Renews the lease every [`RENEW`] while this node writes checkpoints and every
    /// `idle_renew` while it does not, until a cluster that took the location over is seen
    /// renewing its own: returns why this node must stop.
    pub async fn renew(mut self) -> String {
        let url = self.cp.url().to_string();
        let mut writes = self.cp.writes();
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            let now = self.cp.writes();
            if now == writes && renewed.elapsed() + RENEW / 2 < self.idle_renew {
                continue;
            }
            writes = now;
            renewed = tokio::time::Instant::now();
            if let Err(e) = self.write().await {
                tracing::warn!(url = %url, error = %e, "cannot renew this cluster's lease on the blob location");
            }
            let now = match self.cp.leases().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(url = %url, error = %e, "cannot list the blob location's cluster leases");
                    continue;
                }
            };
            if let Some(why) = fenced(&url, &self.cluster, self.generation, &self.last, &now) {
                return why;
            }
            self.last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(g: u64, c: &str, tag: &str) -> LeaseObj {
        LeaseObj {
            generation: g,
            cluster: c.into(),
            tag: tag.into(),
        }
    }

    /// Real leases in a local-files blob store: of two new clusters started at once, one takes
    /// the location and the other leaves no lease; a later generation numbers its epochs above
    /// the earlier ones. Which one wins depends on the schedule: when both list before either
    /// writes, the outranking one ("bbbb"); when one lists, writes and confirms before the
    /// other lists, that one, and the other is refused once it sees the winner renew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_two_new_clusters_started_at_once_one_takes_the_location() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().display().to_string();
        let blob = crate::checkpoint::blob::open(&url, &Default::default(), false).unwrap();
        let cp = CheckpointStore::new(blob);
        // A started cluster renews its lease, as a node does (here without exiting when
        // fenced: the renewal's answer is kept).
        let start = |cluster: &'static str, node: u64| {
            let cp = cp.clone();
            async move {
                let l = acquire(&cp, cluster, node, RENEW).await?;
                let g = l.generation();
                Ok::<_, String>((g, tokio::spawn(l.renew())))
            }
        };
        let (a, b) = tokio::join!(start("aaaa", 1), start("bbbb", 2));
        let refused = |e: &str, winner: &str| {
            assert!(
                e.contains("started there at the same moment")
                    || e.contains(&format!("in use by running cluster {winner}")),
                "{e}"
            );
        };
        let (winner, g) = match (a, b) {
            (Err(e), Ok((g, _))) => {
                refused(&e, "bbbb");
                ("bbbb", g)
            }
            (Ok((g, _)), Err(e)) => {
                refused(&e, "aaaa");
                ("aaaa", g)
            }
            // A machine slow enough that one listed, wrote and confirmed before the other
            // wrote: both started, and the outranked one is fenced at its next renewal.
            (Ok((_, a)), Ok((g, _))) => {
                let why = tokio::time::timeout(3 * RENEW, a)
                    .await
                    .expect("the outranked cluster is fenced")
                    .unwrap();
                assert!(why.contains("taken over by running cluster bbbb"), "{why}");
                cp.delete_lease(&lease_path(1, "aaaa")).await.unwrap();
                ("bbbb", g)
            }
            (Err(a), Err(b)) => panic!("neither cluster started: {a}; {b}"),
        };
        assert_eq!(g, 1);
        let left = cp.leases().await.unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].cluster, winner);
        // A cluster started later sees the winner renew and is refused (the other schedule).
        let e = start("cccc", 4).await.unwrap_err();
        assert!(
            e.contains(&format!("in use by running cluster {winner}")),
            "{e}"
        );
        assert_eq!(cp.leases().await.unwrap().len(), 1);
        // A restart of the winner keeps its generation at once.
        let again = acquire(&cp, winner, 3, RENEW).await.unwrap();
        assert_eq!(again.generation(), 1);
        assert_eq!(again.epoch_floor(), 0);
        let l = Lease {
            generation: 3,
            ..again
        };
        assert_eq!(l.epoch_floor(), 2 << EPOCH_BITS);
    }

    #[test]
    fn paths_round_trip() {
        let p = lease_path(3, "00ab");
        assert_eq!(p, "leases/0000000003-00ab");
        assert_eq!(parse_lease(&p, "t".into()), Some(l(3, "00ab", "t")));
        assert_eq!(parse_lease("manifests/x", String::new()), None);
        assert_eq!(parse_lease("leases/zz-a", String::new()), None);
    }

    #[test]
    fn a_member_keeps_its_generation_unless_a_newer_cluster_took_over() {
        assert_eq!(on_start("u", "a", &[]), Ok(None));
        assert_eq!(on_start("u", "a", &[l(1, "b", "x")]), Ok(None));
        assert_eq!(
            on_start("u", "a", &[l(2, "a", "x"), l(1, "b", "y")]),
            Ok(Some(2))
        );
        let e = on_start("u", "a", &[l(1, "a", "x"), l(2, "b", "y")]).unwrap_err();
        assert!(e.contains("taken over by cluster b"), "{e}");
    }

    #[test]
    fn a_new_cluster_takes_over_a_silent_location_and_is_refused_by_a_live_one() {
        let before = [l(1, "a", "t1"), l(2, "b", "t2")];
        assert_eq!(after_watch("u", "c", &before, &before, WATCH), Ok(3));
        // Leases name how often their cluster renews when idle; older ones every RENEW.
        assert_eq!(
            idle_renew_of(br#"{"idle_renew_ms": 30000}"#),
            Duration::from_secs(30)
        );
        assert_eq!(idle_renew_of(br#"{"seq": 3}"#), RENEW);
        assert_eq!(idle_renew_of(b"garbage"), RENEW);
        assert_eq!(watch_for(RENEW), WATCH);
        assert_eq!(
            watch_for(Duration::from_secs(30)),
            Duration::from_millis(33_500)
        );
        assert_eq!(after_watch("u", "c", &[], &[], WATCH), Ok(1));
        let after = [l(1, "a", "t1"), l(2, "b", "t3")];
        let e = after_watch("u", "c", &before, &after, WATCH).unwrap_err();
        assert!(e.contains("in use by running cluster b"), "{e}");
        // A lease appearing meanwhile is a cluster starting.
        let e = after_watch("u", "c", &[], &[l(1, "d", "t")], WATCH).unwrap_err();
        assert!(e.contains("running cluster d"), "{e}");
    }

    #[test]
    fn only_a_live_newer_cluster_fences() {
        let before = [l(1, "a", "t1"), l(2, "b", "t2")];
        // b renews: a is fenced, b is not.
        let after = [l(1, "a", "t9"), l(2, "b", "t3")];
        assert!(fenced("u", "a", 1, &before, &after).is_some());
        assert!(fenced("u", "b", 2, &before, &after).is_none());
        // b silent (stopped): a keeps going.
        let quiet = [l(1, "a", "t9"), l(2, "b", "t2")];
        assert!(fenced("u", "a", 1, &before, &quiet).is_none());
        // Two new clusters of one generation: the greater id wins.
        let both0 = [l(1, "a", "1"), l(1, "b", "1")];
        let both1 = [l(1, "a", "2"), l(1, "b", "2")];
        assert!(fenced("u", "a", 1, &both0, &both1).is_some());
        assert!(fenced("u", "b", 1, &both0, &both1).is_none());
    }
}
