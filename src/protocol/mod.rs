//! The wire protocol, as pure data: ALPN, the stream header codec and the QUIC error codes.
//! Documented in `docs/protocol.md`; nothing here does I/O.

pub mod catalog;
pub mod control;
pub mod header;
pub mod http;
pub mod link;
pub mod media;
pub mod probe;
pub mod rendezvous;
pub mod rtsp;

use quinn::VarInt;

/// ALPN protocol id: names the protocol and its major version. A peer speaking another
/// version fails the TLS handshake with "no application protocol".
pub const ALPN: &[u8] = b"tunnel/1";

/// Application error codes carried by QUIC `RESET_STREAM` and `STOP_SENDING` frames.
pub mod stream_code {
    use super::VarInt;
    /// The socket at the other end was reset or failed; the stream is cut short.
    pub const ABORTED: VarInt = VarInt::from_u32(1);
    /// The stream header was malformed or oversized.
    pub const BAD_HEADER: VarInt = VarInt::from_u32(2);
    /// The open was refused (the status says why); no payload will be read.
    pub const REFUSED: VarInt = VarInt::from_u32(3);
    /// The process shut down before the stream finished draining.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// The header did not arrive in time.
    pub const TIMEOUT: VarInt = VarInt::from_u32(5);
    /// The service protocol's layer found the payload malformed or oversized (e.g. RTSP).
    pub const BAD_PAYLOAD: VarInt = VarInt::from_u32(6);
}

/// Application error codes carried by QUIC `CONNECTION_CLOSE` frames.
pub mod close_code {
    use super::VarInt;
    /// The idle grace period ended with no stream open.
    pub const IDLE: VarInt = VarInt::from_u32(0);
    /// The peer is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(1);
    /// The peer's id is not in the exposing side's allow list.
    pub const NOT_AUTHORISED: VarInt = VarInt::from_u32(2);
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(3);
    /// The rendezvous refused (or no longer admits) the registration; the reason says why.
    pub const REFUSED: VarInt = VarInt::from_u32(4);

    /// A short name for a close code, for logs.
    pub fn name(code: VarInt) -> &'static str {
        match code.into_inner() {
            0 => "idle",
            1 => "shutdown",
            2 => "not authorised",
            3 => "protocol error",
            4 => "refused",
            _ => "unknown",
        }
    }
}

/// The fuzz seeds of the tunnel's own formats (`fuzz/seeds/`). Their bytes travel inside QUIC,
/// where no recording proxy sees them, so the seeds are what the encoders write in a session
/// (media datagrams wrap real RTP packets from the recorded RTSP seeds). With
/// `TUNNEL_WRITE_SEEDS=1` this writes them; always, every committed seed must decode as what
/// it is, so a format change that leaves them stale fails here.
#[cfg(test)]
mod fuzz_seeds {
    use std::path::{Path, PathBuf};

    use super::header::*;
    use super::link;
    use super::media::{self, Parity, Tag};
    use super::rendezvous::{self, ClientMsg, RelayGrant, ServerMsg};
    use crate::identity::PeerId;

