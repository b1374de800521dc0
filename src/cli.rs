//! The command line: clap definitions, merging flags with the rules file, and running a role
//! until SIGINT/SIGTERM. Errors become one clear line on stderr and an exit code: 2 for a
//! mistake in flags or rules (as clap does), 1 for anything else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};

use crate::config::{
    read_allow_file, ByteRate, ConfigError, ConnectRules, Dur, ExposeRules, LocalRule, NamedPeer,
    PeerAddr, PeerName, RendezvousAddr, RendezvousRules, RulesFile, ServiceName, ServiceRule,
};
use crate::connect::router::Router;
use crate::connect::SessionConfig;
use crate::expose::{Authorized, ExposeConfig, PeerAccess};
use crate::identity::{default_identity_path, Identity, PeerId};
use crate::nat::relay::RelayLimits;
use crate::nat::server::broker::{Admission, Limits};
use crate::nat::server::RendezvousConfig;
use crate::node::Node;
use crate::protocol::control::{decode_answer, encode_request, Command as ControlCommand};
use crate::quic::{Congestion, TransportError, Tuning};
use crate::time::rate::Rate;

const DEFAULT_LISTEN: &str = "[::]:4433";
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "tunnel",
    version,
    about = "Reach an RTSP camera or a web UI behind someone else's NAT, peer to peer over QUIC"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` for people, `json` (one object per line, with the span
    /// fields) for log shippers.
    #[arg(long, global = true, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that run this process's tasks [default: 1 for `expose` and `connect`, one per
    /// core for `rendezvous`]. One QUIC connection is driven by one task whatever the count,
    /// and handing its packets between threads cost more than it gained: on 2 cores one
    /// thread moved 25–40% more and spent 18–37% less CPU per GiB (docs/bench/README.md,
    /// "Threads"). A node serving many peers at once on a bigger box may want more.
    #[arg(long, global = true, env = "TUNNEL_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this host's peer id (creating the identity if there is none yet).
    Id(CommonArgs),
    /// Serve the named local services to allowed peers.
    Expose(ExposeArgs),
    /// Reach a peer's services through local TCP ports.
    Connect(ConnectArgs),
    /// Introduce peers behind NATs to each other, and relay when punching fails.
    Rendezvous(RendezvousArgs),
    /// Ask a running tunnel process (over its control socket) what it is doing.
    Status(StatusArgs),
    /// Make a running tunnel process read its rules again (as SIGHUP does).
    Reload(ControlArgs),
}

#[derive(Debug, Clone, Args)]
struct RendezvousArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on, UDP and TCP alike [default: [::]:3478, IPv6 and IPv4 alike];
    /// given again, more TCP addresses for peers whose network drops UDP (e.g. [::]:443).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Do not relay: peers that cannot punch a direct path cannot connect.
    #[arg(long)]
    no_relay: bool,
    /// Admit only this peer id (repeat for more; with --allow-file). Without either, anyone
    /// may register; introductions still need the target's consent.
    #[arg(long, value_name = "PEER_ID")]
    allow: Vec<PeerId>,
    /// Admit the ids in this file, one per line (`#` comments); read again on SIGHUP.
    #[arg(long, value_name = "PATH")]
    allow_file: Option<PathBuf>,
    /// Registered peers at once [default: 10000].
    #[arg(long, value_name = "N")]
    max_peers: Option<usize>,
    /// Registered peers at once from one source address [default: 64].
    #[arg(long, value_name = "N")]
    max_peers_per_ip: Option<usize>,
    /// Registrations per source address, as N/s, N/min or N/h [default: 60/min].
    #[arg(long, value_name = "RATE")]
    register_rate: Option<Rate>,
    /// Introduction requests per source address [default: 600/min].
    #[arg(long, value_name = "RATE")]
    connect_rate: Option<Rate>,
    /// Relay allocations one identity may hold at once [default: 8].
    #[arg(long, value_name = "N")]
    max_relays_per_peer: Option<usize>,
    /// Relay allocations the peers at one source address may hold at once [default: 32].
    #[arg(long, value_name = "N")]
    max_relays_per_ip: Option<usize>,
    /// Release a relay allocation after this long with nothing forwarded [default: 60s].
    #[arg(long, value_name = "DURATION")]
    relay_idle: Option<Dur>,
    /// Release any relay allocation this long after it was made [default: 12h].
    #[arg(long, value_name = "DURATION")]
    relay_lifetime: Option<Dur>,
    /// Forward at most this much per relay allocation, both ways together, e.g. 100Mbit/s
    /// or 12MB/s [default: no cap].
    #[arg(long, value_name = "RATE")]
    relay_rate: Option<ByteRate>,
}

#[derive(Debug, Clone, Args)]
struct CommonArgs {
    /// Identity file (key and certificate) [default: ~/.config/tunnel/identity.pem].
    #[arg(long, env = "TUNNEL_IDENTITY", value_name = "PATH")]
    identity: Option<PathBuf>,
    /// Rules file (see proxy-rules.toml); flags add to and override it.
    #[arg(long, short = 'c', env = "TUNNEL_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// QUIC congestion controller for what this side sends: `bbr` does not take random loss
    /// for congestion (docs/architecture.md); `cubic` is quinn's own default.
    #[arg(long, env = "TUNNEL_CONGESTION", value_enum, default_value_t = CongestionArg::Bbr)]
    congestion: CongestionArg,
    /// Control socket for `tunnel status` and `tunnel reload` [default: beside the identity,
    /// IDENTITY-STEM.ROLE.sock].
    #[arg(long, env = "TUNNEL_CONTROL", value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics; a bare PORT means 127.0.0.1:PORT
    /// [default: off].
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = metrics_addr)]
    metrics: Option<SocketAddr>,
}

