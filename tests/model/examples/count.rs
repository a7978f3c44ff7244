//! Runs one configuration and prints its figures: `cargo run -p model
//! --example count -- tdx|snp adjacent|overlapping [mutant letter]`.

use std::time::Instant;

use model::invariants::ALWAYS;
use model::{Config, ConversionModel, Mutant, Platform};
use stateright::{Checker, Model};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let platform = match args.first().map(String::as_str) {
        Some("snp") => Platform::Snp,
        _ => Platform::Tdx,
    };
    let mut cfg = match args.get(1).map(String::as_str) {
        Some("overlapping") => Config::overlapping(platform),
        _ => Config::adjacent(platform),
    };
    if let Some(letter) = args.get(2).and_then(|a| a.chars().next()) {
        cfg = cfg.with_mutant(
            *Mutant::ALL
                .iter()
                .find(|m| m.letter() == letter)
                .expect("a mutant letter"),
        );
    }
    if let Ok(v) = std::env::var("CPUS") {
        cfg = cfg.with_cpus(v.parse().expect("a CPU count"));
    }
    if let Ok(v) = std::env::var("SPEC") {
        cfg.speculate = v.parse().expect("a CPU mask");
    }
    if let Ok(v) = std::env::var("FAIL") {
        cfg.host_failures = v == "1";
    }
    let limit: usize = std::env::var("LIMIT").map_or(usize::MAX, |v| v.parse().expect("a count"));
    let model = ConversionModel::new(cfg);
    let start = Instant::now();
    let checker = model
        .clone()
        .checker()
        .threads(2)
        .target_state_count(limit)
        .spawn_bfs()
        .join();
    println!(
        "{} unique states ({} generated), depth {}, {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        start.elapsed()
    );
    let mut found: Vec<_> = checker.discoveries().into_iter().collect();
    found.sort_by_key(|(name, _)| *name);
    for (name, path) in found {
        let failure = ALWAYS.contains(&name) || name.starts_with("5'");
        println!(
            "{} {name} ({} steps)",
            if failure { "VIOLATED" } else { "reached" },
            path.into_actions().len()
        );
    }
    let _ = model.properties();
}
