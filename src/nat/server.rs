//! The rendezvous role (`tunnel rendezvous`): peers register over QUIC, authenticated by their
//! identity key; the server records each one's observed (reflexive) and local addresses, tells
//! a peer when one it asked for goes on or off line, introduces two peers to each other with
//! each other's candidates and a common start time, and allocates relays.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use quinn::Connection;
use tokio::sync::mpsc;
use tracing::{info, warn, Instrument};

use crate::identity::PeerId;
use crate::nat::{read_frame, relay, write_frames};
use crate::protocol::close_code;
use crate::protocol::rendezvous::{token_hex, ClientMsg, RelayGrant, ServerMsg, MAX_LOCAL_ADDRS};
use crate::quic::accept::Serve;
use crate::quic::tls;
use crate::runtime::NodeCtx;

/// Limits and switches of the rendezvous server.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    /// Allocate relays when peers ask.
    pub relay: bool,
    /// Relay allocations a peer may hold at once.
    pub max_relays_per_peer: usize,
    /// A relay allocation with no traffic for this long is released.
    pub relay_idle: Duration,
    /// Registered peers at once.
    pub max_peers: usize,
    /// How long a peer has to register after connecting.
    pub register_timeout: Duration,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        RendezvousConfig {
            relay: true,
            max_relays_per_peer: 8,
            relay_idle: Duration::from_secs(60),
            max_peers: 10_000,
            register_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a registration is refused (sent to the peer as the message of `ServerMsg::Error`).
#[derive(Debug, Clone, thiserror::Error)]
enum Refused {
    #[error("the rendezvous is full ({0} peers registered)")]
    Full(usize),
}

struct Entry {
    /// `stable_id` of the connection this registration belongs to.
    conn_id: usize,
    tx: mpsc::Sender<ServerMsg>,
    observed: SocketAddr,
    local_addrs: Vec<SocketAddr>,
    rtt: Duration,
}

#[derive(Default)]
struct State {
    peers: HashMap<PeerId, Entry>,
    /// Peer → the peers that asked to connect to it (told when it goes on or off line).
    watchers: HashMap<PeerId, HashSet<PeerId>>,
    relays: HashMap<PeerId, usize>,
}

impl State {
    fn send(&self, to: &PeerId, msg: ServerMsg) {
        if let Some(entry) = self.peers.get(to) {
            // A peer that does not read its control stream loses messages rather than
            // making the server buffer without end.
            if entry.tx.try_send(msg).is_err() {
                warn!(peer = %to, "control stream full: message dropped");
            }
        }
    }

    fn presence(&self, peer: &PeerId, online: bool) {
        for watcher in self.watchers.get(peer).into_iter().flatten() {
            self.send(
                watcher,
                ServerMsg::Presence {
                    peer: *peer,
                    online,
                },
            );
        }
    }
}

impl Serve for Rendezvous {
    fn serve(self: Arc<Self>, conn: Connection) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.serve_peer(conn))
    }
}

pub(crate) struct Rendezvous {
    config: RendezvousConfig,
    state: Mutex<State>,
    node: NodeCtx,
    relay_ip: IpAddr,
}

