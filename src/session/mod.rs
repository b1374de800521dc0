//! Pure session logic with time as input: the idle grace timer and reconnect backoff.
//! The async drivers in `roles::connect` read the clock and act on what these return.

pub mod backoff;
pub mod fec;
pub mod idle;
pub mod priority;
pub mod punch;
pub mod repair;
pub mod rtsp;
