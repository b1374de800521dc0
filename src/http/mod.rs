//! The HTTP layer of the connecting side (see `docs/http.md`).
//!
//! - [`device`]: the exposing side's TLS session to an `https://` device.
//! - [`rewrite`]: pure: what the device sees (Host, Origin, Referer) and what the browser
//!   sees (Location, Content-Location, Refresh, Set-Cookie) so it stays on the tunnel.
//! - [`status_page`]: pure: the status object as the status page.

pub mod device;
pub mod pages;
pub mod proxy;
pub mod rewrite;
pub mod route;
pub mod status_page;
