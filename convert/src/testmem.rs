//! A page-addressed memory for the crate's unit tests.

extern crate std;

use std::boxed::Box;
use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::pte::{EncryptionBit, Level, Paging, HUGE, PRESENT, TABLE_POINTER};
use crate::reserve::FrameSource;
use crate::state::StateTable;
use crate::sync::AtomicU8;
use crate::tables::{EntryLoc, PhysMem, Tables};

/// Table pages by physical address, allocated on demand from 0x1000_0000.
pub(crate) struct TestMem {
    pages: Mutex<BTreeMap<u64, Box<[u64; 512]>>>,
    next: Mutex<u64>,
}

impl TestMem {
    pub fn new() -> Self {
        TestMem {
            pages: Mutex::new(BTreeMap::new()),
            next: Mutex::new(0x1000_0000),
        }
    }

    /// A state table covering every frame `allocate_frame` hands out (the
    /// first 256 MiB from 0x1000_0000), all private.
    pub fn states() -> &'static StateTable<'static> {
        let storage: &'static [AtomicU8] = std::vec::Vec::from_iter((0..65536).map(|_| AtomicU8::new(0))).leak();
        std::boxed::Box::leak(std::boxed::Box::new(StateTable::new(0x1000_0000, storage)))
    }

    pub fn tables(&self, root: u64, enc: EncryptionBit) -> Tables<'_, Self> {
        self.tables_of(root, Paging::Four, enc)
    }

    pub fn tables_of(&self, root: u64, paging: Paging, enc: EncryptionBit) -> Tables<'_, Self> {
        Tables {
            mem: self,
            root,
            paging,
            enc,
        }
    }

    /// A table at `level` for `va` under `root`, created as needed.
    pub fn table_for(&self, t: &Tables<'_, Self>, va: u64, level: Level) -> u64 {
        let mut table = t.root;
        let mut current = t.paging.top();
        while current != level {
            let loc = EntryLoc {
                table,
                index: current.index(va),
            };
            let e = t.load(loc);
            table = if e & PRESENT != 0 && e & HUGE == 0 {
                t.enc.address(e, Level::Pt)
            } else {
                let new = self.allocate_frame().unwrap();
                t.store(loc, new | TABLE_POINTER);
                new
            };
            current = current.lower().unwrap();
        }
        table
    }
}

// SAFETY: pages are boxed and never freed while the memory lives.
unsafe impl PhysMem for TestMem {
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        let mut pages = self.pages.lock().unwrap();
        pages.entry(pa).or_insert_with(|| Box::new([0; 512])).as_mut_ptr()
    }
}

impl FrameSource for TestMem {
    fn allocate_frame(&self) -> Option<u64> {
        let mut next = self.next.lock().unwrap();
        *next += 4096;
        let pa = *next;
        self.page_ptr(pa);
        Some(pa)
    }
    fn free_frame(&self, pa: u64) {
        self.pages.lock().unwrap().remove(&pa);
    }
}
