//! Reaching page-table pages and walking the hierarchy.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::pte::{EncryptionBit, Level, Paging, HUGE, PRESENT};

/// Access to page-table pages by physical address: the embedding OS's
/// direct map (`pa + offset`), an identity map, or a test's simulated
/// memory.
///
/// # Safety
///
/// For every page-table page the engine is given and every frame the
/// [`FrameSource`](crate::FrameSource) hands it, `page_ptr` must return a
/// pointer to the 4 KiB page at `pa`, valid for atomic reads and writes for
/// as long as the engine lives.
pub unsafe trait PhysMem {
    /// A pointer to the 4 KiB page at physical address `pa` (4 KiB
    /// aligned): the OS's `phys_to_virt` for page-table pages and the
    /// frames the engine keeps its free lists in.
    fn page_ptr(&self, pa: u64) -> *mut u64;

    /// The physical address of the memory at `ptr`, whatever maps it (the
    /// direct map, a vmalloc-style mapping such as a kernel stack), asked
    /// for the frame list and the scratch a caller hands a conversion: the
    /// engine refuses them where they lie in a frame that is not private.
    /// The default, `None`, has the engine walk its own page tables for
    /// `ptr` as a virtual address, which is right whenever the engine was
    /// given the tables the caller runs on; override it where they differ
    /// (a simulation of guest memory in a host process). Called with the
    /// table lock held: it must not call into the engine.
    fn phys_of(&self, ptr: *const u8) -> Option<u64> {
        let _ = ptr;
        None
    }
}

// SAFETY: forwarding keeps the implementation's guarantees.
unsafe impl<T: PhysMem + ?Sized> PhysMem for &T {
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        (**self).page_ptr(pa)
    }

    fn phys_of(&self, ptr: *const u8) -> Option<u64> {
        (**self).phys_of(ptr)
    }
}

/// Where an entry lives: its table's physical address and its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLoc {
    /// Physical address of the table.
    pub table: u64,
    /// Index in the table.
    pub index: usize,
}

/// What a walk found for one virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// A present leaf at `level`.
    Leaf {
        /// Level of the leaf (its span is the page size).
        level: Level,
        /// Where it is.
        loc: EntryLoc,
        /// Its value.
        entry: u64,
    },
    /// A non-present entry at `level`. A non-zero one may be a leaf the
    /// engine made not-present (the rest of the entry is kept).
    Absent {
        /// Level of the entry.
        level: Level,
        /// Where it is.
        loc: EntryLoc,
        /// Its value.
        entry: u64,
    },
}

/// The page tables rooted at `root` (a table of `paging.top()`'s level),
/// reached through `mem`.
#[derive(Clone, Copy)]
pub(crate) struct Tables<'m, M: PhysMem> {
    pub mem: &'m M,
    pub root: u64,
    pub paging: Paging,
    pub enc: EncryptionBit,
}

impl<M: PhysMem> Tables<'_, M> {
    pub fn slot(&self, loc: EntryLoc) -> &AtomicU64 {
        debug_assert!(loc.index < 512 && loc.table % 4096 == 0);
        // SAFETY: `PhysMem` guarantees a valid, aligned 4 KiB table; the
        // index is below 512. Entries are only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.mem.page_ptr(loc.table).add(loc.index)) }
    }

    /// All 512 entries of the table at `table`, for loops over a table.
    pub fn entries(&self, table: u64) -> &[AtomicU64; 512] {
        debug_assert!(table % 4096 == 0);
        // SAFETY: `PhysMem` guarantees a valid, aligned 4 KiB table, i.e.
        // 512 u64 entries, accessed only atomically.
        unsafe { &*self.mem.page_ptr(table).cast::<[AtomicU64; 512]>() }
    }

    pub fn load(&self, loc: EntryLoc) -> u64 {
        self.slot(loc).load(Ordering::Acquire)
    }

    pub fn store(&self, loc: EntryLoc, value: u64) {
        self.slot(loc).store(value, Ordering::Release)
    }

    /// Walks `va` down to the first leaf or non-present entry.
    pub fn walk(&self, va: u64) -> Walk {
        let mut table = self.root;
        let mut level = self.paging.top();
        loop {
            let loc = EntryLoc {
                table,
                index: level.index(va),
            };
            let entry = self.load(loc);
            if entry & PRESENT == 0 {
                return Walk::Absent { level, loc, entry };
            }
            let leaf = level == Level::Pt || (level.can_be_leaf() && entry & HUGE != 0);
            match level.lower() {
                Some(lower) if !leaf => {
                    table = self.enc.address(entry, Level::Pt);
                    level = lower;
                }
                _ => return Walk::Leaf { level, loc, entry },
            }
        }
    }

    /// The physical address `va` maps to, if present.
    pub fn translate(&self, va: u64) -> Option<u64> {
        match self.walk(va) {
            Walk::Leaf { level, entry, .. } => Some(self.enc.address(entry, level) + (va & (level.span() - 1))),
            Walk::Absent { .. } => None,
        }
    }
}
