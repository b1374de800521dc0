//! `--http ADDR`: one local port for every web service of every named peer, routed by the
//! request's `Host` (`http::route`), with an index page at `http://localhost:PORT/`; and
//! `--rtsp ADDR`: one port for every camera, routed by the first path segment of the URL.
//!
//! Each peer keeps its own [`Session`] (its own connection, dialled on first use, and its own
//! idle grace); what services a peer has is learned from its catalog, fetched when a name
//! needs it and kept for [`CATALOG_TTL`].

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use super::{accept_clients, Session};
use crate::http::pages::{self, escape};
use crate::http::proxy::{Key, OpenFailure, Routed, Upstream, Upstreams};
use crate::http::route::{parse_host, resolve, Host, Resolution};
use crate::protocol::catalog::{Catalog, Kind};
use crate::protocol::header::Protocol;
use crate::protocol::rtsp::{frame, reply, url_base, Head, Item, StartLine};
use crate::rtsp::policy::Facing;
use crate::runtime::forward::{forward, Named};
use crate::runtime::NodeCtx;
use crate::tunnel::splice::{linger, write_tcp, Downstream};

/// How long a fetched catalog is trusted.
pub const CATALOG_TTL: Duration = Duration::from_secs(5);
/// How long the index waits for a peer's catalog before calling the peer offline.
const INDEX_WAIT: Duration = Duration::from_secs(3);

/// A peer's catalog as last fetched, and when; `Err` says why it could not be asked.
type Fetched = Option<(Instant, Result<Catalog, String>)>;

/// Reads the node's status object (`docs/status.md`) for the index's status section.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The named peers of one `connect` process.
pub struct Router {
    peers: Vec<(String, Session)>,
    catalogs: Mutex<Vec<Fetched>>,
    /// Where `--rtsp` listens, for the index's links.
    pub rtsp: Option<SocketAddr>,
    /// The node's status, shown under the index and at `/status` and `/status.json`.
    pub status: Option<StatusFn>,
}

impl Router {
    pub fn new(peers: Vec<(String, Session)>) -> Router {
        let n = peers.len();
        Router {
            peers,
            catalogs: Mutex::new(vec![None; n]),
            rtsp: None,
            status: None,
        }
    }

    fn catalogs(&self) -> std::sync::MutexGuard<'_, Vec<Fetched>> {
        self.catalogs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The catalogs known and fresh now.
    fn fresh(&self) -> Vec<Option<Result<Catalog, String>>> {
        self.known(Some(CATALOG_TTL))
    }

