//! The statemesh SDK.
//!
//! - [`Address`], [`TypeName`]: where a function instance lives.
//! - [`TypedValue`] and the [`Codec`] / [`WellKnown`] traits: messages and state values,
//!   with StateFun's built-in types encoded byte-for-byte as its wrapper messages, and
//!   custom types through [`Json`] (serde) or [`Proto`] (prost).
//! - [`ValueSpec`]: a declared state value (name, type, TTL).
//! - [`StatefulFunction`], [`Context`], [`Effects`]: the function API shared by embedded
//!   functions and the remote-function server.
//! - [`Client`]: an async gRPC client of a node.
//! - `server` (feature `server`): serve functions to statemesh nodes over StateFun's
//!   request-reply protocol.

mod address;
mod client;
mod function;
mod spec;
mod types;

#[cfg(feature = "server")]
pub mod server;
pub mod signing;

pub use address::{Address, AddressError, TypeName};
pub use client::{Client, ClientError, ConnectOptions, EgressRecord, RetryPolicy, StateChange};
pub use function::{
    Context, DelayedMessage, Effects, FnFunction, FunctionError, StateSlot, StatefulFunction, Undo,
};
pub use spec::{Expiration, ValueSpec, ValueSpecDescriptor};
pub use types::{Codec, DecodeError, Json, Proto, TypedValue, WellKnown};

/// Typenames of StateFun's built-in types.
pub mod typenames {
    /// `io.statefun.types/bool`
    pub const BOOL: &str = "io.statefun.types/bool";
    /// `io.statefun.types/int`
    pub const INT: &str = "io.statefun.types/int";
    /// `io.statefun.types/long`
    pub const LONG: &str = "io.statefun.types/long";
    /// `io.statefun.types/float`
    pub const FLOAT: &str = "io.statefun.types/float";
    /// `io.statefun.types/double`
    pub const DOUBLE: &str = "io.statefun.types/double";
    /// `io.statefun.types/string`
    pub const STRING: &str = "io.statefun.types/string";
}

/// The function type whose addresses stand for callers waiting on a reply.
pub const REPLY_TYPE: &str = "statemesh/reply";
/// The egress topic of messages that could not be processed.
pub const DEAD_LETTERS_TOPIC: &str = "statemesh/dead-letters";
