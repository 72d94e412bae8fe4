//! The mesh layer of statemesh (DESIGN.md, "The mesh").
//!
//! For now it holds what every node needs already: the mapping of an address to its key
//! group ([`keygroup`]). Membership, the Raft control group and placement come with the
//! multi-node issue.

pub mod keygroup;
