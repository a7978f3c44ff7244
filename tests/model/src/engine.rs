//! The engine's transaction (`Engine::transaction`), one atomic step per
//! piece that another CPU can observe between: what runs under one hold of
//! the table lock is split only where hardware walkers could see the
//! intermediate page tables.

use crate::hw::{frames_of, Attr, Host, PageUse, Pde, Pte, FRAMES, REGION};
use crate::mutants::Mutant;
use crate::{Config, Platform, State, Violation};

/// What a thread asks of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `Engine::convert` of the frames in the mask to `to`.
    Convert { frames: u8, to: Attr },
    /// `Engine::release_deferred_tables`.
    ReleaseDeferred,
}

/// A frame's state byte (`state.rs`). The in-flight codes a vmalloc-style
/// range needs (unmapped, sent, restored) are not modelled: a linear
/// conversion goes from claimed straight to settled or poisoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Byte {
    Private,
    Shared,
    Claimed(u8),
    Poisoned,
}

impl Byte {
    pub fn settled(attr: Attr) -> Byte {
        match attr {
            Attr::Private => Byte::Private,
            Attr::Shared => Byte::Shared,
        }
    }
}

/// One host or firmware call of `Platform::convert`, over all the frames
/// of the conversion (one physical run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostCall {
    MapGpaShared,
    MapGpaPrivate,
    Accept,
    PvalidateRescind,
    PscShared,
    PscPrivate,
    PvalidateValidate,
}

impl HostCall {
    /// The calls `platform/{tdx,snp}.rs` make, in order.
    pub fn sequence(cfg: &Config, to: Attr) -> &'static [HostCall] {
        use HostCall::*;
        match (cfg.platform, to) {
            (Platform::Tdx, Attr::Shared) => &[MapGpaShared],
            (Platform::Tdx, Attr::Private) if cfg.mutant == Some(Mutant::AcceptBeforeMapGpa) => {
                &[Accept, MapGpaPrivate]
            }
            (Platform::Tdx, Attr::Private) => &[MapGpaPrivate, Accept],
            (Platform::Snp, Attr::Shared) => &[PvalidateRescind, PscShared],
            (Platform::Snp, Attr::Private) => &[PscPrivate, PvalidateValidate],
        }
    }

    /// The frame's host state after the call, for each outcome the host may
    /// choose (`None`: the call fails).
    fn outcomes(self, host: Host) -> &'static [Option<Host>] {
        use HostCall::*;
        match (self, host) {
            (MapGpaShared, _) | (PscShared, _) => &[Some(Host::Shared)],
            // The VMM may back a GPA mapped private with a fresh page, which
            // the guest must accept, whatever the GPA held before.
            (MapGpaPrivate, _) | (PscPrivate, _) => &[Some(Host::Pending)],
            (Accept, Host::Pending) | (Accept, Host::Private) => &[Some(Host::Private)],
            // ACCEPT of a GPA not mapped private exits to the VMM, which may
            // add (and so let the guest accept) a page, or not.
            (Accept, Host::Shared) => &[Some(Host::Private), None],
            (PvalidateValidate, Host::Pending) => &[Some(Host::Private)],
            (PvalidateRescind, Host::Private) => &[Some(Host::Pending)],
            (PvalidateValidate, _) | (PvalidateRescind, _) => &[None],
        }
    }

    /// SNP's PVALIDATE touches the frame through a virtual address.
    fn pvalidates(self) -> bool {
        matches!(self, HostCall::PvalidateRescind | HostCall::PvalidateValidate)
    }
}

/// Where a thread is in its current op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before the op: takes the table lock and claims.
    Idle,
    /// The lock dropped to take a table page from the frame source.
    Fill,
    /// Taking the lock again after the frame source (`filled`: it gave one).
    Relock { filled: bool },
    /// Lock held: split the huge leaf.
    Split,
    /// Lock held: the direct map's entries of the frames not present.
    UnmapDirect,
    /// Lock held: the alias's entries not present, then the deferred list
    /// taken and the lock dropped.
    UnmapAlias,
    /// Waiting for every CPU's acknowledgement.
    Shootdown,
    /// The tables taken from the deferred list freed.
    FreeDeferred,
    /// The platform's calls, the index into [`HostCall::sequence`].
    Host(u8),
    /// Takes the lock: the entries present with the new attribute.
    Restore,
    /// Lock held (or taken): collapse, settle the state bytes, drop the lock.
    Collapse,
    /// Every op done.
    Finished,
}