/// `--metrics`: ADDR:PORT, or a bare PORT on loopback.
fn metrics_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither PORT nor ADDR:PORT (e.g. 9464 or 127.0.0.1:9464)"))
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// Identity file of the process to ask (its control socket is beside it)
    /// [default: ~/.config/tunnel/identity.pem].
    #[arg(long, env = "TUNNEL_IDENTITY", value_name = "PATH")]
    identity: Option<PathBuf>,
    /// The process's control socket (as given to it with --control).
    #[arg(long, env = "TUNNEL_CONTROL", value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Print the status as one JSON object (documented in docs/status.md).
    #[arg(long)]
    json: bool,
    /// Ask again every 2 s until interrupted (with --json, one object per line).
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CongestionArg {
    Bbr,
    Cubic,
}

impl CommonArgs {
    fn tuning(&self) -> Tuning {
        Tuning {
            congestion: match self.congestion {
                CongestionArg::Cubic => Congestion::Cubic,
                CongestionArg::Bbr => Congestion::Bbr,
            },
            ..Tuning::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
struct ExposeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// UDP address to listen on [default: [::]:4433, IPv6 and IPv4 alike].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A service to expose, NAME=HOST:PORT (repeat for more).
    #[arg(long = "service", value_name = "NAME=HOST:PORT")]
    services: Vec<ServiceRule>,
    /// A peer id allowed to connect (repeat for more).
    #[arg(long = "allow", value_name = "PEER_ID")]
    allow: Vec<PeerId>,
    /// Allow ANY peer that can reach the port. Use only on a trusted network.
    #[arg(long)]
    allow_any: bool,
    /// Register with this rendezvous so peers behind NATs can reach this host.
    #[arg(long, value_name = "HOST:PORT")]
    rendezvous: Option<RendezvousAddr>,
    /// Proxied sockets at once over all peers; more are answered "busy" [default: 20000].
    #[arg(long, value_name = "N")]
    max_streams: Option<usize>,
    /// How long live streams may take to finish at shutdown [default: 5s].
    #[arg(long, value_name = "DURATION")]
    drain_timeout: Option<Dur>,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The peer, as printed by `tunnel expose`: <peer-id>@<host:port>, or <peer-id> with
    /// --rendezvous. Its name is `peer`.
    #[arg(value_name = "PEER_ID[@HOST:PORT]")]
    peer: Option<PeerAddr>,
    /// A named peer, NAME=PEER_ID[@HOST:PORT] (repeat for more); NAME appears in host names
    /// (`http://SERVICE.NAME.localhost:PORT/`) and in `--local ADDR=SERVICE.NAME`.
    #[arg(long = "peer", value_name = "NAME=PEER_ID[@HOST:PORT]")]
    peers: Vec<NamedPeer>,
    /// Serve every web service of every peer on this address, at
    /// http://SERVICE.PEER.localhost:PORT/ (and http://SERVICE.localhost:PORT/ while the name
    /// is unique), with an index at http://localhost:PORT/.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Serve every RTSP service of every peer on this address, at
    /// rtsp://ADDR/SERVICE.PEER/PATH (and rtsp://ADDR/SERVICE/PATH while the name is unique);
    /// the camera sees /PATH.
    #[arg(long, value_name = "ADDR")]
    rtsp: Option<SocketAddr>,
    /// Find the peer through this rendezvous (hole punching, relay as a fallback).
    #[arg(long, value_name = "HOST:PORT")]
    rendezvous: Option<RendezvousAddr>,
    /// A local listener, ADDR=SERVICE, e.g. 127.0.0.1:8554=cam (repeat for more); with
    /// several peers, ADDR=SERVICE.PEER.
    #[arg(long = "local", value_name = "ADDR=SERVICE")]
    locals: Vec<LocalRule>,
    /// Local UDP address for the QUIC endpoint [default: [::]:0, IPv6 and IPv4 alike].
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// Connect at start and stay connected, instead of on the first client.
    #[arg(long)]
    eager: bool,
    /// With --rendezvous: never punch, always go through the relay (to diagnose).
    #[arg(long)]
    force_relay: bool,
    /// How long an unused connection stays up after its last stream [default: 30s].
    #[arg(long, value_name = "DURATION")]
    idle_grace: Option<Dur>,
    /// How long a client waits for the connection to come up [default: 10s].
    #[arg(long, value_name = "DURATION")]
    connect_timeout: Option<Dur>,
    /// How long live streams may take to finish at shutdown [default: 5s].
    #[arg(long, value_name = "DURATION")]
    drain_timeout: Option<Dur>,
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        let code = if error.downcast_ref::<ConfigError>().is_some() {
            2
        } else {
            1
        };
        Failure { code, error }
    }
}

fn usage(message: String) -> Failure {
    Failure {
        code: 2,
        error: anyhow::anyhow!(message),
    }
}

/// Parses the command line and runs it; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal, and never with NO_COLOR: logs are read by programs too.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
}

