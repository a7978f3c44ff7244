//! Ready-made guests for engine tests: 2 GiB of simulated memory, a direct
//! map of one 1 GiB page then 2 MiB pages, a vmalloc area, an alias area,
//! scratch windows, and a TDX or SNP model watching the page tables.

use coco_convert::sync::{AtomicU64, AtomicU8};
use std::ptr::NonNull;
use std::sync::Arc;

use coco_convert::bits::{ACCESSED, DIRTY, NO_EXECUTE, WRITABLE};
use coco_convert::platform::snp::{GhcbSlot, PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::platform::SnpOptions;
use coco_convert::{Config, DirectMap, EncryptionBit, Engine, Level, Paging, StateTable, UnacceptedBitmap, Visibility};
use hvmock::{GuestMemory, GuestPageTables, MockSnp, MockTdx, SnpConfig, TdxConfig};

use crate::sim::{current_cpu, Layout, SimFrames, SimPhys, SimTlb, SimWindows, TableBuilder};
use crate::watch::{Snapshot, Watch};
use crate::{GIB, MIB};

/// Guest memory size.
pub const MEMORY: u64 = 2 * GIB;
/// Page-table frames come from the top 64 MiB of memory: the OS's own
/// (boot tables, vmalloc tables, window PTs) from the first half, the
/// engine's frame source from the second.
pub const TABLES: u64 = MEMORY - 64 * MIB;
/// Simulated CPUs.
pub const CPUS: usize = 4;
/// Flags of the direct map's leaves (4 KiB form).
pub const DIRECT_MAP_FLAGS: u64 = WRITABLE | NO_EXECUTE | ACCESSED | DIRTY | (1 << 8);

/// How the direct map is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `[0, 1 GiB)` one 1 GiB page, `[1 GiB, 2 GiB)` 2 MiB pages.
    Mixed,
    /// `[0, 1 GiB)` 2 MiB pages, `[1 GiB, 2 GiB)` 4 KiB pages.
    Small,
    /// `[0, 1 GiB)` one 1 GiB page if the flag says so, else 2 MiB pages;
    /// in `[1 GiB, 2 GiB)`, the first 64 2 MiB regions are 4 KiB pages
    /// where their bit in the mask is set, the rest 2 MiB pages.
    Random(bool, u64),
}

/// The parts of a simulated guest, without the platform model.
#[derive(Debug)]
pub struct Machine {
    /// Its memory.
    pub mem: Arc<GuestMemory>,
    /// Table access.
    pub phys: SimPhys,
    /// The engine's frame source.
    pub frames: SimFrames,
    /// The OS's own allocator for the tables it builds (at boot, for
    /// vmalloc ranges, the window PTs): a different allocator, so a frame
    /// the engine gives to the wrong one is caught.
    pub os_frames: SimFrames,
    /// The instruments every OS service reports to.
    pub watch: Arc<Watch>,
    /// Shootdowns.
    pub tlb: SimTlb,
    /// Scratch windows.
    pub windows: SimWindows,
    /// Per-frame state storage.
    pub states: Vec<AtomicU8>,
    /// Shared-frame counts per 2 MiB and 1 GiB region.
    pub region_words: Vec<coco_convert::sync::AtomicU32>,
    /// Whether engines over this machine keep region counts (they change
    /// how fast a collapse is ruled out, never what collapses).
    pub region_counts: bool,
    /// When engines over this machine collapse.
    pub collapse: coco_convert::Collapse,
    /// CR3.
    pub root: u64,
    /// Where its mappings are, and its tables' depth.
    pub layout: Layout,
    /// The PTE encryption bit.
    pub enc: EncryptionBit,
    /// OS table frames in use right after boot.
    pub boot_tables: usize,
    next_vmalloc: std::sync::atomic::AtomicU64,
}

impl Machine {
    /// Builds memory and page tables.
    pub fn new(enc: EncryptionBit, shape: Shape) -> Self {
        Self::new_with_tables_at(enc, shape, TABLES)
    }

    /// As [`new`](Self::new), with the 64 MiB of table frames at `tables`.
    pub fn new_with_tables_at(enc: EncryptionBit, shape: Shape, tables: u64) -> Self {
        Self::new_in(Layout::FOUR, enc, shape, tables)
    }

