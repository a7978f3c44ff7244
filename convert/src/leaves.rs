//! Making the leaves of a virtual range not present, and present again.
//!
//! The engine restores exactly what it took away. Making a range not
//! present touches only present leaves; an entry the OS left not present
//! (a guard page with its frame kept, software bits only, zero, at any
//! level) is a hole: in a linear mapping it is recorded in the state byte
//! of each frame it would map, and making the range present again skips
//! it, so it stays as the OS left it, bit for bit.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::aliases::Alias;
use crate::counters::Counters;
use crate::pte::{Level, Visibility, HUGE, PRESENT};
use crate::state::{Hole, StateTable};
use crate::tables::{PhysMem, Tables, Walk};

const PAGE: u64 = 4096;

/// The first address after `cursor` that starts a `span`-sized region
/// (saturating at the top of the address space).
pub(crate) fn next_boundary(cursor: u64, span: u64) -> u64 {
    (cursor | (span - 1)).saturating_add(1)
}

/// How the frames behind a range are found.
#[derive(Clone, Copy)]
pub(crate) enum Mapping {
    /// A linear mapping: the frame of `va` is `alias.pa + (va - alias.va)`;
    /// its holes are recorded as `hole`.
    Linear(Alias, Hole),
    /// The range's own entries say (a vmalloc-style range, which has no
    /// holes: a conversion refuses one that is not fully mapped).
    Entries,
}

impl Mapping {
    fn linear_frame(&self, va: u64) -> Option<(u64, Hole)> {
        match *self {
            Mapping::Linear(alias, hole) => Some((alias.pa + (va - alias.va), hole)),
            Mapping::Entries => None,
        }
    }
}

/// Whether an entry at `level` maps memory rather than a table. Bit 7 of a
/// PML4 or PML5 entry is reserved, not PS: those entries are never leaves,
/// whatever they hold.
pub(crate) fn is_leaf(level: Level, entry: u64) -> bool {
    level == Level::Pt || (level.can_be_leaf() && entry & HUGE != 0)
}

