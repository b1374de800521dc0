//! Punching and the direct-or-relay dial after an introduction, shared by both roles: the
//! exposing side punches back toward a peer it allows; the connecting side punches and races
//! QUIC handshakes to every candidate against a late relay one. The schedules are pure
//! (`nat::punch`); this is their driver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::debug;

use crate::nat::client::Introduction;
use crate::nat::punch::{PathChoice, PunchSchedule};
use crate::protocol::rendezvous::{relay_bind_packet, PUNCH};
use crate::quic::path::Path;
use crate::quic::{DialError, Transport};
use crate::time::{now, sleep_until_opt};

/// Why no connection came of an introduction.
#[derive(Debug, thiserror::Error)]
pub enum DialFailure {
    #[error("the rendezvous granted no relay: it runs with --no-relay, or a relay quota of this pair is used up (its log and `tunnel status` say which)")]
    NoRelay,
    #[error("no candidate answered")]
    NoAnswer,
    /// The last attempt's error.
    #[error(transparent)]
    Attempt(DialError),
}

/// When the handshake attempts to each direct candidate start, after the common start time:
/// the first just after this side's first punch, the second in case that one was lost.
const DIRECT_ATTEMPTS: [Duration; 2] = [Duration::from_millis(20), Duration::from_millis(220)];

/// How much later IPv4 candidates are tried than IPv6 ones when both sides have IPv6 (as
/// Happy Eyeballs, RFC 8305, does): IPv6 has no NAT mapping to wear out or to share, so it
/// wins when it works, and IPv4 costs this much more only when it does not.
const IPV4_AFTER_IPV6: Duration = Duration::from_millis(50);

/// When a handshake to `candidate` starts, after the attempt's base delay. Pure.
pub fn attempt_delay(base: Duration, candidate: SocketAddr, ipv6_usable: bool) -> Duration {
    if candidate.is_ipv4() && ipv6_usable {
        base + IPV4_AFTER_IPV6
    } else {
        base
    }
}

/// Sends the punch packets (and relay binds) of an introduction on its schedule.
/// Bounded: about 3 s and 30 rounds.
pub async fn punch(transport: Transport, intro: Arc<Introduction>) {
    let mut schedule = PunchSchedule::new(now() + intro.start_in);
    while let Some(deadline) = schedule.next_deadline() {
        sleep_until_opt(Some(deadline)).await;
        let bind = schedule.with_relay_bind();
        if !schedule.poll(now()) {
            continue;
        }
        for c in &intro.candidates {
            transport.send_raw(*c, PUNCH);
        }
        if let (true, Some((relay, token))) = (bind, &intro.relay) {
            transport.send_raw(*relay, &relay_bind_packet(token));
        }
    }
}

/// Dials `peer` after an introduction: QUIC handshakes to every candidate at once while the
/// punches go out, and, if none succeeds by `direct_deadline`, through the relay as well.
/// The first handshake to complete wins; the others are dropped. When the relay's wins, the
/// path layer (`multipath`) goes on probing the candidates on the same connection, and
/// moves it when one answers.
///
/// With `direct` false (diagnosis: `--force-relay`), only the relay is tried.
pub async fn dial_introduced(
    transport: Transport,
    intro: Introduction,
    direct_deadline: Duration,
    direct: bool,
) -> Result<(quinn::Connection, Path), DialFailure> {
    if !direct && intro.relay.is_none() {
        return Err(DialFailure::NoRelay);
    }
    let intro = Arc::new(intro);
    let mut tasks = JoinSet::new();
    tasks.spawn({
        let (t, i) = (transport.clone(), intro.clone());
        async move {
            punch(t, i).await;
            None
        }
    });
    tokio::time::sleep(intro.start_in).await;
    let attempt = |path: Path| {
        let transport = transport.clone();
        let peer = intro.peer;
        async move {
            let result = transport.connect(path.addr(), peer).await;
            Some((path, result))
        }
    };
    if direct {
        // Staggered handshakes per candidate: an Initial that reaches the peer's NAT before
        // the peer's punch opened it is lost, and quinn would resend it only after ~300 ms;
        // a second attempt 200 ms later is cheaper than waiting (the loser is dropped).
        // IPv6 is usable when our socket is dual-stack and the peer has an IPv6 candidate.
        let ipv6_usable = transport.local_addr().is_ok_and(|a| a.is_ipv6())
            && intro.candidates.iter().any(|c| c.is_ipv6());
        for base in DIRECT_ATTEMPTS {
            for c in &intro.candidates {
                let delay = attempt_delay(base, *c, ipv6_usable);
                let a = attempt(Path::Direct(*c));
                tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    a.await
                });
            }
        }
    }
    // On a network that drops UDP (our rendezvous traffic is on the TCP link) no direct
    // handshake can complete: the relay starts at once (the path layer keeps probing).
    let deadline = if direct && !transport.paths().links().via_tcp() {
        direct_deadline
    } else {
        Duration::ZERO
    };
    let mut choice = PathChoice::new(now(), deadline);
    let mut last_error = DialFailure::NoAnswer;
    loop {
        let relay_at = choice.relay_deadline().filter(|_| intro.relay.is_some());
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(Some((path, Ok(conn))))) => return Ok((conn, path)),
                Some(Ok(Some((path, Err(e))))) => {
                    debug!(path = path.kind(), addr = %path.addr(), "attempt failed: {e}");
                    last_error = DialFailure::Attempt(e);
                }
                Some(Ok(None)) | Some(Err(_)) => {}
                None => return Err(last_error),
            },
            () = sleep_until_opt(relay_at) => {
                if choice.start_relay(now(), true) {
                    if let Some((relay, _)) = intro.relay {
                        debug!(%relay, "no direct path yet: trying the relay too");
                        tasks.spawn(attempt(Path::Relay(relay)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_waits_for_ipv6_only_when_ipv6_is_usable() {
        let base = Duration::from_millis(20);
        let v4: SocketAddr = "198.51.100.10:4433".parse().unwrap();
        let v6: SocketAddr = "[2001:db8:1::2]:4433".parse().unwrap();
        assert_eq!(attempt_delay(base, v6, true), base);
        assert_eq!(attempt_delay(base, v4, true), base + IPV4_AFTER_IPV6);
        assert_eq!(attempt_delay(base, v4, false), base);
    }
}
