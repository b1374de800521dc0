//! NAT traversal: the rendezvous server role, its relay, and the peer side (registration,
//! introductions, punching, the direct-or-relay dial). The design is in
//! `docs/nat-traversal.md`; the messages in `protocol::rendezvous`; the pure schedules in
//! `session::punch`.

pub mod client;
pub mod relay;
pub mod server;