    /// As [`new_with_tables_at`](Self::new_with_tables_at), with the
    /// mappings and the tables' depth of `layout`.
    pub fn new_in(layout: Layout, enc: EncryptionBit, shape: Shape, tables: u64) -> Self {
        let (low, high, small_mask) = match shape {
            Shape::Mixed => (Level::Pdpt, Level::Pd, 0),
            Shape::Small => (Level::Pd, Level::Pt, 0),
            Shape::Random(gib_page, mask) => (if gib_page { Level::Pdpt } else { Level::Pd }, Level::Pd, mask),
        };
        let dm = layout.direct_map;
        Self::build_in(layout, enc, MEMORY, tables, |b| {
            b.map(dm, 0, GIB, low, DIRECT_MAP_FLAGS, Visibility::Private);
            for region in 0..512u64 {
                let pa = GIB + region * 2 * MIB;
                let page = if region < 64 && small_mask & (1 << region) != 0 {
                    Level::Pt
                } else {
                    high
                };
                b.map(dm + pa, pa, 2 * MIB, page, DIRECT_MAP_FLAGS, Visibility::Private);
            }
        })
    }

    /// `levels.len()` GiB of memory, GiB `i` of the direct map built from
    /// leaves of `levels[i]`.
    pub fn with_gib_levels(enc: EncryptionBit, levels: &[Level]) -> Self {
        Self::build(enc, levels.len() as u64 * GIB, |b| {
            for (i, &level) in levels.iter().enumerate() {
                let pa = i as u64 * GIB;
                b.map(
                    Layout::FOUR.direct_map + pa,
                    pa,
                    GIB,
                    level,
                    DIRECT_MAP_FLAGS,
                    Visibility::Private,
                );
            }
        })
    }

    fn build(enc: EncryptionBit, size: u64, direct_map: impl FnOnce(&mut TableBuilder<'_>)) -> Self {
        Self::build_with_tables_at(enc, size, size - 64 * MIB, direct_map)
    }

    /// As built above, with the 64 MiB of table frames at `tables`.
    pub fn build_with_tables_at(
        enc: EncryptionBit,
        size: u64,
        tables: u64,
        direct_map: impl FnOnce(&mut TableBuilder<'_>),
    ) -> Self {
        Self::build_in(Layout::FOUR, enc, size, tables, direct_map)
    }

    /// As [`build_with_tables_at`](Self::build_with_tables_at), with the
    /// mappings and the tables' depth of `layout`.
    pub fn build_in(
        layout: Layout,
        enc: EncryptionBit,
        size: u64,
        tables: u64,
        direct_map: impl FnOnce(&mut TableBuilder<'_>),
    ) -> Self {
        let mem = Arc::new(GuestMemory::new(size));
        let watch = Arc::new(Watch::new(mem.clone()));
        let os_frames = SimFrames::new(mem.clone(), tables, tables + 32 * MIB).watched(watch.clone());
        let frames = SimFrames::new(mem.clone(), tables + 32 * MIB, tables + 64 * MIB).watched(watch.clone());
        let (root, windows) = {
            let mut b = TableBuilder::new(mem.clone(), &os_frames, layout.paging, enc);
            direct_map(&mut b);
            let windows = SimWindows::new(&mut b, layout.windows, CPUS);
            (b.root, windows)
        };
        watch.attach(root, layout.paging, enc);
        let boot_tables = os_frames.in_use();
        Machine {
            phys: SimPhys(mem.clone()),
            states: crate::sim::state_storage(size),
            region_words: (0..StateTable::region_words(0, (size / 4096) as usize))
                .map(|_| coco_convert::sync::AtomicU32::new(0))
                .collect(),
            region_counts: true,
            collapse: coco_convert::Collapse::AfterEachConversion,
            mem,
            frames,
            os_frames,
            tlb: SimTlb {
                watch: Some(watch.clone()),
                ..SimTlb::default()
            },
            watch,
            windows,
            root,
            layout,
            enc,
            boot_tables,
            next_vmalloc: std::sync::atomic::AtomicU64::new(layout.vmalloc),
        }
    }

    /// Bytes of memory.
    pub fn size(&self) -> u64 {
        self.mem.size()
    }

    /// An engine over this machine's tables, frames, TLB and state table.
    pub fn engine<P: coco_convert::Platform>(&self, platform: P) -> Engine<'_, &SimPhys, &SimFrames, &SimTlb, P> {
        Engine::new(
            self.config(),
            &self.phys,
            &self.frames,
            &self.tlb,
            platform,
            self.state_table(),
        )
    }

    /// The state table over this machine's storage, with its region
    /// counts unless `region_counts` is off.
    pub fn state_table(&self) -> StateTable<'_> {
        let table = StateTable::new(0, &self.states);
        // Under the schedule explorer every atomic access is a step, and
        // setting the counts reads every frame's state: far past its step
        // bound on a machine of gigabytes. Its runs go without them.
        if !self.region_counts || cfg!(shuttle) {
            return table;
        }
        table
            .with_region_counts(&self.region_words)
            .expect("sized by region_words")
    }

    /// The engine configuration for this machine.
    pub fn config(&self) -> Config {
        Config {
            root: self.root,
            paging: self.layout.paging,
            direct_map: DirectMap {
                va: self.layout.direct_map,
                pa: 0,
                len: self.size(),
            },
            collapse: self.collapse,
            collapse_1g: true,
        }
    }

    /// What the models need to watch the page tables.
    pub fn page_tables(&self) -> GuestPageTables {
        GuestPageTables {
            cr3: self.root,
            la57: self.layout.paging == Paging::Five,
            enc_mask: self.enc.mask(),
        }
    }

    /// A fresh 2 MiB-aligned vmalloc-style range of `len` bytes (nothing
    /// mapped), with a 2 MiB gap after it.
    pub fn vmalloc_area(&self, len: u64) -> u64 {
        self.next_vmalloc.fetch_add(
            len.div_ceil(2 * MIB) * 2 * MIB + 2 * MIB,
            std::sync::atomic::Ordering::Relaxed,
        )
    }

    /// Maps `frames` (4 KiB each) at a fresh vmalloc-style address, 4 KiB
    /// pages, private; returns the address.
    pub fn vmalloc(&self, frames: &[u64]) -> u64 {
        let va = self.vmalloc_area(frames.len() as u64 * 4096);
        let leaves: Vec<(u64, Level)> = frames.iter().map(|&pa| (pa, Level::Pt)).collect();
        self.map_pieces(va, &leaves);
        va
    }

    /// Maps `pieces` (frame, leaf size) one after the other from `va`, as
    /// the OS maps a vmalloc-style range; returns the bytes mapped.
    pub fn map_pieces(&self, va: u64, pieces: &[(u64, Level)]) -> u64 {
        let mut b = self.builder();
        let mut at = va;
        for &(pa, level) in pieces {
            b.map(at, pa, level.span(), level, DIRECT_MAP_FLAGS, Visibility::Private);
            at += level.span();
        }
        at - va
    }

    /// An engine over this machine with another frame source, over `platform`.
    pub fn engine_with_frames<F: coco_convert::FrameSource, P: coco_convert::Platform>(
        &self,
        frames: F,
        platform: P,
    ) -> Engine<'_, &SimPhys, F, &SimTlb, P> {
        Engine::new(
            self.config(),
            &self.phys,
            frames,
            &self.tlb,
            platform,
            self.state_table(),
        )
    }