/// How an op ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Converted,
    /// A frame was not in the state the conversion starts from (another
    /// conversion holds it, or it is on the other side already).
    Refused,
    OutOfTableMemory,
    /// The host failed: the frames are poisoned.
    Poisoned,
    Released,
}

/// One thread running ops on its own CPU.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Conv {
    pub pc: u8,
    pub phase: Phase,
    /// The table page in the reserve, if any.
    pub reserve: Option<u8>,
    /// This conversion split the leaf (for mutant g).
    pub split_here: bool,
    /// CPUs yet to acknowledge the shootdown.
    pub acks: u8,
    /// Frames whose direct-map and alias ranges the shootdown names.
    pub shoot_direct: u8,
    pub shoot_alias: u8,
    /// Pages taken off the deferred list, freed after the shootdown.
    pub pending: u8,
    pub failed: bool,
    pub outcomes: Vec<Outcome>,
}

impl Conv {
    pub fn new() -> Self {
        Conv {
            pc: 0,
            phase: Phase::Idle,
            reserve: None,
            split_here: false,
            acks: 0,
            shoot_direct: 0,
            shoot_alias: 0,
            pending: 0,
            failed: false,
            outcomes: Vec::new(),
        }
    }
}

impl Default for Conv {
    fn default() -> Self {
        Self::new()
    }
}

/// One atomic step of a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    Claim,
    Fill(Option<u8>),
    Relock,
    Split,
    UnmapDirect,
    UnmapAlias,
    FreeDeferred,
    Host { call: HostCall, ok: bool },
    Restore,
    CollapseAndSettle,
    TakeDeferred,
}

fn op(cfg: &Config, s: &State, k: usize) -> Op {
    cfg.programs[k][s.convs[k].pc as usize]
}

fn convert_op(cfg: &Config, s: &State, k: usize) -> (u8, Attr) {
    match op(cfg, s, k) {
        Op::Convert { frames, to } => (frames, to),
        Op::ReleaseDeferred => unreachable!("a conversion step in a release"),
    }
}

fn has(cfg: &Config, m: Mutant) -> bool {
    cfg.mutant == Some(m)
}

/// The steps thread `k` may take now.
pub fn steps(cfg: &Config, s: &State, k: usize, out: &mut Vec<Step>) {
    let c = &s.convs[k];
    let me = Some(k as u8);
    let free_lock = s.lock.is_none();
    match c.phase {
        Phase::Idle if free_lock => match op(cfg, s, k) {
            Op::Convert { .. } => out.push(Step::Claim),
            Op::ReleaseDeferred => out.push(Step::TakeDeferred),
        },
        Phase::Fill => {
            let free: Vec<u8> = (0..s.hw.pages.len())
                .filter(|&p| s.hw.pages[p].usage == PageUse::Free)
                .map(|p| p as u8)
                .collect();
            if free.is_empty() {
                out.push(Step::Fill(None));
            }
            out.extend(free.into_iter().map(|p| Step::Fill(Some(p))));
        }
        Phase::Relock { .. } if free_lock => out.push(Step::Relock),
        Phase::Split if s.lock == me => out.push(Step::Split),
        Phase::UnmapDirect if s.lock == me => out.push(Step::UnmapDirect),
        Phase::UnmapAlias if s.lock == me => out.push(Step::UnmapAlias),
        Phase::FreeDeferred => out.push(Step::FreeDeferred),
        Phase::Host(i) => {
            let (frames, to) = convert_op(cfg, s, k);
            let call = HostCall::sequence(cfg, to)[i as usize];
            let can_succeed = frames_of(frames).all(|f| call.outcomes(s.hw.host[f]).iter().any(Option::is_some));
            let can_fail = cfg.host_failures || frames_of(frames).any(|f| call.outcomes(s.hw.host[f]).contains(&None));
            if can_succeed {
                out.push(Step::Host { call, ok: true });
            }
            if can_fail {
                out.push(Step::Host { call, ok: false });
            }
        }
        Phase::Restore if free_lock => out.push(Step::Restore),
        Phase::Collapse if free_lock || s.lock == me => out.push(Step::CollapseAndSettle),
        _ => {}
    }
}

