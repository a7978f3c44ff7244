//! Counterexample traces as text: each action, then the state it led to,
//! compactly.

use std::fmt::Write;

use stateright::Model;

use crate::engine::{Byte, Phase};
use crate::hw::{Attr, Host, PageUse, Pde, Pte, Tlb};
use crate::{Action, ConversionModel, State};

fn attr(a: Attr) -> &'static str {
    match a {
        Attr::Private => "P",
        Attr::Shared => "S",
    }
}

fn pte(e: Pte) -> String {
    format!("{}{}", attr(e.attr), if e.present { "" } else { "-" })
}

fn opt(a: Option<Attr>) -> &'static str {
    a.map_or(".", attr)
}

fn tlb(t: &Tlb) -> String {
    let mut s = String::new();
    if let Some(a) = t.huge {
        let _ = write!(s, "2M:{} ", attr(a));
    }
    let d: String = t.direct.iter().map(|&a| opt(a)).collect();
    let al: String = t.alias.iter().map(|&a| opt(a)).collect();
    let _ = write!(s, "dm:{d} al:{al}");
    if let Some((p, g)) = t.pde {
        let _ = write!(s, " pde->T{p}g{g}");
    }
    s
}

/// One line for a state: tables, TLBs, host, state bytes, threads.
pub fn summary(s: &State) -> String {
    let pde = match s.hw.pde {
        Pde::Huge(a) => format!("2M leaf {}", attr(a)),
        Pde::Table(p) => format!("->T{p}"),
    };
    let pages: Vec<String> =
        s.hw.pages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let usage = match p.usage {
                    PageUse::Free => "free",
                    PageUse::Reserved => "reserved",
                    PageUse::Table => "table",
                    PageUse::Retired => "retired",
                };
                let ptes: Vec<String> = p.ptes.iter().map(|&e| pte(e)).collect();
                if p.usage == PageUse::Free {
                    format!("T{i}g{} {usage}", p.generation)
                } else {
                    format!("T{i}g{} {usage} [{}]", p.generation, ptes.join(" "))
                }
            })
            .collect();
    let alias: Vec<String> = s.hw.alias.iter().map(|&e| pte(e)).collect();
    let host: Vec<&str> =
        s.hw.host
            .iter()
            .map(|h| match h {
                Host::Private => "private",
                Host::Pending => "pending",
                Host::Shared => "shared",
            })
            .collect();
    let bytes: Vec<String> = s
        .bytes
        .iter()
        .map(|b| match b {
            Byte::Private => "P".to_string(),
            Byte::Shared => "S".to_string(),
            Byte::Claimed(k) => format!("C{k}"),
            Byte::Poisoned => "X".to_string(),
        })
        .collect();
    let tlbs: Vec<String> =
        s.hw.tlbs
            .iter()
            .enumerate()
            .map(|(c, t)| format!("cpu{c}[{}]", tlb(t)))
            .collect();
    let threads: Vec<String> = s
        .convs
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let phase = match c.phase {
                Phase::Shootdown => format!("Shootdown(acks {:0w$b})", c.acks, w = s.hw.tlbs.len()),
                p => format!("{p:?}"),
            };
            format!("t{k}:op{} {phase}", c.pc)
        })
        .collect();
    format!(
        "pde {pde} | {} | alias [{}] | host [{}] | bytes [{}] | {} | {} | reader {:?}{}",
        pages.join(", "),
        alias.join(" "),
        host.join(" "),
        bytes.join(" "),
        tlbs.join(" "),
        threads.join(" "),
        s.reader,
        if s.violations != 0 {
            format!(" | VIOLATIONS {:#x}", s.violations)
        } else {
            String::new()
        }
    )
}

/// A path as numbered lines: the initial state, then each action and the
/// state after it.
pub fn render(model: &ConversionModel, path: &[(State, Option<Action>)]) -> String {
    let mut out = String::new();
    let Some((first, _)) = path.first() else { return out };
    let _ = writeln!(out, "init: {}", summary(first));
    for (i, (state, action)) in path.iter().enumerate() {
        let Some(action) = action else { continue };
        let next = model
            .next_state(state, *action)
            .expect("every action changes the state");
        let _ = writeln!(out, "{:>2}. {}", i + 1, describe(action));
        let _ = writeln!(out, "    {}", summary(&next));
    }
    out
}

pub fn describe(a: &Action) -> String {
    match a {
        Action::Step { thread, step } => format!("t{thread} {step:?}"),
        Action::Ack { thread, cpu } => format!("cpu{cpu} acks t{thread}'s shootdown"),
        Action::Read { half, via, how } => format!("reader {half:?} half via {via:?} ({how:?})"),
        Action::Speculate { cpu, via, frame, how } => format!("cpu{cpu} walks {via:?} frame {frame} ({how:?})"),
    }
}