    /// A builder over this machine's tables, taking new tables from the
    /// OS's allocator.
    pub fn builder(&self) -> TableBuilder<'_> {
        TableBuilder::existing(
            self.mem.clone(),
            &self.os_frames,
            self.root,
            self.layout.paging,
            self.enc,
        )
    }

    /// Every reachable table's entries and every frame's state.
    pub fn snapshot(&self) -> Snapshot {
        let tables = crate::watch::tables_with_regions(&self.mem, self.root, self.layout.paging, self.enc)
            .into_keys()
            .map(|t| (t, (0..512).map(|i| self.mem.read_u64(t + 8 * i)).collect()))
            .collect();
        let states = StateTable::new(0, &self.states);
        let states = (0..self.size() / 4096).map(|f| states.get(f * 4096)).collect();
        Snapshot { tables, states }
    }

    /// Table frames the OS and the engine hold now, minus the OS tables
    /// the engine retired (an OS would reuse those).
    pub fn table_frames_held(&self) -> std::collections::BTreeSet<u64> {
        let retired = self.frames.retired();
        let mut held: std::collections::BTreeSet<u64> = self
            .os_frames
            .in_use_set()
            .into_iter()
            .filter(|t| !retired.contains(t))
            .collect();
        held.extend(self.frames.in_use_set());
        held
    }

    /// Lets the watch ask `engine` whether its table lock is held, until
    /// the returned guard drops.
    pub fn probe_lock<'e, 'a, M, F, T, P>(&self, engine: &'e Engine<'a, M, F, T, P>) -> LockProbe<'e>
    where
        M: coco_convert::PhysMem,
        F: coco_convert::FrameSource,
        T: coco_convert::TlbShootdown,
        P: coco_convert::Platform,
        Engine<'a, M, F, T, P>: Sync,
    {
        let probe: Box<dyn Fn() -> bool + Send + Sync + 'e> = Box::new(move || engine.table_lock_held());
        // SAFETY: only the lifetime is erased; the guard removes the probe
        // before `engine` can go away (`'e` bounds the guard).
        let probe: Box<dyn Fn() -> bool + Send + Sync + 'static> = unsafe { std::mem::transmute(probe) };
        self.watch.set_lock_probe(Some(probe));
        LockProbe {
            watch: self.watch.clone(),
            _engine: std::marker::PhantomData,
        }
    }

    /// The direct-map address of `pa` in a machine of [`Layout::FOUR`].
    pub fn direct(pa: u64) -> u64 {
        Layout::FOUR.direct_map + pa
    }

    /// The direct-map address of `pa` in this machine.
    pub fn direct_va(&self, pa: u64) -> u64 {
        self.layout.direct_map + pa
    }

    /// Every table page reachable from the root, with the region it maps.
    pub fn tables_with_regions(&self) -> std::collections::BTreeMap<u64, (u64, u64)> {
        crate::watch::tables_with_regions(&self.mem, self.root, self.layout.paging, self.enc)
    }

    /// Not-present entries of every reachable table, by (table, index).
    pub fn not_present_entries(&self) -> std::collections::BTreeMap<(u64, u64), u64> {
        crate::watch::not_present_entries(&self.mem, self.root, self.layout.paging, self.enc)
    }
}

