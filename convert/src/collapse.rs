//! Collapsing tables back into huge leaves: where a table maps 512
//! contiguous, aligned frames with identical attributes, the pointer to it
//! becomes one leaf and the table page is freed (after a TLB shootdown).
//! Linux never undoes conversion splits; this is how the direct map gets
//! its huge pages back.

use core::sync::atomic::Ordering;

use crate::pte::{flags_4k_to_huge, Level, ACCESSED, ADDRESS_BITS, DIRTY, HUGE, NO_EXECUTE, PRESENT, USER, WRITABLE};
use crate::tables::{EntryLoc, PhysMem, Tables};

/// Collapses the table that maps the `level`-sized region containing `va`
/// (`level` is `Pd` for 2 MiB, `Pdpt` for 1 GiB) if it qualifies and
/// `may_replace(table)` allows. `may_be_uniform(pa, span)` may rule out
/// the region its first entry maps before the table is read (a cheap
/// necessary condition; the entries decide). Returns the replaced table's
/// physical address; the caller frees it only after a shootdown, since
/// other CPUs' paging-structure caches may still point to it.
pub(crate) fn try_collapse<M: PhysMem>(
    t: &Tables<'_, M>,
    va: u64,
    level: Level,
    may_replace: impl Fn(u64) -> bool,
    may_be_uniform: impl Fn(u64, u64) -> bool,
) -> Option<u64> {
    if !level.can_be_leaf() {
        return None;
    }
    let loc = pointer_at(t, va, level)?;
    let pointer = t.load(loc);
    let table = t.enc.address(pointer, Level::Pt);
    if !may_replace(table) {
        return None;
    }
    let child = level.lower()?;
    let entries = t.entries(table);
    let first = entries[0].load(Ordering::Acquire);
    let base = t.enc.address(first, child);
    let first_is_leaf = first & PRESENT != 0 && (child == Level::Pt || first & HUGE != 0);
    if !first_is_leaf || base % level.span() != 0 || !may_be_uniform(base, level.span()) {
        return None;
    }
    // Entry i must be entry 0 with i child pages added to its address,
    // accessed and dirty aside: with the base aligned to the region, the
    // additions never carry out of the address bits, so one XOR compares
    // every attribute and the address at once. Eight entries per test
    // keep the loop free of a branch per entry. An entry whose accessed or
    // dirty bit is set differs from entry 0 there or entry 0 has it too,
    // so entry 0's bits and the differences give the new leaf's.
    let step = child.span();
    let mut expected = first;
    let mut differences = 0;
    for group in entries.chunks_exact(8) {
        let mut differ = 0;
        for entry in group {
            differ |= entry.load(Ordering::Relaxed) ^ expected;
            expected = expected.wrapping_add(step);
        }
        if differ & !(ACCESSED | DIRTY) != 0 {
            return None;
        }
        differences |= differ;
    }
    let address_field = ADDRESS_BITS & !(child.span() - 1) & !t.enc.mask();
    let same = |e: u64| e & !address_field & !(ACCESSED | DIRTY);
    let accessed_dirty = (first | differences) & (ACCESSED | DIRTY);
    let mut flags = same(first) | accessed_dirty;
    if child == Level::Pt {
        flags = flags_4k_to_huge(flags);
    }
    // The pointer's own rights restrict the leaves below it; the new leaf
    // must keep those restrictions.
    flags &= !(WRITABLE | USER) | (pointer & (WRITABLE | USER));
    flags |= pointer & NO_EXECUTE;
    let leaf = base | flags;
    t.slot(loc)
        .compare_exchange(pointer, leaf, Ordering::AcqRel, Ordering::Acquire)
        .ok()?;
    Some(table)
}

/// The present table-pointer entry at `level` on the path to `va`.
pub(crate) fn pointer_at<M: PhysMem>(t: &Tables<'_, M>, va: u64, level: Level) -> Option<EntryLoc> {
    let mut table = t.root;
    let mut current = t.paging.top();
    loop {
        let loc = EntryLoc {
            table,
            index: current.index(va),
        };
        let entry = t.load(loc);
        let is_pointer = entry & PRESENT != 0 && (!current.can_be_leaf() || entry & HUGE == 0);
        if !is_pointer || current == Level::Pt {
            return None;
        }
        if current == level {
            return Some(loc);
        }
        table = t.enc.address(entry, Level::Pt);
        current = current.lower()?;
    }
}
