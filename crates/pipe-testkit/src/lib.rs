//! Helpers shared by pipe's tests: the loopback HTTP server that download tests fetch from
//! ([`server`]), and the random edits of valid inputs that the fuzz tests of pipe's readers
//! apply ([`mutation`]). Used only as a dev-dependency.

pub mod fixtures;
pub mod mutation;
pub mod server;
