//! Checkpoints of state and pending messages to blob storage (DESIGN.md, "Exactly-once:
//! epochs and checkpoints"; see `OVERVIEW.md` beside this file).
//!
//! - [`barrier`]: a shard's side of the epoch cut (pure; not wired into the node yet).
//! - [`blob`]: opening a blob store from a URL (`file://`, `memory://`, `s3://`, `gs://`,
//!   `az://`) through object_store.
//! - [`format`]: what an epoch writes: per-node epoch objects and the manifest (pure).
//! - [`store`]: writing, committing (create-only manifest), reading chains, retention.
//! - [`idempotency`]: idempotency keys within a window (pure; not wired into the node yet).
//! - [`overlay`]: uncommitted state writes by epoch (pure; not wired into the node yet).
//! - [`coordinator`]: when epochs start, persist and commit (pure; not wired into the node yet).

pub mod barrier;
pub mod blob;
pub mod coordinator;
pub mod format;
pub mod idempotency;
pub mod overlay;
pub mod store;
