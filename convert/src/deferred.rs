//! Table pages freed by collapses, held until a shootdown has removed every
//! CPU's cached pointers to them.
//!
//! The freed tables themselves cannot hold the list: a CPU with a stale
//! paging-structure cache entry may still read them until the shootdown,
//! so they must keep their contents. A few entries live inline; beyond
//! that, the list continues in chain pages the engine takes from the frame
//! source *before* it takes the table lock (the frame source is never
//! called with the lock held). Each entry keeps the region the table
//! mapped: the shootdown that precedes the free must cover it.

use crate::pte::Level;
use crate::reserve::FrameSource;
use crate::shootdown::ShootdownSet;
use crate::state::StateTable;
use crate::tables::PhysMem;

const INLINE: usize = 16;
const END: u64 = u64::MAX;
/// Entries per chain page: word 0 links to the next page, word 1 counts,
/// then two words per entry.
const PER_PAGE: usize = 255;

/// A table a collapse replaced: its page, and the region it mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retired {
    pub table: u64,
    /// Start of the region (aligned to `level`'s span).
    pub region: u64,
    /// The level of the pointer the collapse replaced with a leaf.
    pub level: Level,
}

impl Retired {
    fn pack(self) -> [u64; 2] {
        [self.table | self.level as u64, self.region]
    }

    fn unpack([table, region]: [u64; 2]) -> Self {
        let level = if table & 0xFFF == Level::Pdpt as u64 {
            Level::Pdpt
        } else {
            Level::Pd
        };
        Retired {
            table: table & !0xFFF,
            region,
            level,
        }
    }
}

pub(crate) struct Deferred {
    inline: [Retired; INLINE],
    len: usize,
    chain: u64,
}

