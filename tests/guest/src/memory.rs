//! The guest's memory: page tables built here, and the OS services the
//! engine needs (page-table access, an early frame source, shootdowns, the
//! scratch windows).
//!
//! Layout: RAM [0, 2 GiB).
//! - identity map of [0, 32 MiB) with 2 MiB pages: the PVH kernel image,
//!   its heap and stacks, and the page-table frames [24 MiB, 32 MiB); and
//!   of a UEFI-loaded image wherever the firmware put it; never converted;
//! - the direct map of all RAM ([`Layout::direct_map`]): GiB 0 one 1 GiB
//!   leaf, GiB 1 512 2 MiB leaves;
//! - the host view at `HOST_VIEW`, 1 GiB leaves: how the in-guest
//!   emulators (standing for the host and the firmware) reach guest memory.
//!   Unknown to the engine, excluded from the emulators' alias check;
//! - a vmalloc area, and one 2 MiB scratch window per CPU.
//!
//! With 5-level paging the direct map, the vmalloc area and the windows
//! move to addresses only 57-bit paging translates ([`FIVE`]), so a walk
//! that took the PML5 for a PML4 would find none of them.

use core::sync::atomic::{AtomicU64, Ordering};

use coco_convert::bits::{ACCESSED, DIRTY, HUGE, NO_EXECUTE, PRESENT, TABLE_POINTER, WRITABLE};
use coco_convert::{EncryptionBit, FrameSource, Level, Paging, PhysMem, TlbShootdown, VaRange, Visibility, WindowSlot};

pub const RAM: u64 = 2 << 30;
/// Bits 51:12 of an entry or of CR3: where a physical address can be.
const ADDRESS_FIELD: u64 = 0x000F_FFFF_FFFF_F000;
/// Canonical at either depth: the emulators reach memory through it before
/// and after the switch to the guest's own tables.
pub const HOST_VIEW: u64 = 0xFFFF_C000_0000_0000;
pub const TABLE_FRAMES: (u64, u64) = (24 << 20, 32 << 20);
/// The identity map's low part: the trampoline page, the PVH kernel, and
/// the page-table frames.
const LOW_IDENTITY: u64 = 32 << 20;

/// The loaded image, `[start, end)`; a UEFI firmware puts it wherever it
/// likes, so it is identity-mapped on its own when it lies above the low
/// part.
static IMAGE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

pub fn set_image((start, end): (u64, u64)) {
    IMAGE[0].store(start, Ordering::Relaxed);
    IMAGE[1].store(end, Ordering::Relaxed);
}

/// The loaded image, `[start, end)`.
pub fn image() -> (u64, u64) {
    (IMAGE[0].load(Ordering::Relaxed), IMAGE[1].load(Ordering::Relaxed))
}

/// The tables' depth and where the engine's mappings are.
pub struct Layout {
    pub paging: Paging,
    pub direct_map: u64,
    pub vmalloc: u64,
    pub windows: u64,
}

pub const FOUR: Layout = Layout {
    paging: Paging::Four,
    direct_map: 0xFFFF_8880_0000_0000,
    vmalloc: 0xFFFF_C900_0000_0000,
    windows: 0xFFFF_FE00_0000_0000,
};

/// A 5-level Linux kernel's direct map and vmalloc bases; the windows near
/// the top of the upper half.
pub const FIVE: Layout = Layout {
    paging: Paging::Five,
    direct_map: 0xFF11_0000_0000_0000,
    vmalloc: 0xFFA0_0000_0000_0000,
    windows: 0xFFFE_0000_0000_0000,
};

/// The layout for the depth this CPU runs at.
pub fn layout() -> &'static Layout {
    if crate::boot::la57() {
        &FIVE
    } else {
        &FOUR
    }
}

/// Where the direct map is.
pub fn direct_map() -> u64 {
    layout().direct_map
}

/// Page-table pages through the identity map (they all live below 32 MiB).
pub struct Identity;

// SAFETY: every table frame lies in the identity-mapped first 32 MiB.
unsafe impl PhysMem for Identity {
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        assert!(pa < TABLE_FRAMES.1, "table {pa:#x} outside the identity map");
        pa as *mut u64
    }
}