/// Keeps the watch's lock probe installed; removes it on drop.
#[derive(Debug)]
pub struct LockProbe<'e> {
    watch: Arc<Watch>,
    _engine: std::marker::PhantomData<&'e ()>,
}

impl Drop for LockProbe<'_> {
    fn drop(&mut self) {
        self.watch.set_lock_probe(None);
    }
}

/// A TDX guest: the machine and the TDX module + VMM model.
#[derive(Debug)]
pub struct TdxWorld {
    /// The machine.
    pub m: Machine,
    /// The model, watching the page tables.
    pub tdx: MockTdx,
}

/// The engine of a simulated machine, over platform `P`.
pub type EngineOf<'w, P> = Engine<'w, &'w SimPhys, &'w SimFrames, &'w SimTlb, P>;

/// The engine type of a TDX world.
pub type TdxEngine<'w> = Engine<'w, &'w SimPhys, &'w SimFrames, &'w SimTlb, Tdx<&'w MockTdx>>;

impl TdxWorld {
    /// A TD with GPAW 48 and the given model configuration.
    pub fn new(config: TdxConfig, shape: Shape) -> Self {
        Self::with_machine(config, |enc| Machine::new(enc, shape))
    }

    /// A TD on the machine `build` makes for the shared bit.
    pub fn with_machine(config: TdxConfig, build: impl FnOnce(EncryptionBit) -> Machine) -> Self {
        let m = build(EncryptionBit::tdx(1 << (config.gpaw - 1)).unwrap());
        let tdx = MockTdx::new(m.mem.clone(), config);
        tdx.attach_page_tables(m.page_tables());
        TdxWorld { m, tdx }
    }

    /// The engine.
    pub fn engine(&self) -> TdxEngine<'_> {
        self.m.engine(Tdx::new(&self.tdx, self.tdx.shared_mask()).unwrap())
    }

    /// Makes `[pa, pa + len)` memory the firmware hands over unaccepted:
    /// pending in the TD, mapped in the Secure EPT at `level`.
    pub fn hand_over_unaccepted(&self, pa: u64, len: u64, level: u8) {
        let page = hvmock::TdxPage {
            state: hvmock::TdxPageState::Pending,
            level,
        };
        self.tdx.set_pages(pa, len, page);
    }

    /// The engine with an empty unaccepted-memory bitmap of 2 MiB units in
    /// `storage` ([`crate::bitmap_storage`]).
    pub fn engine_accepting<'w>(&'w self, storage: &'w [AtomicU64]) -> TdxEngine<'w> {
        let mut e = self.engine();
        e.adopt_unaccepted(UnacceptedBitmap::new(0, 2 * MIB, storage).expect("bitmap"))
            .expect("an empty bitmap");
        e
    }

    /// The firmware's lie: `[pa, pa + len)`, which the memory map calls
    /// unaccepted, is accepted already (at `level`: 0 4 KiB, 1 2 MiB), so
    /// the guest's ACCEPT fails.
    pub fn accepted_behind_the_guests_back(&self, pa: u64, len: u64, level: u8) {
        let page = hvmock::TdxPage {
            state: hvmock::TdxPageState::Accepted,
            level,
        };
        self.tdx.set_pages(pa, len, page);
    }

    /// The side the model holds the frame at `pa` on; `None` while pending.
    pub fn host_side(&self, pa: u64) -> Option<Visibility> {
        match self.tdx.page(pa).state {
            hvmock::TdxPageState::Accepted => Some(Visibility::Private),
            hvmock::TdxPageState::Shared => Some(Visibility::Shared),
            hvmock::TdxPageState::Pending => None,
        }
    }
}

