//! A simulated OS for the engine: page tables in [`GuestMemory`], frame
//! sources that catch leaks, double use and frees of frames they never
//! handed out, a counting TLB shootdown, and per-CPU scratch windows; the
//! frame source and the shootdown report every call to a [`Watch`].

use coco_convert::sync::AtomicU8;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use coco_convert::bits::{HUGE, PRESENT, TABLE_POINTER};
use coco_convert::{
    EncryptionBit, FrameSource, Level, Paging, PhysMem, ScratchWindow, TlbShootdown, VaRange, Visibility, WindowSlot,
};
use hvmock::GuestMemory;

use crate::watch::Watch;

/// Where the direct map starts (1 GiB aligned).
pub const DIRECT_MAP_VA: u64 = 0xFFFF_8880_0000_0000;
/// The vmalloc-style area.
pub const VMALLOC_VA: u64 = 0xFFFF_C900_0000_0000;
/// A registered alias area (like a kernel-image mapping).
pub const ALIAS_VA: u64 = 0xFFFF_FFFF_8000_0000;
/// Scratch windows, 2 MiB per CPU.
pub const WINDOW_VA: u64 = 0xFFFF_FE00_0000_0000;

/// Where the test OS puts its mappings, and how deep its tables are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The tables' depth.
    pub paging: Paging,
    /// The direct map (1 GiB aligned).
    pub direct_map: u64,
    /// The vmalloc-style area.
    pub vmalloc: u64,
    /// The registered alias area.
    pub alias: u64,
    /// The scratch windows, 2 MiB per CPU.
    pub windows: u64,
}

impl Layout {
    /// 4-level tables, the areas of a 4-level Linux kernel.
    pub const FOUR: Layout = Layout {
        paging: Paging::Four,
        direct_map: DIRECT_MAP_VA,
        vmalloc: VMALLOC_VA,
        alias: ALIAS_VA,
        windows: WINDOW_VA,
    };

    /// 5-level tables, every area at an address only 57-bit paging
    /// translates (bits 56..47 not all equal): the direct map and vmalloc
    /// where a 5-level Linux kernel puts them, the alias in the lower half
    /// (so both halves' canonical checks are used), the windows near the
    /// top of the upper half. A walk that took the PML5 for a PML4 would
    /// find none of them.
    pub const FIVE: Layout = Layout {
        paging: Paging::Five,
        direct_map: 0xFF11_0000_0000_0000,
        vmalloc: 0xFFA0_0000_0000_0000,
        alias: 0x00F0_0000_0000_0000,
        windows: 0xFFFE_0000_0000_0000,
    };

    /// The layout for `paging`.
    pub const fn of(paging: Paging) -> Layout {
        match paging {
            Paging::Four => Layout::FOUR,
            Paging::Five => Layout::FIVE,
        }
    }
}
/// Page-table pages by physical address: simulated memory.
#[derive(Debug, Clone)]
pub struct SimPhys(pub Arc<GuestMemory>);

// SAFETY: every table the engine touches lies in the simulated memory,
// which outlives the engine; `ptr` checks bounds.
unsafe impl PhysMem for SimPhys {
    #[inline]
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        self.0.ptr(pa).cast()
    }

    // The engine's tables map guest addresses, not this process's: a
    // pointer into the simulated memory is found by its offset.
    fn phys_of(&self, ptr: *const u8) -> Option<u64> {
        self.0.gpa_of(ptr as u64)
    }
}

#[derive(Debug)]
struct FramesInner {
    next: u64,
    end: u64,
    free: Vec<u64>,
    in_use: BTreeSet<u64>,
    allowance: Option<usize>,
    checked: bool,
}

/// Frames for page tables from `[start, end)` of simulated memory: a bump
/// allocator with a free list (what an early-boot OS has). Panics on a
/// double allocation or a free of a frame it did not hand out: either
/// would be table-page double use. Tables the engine retires to the OS
/// (ones it did not take from here) are recorded, and must not be its own.
#[derive(Debug)]
pub struct SimFrames {
    mem: Arc<GuestMemory>,
    inner: Mutex<FramesInner>,
    retired: Mutex<BTreeSet<u64>>,
    watch: Option<Arc<Watch>>,
}

impl SimFrames {
    /// Frames from `[start, end)`.
    pub fn new(mem: Arc<GuestMemory>, start: u64, end: u64) -> Self {
        let inner = FramesInner {
            next: start,
            end,
            free: Vec::new(),
            in_use: BTreeSet::new(),
            allowance: None,
            checked: true,
        };
        SimFrames {
            mem,
            inner: Mutex::new(inner),
            retired: Mutex::new(BTreeSet::new()),
            watch: None,
        }
    }

    /// The same, reporting every call to `watch`.
    pub fn watched(self, watch: Arc<Watch>) -> Self {
        SimFrames {
            watch: Some(watch),
            ..self
        }
    }

    /// Tables the engine handed back as the OS's.
    pub fn retired(&self) -> BTreeSet<u64> {
        self.retired.lock().unwrap().clone()
    }

