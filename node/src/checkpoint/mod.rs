//! Checkpoints of state and pending messages to blob storage (DESIGN.md, "Exactly-once:
//! epochs and checkpoints"; see `OVERVIEW.md` beside this file).
//!
//! - [`barrier`]: a shard's side of the epoch cut (pure marker bookkeeping).
//! - [`driver`]: runs the coordinator against shards, blob storage and sled; recovery.
//! - [`blob`]: opening a blob store from a URL (`file://`, `memory://`, `s3://`, `gs://`,
//!   `az://`) through object_store.
//! - [`format`]: what an epoch writes: per-node epoch objects and the manifest (pure).
//! - [`store`]: writing, committing (create-only manifest), reading chains, retention.
//! - [`lease`]: which cluster writes a blob location (a second running cluster is refused).
//! - [`idempotency`]: idempotency records within a window (pure).
//! - [`coordinator`]: when epochs start, persist and commit (pure; the mesh backs the same
//!   decisions with Raft).

pub mod barrier;
pub mod blob;
pub mod coordinator;
pub mod driver;
pub mod format;
pub mod idempotency;
pub mod lease;
pub mod store;
pub mod upload;
