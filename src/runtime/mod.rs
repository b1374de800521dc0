//! What every role's tasks share: the context (endpoint, gauges, the two shutdown tokens, the
//! task tracker), the peer table, and the dispatch of an open stream to its protocol's layer.

pub mod forward;
pub mod peers;

use std::sync::{Arc, OnceLock, Weak};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::identity::PeerId;
use crate::quic::Transport;
use crate::runtime::peers::{PeerConn, PeerTable};
use crate::stats::Stats;

/// Serves the streams a peer opens (the expose role, when the node exposes). Defined here so
/// that the roles below the node need not know each other: a session that dials a peer hands
/// the connection to whatever serves this node's streams.
pub(crate) trait StreamServer: Send + Sync {
    /// Whether `peer` may use this node's services.
    fn allows(&self, peer: &PeerId) -> bool;
    /// Serves the streams `peer` opens on `pc`, a connection this node dialled.
    fn serve_dialled(self: Arc<Self>, pc: PeerConn, peer: PeerId);
}

/// What every role's tasks share.
#[derive(Clone)]
pub(crate) struct NodeCtx {
    pub transport: Transport,
    pub stats: Arc<Stats>,
    /// Cancelled when the node stops accepting (start of the drain).
    pub stop: CancellationToken,
    /// Cancelled when the drain is over: remaining streams are reset.
    pub abort: CancellationToken,
    pub tasks: TaskTracker,
    /// What serves peers' streams, when the node exposes (weak: the node owns its roles).
    pub server: Arc<OnceLock<Weak<dyn StreamServer>>>,
    /// Every connection with every peer, either direction.
    pub peers: Arc<PeerTable>,
}

impl NodeCtx {
    /// What serves peers' streams here, if the node exposes.
    pub(crate) fn server(&self) -> Option<Arc<dyn StreamServer>> {
        self.server.get().and_then(Weak::upgrade)
    }

    /// A connection this node dialled carries the peer's streams too when the peer may use
    /// this node's services; else the peer may open none on it.
    pub(crate) fn serve_dialled(&self, pc: &PeerConn, peer: PeerId) {
        match self.server().filter(|s| s.allows(&peer)) {
            Some(server) => server.serve_dialled(pc.clone(), peer),
            None => pc
                .conn
                .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(0)),
        }
    }
}
