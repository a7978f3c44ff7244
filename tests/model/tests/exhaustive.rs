//! The unmutated model, exhaustively: no invariant broken anywhere, every
//! run ends with every thread finished, and the interesting paths are
//! reached (so the invariants are not vacuous). The state-count floors
//! catch a model that silently shrank.

use std::time::Instant;

use model::invariants::{
    ALWAYS, BOTH_CONVERTED, EVENTUALLY_DONE, FIXUP, OUT_OF_TABLES, POISONED, REFUSED, REUSED, WHOLE,
};
use model::{Config, ConversionModel, Platform};
use stateright::{Checker, Model};

fn check(cfg: Config, floor: usize, reached: &[&'static str]) {
    let name = format!("{:?}", cfg.platform);
    let start = Instant::now();
    let checker = ConversionModel::new(cfg).checker().threads(2).spawn_bfs().join();
    let unique = checker.unique_state_count();
    println!(
        "{name}: {unique} unique states, {} generated, depth {}, {:.2?}",
        checker.state_count(),
        checker.max_depth(),
        start.elapsed()
    );
    for invariant in ALWAYS.iter().chain([&EVENTUALLY_DONE]) {
        if let Some(path) = checker.discovery(invariant) {
            let model = checker.model();
            panic!(
                "{name}: {invariant} broken:\n{}",
                model::trace::render(model, &path.into_vec())
            );
        }
    }
    for goal in reached {
        assert!(checker.discovery(goal).is_some(), "{name}: never reached: {goal}");
    }
    assert!(unique > floor, "{name}: {unique} states, expected more than {floor}");
}

const ADJACENT: &[&str] = &[FIXUP, WHOLE, REUSED, POISONED, BOTH_CONVERTED, REFUSED, OUT_OF_TABLES];
const OVERLAPPING: &[&str] = &[FIXUP, WHOLE, POISONED, BOTH_CONVERTED, REFUSED];

#[test]
fn tdx_adjacent_conversions() {
    check(Config::adjacent(Platform::Tdx), 265_000, ADJACENT);
}

#[test]
fn snp_adjacent_conversions() {
    check(Config::adjacent(Platform::Snp), 310_000, ADJACENT);
}

#[test]
fn tdx_overlapping_conversions() {
    check(Config::overlapping(Platform::Tdx), 100_000, OVERLAPPING);
}

#[test]
fn snp_overlapping_conversions() {
    check(Config::overlapping(Platform::Snp), 100_000, OVERLAPPING);
}