/// The early frame source: a bump pointer over [24 MiB, 32 MiB) and a free
/// list threaded through freed frames. No heap.
pub struct EarlyFrames {
    next: AtomicU64,
    free: spin::Mutex<u64>,
    pub in_use: AtomicU64,
}

pub static FRAMES: EarlyFrames = EarlyFrames {
    next: AtomicU64::new(TABLE_FRAMES.0),
    free: spin::Mutex::new(0),
    in_use: AtomicU64::new(0),
};

impl FrameSource for EarlyFrames {
    fn allocate_frame(&self) -> Option<u64> {
        let pa = {
            let mut free = self.free.lock();
            if *free != 0 {
                let pa = *free;
                // SAFETY: a freed frame we own; its first word links the list.
                *free = unsafe { (pa as *const u64).read_volatile() };
                pa
            } else {
                let pa = self.next.fetch_add(4096, Ordering::Relaxed);
                if pa >= TABLE_FRAMES.1 {
                    return None;
                }
                pa
            }
        };
        // SAFETY: the frame is ours, identity-mapped.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, 4096) };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Some(pa)
    }

    fn free_frame(&self, pa: u64) {
        let mut free = self.free.lock();
        // SAFETY: the frame comes back to us; its first word links the list.
        unsafe { (pa as *mut u64).write_volatile(*free) };
        *free = pa;
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn invlpg(va: u64) {
    // SAFETY: CPL 0.
    unsafe { coco_convert::arch::invlpg(va) };
}

pub fn reload_cr3() {
    // SAFETY: rewriting CR3 with its own value flushes non-global TLB
    // entries; nothing else changes.
    unsafe { core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack)) };
}

fn flush_local(ranges: &[VaRange]) {
    let pages: u64 = ranges.iter().map(|r| r.len / 4096).sum();
    if ranges.is_empty() || pages > 64 {
        reload_cr3();
    } else {
        for r in ranges {
            for va in (r.va..r.va + r.len).step_by(4096) {
                invlpg(va);
            }
        }
    }
}

/// TLB shootdown: this CPU, then every other online CPU by IPI.
pub struct Shootdown;

impl TlbShootdown for Shootdown {
    fn shootdown(&self, ranges: &[VaRange]) {
        flush_local(ranges);
        crate::smp::shootdown_others();
    }
}

/// One scratch window per CPU.
pub struct Windows {
    pub slots: [WindowSlot; crate::smp::CPUS],
}

/// A built hierarchy.
pub struct Tables {
    pub root: u64,
    pub paging: Paging,
    pub enc: EncryptionBit,
    pub windows: Windows,
    pub next_vmalloc: u64,
}

impl Tables {
    /// What the emulators need to walk these tables.
    #[cfg(feature = "emulator")]
    pub fn page_tables(&self) -> hvmock::GuestPageTables {
        hvmock::GuestPageTables {
            cr3: self.root,
            la57: self.paging == Paging::Five,
            enc_mask: self.enc.mask(),
        }
    }

    fn table_at(&self, va: u64, level: Level) -> u64 {
        let mut table = self.root;
        let mut current = self.paging.top();
        while current != level {
            let entry = (table + 8 * current.index(va) as u64) as *mut u64;
            // SAFETY: tables live in the identity-mapped frames.
            let e = unsafe { entry.read_volatile() };
            table = if e & PRESENT != 0 {
                self.enc.address(e, Level::Pt)
            } else {
                let new = FRAMES.allocate_frame().expect("table frame");
                // SAFETY: as above.
                unsafe { entry.write_volatile(new | TABLE_POINTER | self.enc.bits_for(Visibility::Private)) };
                new
            };
            current = current.lower().expect("above the leaf level");
        }
        table
    }

    /// Maps `[pa, pa + len)` at `va` with `page`-sized private leaves.
    pub fn map(&self, va: u64, pa: u64, len: u64, page: Level, flags: u64) {
        let huge = if page == Level::Pt { 0 } else { HUGE };
        for off in (0..len).step_by(page.span() as usize) {
            let table = self.table_at(va + off, page);
            let entry = (table + 8 * page.index(va + off) as u64) as *mut u64;
            // SAFETY: as above.
            unsafe {
                entry.write_volatile((pa + off) | flags | huge | PRESENT | self.enc.bits_for(Visibility::Private))
            };
        }
    }