    /// Frames handed out and not given back.
    pub fn in_use(&self) -> usize {
        self.inner.lock().unwrap().in_use.len()
    }

    /// The frames handed out and not given back.
    pub fn in_use_set(&self) -> BTreeSet<u64> {
        self.inner.lock().unwrap().in_use.clone()
    }

    /// Turns off the double-use tracking and the zeroing and scribbling of
    /// frames: benchmarks measure the engine, not this checker. (The
    /// engine writes every entry of a table it creates.)
    pub fn set_checked(&self, checked: bool) {
        self.inner.lock().unwrap().checked = checked;
        if let Some(w) = &self.watch {
            w.set_enabled(checked);
        }
    }

    /// Allows only `n` more allocations (`None`: unlimited).
    pub fn set_allowance(&self, n: Option<usize>) {
        self.inner.lock().unwrap().allowance = n;
    }
}

impl FrameSource for SimFrames {
    fn allocate_frame(&self) -> Option<u64> {
        if let Some(w) = &self.watch {
            w.entered("allocate_frame");
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some(n) = inner.allowance.as_mut() {
            if *n == 0 {
                return None;
            }
            *n -= 1;
        }
        let pa = match inner.free.pop() {
            Some(pa) => pa,
            None if inner.next < inner.end => {
                inner.next += 4096;
                inner.next - 4096
            }
            None => return None,
        };
        if inner.checked {
            assert!(inner.in_use.insert(pa), "frame {pa:#x} handed out twice");
            self.mem.fill(pa, 4096, 0);
        }
        Some(pa)
    }

    fn free_frame(&self, pa: u64) {
        if let Some(w) = &self.watch {
            w.released(pa, "free_frame");
        }
        let mut inner = self.inner.lock().unwrap();
        if inner.checked {
            assert!(inner.in_use.remove(&pa), "frame {pa:#x} freed but not in use");
            // Scribble it: a use after free then shows up as garbage mappings.
            self.mem.fill(pa, 4096, 0xEE);
        }
        inner.free.push(pa);
    }

    fn retire_os_table(&self, pa: u64) {
        if let Some(w) = &self.watch {
            w.released(pa, "retire_os_table");
        }
        assert!(
            !self.inner.lock().unwrap().in_use.contains(&pa),
            "{pa:#x} retired as the OS's, but the engine took it from here"
        );
        assert!(self.retired.lock().unwrap().insert(pa), "{pa:#x} retired twice");
    }
}

/// Counts shootdowns, and reports each to the watch.
#[derive(Default)]
pub struct SimTlb {
    /// Shootdowns so far.
    pub count: AtomicU64,
    /// Ranges of the last shootdown (empty: everything).
    pub last: Mutex<Vec<VaRange>>,
    /// The machine's instruments.
    pub watch: Option<Arc<Watch>>,
    /// Runs at every shootdown, on the converting CPU, while the frames
    /// are unmapped: a test's way to act in the middle of a conversion.
    pub hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

impl std::fmt::Debug for SimTlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTlb")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl TlbShootdown for SimTlb {
    fn shootdown(&self, ranges: &[VaRange]) {
        self.count.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().unwrap() = ranges.to_vec();
        if let Some(w) = &self.watch {
            w.shootdown(ranges);
        }
        if let Some(hook) = self.hook.lock().unwrap().as_mut() {
            hook();
        }
    }
}

/// One scratch window per simulated CPU; the CPU is the calling thread's
/// index in `cpu_of`.
#[derive(Debug)]
pub struct SimWindows {
    slots: Vec<WindowSlot>,
}

#[cfg(not(shuttle))]
thread_local! {
    static CPU: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// The explorer runs its threads on one OS thread: a CPU is one of its
// threads, not the OS thread's.
#[cfg(shuttle)]
shuttle::thread_local! {
    static CPU: std::cell::Cell<usize> = std::cell::Cell::new(0);
}

/// Makes the calling thread simulated CPU `cpu`.
pub fn set_cpu(cpu: usize) {
    CPU.with(|c| c.set(cpu));
}

/// The calling thread's simulated CPU.
pub fn current_cpu() -> usize {
    CPU.with(|c| c.get())
}

impl SimWindows {
    /// The window of simulated CPU `cpu`.
    pub fn slot_of(&self, cpu: usize) -> WindowSlot {
        self.slots[cpu]
    }

    /// Windows for `cpus` CPUs from `base`, with their PD path built in
    /// `builder`'s tables and a PT page each.
    pub fn new(builder: &mut TableBuilder<'_>, base: u64, cpus: usize) -> Self {
        let slots = (0..cpus)
            .map(|cpu| {
                let va = base + cpu as u64 * (2 << 20);
                builder.table_at(va, Level::Pd);
                WindowSlot {
                    va,
                    pt: builder.frames.allocate_frame().expect("window PT"),
                }
            })
            .collect();
        SimWindows { slots }
    }
}

// SAFETY: each simulated CPU (thread) gets its own window, whose PD path
// exists; a conversion stays on its thread.
unsafe impl ScratchWindow for SimWindows {
    fn slot(&self) -> WindowSlot {
        self.slots[current_cpu()]
    }
    fn invalidate_local(&self, _va: u64, _len: u64) {
        // Nothing caches translations of simulated page tables.
    }
}

/// Builds page tables in simulated memory the way an OS would at boot.
#[derive(Debug)]
pub struct TableBuilder<'f> {
    mem: Arc<GuestMemory>,
    /// Where the tables come from.
    pub frames: &'f SimFrames,
    /// The root table: the PML4, or the PML5 with five levels.
    pub root: u64,
    paging: Paging,
    enc: EncryptionBit,
}

impl<'f> TableBuilder<'f> {
    /// A new, empty hierarchy of depth `paging`.
    pub fn new(mem: Arc<GuestMemory>, frames: &'f SimFrames, paging: Paging, enc: EncryptionBit) -> Self {
        let root = frames.allocate_frame().expect("root table");
        Self::existing(mem, frames, root, paging, enc)
    }

