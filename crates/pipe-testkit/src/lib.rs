//! Helpers shared by pipe's tests: the loopback HTTP server that download tests fetch from
//! ([`server`]), the Hugging Face Hub write API that push tests upload to ([`hub`]), and the random edits of valid inputs that the fuzz tests of pipe's readers
//! apply ([`mutation`]). Used only as a dev-dependency.

pub mod fixtures;
pub mod hub;
pub mod mutation;
pub mod server;

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago (the system's pick): for a
/// server a test starts there, or for an address that must refuse connections.
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1")
        .port()
}
