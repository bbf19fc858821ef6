//! The hasher of the maps whose iteration order shows in what the node does (routing,
//! retained look-ups, the connection registry, liveness): foldhash, seeded at random
//! once per process (topics and client ids come from clients), unless a simulation
//! fixed the seed on its thread with [`fix_seed`], so that a run can repeat itself.

use std::cell::Cell;
use std::hash::BuildHasher;

use foldhash::fast::{FoldHasher, SeedableRandomState};
use foldhash::SharedSeed;

thread_local! {
    /// The fixed seed of maps made on this thread, and the next map's own seed.
    static FIXED: Cell<Option<(&'static SharedSeed, u64)>> = const { Cell::new(None) };
}

/// Seed every map made on this thread from now on from `seed` instead of the
/// process's random seed, each map its own seed in the order they are made. A
/// simulation calls it at the start of each run on the thread that runs it.
pub fn fix_seed(seed: u64) {
    let shared: &'static SharedSeed = Box::leak(Box::new(SharedSeed::from_u64(seed)));
    FIXED.with(|f| f.set(Some((shared, 0))));
}

/// A map's hasher builder: random per process, or fixed by [`fix_seed`].
#[derive(Clone, Debug)]
pub struct State(SeedableRandomState);

impl Default for State {
    fn default() -> Self {
        let fixed = FIXED.with(|f| {
            let (shared, next) = f.get()?;
            f.set(Some((shared, next + 1)));
            Some(SeedableRandomState::with_seed(next, shared))
        });
        State(fixed.unwrap_or_else(SeedableRandomState::random))
    }
}

impl BuildHasher for State {
    type Hasher = FoldHasher<'static>;

    fn build_hasher(&self) -> FoldHasher<'static> {
        self.0.build_hasher()
    }
}
