//! Splitting huge leaves so that a range's boundaries fall on leaf
//! boundaries, and counting beforehand the table pages that takes.
//!
//! Only leaves that straddle a boundary are split: a 1 GiB or 2 MiB leaf
//! wholly inside the range keeps its size and changes as one entry.

use crate::counters::Counters;
use crate::pte::{huge_flags_to_4k, Level, ADDRESS_BITS, PRESENT, TABLE_POINTER};
use crate::reserve::Reserve;
use crate::tables::{EntryLoc, PhysMem, Tables, Walk};
use crate::Visibility;

/// The present leaf covering `va`. Only these are split: a non-present
/// entry, whatever it holds, is the OS's (or a poisoned frame's) and stays
/// as it is.
pub(crate) fn present_leaf_at<M: PhysMem>(t: &Tables<'_, M>, va: u64) -> Option<(Level, EntryLoc, u64)> {
    match t.walk(va) {
        Walk::Leaf { level, loc, entry } => Some((level, loc, entry)),
        Walk::Absent { .. } => None,
    }
}

/// The leaf-shaped entry covering `va`: present leaves, and non-present
/// entries that still hold a leaf (the engine keeps everything but P).
#[cfg(test)]
pub(crate) fn leaf_at<M: PhysMem>(t: &Tables<'_, M>, va: u64) -> Option<(Level, EntryLoc, u64)> {
    match t.walk(va) {
        Walk::Leaf { level, loc, entry } => Some((level, loc, entry)),
        Walk::Absent { level, loc, entry } if entry != 0 && (level == Level::Pt || entry & crate::pte::HUGE != 0) => {
            Some((level, loc, entry))
        }
        Walk::Absent { .. } => None,
    }
}

/// Counts table pages needed so that every VA in `boundaries` (ascending,
/// 4 KiB aligned) starts a leaf (see [`SplitCount`]).
pub(crate) fn tables_needed<M: PhysMem>(t: &Tables<'_, M>, boundaries: impl Iterator<Item = u64>) -> usize {
    let mut count = SplitCount::NONE;
    for va in boundaries {
        count.add(t, va);
    }
    count.pages
}

/// The table pages needed so that every VA added starts a leaf. A boundary
/// inside a 1 GiB leaf needs that leaf split (one PD), and the 2 MiB piece
/// it then falls in split too (one PT) unless it is 2 MiB aligned; inside
/// a 2 MiB leaf, one PT. A leaf shared with the boundary added before is
/// counted once, so ascending boundaries are counted exactly (the many
/// runs of a scattered conversion share leaves), and boundaries in any
/// order at worst more than once.
#[derive(Clone, Copy)]
pub(crate) struct SplitCount {
    last_1g: Option<u64>,
    last_2m: Option<u64>,
    pub pages: usize,
}

impl SplitCount {
    pub const NONE: SplitCount = SplitCount {
        last_1g: None,
        last_2m: None,
        pages: 0,
    };

    pub fn add<M: PhysMem>(&mut self, t: &Tables<'_, M>, va: u64) {
        let (gib, mib2) = (Level::Pdpt.span(), Level::Pd.span());
        let Some((level, _, _)) = present_leaf_at(t, va) else {
            return;
        };
        let needs_2m_split = match level {
            Level::Pdpt if va % gib != 0 => {
                if self.last_1g != Some(va / gib) {
                    self.last_1g = Some(va / gib);
                    self.pages += 1;
                }
                va % mib2 != 0
            }
            Level::Pd => va % mib2 != 0,
            _ => false,
        };
        if needs_2m_split && self.last_2m != Some(va / mib2) {
            self.last_2m = Some(va / mib2);
            self.pages += 1;
        }
    }
}

