//! The rendezvous's decisions, pure: who may register, which introductions happen (only those
//! the target accepts), when a request is answered "unavailable", and which relay
//! allocations fit the quotas. Events and `now` in, actions and the next deadline out; the
//! driver (`super`) owns the connections, the sockets and the clock.
//!
//! Consent: a request from A for B is held as a *wish*. B is asked (now if it is online,
//! else when it registers); only if B accepts are the two introduced. Every request that has
//! not led to an introduction `answer_delay` after it came is answered `Unavailable`: for an
//! offline peer, an id nobody holds, a peer that refuses and a peer that has not answered
//! yet, the same message after the same time. A stranger learns nothing, not even presence.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::identity::PeerId;
use crate::protocol::rendezvous::ServerMsg;

use super::limits::{Counts, PerAddress, Rate, Verdict};

/// The limits the broker keeps.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Registered peers at once.
    pub max_peers: usize,
    /// Registered peers at once from one source address.
    pub max_peers_per_ip: usize,
    /// Registrations per source address.
    pub register_rate: Rate,
    /// Introduction requests per source address.
    pub connect_rate: Rate,
    /// Open requests (wishes) one peer may hold.
    pub max_wishes_per_peer: usize,
    /// Allocate relays when peers ask.
    pub relay: bool,
    /// Relay allocations one identity may hold at once.
    pub max_relays_per_peer: usize,
    /// Relay allocations the peers at one source address may hold at once.
    pub max_relays_per_ip: usize,
    /// When a request that led to no introduction is answered `Unavailable`.
    pub answer_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_peers: 10_000,
            max_peers_per_ip: 64,
            register_rate: Rate::per_minute(60),
            connect_rate: Rate::per_minute(600),
            max_wishes_per_peer: 64,
            relay: true,
            max_relays_per_peer: 8,
            max_relays_per_ip: 32,
            answer_delay: Duration::from_secs(2),
        }
    }
}

/// Who may register.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Admission {
    /// Anyone (the default).
    #[default]
    Open,
    /// Only these ids (`--allow`, `--allow-file`).
    Listed(HashSet<PeerId>),
}

impl Admission {
    fn admits(&self, peer: &PeerId) -> bool {
        match self {
            Admission::Open => true,
            Admission::Listed(ids) => ids.contains(peer),
        }
    }
}

/// Why the rendezvous said no. Each is counted, and logged once (a flood once per episode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Registration: the id is not on the allow list.
    NotListed,
    /// Registration: the rendezvous holds `max_peers`.
    Full,
    /// Registration: the source address holds `max_peers_per_ip`.
    AddressFull,
    /// Registration over the address's rate.
    RegisterRate,
    /// Introduction request over the address's rate.
    ConnectRate,
    /// Introduction request over the peer's open requests.
    TooManyWishes,
    /// The target did not accept the requester.
    NotAccepted,
    /// Relay: an identity of the pair holds `max_relays_per_peer`.
    RelayPeerQuota,
    /// Relay: an address of the pair holds `max_relays_per_ip`.
    RelayAddressQuota,
    /// Relay: the rendezvous runs with `--no-relay`.
    RelayOff,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::NotListed,
        Refusal::Full,
        Refusal::AddressFull,
        Refusal::RegisterRate,
        Refusal::ConnectRate,
        Refusal::TooManyWishes,
        Refusal::NotAccepted,
        Refusal::RelayPeerQuota,
        Refusal::RelayAddressQuota,
        Refusal::RelayOff,
    ];

    /// A short name, for logs and counters.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NotListed => "not_listed",
            Refusal::Full => "full",
            Refusal::AddressFull => "address_full",
            Refusal::RegisterRate => "register_rate",
            Refusal::ConnectRate => "connect_rate",
            Refusal::TooManyWishes => "too_many_requests",
            Refusal::NotAccepted => "not_accepted",
            Refusal::RelayPeerQuota => "relay_peer_quota",
            Refusal::RelayAddressQuota => "relay_address_quota",
            Refusal::RelayOff => "relay_off",
        }
    }
}

