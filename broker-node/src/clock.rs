//! The wall clock: the one place the node reads the time of day.
//!
//! Wall-clock time enters the replicated state only inside commands (apply never reads
//! a clock), and crosses nodes only as ages (see `cluster::frame`), so that a node whose
//! clock is off cannot make another node expire sessions or messages early or late.
//! Protocol timers use `Instant`, passed in as arguments. This module depends on
//! nothing else in the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
