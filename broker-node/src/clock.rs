//! The clocks: the one place the node reads the time of day, and where its protocol
//! timers read the time.
//!
//! Wall-clock time enters the replicated state only inside commands (apply never reads
//! a clock), and crosses nodes only as ages (see `cluster::frame`), so that a node whose
//! clock is off cannot make another node expire sessions or messages early or late.
//! Protocol timers use `Instant`, read from [`now`] and passed in as arguments. This
//! module depends on nothing else in the crate.
//!
//! Both follow the runtime's clock when a simulation drives it: [`now`] reads tokio's
//! clock (the system's monotonic clock unless a simulation paused it), and a
//! simulation installs the time of day with [`install_wall_clock`].

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static WALL: OnceLock<fn() -> u64> = OnceLock::new();

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    match WALL.get() {
        Some(wall) => wall(),
        None => {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            ms.saturating_add_signed(offset_ms())
        }
    }
}

/// `TEST_FLOCKMQ_CLOCK_OFFSET_MS` (debug builds, which the tests run): this process's
/// time of day is off by that many milliseconds (negative: behind), as a machine's
/// clock can be.
#[cfg(debug_assertions)]
fn offset_ms() -> i64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var("TEST_FLOCKMQ_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

#[cfg(not(debug_assertions))]
fn offset_ms() -> i64 {
    0
}

/// Read the time of day from `wall` (Unix milliseconds) instead of the system's
/// clock, for the rest of the process: a simulated clock. Only the first call takes
/// effect; it says whether this one did.
pub fn install_wall_clock(wall: fn() -> u64) -> bool {
    WALL.set(wall).is_ok()
}

/// The monotonic time, as the runtime sees it: what protocol timers (keep alive,
/// idle connections) count from.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