/// The quota a relay allocation holds, given back with [`Broker::release_relay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTicket {
    pub peers: [PeerId; 2],
    /// The pair's source addresses, once each.
    ips: Vec<IpAddr>,
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `msg` to `to`'s control stream.
    Send { to: PeerId, msg: ServerMsg },
    /// Introduce `asker` and `target` to each other (each gets the other's candidates), with
    /// a relay allocation when `relay` holds its quota.
    Introduce {
        asker: PeerId,
        target: PeerId,
        relay: Option<RelayTicket>,
    },
    /// A refusal, counted; `log` for the one line it is worth.
    Refused {
        refusal: Refusal,
        peer: PeerId,
        ip: IpAddr,
        log: bool,
    },
    /// Close `peer`'s registration: it is no longer admitted.
    Disconnect { peer: PeerId },
}

/// An open request for an introduction.
struct Wish {
    /// The asker wants a relay too.
    relay: bool,
    /// When the target was last asked (`None`: it was offline).
    asked: Option<Instant>,
}

struct Registration {
    conn: usize,
    ip: IpAddr,
}

/// The rendezvous's state of registrations, open requests and quotas.
pub struct Broker {
    limits: Limits,
    admission: Admission,
    peers: HashMap<PeerId, Registration>,
    per_ip: Counts<IpAddr>,
    register_rate: PerAddress,
    connect_rate: PerAddress,
    /// Target → asker → its request.
    wishes: HashMap<PeerId, HashMap<PeerId, Wish>>,
    /// Asker → its targets (to drop its wishes when it leaves, and to cap them).
    wished: HashMap<PeerId, HashSet<PeerId>>,
    /// Requests to answer `Unavailable` unless introduced by then, in deadline order (the
    /// delay is one constant, so arrival order is deadline order).
    due: VecDeque<(Instant, PeerId, PeerId)>,
    /// The (asker, target) pairs in `due` not yet introduced.
    unanswered: HashSet<(PeerId, PeerId)>,
    /// Askers refused for too many wishes since their last accepted one (logged once).
    over_wishes: HashSet<PeerId>,
    relays_of: Counts<PeerId>,
    relays_at: Counts<IpAddr>,
    live_relays: usize,
    refused: HashMap<Refusal, u64>,
}

impl Broker {
    pub fn new(limits: Limits, admission: Admission) -> Self {
        Broker {
            register_rate: PerAddress::new(limits.register_rate),
            connect_rate: PerAddress::new(limits.connect_rate),
            limits,
            admission,
            peers: HashMap::new(),
            per_ip: Counts::default(),
            wishes: HashMap::new(),
            wished: HashMap::new(),
            due: VecDeque::new(),
            unanswered: HashSet::new(),
            over_wishes: HashSet::new(),
            relays_of: Counts::default(),
            relays_at: Counts::default(),
            live_relays: 0,
            refused: HashMap::new(),
        }
    }

    pub fn registered(&self) -> usize {
        self.peers.len()
    }

    pub fn is_registered(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .map(|r| (r, self.refused.get(&r).copied().unwrap_or(0)))
    }

    /// Open requests held now (for tests and counters).
    pub fn wishes(&self) -> usize {
        self.wished.values().map(HashSet::len).sum()
    }

    fn refuse(&mut self, refusal: Refusal, peer: PeerId, ip: IpAddr, log: bool) -> Action {
        *self.refused.entry(refusal).or_default() += 1;
        Action::Refused {
            refusal,
            peer,
            ip,
            log,
        }
    }