fn run(cli: Cli) -> Result<(), Failure> {
    let threads = cli
        .threads
        .map(usize::from)
        .unwrap_or_else(|| match cli.command {
            Command::Rendezvous(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            _ => 1,
        });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Id(common) => {
            let rules = load_rules(&common)?;
            let identity = load_identity(&common, &rules)?;
            println!("{}", identity.peer_id());
            Ok(())
        }
        Command::Expose(args) => runtime.block_on(expose(args)),
        Command::Connect(args) => runtime.block_on(connect(args)),
        Command::Rendezvous(args) => runtime.block_on(rendezvous(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Reload(args) => runtime.block_on(reload(args)),
    }
}

fn load_rules(common: &CommonArgs) -> Result<RulesFile, Failure> {
    match &common.config {
        Some(path) => Ok(RulesFile::load(path).map_err(anyhow::Error::from)?),
        None => Ok(RulesFile::default()),
    }
}

fn identity_path(flag: Option<&PathBuf>, rules: &RulesFile) -> Result<PathBuf, Failure> {
    flag.cloned()
        .or_else(|| rules.identity.clone())
        .or_else(default_identity_path)
        .ok_or_else(|| usage("no identity path: set HOME, or give --identity PATH".into()))
}

/// A role's control socket: `--control`, else beside the identity (`id.pem` →
/// `id.expose.sock`).
fn control_path(identity: &std::path::Path, role: &str) -> PathBuf {
    let stem = identity
        .file_stem()
        .map_or("identity".into(), |s| s.to_string_lossy().into_owned());
    identity.with_file_name(format!("{stem}.{role}.sock"))
}

/// Opens the role's control socket and, with `--metrics`, its metrics listener. A process
/// without a control socket still runs (the warning says why `tunnel status` will not reach
/// it); a metrics address that cannot be bound is an error.
async fn serve_status(
    node: &Node,
    common: &CommonArgs,
    rules: &RulesFile,
    role: &'static str,
) -> Result<(), Failure> {
    serve_control(node, common, rules, role);
    if let Some(listener) = bind_optional(common.metrics, "--metrics").await? {
        node.serve_metrics(listener, role);
    }
    Ok(())
}

fn serve_control(node: &Node, common: &CommonArgs, rules: &RulesFile, role: &'static str) {
    let path = match &common.control {
        Some(p) => p.clone(),
        None => match identity_path(common.identity.as_ref(), rules) {
            Ok(id) => control_path(&id, role),
            Err(_) => return,
        },
    };
    if let Err(e) = node.serve_control(path, role) {
        warn!("{e}; `tunnel status` and `tunnel reload` cannot reach this process");
    }
}

fn load_identity(common: &CommonArgs, rules: &RulesFile) -> Result<Arc<Identity>, Failure> {
    let path = identity_path(common.identity.as_ref(), rules)?;
    let (identity, created) = Identity::load_or_create(&path).map_err(anyhow::Error::from)?;
    if created {
        info!(path = %path.display(), "created a new identity");
    }
    Ok(Arc::new(identity))
}

async fn expose(args: ExposeArgs) -> Result<(), Failure> {
    let mut rules = load_rules(&args.common)?;
    let identity = load_identity(&args.common, &rules)?;
    let file = rules.expose.take().unwrap_or_default();
    let (listen, config) = expose_config(args_over_file(&args, file))?;
    let drain = args
        .drain_timeout
        .or(rules.drain_timeout)
        .map_or(DEFAULT_DRAIN, |d| d.0);

    let node = Node::bind(listen, identity, args.common.tuning())
        .map_err(|e| anyhow::anyhow!("{e}; choose another port with --listen ADDR"))?;
    let local = node.local_addr().context("reading the bound address")?;
    let services: Vec<_> = config
        .services
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let names: Vec<(PeerId, String)> = config
        .peers
        .iter()
        .filter_map(|(id, access)| Some((*id, access.name.clone()?)))
        .collect();
    node.expose(config).context("starting the QUIC server")?;
    node.name_peers(names);
    {
        // SIGHUP: the rules file again, the flags on top, as at start.
        let args = args.clone();
        node.reload_on_sighup(move || {
            let mut rules = load_rules(&args.common).map_err(|f| format!("{:#}", f.error))?;
            let file = rules.expose.take().unwrap_or_default();
            let (new_listen, config) =
                expose_config(args_over_file(&args, file)).map_err(|f| format!("{:#}", f.error))?;
            if new_listen != listen {
                warn!(%listen, %new_listen, "the listen address changes only with a restart");
            }
            Ok(config)
        });
    }
    let rendezvous = args.rendezvous.clone().or(rules.rendezvous.clone());
    if let Some(server) = &rendezvous {
        node.register(server.0.clone());
    }

    let host = match local.ip() {
        ip if ip.is_unspecified() => hostname().unwrap_or_else(|| "THIS-HOST".into()),
        IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let mut command = match &rendezvous {
        Some(server) => format!(
            "tunnel connect {} --rendezvous {}",
            node.peer_id(),
            server.0
        ),
        None => format!("tunnel connect {}@{host}:{}", node.peer_id(), local.port()),
    };
    for (name, target) in &services {
        let port = target
            .as_str()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(0);
        let local_port = if port >= 1024 { port } else { 8000 + port };
        command.push_str(&format!(" --local 127.0.0.1:{local_port}={name}"));
    }
    info!(peer_id = %node.peer_id(), %local, "exposing {}", services.iter().map(|(n, t)| format!("{n}={t}")).collect::<Vec<_>>().join(", "));
    println!("peer id: {}", node.peer_id());
    println!("on the other side, run:\n  {command}");

    serve_status(&node, &args.common, &rules, "expose").await?;
    node.run_until_signal(drain, ()).await;
    Ok(())
}

/// The file's `[expose]` with the flags applied on top.
fn args_over_file(args: &ExposeArgs, mut file: ExposeRules) -> ExposeRules {
    for rule in &args.services {
        file.services.insert(rule.name.clone(), rule.target.clone());
    }
    file.authorized_peers.extend(args.allow.iter().copied());
    file.allow_any |= args.allow_any;
    file.listen = args.listen.or(file.listen);
    file.max_streams = args.max_streams.or(file.max_streams);
    file
}

fn expose_config(rules: ExposeRules) -> Result<(SocketAddr, ExposeConfig), Failure> {
    if rules.services.is_empty() {
        return Err(usage(
            "nothing to expose: give --service NAME=HOST:PORT, or [expose.services] in the rules file".into(),
        ));
    }
    let peers = peer_access(&rules)?;
    let authorized = if rules.allow_any {
        Authorized::Any
    } else if rules.authorized_peers.is_empty() && peers.is_empty() {
        return Err(usage(
            "no peer is allowed: give --allow PEER_ID (the other side prints it with `tunnel id`), or authorized_peers or [[expose.peer]] in the rules file".into(),
        ));
    } else {
        // A peer with its own rules is allowed in by them.
        Authorized::Only(
            rules
                .authorized_peers
                .iter()
                .copied()
                .chain(peers.keys().copied())
                .collect::<HashSet<_>>(),
        )
    };
    let mut config = ExposeConfig::new(rules.services, authorized);
    config.peers = peers;
    if let Some(n) = rules.max_streams {
        if n == 0 {
            return Err(usage("max_streams must be at least 1".into()));
        }
        config.max_streams = n;
    }
    if let Some(d) = rules.dial_timeout {
        config.dial_timeout = d.0;
    }
    let listen = rules
        .listen
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
    Ok((listen, config))
}

/// The `[[expose.peer]]` rules, checked: each peer once, naming only exposed services, with a
/// cap of at least 1.
fn peer_access(rules: &ExposeRules) -> Result<HashMap<PeerId, PeerAccess>, Failure> {
    let mut peers = HashMap::new();
    for rule in &rules.peers {
        let who = rule
            .name
            .as_ref()
            .map_or_else(|| rule.id.to_string(), |n| format!("{n} ({})", rule.id));
        if let Some(name) = rule
            .services
            .iter()
            .flatten()
            .find(|s| !rules.services.contains_key(*s))
        {
            return Err(usage(format!(
                "[[expose.peer]] {who}: service {name} is not exposed here; exposed: {}",
                rules
                    .services
                    .keys()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if rule.max_streams == Some(0) {
            return Err(usage(format!(
                "[[expose.peer]] {who}: max_streams must be at least 1"
            )));
        }
        let access = PeerAccess {
            name: rule.name.clone(),
            services: rule.services.as_ref().map(|s| s.iter().cloned().collect()),
            max_streams: rule.max_streams,
        };
        if peers.insert(rule.id, access).is_some() {
            return Err(usage(format!(
                "[[expose.peer]] {who} is given twice: give each peer one entry"
            )));
        }
    }
    Ok(peers)
}

async fn connect(args: ConnectArgs) -> Result<(), Failure> {
    let mut rules = load_rules(&args.common)?;
    let identity = load_identity(&args.common, &rules)?;
    let file = rules.connect.take().unwrap_or_default();
    let drain = args
        .drain_timeout
        .or(rules.drain_timeout)
        .map_or(DEFAULT_DRAIN, |d| d.0);
    let rendezvous = args.rendezvous.clone().or(rules.rendezvous.clone());
    let plan = connect_config(&args, file)?;
    if rendezvous.is_none() {
        if let Some((name, peer)) = plan.peers.iter().find(|(_, p)| p.addr.is_none()) {
            return Err(usage(format!(
                "no address for peer {name} ({}): give {}@HOST:PORT, or --rendezvous HOST:PORT",
                peer.id, peer.id
            )));
        }
    }

    // Bind the local ports first: a port in use is the commonest mistake; say so at once.
    let mut listeners = Vec::new();
    for (rule, peer) in &plan.locals {
        let listener = tokio::net::TcpListener::bind(rule.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                "cannot listen on {} for service {}: {e}; pick another port with --local ADDR={}",
                rule.listen,
                rule.service,
                rule.service
            )
            })?;
        listeners.push((listener, rule.service.clone(), *peer));
    }
    let http = bind_optional(plan.http, "--http").await?;
    let rtsp = bind_optional(plan.rtsp, "--rtsp").await?;
    let node = Node::bind(plan.bind, identity, args.common.tuning())
        .map_err(|e| anyhow::anyhow!("{e}; choose another address with --bind ADDR"))?;
    info!(peer_id = %node.peer_id(), "this side's peer id (the other side allows it with --allow)");
    if let Some(server) = &rendezvous {
        if plan.peers.iter().any(|(_, p)| p.addr.is_none()) {
            node.register(server.0.clone());
        }
    }
    let sessions: Vec<(String, crate::connect::Session)> = plan
        .peers
        .iter()
        .map(|(name, peer)| {
            let session = node
                .connect(peer.clone(), plan.session.clone())
                .with_name(name.as_str());
            (name.to_string(), session)
        })
        .collect();
    node.name_peers(plan.peers.iter().map(|(name, p)| (p.id, name.to_string())));
    let mut entrances = crate::connect::router::Entrances::default();
    for (listener, service, peer) in listeners {
        let addr = listener
            .local_addr()
            .context("reading a listener's address")?;
        entrances
            .locals
            .push((addr, service.as_str().to_owned(), peer));
        let (name, session) = &sessions[peer];
        println!("{addr} -> {service} on {}", session.peer().id);
        info!(%addr, %service, peer = %name, "local listener");
        node.serve_local(session, listener, service);
    }
    let mut router = Router::new(sessions.clone());
    router.status = Some(node.status_source("connect"));
    let rtsp = match rtsp {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .context("reading the --rtsp listener's address")?;
            router.rtsp = Some(addr);
            entrances.rtsp = Some(addr);
            println!("{addr} -> rtsp: rtsp://{addr}/SERVICE.PEER/PATH");
            Some(listener)
        }
        None => None,
    };
    let router = Arc::new(router);
    if let Some(listener) = rtsp {
        node.serve_rtsp(router.clone(), listener);
    }
    if let Some(listener) = http {
        let addr = listener
            .local_addr()
            .context("reading the --http listener's address")?;
        let port = addr.port();
        entrances.http_port = Some(port);
        println!("{addr} -> http: index http://localhost:{port}/, services http://SERVICE.PEER.localhost:{port}/");
        node.serve_http(router.clone(), listener);
    }

    serve_status(&node, &args.common, &rules, "connect").await?;
    node.announce_ready(router.clone(), entrances);
    node.run_until_signal(drain, (sessions, router)).await;
    Ok(())
}

/// Binds the listener of `flag` when it is given.
async fn bind_optional(
    addr: Option<SocketAddr>,
    flag: &str,
) -> Result<Option<tokio::net::TcpListener>, Failure> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for {flag}: {e}; pick another port")
    })?;
    Ok(Some(listener))
}

async fn rendezvous(args: RendezvousArgs) -> Result<(), Failure> {
    let mut rules = load_rules(&args.common)?;
    let identity = load_identity(&args.common, &rules)?;
    let drain = rules.drain_timeout.map_or(DEFAULT_DRAIN, |d| d.0);
    let file = rules.rendezvous_server.take().unwrap_or_default();
    let listen = args
        .listen
        .first()
        .copied()
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 3478)));
    // Flags add to the file's list.
    let more_tcp: Vec<SocketAddr> = args
        .listen
        .iter()
        .skip(1)
        .chain(&file.listen_tcp)
        .copied()
        .collect();
    let config = rendezvous_config(&args, &file)?;
    let relay = config.limits.relay;
    let listed = match &config.admission {
        Admission::Open => None,
        Admission::Listed(ids) => Some(ids.len()),
    };
    let (node, link) = bind_udp_and_tcp(listen, identity, args.common.tuning())?;
    node.serve_rendezvous(config)
        .context("starting the rendezvous server")?;
    let local = node.local_addr().context("reading the bound address")?;
    // TCP on the UDP socket's own address and port (the TCP link), then the others.
    let mut tcp = vec![link];
    for addr in more_tcp {
        tcp.push(bind_tcp(addr)?);
    }
    let tcp_addrs: Vec<String> = tcp
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    node.serve_links(tcp);
    {
        // SIGHUP: the allow list again (the file's `allow`, the allow file, the flags).
        let args = args.clone();
        node.reload_rendezvous_on_sighup(move || {
            let rules = load_rules(&args.common).map_err(|f| format!("{:#}", f.error))?;
            let file = rules.rendezvous_server.unwrap_or_default();
            admission(&args, &file).map_err(|f| format!("{:#}", f.error))
        });
    }
    info!(%local, tcp = %tcp_addrs.join(","), relay, admits = listed.map_or("anyone".to_string(), |n| format!("{n} listed ids")), "rendezvous listening");
    println!("rendezvous listening on {local}");
    println!(
        "peers use: --rendezvous <this-host's-address>:{}",
        local.port()
    );
    serve_status(&node, &args.common, &rules, "rendezvous").await?;
    node.run_until_signal(drain, ()).await;
    Ok(())
}