    /// A builder over tables that already exist.
    pub fn existing(
        mem: Arc<GuestMemory>,
        frames: &'f SimFrames,
        root: u64,
        paging: Paging,
        enc: EncryptionBit,
    ) -> Self {
        TableBuilder {
            mem,
            frames,
            root,
            paging,
            enc,
        }
    }

    fn entry_pa(table: u64, level: Level, va: u64) -> u64 {
        table + 8 * level.index(va) as u64
    }

    /// The table of `level` on the path to `va`, created as needed.
    pub fn table_at(&mut self, va: u64, level: Level) -> u64 {
        let mut table = self.root;
        let mut current = self.paging.top();
        while current != level {
            let at = Self::entry_pa(table, current, va);
            let e = self.mem.read_u64(at);
            table = if e & PRESENT != 0 {
                assert!(e & HUGE == 0, "a leaf is in the way at {va:#x}");
                self.enc.address(e, Level::Pt)
            } else {
                let new = self.frames.allocate_frame().expect("table frame");
                self.mem
                    .write_u64(at, new | TABLE_POINTER | self.enc.bits_for(Visibility::Private));
                new
            };
            current = current.lower().unwrap();
        }
        table
    }

    /// Maps `[pa, pa + len)` at `va` with leaves of `page` size carrying
    /// `flags` (4 KiB form for `Level::Pt`, with `HUGE` added for larger)
    /// and the encryption bits of `side`.
    pub fn map(&mut self, va: u64, pa: u64, len: u64, page: Level, flags: u64, side: Visibility) {
        let span = page.span();
        assert!(
            va % span == 0 && pa % span == 0 && len % span == 0,
            "misaligned mapping"
        );
        let leaf_flags = if page == Level::Pt {
            flags
        } else {
            coco_convert::bits::flags_4k_to_huge(flags)
        };
        for off in (0..len).step_by(span as usize) {
            let table = self.table_at(va + off, page);
            self.mem.write_u64(
                Self::entry_pa(table, page, va + off),
                (pa + off) | leaf_flags | self.enc.bits_for(side) | PRESENT,
            );
        }
    }
}

/// A state table covering `[0, size)`.
pub fn state_storage(size: u64) -> Vec<AtomicU8> {
    (0..size / 4096).map(|_| AtomicU8::new(0)).collect()
}

/// A shared pool's chunk source: hands out the chunks it holds, the last
/// first, and takes back the ones returned.
#[derive(Debug)]
pub struct ChunkStack(Mutex<Vec<u64>>);

impl ChunkStack {
    /// A source holding `chunks`.
    pub fn new(chunks: Vec<u64>) -> Self {
        ChunkStack(Mutex::new(chunks))
    }

    /// The chunks it holds now.
    pub fn held(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }
}

// SAFETY: the tests give it chunks of simulated memory nothing else uses,
// and it hands each out once until it comes back.
unsafe impl coco_convert::pool::ChunkSource for ChunkStack {
    fn allocate_chunk(&self) -> Option<u64> {
        self.0.lock().unwrap().pop()
    }
    fn free_chunk(&self, pa: u64) {
        self.0.lock().unwrap().push(pa);
    }
}

/// `n` empty chunk slots for a pool, leaked: a test's pool lives as long
/// as it likes.
pub fn chunk_slots(n: usize) -> &'static mut [coco_convert::pool::ChunkSlot] {
    Vec::leak(vec![coco_convert::pool::ChunkSlot::new(); n])
}

/// Shared frames' bytes in simulated memory: what the direct map is to a
/// kernel. A test (the host, a device) reaches the same bytes through
/// [`GuestMemory`] directly.
#[derive(Debug, Clone)]
pub struct SimAccess(pub Arc<GuestMemory>);

// SAFETY: simulated memory is one contiguous allocation that outlives the
// tests' buffers; `contains` bounds the range.
unsafe impl coco_convert::pool::FrameAccess for SimAccess {
    fn bytes(&self, pa: u64, len: u64) -> Option<std::ptr::NonNull<u8>> {
        if !self.0.contains(pa, len) {
            return None;
        }
        std::ptr::NonNull::new(self.0.ptr(pa))
    }
}
