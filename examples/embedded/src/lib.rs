//! The bundled example functions, shipped in the stock `statemesh` binary.
//!
//! - `example/greeter`: keeps a visit count per name; replies "Hello <name>, you are visitor #N".
//! - `example/counter`: adds a `long` delta to a running total; replies the new total (the
//!   benchmark workload).
//! - `example/cart` and `example/stock`: a shopping cart (see [`cart`]).
//! - `example/memo`: state with TTLs (see [`memo`]).
//! - `example/sequence`: a per-address FIFO checker (see [`sequence`]).
//! - `example/forward`: hands each message on to the Kafka egress `example/kafka` (see
//!   [`forward`]; the Kafka benchmark's workload).
//! - `statemesh.smoke/fn`: a command interpreter for the exactly-once crash test (see
//!   [`smoke`]).

use std::sync::Arc;

use statemesh_sdk::{StatefulFunction, TypeName};

pub mod cart;
pub mod counter;
pub mod forward;
pub mod greeter;
pub mod memo;
pub mod sequence;
pub mod smoke;

/// All example function types.
pub fn all() -> Vec<(TypeName, Arc<dyn StatefulFunction>)> {
    let t = |s: &str| TypeName::parse(s).expect("valid example type");
    vec![
        (
            t(greeter::TYPE),
            Arc::new(greeter::function()) as Arc<dyn StatefulFunction>,
        ),
        (t(counter::TYPE), Arc::new(counter::function())),
        (t(cart::CART_TYPE), Arc::new(cart::cart_function())),
        (t(cart::STOCK_TYPE), Arc::new(cart::stock_function())),
        (t(memo::TYPE), Arc::new(memo::function())),
        (t(sequence::TYPE), Arc::new(sequence::function())),
        (t(forward::TYPE), Arc::new(forward::function())),
        (t(smoke::TYPE), Arc::new(smoke::function())),
    ]
}