/// The rendezvous's node on UDP `listen` and its TCP link listener on the same address and
/// port. With port 0 the kernel picks the TCP port first and UDP takes the same number; a
/// number whose UDP side is taken is skipped for another (bounded), so a port some unrelated
/// program holds cannot fail the start. `[::]` on a host without IPv6 is IPv4 only, for
/// both, as [`Node::bind`] does for UDP.
fn bind_udp_and_tcp(
    listen: SocketAddr,
    identity: Arc<Identity>,
    tuning: Tuning,
) -> Result<(Node, tokio::net::TcpListener), Failure> {
    let udp_failure =
        |e: TransportError| anyhow::anyhow!("{e}; choose another port with --listen ADDR").into();
    if listen.port() != 0 {
        let node = Node::bind(listen, identity, tuning).map_err(udp_failure)?;
        // Where UDP went: `[::]` may have become `0.0.0.0`.
        let local = node.local_addr().context("reading the bound address")?;
        return Ok((node, bind_tcp(local)?));
    }
    const ATTEMPTS: usize = 32;
    // A number whose UDP side is taken keeps its TCP listener until the end, so the kernel
    // (which prefers odd numbers for bind) offers another one next time.
    let mut refused = Vec::new();
    for _ in 0..ATTEMPTS {
        let tcp = bind_tcp(listen)?;
        let at = tcp.local_addr().context("reading the bound address")?;
        match Node::bind(at, identity.clone(), tuning.clone()) {
            Ok(node) => return Ok((node, tcp)),
            Err(TransportError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                refused.push(tcp);
            }
            Err(e) => return Err(udp_failure(e)),
        }
    }
    Err(usage(format!(
        "no port of {} was free for both UDP and TCP after {ATTEMPTS} tries; choose one with --listen ADDR:PORT",
        listen.ip()
    )))
}