/// Applies `step` of thread `k`.
pub fn apply(cfg: &Config, s: &mut State, k: usize, step: Step) {
    match step {
        Step::Claim => claim(cfg, s, k),
        Step::Fill(page) => {
            // `Reserve::fill_to`, with no lock held.
            if let Some(p) = page {
                s.hw.pages[p as usize].usage = PageUse::Reserved;
                s.convs[k].reserve = Some(p);
            }
            s.convs[k].phase = Phase::Relock { filled: page.is_some() };
        }
        Step::Relock => {
            s.lock = Some(k as u8);
            let Phase::Relock { filled } = s.convs[k].phase else {
                unreachable!()
            };
            if !filled && needed(s) == 0 {
                // The source ran dry, but another thread's split made the
                // page unnecessary: planned again, the conversion goes on.
                s.convs[k].phase = split_or_unmap(s);
            } else if !filled {
                // `OutOfTableMemory`: nothing changed.
                release_claims(cfg, s, k);
                s.lock = None;
                release_reserve(s, k);
                finish(cfg, s, k, Outcome::OutOfTableMemory);
            } else {
                // Merged or not, one page is all a plan can need, and it is
                // in the reserve now.
                s.convs[k].phase = split_or_unmap(s);
            }
        }
        Step::Split => split(cfg, s, k),
        Step::UnmapDirect => {
            let (frames, _) = convert_op(cfg, s, k);
            unmap_direct(cfg, s, frames);
            s.convs[k].shoot_direct |= frames;
            s.convs[k].phase = Phase::UnmapAlias;
        }
        Step::UnmapAlias => {
            let (frames, _) = convert_op(cfg, s, k);
            if !has(cfg, Mutant::SkipNotPresent) {
                for f in frames_of(frames) {
                    s.hw.alias[f].present = false;
                }
            }
            s.convs[k].shoot_alias |= frames;
            take_deferred(s, k);
            s.lock = None;
            release_reserve(s, k);
            if has(cfg, Mutant::ShootdownAfterHost) {
                s.convs[k].phase = Phase::Host(0);
            } else {
                start_shootdown(cfg, s, k);
            }
        }
        Step::FreeDeferred => {
            free_pending(s, k);
            after_free(cfg, s, k);
        }
        Step::Host { call, ok } => host_call(cfg, s, k, call, ok),
        Step::Restore => {
            s.lock = Some(k as u8);
            restore(s, k, cfg);
            if has(cfg, Mutant::PresentBeforeHost) {
                s.lock = None;
                s.convs[k].phase = Phase::Host(0);
            } else {
                s.convs[k].phase = Phase::Collapse;
            }
        }
        Step::CollapseAndSettle => {
            s.lock = Some(k as u8);
            collapse(cfg, s);
            let (frames, to) = convert_op(cfg, s, k);
            let failed = s.convs[k].failed;
            if !failed {
                for f in frames_of(frames) {
                    s.bytes[f] = Byte::settled(to);
                }
            }
            s.lock = None;
            finish(cfg, s, k, if failed { Outcome::Poisoned } else { Outcome::Converted });
        }
        Step::TakeDeferred => {
            // `release_deferred_tables`: the list taken under the lock.
            take_deferred(s, k);
            if s.convs[k].pending == 0 {
                finish(cfg, s, k, Outcome::Released);
            } else {
                start_shootdown(cfg, s, k);
            }
        }
    }
}

/// `Engine::claim` (under the table lock, taken here) and `plan`.
fn claim(cfg: &Config, s: &mut State, k: usize) {
    let (frames, to) = convert_op(cfg, s, k);
    let from = Byte::settled(other(to));
    if frames_of(frames).any(|f| s.bytes[f] != from) {
        // A frame refused: the claims made so far are given back, so
        // nothing changed (the lock hides the intermediate bytes).
        finish(cfg, s, k, Outcome::Refused);
        return;
    }
    for f in frames_of(frames) {
        s.bytes[f] = Byte::Claimed(k as u8);
    }
    s.lock = Some(k as u8);
    if needed(s) > usize::from(s.convs[k].reserve.is_some()) {
        // The frame source is called with the lock dropped.
        s.lock = None;
        s.convs[k].phase = Phase::Fill;
    } else {
        s.convs[k].phase = split_or_unmap(s);
    }
}

/// `tables_needed`: one page table if the converted frames' boundary falls
/// inside the huge leaf (always: the region is never converted whole).
fn needed(s: &State) -> usize {
    usize::from(matches!(s.hw.pde, Pde::Huge(_)))
}

fn split_or_unmap(s: &State) -> Phase {
    if needed(s) > 0 {
        Phase::Split
    } else {
        Phase::UnmapDirect
    }
}