/// An SNP guest: the machine, the hypervisor + RMP model, per-CPU GHCBs.
#[derive(Debug)]
pub struct SnpWorld {
    /// The machine.
    pub m: Machine,
    /// The model, watching the page tables.
    pub snp: MockSnp,
    /// GHCB slots, one per CPU.
    pub ghcbs: &'static [GhcbSlot],
}

/// The engine type of an SNP world.
pub type SnpEngine<'w> =
    Engine<'w, &'w SimPhys, &'w SimFrames, &'w SimTlb, Snp<&'w MockSnp, &'w MockSnp, PerCpuGhcbs<'static>>>;

impl SnpWorld {
    /// A guest with C-bit 51 and the given model configuration.
    pub fn new(config: SnpConfig, shape: Shape) -> Self {
        Self::with_machine(config, |enc| Machine::new(enc, shape))
    }

    /// A guest on the machine `build` makes for the C-bit.
    pub fn with_machine(config: SnpConfig, build: impl FnOnce(EncryptionBit) -> Machine) -> Self {
        let m = build(EncryptionBit::snp(config.c_bit).unwrap());
        let snp = MockSnp::new(m.mem.clone(), config);
        snp.attach_page_tables(m.page_tables());
        let ghcbs = Box::leak(
            (0..CPUS)
                .map(|_| GhcbSlot::new())
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        SnpWorld { m, snp, ghcbs }
    }

    /// The engine, with the given batching options.
    pub fn engine_with(&self, options: SnpOptions) -> SnpEngine<'_> {
        let platform = Snp::new(&self.snp, &self.snp, PerCpuGhcbs::new(self.ghcbs, current_cpu), 51)
            .unwrap()
            .with_options(options);
        self.m.engine(platform).with_window(&self.m.windows)
    }

    /// The engine with the fewest-calls options.
    pub fn engine(&self) -> SnpEngine<'_> {
        self.engine_with(SnpOptions::MINIMAL)
    }

    /// As [`TdxWorld::engine_accepting`].
    pub fn engine_accepting<'w>(&'w self, storage: &'w [AtomicU64]) -> SnpEngine<'w> {
        let mut e = self.engine();
        e.adopt_unaccepted(UnacceptedBitmap::new(0, 2 * MIB, storage).expect("bitmap"))
            .expect("an empty bitmap");
        e
    }

    /// Makes `[pa, pa + len)` memory launch leaves unaccepted: assigned to
    /// the guest, not validated.
    pub fn hand_over_unvalidated(&self, pa: u64, len: u64) {
        let entry = hvmock::RmpEntry {
            assigned: true,
            validated: false,
            huge: false,
        };
        self.snp.set_rmp(pa, len, entry);
    }

    /// The host's lie: `[pa, pa + len)` is validated already, so the
    /// guest's PVALIDATE finds nothing to change. (To keep it so, a test
    /// also has the page state change only pretend:
    /// `SnpHostile::PscSuccessWithoutRmpChange`.)
    pub fn validated_behind_the_guests_back(&self, pa: u64, len: u64) {
        let entry = hvmock::RmpEntry {
            assigned: true,
            validated: true,
            huge: false,
        };
        self.snp.set_rmp(pa, len, entry);
    }

    /// The side the RMP holds the frame at `pa` on; `None` in between
    /// (assigned but not validated, or the reverse).
    pub fn host_side(&self, pa: u64) -> Option<Visibility> {
        let r = self.snp.rmp(pa);
        match (r.assigned, r.validated) {
            (true, true) => Some(Visibility::Private),
            (false, false) => Some(Visibility::Shared),
            _ => None,
        }
    }

    /// Sets up the calling CPU's GHCB at `pa` through `engine` (MSR
    /// protocol, since it has none yet) and installs it.
    ///
    /// # Panics
    ///
    /// If the (honest) model refuses: a fixture error.
    pub fn boot_ghcb(&self, engine: &SnpEngine<'_>, pa: u64) {
        // SAFETY: negotiation has no memory effect.
        unsafe { snp_ghcb::protocol::negotiate(&self.snp) }.expect("negotiate");
        let ptr = NonNull::new(self.m.mem.ptr(pa).cast()).unwrap();
        // SAFETY: `ptr` is the page at `pa` in the simulated memory, used by
        // nothing else.
        unsafe { coco_convert::setup_ghcb(engine, pa, ptr) }.expect("GHCB setup");
    }
}
