//! Splitting huge leaves so that a range's boundaries fall on leaf
//! boundaries, and counting beforehand the table pages that takes.
//!
//! Only leaves that straddle a boundary are split: a 1 GiB or 2 MiB leaf
//! wholly inside the range keeps its size and changes as one entry.

use crate::counters::Counters;
use crate::pte::{huge_flags_to_4k, Level, ADDRESS_BITS, HUGE, PRESENT, TABLE_POINTER};
use crate::reserve::Reserve;
use crate::tables::{EntryLoc, PhysMem, Tables, Walk};
use crate::Visibility;

/// The leaf-shaped entry covering `va`: present leaves, and non-present
/// entries that still hold a leaf (the engine keeps everything but P).
pub(crate) fn leaf_at<M: PhysMem>(t: &Tables<'_, M>, va: u64) -> Option<(Level, EntryLoc, u64)> {
    match t.walk(va) {
        Walk::Leaf { level, loc, entry } => Some((level, loc, entry)),
        Walk::Absent { level, loc, entry } if entry != 0 && (level == Level::Pt || entry & HUGE != 0) => {
            Some((level, loc, entry))
        }
        Walk::Absent { .. } => None,
    }
}

/// Counts table pages needed so that every VA in `boundaries` (ascending,
/// 4 KiB aligned) starts a leaf. A boundary inside a 1 GiB leaf needs that
/// leaf split (one PD), and the 2 MiB piece it then falls in split too
/// (one PT) unless it is 2 MiB aligned; inside a 2 MiB leaf, one PT. Leaves
/// shared by several boundaries are counted once.
pub(crate) fn tables_needed<M: PhysMem>(t: &Tables<'_, M>, boundaries: impl Iterator<Item = u64>) -> usize {
    let (gib, mib2) = (Level::Pdpt.span(), Level::Pd.span());
    let mut last_1g = None;
    let mut last_2m = None;
    let mut count = 0;
    for va in boundaries {
        let Some((level, _, _)) = leaf_at(t, va) else { continue };
        let needs_2m_split = match level {
            Level::Pdpt if va % gib != 0 => {
                if last_1g != Some(va / gib) {
                    last_1g = Some(va / gib);
                    count += 1;
                }
                va % mib2 != 0
            }
            Level::Pd => va % mib2 != 0,
            _ => false,
        };
        if needs_2m_split && last_2m != Some(va / mib2) {
            last_2m = Some(va / mib2);
            count += 1;
        }
    }
    count
}

/// Splits whatever huge leaf straddles `va` until a leaf starts at `va`,
/// taking table pages from `reserve`. Returns `false` only if the reserve
/// ran dry, which the planning above rules out.
pub(crate) fn split_at<M: PhysMem>(t: &Tables<'_, M>, va: u64, reserve: &mut Reserve, counters: &Counters) -> bool {
    while let Some((level, loc, _)) = leaf_at(t, va) {
        if level == Level::Pt || va % level.span() == 0 {
            return true;
        }
        let Some(table) = reserve.take(t.mem) else { return false };
        split_leaf(t, level, loc, table);
        counters.record_split(level);
    }
    true
}

/// Replaces the huge leaf at `loc` with a pointer to `table`, filled with
/// 512 leaves of the next level that map the same memory with the same
/// attributes (PAT moved to bit 7 for 4 KiB entries).
fn split_leaf<M: PhysMem>(t: &Tables<'_, M>, level: Level, loc: EntryLoc, table: u64) {
    let child_level = level.lower().unwrap_or(Level::Pt);
    let pointer = table | TABLE_POINTER | t.enc.bits_for(Visibility::Private);
    loop {
        // Hardware may set A/D in the leaf while we copy it: install the
        // pointer only if the leaf is unchanged, else copy again.
        let leaf = t.load(loc);
        let base = t.enc.address(leaf, level);
        let attributes = leaf & !(ADDRESS_BITS & !(level.span() - 1) & !t.enc.mask());
        let child_attributes = if child_level == Level::Pt {
            huge_flags_to_4k(attributes)
        } else {
            attributes
        };
        for i in 0..512 {
            t.store(
                EntryLoc { table, index: i },
                (base + i as u64 * child_level.span()) | child_attributes,
            );
        }
        if t.slot(loc)
            .compare_exchange(
                leaf,
                pointer,
                core::sync::atomic::Ordering::AcqRel,
                core::sync::atomic::Ordering::Acquire,
            )
            .is_ok()
        {
            debug_assert!(leaf & PRESENT != 0 || leaf != 0);
            return;
        }
    }
}
