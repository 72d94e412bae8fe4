//! The mesh layer of statemesh (DESIGN.md, "The mesh").
//!
//! - [`keygroup`]: address → key group (fixed forever).
//! - [`placement`]: rendezvous hashing of key groups over members, and rate-limited move plans.
//! - [`control`]: the control group's replicated state machine (members, generations,
//!   key-group ownership versions, committed epochs).
//! - [`epoch`]: cluster-wide epochs (the cut across nodes, the leader's commit), pure.
//! - [`failure`]: the leader's failure detector, the members' ownership leases, and the
//!   Raft configuration changes that replace dead voters.
//! - [`group`]: one member's replica of the control group (raft-rs `RawNode` + the state
//!   machine) as pure steps.
//! - [`epochlog`]: a node's short-term log of committed epochs on raft-engine.
//! - [`sim`]: the seeded random generator of the simulations.
//! - [`storage`]: the control group's durable log on raft-engine.
//!
//! All of it is pure (inputs → state and actions; no clocks, no sockets).

pub mod control;
pub mod epoch;
pub mod epochlog;
pub mod failure;
pub mod group;
pub mod keygroup;
pub mod placement;
pub mod sim;
pub mod storage;
