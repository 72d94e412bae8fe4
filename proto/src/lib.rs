//! Protobuf definitions of statemesh, generated at build time without a system `protoc`.
//!
//! - [`v1`]: the public API (`statemesh.v1`): addresses, typed values, the `Ingress` and
//!   `Admin` gRPC services.
//! - [`mesh_v1`]: node-to-node messages (`statemesh.mesh.v1`).
//! - [`statefun_v3`]: StateFun's remote-function request-reply protocol, v3
//!   (`io.statefun.sdk.reqreply`).
//! - [`statefun_v2`]: StateFun's request-reply protocol, v2
//!   (`org.apache.flink.statefun.flink.core.polyglot`).

/// The public API package `statemesh.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("statemesh.v1");
}

/// The packages' own paths (`statemesh.mesh.v1` refers to `statemesh.v1` types).
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod statemesh {
    pub mod v1 {
        pub use crate::v1::*;
    }
    pub mod mesh {
        pub mod v1 {
            tonic::include_proto!("statemesh.mesh.v1");
        }
    }
}

/// Node-to-node messages (`statemesh.mesh.v1`): the control group's stream, joins, and
/// messages between functions on different nodes.
pub use statemesh::mesh::v1 as mesh_v1;

/// StateFun's request-reply protocol v3 (`io.statefun.sdk.reqreply`).
#[allow(missing_docs, clippy::all)]
pub mod statefun_v3 {
    tonic::include_proto!("io.statefun.sdk.reqreply");
}

/// StateFun's request-reply protocol v2 (`org.apache.flink.statefun.flink.core.polyglot`).
#[allow(missing_docs, clippy::all)]
pub mod statefun_v2 {
    tonic::include_proto!("org.apache.flink.statefun.flink.core.polyglot");
}
