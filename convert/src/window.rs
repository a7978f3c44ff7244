//! The private scratch window: a 2 MiB virtual range each CPU owns, where
//! the engine maps frames private for PVALIDATE while every public alias of
//! them is not present.

use crate::platform::PrivateMap;
use crate::pte::{Level, Visibility, ACCESSED, DIRTY, HUGE, NO_EXECUTE, PRESENT, TABLE_POINTER, WRITABLE};
use crate::tables::{EntryLoc, PhysMem, Tables};

/// The calling CPU's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSlot {
    /// 2 MiB-aligned start of a virtual range that only this CPU maps. The
    /// entries above its PD entry must exist (PML4 and PDPT, and with
    /// 5-level paging the PML5 entry too); the engine writes its PD entry.
    pub va: u64,
    /// A zeroed page-table page reserved for the window's 4 KiB mappings.
    /// The engine leaves it zeroed again after each use.
    pub pt: u64,
}

/// Gives the engine the calling CPU's window.
///
/// # Safety
///
/// The slot returned must satisfy [`WindowSlot`]'s rules, and the caller's
/// conversion must stay on this CPU until it returns (no migration).
pub unsafe trait ScratchWindow {
    /// This CPU's window.
    fn slot(&self) -> WindowSlot;
    /// Invalidates this CPU's TLB entries for `[va, va + len)`
    /// ([`arch::invalidate_range`](crate::arch::invalidate_range)).
    fn invalidate_local(&self, va: u64, len: u64);
}

/// One window per CPU, the ready-made [`ScratchWindow`]: `slots[cpu()]`
/// is the calling CPU's, and invalidation is `invlpg` (or a CR3 reload
/// for the whole window) on this CPU.
#[derive(Debug)]
pub struct PerCpuWindows<'a> {
    slots: &'a [WindowSlot],
    cpu: fn() -> usize,
}

impl<'a> PerCpuWindows<'a> {
    /// Windows in `slots`, indexed by `cpu()`.
    ///
    /// # Safety
    ///
    /// Every slot satisfies [`WindowSlot`]'s rules, no two CPUs share one,
    /// `cpu()` is below `slots.len()` on every CPU that converts, a
    /// conversion does not migrate between CPUs, and the engine runs at
    /// CPL 0 (for `invlpg`).
    pub const unsafe fn new(slots: &'a [WindowSlot], cpu: fn() -> usize) -> Self {
        PerCpuWindows { slots, cpu }
    }
}

// SAFETY: `new`'s caller promised the rules for every slot.
#[cfg(target_arch = "x86_64")]
unsafe impl ScratchWindow for PerCpuWindows<'_> {
    fn slot(&self) -> WindowSlot {
        self.slots[(self.cpu)()]
    }

    fn invalidate_local(&self, va: u64, len: u64) {
        // SAFETY: `new`'s caller promised CPL 0.
        unsafe { crate::arch::invalidate_range(va, len) };
    }
}

/// The engine's side of the window.
pub(crate) struct WindowMap<'t, 'm, M: PhysMem> {
    tables: &'t Tables<'m, M>,
    window: &'t dyn ScratchWindow,
    slot: WindowSlot,
    pde: EntryLoc,
    /// What the window maps now, so a change invalidates exactly the
    /// translations the TLB may hold (it holds none for entries that were
    /// never present). Nothing between transactions: the window is
    /// unmapped, and invalidated, when the last user is done (or dropped).
    mapped: Mapped,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mapped {
    Nothing,
    Huge,
    /// PT entries \[0, n) hold 4 KiB mappings; the rest of the PT is zero.
    Pages(usize),
}

impl<'t, 'm, M: PhysMem> WindowMap<'t, 'm, M> {
    /// `None` if the window cannot be used: an entry above its PD entry is
    /// missing, a 1 GiB leaf covers it, or its PD entry points to a table
    /// other than the slot's own PT (which the engine would overwrite).
    pub fn new(tables: &'t Tables<'m, M>, window: &'t dyn ScratchWindow) -> Option<Self> {
        let slot = window.slot();
        if slot.va % (2 << 20) != 0 || slot.pt % 4096 != 0 {
            return None;
        }
        let pde = EntryLoc {
            table: pd_table_of(tables, slot.va)?,
            index: Level::Pd.index(slot.va),
        };
        let entry = tables.load(pde);
        let points_elsewhere =
            entry & PRESENT != 0 && entry & HUGE == 0 && tables.enc.address(entry, Level::Pt) != slot.pt;
        if points_elsewhere {
            return None;
        }
        Some(WindowMap {
            tables,
            window,
            slot,
            pde,
            mapped: Mapped::Nothing,
        })
    }

