//! The engine's own code under the shuttle schedule explorer.
//!
//! Built with `--cfg shuttle` (`scripts/schedules` does it), the engine's
//! state claims, table lock, alias registry and pool lock are shuttle's
//! primitives, so shuttle decides at each of them which simulated CPU runs
//! next. Each test here runs a scenario many times, half under shuttle's
//! random scheduler and half under PCT (probabilistic concurrency testing,
//! which finds a bug of depth `d` with a known lower-bound probability per
//! run), and checks the engine contract's invariants at the end of every
//! schedule. A failing schedule is printed by shuttle and can be replayed.
//!
//! Without the cfg this crate builds nothing but a skipped test, so the
//! workspace's ordinary build and test run are unchanged.
#![cfg_attr(not(shuttle), allow(dead_code))]

/// How many schedules each scheduler explores per scenario: the
/// `SCHEDULES` environment variable, else `default`.
pub fn schedules(default: usize) -> usize {
    std::env::var("SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs `scenario` under `iterations` random schedules, then `iterations`
/// PCT schedules of depth 3, each on a fresh world the scenario builds.
/// Panics with shuttle's replayable schedule on the first failure.
#[cfg(shuttle)]
pub fn explore(iterations: usize, scenario: impl Fn() + Send + Sync + 'static) {
    use shuttle::scheduler::{PctScheduler, RandomScheduler};
    use shuttle::{Config, Runner};
    use std::sync::Arc;

    let config = || {
        let mut config = Config::new();
        // The engine's debug-build frames are large: shuttle's default
        // 60 KiB stacks overflow.
        config.stack_size = 4 << 20;
        config
    };
    let scenario = Arc::new(scenario);
    let run = |scenario: Arc<dyn Fn() + Send + Sync>| move || scenario();
    let random = Runner::new(RandomScheduler::new(iterations), config()).run(run(scenario.clone()));
    let pct = Runner::new(PctScheduler::new(3, iterations), config()).run(run(scenario));
    assert_eq!(random + pct, 2 * iterations, "every schedule ran to its end");
}
