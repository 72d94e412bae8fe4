//! The statemesh runtime: a node running stateful functions (DESIGN.md, "The node").
//!
//! Embed it with [`NodeBuilder`]: register functions, configure, start; the returned
//! [`NodeHandle`] gives the bound addresses, an in-process [`Router`], and `shutdown`.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use statemesh_node::{NodeBuilder, NodeConfig};
//! let node = NodeBuilder::new(NodeConfig::default()).with_examples().start().await?;
//! node.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod auth;
pub mod checkpoint;
pub mod cluster;
pub mod config;
mod egress;
pub mod error;
pub mod failpoint;
pub mod ingress;
mod instance;
pub mod kafka;
mod mesh;
pub mod metrics;
pub mod module;
mod node;
mod registry;
pub mod remote;
mod router;
mod shard;
mod store;
pub mod telemetry;
mod ticker;
pub mod tls;

pub use checkpoint::driver::{CheckpointStatus, EpochInfo, RecoveryReport};
pub use config::{AckMode, CheckpointConfig, NodeConfig, RetryConfig};
pub use error::ServiceError;
pub use node::{NodeBuilder, NodeHandle, StartError};
pub use router::Router;