    fn private_leaf(&self, pa: u64) -> u64 {
        pa | PRESENT | WRITABLE | ACCESSED | DIRTY | NO_EXECUTE | self.tables.enc.bits_for(Visibility::Private)
    }
}

fn pd_table_of<M: PhysMem>(tables: &Tables<'_, M>, va: u64) -> Option<u64> {
    let mut table = tables.root;
    let mut level = tables.paging.top();
    while level != Level::Pd {
        let e = tables.load(EntryLoc {
            table,
            index: level.index(va),
        });
        if e & PRESENT == 0 || (level.can_be_leaf() && e & HUGE != 0) {
            return None;
        }
        table = tables.enc.address(e, Level::Pt);
        level = level.lower()?;
    }
    Some(table)
}

impl<M: PhysMem> WindowMap<'_, '_, M> {
    /// After the PD entry or PT entries changed: drops what the TLB may
    /// hold of the mapping `before`, and no more (a CR3 reload on every
    /// window use would cost every CPU-local translation). One page at
    /// least: `invlpg` also drops every paging-structure cache entry, such
    /// as a cached PD entry that pointed to the PT (Intel SDM Vol. 3A,
    /// 4.10.4.1), and one address of a 2 MiB page drops every TLB entry
    /// for it, smaller ones the CPU made of it included (Vol. 2A, INVLPG).
    fn invalidate(&self, before: Mapped) {
        let pages = match before {
            Mapped::Nothing | Mapped::Huge => 1,
            Mapped::Pages(n) => n.max(1),
        };
        self.window.invalidate_local(self.slot.va, pages as u64 * 4096);
    }

    fn pages_mapped(&self) -> usize {
        match self.mapped {
            Mapped::Pages(n) => n,
            Mapped::Nothing | Mapped::Huge => 0,
        }
    }
}

impl<M: PhysMem> PrivateMap for WindowMap<'_, '_, M> {
    fn map_2m(&mut self, pa: u64) -> u64 {
        let before = self.mapped;
        // The PT goes back to zero: while the PD entry is a leaf the PT is
        // not in use, and the next `map_4k` fills it from entry 0.
        self.clear_pt();
        self.tables.store(self.pde, self.private_leaf(pa) | HUGE);
        self.invalidate(before);
        self.mapped = Mapped::Huge;
        self.slot.va
    }

    fn map_4k(&mut self, pa: u64, count: u64) -> u64 {
        let before = self.mapped;
        let count = count.min(512) as usize;
        // Entries past `count` that the last call filled must go; the rest
        // are zero already.
        for i in 0..count.max(self.pages_mapped()) {
            let entry = if i < count {
                self.private_leaf(pa + i as u64 * 4096)
            } else {
                0
            };
            self.tables.store(
                EntryLoc {
                    table: self.slot.pt,
                    index: i,
                },
                entry,
            );
        }
        self.tables.store(
            self.pde,
            self.slot.pt | TABLE_POINTER | self.tables.enc.bits_for(Visibility::Private),
        );
        self.invalidate(before);
        self.mapped = Mapped::Pages(count);
        self.slot.va
    }

    fn unmap(&mut self) {
        if self.mapped != Mapped::Nothing {
            let before = self.mapped;
            self.tables.store(self.pde, 0);
            self.clear_pt();
            self.invalidate(before);
            self.mapped = Mapped::Nothing;
        }
    }
}

impl<M: PhysMem> WindowMap<'_, '_, M> {
    fn clear_pt(&mut self) {
        for i in 0..self.pages_mapped() {
            self.tables.store(
                EntryLoc {
                    table: self.slot.pt,
                    index: i,
                },
                0,
            );
        }
    }
}

impl<M: PhysMem> Drop for WindowMap<'_, '_, M> {
    /// A platform that forgot to unmap must not leave translations for the
    /// next transaction's window to trip over.
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::reserve::FrameSource;
    use crate::tables::Walk;
    use crate::testmem::TestMem;
    use crate::EncryptionBit;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    const WINDOW: u64 = 0xFFFF_C000_0020_0000;

