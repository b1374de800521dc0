//! Whether the exposing side serves a stream, as a pure function: the requested service,
//! the services this peer may use, whether the node is stopping, and whether a stream slot is
//! free (the node's and the peer's) in; the target to dial, or the refusal (status and the
//! message the other side logs), out. The order is the contract: a service the peer may not
//! use is answered exactly as one that does not exist, and an unknown service is unknown even
//! while stopping or full, so a peer learns nothing else from asking for one.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{ServiceName, Target};
use crate::protocol::header::Status;

/// Why a stream is refused, as the response says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub message: String,
}

/// The state a decision reads.
pub struct Node<'a> {
    pub services: &'a BTreeMap<ServiceName, Target>,
    /// The services this peer may use (`None`: all of them).
    pub allowed: Option<&'a BTreeSet<ServiceName>>,
    pub stopping: bool,
    /// A stream slot is free (the caller holds it while the stream lives).
    pub slot_free: bool,
    /// Streams at once, over all peers (for the message).
    pub max_streams: usize,
    /// The peer's own cap, when it is reached: `Some(cap)`.
    pub peer_full: Option<usize>,
}

impl Node<'_> {
    /// Whether this peer may use `name`.
    pub fn may_use(&self, name: &ServiceName) -> bool {
        self.allowed.is_none_or(|a| a.contains(name))
    }
}

/// The target for `service`, or why not.
pub fn admit(node: &Node<'_>, service: &str) -> Result<Target, Refusal> {
    let Some(target) = node
        .services
        .iter()
        .find(|(name, _)| name.as_str() == service && node.may_use(name))
        .map(|(_, target)| target.clone())
    else {
        let names: Vec<_> = node
            .services
            .keys()
            .filter(|n| node.may_use(n))
            .map(|n| n.as_str())
            .collect();
        return Err(Refusal {
            status: Status::UnknownService,
            message: format!(
                "no service named {service:?} here; exposed: {}",
                names.join(", ")
            ),
        });
    };
    if node.stopping {
        return Err(Refusal {
            status: Status::Busy,
            message: "the peer is shutting down".into(),
        });
    }
    if !node.slot_free {
        return Err(Refusal {
            status: Status::Busy,
            message: format!(
                "the peer is at its limit of {} proxied sockets",
                node.max_streams
            ),
        });
    }
    if let Some(cap) = node.peer_full {
        return Err(Refusal {
            status: Status::Busy,
            message: format!("this peer is at its limit of {cap} proxied sockets here"),
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> BTreeMap<ServiceName, Target> {
        [
            (
                "cam".parse().unwrap(),
                "rtsp://127.0.0.1:554".parse().unwrap(),
            ),
            ("web".parse().unwrap(), "127.0.0.1:8080".parse().unwrap()),
        ]
        .into()
    }

    #[test]
    fn a_known_service_with_a_free_slot_is_served() {
        let s = services();
        let node = Node {
            services: &s,
            allowed: None,
            stopping: false,
            slot_free: true,
            max_streams: 4,
            peer_full: None,
        };
        assert_eq!(admit(&node, "web").unwrap().as_str(), "127.0.0.1:8080");
    }

    #[test]
    fn an_unknown_service_is_unknown_whatever_else_holds() {
        let s = services();
        for (stopping, slot_free) in [(false, true), (true, true), (false, false), (true, false)] {
            let node = Node {
                services: &s,
                allowed: None,
                stopping,
                slot_free,
                max_streams: 4,
                peer_full: None,
            };
            let r = admit(&node, "nas").unwrap_err();
            assert_eq!(r.status, Status::UnknownService);
            assert_eq!(
                r.message,
                "no service named \"nas\" here; exposed: cam, web"
            );
        }
    }

    #[test]
    fn stopping_comes_before_the_limit_and_both_are_busy() {
        let s = services();
        let full = |stopping| Node {
            services: &s,
            allowed: None,
            stopping,
            slot_free: false,
            max_streams: 4,
            peer_full: None,
        };
        let r = admit(&full(true), "cam").unwrap_err();
        assert_eq!(
            (r.status, r.message.as_str()),
            (Status::Busy, "the peer is shutting down")
        );
        let r = admit(&full(false), "cam").unwrap_err();
        assert_eq!(r.status, Status::Busy);
        assert_eq!(r.message, "the peer is at its limit of 4 proxied sockets");
    }

    #[test]
    fn a_service_the_peer_may_not_use_is_answered_as_an_unknown_one() {
        let s = services();
        let only_web: BTreeSet<ServiceName> = ["web".parse().unwrap()].into();
        let peer = |stopping, peer_full| Node {
            services: &s,
            allowed: Some(&only_web),
            stopping,
            slot_free: true,
            max_streams: 4,
            peer_full,
        };
        let hidden = admit(&peer(false, None), "cam").unwrap_err();
        let unknown = admit(&peer(false, None), "nas").unwrap_err();
        assert_eq!(hidden.status, Status::UnknownService);
        // The same words as for a name that does not exist, listing only what it may use.
        assert_eq!(
            hidden.message,
            "no service named \"cam\" here; exposed: web"
        );
        assert_eq!(
            unknown.message.replace("nas", "cam"),
            hidden.message,
            "nothing tells the two apart"
        );
        // Whatever else holds: stopping, or at its own cap.
        assert_eq!(
            admit(&peer(true, Some(1)), "cam").unwrap_err().status,
            Status::UnknownService
        );
        assert_eq!(
            admit(&peer(false, None), "web").unwrap().as_str(),
            "127.0.0.1:8080"
        );
        let r = admit(&peer(false, Some(2)), "web").unwrap_err();
        assert_eq!(
            (r.status, r.message.as_str()),
            (
                Status::Busy,
                "this peer is at its limit of 2 proxied sockets here"
            )
        );
    }
}
