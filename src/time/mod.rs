//! Time for the drivers: the one clock they read (tokio's, so `time::pause()` drives every
//! driver in tests) and pure schedules that take it as input.
//!
//! Pure state machines take `now: std::time::Instant` as an argument; drivers get it from
//! [`now`], which reads tokio's clock, and sleep with tokio's timers. Nothing in a driver
//! reads `std::time::Instant::now()` directly.

pub mod backoff;
pub mod rate;

use std::time::Instant;

/// Now, on tokio's clock (virtual under `tokio::time::pause()`).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Sleeps until `deadline`, or forever when there is none (for `select!` arms).
pub async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
