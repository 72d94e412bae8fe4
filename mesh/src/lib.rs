//! The mesh layer of statemesh (DESIGN.md, "The mesh").
//!
//! - [`keygroup`]: address → key group (fixed forever).
//! - [`placement`]: rendezvous hashing of key groups over members, and rate-limited move plans.
//! - [`control`]: the control group's replicated state machine (members, generations,
//!   key-group ownership versions, committed epochs).
//!
//! All of it is pure (inputs → state and actions; no clocks, no sockets).

pub mod control;
pub mod keygroup;
pub mod placement;