fn other(a: Attr) -> Attr {
    match a {
        Attr::Private => Attr::Shared,
        Attr::Shared => Attr::Private,
    }
}

/// `split_at` / `split_leaf`: the reserved page filled with the huge
/// leaf's translation, then the PDE pointed to it.
fn split(cfg: &Config, s: &mut State, k: usize) {
    let Pde::Huge(attr) = s.hw.pde else {
        unreachable!("split entered only under a huge leaf")
    };
    match s.convs[k].reserve.take() {
        Some(p) => {
            let page = &mut s.hw.pages[p as usize];
            page.usage = PageUse::Table;
            page.ptes = [Pte { present: true, attr }; FRAMES];
            s.hw.pde = Pde::Table(p);
            s.convs[k].split_here = true;
        }
        None => {
            // The plan promised a page: `split_range`'s debug assertion.
            s.violations |= Violation::SPLIT_UNRESERVED;
            s.convs[k].phase = Phase::UnmapDirect;
            return;
        }
    }
    if has(cfg, Mutant::NoFlushAfterSplit) {
        let (frames, _) = convert_op(cfg, s, k);
        unmap_direct(cfg, s, frames);
        s.convs[k].phase = Phase::UnmapAlias;
    } else {
        s.convs[k].phase = Phase::UnmapDirect;
    }
}

/// `leaves::unmap` over the direct map (the engine's own walk of the live
/// tables, under the lock).
fn unmap_direct(cfg: &Config, s: &mut State, frames: u8) {
    let Pde::Table(p) = s.hw.pde else {
        unreachable!("the frames' boundaries were split first")
    };
    let page = &mut s.hw.pages[p as usize];
    if page.usage != PageUse::Table {
        s.violations |= Violation::WALK_FREED;
    }
    if !has(cfg, Mutant::SkipNotPresent) {
        for f in frames_of(frames) {
            page.ptes[f].present = false;
        }
    }
}

/// The deferred list swapped out under the lock: its tables are freed
/// after this thread's shootdown, which names their regions.
fn take_deferred(s: &mut State, k: usize) {
    let pending = s.deferred;
    s.deferred = 0;
    s.convs[k].pending = pending;
    if pending != 0 {
        s.convs[k].shoot_direct |= REGION;
    }
}

/// `Reserve::release`: a page the split did not use goes back.
fn release_reserve(s: &mut State, k: usize) {
    if let Some(p) = s.convs[k].reserve.take() {
        s.hw.pages[p as usize].usage = PageUse::Free;
    }
}

/// `Engine::shootdown`: waits for every CPU, the initiator included.
fn start_shootdown(cfg: &Config, s: &mut State, k: usize) {
    s.convs[k].acks = ((1u16 << cfg.cpus) - 1) as u8;
    s.convs[k].phase = Phase::Shootdown;
}

/// One CPU acknowledges the shootdown's IPI: its translations of the
/// named ranges are gone.
pub fn ack(cfg: &Config, s: &mut State, k: usize, cpu: usize) {
    let (direct, alias) = (s.convs[k].shoot_direct, s.convs[k].shoot_alias);
    s.hw.flush(cpu, direct, alias);
    s.convs[k].acks &= !(1 << cpu);
    if s.convs[k].acks == 0 {
        s.convs[k].shoot_direct = 0;
        s.convs[k].shoot_alias = 0;
        if s.convs[k].pending != 0 {
            s.convs[k].phase = Phase::FreeDeferred;
        } else {
            after_free(cfg, s, k);
        }
    }
}

fn free_pending(s: &mut State, k: usize) {
    for p in 0..s.hw.pages.len() {
        if s.convs[k].pending & (1 << p) != 0 {
            free_page(s, p);
        }
    }
    s.convs[k].pending = 0;
}

/// `FrameSource::free_frame`: the page's contents are no longer the
/// region's translation.
fn free_page(s: &mut State, p: usize) {
    let page = &mut s.hw.pages[p];
    page.usage = PageUse::Free;
    page.generation += 1;
    page.ptes = [Pte::PRIVATE; FRAMES];
}

/// What follows the shootdown and the deferred frees.
fn after_free(cfg: &Config, s: &mut State, k: usize) {
    match op(cfg, s, k) {
        Op::ReleaseDeferred => finish(cfg, s, k, Outcome::Released),
        Op::Convert { .. } if has(cfg, Mutant::ShootdownAfterHost) || has(cfg, Mutant::PresentBeforeHost) => {
            s.convs[k].phase = Phase::Restore
        }
        Op::Convert { .. } => s.convs[k].phase = Phase::Host(0),
    }
}

