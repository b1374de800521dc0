//! `tunnel`: point VLC or a browser at `localhost` and reach an RTSP camera or a web UI behind
//! someone else's NAT, peer to peer, over one QUIC connection per peer.
//!
//! Module map (the file tree shows the architecture; `docs/architecture.md` has the tasks,
//! owners and shutdown order):
//! - [`cli`]: the command line; merges flags with the rules file and runs a role (the edge:
//!   `anyhow` errors and exit codes live only here).
//! - [`config`]: `proxy-rules.toml` and the command-line forms of its rules.
//! - [`identity`]: key, self-signed certificate and the [`identity::PeerId`] derived from it.
//! - [`protocol`]: pure wire formats: ALPN, the stream header codec, error codes.
//! - [`session`]: pure state machines with time as input: idle grace, backoff, punch schedule.
//! - [`transport`]: the one UDP socket and quinn endpoint, TLS pinning, the TCP <-> QUIC splice.
//! - [`roles`]: `expose` and `connect`, the two things a node does with its endpoint.
//! - [`rendezvous`]: NAT traversal: the rendezvous server and relay, registration, punching.
//! - [`node`]: a node: endpoint + roles + supervised tasks + the drain at shutdown.
//! - [`stats`]: live counters, awaited by the drain and by tests.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod identity;
pub mod node;
pub mod protocol;
pub mod rendezvous;
pub mod roles;
pub mod session;
pub mod stats;
pub mod transport;
