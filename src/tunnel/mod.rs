//! The tunnel proper, shared by both roles: the TCP <-> QUIC splice with half-close and
//! abort propagation, and the bulk/interactive send priority of a stream.

pub mod framed;
pub mod priority;
pub mod splice;
