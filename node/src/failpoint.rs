//! Named fault points at the durable steps of checkpoints (TiKV's `fail` crate), for the
//! crash tests.
//!
//! Compiled into debug builds and into release builds built with the `failpoints` feature;
//! otherwise [`eval`] is an empty inline function. The `statemesh node` command configures
//! them from the `FAILPOINTS` environment variable, as TiKV does:
//! `FAILPOINTS="checkpoint-manifest-put=1*return(error);checkpoint-gc-delete=3*off->return(abort)"`.
//!
//! Actions (the `fail` crate's syntax: `[p%][n*]action[(arg)]`, chained with `->`):
//! - `return(abort)`: the process kills itself with SIGKILL at that point (a crash: nothing
//!   is flushed, no destructor runs);
//! - `return` or `return(<text>)`: the step fails with an error naming the point;
//! - `sleep(ms)`: the step is delayed;
//! - `off`, `print`, `panic`, `pause` as the crate defines them.
//!
//! | point | where |
//! | --- | --- |
//! | `checkpoint-object-put` | after an epoch object's put, before its manifest |
//! | `checkpoint-manifest-put` | inside the manifest put: the manifest is stored, then the step fails (an ambiguous commit) |
//! | `checkpoint-after-commit` | after the manifest is stored, before acknowledgements are released |
//! | `checkpoint-full-snapshot-scan` | before a full snapshot scans sled (`sleep(ms)`: a long scan, as of a large store; `return`: the snapshot fails and is taken again later) |
//! | `checkpoint-full-snapshot-put` | after a full snapshot's put, before a manifest lists it |
//! | `checkpoint-gc-delete` | before each delete of a garbage collection |
//! | `checkpoint-sled-apply` | before committed epochs are written to sled (`return`: the write fails; it is retried) |
//! | `checkpoint-sled-marker` | after committed epochs are written to sled, before sled records them as applied |
//! | `checkpoint-recovery` | during recovery, after part of the local state is rebuilt |
//! | `checkpoint-rollback` | after an epoch object's put, before its manifest (`return`: the node abandons the epochs after the last committed one and rolls back to it, as it will when a cluster epoch is abandoned) |
//! | `checkpoint-log-append` | before an epoch is appended to the epoch log (a node alone) |
//! | `checkpoint-upload` | after the epoch log's merged object is written, before its manifest |
//! | `checkpoint-log-truncate` | after an upload's manifest is stored, before the epoch log is truncated behind it (`return`: it is not truncated) |
//! | `checkpoint-log-truncated` | after the epoch log is truncated behind an upload, before the driver learns of the upload (`return(<ms>)`: it learns that much later) |
//! | `checkpoint-epoch-written` | when an epoch small enough to ride in its manifest is written (`return(<ms>)`: the driver learns it that much later; `return`: the write fails) |
//! | `mesh-join-reply` | on the leader, after a new member's join is applied, before it is answered |
//! | `function-invoke` | before an embedded function's batch runs (`sleep(ms)`: a slow function, messages queue up behind it; other actions do nothing) |
//! | `mesh-stale-part` | when a participant reports a part that wrote key groups as their owner (`return`: it names ownership versions one below its own, as a node whose table is behind would: the leader refuses the part) |
//! | `mesh-handover-read` | when a live hand-over starts reading the key groups a node gained from blob storage (`return(<ms>)`: the read is delayed that long, as on a slow store; `return`: it fails, and the participants synchronise again) |
//! | `mesh-held-answer` | when a participant answers the epochs' leader's `Hold` (`return(<ms>)`: the answer is delayed, as from a slow or distant participant) |
//! | `mesh-fn-stream-break` | before a frame of messages between functions is sent to a peer (`return`: the frame is lost and the stream breaks, as when the connection drops) |
//! | `mesh-lead-epochs` | when a node is to lead the cluster's epochs (it leads the control group of a cluster of several members) (`return(<ms>)`: it starts leading them that much later, as on a busy control thread; with manifest puts it waits `lease_ms` anyway, and the longer of the two counts) |
//! | `mesh-stop-propose` | when a stopping member proposes its stop (`MarkDead { stopped }`) (`return`: it is not proposed, as when every proposal is lost: the member gives up after `STOP_WAIT` and the others declare it dead after the failure timeout) |
//! | `mesh-drain-ask` | when the leader is asked to drain a member that stops (`Mesh.Drain`) (`return(unimplemented)`: it answers UNIMPLEMENTED, as a leader of an older build does: the member stops at once as before, its key groups failing over; `return`: it answers UNAVAILABLE, and the member asks again until it gives up after `DRAIN_WAIT`) |
//! | `mesh-manifest-put` | when the epochs' leader puts an epoch's manifest to blob storage (`cluster_log = false`) (`return(<ms>)`: the put starts that much later, as on a slow store) |
//! | `mesh-lease-ask` | when a member asks for the read index that renews its ownership lease (`return`: the ask is lost, as when no majority answers: its lease lapses — and with it the epochs' leader's right to commit by manifest puts — though the Raft group still follows it) |
//! | `mesh-partition` | wherever traffic with peers enters or leaves the node (`return`: cut off both ways; `return(in)`: what peers send is lost; `return(out)`: what it sends is lost; streams break and new ones are refused, as in a network partition) |
//!
//! In builds with fault points, `PUT /debug/failpoints` (body: the `FAILPOINTS` syntax; `off`
//! turns a point off) changes them while the node runs: the partition tests cut a node off
//! and heal it.