    /// `peer` registers on connection `conn` from `ip`. `Err` carries the refusal (the driver
    /// tells the peer and closes); `Ok` the actions (asks for its open wishes).
    pub fn register(
        &mut self,
        peer: PeerId,
        conn: usize,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Vec<Action>, (Refusal, Action)> {
        if let Some(reg) = self.peers.get(&peer) {
            if reg.conn == conn {
                // New local addresses on the same connection: nothing to decide.
                return Ok(Vec::new());
            }
        }
        let refusal = if !self.admission.admits(&peer) {
            Some((Refusal::NotListed, true))
        } else if let Verdict::Refused { first } = self.register_rate.check(ip, now) {
            Some((Refusal::RegisterRate, first))
        } else if !self.peers.contains_key(&peer) && self.peers.len() >= self.limits.max_peers {
            Some((Refusal::Full, true))
        } else if self.peers.get(&peer).map(|r| r.ip) != Some(ip)
            && self.per_ip.get(&ip) >= self.limits.max_peers_per_ip
        {
            Some((Refusal::AddressFull, true))
        } else {
            None
        };
        if let Some((refusal, log)) = refusal {
            return Err((refusal, self.refuse(refusal, peer, ip, log)));
        }
        // A peer that registers again (a new connection after a network change) replaces
        // its old registration.
        if let Some(old) = self.peers.insert(peer, Registration { conn, ip }) {
            self.per_ip.remove(&old.ip);
        }
        self.per_ip.add(ip);
        // Everyone who asked for it while it was away is asked about now.
        let mut asks = Vec::new();
        for (asker, wish) in self.wishes.get_mut(&peer).into_iter().flatten() {
            wish.asked = Some(now);
            asks.push(Action::Send {
                to: peer,
                msg: ServerMsg::Ask { peer: *asker },
            });
        }
        asks.sort_by_key(|a| match a {
            Action::Send {
                msg: ServerMsg::Ask { peer },
                ..
            } => *peer,
            _ => unreachable!(),
        });
        Ok(asks)
    }

    /// `peer`'s connection `conn` ended. Its own requests go; requests for it stay (it is
    /// asked about them when it comes back).
    pub fn unregister(&mut self, peer: PeerId, conn: usize) {
        if self.peers.get(&peer).is_none_or(|r| r.conn != conn) {
            return;
        }
        let reg = self.peers.remove(&peer).expect("checked");
        self.per_ip.remove(&reg.ip);
        for target in self.wished.remove(&peer).into_iter().flatten() {
            if let Some(w) = self.wishes.get_mut(&target) {
                w.remove(&peer);
                if w.is_empty() {
                    self.wishes.remove(&target);
                }
            }
        }
        self.unanswered.retain(|(asker, _)| *asker != peer);
        self.over_wishes.remove(&peer);
    }

    /// `asker` (registered, at `ip`) asks to be introduced to `target`.
    pub fn connect(
        &mut self,
        asker: PeerId,
        target: PeerId,
        relay: bool,
        ip: IpAddr,
        now: Instant,
    ) -> Vec<Action> {
        let error = |message: &str| Action::Send {
            to: asker,
            msg: ServerMsg::Error {
                message: message.into(),
            },
        };
        if !self.peers.contains_key(&asker) {
            return vec![error("register first")];
        }
        if asker == target {
            return vec![error("cannot connect to yourself")];
        }
        if let Verdict::Refused { first } = self.connect_rate.check(ip, now) {
            return vec![
                self.refuse(Refusal::ConnectRate, asker, ip, first),
                error("too many introduction requests from your address: slow down"),
            ];
        }
        let mut out = Vec::new();
        if self.unanswered.insert((asker, target)) {
            self.due
                .push_back((now + self.limits.answer_delay, asker, target));
        }
        let online = self.peers.contains_key(&target);
        let delay = self.limits.answer_delay;
        if let Some(wish) = self.wishes.get_mut(&target).and_then(|w| w.get_mut(&asker)) {
            // Asked already and not answered: the target is asked again only once the last
            // ask is as old as an answer may take (it may have been lost), not per request.
            wish.relay |= relay;
            if online
                && wish
                    .asked
                    .is_none_or(|at| now.saturating_duration_since(at) >= delay)
            {
                wish.asked = Some(now);
                out.push(Action::Send {
                    to: target,
                    msg: ServerMsg::Ask { peer: asker },
                });
            }
            return out;
        }
        let mine = self.wished.entry(asker).or_default();
        if mine.len() >= self.limits.max_wishes_per_peer {
            let first = self.over_wishes.insert(asker);
            out.push(self.refuse(Refusal::TooManyWishes, asker, ip, first));
            return out;
        }
        self.over_wishes.remove(&asker);
        mine.insert(target);
        let wish = Wish {
            relay,
            asked: online.then_some(now),
        };
        self.wishes.entry(target).or_default().insert(asker, wish);
        if online {
            out.push(Action::Send {
                to: target,
                msg: ServerMsg::Ask { peer: asker },
            });
        }
        out
    }

    /// `target` answers whether `asker` may be introduced to it.
    pub fn answer(&mut self, target: PeerId, asker: PeerId, accept: bool) -> Vec<Action> {
        let Some(Wish { relay, .. }) = self.wishes.get_mut(&target).and_then(|w| w.remove(&asker))
        else {
            // Nobody asked (or the asker left): nothing to do.
            return Vec::new();
        };
        if self.wishes.get(&target).is_some_and(HashMap::is_empty) {
            self.wishes.remove(&target);
        }
        if let Some(mine) = self.wished.get_mut(&asker) {
            mine.remove(&target);
            if mine.is_empty() {
                self.wished.remove(&asker);
            }
        }
        let (Some(a), Some(b)) = (self.peers.get(&asker), self.peers.get(&target)) else {
            return Vec::new();
        };
        let ips = [a.ip, b.ip];
        if !accept {
            // Counted but not logged here: the target logs whom it refused, and the
            // requester is answered as for anyone else, when its request is due.
            return vec![self.refuse(Refusal::NotAccepted, asker, ips[0], false)];
        }
        self.unanswered.remove(&(asker, target));
        let mut out = Vec::new();
        let ticket = if !relay {
            None
        } else {
            match self.relay_quota([asker, target], ips) {
                Ok(ticket) => Some(ticket),
                Err((refusal, ip)) => {
                    out.push(self.refuse(refusal, asker, ip, true));
                    None
                }
            }
        };
        out.push(Action::Introduce {
            asker,
            target,
            relay: ticket,
        });
        out
    }

    fn relay_quota(
        &mut self,
        peers: [PeerId; 2],
        ips: [IpAddr; 2],
    ) -> Result<RelayTicket, (Refusal, IpAddr)> {
        if !self.limits.relay {
            return Err((Refusal::RelayOff, ips[0]));
        }
        for (peer, ip) in peers.iter().zip(ips) {
            if self.relays_of.get(peer) >= self.limits.max_relays_per_peer {
                return Err((Refusal::RelayPeerQuota, ip));
            }
        }
        let mut distinct = vec![ips[0]];
        if ips[1] != ips[0] {
            distinct.push(ips[1]);
        }
        for ip in &distinct {
            if self.relays_at.get(ip) >= self.limits.max_relays_per_ip {
                return Err((Refusal::RelayAddressQuota, *ip));
            }
        }
        for peer in peers {
            self.relays_of.add(peer);
        }
        for ip in &distinct {
            self.relays_at.add(*ip);
        }
        self.live_relays += 1;
        Ok(RelayTicket {
            peers,
            ips: distinct,
        })
    }

    /// A relay allocation ended (or could not be made): its quota is free again.
    pub fn release_relay(&mut self, ticket: &RelayTicket) {
        for peer in &ticket.peers {
            self.relays_of.remove(peer);
        }
        for ip in &ticket.ips {
            self.relays_at.remove(ip);
        }
        self.live_relays -= 1;
    }

    /// Relay allocations held now.
    pub fn relays_held(&self) -> usize {
        self.live_relays
    }

    /// New admission rules: registered peers no longer admitted are to be disconnected.
    pub fn set_admission(&mut self, admission: Admission) -> Vec<Action> {
        self.admission = admission;
        let mut out: Vec<Action> = self
            .peers
            .keys()
            .filter(|p| !self.admission.admits(p))
            .map(|peer| Action::Disconnect { peer: *peer })
            .collect();
        out.sort_by_key(|a| match a {
            Action::Disconnect { peer } => *peer,
            _ => unreachable!(),
        });
        out
    }

    /// Answers every request due by `now` that led to no introduction.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(&(at, asker, target)) = self.due.front() {
            if at > now {
                break;
            }
            self.due.pop_front();
            if self.unanswered.remove(&(asker, target)) && self.peers.contains_key(&asker) {
                out.push(Action::Send {
                    to: asker,
                    msg: ServerMsg::Unavailable { peer: target },
                });
            }
        }
        out
    }

    /// When [`poll`](Self::poll) has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.due.front().map(|(at, _, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_spki(&[n; 32])
    }

    fn ip(n: u8) -> IpAddr {
        [203, 0, 113, n].into()
    }

    const DELAY: Duration = Duration::from_secs(2);

    fn broker() -> Broker {
        let limits = Limits {
            answer_delay: DELAY,
            ..Limits::default()
        };
        Broker::new(limits, Admission::Open)
    }

    fn ask(asker: PeerId) -> ServerMsg {
        ServerMsg::Ask { peer: asker }
    }

    fn sent(actions: &[Action]) -> Vec<(PeerId, ServerMsg)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, msg } => Some((*to, msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn introduced(actions: &[Action]) -> Option<(PeerId, PeerId, bool)> {
        actions.iter().find_map(|a| match a {
            Action::Introduce {
                asker,
                target,
                relay,
            } => Some((*asker, *target, relay.is_some())),
            _ => None,
        })
    }

    /// What a requester sees of `target`, for each of the four cases a stranger must not
    /// tell apart: the messages it gets, and when.
    fn what_the_asker_sees(case: &str) -> Vec<(Duration, ServerMsg)> {
        let t0 = Instant::now();
        let mut b = broker();
        let (asker, target) = (id(1), id(2));
        b.register(asker, 1, ip(1), t0).unwrap();
        match case {
            "offline" | "unknown" => {}
            "refusing" | "silent" => {
                b.register(target, 2, ip(2), t0).unwrap();
            }
            _ => unreachable!(),
        }
        let mut seen = Vec::new();
        let mut record = |at: Instant, actions: Vec<Action>| {
            for (to, msg) in sent(&actions) {
                if to == asker {
                    seen.push((at - t0, msg));
                }
            }
            assert_eq!(introduced(&actions), None);
        };
        let unknown = if case == "unknown" { id(9) } else { target };
        let actions = b.connect(asker, unknown, true, ip(1), t0);
        // The target, when online, is asked; that is not the asker's to see.
        record(t0, actions);
        if case == "refusing" {
            let t = t0 + Duration::from_millis(30);
            record(t, b.answer(target, asker, false));
        }
        let mut t = t0;
        while let Some(next) = b.next_deadline() {
            t = next;
            record(t, b.poll(t));
        }
        assert_eq!(t - t0, DELAY);
        seen.into_iter()
            .map(|(at, msg)| match msg {
                ServerMsg::Unavailable { .. } => (at, ServerMsg::Unavailable { peer: target }),
                other => (at, other),
            })
            .collect()
    }

    #[test]
    fn offline_unknown_refusing_and_silent_peers_look_the_same() {
        let offline = what_the_asker_sees("offline");
        assert_eq!(
            offline,
            vec![(DELAY, ServerMsg::Unavailable { peer: id(2) })]
        );
        for case in ["unknown", "refusing", "silent"] {
            assert_eq!(what_the_asker_sees(case), offline, "{case}");
        }
    }

    #[test]
    fn the_target_is_asked_and_its_acceptance_introduces_both_at_once() {
        let t0 = Instant::now();
        let mut b = broker();
        let (a, t) = (id(1), id(2));
        b.register(a, 1, ip(1), t0).unwrap();
        b.register(t, 2, ip(2), t0).unwrap();
        let actions = b.connect(a, t, true, ip(1), t0);
        assert_eq!(sent(&actions), vec![(t, ask(a))]);
        assert_eq!(introduced(&actions), None, "nothing before consent");
        // Asking again while the target has not answered does not ask it twice...
        assert!(sent(&b.connect(a, t, false, ip(1), t0)).is_empty());
        // ...until the last ask is as old as an answer may take (it may have been lost).
        let later = t0 + DELAY;
        assert_eq!(
            sent(&b.connect(a, t, false, ip(1), later)),
            vec![(t, ask(a))]
        );
        let actions = b.answer(t, a, true);
        assert_eq!(introduced(&actions), Some((a, t, true)), "relay kept");
        // Introduced: no `Unavailable` later.
        assert!(b.poll(t0 + DELAY).is_empty());
        assert_eq!(b.wishes(), 0);
        // An answer nobody asked for does nothing.
        assert!(b.answer(t, id(7), true).is_empty());
    }

    #[test]
    fn a_request_for_an_offline_peer_is_asked_when_it_comes_online() {
        let t0 = Instant::now();
        let mut b = broker();
        let (a, t) = (id(1), id(2));
        b.register(a, 1, ip(1), t0).unwrap();
        assert!(sent(&b.connect(a, t, false, ip(1), t0)).is_empty());
        assert_eq!(
            sent(&b.poll(t0 + DELAY)),
            vec![(a, ServerMsg::Unavailable { peer: t })]
        );
        let later = t0 + Duration::from_secs(60);
        let actions = b.register(t, 2, ip(2), later).unwrap();
        assert_eq!(sent(&actions), vec![(t, ask(a))]);
        assert_eq!(introduced(&b.answer(t, a, true)), Some((a, t, false)));
    }

    #[test]
    fn a_requester_that_leaves_takes_its_requests_with_it() {
        let t0 = Instant::now();
        let mut b = broker();
        let (a, t) = (id(1), id(2));
        b.register(a, 1, ip(1), t0).unwrap();
        b.connect(a, t, false, ip(1), t0);
        b.unregister(a, 1);
        assert_eq!(b.wishes(), 0);
        assert!(b.poll(t0 + DELAY).is_empty(), "nobody to answer");
        let actions = b.register(t, 2, ip(2), t0).unwrap();
        assert!(actions.is_empty(), "nobody asks for it any more");
        // An old connection's end does not unregister a newer one.
        b.register(a, 3, ip(1), t0).unwrap();
        b.unregister(a, 1);
        assert!(b.is_registered(&a));
    }

    #[test]
    fn admission_by_list_and_its_reload() {
        let t0 = Instant::now();
        let (a, c) = (id(1), id(3));
        let mut b = Broker::new(
            Limits::default(),
            Admission::Listed([a, c].into_iter().collect()),
        );
        b.register(a, 1, ip(1), t0).unwrap();
        b.register(c, 3, ip(3), t0).unwrap();
        let (refusal, _) = b.register(id(2), 2, ip(2), t0).unwrap_err();
        assert_eq!(refusal, Refusal::NotListed);
        let actions = b.set_admission(Admission::Listed([a].into_iter().collect()));
        assert_eq!(actions, vec![Action::Disconnect { peer: c }]);
        assert!(b.set_admission(Admission::Open).is_empty());
    }

    #[test]
    fn registrations_are_capped_per_address_and_in_all() {
        let t0 = Instant::now();
        let limits = Limits {
            max_peers: 5,
            max_peers_per_ip: 2,
            ..Limits::default()
        };
        let mut b = Broker::new(limits, Admission::Open);
        b.register(id(1), 1, ip(1), t0).unwrap();
        b.register(id(2), 2, ip(1), t0).unwrap();
        let (r, _) = b.register(id(3), 3, ip(1), t0).unwrap_err();
        assert_eq!(r, Refusal::AddressFull);
        // The same peer again from its own address is a re-registration, not one more.
        b.register(id(2), 4, ip(1), t0).unwrap();
        for n in 4..7 {
            b.register(id(n), n as usize + 10, ip(n), t0).unwrap();
        }
        let (r, _) = b.register(id(9), 99, ip(9), t0).unwrap_err();
        assert_eq!(r, Refusal::Full);
        // Leaving frees the address's slot.
        b.unregister(id(1), 1);
        b.register(id(3), 3, ip(1), t0).unwrap();
        let counted: u64 = b.refusals().map(|(_, n)| n).sum();
        assert_eq!(counted, 2);
    }

    #[test]
    fn registration_and_requests_are_rate_limited_per_address() {
        let t0 = Instant::now();
        let limits = Limits {
            register_rate: Rate::per_minute(3),
            connect_rate: Rate::per_minute(2),
            ..Limits::default()
        };
        let mut b = Broker::new(limits, Admission::Open);
        for n in 1..=3 {
            b.register(id(n), n as usize, ip(1), t0).unwrap();
        }
        let (r, action) = b.register(id(4), 4, ip(1), t0).unwrap_err();
        assert_eq!(r, Refusal::RegisterRate);
        assert!(matches!(action, Action::Refused { log: true, .. }));
        let (_, action) = b.register(id(5), 5, ip(1), t0).unwrap_err();
        assert!(
            matches!(action, Action::Refused { log: false, .. }),
            "a flood is logged once"
        );
        // Another address is not held back by this one's flood.
        b.register(id(6), 6, ip(2), t0).unwrap();
        b.connect(id(1), id(6), false, ip(1), t0);
        b.connect(id(2), id(6), false, ip(1), t0);
        let actions = b.connect(id(3), id(6), false, ip(1), t0);
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Refused {
                refusal: Refusal::ConnectRate,
                ..
            }
        )));
        assert!(sent(&actions)
            .iter()
            .any(|(to, m)| *to == id(3) && matches!(m, ServerMsg::Error { .. })));
    }

    #[test]
    fn open_requests_per_peer_are_capped() {
        let t0 = Instant::now();
        let limits = Limits {
            max_wishes_per_peer: 2,
            ..Limits::default()
        };
        let mut b = Broker::new(limits, Admission::Open);
        b.register(id(1), 1, ip(1), t0).unwrap();
        b.connect(id(1), id(10), false, ip(1), t0);
        b.connect(id(1), id(11), false, ip(1), t0);
        let actions = b.connect(id(1), id(12), false, ip(1), t0);
        assert!(matches!(
            actions[..],
            [Action::Refused {
                refusal: Refusal::TooManyWishes,
                log: true,
                ..
            }]
        ));
        assert_eq!(b.wishes(), 2);
        // Still answered like any other request: the same message, at the same time.
        let answers = sent(&b.poll(t0 + DELAY));
        assert_eq!(answers.len(), 3);
    }

    #[test]
    fn relay_quotas_hold_per_identity_and_per_address_and_come_back() {
        let t0 = Instant::now();
        let limits = Limits {
            max_relays_per_peer: 2,
            max_relays_per_ip: 3,
            ..Limits::default()
        };
        let mut b = Broker::new(limits, Admission::Open);
        // One target at ip 9; askers 1..=4 share ip 1, asker 5 is at ip 5.
        let target = id(9);
        b.register(target, 9, ip(9), t0).unwrap();
        for n in 1..=5 {
            let at = if n == 5 { ip(5) } else { ip(1) };
            b.register(id(n), n as usize, at, t0).unwrap();
        }
        let relay_for = |b: &mut Broker, n: u8| {
            let at = if n == 5 { ip(5) } else { ip(1) };
            b.connect(id(n), target, true, at, t0);
            let actions = b.answer(target, id(n), true);
            let ticket = actions.iter().find_map(|a| match a {
                Action::Introduce { relay, .. } => relay.clone(),
                _ => None,
            });
            let refusal = actions.iter().find_map(|a| match a {
                Action::Refused { refusal, .. } => Some(*refusal),
                _ => None,
            });
            (ticket, refusal)
        };
        let (first, _) = relay_for(&mut b, 1);
        let first = first.expect("a relay");
        assert!(relay_for(&mut b, 2).0.is_some());
        // The target holds 2: its identity quota is full, whoever asks.
        assert_eq!(relay_for(&mut b, 3), (None, Some(Refusal::RelayPeerQuota)));
        b.release_relay(&first);
        assert!(relay_for(&mut b, 3).0.is_some());
        assert_eq!(b.relays_held(), 2);
        let limits = Limits {
            max_relays_per_peer: 100,
            max_relays_per_ip: 2,
            ..Limits::default()
        };
        let mut b = Broker::new(limits, Admission::Open);
        b.register(target, 9, ip(9), t0).unwrap();
        for n in 1..=5 {
            let at = if n == 5 { ip(5) } else { ip(1) };
            b.register(id(n), n as usize, at, t0).unwrap();
        }
        assert!(relay_for(&mut b, 1).0.is_some());
        assert!(relay_for(&mut b, 2).0.is_some());
        assert_eq!(
            relay_for(&mut b, 3),
            (None, Some(Refusal::RelayAddressQuota)),
            "the address's quota, not the identity's"
        );
    }
}
