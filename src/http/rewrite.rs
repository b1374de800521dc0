//! What the device and the browser see, so a device's web UI works at a local name
//! (`http://nas.home.localhost:8080`) through the tunnel. Pure: heads in, heads changed.
//!
//! - Requests: the device sees its own name (`Host`, a same-origin `Origin` and `Referer`),
//!   since many UIs refuse a foreign Host or check Origin against CSRF; an absolute-form
//!   target (the browser uses us as its proxy) becomes origin-form.
//! - Responses: absolute URLs that point into the device's network (`Location`,
//!   `Content-Location`, `Refresh`) move to the local origin, so a redirect to
//!   `http://192.168.1.10/login` stays on the tunnel; `Set-Cookie` loses `Domain=`, so a cookie
//!   is host-only on the local name and two services on one port do not share a `session=`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use crate::protocol::http::{RequestHead, ResponseHead};

/// The names of one service on both sides of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// What the browser calls the service: its Host header (e.g. "nas.home.localhost:8080");
    /// the local origin is `http://{local}`.
    pub local: String,
    /// The device's authority as the exposing side declares it ("192.168.1.10:80",
    /// "cam.lan:443", "[fd00::5]:8443").
    pub target: String,
    /// The device speaks https (its origin is `https://...`).
    pub tls: bool,
    /// The Host the device is sent: the target's (default ports omitted: 80 for http, 443 for
    /// https) or a configured one.
    pub host_header: String,
    /// Add X-Forwarded-For/-Proto/-Host (only when the service asks for it).
    pub forwarded: bool,
}

impl Names {
    pub fn new(
        local: impl Into<String>,
        target: impl Into<String>,
        tls: bool,
        host_header: Option<String>,
        forwarded: bool,
    ) -> Self {
        let target = target.into();
        let host_header = host_header.unwrap_or_else(|| without_default_port(&target, tls));
        Names {
            local: local.into(),
            target,
            tls,
            host_header,
            forwarded,
        }
    }

    /// The origin the device believes it has: `http(s)://{host_header}`.
    pub fn device_origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host_header)
    }

    /// The origin the browser sees: `http://{local}`.
    pub fn local_origin(&self) -> String {
        format!("http://{}", self.local)
    }
}

/// `authority` as a browser would send it in Host: without the scheme's default port.
fn without_default_port(authority: &str, tls: bool) -> String {
    let default = if tls { "443" } else { "80" };
    match split_authority(authority) {
        (_, Some(port)) if port == default => {
            authority[..authority.len() - port.len() - 1].to_owned()
        }
        _ => authority.to_owned(),
    }
}

/// Splits "host", "host:port" or "[v6]:port" into the host (without brackets) and the port.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if let Some((host, after)) = authority
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
    {
        return (host, after.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// Makes the request what the device expects from a browser that reached it directly;
/// `client` is the browser's address, for X-Forwarded-For.
pub fn rewrite_request(head: &mut RequestHead, names: &Names, client: IpAddr) {
    if let Some(target) = origin_form(&head.target) {
        head.target = target;
    }
    let headers = &mut head.headers;
    headers.set("Host", names.host_header.as_str());
    let local = names.local_origin();
    if headers
        .get("origin")
        .is_some_and(|o| o.eq_ignore_ascii_case(local.as_bytes()))
    {
        headers.set("Origin", names.device_origin());
    }
    let referer = headers
        .get("referer")
        .and_then(|r| under_origin(r, &local))
        .map(|rest| [names.device_origin().as_bytes(), rest].concat());
    if let Some(referer) = referer {
        headers.set("Referer", referer);
    }
    if names.forwarded {
        let client = client.to_canonical().to_string();
        let chain = headers
            .get_all("x-forwarded-for")
            .filter(|v| !v.is_empty())
            .chain([client.as_bytes()])
            .collect::<Vec<_>>()
            .join(&b", "[..]);
        headers.set("X-Forwarded-For", chain);
        headers.set("X-Forwarded-Proto", "http");
        headers.set("X-Forwarded-Host", names.local.as_str());
    }
}

/// The origin-form (`/x?y`) of an absolute-form target (`http://host/x?y`).
fn origin_form(target: &str) -> Option<String> {
    let start = scheme_end(target.as_bytes())?;
    let rest = &target[authority_end(target.as_bytes(), start)..];
    Some(if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    })
}

/// What follows `origin` in `url`, if `url` is on that origin (case-insensitive).
fn under_origin<'a>(url: &'a [u8], origin: &str) -> Option<&'a [u8]> {
    let (start, rest) = url.split_at_checked(origin.len())?;
    let on_origin = start.eq_ignore_ascii_case(origin.as_bytes())
        && matches!(rest.first(), None | Some(b'/' | b'?' | b'#'));
    on_origin.then_some(rest)
}