/// Every fault point of checkpoints, for documentation and the crash tests.
pub const POINTS: &[&str] = &[
    "checkpoint-object-put",
    "checkpoint-manifest-put",
    "checkpoint-after-commit",
    "checkpoint-full-snapshot-scan",
    "checkpoint-full-snapshot-put",
    "checkpoint-gc-delete",
    "checkpoint-sled-apply",
    "checkpoint-sled-marker",
    "checkpoint-recovery",
    "checkpoint-rollback",
    "checkpoint-log-append",
    "checkpoint-upload",
    "checkpoint-log-truncate",
];

/// The fault points of the cluster layer (reached only with more than one node).
pub const MESH_POINTS: &[&str] = &[
    "mesh-join-reply",
    "mesh-fn-stream-break",
    "mesh-stale-part",
    "mesh-handover-read",
    "mesh-held-answer",
    "mesh-stop-propose",
    "mesh-drain-ask",
    "mesh-lead-epochs",
    "mesh-manifest-put",
    "mesh-lease-ask",
    "mesh-partition",
];

/// Fault points that slow work down rather than fail it (not on every path a crash test
/// takes: `checkpoint-epoch-written` is reached only once epochs go to blob storage one by one).
pub const SLOW_POINTS: &[&str] = &[
    "function-invoke",
    "checkpoint-log-truncated",
    "checkpoint-epoch-written",
];

/// Evaluates the fault point `name`: `Err` when it is configured to fail the step (the
/// message names the point); never returns when configured to abort.
#[cfg(any(debug_assertions, feature = "failpoints"))]
pub fn eval(name: &str) -> Result<(), String> {
    match fail::eval(name, |arg| arg) {
        None => Ok(()),
        Some(Some(a)) if a == "abort" => {
            eprintln!("failpoint {name}: abort");
            // SAFETY: kill(2) on our own pid; nothing after it runs.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            loop {
                std::thread::park();
            }
        }
        Some(Some(a)) if !a.is_empty() => Err(format!("failpoint {name}: {a}")),
        Some(_) => Err(format!("failpoint {name}: injected error")),
    }
}

/// Evaluates the fault point `name` (compiled out: always `Ok`).
#[cfg(not(any(debug_assertions, feature = "failpoints")))]
#[inline(always)]
pub fn eval(_name: &str) -> Result<(), String> {
    Ok(())
}

/// Evaluates a fault point that stands for a slow or failing step: `return(<ms>)` gives the
/// delay (`Ok(Some(ms))`), any other `return` fails the step.
pub fn eval_delay(name: &str) -> Result<Option<u64>, String> {
    match eval(name) {
        Ok(()) => Ok(None),
        Err(e) => match e.rsplit(": ").next().and_then(|a| a.parse::<u64>().ok()) {
            Some(ms) => {
                tracing::warn!(ms, "fault point {name}: the step is delayed");
                Ok(Some(ms))
            }
            None => Err(e),
        },
    }
}

/// [`eval_delay`], waiting out the delay (a slow blob store, say).
pub async fn eval_slow(name: &str) -> Result<(), String> {
    if let Some(ms) = eval_delay(name)? {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    Ok(())
}

/// Configures fault points from `FAILPOINTS` (`name=actions;name=actions`); an unknown name
/// or a malformed action is an error naming it.
pub fn setup_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    configure(&spec)
}

/// Configures fault points from a `name=actions;…` list.
#[cfg(any(debug_assertions, feature = "failpoints"))]
pub fn configure(spec: &str) -> Result<(), String> {
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, actions) = part
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS: expected name=actions, found {part:?}"))?;
        let name = name.trim();
        if !POINTS.contains(&name) && !MESH_POINTS.contains(&name) && !SLOW_POINTS.contains(&name) {
            return Err(format!(
                "FAILPOINTS: unknown fault point {name:?} (known: {}, {}, {})",
                POINTS.join(", "),
                MESH_POINTS.join(", "),
                SLOW_POINTS.join(", ")
            ));
        }
        fail::cfg(name, actions.trim())
            .map_err(|e| format!("FAILPOINTS: {name}={actions}: {e}"))?;
        tracing::warn!(point = name, actions, "fault point configured");
    }
    Ok(())
}

/// Fault points are compiled out of this build: configuring one is an error.
#[cfg(not(any(debug_assertions, feature = "failpoints")))]
pub fn configure(spec: &str) -> Result<(), String> {
    if spec.trim().is_empty() {
        return Ok(());
    }
    Err(
        "FAILPOINTS is set, but this build has no fault points (build with --features failpoints)"
            .into(),
    )
}
