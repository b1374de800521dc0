//! Which way a connection's packets go: straight to the peer, or through a relay.

use std::net::SocketAddr;

/// The path a connection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer at this address (punched, LAN, or dialled by address).
    Direct(SocketAddr),
    /// Through the relay port at this address.
    Relay(SocketAddr),
}

impl Path {
    pub fn is_relay(&self) -> bool {
        matches!(self, Path::Relay(_))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Path::Direct(_) => "direct",
            Path::Relay(_) => "relay",
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Path::Direct(a) | Path::Relay(a) => *a,
        }
    }
}
