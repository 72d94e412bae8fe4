//! Protobuf definitions of statemesh, generated at build time without a system `protoc`.
//!
//! - [`v1`]: the public API (`statemesh.v1`): addresses, typed values, the `Ingress` and
//!   `Admin` gRPC services.

/// The public API package `statemesh.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("statemesh.v1");
}