/// Where the authority of an `http://` or `https://` URL starts (case-insensitive scheme).
fn scheme_end(url: &[u8]) -> Option<usize> {
    [&b"http://"[..], b"https://"]
        .into_iter()
        .find(|scheme| {
            url.get(..scheme.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
        })
        .map(<[u8]>::len)
}

/// Where the authority that starts at `start` ends: at the path, query or fragment.
fn authority_end(url: &[u8], start: usize) -> usize {
    url[start..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .map_or(url.len(), |p| start + p)
}

/// Keeps the browser on the tunnel: device URLs move to the local origin, cookies become
/// host-only.
pub fn rewrite_response(head: &mut ResponseHead, names: &Names) {
    for field in &mut head.headers.0 {
        match field.name.to_ascii_lowercase().as_str() {
            "location" | "content-location" => {
                if let Some(url) = to_local(&field.value, names) {
                    field.value = url;
                }
            }
            "refresh" => {
                let Some(range) = refresh_url(&field.value) else {
                    continue;
                };
                if let Some(url) = to_local(&field.value[range.clone()], names) {
                    field.value.splice(range, url);
                }
            }
            "set-cookie" => {
                if let Some(cookie) = without_domain(&field.value) {
                    field.value = cookie;
                }
            }
            _ => {}
        }
    }
}

/// `url` on the local origin, if it is absolute (`http://`, `https://`, `//`) and its host is
/// device-like. Userinfo is dropped; path, query and fragment are kept.
fn to_local(url: &[u8], names: &Names) -> Option<Vec<u8>> {
    let start = scheme_end(url).or_else(|| url.starts_with(b"//").then_some(2))?;
    let end = authority_end(url, start);
    let authority = std::str::from_utf8(&url[start..end]).ok()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, _) = split_authority(host_port);
    is_device_like(host, names).then(|| [names.local_origin().as_bytes(), &url[end..]].concat())
}

/// Name suffixes that only resolve inside a home or office network.
const LOCAL_SUFFIXES: [&str; 5] = [".local", ".lan", ".home.arpa", ".internal", ".localdomain"];

/// Whether `host` names the device or its network rather than the public internet.
fn is_device_like(host: &str, names: &Names) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() {
        return false;
    }
    let named = [&names.target, &names.host_header]
        .iter()
        .any(|a| split_authority(a).0.eq_ignore_ascii_case(&host));
    if named {
        return true;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return match ip.to_canonical() {
            IpAddr::V4(v4) => is_private_v4(v4),
            IpAddr::V6(v6) => is_private_v6(v6),
        };
    }
    host == "localhost" || !host.contains('.') || LOCAL_SUFFIXES.iter().any(|s| host.ends_with(s))
}

/// Private, loopback, link-local or carrier-grade NAT (100.64/10).
fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || ip.is_loopback() || ip.is_link_local() || (a == 100 && b & 0xc0 == 64)
}

/// Loopback, unique local (fc00::/7) or link-local (fe80::/10).
fn is_private_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback() || first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfe80
}