    fn dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target)
    }

    /// Real RTP packets: the interleaved (`$`) frames of the recorded RTSP-over-TCP seeds.
    fn rtp_packets() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir("rtsp_stream"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(file).unwrap();
            let mut i = 0;
            while i + 4 <= bytes.len() {
                if bytes[i] == b'$' {
                    let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
                    if let Some(p) = bytes.get(i + 4..i + 4 + len) {
                        if media::rtp_id(p).is_some() && out.len() < 8 {
                            out.push(p.to_vec());
                        }
                    }
                    i += 4 + len;
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
        let mut out = Vec::new();
        let open = |service: &str, op| OpenRequest {
            service: service.into(),
            client_addr: Some("127.0.0.1:50312".into()),
            op,
        };
        let mut rtsp = encode_request(&open("cam", Op::Open)).unwrap();
        rtsp.extend_from_slice(b"OPTIONS rtsp://127.0.0.1:8554/cam RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        out.push(("stream_header", "request-rtsp".into(), rtsp));
        let catalog = OpenRequest {
            service: String::new(),
            client_addr: None,
            op: Op::Catalog,
        };
        out.push((
            "stream_header",
            "request-catalog".into(),
            encode_request(&catalog).unwrap(),
        ));
        let responses = [
            (
                "ok-rtsp",
                OpenResponse {
                    status: Status::Ok,
                    message: String::new(),
                    protocol: Protocol::Rtsp(RtspUdp::Datagram),
                    http: None,
                },
            ),
            (
                "ok-http",
                OpenResponse {
                    status: Status::Ok,
                    message: String::new(),
                    protocol: Protocol::Http,
                    http: Some(HttpService {
                        target: "192.168.1.10:80".into(),
                        host: "nas.lan".into(),
                        tls: true,
                        forwarded: true,
                    }),
                },
            ),
            (
                "busy",
                OpenResponse {
                    status: Status::Busy,
                    message: "the peer is at its limit of 4 proxied sockets".into(),
                    protocol: Protocol::Tcp,
                    http: None,
                },
            ),
        ];
        for (name, resp) in responses {
            out.push((
                "stream_header",
                format!("response-{name}"),
                encode_response(&resp),
            ));
        }
        let (a, b) = (PeerId::from_spki(&[1; 32]), PeerId::from_spki(&[2; 32]));
        let client = [
            ClientMsg::Register {
                local_addrs: vec!["203.0.113.2:4433".parse().unwrap()],
            },
            ClientMsg::Connect {
                peer: b,
                relay: true,
            },
            ClientMsg::Answer {
                peer: a,
                accept: true,
            },
        ];
        let bytes: Vec<u8> = client.iter().flat_map(rendezvous::encode).collect();
        out.push(("rendezvous_frame", "client-session".into(), bytes));
        let server = [
            ServerMsg::Registered {
                observed: "198.51.100.10:40001".parse().unwrap(),
            },
            ServerMsg::Ask { peer: a },
            ServerMsg::Unavailable { peer: b },
            ServerMsg::Introduce {
                peer: b,
                candidates: vec![
                    "198.51.100.20:4433".parse().unwrap(),
                    "203.0.113.66:4433".parse().unwrap(),
                ],
                start_in_ms: 12,
                relay: Some(RelayGrant {
                    port: 50000,
                    token: rendezvous::token_hex(&[7; 16]),
                }),
            },
            ServerMsg::Error {
                message: "register first".into(),
            },
        ];
        let bytes: Vec<u8> = server.iter().flat_map(rendezvous::encode).collect();
        out.push(("rendezvous_frame", "server-session".into(), bytes));
        out.push((
            "rendezvous_frame",
            "relay-bind".into(),
            rendezvous::relay_bind_packet(&[7; 16]),
        ));
        // A TCP link's stream: a QUIC Initial-sized datagram for the rendezvous's port, and a
        // relay bind for a relay port; an echo request.
        let mut session = link::encode(3478, &[0xc3; 1200]).unwrap();
        session.extend(link::encode(50000, &rendezvous::relay_bind_packet(&[7; 16])).unwrap());
        out.push(("link_frame", "session".into(), session));
        out.push((
            "link_frame",
            "echo".into(),
            link::Echo::Request(42).encode().to_vec(),
        ));
        let packets = rtp_packets();
        assert!(!packets.is_empty(), "the RTSP seeds hold interleaved RTP");
        let tag = |control: bool, kind| Tag {
            id: 5,
            allocated_by_sender: true,
            control,
            kind,
        };
        for (n, p) in packets.iter().enumerate().take(3) {
            let mut d = tag(false, 0).encode().to_vec();
            d.extend_from_slice(p);
            out.push(("media_wire", format!("datagram-{n}"), d));
        }
        let (ssrc, seq) = media::rtp_id(&packets[0]).unwrap();
        let mut d = tag(true, 0).encode().to_vec();
        d.extend_from_slice(&media::encode_request(ssrc, &[seq, seq.wrapping_add(2)]));
        out.push(("media_wire", "resend-request".into(), d));
        let mut xor = Vec::new();
        for p in packets.iter().take(4) {
            media::xor_into(&mut xor, p);
        }
        let parity = Parity {
            ssrc,
            first: seq,
            count: packets.len().min(4) as u8,
            xor,
        };
        let mut d = tag(true, 0).encode().to_vec();
        d.extend_from_slice(&parity.encode());
        out.push(("media_wire", "parity".into(), d));
        out.push((
            "media_wire",
            "overflow".into(),
            media::encode_overflow(0, &packets[0]),
        ));
        out
    }

    #[test]
    fn the_own_formats_seeds_are_current() {
        let seeds = seeds();
        if std::env::var("TUNNEL_WRITE_SEEDS").as_deref() == Ok("1") {
            for (target, name, bytes) in &seeds {
                std::fs::create_dir_all(dir(target)).unwrap();
                std::fs::write(dir(target).join(name), bytes).unwrap();
            }
        }
        for (target, name, bytes) in &seeds {
            let path = dir(target).join(name);
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; write them with TUNNEL_WRITE_SEEDS=1",
                    path.display()
                )
            });
            assert_eq!(
                &committed,
                bytes,
                "{} is stale: TUNNEL_WRITE_SEEDS=1 rewrites it",
                path.display()
            );
            let decodes = match *target {
                "stream_header" => {
                    matches!(decode_request(bytes), Ok(Some(_)))
                        || matches!(decode_response(bytes), Ok(Some(_)))
                }
                "rendezvous_frame" => {
                    matches!(rendezvous::decode::<ClientMsg>(bytes), Ok(Some(_)))
                        || matches!(rendezvous::decode::<ServerMsg>(bytes), Ok(Some(_)))
                        || rendezvous::parse_relay_bind(bytes).is_some()
                }
                "link_frame" => {
                    matches!(link::decode(bytes), Ok(Some(_))) || link::Echo::parse(bytes).is_some()
                }
                _ => Tag::decode(bytes).is_some(),
            };
            assert!(decodes, "{} does not decode", path.display());
        }
    }
}