    /// Maps scattered frames at the next vmalloc address.
    pub fn vmalloc(&mut self, frames: &[u64]) -> u64 {
        let va = self.next_vmalloc;
        for (i, &pa) in frames.iter().enumerate() {
            self.map(
                va + i as u64 * 4096,
                pa,
                4096,
                Level::Pt,
                WRITABLE | NO_EXECUTE | ACCESSED | DIRTY,
            );
        }
        self.next_vmalloc += (frames.len() as u64 * 4096).next_multiple_of(2 << 20) + (2 << 20);
        va
    }
}

/// Builds the guest's page tables with `enc`, as deep as the CPU's paging
/// (the root replaces CR3's, so it must be), and switches to them.
pub fn build(enc: EncryptionBit) -> Tables {
    let layout = layout();
    let root = FRAMES.allocate_frame().expect("root");
    let mut t = Tables {
        root,
        paging: layout.paging,
        enc,
        windows: Windows {
            slots: [WindowSlot { va: 0, pt: 0 }; crate::smp::CPUS],
        },
        next_vmalloc: layout.vmalloc,
    };
    let data = WRITABLE | NO_EXECUTE | ACCESSED | DIRTY;
    t.map(0, 0, LOW_IDENTITY, Level::Pd, WRITABLE | ACCESSED | DIRTY);
    let (image_start, image_end) = (IMAGE[0].load(Ordering::Relaxed), IMAGE[1].load(Ordering::Relaxed));
    if image_end > LOW_IDENTITY {
        let start = (image_start & !((2 << 20) - 1)).max(LOW_IDENTITY);
        let end = image_end.next_multiple_of(2 << 20);
        t.map(start, start, end - start, Level::Pd, WRITABLE | ACCESSED | DIRTY);
    }
    t.map(layout.direct_map, 0, 1 << 30, Level::Pdpt, data);
    t.map(layout.direct_map + (1 << 30), 1 << 30, 1 << 30, Level::Pd, data);
    // Only the emulated host has a view of its own; on a real platform a
    // private mapping of every frame would alias the shared ones.
    #[cfg(feature = "emulator")]
    t.map(HOST_VIEW, 0, RAM, Level::Pdpt, data);
    // The local APIC, uncached (PWT | PCD).
    t.map(
        0xFEE0_0000,
        0xFEE0_0000,
        4096,
        Level::Pt,
        WRITABLE | NO_EXECUTE | (1 << 3) | (1 << 4),
    );
    for cpu in 0..crate::smp::CPUS {
        let va = layout.windows + cpu as u64 * (2 << 20);
        t.table_at(va, Level::Pd);
        t.windows.slots[cpu] = WindowSlot {
            va,
            pt: FRAMES.allocate_frame().expect("window PT"),
        };
    }
    // SNP: the top table is private memory, so CR3 carries the C-bit as
    // a table pointer does (a bit the emulated mode puts above the
    // address field, where CR3 has none, so there it stays out).
    let cr3 = root | (enc.bits_for(Visibility::Private) & ADDRESS_FIELD);
    // SAFETY: the new hierarchy maps the kernel (identity) as before.
    unsafe { core::arch::asm!("mov cr3, {0}", in(reg) cr3, options(nostack)) };
    t
}

/// Counts the direct map's leaves by size: [1 GiB, 2 MiB, 4 KiB].
pub fn direct_map_layout(t: &Tables) -> [u64; 3] {
    let mut counts = [0; 3];
    let direct_map = direct_map();
    let mut va = direct_map;
    while va < direct_map + RAM {
        match crate::walk::translate(t, va) {
            Some(m) => {
                counts[match m.size {
                    s if s == 1 << 30 => 0,
                    s if s == 2 << 20 => 1,
                    _ => 2,
                }] += 1;
                va += m.size;
            }
            None => va += 4096,
        }
    }
    counts
}