impl Deferred {
    pub const fn new() -> Self {
        Deferred {
            inline: [Retired {
                table: 0,
                region: 0,
                level: Level::Pd,
            }; INLINE],
            len: 0,
            chain: END,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.chain == END
    }

    /// Whether [`push`](Self::push) would succeed.
    pub fn has_room<M: PhysMem>(&self, mem: &M) -> bool {
        if self.len < INLINE {
            return true;
        }
        // SAFETY: chain pages are ours; `PhysMem` maps them.
        self.chain != END && unsafe { mem.page_ptr(self.chain).add(1).read() as usize } < PER_PAGE
    }

    /// Records `retired`; `false` if there is no room (the caller must give
    /// the list a chain page, or flush and free, with the lock dropped).
    pub fn push<M: PhysMem>(&mut self, retired: Retired, mem: &M) -> bool {
        if self.len < INLINE {
            self.inline[self.len] = retired;
            self.len += 1;
            return true;
        }
        if self.chain == END {
            return false;
        }
        let page = mem.page_ptr(self.chain);
        // SAFETY: chain pages are frames this list owns; `PhysMem` maps
        // them; the count never exceeds PER_PAGE, so the index stays in
        // the page.
        unsafe {
            let count = page.add(1).read() as usize;
            if count == PER_PAGE {
                return false;
            }
            let [a, b] = retired.pack();
            page.add(2 + 2 * count).write(a);
            page.add(3 + 2 * count).write(b);
            page.add(1).write(count as u64 + 1);
        }
        true
    }

    /// Adds an empty chain page (a frame the engine took from the source
    /// and marked as its own).
    pub fn add_chain_page<M: PhysMem>(&mut self, pa: u64, mem: &M) {
        let p = mem.page_ptr(pa);
        // SAFETY: the frame is the engine's; `PhysMem` maps it.
        unsafe {
            p.write(self.chain);
            p.add(1).write(0);
        }
        self.chain = pa;
    }

    fn for_each<M: PhysMem>(&self, mem: &M, mut f: impl FnMut(Retired)) {
        self.inline[..self.len].iter().copied().for_each(&mut f);
        let mut page = self.chain;
        while page != END {
            let p = mem.page_ptr(page);
            // SAFETY: chain pages are ours; counts never exceed PER_PAGE.
            let (next, count) = unsafe { (p.read(), (p.add(1).read() as usize).min(PER_PAGE)) };
            for i in 0..count {
                // SAFETY: as above.
                f(Retired::unpack(unsafe {
                    [p.add(2 + 2 * i).read(), p.add(3 + 2 * i).read()]
                }));
            }
            page = next;
        }
    }

    /// Adds every region whose table waits here to `set`.
    pub fn add_regions<M: PhysMem>(&self, mem: &M, set: &mut ShootdownSet) {
        self.for_each(mem, |r| set.add(r.region, r.level.span()));
    }

    /// Gives every recorded table back (call only after a shootdown that
    /// covered [`add_regions`](Self::add_regions)): the engine's own to the
    /// frame source, the OS's through [`FrameSource::retire_os_table`];
    /// then the chain pages. `on_freed(true)` runs per table given to the
    /// frame source, `on_freed(false)` per table given to the OS.
    pub fn free_all<M: PhysMem, F: FrameSource>(
        self,
        mem: &M,
        frames: &F,
        states: &StateTable<'_>,
        mut on_freed: impl FnMut(bool),
    ) {
        self.for_each(mem, |r| {
            let engines = states.release_table(r.table);
            if engines {
                frames.free_frame(r.table);
            } else {
                frames.retire_os_table(r.table);
            }
            on_freed(engines);
        });
        let mut page = self.chain;
        while page != END {
            // SAFETY: chain pages are ours.
            let next = unsafe { mem.page_ptr(page).read() };
            states.release_table(page);
            frames.free_frame(page);
            page = next;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::state::PageState;
    use crate::testmem::TestMem;
    use core::sync::atomic::AtomicU8;
    use std::collections::BTreeSet;
    use std::vec::Vec;

    /// A frame source that records what comes back, and where.
    struct Recording<'m> {
        mem: &'m TestMem,
        freed: std::cell::RefCell<BTreeSet<u64>>,
        retired: std::cell::RefCell<BTreeSet<u64>>,
    }

    impl FrameSource for Recording<'_> {
        fn allocate_frame(&self) -> Option<u64> {
            self.mem.allocate_frame()
        }
        fn free_frame(&self, pa: u64) {
            assert!(self.freed.borrow_mut().insert(pa), "{pa:#x} freed twice");
        }
        fn retire_os_table(&self, pa: u64) {
            assert!(self.retired.borrow_mut().insert(pa), "{pa:#x} retired twice");
        }
    }

    #[test]
    fn overflow_needs_chain_pages_and_everything_goes_back_to_its_owner() {
        let mem = TestMem::new();
        // TestMem hands out frames from 0x1000_1000 up.
        let storage: Vec<AtomicU8> = (0..4096).map(|_| AtomicU8::new(0)).collect();
        let states = StateTable::new(0x1000_0000, &storage);
        let frames = Recording {
            mem: &mem,
            freed: Default::default(),
            retired: Default::default(),
        };
        let mut d = Deferred::new();
        // Every third table is the OS's; the rest the engine's.
        let tables: Vec<u64> = (0..(INLINE + PER_PAGE + 3) as u64)
            .map(|_| mem.allocate_frame().unwrap())
            .collect();
        for (i, &t) in tables.iter().enumerate() {
            if i % 3 != 0 {
                states.take_table(t).unwrap();
            }
        }
        let mut chain_pages = Vec::new();
        for (i, &t) in tables.iter().enumerate() {
            let r = Retired {
                table: t,
                region: i as u64 * (2 << 20),
                level: Level::Pd,
            };
            if !d.push(r, &mem) {
                let page = mem.allocate_frame().unwrap();
                states.take_table(page).unwrap();
                chain_pages.push(page);
                d.add_chain_page(page, &mem);
                assert!(d.push(r, &mem));
            }
        }
        assert_eq!(chain_pages.len(), 2, "inline, one full chain page, a second");
        let mut set = ShootdownSet::new();
        d.add_regions(&mem, &mut set);
        let mut covered: Vec<_> = set.ranges().iter().map(|r| (r.va, r.va + r.len)).collect();
        covered.sort();
        assert!(covered.windows(2).all(|w| w[0].1 == w[1].0), "{covered:x?}");
        assert_eq!(
            (covered[0].0, covered.last().unwrap().1),
            (0, tables.len() as u64 * (2 << 20))
        );
        let (mut to_source, mut to_os) = (0, 0);
        d.free_all(&mem, &frames, &states, |engines| {
            if engines {
                to_source += 1
            } else {
                to_os += 1
            }
        });
        let freed = frames.freed.borrow();
        let retired = frames.retired.borrow();
        for (i, t) in tables.iter().enumerate() {
            assert_eq!(retired.contains(t), i % 3 == 0, "{t:#x}");
            assert_eq!(freed.contains(t), i % 3 != 0, "{t:#x}");
        }
        assert!(chain_pages.iter().all(|p| freed.contains(p)));
        assert_eq!(to_source + to_os, tables.len());
        assert!(tables.iter().all(|&t| states.get(t) == Some(PageState::Private)));
    }
}