/// A TCP listener for the TCP link on `addr`; an IPv6 wildcard takes IPv4 too, as the UDP
/// socket does (some hosts default to IPv6 only), and on a host without IPv6 becomes
/// `0.0.0.0`, as the UDP socket does too ([`crate::quic::Transport::bind`]).
fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, Failure> {
    let bound = match bind_tcp_dual_stack(addr) {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && crate::quic::no_ipv6(&e) => {
            bind_tcp_dual_stack(SocketAddr::from((
                std::net::Ipv4Addr::UNSPECIFIED,
                addr.port(),
            )))
        }
        other => other,
    };
    bound.map_err(|e| {
        usage(format!(
            "cannot listen on TCP {addr} (for peers whose network drops UDP): {e}; choose another address with --listen ADDR"
        ))
    })
}

fn bind_tcp_dual_stack(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Who may register: the ids of `--allow`, the file's `allow`, and both allow files; anyone
/// when none is given.
fn admission(args: &RendezvousArgs, file: &RendezvousRules) -> Result<Admission, Failure> {
    let mut ids: HashSet<PeerId> = args.allow.iter().chain(&file.allow).copied().collect();
    let files: Vec<&PathBuf> = args.allow_file.iter().chain(&file.allow_file).collect();
    for path in &files {
        ids.extend(read_allow_file(path).map_err(anyhow::Error::from)?);
    }
    if ids.is_empty() && files.is_empty() {
        return Ok(Admission::Open);
    }
    if ids.is_empty() {
        warn!("the allow file lists no id: no peer can register until it does");
    }
    Ok(Admission::Listed(ids))
}

fn rendezvous_config(
    args: &RendezvousArgs,
    file: &RendezvousRules,
) -> Result<RendezvousConfig, Failure> {
    let d = RendezvousConfig::default();
    let (dl, dr) = (&d.limits, &d.relay);
    let limits = Limits {
        max_peers: args.max_peers.or(file.max_peers).unwrap_or(dl.max_peers),
        max_peers_per_ip: args
            .max_peers_per_ip
            .or(file.max_peers_per_ip)
            .unwrap_or(dl.max_peers_per_ip),
        register_rate: args
            .register_rate
            .or(file.register_rate)
            .unwrap_or(dl.register_rate),
        connect_rate: args
            .connect_rate
            .or(file.connect_rate)
            .unwrap_or(dl.connect_rate),
        relay: !args.no_relay && file.relay.unwrap_or(true),
        max_relays_per_peer: args
            .max_relays_per_peer
            .or(file.max_relays_per_peer)
            .unwrap_or(dl.max_relays_per_peer),
        max_relays_per_ip: args
            .max_relays_per_ip
            .or(file.max_relays_per_ip)
            .unwrap_or(dl.max_relays_per_ip),
        ..dl.clone()
    };
    let relay = RelayLimits {
        idle: args.relay_idle.or(file.relay_idle).map_or(dr.idle, |d| d.0),
        lifetime: args
            .relay_lifetime
            .or(file.relay_lifetime)
            .map_or(dr.lifetime, |d| d.0),
        bytes_per_sec: args.relay_rate.or(file.relay_rate).map(|r| r.0),
    };
    for (what, n) in [
        ("--max-peers", limits.max_peers),
        ("--max-peers-per-ip", limits.max_peers_per_ip),
    ] {
        if n == 0 {
            return Err(usage(format!(
                "{what} 0 would refuse every peer: give at least 1"
            )));
        }
    }
    if relay.idle.is_zero() || relay.lifetime.is_zero() {
        return Err(usage(
            "--relay-idle and --relay-lifetime must be longer than 0 (use --no-relay to turn the relay off)".into(),
        ));
    }
    Ok(RendezvousConfig {
        limits,
        relay,
        admission: admission(args, file)?,
        ..d
    })
}

/// What `connect` runs: the named peers, where each local listener goes (by peer index),
/// the `--http` listener, and the settings every session shares.
struct ConnectPlan {
    peers: Vec<(PeerName, PeerAddr)>,
    bind: SocketAddr,
    locals: Vec<(LocalRule, usize)>,
    http: Option<SocketAddr>,
    rtsp: Option<SocketAddr>,
    session: SessionConfig,
}

fn connect_config(args: &ConnectArgs, file: ConnectRules) -> Result<ConnectPlan, Failure> {
    let mut peers: Vec<(PeerName, PeerAddr)> = Vec::new();
    let single = args.peer.clone().or(file.peer);
    let positional = single.is_some();
    if let Some(peer) = single {
        peers.push(("peer".parse().expect("a valid name"), peer));
    }
    let named = file
        .peers
        .into_iter()
        .chain(args.peers.iter().map(|p| (p.name.clone(), p.peer.clone())));
    for (name, peer) in named {
        if let Some((_, other)) = peers.iter().find(|(n, _)| *n == name) {
            if *other != peer {
                return Err(usage(format!(
                    "peer name {name} is given twice (for {other} and {peer}): give each peer its own name"
                )));
            }
            continue;
        }
        peers.push((name, peer));
    }
    if peers.is_empty() {
        return Err(usage("no peer given: run `tunnel connect PEER_ID@HOST:PORT` (or `PEER_ID --rendezvous HOST:PORT`) as printed by `tunnel expose`, give --peer NAME=PEER_ID, or set peer/peers in [connect]".into()));
    }
    let mut rules = file.local;
    rules.extend(args.locals.iter().cloned());
    let http = args.http.or(file.http);
    let rtsp = args.rtsp.or(file.rtsp);
    if rules.is_empty() && http.is_none() && rtsp.is_none() {
        return Err(usage(
            "no local listener: give --http ADDR (e.g. --http 127.0.0.1:8080), --rtsp ADDR (e.g. --rtsp 127.0.0.1:8554) or --local ADDR=SERVICE (e.g. --local 127.0.0.1:8554=cam)".into(),
        ));
    }
    let mut seen = BTreeMap::new();
    // (Port 0 asks for any free port: it may appear more than once.)
    for rule in rules.iter().filter(|r| r.listen.port() != 0) {
        if let Some(other) = seen.insert(rule.listen, &rule.service) {
            return Err(usage(format!(
                "{} is given twice (for {other} and {}): each local listener needs its own port",
                rule.listen, rule.service
            )));
        }
    }
    let mut shared: BTreeMap<SocketAddr, &str> = BTreeMap::new();
    for (flag, addr) in [("--http", http), ("--rtsp", rtsp)] {
        let Some(addr) = addr.filter(|a| a.port() != 0) else {
            continue;
        };
        let other = seen
            .get(&addr)
            .map(|s| s.to_string())
            .or_else(|| shared.get(&addr).map(|s| s.to_string()));
        if let Some(other) = other {
            return Err(usage(format!(
                "{addr} is given for {flag} and for {other}: each listener needs its own port"
            )));
        }
        shared.insert(addr, flag);
    }
    let mut locals = Vec::new();
    for rule in rules {
        let (service, peer) = local_target(&rule.service, &peers, positional)?;
        locals.push((
            LocalRule {
                listen: rule.listen,
                service,
            },
            peer,
        ));
    }
    let mut session = SessionConfig {
        eager: args.eager || file.eager,
        force_relay: args.force_relay,
        ..SessionConfig::default()
    };
    if let Some(d) = args.idle_grace.or(file.idle_grace) {
        session.idle_grace = d.0;
    }
    if let Some(d) = args.connect_timeout.or(file.connect_timeout) {
        session.connect_timeout = d.0;
    }
    let bind = args
        .bind
        .or(file.bind)
        .unwrap_or_else(|| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)));
    Ok(ConnectPlan {
        peers,
        bind,
        locals,
        http,
        rtsp,
        session,
    })
}

