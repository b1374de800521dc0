//! Which service of which peer a request is for, from its `Host` (pure).
//!
//! `--http ADDR` serves `http://SERVICE.PEER.localhost:PORT/`, and `SERVICE.localhost` while
//! one peer alone has a service of that name; `localhost` itself (or a loopback address) is
//! the index. Browsers resolve `*.localhost` to loopback on their own (RFC 6761) and lower-case
//! host names, so names are matched without regard to case. Any other name is refused: a
//! page of another site whose name an attacker points at 127.0.0.1 (DNS rebinding) must not
//! reach a device.

use crate::protocol::catalog::{Catalog, Kind};

/// What a `Host` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// `localhost`, a loopback address, or no `Host` at all.
    Index,
    /// `NAME.localhost`: the lower-case labels before `.localhost`.
    Named(String),
    /// Any other name: not ours to answer.
    Foreign(String),
}

/// Reads a `Host` header value (`name[:port]`, `[v6]:port`).
pub fn parse_host(host: Option<&str>) -> Host {
    let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else {
        return Host::Index;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || is_loopback(&name) {
        return Host::Index;
    }
    match name.strip_suffix(".localhost") {
        Some(prefix) if !prefix.is_empty() => Host::Named(prefix.to_owned()),
        _ => Host::Foreign(name),
    }
}

/// Whether a `Host` is one a page on this machine's loopback names (the guard every HTTP
/// port applies, `--local` ones too).
pub fn is_local(host: Option<&str>) -> bool {
    !matches!(parse_host(host), Host::Foreign(_))
}

fn is_loopback(name: &str) -> bool {
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Where a named request goes, given the peers (by name) and what is known of their catalogs
/// (`None`: not fetched yet; `Some(Err)`: the peer could not be asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Service `service` (its exact name) of peer number `peer`.
    To { peer: usize, service: String },
    /// These peers' catalogs are needed to decide.
    Need(Vec<usize>),
    /// Nothing by that name; the text says what was looked for.
    NotFound(String),
    /// Several peers have it: the full names to use instead.
    Ambiguous(Vec<String>),
}

/// Resolves `NAME` (from `NAME.localhost`, or the first path segment of an RTSP URL) against
/// the peers and their catalogs, among their services of protocol `kind`.
pub fn resolve(
    name: &str,
    kind: Kind,
    peers: &[&str],
    catalogs: &[Option<Result<&Catalog, &str>>],
) -> Resolution {
    let what = match kind {
        Kind::Rtsp => "RTSP service",
        _ => "web service",
    };
    // SERVICE.PEER: the last label names a peer.
    if let Some((service, peer)) = name.rsplit_once('.') {
        if let Some(p) = peers.iter().position(|n| n.eq_ignore_ascii_case(peer)) {
            return match catalogs.get(p).copied().flatten() {
                None => Resolution::Need(vec![p]),
                Some(Err(_)) => Resolution::To {
                    // The peer could not list its services: ask it for the name as written.
                    peer: p,
                    service: service.to_owned(),
                },
                Some(Ok(catalog)) => match find(catalog, kind, service) {
                    Some(exact) => Resolution::To {
                        peer: p,
                        service: exact,
                    },
                    None => Resolution::NotFound(format!(
                        "peer {} has no {what} named {service:?}",
                        peers[p]
                    )),
                },
            };
        }
    }
    // SERVICE alone: whoever has it, if only one does.
    let missing: Vec<usize> = (0..peers.len())
        .filter(|&p| catalogs.get(p).copied().flatten().is_none())
        .collect();
    if !missing.is_empty() {
        return Resolution::Need(missing);
    }
    let found: Vec<(usize, String)> = catalogs
        .iter()
        .enumerate()
        .filter_map(|(p, c)| match c {
            Some(Ok(catalog)) => find(catalog, kind, name).map(|s| (p, s)),
            _ => None,
        })
        .collect();
    match found.as_slice() {
        [] => Resolution::NotFound(format!("no peer has a {what} named {name:?}")),
        [(peer, service)] => Resolution::To {
            peer: *peer,
            service: service.clone(),
        },
        several => Resolution::Ambiguous(
            several
                .iter()
                .map(|(p, s)| format!("{}.{}", s.to_ascii_lowercase(), peers[*p]))
                .collect(),
        ),
    }
}

/// The exact name of `catalog`'s service of protocol `kind` called `name` (any case).
fn find(catalog: &Catalog, kind: Kind, name: &str) -> Option<String> {
    catalog
        .services
        .iter()
        .find(|e| e.protocol == kind && e.name.eq_ignore_ascii_case(name))
        .map(|e| e.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::catalog::Entry;

    fn catalog(services: &[(&str, Kind)]) -> Catalog {
        Catalog {
            services: services
                .iter()
                .map(|(n, k)| Entry {
                    name: (*n).to_owned(),
                    protocol: *k,
                })
                .collect(),
        }
    }

    #[test]
    fn hosts_are_read_as_the_index_our_names_or_foreign() {
        assert_eq!(parse_host(None), Host::Index);
        assert_eq!(parse_host(Some("localhost:8080")), Host::Index);
        assert_eq!(parse_host(Some("127.0.0.1:8080")), Host::Index);
        assert_eq!(parse_host(Some("[::1]:8080")), Host::Index);
        assert_eq!(parse_host(Some("LOCALHOST.")), Host::Index);
        assert_eq!(
            parse_host(Some("NAS.Home.localhost:8080")),
            Host::Named("nas.home".into())
        );
        assert_eq!(parse_host(Some("nas.localhost")), Host::Named("nas".into()));
        assert_eq!(
            parse_host(Some("evil.example:8080")),
            Host::Foreign("evil.example".into())
        );
        assert_eq!(
            parse_host(Some(".localhost")),
            Host::Foreign(".localhost".into())
        );
        assert_eq!(
            parse_host(Some("192.168.1.10")),
            Host::Foreign("192.168.1.10".into())
        );
        assert!(is_local(Some("127.0.0.2:1")) && !is_local(Some("localhost.evil.example")));
    }

    #[test]
    fn service_dot_peer_names_a_peer_and_matches_any_case() {
        let home = catalog(&[("NAS", Kind::Http), ("cam", Kind::Rtsp)]);
        let peers = ["home", "shop"];
        let known = [Some(Ok(&home)), None];
        assert_eq!(
            resolve("nas.home", Kind::Http, &peers, &known),
            Resolution::To {
                peer: 0,
                service: "NAS".into()
            }
        );
        assert!(matches!(
            resolve("cam.home", Kind::Http, &peers, &known),
            Resolution::NotFound(_)
        ));
        assert_eq!(
            resolve("CAM.home", Kind::Rtsp, &peers, &known),
            Resolution::To {
                peer: 0,
                service: "cam".into()
            }
        );
        assert_eq!(
            resolve("x.shop", Kind::Http, &peers, &known),
            Resolution::Need(vec![1])
        );
        // A dotted service name: the last label is the peer.
        let dotted = catalog(&[("web.v2", Kind::Http)]);
        assert_eq!(
            resolve(
                "web.v2.home",
                Kind::Http,
                &peers,
                &[Some(Ok(&dotted)), None]
            ),
            Resolution::To {
                peer: 0,
                service: "web.v2".into()
            }
        );
    }

    #[test]
    fn a_bare_service_name_is_used_while_one_peer_has_it() {
        let home = catalog(&[("nas", Kind::Http), ("ui", Kind::Http)]);
        let shop = catalog(&[("ui", Kind::Http)]);
        let peers = ["home", "shop"];
        assert_eq!(
            resolve("nas", Kind::Http, &peers, &[Some(Ok(&home)), None]),
            Resolution::Need(vec![1])
        );
        let both = [Some(Ok(&home)), Some(Ok(&shop))];
        assert_eq!(
            resolve("nas", Kind::Http, &peers, &both),
            Resolution::To {
                peer: 0,
                service: "nas".into()
            }
        );
        assert_eq!(
            resolve("ui", Kind::Http, &peers, &both),
            Resolution::Ambiguous(vec!["ui.home".into(), "ui.shop".into()])
        );
        assert!(matches!(
            resolve("none", Kind::Http, &peers, &both),
            Resolution::NotFound(_)
        ));
        // An offline peer does not block the others.
        let offline = [Some(Ok(&home)), Some(Err("offline"))];
        assert_eq!(
            resolve("ui", Kind::Http, &peers, &offline),
            Resolution::To {
                peer: 0,
                service: "ui".into()
            }
        );
    }
}