    /// The catalogs fetched at most `max_age` ago (any age: `None`).
    fn known(&self, max_age: Option<Duration>) -> Vec<Option<Result<Catalog, String>>> {
        let now = Instant::now();
        self.catalogs()
            .iter()
            .map(|c| match c {
                Some((at, c)) if max_age.is_none_or(|max| now.duration_since(*at) < max) => {
                    Some(c.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Peers whose catalog is older than the TTL (or was never fetched).
    fn stale(&self) -> Vec<usize> {
        self.fresh()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_none())
            .map(|(p, _)| p)
            .collect()
    }

    /// Fetches the catalogs of `which` peers at once, each within `limit`.
    async fn fetch(&self, which: &[usize], limit: Duration) {
        let mut asks = tokio::task::JoinSet::new();
        for &p in which {
            let session = self.peers[p].1.clone();
            asks.spawn(async move {
                let got = match tokio::time::timeout(limit, session.catalog()).await {
                    Ok(got) => got,
                    Err(_) => Err(format!("no answer within {limit:?}")),
                };
                (p, got)
            });
        }
        while let Some(Ok((p, got))) = asks.join_next().await {
            self.catalogs()[p] = Some((Instant::now(), got));
        }
    }

    /// Resolves `name` among the services of protocol `kind`. What is known decides when it
    /// can, however old (catalogs change rarely, and a service that went away fails its open,
    /// which forgets its peer's catalog): a request costs no round trip for a catalog. Missing
    /// catalogs are fetched; a name not found is looked for again in fresh ones.
    async fn resolve(&self, name: &str, kind: Kind) -> Resolution {
        let names: Vec<&str> = self.peers.iter().map(|(n, _)| n.as_str()).collect();
        let mut refreshed = false;
        for _ in 0..3 {
            let known = self.known(None);
            let view: Vec<_> = known
                .iter()
                .map(|c| c.as_ref().map(|r| r.as_ref().map_err(String::as_str)))
                .collect();
            let resolution = resolve(name, kind, &names, &view);
            let which = match &resolution {
                Resolution::Need(which) => which.clone(),
                // A miss asks every peer again, once (a name is rarely unknown, and a peer
                // may have been given the service a moment ago).
                Resolution::NotFound(_) | Resolution::Ambiguous(_) if !refreshed => {
                    refreshed = true;
                    (0..self.peers.len()).collect()
                }
                _ => return resolution,
            };
            let limit = self.peers[which[0]].1.config.connect_timeout;
            self.fetch(&which, limit).await;
        }
        Resolution::NotFound(format!("no answer from the peers about {name:?}"))
    }

    /// The index: every peer, whether it answers, and its services as links.
    async fn index(&self, port: Option<u16>, status: u16, note: Option<&str>) -> Vec<u8> {
        let stale = self.stale();
        if !stale.is_empty() {
            self.fetch(&stale, INDEX_WAIT).await;
        }
        let known = self.fresh();
        let port = port.map_or_else(String::new, |p| format!(":{p}"));
        let mut html = String::new();
        if let Some(note) = note {
            let _ = writeln!(html, "<p id=\"message\">{}</p>", escape(note));
        }
        html.push_str("<table id=\"peers\"><tr><th>peer</th><th>id</th><th>state</th><th>services</th></tr>\n");
        for ((name, session), catalog) in self.peers.iter().zip(&known) {
            let (state, class, services) = match catalog {
                Some(Ok(catalog)) => ("online", "on", self.links(name, catalog, &port)),
                Some(Err(why)) => ("offline", "off", escape(why)),
                None => ("unknown", "off", String::new()),
            };
            let _ = writeln!(
                html,
                "<tr class=\"peer\" data-peer=\"{n}\"><td>{n}</td><td><code>{id}</code></td><td class=\"{class}\">{state}</td><td>{services}</td></tr>",
                n = escape(name),
                id = session.peer().id,
            );
        }
        html.push_str("</table>\n");
        if let Some(read) = &self.status {
            html.push_str(&crate::http::status_page::section(&read(), "/status"));
            html.push_str(&crate::http::status_page::script());
        }
        pages::response(status, &pages::html("tunnel", &html), false)
    }

    /// The index host's own paths besides the index: the status page and its JSON.
    fn status_answer(&self, path: &str) -> Option<Vec<u8>> {
        let read = self.status.as_ref()?;
        match path {
            "/status" => Some(pages::response(
                200,
                &crate::http::status_page::page(&read(), "/status"),
                false,
            )),
            "/status.json" => Some(pages::typed(
                200,
                "application/json",
                &format!("{}\n", read()),
                false,
            )),
            _ => None,
        }
    }

    fn links(&self, peer: &str, catalog: &Catalog, port: &str) -> String {
        let mut out = Vec::new();
        for entry in &catalog.services {
            let name = escape(&entry.name);
            let lower = escape(&entry.name.to_ascii_lowercase());
            let peer = escape(peer);
            out.push(match entry.protocol {
                Kind::Http => format!(
                    "<a class=\"service\" href=\"http://{lower}.{peer}.localhost{port}/\">{name}</a>"
                ),
                Kind::Rtsp => match self.rtsp {
                    Some(addr) => format!("<span class=\"service\">{name}: <code>rtsp://{addr}/{name}.{peer}/</code></span>"),
                    None => format!("<span class=\"service\">{name} (rtsp: --rtsp ADDR)</span>"),
                },
                Kind::Tcp | Kind::Other => {
                    format!("<span class=\"service\">{name} (bytes: --local ADDR={name}.{peer})</span>")
                }
            });
        }
        if out.is_empty() {
            return "no services".into();
        }
        out.join("<br>")
    }
}

/// The port of a `Host` value, for links back to this listener.
fn port_of(host: Option<&str>) -> Option<u16> {
    let host = host?;
    let (_, port) = host.rsplit_once(':')?;
    port.parse().ok()
}

impl Upstreams for Router {
    async fn route(&self, host: Option<&str>, target: &str) -> Routed {
        let port = port_of(host);
        match parse_host(host) {
            Host::Index => {
                let path = target.split('?').next().unwrap_or_default();
                match self.status_answer(path) {
                    Some(page) => Routed::Page(page),
                    None => Routed::Page(self.index(port, 200, None).await),
                }
            }
            Host::Foreign(name) => Routed::Page(pages::error(
                421,
                &format!("{name:?} is not a name of this port"),
            )),
            Host::Named(name) => match self.resolve(&name, Kind::Http).await {
                Resolution::To { peer, service } => Routed::To(Key {
                    peer: self.peers[peer].0.clone(),
                    service,
                }),
                Resolution::NotFound(why) => Routed::Page(self.index(port, 404, Some(&why)).await),
                Resolution::Ambiguous(full) => {
                    let why = format!(
                        "several peers have a web service named {name:?}: use {}",
                        full.iter()
                            .map(|f| format!("{f}.localhost"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    );
                    Routed::Page(self.index(port, 404, Some(&why)).await)
                }
                Resolution::Need(_) => Routed::Page(pages::error(503, "the peers did not answer")),
            },
        }
    }

    async fn open(&self, key: &Key, client: SocketAddr) -> Result<Upstream, OpenFailure> {
        let Some((_, session)) = self.peers.iter().find(|(n, _)| *n == key.peer) else {
            return Err(OpenFailure {
                status: 404,
                message: format!("no peer named {}", key.peer),
            });
        };
        let opened = session.open_http(&key.service, client).await;
        if opened.is_err() {
            self.forget(key);
        }
        opened
    }

    fn forget(&self, key: &Key) {
        // What the peer has may have changed: ask again next time.
        if let Some(p) = self.peers.iter().position(|(n, _)| *n == key.peer) {
            self.catalogs()[p] = None;
            self.peers[p].1.forget(&key.service);
        }
    }
}

/// How long an RTSP client may take to send its first request head.
const FIRST_REQUEST: Duration = Duration::from_secs(10);

impl Router {
    /// One client of `--rtsp`: its first request's first path segment names `SERVICE` or
    /// `SERVICE.PEER`; the stream to that service then carries the connection through the
    /// RTSP layer, which takes the segment off every request URL and puts it back into
    /// every URL the camera answers with.
    pub(crate) async fn serve_rtsp_client(
        &self,
        tcp: TcpStream,
        client: SocketAddr,
        node: &NodeCtx,
    ) {
        let (head, leading) = match first_request(&tcp).await {
            Ok(read) => read,
            Err(why) => return debug!("rtsp client closed: {why}"),
        };
        let StartLine::Request { uri, .. } = &head.start else {
            return;
        };
        let segment = url_base(uri)
            .map(|base| &uri[base.len()..])
            .and_then(|path| path.strip_prefix('/'))
            .and_then(|path| path.split(['/', '?']).next())
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let Some(segment) = segment else {
            let why =
                "name the camera in the path: rtsp://HOST:PORT/SERVICE/... or /SERVICE.PEER/...";
            return answer(&tcp, &head, 404, "Not Found", why).await;
        };
        let (peer, service) = match self.resolve(&segment, Kind::Rtsp).await {
            Resolution::To { peer, service } => (peer, service),
            Resolution::NotFound(why) => return answer(&tcp, &head, 404, "Not Found", &why).await,
            Resolution::Ambiguous(full) => {
                let why = format!("several peers have it: use /{}", full.join(" or /"));
                return answer(&tcp, &head, 404, "Not Found", &why).await;
            }
            Resolution::Need(_) => {
                return answer(
                    &tcp,
                    &head,
                    503,
                    "Service Unavailable",
                    "the peers did not answer",
                )
                .await
            }
        };
        let (name, session) = &self.peers[peer];
        tracing::Span::current().record(
            "service",
            tracing::field::display(format!("{service}.{name}")),
        );
        let opened = match session.open_service(&service, client).await {
            Ok(opened) => opened,
            Err(failure) => {
                warn!(peer = %name, %service, "{}", failure.message);
                let reason = if failure.status == 404 {
                    "Not Found"
                } else {
                    "Service Unavailable"
                };
                let status = if failure.status == 404 { 404 } else { 503 };
                return answer(&tcp, &head, status, reason, &failure.message).await;
            }
        };
        let Protocol::Rtsp(_) = opened.response.protocol else {
            let why = format!("service {service} of peer {name} is not an RTSP service");
            let _ = opened.refuse(why.clone());
            return answer(&tcp, &head, 404, "Not Found", &why).await;
        };
        let protocol = opened.response.protocol;
        let usage = node.stats.services.get(name, &service).begin();
        let report = forward(
            protocol,
            Facing::Client,
            (tcp, opened.send, opened.recv),
            Downstream::Payload(opened.first),
            &opened.pc.media,
            node,
            Named {
                service: &service,
                routed: Some((format!("/{segment}"), leading)),
            },
        )
        .await;
        drop(opened.lease);
        usage.end(report.up, report.down, report.abort.is_none());
        match report.abort {
            None => debug!(up = report.up, down = report.down, "rtsp connection closed"),
            Some(abort) => info!(
                up = report.up,
                down = report.down,
                "rtsp connection aborted: {abort}"
            ),
        }
    }
}

/// Longest first request (head and body) read to route an RTSP connection.
const MAX_FIRST_REQUEST: usize = 64 * 1024;

/// Reads until the socket gave a whole first request: its head, and every byte read (the
/// RTSP layer starts from them).
async fn first_request(tcp: &TcpStream) -> Result<(Head, Bytes), String> {
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match frame(&buf) {
                Ok(Some(Item::Message { head, .. })) => {
                    let parsed = Head::parse(&buf[..head]).map_err(|e| e.to_string())?;
                    return Ok(parsed);
                }
                Ok(Some(_)) => return Err("the first bytes are not an RTSP request".to_owned()),
                Ok(None) if buf.len() >= MAX_FIRST_REQUEST => {
                    return Err("the first request is too large".to_owned())
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            tcp.readable().await.map_err(|e| e.to_string())?;
            buf.reserve(16 * 1024);
            match tcp.try_read_buf(&mut buf) {
                Ok(0) => return Err("closed before a request".to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let head = tokio::time::timeout(FIRST_REQUEST, read)
        .await
        .map_err(|_| format!("no whole request within {FIRST_REQUEST:?}"))??;
    Ok((head, buf.freeze()))
}

/// Answers the client's first request with `status` and why, then closes.
async fn answer(tcp: &TcpStream, head: &Head, status: u16, reason: &str, why: &str) {
    warn!(status, "rtsp client refused: {why}");
    let mut out = reply(head, status, reason);
    // The reason for a person reading the player's log, in the reply's own text.
    if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
        let note = format!("\r\nX-Tunnel-Error: {}", why.replace(['\r', '\n'], " "));
        out.splice(end..end, note.into_bytes());
    }
    let _ = write_tcp(tcp, &out).await;
    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
    // What the client still sends is read and dropped, so the close is a FIN, not a reset.
    linger(tcp, Duration::from_secs(2)).await;
}

/// Serves `--rtsp`: every RTSP service of every peer on one listener, routed by path.
pub(crate) async fn serve_rtsp(router: Arc<Router>, listener: TcpListener, node: NodeCtx) {
    info!(local = ?listener.local_addr().ok(), "listening for RTSP services");
    accept_clients(listener, &node, |tcp, client| {
        let router = router.clone();
        let ctx = node.clone();
        let span = tracing::info_span!("rtsp", %client, service = tracing::field::Empty);
        node.tasks.spawn(
            async move {
                let _live = ctx.stats.stream();
                router.serve_rtsp_client(tcp, client, &ctx).await;
            }
            .instrument(span),
        );
    })
    .await;
}

/// Where a peer's services can be reached on this machine: its `--local` ports, `--http`'s
/// port and `--rtsp`'s address.
#[derive(Debug, Clone, Default)]
pub struct Entrances {
    /// `(listener, service, peer index)`.
    pub locals: Vec<(SocketAddr, String, usize)>,
    pub http_port: Option<u16>,
    pub rtsp: Option<SocketAddr>,
}

/// The `ready:` line of each service of peer `p` (named `peer`) with a way in here, and a
/// warning for each `--local` port whose service the peer does not have. Pure.
pub fn ready_lines(
    p: usize,
    peer: &str,
    catalog: &Catalog,
    at: &Entrances,
) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::new();
    for entry in &catalog.services {
        let lower = entry.name.to_ascii_lowercase();
        let mut urls: Vec<String> = at
            .locals
            .iter()
            .filter(|(_, s, i)| *i == p && s.eq_ignore_ascii_case(&entry.name))
            .map(|(addr, _, _)| match entry.protocol {
                Kind::Http => format!("http://{addr}/"),
                Kind::Rtsp => format!("rtsp://{addr}/"),
                Kind::Tcp | Kind::Other => format!("tcp://{addr}"),
            })
            .collect();
        match (entry.protocol, at.http_port, at.rtsp) {
            (Kind::Http, Some(port), _) => {
                urls.push(format!("http://{lower}.{peer}.localhost:{port}/"))
            }
            (Kind::Rtsp, _, Some(addr)) => {
                urls.push(format!("rtsp://{addr}/{}.{peer}/", entry.name))
            }
            _ => {}
        }
        if !urls.is_empty() {
            lines.push(format!(
                "ready: {}  ({} of peer {peer})",
                urls.join("  "),
                entry.name
            ));
        }
    }
    let warnings = at
        .locals
        .iter()
        .filter(|(_, s, i)| {
            *i == p && !catalog.services.iter().any(|e| e.name.eq_ignore_ascii_case(s))
        })
        .map(|(addr, s, _)| {
            let has: Vec<&str> = catalog.services.iter().map(|e| e.name.as_str()).collect();
            format!(
                "{addr}: peer {peer} has no service {s} for this side (it offers: {}); clients of that port will be refused",
                if has.is_empty() { "none".to_owned() } else { has.join(", ") }
            )
        })
        .collect();
    (lines, warnings)
}

impl Router {
    /// Asks every peer for its catalog at start, and prints a `ready:` line for each service
    /// as soon as its peer answers; a peer that does not is asked again, backing off to a
    /// minute, until it does or the node stops.
    pub(crate) async fn announce_ready(
        self: Arc<Self>,
        at: Entrances,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut asks = tokio::task::JoinSet::new();
        for p in 0..self.peers.len() {
            let this = self.clone();
            let at = at.clone();
            let stop = stop.clone();
            asks.spawn(async move {
                let (name, session) = &this.peers[p];
                let limit = session.config.connect_timeout + session.config.open_timeout;
                let mut backoff =
                    crate::time::backoff::Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
                loop {
                    let got = tokio::select! {
                        got = tokio::time::timeout(limit, session.catalog()) => got
                            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}"))),
                        () = stop.cancelled() => return,
                    };
                    match got {
                        Ok(catalog) => {
                            this.catalogs()[p] = Some((Instant::now(), Ok(catalog.clone())));
                            let (lines, warnings) = ready_lines(p, name, &catalog, &at);
                            for w in warnings {
                                warn!("{w}");
                            }
                            if lines.is_empty() {
                                info!(peer = %name, "peer answered; none of its services has a way in here (--local, --http, --rtsp)");
                            }
                            for line in lines {
                                info!(peer = %name, "{line}");
                                println!("{line}");
                            }
                            return;
                        }
                        Err(why) => {
                            let wait = backoff.failed();
                            warn!(peer = %name, "not ready: {why}; asking again in {wait:?}");
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = stop.cancelled() => return,
                            }
                        }
                    }
                }
            });
        }
        while asks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod ready_tests {
    use super::*;
    use crate::protocol::catalog::Entry;

    #[test]
    fn each_service_with_a_way_in_gets_one_ready_line_and_a_wrong_local_port_a_warning() {
        let catalog = Catalog {
            services: vec![
                Entry {
                    name: "nas".into(),
                    protocol: Kind::Http,
                },
                Entry {
                    name: "cam".into(),
                    protocol: Kind::Rtsp,
                },
                Entry {
                    name: "ssh".into(),
                    protocol: Kind::Tcp,
                },
            ],
        };
        let at = Entrances {
            locals: vec![
                ("127.0.0.1:2222".parse().unwrap(), "ssh".into(), 0),
                ("127.0.0.1:9000".parse().unwrap(), "printer".into(), 0),
                ("127.0.0.1:9001".parse().unwrap(), "nas".into(), 1),
            ],
            http_port: Some(8080),
            rtsp: Some("127.0.0.1:8554".parse().unwrap()),
        };
        let (lines, warnings) = ready_lines(0, "home", &catalog, &at);
        assert_eq!(
            lines,
            vec![
                "ready: http://nas.home.localhost:8080/  (nas of peer home)",
                "ready: rtsp://127.0.0.1:8554/cam.home/  (cam of peer home)",
                "ready: tcp://127.0.0.1:2222  (ssh of peer home)",
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("no service printer") && warnings[0].contains("nas, cam, ssh")
        );
    }
}
