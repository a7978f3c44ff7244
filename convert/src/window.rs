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
    mapped: bool,
    /// PT entries \[0, n) hold 4 KiB mappings from the last `map_4k`; the
    /// rest of the PT is zero (so it is all zero between transactions).
    pt_entries: usize,
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
            mapped: false,
            pt_entries: 0,
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

impl<M: PhysMem> PrivateMap for WindowMap<'_, '_, M> {
    fn map_2m(&mut self, pa: u64) -> u64 {
        self.tables.store(self.pde, self.private_leaf(pa) | HUGE);
        self.window.invalidate_local(self.slot.va, 2 << 20);
        self.mapped = true;
        self.slot.va
    }

    fn map_4k(&mut self, pa: u64, count: u64) -> u64 {
        let count = count.min(512) as usize;
        // Entries past `count` that the last call filled must go; the rest
        // are zero already.
        for i in 0..count.max(self.pt_entries) {
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
        self.pt_entries = count;
        self.tables.store(
            self.pde,
            self.slot.pt | TABLE_POINTER | self.tables.enc.bits_for(Visibility::Private),
        );
        self.window.invalidate_local(self.slot.va, 2 << 20);
        self.mapped = true;
        self.slot.va
    }

    fn unmap(&mut self) {
        if self.mapped {
            self.tables.store(self.pde, 0);
            for i in 0..self.pt_entries {
                self.tables.store(
                    EntryLoc {
                        table: self.slot.pt,
                        index: i,
                    },
                    0,
                );
            }
            self.pt_entries = 0;
            self.window.invalidate_local(self.slot.va, 2 << 20);
            self.mapped = false;
        }
    }
}
