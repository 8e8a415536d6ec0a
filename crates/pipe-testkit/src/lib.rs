//! Helpers shared by pipe's tests: the loopback HTTP server that download tests fetch from
//! ([`server`]), the Hugging Face Hub write API that push tests upload to ([`hub`]), and the random edits of valid inputs that the fuzz tests of pipe's readers
//! apply ([`mutation`]). Used only as a dev-dependency.

pub mod fixtures;
pub mod hub;
pub mod mutation;
pub mod server;
