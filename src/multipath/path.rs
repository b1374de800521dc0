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

/// `addr` as the network knows it: an IPv4 address that a dual-stack socket reports mapped
/// (`[::ffff:198.51.100.1]:3478`) becomes the IPv4 one again, so that addresses compare,
/// count per source and print the same whichever socket saw them.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// `to` in the family of a socket bound to `local`: a dual-stack IPv6 socket sends to an IPv4
/// address through its mapped form (the kernel refuses an IPv4 address on an IPv6 socket).
pub fn for_socket(to: SocketAddr, local: SocketAddr) -> SocketAddr {
    match (to, local) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4_and_back_for_a_dual_stack_socket() {
        let v4: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:3478".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::2]:4433".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(canonical(v6), v6);
        let dual: SocketAddr = "[::]:4433".parse().unwrap();
        let plain: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        assert_eq!(for_socket(v4, dual), mapped);
        assert_eq!(for_socket(v4, plain), v4);
        assert_eq!(for_socket(v6, dual), v6);
    }
}
