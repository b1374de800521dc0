//! The RTSP layer of a stream (docs/rtsp.md): the pure session bookkeeping
//! ([`sessions`]), the pure decisions about each message — which SETUP is carried, refused
//! or narrowed, which ports each side sees, which URLs are rebased, when flows go —
//! ([`policy`], events and `now` in, actions out), and the driver that reads and writes the
//! conversation, opens the media flows the policy asks for and runs the expiry timer
//! ([`driver`]). The wire format is `protocol::rtsp`; the media flows are `media`.

pub mod driver;
pub mod policy;
pub mod sessions;