/// `send` -> `Platform::convert`: one call over every frame. A failure
/// poisons them (their state bytes settle `Poisoned` at once) and ends the
/// calls.
fn host_call(cfg: &Config, s: &mut State, k: usize, call: HostCall, ok: bool) {
    let (frames, to) = convert_op(cfg, s, k);
    if call.pvalidates() {
        // Through the private scratch window (only this CPU maps it, and it
        // is invalidated locally around the call), or for mutant (e) a
        // public mapping.
        let window = if has(cfg, Mutant::PvalidatePublic) {
            Attr::Shared
        } else {
            Attr::Private
        };
        if window != Attr::Private {
            s.violations |= Violation::PVALIDATE_PUBLIC;
        }
    }
    let Phase::Host(i) = s.convs[k].phase else {
        unreachable!()
    };
    if ok {
        for f in frames_of(frames) {
            let next = call
                .outcomes(s.hw.host[f])
                .iter()
                .flatten()
                .next()
                .copied()
                .expect("a successful outcome exists");
            s.hw.host[f] = next;
        }
        let calls = HostCall::sequence(cfg, to);
        if (i as usize) + 1 < calls.len() {
            s.convs[k].phase = Phase::Host(i + 1);
            return;
        }
    } else {
        for f in frames_of(frames) {
            s.bytes[f] = Byte::Poisoned;
        }
        s.convs[k].failed = true;
    }
    if has(cfg, Mutant::ShootdownAfterHost) {
        start_shootdown(cfg, s, k);
    } else if has(cfg, Mutant::PresentBeforeHost) {
        s.convs[k].phase = Phase::Collapse;
    } else {
        s.convs[k].phase = Phase::Restore;
    }
}

/// `restore_all` for a linear conversion: with every call done, each entry
/// the engine made not present is present again with the new attribute;
/// after a failure nothing (every frame went to the one failed call and is
/// poisoned). As `leaves::restore` does, an entry found present (only a
/// mutant leaves one) is left alone.
fn restore(s: &mut State, k: usize, cfg: &Config) {
    if s.convs[k].failed {
        return;
    }
    let (frames, to) = convert_op(cfg, s, k);
    let restored = Pte {
        present: true,
        attr: to,
    };
    for f in frames_of(frames) {
        if let Pde::Table(p) = s.hw.pde {
            let page = &mut s.hw.pages[p as usize];
            if page.usage != PageUse::Table {
                s.violations |= Violation::WALK_FREED;
            }
            if !page.ptes[f].present {
                page.ptes[f] = restored;
            }
        }
        if !s.hw.alias[f].present {
            s.hw.alias[f] = restored;
        }
    }
}

/// `collapse_all` / `try_collapse`: a table whose entries are all present
/// and alike becomes a huge leaf; the page goes to the deferred list.
fn collapse(cfg: &Config, s: &mut State) {
    let Pde::Table(p) = s.hw.pde else { return };
    let page = s.hw.pages[p as usize];
    let attr = page.ptes[0].attr;
    if !page.ptes.iter().all(|e| e.present && e.attr == attr) {
        return;
    }
    s.hw.pde = Pde::Huge(attr);
    if has(cfg, Mutant::FreeBeforeShootdown) {
        free_page(s, p as usize);
    } else {
        s.hw.pages[p as usize].usage = PageUse::Retired;
        s.deferred |= 1 << p;
    }
    // `merges` bumped: a conversion filling its reserve plans again when
    // it relocks, which in one region never needs more than the one page
    // it holds, so the bump itself is not modelled.
}

/// Every claimed frame back to the state it had (`release_claims`).
fn release_claims(cfg: &Config, s: &mut State, k: usize) {
    let (frames, to) = convert_op(cfg, s, k);
    for f in frames_of(frames) {
        s.bytes[f] = Byte::settled(other(to));
    }
}

fn finish(cfg: &Config, s: &mut State, k: usize, outcome: Outcome) {
    let c = &mut s.convs[k];
    c.outcomes.push(outcome);
    c.pc += 1;
    c.reserve = None;
    c.split_here = false;
    c.failed = false;
    c.phase = if (c.pc as usize) < cfg.programs[k].len() {
        Phase::Idle
    } else {
        Phase::Finished
    };
}