/// The service and peer a `--local` rule names: `SERVICE.PEER` when the last label is a
/// peer's name, else `SERVICE` of the only peer.
fn local_target(
    service: &ServiceName,
    peers: &[(PeerName, PeerAddr)],
    positional: bool,
) -> Result<(ServiceName, usize), Failure> {
    if let Some((name, peer)) = service.as_str().rsplit_once('.') {
        if let Some(p) = peers.iter().position(|(n, _)| n.as_str() == peer) {
            let name = name.parse().map_err(usage)?;
            return Ok((name, p));
        }
    }
    // The single positional peer (named `peer`, listed first) is the short form's.
    match peers {
        [_] => Ok((service.clone(), 0)),
        [(first, _), ..] if positional && first.as_str() == "peer" => Ok((service.clone(), 0)),
        _ => Err(usage(format!(
            "--local ...={service}: which peer? write {service}.PEER with one of: {}",
            peers
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// The control sockets `tunnel status`/`reload` ask: `--control`, else those beside the
/// identity that exist (one per role running with it).
fn control_targets(args: &ControlArgs) -> Result<Vec<PathBuf>, Failure> {
    if let Some(p) = &args.control {
        return Ok(vec![p.clone()]);
    }
    let identity = identity_path(args.identity.as_ref(), &RulesFile::default())?;
    let found: Vec<PathBuf> = ["expose", "connect", "rendezvous"]
        .iter()
        .map(|role| control_path(&identity, role))
        .filter(|p| p.exists())
        .collect();
    if found.is_empty() {
        return Err(Failure {
            code: 1,
            error: anyhow::anyhow!(
                "no tunnel process with the identity {} is running here (no control socket beside it): give --identity or --control PATH",
                identity.display()
            ),
        });
    }
    Ok(found)
}

/// One request to a control socket; its result.
async fn ask(path: &std::path::Path, cmd: ControlCommand) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the control socket {}: {e} (is the process running?)",
            path.display()
        )
    })?;
    stream.write_all(&encode_request(cmd)).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        (&mut stream).take(16 << 20).read_to_end(&mut answer),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{}: no answer within 10 s", path.display()))??;
    let line = answer.strip_suffix(b"\n").unwrap_or(&answer);
    decode_answer(line).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn status(args: StatusArgs) -> Result<(), Failure> {
    let targets = control_targets(&args.control)?;
    loop {
        let mut all = Vec::new();
        for path in &targets {
            all.push(ask(path, ControlCommand::Status).await?);
        }
        if args.json {
            // One object: the process's status, or (several processes) an array of them.
            let out = if all.len() == 1 {
                all.pop().expect("one")
            } else {
                serde_json::Value::Array(all)
            };
            println!("{out}");
        } else {
            if args.watch {
                // Home and clear, as `watch` does.
                print!("\x1b[H\x1b[2J");
            }
            for s in &all {
                print!("{}", render_status(s));
            }
        }
        if !args.watch {
            return Ok(());
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn reload(args: ControlArgs) -> Result<(), Failure> {
    let targets = control_targets(&args)?;
    let mut failed = None;
    for path in &targets {
        match ask(path, ControlCommand::Reload).await {
            Ok(r) => println!(
                "{}: rules reloaded, {} peer(s) disconnected",
                path.display(),
                r["disconnected"]
            ),
            Err(e) => {
                eprintln!("{e:#}");
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) => Err(Failure { code: 1, error: e }),
        None => Ok(()),
    }
}

/// `tunnel status` for a person.
fn render_status(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let c = &s["counters"];
    let _ = writeln!(
        out,
        "{} {}  up {:.0} s",
        s["role"].as_str().unwrap_or("?"),
        s["peer_id"].as_str().unwrap_or("?"),
        s["uptime_s"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "  connections {} (opened {}), streams {} (opened {}), rtsp sessions {}, tasks {}",
        c["connections"],
        c["connections_opened"],
        c["streams"],
        c["streams_opened"],
        c["rtsp_sessions"],
        c["tasks"]
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  peer {} {}  {}",
            p["name"].as_str().unwrap_or("-"),
            p["id"].as_str().unwrap_or("?"),
            match (p["path"].as_str(), p["presence"].as_str()) {
                (Some(path), _) => format!("connected, {path}"),
                (None, Some("unreachable")) =>
                    format!("unreachable: {}", p["last_error"].as_str().unwrap_or("?")),
                (None, Some("seen")) => format!(
                    "not connected, last seen {:.0} s ago",
                    p["last_seen_s"].as_f64().unwrap_or(0.0)
                ),
                _ => "not connected".into(),
            }
        );
    }
    for conn in s["connections"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  connection {}  {} {} (IPv{})  rtt {:.1} ms  cwnd {} KiB  lost {}  sent {:.1} MiB  received {:.1} MiB  streams {}  up {:.0} s",
            conn["peer"].as_str().unwrap_or("?"),
            conn["path"].as_str().unwrap_or("?"),
            conn["remote"].as_str().unwrap_or("?"),
            conn["ip_version"],
            conn["rtt_ms"].as_f64().unwrap_or(0.0),
            conn["cwnd_bytes"].as_u64().unwrap_or(0) / 1024,
            conn["lost_packets"],
            conn["sent_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            conn["received_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            conn["streams"],
            conn["uptime_s"].as_f64().unwrap_or(0.0),
        );
    }
    for svc in s["services"].as_array().into_iter().flatten() {
        let name = match svc["peer"].as_str() {
            Some(peer) => format!("{}.{peer}", svc["service"].as_str().unwrap_or("?")),
            None => svc["service"].as_str().unwrap_or("?").to_owned(),
        };
        let open = &svc["open_seconds"];
        let _ = writeln!(
            out,
            "  service {name}  open {}  done {}  failed {}{}  up {:.1} MiB  down {:.1} MiB{}",
            svc["open"],
            svc["done"],
            svc["failed"],
            match svc["requests"].as_u64() {
                Some(n) if n > 0 => format!("  requests {n}"),
                _ => String::new(),
            },
            svc["bytes_up"].as_f64().unwrap_or(0.0) / 1048576.0,
            svc["bytes_down"].as_f64().unwrap_or(0.0) / 1048576.0,
            match open["p50_le"].as_f64() {
                Some(p50) => format!(
                    "  open p50 <= {} ms, p99 <= {} ms",
                    p50 * 1000.0,
                    open["p99_le"].as_f64().unwrap_or(p50) * 1000.0
                ),
                None => String::new(),
            }
        );
    }
    for r in s["rtsp"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  rtsp {} ({} side)  sessions {}  flows {}  datagrams sent {} delivered {}  repaired {}  resent {}  requested {}  rebuilt {}  up {:.0} s",
            r["service"].as_str().unwrap_or("?"),
            r["facing"].as_str().unwrap_or("?"),
            r["sessions"],
            r["flows"],
            r["datagrams_sent"],
            r["delivered"],
            r["rtp_repaired"],
            r["rtp_resent"],
            r["rtp_requested"],
            r["rtp_rebuilt"],
            r["uptime_s"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(rz) = s.get("rendezvous") {
        let refused: Vec<String> = rz["refused"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64() != Some(0))
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  rendezvous: {} registered, {} relays, refused: {}",
            rz["registered"],
            rz["relays"],
            if refused.is_empty() {
                "none".into()
            } else {
                refused.join(", ")
            }
        );
    }
    out
}
