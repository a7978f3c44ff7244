//! Table pages freed by collapses, held until a shootdown has removed every
//! CPU's cached pointers to them.
//!
//! The freed tables themselves cannot hold the list: a CPU with a stale
//! paging-structure cache entry may still read them until the shootdown,
//! so they must keep their contents. A few entries live inline; beyond
//! that, the list continues in pages taken from the frame source (chain
//! pages, never used as tables). If none can be had, the caller flushes at
//! once instead.

use crate::reserve::FrameSource;
use crate::tables::PhysMem;

const INLINE: usize = 16;
const END: u64 = u64::MAX;
/// Entries per chain page: word 0 links to the next page, word 1 counts.
const PER_PAGE: usize = 510;

pub(crate) struct Deferred {
    inline: [u64; INLINE],
    len: usize,
    chain: u64,
}

impl Deferred {
    pub const fn new() -> Self {
        Deferred {
            inline: [0; INLINE],
            len: 0,
            chain: END,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.chain == END
    }

    /// Records `table`; `false` if there is no room and no page to grow
    /// into (the caller must flush and free now).
    pub fn push<M: PhysMem, F: FrameSource>(&mut self, table: u64, mem: &M, frames: &F) -> bool {
        if self.len < INLINE {
            self.inline[self.len] = table;
            self.len += 1;
            return true;
        }
        let count = if self.chain == END {
            PER_PAGE
        } else {
            // SAFETY: chain pages are frames this list owns; `PhysMem` maps
            // them.
            (unsafe { mem.table(self.chain).add(1).read() }) as usize
        };
        if count == PER_PAGE {
            let Some(new) = frames.allocate_frame() else {
                return false;
            };
            let p = mem.table(new);
            // SAFETY: as above.
            unsafe {
                p.write(self.chain);
                p.add(1).write(0);
            }
            self.chain = new;
            return self.push(table, mem, frames);
        }
        let page = mem.table(self.chain);
        // SAFETY: as above; `count < PER_PAGE` keeps the index in the page.
        unsafe {
            page.add(2 + count).write(table);
            page.add(1).write(count as u64 + 1);
        }
        true
    }

    /// Gives every recorded table back (call only after a shootdown), and
    /// the chain pages; `on_table` runs once per table.
    pub fn free_all<M: PhysMem, F: FrameSource>(self, mem: &M, frames: &F, mut on_table: impl FnMut()) {
        for &table in &self.inline[..self.len] {
            frames.free_frame(table);
            on_table();
        }
        let mut page = self.chain;
        while page != END {
            let p = mem.table(page);
            // SAFETY: chain pages are ours; counts never exceed PER_PAGE.
            let (next, count) = unsafe { (p.read(), (p.add(1).read() as usize).min(PER_PAGE)) };
            for i in 0..count {
                // SAFETY: as above.
                frames.free_frame(unsafe { p.add(2 + i).read() });
                on_table();
            }
            frames.free_frame(page);
            page = next;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::testmem::TestMem;
    use std::cell::Cell;
    use std::collections::BTreeSet;
    use std::vec::Vec;

    /// A frame source that records what is freed and can run dry.
    struct Recording<'m> {
        mem: &'m TestMem,
        freed: std::cell::RefCell<BTreeSet<u64>>,
        allowance: Cell<usize>,
    }

    impl FrameSource for Recording<'_> {
        fn allocate_frame(&self) -> Option<u64> {
            let left = self.allowance.get().checked_sub(1)?;
            self.allowance.set(left);
            self.mem.allocate_frame()
        }
        fn free_frame(&self, pa: u64) {
            assert!(self.freed.borrow_mut().insert(pa), "{pa:#x} freed twice");
        }
    }

    #[test]
    fn overflow_goes_to_chain_pages_and_everything_is_freed_once() {
        let mem = TestMem::new();
        let frames = Recording {
            mem: &mem,
            freed: Default::default(),
            allowance: Cell::new(2),
        };
        let mut d = Deferred::new();
        let tables: Vec<u64> = (0..(INLINE + 2 * PER_PAGE) as u64)
            .map(|i| 0x9000_0000 + i * 4096)
            .collect();
        for &t in &tables {
            assert!(d.push(t, &mem, &frames));
        }
        // Two chain pages used; a third is refused.
        assert!(!d.push(0xA000_0000, &mem, &frames));
        let mut freed_tables = 0;
        d.free_all(&mem, &frames, || freed_tables += 1);
        assert_eq!(freed_tables, tables.len());
        let freed = frames.freed.borrow();
        assert!(tables.iter().all(|t| freed.contains(t)));
        assert_eq!(freed.len(), tables.len() + 2, "the chain pages are given back too");
    }
}
