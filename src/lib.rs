//! `tunnel`: point VLC or a browser at `localhost` and reach an RTSP camera or a web UI behind
//! someone else's NAT, peer to peer, over one QUIC connection per peer.
//!
//! Module map (the file tree shows the architecture; `docs/architecture.md` has the layers,
//! the tasks, their owners and the shutdown order). Dependencies point down this list:
//! - [`cli`]: the command line; merges flags with the rules file and runs a role (the edge:
//!   `anyhow` errors and exit codes live only here).
//! - [`node`]: the composition root: one endpoint, the roles played on it, the drain.
//! - [`connect`], [`expose`]: the two roles a peer plays with its endpoint.
//! - [`nat`]: NAT traversal: the rendezvous server and relay, registration, punching, dials.
//! - [`runtime`]: what every role's tasks share: the context and the peer table.
//! - [`rtsp`]: the RTSP layer of a stream; [`media`]: RTP/RTCP as datagrams, loss repair.
//! - [`tunnel`]: the TCP <-> QUIC splice and the stream-open handshake both roles use.
//! - [`quic`]: the one UDP socket and quinn endpoint, TLS pinning, paths, close reasons.
//! - [`protocol`]: every wire format, pure: ALPN, stream header, codes, rendezvous, RTSP,
//!   media datagrams.
//! - [`config`], [`identity`], [`stats`], [`time`]: rules, keys and peer ids, live gauges,
//!   the drivers' clock and pure schedules.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod connect;
pub mod expose;
pub mod http;
pub mod identity;
pub mod media;
pub mod multipath;
pub mod nat;
pub mod node;
pub mod protocol;
pub mod quic;
pub mod rtsp;
pub mod runtime;
pub mod stats;
pub mod time;
pub mod tunnel;