    /// A TLB as bad as the architecture allows: it may cache any present
    /// translation at any time (the model caches all of them before every
    /// step, a 2 MiB page as one entry), and forgets only what is
    /// invalidated. Invalidating any address of a page drops every entry
    /// for it (Intel SDM Vol. 2A, INVLPG, footnote 1: even when a 2 MiB
    /// page was cached as several smaller entries).
    struct Tlb<'m> {
        slot: WindowSlot,
        tables: Tables<'m, TestMem>,
        /// Page start -> (frame, page size).
        cached: RefCell<BTreeMap<u64, (u64, u64)>>,
        invalidations: RefCell<Vec<(u64, u64)>>,
    }

    impl Tlb<'_> {
        fn translation(&self, va: u64) -> Option<(u64, u64)> {
            match self.tables.walk(va) {
                Walk::Leaf { level, entry, .. } => Some((self.tables.enc.address(entry, level), level.span())),
                Walk::Absent { .. } => None,
            }
        }

        fn fill(&self) {
            for page in (WINDOW..WINDOW + (2 << 20)).step_by(4096) {
                if let Some((pa, size)) = self.translation(page) {
                    self.cached.borrow_mut().insert(page / size * size, (pa, size));
                }
            }
        }

        /// Every translation the TLB still holds is the tables' own.
        fn check(&self, step: &str) {
            for (&page, &cached) in self.cached.borrow().iter() {
                assert_eq!(
                    self.translation(page),
                    Some(cached),
                    "{step}: stale translation of {page:#x}"
                );
            }
        }
    }

    // SAFETY: a test window in test memory, on one thread.
    unsafe impl ScratchWindow for Tlb<'_> {
        fn slot(&self) -> WindowSlot {
            self.slot
        }

        fn invalidate_local(&self, va: u64, len: u64) {
            self.invalidations.borrow_mut().push((va, len));
            self.cached
                .borrow_mut()
                .retain(|&page, &mut (_, size)| page + size <= va || page >= va + len);
        }
    }

    #[test]
    fn every_change_invalidates_what_was_mapped_and_no_more() {
        let mem = TestMem::new();
        let root = mem.allocate_frame().unwrap();
        let enc = EncryptionBit::snp(51).unwrap();
        let tables = mem.tables(root, enc);
        // The window's path down to its PD entry exists, as the OS built it.
        mem.table_for(&tables, WINDOW, Level::Pd);
        let slot = WindowSlot {
            va: WINDOW,
            pt: mem.allocate_frame().unwrap(),
        };
        let tlb = Tlb {
            slot,
            tables: mem.tables(root, enc),
            cached: RefCell::new(BTreeMap::new()),
            invalidations: RefCell::new(Vec::new()),
        };
        let mut w = WindowMap::new(&tables, &tlb).expect("usable");
        type Step = fn(&mut WindowMap<'_, '_, TestMem>);
        let steps: [(&str, Step, Option<u64>); 8] = [
            (
                "3 pages",
                |w| {
                    w.map_4k(0x4000_0000, 3);
                },
                Some(4096),
            ),
            (
                "5 other pages",
                |w| {
                    w.map_4k(0x5000_0000, 5);
                },
                Some(3 * 4096),
            ),
            (
                "2 MiB",
                |w| {
                    w.map_2m(0x6000_0000);
                },
                Some(5 * 4096),
            ),
            (
                "1 page",
                |w| {
                    w.map_4k(0x7000_0000, 1);
                },
                Some(4096),
            ),
            (
                "another 2 MiB",
                |w| {
                    w.map_2m(0x8000_0000);
                },
                Some(4096),
            ),
            (
                "another 2 MiB again",
                |w| {
                    w.map_2m(0xA000_0000);
                },
                Some(4096),
            ),
            (
                "512 pages",
                |w| {
                    w.map_4k(0x9000_0000, 512);
                },
                Some(4096),
            ),
            ("unmapped", |w| w.unmap(), Some(512 * 4096)),
        ];
        for (step, change, invalidated) in steps {
            tlb.fill();
            tlb.invalidations.borrow_mut().clear();
            change(&mut w);
            tlb.check(step);
            let lens: Vec<u64> = tlb.invalidations.borrow().iter().map(|&(_, len)| len).collect();
            assert_eq!(lens, Vec::from_iter(invalidated), "{step}");
        }
        // Unmapped, the window's PT is zero again and nothing is present.
        assert!((0..512).all(|i| tables.load(EntryLoc {
            table: slot.pt,
            index: i
        }) == 0));
        assert_eq!(tlb.translation(WINDOW), None);
        // A window left mapped is unmapped when dropped.
        w.map_4k(0x4000_0000, 2);
        drop(w);
        assert_eq!(tlb.translation(WINDOW), None);
        assert!(tlb.cached.borrow().is_empty());
    }
}