impl Rendezvous {
    pub(crate) fn new(config: RendezvousConfig, node: NodeCtx) -> std::io::Result<Arc<Self>> {
        let relay_ip = node.transport.local_addr()?.ip();
        Ok(Arc::new(Rendezvous {
            config,
            state: Mutex::new(State::default()),
            node,
            relay_ip,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_peers(&self, state: &State) {
        self.node
            .stats
            .rendezvous_peers
            .store(state.peers.len(), std::sync::atomic::Ordering::Relaxed);
    }

    async fn serve_peer(self: Arc<Self>, conn: Connection) {
        let Some(peer) = tls::peer_id_of(&conn) else {
            conn.close(close_code::PROTOCOL_ERROR, b"no peer certificate");
            return;
        };
        tracing::Span::current().record("peer", tracing::field::display(peer));
        let (send, mut recv) =
            match tokio::time::timeout(self.config.register_timeout, conn.accept_bi()).await {
                Ok(Ok(pair)) => pair,
                _ => {
                    conn.close(close_code::PROTOCOL_ERROR, b"no control stream");
                    return;
                }
            };
        let (tx, rx) = mpsc::channel(256);
        let writer = self.node.tasks.spawn(write_frames(send, rx));
        let mut buf = BytesMut::new();
        let mut registered = false;
        let end = loop {
            let msg = tokio::select! {
                m = read_frame::<ClientMsg>(&mut recv, &mut buf) => m,
                () = self.node.abort.cancelled() => break "shutting down".to_string(),
                r = conn.closed() => break crate::quic::close::describe_close(&r),
            };
            let msg = match msg {
                Ok(Some(msg)) => msg,
                Ok(None) => break "control stream finished".into(),
                Err(e) => {
                    let e = e.to_string();
                    conn.close(close_code::PROTOCOL_ERROR, e.as_bytes());
                    break e;
                }
            };
            match msg {
                ClientMsg::Register { mut local_addrs } => {
                    local_addrs.truncate(MAX_LOCAL_ADDRS);
                    if let Err(e) = self.register(peer, &conn, &tx, local_addrs) {
                        let message = e.to_string();
                        let _ = tx.try_send(ServerMsg::Error {
                            message: message.clone(),
                        });
                        break message;
                    }
                    registered = true;
                }
                ClientMsg::Connect {
                    peer: target,
                    relay,
                } if registered => {
                    self.introduce(peer, target, relay).await;
                }
                ClientMsg::Connect { .. } => {
                    let _ = tx.try_send(ServerMsg::Error {
                        message: "register first".into(),
                    });
                }
            }
        };
        info!("peer left: {end}");
        self.unregister(peer, conn.stable_id());
        drop(tx);
        let _ = writer.await;
    }

    fn register(
        &self,
        peer: PeerId,
        conn: &Connection,
        tx: &mpsc::Sender<ServerMsg>,
        local_addrs: Vec<SocketAddr>,
    ) -> Result<(), Refused> {
        let observed = conn.remote_address();
        let mut state = self.state();
        if !state.peers.contains_key(&peer) && state.peers.len() >= self.config.max_peers {
            return Err(Refused::Full(self.config.max_peers));
        }
        let entry = Entry {
            conn_id: conn.stable_id(),
            tx: tx.clone(),
            observed,
            local_addrs,
            rtt: conn.rtt(),
        };
        // A peer that registers again (a new connection after a network change) replaces
        // its old registration.
        let was_online = state.peers.insert(peer, entry).is_some();
        self.count_peers(&state);
        let _ = tx.try_send(ServerMsg::Registered { observed });
        if !was_online {
            state.presence(&peer, true);
        }
        info!(%observed, "peer registered");
        Ok(())
    }

    fn unregister(&self, peer: PeerId, conn_id: usize) {
        let mut state = self.state();
        if state.peers.get(&peer).is_some_and(|e| e.conn_id == conn_id) {
            state.peers.remove(&peer);
            self.count_peers(&state);
            state.presence(&peer, false);
            for watchers in state.watchers.values_mut() {
                watchers.remove(&peer);
            }
            state.watchers.retain(|_, w| !w.is_empty());
        }
    }

    async fn introduce(self: &Arc<Self>, from: PeerId, to: PeerId, want_relay: bool) {
        let (from_cands, to_cands, start_from, start_to) = {
            let mut state = self.state();
            state.watchers.entry(to).or_default().insert(from);
            if from == to {
                state.send(
                    &from,
                    ServerMsg::Error {
                        message: "cannot connect to yourself".into(),
                    },
                );
                return;
            }
            let (Some(a), Some(b)) = (state.peers.get(&from), state.peers.get(&to)) else {
                state.send(
                    &from,
                    ServerMsg::Presence {
                        peer: to,
                        online: false,
                    },
                );
                return;
            };
            // Both start at the same moment: the nearer peer waits for the farther one's
            // message to arrive (half the difference of their round trips).
            let (ha, hb) = (a.rtt / 2, b.rtt / 2);
            let start_a = hb.saturating_sub(ha).as_millis() as u64;
            let start_b = ha.saturating_sub(hb).as_millis() as u64;
            (candidates(a), candidates(b), start_a, start_b)
        };
        let grants = if want_relay && self.config.relay {
            self.allocate_relay(from, to).await
        } else {
            None
        };
        let (grant_from, grant_to) = match grants {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let state = self.state();
        info!(%from, %to, relay = grant_from.is_some(), "introducing");
        state.send(
            &from,
            ServerMsg::Introduce {
                peer: to,
                candidates: to_cands,
                start_in_ms: start_from,
                relay: grant_from,
            },
        );
        state.send(
            &to,
            ServerMsg::Introduce {
                peer: from,
                candidates: from_cands,
                start_in_ms: start_to,
                relay: grant_to,
            },
        );
    }

    async fn allocate_relay(
        self: &Arc<Self>,
        a: PeerId,
        b: PeerId,
    ) -> Option<(RelayGrant, RelayGrant)> {
        {
            let mut state = self.state();
            for p in [a, b] {
                if state.relays.get(&p).copied().unwrap_or(0) >= self.config.max_relays_per_peer {
                    warn!(peer = %p, "relay limit reached; no relay for this introduction");
                    return None;
                }
            }
            for p in [a, b] {
                *state.relays.entry(p).or_default() += 1;
            }
        }
        let release = {
            let this = self.clone();
            move || {
                let mut state = this.state();
                for p in [a, b] {
                    if let Some(n) = state.relays.get_mut(&p) {
                        *n -= 1;
                        if *n == 0 {
                            state.relays.remove(&p);
                        }
                    }
                }
            }
        };
        let sockets = match relay::bind_pair(self.relay_ip).await {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot bind relay ports: {e}");
                release();
                return None;
            }
        };
        let ports = [
            sockets[0].local_addr().ok()?.port(),
            sockets[1].local_addr().ok()?.port(),
        ];
        let tokens = relay::new_tokens();
        let idle = self.config.relay_idle;
        let cancel = self.node.abort.clone();
        let span = tracing::info_span!("relay", a = %a, b = %b, ports = ?ports);
        let held = self.node.stats.relays.hold();
        self.node.tasks.spawn(
            async move {
                let _held = held;
                let forwarded = relay::run(sockets, tokens, idle, cancel).await;
                info!(forwarded, "relay released");
                release();
            }
            .instrument(span),
        );
        Some((
            RelayGrant {
                port: ports[0],
                token: token_hex(&tokens[0]),
            },
            RelayGrant {
                port: ports[1],
                token: token_hex(&tokens[1]),
            },
        ))
    }
}

fn candidates(entry: &Entry) -> Vec<SocketAddr> {
    let mut out = vec![entry.observed];
    for addr in &entry.local_addrs {
        if !out.contains(addr) {
            out.push(*addr);
        }
    }
    out
}