/// Splits whatever huge leaf straddles `va` until a leaf starts at `va`,
/// taking table pages from `reserve`. Returns `false` only if the reserve
/// ran dry, which the planning above rules out.
pub(crate) fn split_at<M: PhysMem>(t: &Tables<'_, M>, va: u64, reserve: &mut Reserve, counters: &Counters) -> bool {
    while let Some((level, loc, _)) = present_leaf_at(t, va) {
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
        for (i, entry) in t.entries(table).iter().enumerate() {
            entry.store(
                (base + i as u64 * child_level.span()) | child_attributes,
                core::sync::atomic::Ordering::Relaxed,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collapse::try_collapse;
    use crate::pte::{EncryptionBit, Paging, ACCESSED, DIRTY, HUGE, NO_EXECUTE, PAT_4K, PAT_HUGE, WRITABLE};
    use crate::reserve::FrameSource;
    use crate::testmem::TestMem;

    const VA: u64 = 0xFFFF_8880_0000_0000;
    const GLOBAL: u64 = 1 << 8;
    const PWT: u64 = 1 << 3;

    fn setup(level: Level, flags: u64) -> (TestMem, u64, EncryptionBit) {
        let mem = TestMem::new();
        let root = mem.allocate_frame().unwrap();
        let enc = EncryptionBit::snp(51).unwrap();
        let t = mem.tables(root, enc);
        let table = mem.table_for(&t, VA, level);
        t.store(
            EntryLoc {
                table,
                index: level.index(VA),
            },
            0x4000_0000 | flags | HUGE | PRESENT | (1 << 51),
        );
        (mem, root, enc)
    }

    fn reserve(mem: &TestMem, n: usize) -> Reserve {
        let mut r = Reserve::new();
        r.fill_to(n, mem, mem, TestMem::states()).unwrap();
        r
    }

    /// A 1 GiB leaf at an address only 5-level paging translates.
    fn setup_la57(flags: u64) -> (TestMem, u64, EncryptionBit) {
        let mem = TestMem::new();
        let root = mem.allocate_frame().unwrap();
        let enc = EncryptionBit::snp(51).unwrap();
        let t = mem.tables_of(root, Paging::Five, enc);
        let table = mem.table_for(&t, LA57_VA, Level::Pdpt);
        t.store(
            EntryLoc {
                table,
                index: Level::Pdpt.index(LA57_VA),
            },
            0x4000_0000 | flags | HUGE | PRESENT | (1 << 51),
        );
        (mem, root, enc)
    }

    const LA57_VA: u64 = 0xFF11_0000_0000_0000;

    #[test]
    fn five_levels_split_and_collapse_under_a_pml5() {
        let flags = WRITABLE | NO_EXECUTE | GLOBAL | PAT_HUGE | ACCESSED | DIRTY;
        let (mem, root, enc) = setup_la57(flags);
        let t = mem.tables_of(root, Paging::Five, enc);
        let (level, loc, before) = leaf_at(&t, LA57_VA).expect("the 1 GiB leaf");
        assert_eq!(level, Level::Pdpt);
        assert_eq!(t.translate(LA57_VA + 0x1234_5000), Some(0x4000_0000 + 0x1234_5000));
        // Read as a PML4, the root maps nothing there: the depth decides.
        assert_eq!(mem.tables_of(root, Paging::Four, enc).translate(LA57_VA), None);
        assert_eq!(tables_needed(&t, [LA57_VA + 4096].into_iter()), 2);
        let mut r = reserve(&mem, 2);
        let c = Counters::default();
        assert!(split_at(&t, LA57_VA + 4096, &mut r, &c));
        assert!(r.take(&mem).is_none(), "the plan was exact");
        assert_eq!(leaf_at(&t, LA57_VA + 4096).unwrap().0, Level::Pt);
        assert_eq!(t.translate(LA57_VA + 4096), Some(0x4000_1000));
        assert_eq!(t.translate(LA57_VA + (1 << 29)), Some(0x6000_0000));
        assert!(try_collapse(&t, LA57_VA, Level::Pd, |_| true, |_, _| true).is_some());
        assert!(try_collapse(&t, LA57_VA, Level::Pdpt, |_| true, |_, _| true).is_some());
        assert_eq!(leaf_at(&t, LA57_VA).unwrap(), (Level::Pdpt, loc, before));
    }

    #[test]
    fn nothing_collapses_into_a_pml4_or_pml5_leaf() {
        let (mem, root, enc) = setup_la57(WRITABLE);
        let t = mem.tables_of(root, Paging::Five, enc);
        // A PDPT of 512 contiguous, alike 1 GiB leaves from 0: were PML4
        // entries leaves, it would qualify.
        let pdpt = mem.table_for(&t, LA57_VA, Level::Pdpt);
        for (i, entry) in t.entries(pdpt).iter().enumerate() {
            entry.store(
                (i as u64) << 30 | WRITABLE | HUGE | PRESENT,
                core::sync::atomic::Ordering::Relaxed,
            );
        }
        let pml4 = mem.table_for(&t, LA57_VA, Level::Pml4);
        for i in 0..512 {
            t.store(EntryLoc { table: pml4, index: i }, pdpt | TABLE_POINTER);
        }
        assert_eq!(try_collapse(&t, LA57_VA, Level::Pml4, |_| true, |_, _| true), None);
        assert_eq!(try_collapse(&t, LA57_VA, Level::Pml5, |_| true, |_, _| true), None);
        assert_eq!(t.translate(LA57_VA + (5 << 30)), Some(5 << 30));
    }

    #[test]
    fn bit_7_of_a_pml5_or_pml4_entry_is_no_leaf() {
        let (mem, root, enc) = setup_la57(WRITABLE);
        let t = mem.tables_of(root, Paging::Five, enc);
        let pml5e = EntryLoc {
            table: root,
            index: Level::Pml5.index(LA57_VA),
        };
        let pml4e = EntryLoc {
            table: enc.address(t.load(pml5e), Level::Pt),
            index: Level::Pml4.index(LA57_VA),
        };
        for loc in [pml5e, pml4e] {
            t.store(loc, t.load(loc) | HUGE);
        }
        assert_eq!(leaf_at(&t, LA57_VA).unwrap().0, Level::Pdpt);
        assert_eq!(t.translate(LA57_VA + 4096), Some(0x4000_1000));
    }

    #[test]
    fn split_1g_keeps_every_attribute_in_2m_leaves() {
        let flags = WRITABLE | NO_EXECUTE | GLOBAL | PAT_HUGE | PWT | ACCESSED | DIRTY;
        let (mem, root, enc) = setup(Level::Pdpt, flags);
        let t = mem.tables(root, enc);
        let counters = Counters::default();
        let mut r = reserve(&mem, 1);
        assert!(split_at(&t, VA + 6 * (2 << 20), &mut r, &counters));
        for i in 0..512u64 {
            let (level, _, e) = leaf_at(&t, VA + i * (2 << 20)).unwrap();
            assert_eq!(level, Level::Pd);
            assert_eq!(e, (0x4000_0000 + i * (2 << 20)) | flags | HUGE | PRESENT | (1 << 51));
        }
        assert_eq!(counters.snapshot().splits_1g, 1);
    }

    #[test]
    fn split_2m_moves_pat_to_bit_7() {
        let flags = WRITABLE | NO_EXECUTE | GLOBAL | PAT_HUGE;
        let (mem, root, enc) = setup(Level::Pd, flags);
        let t = mem.tables(root, enc);
        let mut r = reserve(&mem, 1);
        assert!(split_at(&t, VA + 4096, &mut r, &Counters::default()));
        for i in 0..512u64 {
            let (level, _, e) = leaf_at(&t, VA + i * 4096).unwrap();
            assert_eq!(level, Level::Pt);
            assert_eq!(
                e,
                (0x4000_0000 + i * 4096) | WRITABLE | NO_EXECUTE | GLOBAL | PAT_4K | PRESENT | (1 << 51)
            );
        }
    }

    #[test]
    fn aligned_boundaries_split_nothing() {
        let (mem, root, enc) = setup(Level::Pdpt, WRITABLE);
        let t = mem.tables(root, enc);
        assert_eq!(tables_needed(&t, [VA, VA + (1 << 30)].into_iter()), 0);
        let mut r = Reserve::new();
        assert!(
            split_at(&t, VA, &mut r, &Counters::default()),
            "no table needed, none taken"
        );
        assert_eq!(leaf_at(&t, VA).unwrap().0, Level::Pdpt);
    }

    #[test]
    fn boundary_counting_per_level_and_shared_leaves_once() {
        let (mem, root, enc) = setup(Level::Pdpt, WRITABLE);
        let t = mem.tables(root, enc);
        let mib2 = 2 << 20;
        // 2 MiB aligned inside 1 GiB: the 1 GiB split only.
        assert_eq!(tables_needed(&t, [VA + mib2, VA + 3 * mib2].into_iter()), 1);
        // 4 KiB inside: 1 GiB + 2 MiB.
        assert_eq!(tables_needed(&t, [VA + 4096].into_iter()), 2);
        // Both ends in the same 2 MiB: 1 GiB + that 2 MiB, once each.
        assert_eq!(tables_needed(&t, [VA + 4096, VA + 8192].into_iter()), 2);
        // Ends in two 2 MiB pieces of the same 1 GiB: 1 + 2.
        assert_eq!(tables_needed(&t, [VA + 4096, VA + mib2 + 4096].into_iter()), 3);
        // The plan is exact: splitting takes exactly what was counted.
        let mut r = reserve(&mem, 3);
        let c = Counters::default();
        assert!(split_at(&t, VA + 4096, &mut r, &c) && split_at(&t, VA + mib2 + 4096, &mut r, &c));
        assert!(r.take(&mem).is_none());
    }

    #[test]
    fn collapse_inverts_split_at_both_levels() {
        let flags = WRITABLE | NO_EXECUTE | GLOBAL | PAT_HUGE | ACCESSED | DIRTY;
        let (mem, root, enc) = setup(Level::Pdpt, flags);
        let t = mem.tables(root, enc);
        let before = t.load(leaf_at(&t, VA).unwrap().1);
        let mut r = reserve(&mem, 2);
        let c = Counters::default();
        assert!(split_at(&t, VA + 4096, &mut r, &c));
        let pt = try_collapse(&t, VA, Level::Pd, |_| true, |_, _| true).expect("2 MiB collapse");
        let pd = try_collapse(&t, VA, Level::Pdpt, |_| true, |_, _| true).expect("1 GiB collapse");
        assert_ne!(pt, pd);
        let (level, loc, _) = leaf_at(&t, VA).unwrap();
        assert_eq!((level, t.load(loc)), (Level::Pdpt, before));
    }

    #[test]
    fn collapse_refuses_what_would_change_a_translation() {
        let (mem, root, enc) = setup(Level::Pd, WRITABLE | NO_EXECUTE);
        let t = mem.tables(root, enc);
        let c = Counters::default();
        let entry_loc = |i: u64| leaf_at(&t, VA + i * 4096).unwrap().1;
        type Change = fn(u64) -> u64;
        let cases: [(&str, Change); 4] = [
            ("not present", |e| e & !PRESENT),
            ("other attributes", |e| e & !NO_EXECUTE),
            ("other side", |e| e & !(1 << 51)),
            ("not contiguous", |e| e + 4096),
        ];
        // Entry 1, one in the middle, and the last: the check reads its
        // entries eight at a time, and must read every group.
        for (what, change) in cases {
            for index in [1, 300, 511] {
                let mut r = reserve(&mem, 1);
                assert!(split_at(&t, VA + 4096, &mut r, &c));
                let loc = entry_loc(index);
                let original = t.load(loc);
                t.store(loc, change(original));
                let refused = try_collapse(&t, VA, Level::Pd, |_| true, |_, _| true);
                assert_eq!(refused, None, "{what} at entry {index}");
                t.store(loc, original);
                assert!(
                    try_collapse(&t, VA, Level::Pd, |_| true, |_, _| true).is_some(),
                    "{what} at entry {index}: collapses once restored"
                );
            }
        }
        // Accessed/dirty differences do not block a collapse: they are
        // OR-ed into the new leaf.
        let mut r = reserve(&mem, 1);
        assert!(split_at(&t, VA + 4096, &mut r, &c));
        let loc = entry_loc(7);
        t.store(loc, t.load(loc) | ACCESSED | DIRTY);
        assert!(try_collapse(&t, VA, Level::Pd, |_| true, |_, _| true).is_some());
        let (_, loc, e) = leaf_at(&t, VA).unwrap();
        assert_eq!(e & (ACCESSED | DIRTY), ACCESSED | DIRTY);
        // A read-only pointer restricts the collapsed leaf.
        let mut r = reserve(&mem, 1);
        assert!(split_at(&t, VA + 4096, &mut r, &c));
        let pointer = t.load(loc);
        t.store(loc, pointer & !WRITABLE);
        assert!(try_collapse(&t, VA, Level::Pd, |_| true, |_, _| true).is_some());
        assert_eq!(t.load(loc) & WRITABLE, 0, "the pointer's restriction survives");
    }
}
