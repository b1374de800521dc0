//! The RTSP layer of a stream (docs/rtsp.md): the pure session bookkeeping
//! ([`sessions`]) and the driver that reads the conversation and carries UDP media
//! ([`driver`]). The wire format is `protocol::rtsp`; the media flows are `media`.

pub mod driver;
pub mod sessions;