/// Where the URL is in a Refresh value: `5; url=http://a/`, `0;URL='/x'`, `3; url="/y"`.
fn refresh_url(value: &[u8]) -> Option<Range<usize>> {
    let skip_space = |i: usize| {
        i + value[i..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count()
    };
    let i = skip_space(value.iter().position(|&b| b == b';' || b == b',')? + 1);
    if !value.get(i..i + 3)?.eq_ignore_ascii_case(b"url") {
        return None;
    }
    let i = skip_space(i + 3);
    if value.get(i) != Some(&b'=') {
        return None;
    }
    let i = skip_space(i + 1);
    match value.get(i) {
        Some(&quote @ (b'"' | b'\'')) => {
            let start = i + 1;
            let end = value[start..]
                .iter()
                .position(|&b| b == quote)
                .map_or(value.len(), |p| start + p);
            Some(start..end)
        }
        _ => Some(i..value.len()),
    }
}

/// The Set-Cookie value without its `Domain=` attributes, if it had any; every other byte
/// is kept.
fn without_domain(cookie: &[u8]) -> Option<Vec<u8>> {
    let parts: Vec<&[u8]> = cookie.split(|&b| b == b';').collect();
    let (pair, attributes) = parts.split_first()?;
    let is_domain = |attribute: &&[u8]| {
        let name = attribute.split(|&b| b == b'=').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(b"domain")
    };
    if !attributes.iter().any(is_domain) {
        return None;
    }
    let kept: Vec<&[u8]> = std::iter::once(*pair)
        .chain(attributes.iter().filter(|a| !is_domain(a)).copied())
        .collect();
    Some(kept.join(&b';'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http::{parse_request, parse_response};
    use proptest::prelude::*;

    const LOCAL: &str = "nas.home.localhost:8080";

    fn names() -> Names {
        Names::new(LOCAL, "192.168.1.10:80", false, None, false)
    }

    fn request(raw: &str, names: &Names) -> RequestHead {
        let mut head = parse_request(raw.as_bytes()).unwrap().unwrap().0;
        rewrite_request(&mut head, names, "127.0.0.1".parse().unwrap());
        head
    }

    fn response(fields: &str, names: &Names) -> ResponseHead {
        let raw = format!("HTTP/1.1 302 Found\r\n{fields}\r\n");
        let mut head = parse_response(raw.as_bytes()).unwrap().unwrap().0;
        rewrite_response(&mut head, names);
        head
    }

    fn field(head: &ResponseHead, name: &str) -> String {
        String::from_utf8_lossy(head.headers.get(name).unwrap_or_default()).into_owned()
    }

    /// The Location a device's redirect to `url` reaches the browser with.
    fn location(url: &str) -> String {
        field(
            &response(&format!("Location: {url}\r\n"), &names()),
            "location",
        )
    }

    #[test]
    fn names_omit_default_ports() {
        let host = |target: &str, tls| Names::new(LOCAL, target, tls, None, false).host_header;
        assert_eq!(host("192.168.1.10:80", false), "192.168.1.10");
        assert_eq!(host("cam.lan:443", true), "cam.lan");
        assert_eq!(host("cam.lan:80", true), "cam.lan:80");
        assert_eq!(host("cam.lan:443", false), "cam.lan:443");
        assert_eq!(host("[fd00::5]:8443", true), "[fd00::5]:8443");
        assert_eq!(host("[fd00::5]:443", true), "[fd00::5]");
        assert_eq!(host("cam.lan", false), "cam.lan");

        let configured = Names::new(
            LOCAL,
            "10.0.0.2:443",
            true,
            Some("nas.example.com".into()),
            false,
        );
        assert_eq!(configured.host_header, "nas.example.com");
        assert_eq!(configured.device_origin(), "https://nas.example.com");
        assert_eq!(names().device_origin(), "http://192.168.1.10");
        assert_eq!(names().local_origin(), "http://nas.home.localhost:8080");
    }

    #[test]
    fn the_device_is_sent_its_own_host() {
        let head = request(
            "GET / HTTP/1.1\r\nhost: nas.home.localhost:8080\r\nA: b\r\n\r\n",
            &names(),
        );
        assert_eq!(head.headers.0[0].name, "Host");
        assert_eq!(head.headers.get_str("host"), Some("192.168.1.10"));
        let head = request("GET / HTTP/1.0\r\n\r\n", &names());
        assert_eq!(head.headers.get_str("host"), Some("192.168.1.10"));
    }

    #[test]
    fn a_same_origin_origin_becomes_the_devices() {
        let origin = |value: &str| {
            let head = request(
                &format!("POST / HTTP/1.1\r\nOrigin: {value}\r\n\r\n"),
                &names(),
            );
            head.headers.get_str("origin").map(str::to_owned)
        };
        assert_eq!(
            origin("http://nas.home.localhost:8080").as_deref(),
            Some("http://192.168.1.10")
        );
        assert_eq!(
            origin("HTTP://NAS.home.localhost:8080").as_deref(),
            Some("http://192.168.1.10")
        );
        for untouched in [
            "null",
            "http://nas.home.localhost:8081",
            "https://nas.home.localhost:8080",
            "http://evil.example",
        ] {
            assert_eq!(origin(untouched).as_deref(), Some(untouched));
        }
    }

    #[test]
    fn a_local_referer_moves_to_the_device() {
        let tls = Names::new(LOCAL, "cam.lan:443", true, None, false);
        let referer = |value: &str, names: &Names| {
            let head = request(
                &format!("GET / HTTP/1.1\r\nReferer: {value}\r\n\r\n"),
                names,
            );
            head.headers.get_str("referer").map(str::to_owned)
        };
        let cases = [
            (
                "http://nas.home.localhost:8080/a/b?c=d#e",
                "http://192.168.1.10/a/b?c=d#e",
            ),
            ("http://nas.home.localhost:8080", "http://192.168.1.10"),
            ("http://nas.home.localhost:8080?q", "http://192.168.1.10?q"),
            ("Http://Nas.Home.Localhost:8080/x", "http://192.168.1.10/x"),
        ];
        for (sent, seen) in cases {
            assert_eq!(referer(sent, &names()).as_deref(), Some(seen), "{sent}");
        }
        assert_eq!(
            referer("http://nas.home.localhost:8080/x", &tls).as_deref(),
            Some("https://cam.lan/x")
        );
        for untouched in [
            "http://nas.home.localhost:80800/x",
            "http://other.localhost:8080/",
            "/relative",
        ] {
            assert_eq!(referer(untouched, &names()).as_deref(), Some(untouched));
        }
    }

    #[test]
    fn absolute_form_targets_become_origin_form() {
        let target = |t: &str| request(&format!("GET {t} HTTP/1.1\r\n\r\n"), &names()).target;
        assert_eq!(target("http://nas.home.localhost:8080/x?y"), "/x?y");
        assert_eq!(target("HTTPS://h"), "/");
        assert_eq!(target("http://h?q=1"), "/?q=1");
        assert_eq!(target("http://user@h:81/a/b"), "/a/b");
        for untouched in ["*", "/a?b", "//double/slash", "h.lan:443"] {
            assert_eq!(target(untouched), untouched);
        }
    }

    #[test]
    fn forwarded_headers_only_when_asked() {
        let raw = "GET / HTTP/1.1\r\nX-Forwarded-For: 10.9.9.9\r\nx-forwarded-for: 10.8.8.8\r\n\
                   X-Forwarded-Proto: https\r\n\r\n";
        let plain = request(raw, &names());
        assert_eq!(plain.headers.get_all("x-forwarded-for").count(), 2);
        assert_eq!(plain.headers.get_str("x-forwarded-proto"), Some("https"));
        assert_eq!(plain.headers.get("x-forwarded-host"), None);

        let forwarded = Names {
            forwarded: true,
            ..names()
        };
        let head = request(raw, &forwarded);
        let h = &head.headers;
        assert_eq!(h.get_all("x-forwarded-for").count(), 1);
        assert_eq!(
            h.get_str("x-forwarded-for"),
            Some("10.9.9.9, 10.8.8.8, 127.0.0.1")
        );
        assert_eq!(h.get_str("x-forwarded-proto"), Some("http"));
        assert_eq!(h.get_str("x-forwarded-host"), Some(LOCAL));

        let mut head = parse_request(b"GET / HTTP/1.1\r\n\r\n").unwrap().unwrap().0;
        rewrite_request(&mut head, &forwarded, "::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(head.headers.get_str("x-forwarded-for"), Some("192.0.2.7"));
        rewrite_request(&mut head, &forwarded, "2001:db8::1".parse().unwrap());
        assert_eq!(
            head.headers.get_str("x-forwarded-for"),
            Some("192.0.2.7, 2001:db8::1")
        );
    }

    #[test]
    fn device_urls_move_to_the_local_origin() {
        let local = "http://nas.home.localhost:8080";
        let cases = [
            (
                "http://192.168.1.10/login?next=/a#top",
                "/login?next=/a#top",
            ),
            ("https://192.168.1.10:443/x", "/x"),
            ("HTTP://192.168.1.10:8000/x", "/x"),
            ("http://user:pw@192.168.1.10/", "/"),
            ("http://user@192.168.1.10", ""),
            ("//192.168.1.10/x", "/x"),
            ("http://192.168.1.10?a=1", "?a=1"),
            ("http://192.168.1.10#f", "#f"),
            ("http://[fd00::5]:8443/x", "/x"),
            ("http://[fe80::1]/x", "/x"),
            ("http://[::1]:3000/", "/"),
            ("http://[::ffff:10.0.0.1]/", "/"),
            ("http://10.1.2.3/", "/"),
            ("http://172.16.0.1/", "/"),
            ("http://127.0.0.1:5000/", "/"),
            ("http://169.254.1.1/", "/"),
            ("http://100.64.0.1/", "/"),
            ("http://localhost:5000/", "/"),
            ("http://nas/", "/"),
            ("http://NAS.LAN/", "/"),
            ("http://cam.local./", "/"),
            ("http://printer.home.arpa/", "/"),
            ("http://x.internal/", "/"),
            ("http://box.localdomain/", "/"),
        ];
        for (device, path) in cases {
            assert_eq!(location(device), format!("{local}{path}"), "{device}");
        }
        for untouched in [
            "https://example.com/x",
            "http://8.8.8.8/",
            "http://172.32.0.1/",
            "http://100.128.0.1/",
            "http://[2001:db8::1]/",
            "http://nas.example.com/",
            "/relative",
            "?page=2",
            "relative/path",
            "ftp://192.168.1.10/",
            "mailto:a@nas",
        ] {
            assert_eq!(location(untouched), untouched);
        }
    }

    #[test]
    fn the_devices_own_names_are_device_like() {
        let names = Names::new(
            LOCAL,
            "nas.example.com:8443",
            true,
            Some("portal.example.org".into()),
            false,
        );
        let head = response(
            "Location: https://NAS.example.com/a\r\n\
             Content-Location: http://portal.example.org:81/b\r\n",
            &names,
        );
        assert_eq!(field(&head, "location"), "http://nas.home.localhost:8080/a");
        assert_eq!(
            field(&head, "content-location"),
            "http://nas.home.localhost:8080/b"
        );
    }

    #[test]
    fn refresh_urls_move_too() {
        let refresh = |value: &str| {
            field(
                &response(&format!("Refresh: {value}\r\n"), &names()),
                "refresh",
            )
        };
        let cases = [
            (
                "5; url=http://192.168.1.10/x",
                "5; url=http://nas.home.localhost:8080/x",
            ),
            (
                "0;URL='http://nas/x?y'",
                "0;URL='http://nas.home.localhost:8080/x?y'",
            ),
            (
                "3; Url = \"//cam.lan/\"",
                "3; Url = \"http://nas.home.localhost:8080/\"",
            ),
            (
                "1, url=http://10.0.0.1",
                "1, url=http://nas.home.localhost:8080",
            ),
        ];
        for (device, seen) in cases {
            assert_eq!(refresh(device), seen, "{device}");
        }
        for untouched in [
            "5",
            "5; url=https://example.com/",
            "5; url=/relative",
            "5; http://192.168.1.10/",
            "5;",
        ] {
            assert_eq!(refresh(untouched), untouched);
        }
    }

    #[test]
    fn cookies_lose_their_domain() {
        let head = response(
            "Set-Cookie: a=1; Domain=192.168.1.10; Path=/\r\n\
             Set-Cookie: b=2; path=/;domain=.lan\r\n\
             Set-Cookie: c=3;DOMAIN = x;Secure\r\n\
             Set-Cookie: Domain=named; Path=/\r\n\
             Set-Cookie: d=\"4\";  HttpOnly ;SameSite=Lax\r\n\
             Set-Cookie: e=5; Domain=a; Domain=b\r\n",
            &names(),
        );
        let cookies: Vec<_> = head
            .headers
            .get_all("set-cookie")
            .map(String::from_utf8_lossy)
            .collect();
        assert_eq!(
            cookies,
            [
                "a=1; Path=/",
                "b=2; path=/",
                "c=3;Secure",
                "Domain=named; Path=/",
                "d=\"4\";  HttpOnly ;SameSite=Lax",
                "e=5",
            ]
        );
    }

    #[test]
    fn other_response_fields_are_untouched() {
        let fields = "Link: <http://192.168.1.10/a>\r\nContent-Type: text/html\r\n";
        let head = response(fields, &names());
        assert_eq!(field(&head, "link"), "<http://192.168.1.10/a>");
        assert_eq!(head.headers.0.len(), 2);
    }

    proptest! {
        #[test]
        fn rewrites_never_panic(value in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = String::from_utf8_lossy(&value).into_owned();
            let mut head = ResponseHead {
                minor: 1,
                status: 302,
                reason: String::new(),
                headers: Default::default(),
            };
            for name in ["Location", "Refresh", "Set-Cookie", "Content-Location"] {
                head.headers.append(name, value.clone());
            }
            rewrite_response(&mut head, &names());
            let mut req = RequestHead {
                method: "GET".into(),
                target: text,
                minor: 1,
                headers: Default::default(),
            };
            for name in ["Origin", "Referer", "X-Forwarded-For"] {
                req.headers.append(name, value.clone());
            }
            let forwarded = Names { forwarded: true, ..names() };
            rewrite_request(&mut req, &forwarded, "10.0.0.1".parse().unwrap());
        }

        #[test]
        fn device_paths_survive_the_move(
            path in "(/[a-zA-Z0-9._~%-]{0,10}){0,4}(\\?[a-z0-9=&]{0,10})?(#[a-z]{0,5})?",
        ) {
            let moved = location(&format!("http://192.168.1.10{path}"));
            prop_assert_eq!(moved, format!("http://nas.home.localhost:8080{path}"));
        }
    }
}
