//! What the kernel gives the engine. This one maps all RAM at
//! `PHYS_OFFSET`, takes page-table pages from a boot-time bump region, and
//! runs on one CPU (an SMP kernel's shootdown also sends IPIs and waits
//! for them).

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use coco_convert::{arch, Config, DirectMap, FrameSource, Paging, PhysMem, TlbShootdown, VaRange};

/// Where the kernel maps all RAM.
pub const PHYS_OFFSET: u64 = 0xFFFF_8880_0000_0000;
/// RAM size.
pub const RAM: u64 = 1 << 30;

/// One state byte per 4 KiB frame of RAM; zeroed means private.
pub static STATES: [AtomicU8; (RAM / 4096) as usize] = [const { AtomicU8::new(0) }; (RAM / 4096) as usize];

/// Page-table pages by physical address, through the direct map.
pub struct DirectMapAccess;

// SAFETY: every page-table page and frame the engine gets lies in RAM,
// which the direct map covers for the kernel's lifetime.
unsafe impl PhysMem for DirectMapAccess {
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        (PHYS_OFFSET + pa) as *mut u64
    }
}

/// Page-table pages from a region reserved at boot: a bump allocator works
/// before any heap exists.
pub struct BootFrames {
    next: AtomicU64,
    end: u64,
}

impl BootFrames {
    /// The frames `[start, end)`.
    pub const fn new(start: u64, end: u64) -> Self {
        BootFrames {
            next: AtomicU64::new(start),
            end,
        }
    }
}

impl FrameSource for BootFrames {
    fn allocate_frame(&self) -> Option<u64> {
        let pa = self.next.fetch_add(4096, Ordering::Relaxed);
        (pa < self.end).then_some(pa)
    }

    fn free_frame(&self, _pa: u64) {
        // A bump region keeps what it handed out.
    }
}

/// TLB shootdown: this kernel runs on one CPU.
pub struct LocalShootdown;

impl TlbShootdown for LocalShootdown {
    fn shootdown(&self, ranges: &[VaRange]) {
        for r in ranges {
            // SAFETY: the kernel runs at CPL 0.
            unsafe { arch::invalidate_range(r.va, r.len) };
        }
    }
}

/// The engine's configuration: the tables CR3 points to, four or five
/// levels deep as CR4.LA57 says, the direct map, collapse on.
pub fn config(cr3: u64, cr4: u64) -> Config {
    Config {
        root: cr3,
        paging: Paging::from_cr4(cr4),
        direct_map: DirectMap {
            va: PHYS_OFFSET,
            pa: 0,
            len: RAM,
        },
        collapse: coco_convert::Collapse::AfterEachConversion,
        collapse_1g: true,
    }
}

/// The calling CPU's index.
pub fn cpu() -> usize {
    0
}
