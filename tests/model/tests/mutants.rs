//! Every mutant yields a counterexample to the invariant it should break;
//! the traces go to `docs/model-traces.md` (`WRITE_TRACES=1` rewrites it;
//! otherwise the committed file must match).

use std::collections::BTreeSet;
use std::fmt::Write;

use model::invariants::*;
use model::{Config, ConversionModel, Mutant, Platform};
use stateright::{Checker, HasDiscoveries, Model};

/// The invariant each mutant is expected to break, per platform.
fn expected(m: Mutant) -> (&'static [Platform], &'static str) {
    const BOTH: &[Platform] = &[Platform::Tdx, Platform::Snp];
    match m {
        Mutant::SkipNotPresent => (BOTH, NO_BAD_ACCESS),
        Mutant::ShootdownAfterHost => (BOTH, NO_BAD_ACCESS),
        Mutant::FreeBeforeShootdown => (BOTH, NO_FREED_WALK),
        Mutant::PresentBeforeHost => (BOTH, NO_BAD_ACCESS),
        Mutant::PvalidatePublic => (&[Platform::Snp], NO_BAD_ACCESS),
        Mutant::AcceptBeforeMapGpa => (&[Platform::Tdx], BYTES_AGREE),
        Mutant::NoFlushAfterSplit => (BOTH, NO_BAD_ACCESS),
    }
}

fn mutant_name(m: Mutant) -> String {
    format!("({}) {m:?}", m.letter())
}

/// Runs one mutant until the expected invariant breaks (breadth first on
/// one thread, so the trace is a shortest one and the same every run).
fn counterexample(m: Mutant, platform: Platform) -> String {
    let (_, invariant) = expected(m);
    // An honest host: the counterexample is the mutant's own doing.
    let cfg = Config {
        host_failures: false,
        ..Config::adjacent(platform)
    };
    let model = ConversionModel::new(cfg.with_mutant(m));
    let checker = model
        .clone()
        .checker()
        .threads(1)
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([invariant])))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(invariant)
        .unwrap_or_else(|| panic!("{} on {platform:?}: no counterexample to {invariant}", mutant_name(m)));
    let mut broken: Vec<&str> = ALWAYS
        .iter()
        .copied()
        .filter(|name| checker.discovery(name).is_some())
        .collect();
    broken.sort();
    let steps = path.clone().into_actions().len();
    let mut out = String::new();
    let _ = writeln!(out, "### {} on {platform:?}\n", mutant_name(m));
    let _ = writeln!(out, "Breaks **{invariant}** after {steps} steps.");
    let _ = writeln!(
        out,
        "Invariants broken by the time it was found: {}.\n",
        broken.join("; ")
    );
    let _ = writeln!(out, "```text\n{}```\n", model::trace::render(&model, &path.into_vec()));
    out
}

#[test]
fn every_mutant_yields_a_counterexample() {
    let mut doc = String::from(include_str!("traces-header.md"));
    for m in Mutant::ALL {
        for &platform in expected(m).0 {
            let section = counterexample(m, platform);
            println!("{section}");
            doc.push_str(&section);
        }
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/model-traces.md");
    if std::env::var_os("WRITE_TRACES").is_some() {
        std::fs::write(path, &doc).expect("write docs/model-traces.md");
    } else {
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == doc,
            "docs/model-traces.md is out of date: run WRITE_TRACES=1 cargo test -p model --test mutants"
        );
    }
}