/// Visits every entry that translates `[va, va + len)`, running along each
/// table while its entries are leaves or not present, and descending where
/// they point to a table. `visit(level, slot, cursor, stop)` handles the
/// entry covering `[cursor, stop)`; an `Err` ends the walk.
pub(crate) fn try_for_each_entry<M: PhysMem, E>(
    t: &Tables<'_, M>,
    va: u64,
    len: u64,
    mut visit: impl FnMut(Level, &AtomicU64, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let end = va + len;
    let mut cursor = va;
    while cursor < end {
        let (level, loc) = match t.walk(cursor) {
            Walk::Leaf { level, loc, .. } | Walk::Absent { level, loc, .. } => (level, loc),
        };
        for slot in &t.entries(loc.table)[loc.index..] {
            if cursor >= end {
                break;
            }
            let entry = slot.load(Ordering::Acquire);
            if entry & PRESENT != 0 && !is_leaf(level, entry) {
                break;
            }
            let stop = next_boundary(cursor, level.span()).min(end);
            visit(level, slot, cursor, stop)?;
            cursor = stop;
        }
    }
    Ok(())
}

/// [`try_for_each_entry`] with a visitor that never stops the walk.
pub(crate) fn for_each_entry<M: PhysMem>(
    t: &Tables<'_, M>,
    va: u64,
    len: u64,
    mut visit: impl FnMut(Level, &AtomicU64, u64, u64),
) {
    let walked = try_for_each_entry(t, va, len, |level, slot, cursor, stop| {
        visit(level, slot, cursor, stop);
        Ok::<(), core::convert::Infallible>(())
    });
    let Ok(()) = walked;
}

/// Makes every present leaf of `[va, va + len)` not present (the range's
/// boundaries must start leaves: split first). Not-present entries of a
/// linear mapping are recorded as holes of the frames they cover.
pub(crate) fn unmap<M: PhysMem>(
    t: &Tables<'_, M>,
    states: &StateTable<'_>,
    mapping: Mapping,
    va: u64,
    len: u64,
    counters: &Counters,
) {
    let mut writes = 0;
    for_each_entry(t, va, len, |level, slot, cursor, stop| {
        let entry = slot.load(Ordering::Acquire);
        if entry & PRESENT != 0 {
            debug_assert!(
                cursor % level.span() == 0 && stop - cursor == level.span(),
                "split to fit"
            );
            // A plain store, not a locked and: the table lock keeps other
            // CPUs' software out, and an accessed/dirty bit the hardware
            // sets meanwhile is moot for a page whose contents the
            // conversion destroys.
            slot.store(entry & !PRESENT, Ordering::Release);
            writes += 1;
        } else if let Some((first, hole)) = mapping.linear_frame(cursor) {
            for pa in (first..first + (stop - cursor)).step_by(PAGE as usize) {
                states.mark_hole(pa, hole);
            }
        }
    });
    Counters::add(&counters.pte_writes, writes);
}

/// Makes present again the leaves of `[va, va + len)` that [`unmap`] made
/// not present, with the encryption bits of `side(first frame, bytes)`;
/// `None` keeps a leaf not present (a poisoned frame). Holes, and every
/// entry that is present or not leaf-shaped, are left alone.
pub(crate) fn restore<M: PhysMem>(
    t: &Tables<'_, M>,
    states: &StateTable<'_>,
    mapping: Mapping,
    va: u64,
    len: u64,
    side: impl Fn(u64, u64) -> Option<Visibility>,
    counters: &Counters,
) {
    let enc = t.enc;
    let mut writes = 0;
    for_each_entry(t, va, len, |level, slot, cursor, stop| {
        let entry = slot.load(Ordering::Acquire);
        if entry & PRESENT != 0 || !is_leaf(level, entry) {
            return;
        }
        let frame = match mapping.linear_frame(cursor) {
            Some((pa, hole)) if states.is_hole(pa, hole) => return,
            Some((pa, _)) => pa,
            None => enc.address(entry, level) + (cursor % level.span()),
        };
        if let Some(side) = side(frame, stop - cursor) {
            slot.store((entry & !enc.mask()) | enc.bits_for(side) | PRESENT, Ordering::Release);
            writes += 1;
        }
    });
    Counters::add(&counters.pte_writes, writes);
}

/// A leaf-sized piece of a mapped range: `[va, va + len)` maps
/// `[pa, pa + len)` through a leaf at `level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub va: u64,
    pub pa: u64,
    pub len: u64,
    pub level: Level,
}

/// Calls `f` with the pieces of `[va, va + len)` in address order. With
/// `present_only`, stops at the first address no present leaf maps and
/// returns it; otherwise a not-present leaf-shaped entry (one the engine
/// made not present) counts too.
pub(crate) fn pieces<M: PhysMem, E>(
    t: &Tables<'_, M>,
    va: u64,
    len: u64,
    present_only: bool,
    mut f: impl FnMut(Piece) -> Result<(), E>,
) -> Result<Result<(), u64>, E> {
    enum Stop<E> {
        Unmapped(u64),
        Caller(E),
    }
    let walked = try_for_each_entry(t, va, len, |level, slot, cursor, stop| {
        let entry = slot.load(Ordering::Acquire);
        let usable = entry & PRESENT != 0 || (!present_only && entry != 0 && is_leaf(level, entry));
        if !usable {
            return Err(Stop::Unmapped(cursor));
        }
        let piece = Piece {
            va: cursor,
            pa: t.enc.address(entry, level) + cursor % level.span(),
            len: stop - cursor,
            level,
        };
        f(piece).map_err(Stop::Caller)
    });
    match walked {
        Ok(()) => Ok(Ok(())),
        Err(Stop::Unmapped(at)) => Ok(Err(at)),
        Err(Stop::Caller(e)) => Err(e),
    }
}
