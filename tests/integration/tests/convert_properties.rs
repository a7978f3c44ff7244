//! Random guests as a kernel builds them, and random sequences of
//! conversions both ways, checked after every step against a plain
//! reference model.
//!
//! The guests have what real kernels have, not only what the engine would
//! build: direct-map entries the OS left not present at 4 KiB, 2 MiB and
//! 1 GiB (a guard page with its frame kept, software bits only, zero);
//! tables the OS built at boot beside the ones the engine takes from its
//! frame source; vmalloc-style ranges that mix 2 MiB and 4 KiB leaves, map
//! a frame twice, or have a hole; a registered alias (a kernel-image-like
//! mapping, with a hole) registered and removed between conversions;
//! ranges at the end of memory; scratch buffers small enough that one
//! range goes to the host in many calls; a host that fails.
//!
//! After every step:
//! - every frame's engine state is what the reference says;
//! - every present mapping of every frame carries the attribute that
//!   matches the host's state of the frame, and no poisoned frame is
//!   mapped;
//! - every entry that was not present before the step is unchanged;
//! - an error that says nothing changed left every table and state exactly
//!   as before; a report counts exactly the distinct frames converted;
//! - the table pages reachable from the root are exactly the ones the OS
//!   built and the engine took (none leaked, none freed while in use); the
//!   engine gave back to its frame source only frames it took from it;
//! - no page-table page was given back before a shootdown covering it, and
//!   no OS service was called with the table lock held (the watch);
//! - no hypercall saw a present alias of its frames (the models).
//!
//! And converting everything back restores every original huge page.

use std::collections::BTreeSet;

use coco_convert::bits::{HUGE, PRESENT};
use coco_convert::{Alias, ConvertError, Engine, Level, PageState, Platform, Target, Visibility};
use hvmock::{GuestPageTables, Mapping, SnpConfig, SnpHostile, TdxConfig, TdxHostile};
use integration::sim::{Layout, SimFrames, SimPhys, SimTlb};
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, CPUS, DIRECT_MAP_FLAGS, MEMORY};
use integration::{GIB, MIB};
use proptest::prelude::*;

/// Where the property guests keep their page-table frames: below the top
/// of memory, so that the last frames of the direct map can convert.
const TABLES: u64 = 1856 * MIB;
/// Frames for 4 KiB buffer pages, and for 2 MiB buffer leaves.
const SMALL_FRAMES: u64 = 1536 * MIB;
const HUGE_FRAMES: u64 = 1792 * MIB;
/// The registered alias: a kernel-image-like mapping of 8 MiB.
const ALIAS_PA: u64 = GIB + 200 * MIB;
const ALIAS_LEN: u64 = 8 * MIB;
const SOFTWARE_BITS: u64 = 0x0E00 | (0x7F << 52);

/// What the property needs of a guest: its machine, the host's view of a
/// frame (`None`: a state no mapping may show, like SNP assigned but not
/// validated), and a host that fails the next conversion.
trait Guest {
    fn machine(&self) -> &Machine;
    fn host_side(&self, pa: u64) -> Option<Visibility>;
    fn violations(&self) -> usize;
    fn fail_next(&self, fail: bool);
}

impl Guest for TdxWorld {
    fn machine(&self) -> &Machine {
        &self.m
    }
    fn host_side(&self, pa: u64) -> Option<Visibility> {
        TdxWorld::host_side(self, pa)
    }
    fn violations(&self) -> usize {
        self.tdx.violations().len()
    }
    fn fail_next(&self, fail: bool) {
        self.tdx.set_hostile(fail.then_some(TdxHostile::NoProgressForever));
    }
}

impl Guest for SnpWorld {
    fn machine(&self) -> &Machine {
        &self.m
    }
    fn host_side(&self, pa: u64) -> Option<Visibility> {
        SnpWorld::host_side(self, pa)
    }
    fn violations(&self) -> usize {
        self.snp.violations().len()
    }
    fn fail_next(&self, fail: bool) {
        self.snp.set_hostile(fail.then_some(SnpHostile::PscStall));
    }
}

/// How the OS left a direct-map entry not present.
#[derive(Clone, Copy, Debug)]
enum HoleKind {
    /// P cleared, frame kept (`set_memory_np`).
    FrameKept,
    /// Only software-available bits.
    SoftwareBits,
    Zero,
}

impl HoleKind {
    fn entry(self, present: u64) -> u64 {
        match self {
            HoleKind::FrameKept => present & !PRESENT,
            HoleKind::SoftwareBits => SOFTWARE_BITS,
            HoleKind::Zero => 0,
        }
    }
}

/// A direct-map hole: a 4 KiB page, a 2 MiB region (where the direct map
/// has a 2 MiB leaf), or the first GiB (where it is one 1 GiB leaf).
#[derive(Clone, Copy, Debug)]
enum Hole {
    Page(u64, HoleKind),
    Region(u64, HoleKind),
    FirstGib(HoleKind),
}

/// A vmalloc-style buffer: 2 MiB leaves first (its start is 2 MiB
/// aligned), then 4 KiB pages; `twice` maps some of its frames again at
/// the end; `hole` leaves one of its pages unmapped.
#[derive(Clone, Debug)]
struct Buffer {
    huge: Vec<u64>,
    small: Vec<u64>,
    twice: Vec<usize>,
    hole: Option<(usize, HoleKind)>,
}

impl Buffer {
    /// Frames in mapping order (a frame mapped twice appears twice).
    fn pages(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .huge
            .iter()
            .flat_map(|&pa| (pa..pa + 2 * MIB).step_by(4096))
            .chain(self.small.iter().copied())
            .collect();
        let again: Vec<u64> = self.twice.iter().map(|&i| v[i % v.len()]).collect();
        v.extend(again);
        v
    }

    fn frames(&self) -> BTreeSet<u64> {
        self.pages().into_iter().collect()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Physical {
        page: u64,
        pages: u64,
        to_shared: bool,
    },
    /// The same, named by its direct-map address.
    DirectMapVirtual {
        page: u64,
        pages: u64,
        to_shared: bool,
    },
    Vmalloc {
        buffer: usize,
        to_shared: bool,
        scratch: usize,
    },
    RegisterAlias,
    UnregisterAlias,
    /// The next conversion meets a failing host.
    FailNext,
}

fn op(buffers: usize) -> impl Strategy<Value = Op> {
    let pages = prop_oneof![
        0u64..4096,
        (GIB / 4096 - 600)..(GIB / 4096 + 600),
        (GIB / 4096)..(GIB / 4096 + 64 * 512),
        (ALIAS_PA / 4096 - 64)..((ALIAS_PA + ALIAS_LEN) / 4096),
        (MEMORY / 4096 - 600)..(MEMORY / 4096),
    ];
    prop_oneof![
        6 => (pages.clone(), 1u64..700, any::<bool>()).prop_map(|(page, pages, to_shared)| Op::Physical { page, pages, to_shared }),
        2 => (pages, 1u64..300, any::<bool>()).prop_map(|(page, pages, to_shared)| Op::DirectMapVirtual { page, pages, to_shared }),
        6 => (0..buffers, any::<bool>(), 1usize..40).prop_map(|(buffer, to_shared, scratch)| Op::Vmalloc { buffer, to_shared, scratch }),
        1 => Just(Op::RegisterAlias),
        1 => Just(Op::UnregisterAlias),
        1 => Just(Op::FailNext),
    ]
}

fn hole_kind() -> impl Strategy<Value = HoleKind> {
    prop_oneof![
        Just(HoleKind::FrameKept),
        Just(HoleKind::SoftwareBits),
        Just(HoleKind::Zero)
    ]
}

fn holes() -> impl Strategy<Value = Vec<Hole>> {
    let hole = prop_oneof![
        4 => (0u64..(GIB / 4096 + 64 * 512), hole_kind()).prop_map(|(p, k)| Hole::Page(p, k)),
        2 => (0u64..512, hole_kind()).prop_map(|(r, k)| Hole::Region(GIB / (2 * MIB) + r, k)),
        1 => hole_kind().prop_map(Hole::FirstGib),
    ];
    prop::collection::vec(hole, 0..6)
}

/// Buffers with distinct frames.
fn buffers() -> impl Strategy<Value = Vec<Buffer>> {
    let buffer = (
        prop::collection::btree_set(0u64..32, 0..2),
        prop::collection::btree_set(0u64..65536, 1..120),
        prop::collection::vec(0usize..2000, 0..4),
        prop::option::weighted(0.2, (0usize..2000, hole_kind())),
    );
    prop::collection::vec(buffer, 1..4).prop_map(|raw| {
        let (mut used_small, mut used_huge) = (BTreeSet::new(), BTreeSet::new());
        raw.into_iter()
            .map(|(huge, small, twice, hole)| Buffer {
                huge: huge
                    .into_iter()
                    .filter(|h| used_huge.insert(*h))
                    .map(|h| HUGE_FRAMES + h * 2 * MIB)
                    .collect(),
                small: small
                    .into_iter()
                    .filter(|p| used_small.insert(*p))
                    .map(|p| SMALL_FRAMES + p * 4096)
                    .collect(),
                twice,
                hole,
            })
            .filter(|b| !b.small.is_empty() || !b.huge.is_empty())
            .collect()
    })
}

/// Replaces the 2 MiB direct-map leaf around `pa` by an OS-built table of
/// 4 KiB leaves, as an OS does before it unmaps one page.
fn os_split_2m(m: &Machine, pa: u64) {
    let t = m.page_tables();
    let va = m.direct_va(pa);
    if t.translate(&m.mem, va).is_some_and(|map| map.size == 4096) {
        return;
    }
    let region = va & !(2 * MIB - 1);
    let base = pa & !(2 * MIB - 1);
    let mut b = m.builder();
    let pd = b.table_at(region, Level::Pd);
    let pde = pd + 8 * Level::Pd.index(region) as u64;
    m.mem.write_u64(pde, 0);
    b.map(region, base, 2 * MIB, Level::Pt, DIRECT_MAP_FLAGS, Visibility::Private);
}

fn punch(m: &Machine, hole: Hole) {
    let entry_pa = |va: u64, level: Level| {
        let pt = m.builder().table_at(va, level);
        pt + 8 * level.index(va) as u64
    };
    let t = m.page_tables();
    match hole {
        Hole::Page(page, kind) => {
            let pa = page * 4096;
            if t.translate(&m.mem, m.direct_va(pa)).is_some_and(|map| map.size == GIB) {
                return; // the OS would split the 1 GiB page first; keep it simple
            }
            os_split_2m(m, pa);
            let at = entry_pa(m.direct_va(pa), Level::Pt);
            m.mem.write_u64(at, kind.entry(m.mem.read_u64(at)));
        }
        Hole::Region(region, kind) => {
            let va = m.direct_va(region * 2 * MIB);
            if t.translate(&m.mem, va).is_some_and(|map| map.size == 2 * MIB) {
                let at = entry_pa(va, Level::Pd);
                m.mem.write_u64(at, kind.entry(m.mem.read_u64(at)));
            }
        }
        Hole::FirstGib(kind) => {
            let dm = m.layout.direct_map;
            if t.translate(&m.mem, dm).is_some_and(|map| map.size == GIB) {
                let at = entry_pa(dm, Level::Pdpt);
                m.mem.write_u64(at, kind.entry(m.mem.read_u64(at)));
            }
        }
    }
}

/// Maps `b` at a fresh 2 MiB-aligned address; returns it.
fn map_buffer(m: &Machine, b: &Buffer) -> u64 {
    let pages = b.pages();
    let va = m.vmalloc_area(pages.len() as u64 * 4096);
    let first_small = b.huge.len() * 512;
    let leaves: Vec<(u64, Level)> = b
        .huge
        .iter()
        .map(|&pa| (pa, Level::Pd))
        .chain(pages[first_small..].iter().map(|&pa| (pa, Level::Pt)))
        .collect();
    m.map_pieces(va, &leaves);
    if let Some((i, kind)) = b.hole {
        let i = first_small + i % (pages.len() - first_small).max(1);
        if i < pages.len() {
            let page = va + i as u64 * 4096;
            let at = m.builder().table_at(page, Level::Pt) + 8 * Level::Pt.index(page) as u64;
            m.mem.write_u64(at, kind.entry(m.mem.read_u64(at)));
        }
    }
    va
}

/// The kernel-image-like alias: 2 MiB leaves, but its second 2 MiB mapped
/// by 4 KiB pages in a table the OS built, one of them unmapped (freed
/// init memory). The OS maps it only while it is registered.
struct AliasFixture {
    va: u64,
    pt: u64,
    hole: u64,
}

impl AliasFixture {
    fn new(m: &Machine) -> Self {
        let mut b = m.builder();
        let va = m.layout.alias;
        let small = va + 2 * MIB;
        b.map(
            small,
            ALIAS_PA + 2 * MIB,
            2 * MIB,
            Level::Pt,
            DIRECT_MAP_FLAGS,
            Visibility::Private,
        );
        let f = AliasFixture {
            va,
            pt: b.table_at(small, Level::Pt),
            hole: small + 5 * 4096,
        };
        f.unmap(m);
        f
    }

    fn pde(m: &Machine, va: u64) -> u64 {
        let pd = m.builder().table_at(va, Level::Pd);
        pd + 8 * Level::Pd.index(va) as u64
    }

    fn map(&self, m: &Machine) {
        let enc = m.enc.bits_for(Visibility::Private);
        for off in (0..ALIAS_LEN).step_by(2 * MIB as usize) {
            let va = self.va + off;
            if off == 2 * MIB {
                for i in 0..512u64 {
                    let leaf = (ALIAS_PA + off + i * 4096) | DIRECT_MAP_FLAGS | enc | PRESENT;
                    let entry = if va + i * 4096 == self.hole { 0 } else { leaf };
                    m.mem.write_u64(self.pt + 8 * i, entry);
                }
                continue;
            }
            let huge = coco_convert::bits::flags_4k_to_huge(DIRECT_MAP_FLAGS);
            m.mem
                .write_u64(Self::pde(m, va), (ALIAS_PA + off) | huge | enc | PRESENT);
        }
    }

    fn unmap(&self, m: &Machine) {
        for off in (0..ALIAS_LEN).step_by(2 * MIB as usize) {
            if off == 2 * MIB {
                (0..512u64).for_each(|i| m.mem.write_u64(self.pt + 8 * i, 0));
            } else {
                let pde = Self::pde(m, self.va + off);
                assert!(
                    m.mem.read_u64(pde) & HUGE != 0 || m.mem.read_u64(pde) == 0,
                    "the engine's table left under the alias"
                );
                m.mem.write_u64(pde, 0);
            }
        }
    }
}

/// Removes every mapping of `[va, va + len)` (as an OS's vunmap does).
fn unmap_buffer(m: &Machine, va: u64, len: u64) {
    let t = m.page_tables();
    let mut page = va;
    while page < va + len {
        let Some(map) = t.translate(&m.mem, page) else {
            page += 4096;
            continue;
        };
        let level = if map.size == 2 * MIB { Level::Pd } else { Level::Pt };
        let table = m.builder().table_at(page, level);
        m.mem.write_u64(table + 8 * level.index(page) as u64, 0);
        page = (page / map.size + 1) * map.size;
    }
}

#[derive(Default)]
struct Reference {
    shared: BTreeSet<u64>,
    poisoned: BTreeSet<u64>,
}

impl Reference {
    fn side(&self, pa: u64) -> Visibility {
        if self.shared.contains(&pa) {
            Visibility::Shared
        } else {
            Visibility::Private
        }
    }

    fn state(&self, pa: u64) -> PageState {
        if self.poisoned.contains(&pa) {
            PageState::Poisoned
        } else {
            PageState::of(self.side(pa))
        }
    }
}

type SimEngine<'w, P> = Engine<'w, &'w SimPhys, &'w SimFrames, &'w SimTlb, P>;

fn check<P: Platform>(w: &impl Guest, e: &SimEngine<'_, P>, reference: &Reference) -> Result<(), TestCaseError> {
    let m = w.machine();
    let tables = m.page_tables();
    for map in tables.mappings(&m.mem) {
        if map.va >= m.direct_va(TABLES) && map.va < m.direct_va(TABLES + 64 * MIB) {
            continue; // the page-table pages themselves
        }
        let side = m.enc.side_of(if map.enc_set { m.enc.mask() } else { 0 });
        for pa in (map.pa..map.pa + map.size).step_by(4096) {
            prop_assert!(
                !reference.poisoned.contains(&pa),
                "poisoned {:#x} mapped at {:x?}",
                pa,
                map
            );
            prop_assert_eq!(w.host_side(pa), Some(side), "mapping {:x?} of frame {:#x}", map, pa);
            prop_assert_eq!(reference.side(pa), side, "frame {:#x}", pa);
        }
    }
    for &pa in reference.shared.iter().chain(&reference.poisoned) {
        prop_assert_eq!(e.state(pa), Some(reference.state(pa)), "frame {:#x}", pa);
    }
    let census = e.census();
    prop_assert_eq!(census.shared, reference.shared.len() as u64);
    prop_assert_eq!(census.converting, 0);
    prop_assert_eq!(census.poisoned, reference.poisoned.len() as u64);
    e.release_deferred_tables();
    let reachable: BTreeSet<u64> = m.tables_with_regions().into_keys().collect();
    let held = m.table_frames_held();
    prop_assert!(
        reachable.is_subset(&held),
        "a reachable table is not held (freed, or never allocated)"
    );
    prop_assert_eq!(
        held.len(),
        reachable.len() + CPUS,
        "window PTs are the only unreachable tables held"
    );
    prop_assert_eq!(w.violations(), 0);
    let watched = m.watch.violations();
    prop_assert!(watched.is_empty(), "{:?}", watched);
    Ok(())
}

/// Every original leaf of at least 2 MiB maps the same memory with a leaf
/// at least as large, with the same attributes.
fn huge_layout_restored(original: &[Mapping], tables: GuestPageTables, w: &Machine) -> Result<(), TestCaseError> {
    for m in original.iter().filter(|m| m.size >= 2 * MIB) {
        let now = tables.translate(&w.mem, m.va).unwrap();
        prop_assert!(
            now.size >= m.size && now.pa == m.pa && now.enc_set == m.enc_set,
            "{:x?} is now {:x?}",
            m,
            now
        );
    }
    Ok(())
}

fn machine(layout: Layout, enc: coco_convert::EncryptionBit, gib_page: bool, small_mask: u64) -> Machine {
    Machine::new_in(layout, enc, Shape::Random(gib_page, small_mask), TABLES)
}

/// What a random guest is built from, at either depth.
struct RandomGuest {
    gib_page: bool,
    small_mask: u64,
    holes: Vec<Hole>,
    buffers: Vec<Buffer>,
}

/// A TD: GPAW 48 with four levels, GPAW 52 (shared bit 51) with five, as
/// a TD that uses LA57 would have.
fn tdx_case(layout: Layout, g: RandomGuest, ops: Vec<Op>) -> Result<(), TestCaseError> {
    tdx_case_traced(layout, g, ops, true, None)
}

/// A TD case with or without region counts, recording the tables and
/// states after every step in `trace`.
fn tdx_case_traced(
    layout: Layout,
    g: RandomGuest,
    ops: Vec<Op>,
    region_counts: bool,
    trace: Option<&mut Vec<integration::watch::Snapshot>>,
) -> Result<(), TestCaseError> {
    let gpaw = match layout.paging {
        coco_convert::Paging::Four => 48,
        coco_convert::Paging::Five => 52,
    };
    let config = TdxConfig {
        gpaw,
        map_gpa_chunk_pages: Some(97),
        ..TdxConfig::default()
    };
    let w = TdxWorld::with_machine(config, |enc| {
        let mut m = machine(layout, enc, g.gib_page, g.small_mask);
        m.region_counts = region_counts;
        m
    });
    let e = w.engine();
    run(&w, &e, &g.holes, &g.buffers, ops, trace)
}

fn snp_case(layout: Layout, g: RandomGuest, ops: Vec<Op>, per_exit: Option<u64>) -> Result<(), TestCaseError> {
    let config = SnpConfig {
        psc_pages_per_exit: per_exit,
        ..SnpConfig::default()
    };
    let w = SnpWorld::with_machine(config, |enc| machine(layout, enc, g.gib_page, g.small_mask));
    let e = w.engine();
    run(&w, &e, &g.holes, &g.buffers, ops, None)
}

proptest! {
    // Shrinking stops after a minute, so a failure reports well within the
    // test runner's time limit.
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 256, max_shrink_time: 60_000, ..ProptestConfig::default() })]

    #[test]
    fn random_conversions_keep_every_promise_tdx(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        holes in holes(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..14),
    ) {
        tdx_case(Layout::FOUR, RandomGuest { gib_page, small_mask, holes, buffers }, ops)?;
    }

    #[test]
    fn random_conversions_keep_every_promise_snp(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        holes in holes(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..12),
        per_exit in prop::option::of(1u64..700),
    ) {
        snp_case(Layout::FOUR, RandomGuest { gib_page, small_mask, holes, buffers }, ops, per_exit)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 256, max_shrink_time: 60_000, ..ProptestConfig::default() })]

    /// The region counts only rule collapses out where the tables would
    /// refuse them anyway: with and without them, every step leaves the
    /// same tables (the same collapses, the same table pages) and states.
    #[test]
    fn region_counts_change_nothing_but_the_cost(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        holes in holes(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..14),
    ) {
        let mut traces = [Vec::new(), Vec::new()];
        for (counted, trace) in [true, false].into_iter().zip(&mut traces) {
            let g = RandomGuest { gib_page, small_mask, holes: holes.clone(), buffers: buffers.clone() };
            tdx_case_traced(Layout::FOUR, g, ops.clone(), counted, Some(trace))?;
        }
        prop_assert_eq!(traces[0].len(), traces[1].len());
        for (step, (counted, uncounted)) in traces[0].iter().zip(&traces[1]).enumerate() {
            prop_assert!(
                counted == uncounted,
                "step {}: {:?}",
                step,
                counted.first_difference(uncounted)
            );
        }
    }
}

proptest! {
    // Five levels, every mapping at an address only 57-bit paging
    // translates. Fewer cases: below the PDPT the tables are walked, split
    // and collapsed by the code the 4-level runs cover.
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 256, max_shrink_time: 60_000, ..ProptestConfig::default() })]

    #[test]
    fn random_conversions_keep_every_promise_tdx_la57(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        holes in holes(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..14),
    ) {
        tdx_case(Layout::FIVE, RandomGuest { gib_page, small_mask, holes, buffers }, ops)?;
    }

    #[test]
    fn random_conversions_keep_every_promise_snp_la57(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        holes in holes(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..12),
        per_exit in prop::option::of(1u64..700),
    ) {
        snp_case(Layout::FIVE, RandomGuest { gib_page, small_mask, holes, buffers }, ops, per_exit)?;
    }
}

fn run<P: Platform>(
    w: &impl Guest,
    e: &SimEngine<'_, P>,
    holes: &[Hole],
    buffers: &[Buffer],
    ops: Vec<Op>,
    mut trace: Option<&mut Vec<integration::watch::Snapshot>>,
) -> Result<(), TestCaseError>
where
    for<'x> SimEngine<'x, P>: Sync,
{
    let m = w.machine();
    let _probe = m.probe_lock(e);
    let vas: Vec<u64> = buffers.iter().map(|b| map_buffer(m, b)).collect();
    for &hole in holes {
        punch(m, hole);
    }
    let alias_fixture = AliasFixture::new(m);
    let tables = m.page_tables();
    let original = tables.mappings(&m.mem);
    let mut reference = Reference::default();
    let mut alias: Option<usize> = None;
    let mut fail = false;
    let alias_all_private = |r: &Reference| {
        (ALIAS_PA..ALIAS_PA + ALIAS_LEN)
            .step_by(4096)
            .all(|pa| r.state(pa) == PageState::Private)
    };
    for op in ops {
        let (frames, target, to, scratch) = match op {
            Op::RegisterAlias => {
                if alias.is_none() && alias_all_private(&reference) {
                    alias_fixture.map(m);
                    alias = Some(
                        e.register_alias(Alias {
                            va: alias_fixture.va,
                            pa: ALIAS_PA,
                            len: ALIAS_LEN,
                        })
                        .unwrap(),
                    );
                }
                check(w, e, &reference)?;
                continue;
            }
            Op::UnregisterAlias => {
                // With its frames private the engine has collapsed its own
                // tables there: the OS's mapping is as it built it.
                if alias.is_some() && alias_all_private(&reference) {
                    prop_assert!(e.unregister_alias(alias.take().unwrap()).is_some());
                    alias_fixture.unmap(m);
                }
                check(w, e, &reference)?;
                continue;
            }
            Op::FailNext => {
                fail = true;
                continue;
            }
            Op::Physical { page, pages, to_shared } | Op::DirectMapVirtual { page, pages, to_shared } => {
                let pages = pages.min(MEMORY / 4096 - page);
                let pa = page * 4096;
                let frames: Vec<u64> = (pa..pa + pages * 4096).step_by(4096).collect();
                let target = match op {
                    Op::Physical { .. } => Target::Physical { pa, len: pages * 4096 },
                    _ => Target::Virtual {
                        va: m.direct_va(pa),
                        len: pages * 4096,
                    },
                };
                (
                    frames,
                    target,
                    if to_shared {
                        Visibility::Shared
                    } else {
                        Visibility::Private
                    },
                    256,
                )
            }
            Op::Vmalloc {
                buffer,
                to_shared,
                scratch,
            } => {
                let Some(b) = buffers.get(buffer) else { continue };
                (
                    b.frames().into_iter().collect(),
                    Target::Virtual {
                        va: vas[buffer],
                        len: b.pages().len() as u64 * 4096,
                    },
                    if to_shared {
                        Visibility::Shared
                    } else {
                        Visibility::Private
                    },
                    scratch,
                )
            }
        };
        if frames.iter().any(|f| (TABLES..TABLES + 64 * MIB).contains(f)) {
            continue; // an OS never converts its own page tables
        }
        let holed = matches!(op, Op::Vmalloc { buffer, .. } if buffers[buffer].hole.is_some());
        let np_before = m.not_present_entries();
        let before = m.snapshot();
        w.fail_next(fail);
        let result = e.convert_with_scratch(target, to, &mut vec![0; scratch]);
        w.fail_next(false);
        let sent = std::mem::take(&mut fail);
        let all_from = frames.iter().all(|&f| reference.state(f) == PageState::of(to.other()));
        match result {
            Ok(report) => {
                prop_assert!(all_from && !holed, "{:?} -> {:?} converted", target, to);
                prop_assert_eq!(report.frames, frames.len() as u64, "distinct frames");
                for &f in &frames {
                    match to {
                        Visibility::Shared => reference.shared.insert(f),
                        Visibility::Private => reference.shared.remove(&f),
                    };
                }
            }
            Err(err) if err.changed_nothing() => {
                prop_assert!(!all_from || holed, "{:?} -> {:?}: {:?}", target, to, err);
                if holed {
                    prop_assert!(
                        matches!(err, ConvertError::NotMapped { .. } | ConvertError::Refused { .. }),
                        "{:?}",
                        err
                    );
                }
                let after = m.snapshot();
                prop_assert!(
                    after == before,
                    "{:?} said nothing changed: {:?}",
                    err,
                    before.first_difference(&after)
                );
            }
            Err(ConvertError::Platform {
                poisoned, converted, ..
            }) => {
                prop_assert!(sent && all_from && !holed, "unexpected host failure");
                let now_poisoned: Vec<u64> = frames
                    .iter()
                    .copied()
                    .filter(|&f| e.state(f) == Some(PageState::Poisoned))
                    .collect();
                let now_converted: Vec<u64> = frames
                    .iter()
                    .copied()
                    .filter(|&f| e.state(f) == Some(PageState::of(to)))
                    .collect();
                prop_assert_eq!(now_poisoned.len() as u64, poisoned);
                prop_assert_eq!(now_converted.len() as u64, converted);
                prop_assert_eq!(
                    now_poisoned.len()
                        + now_converted.len()
                        + frames
                            .iter()
                            .filter(|&&f| e.state(f) == Some(PageState::of(to.other())))
                            .count(),
                    frames.len()
                );
                for f in now_poisoned {
                    reference.shared.remove(&f);
                    reference.poisoned.insert(f);
                }
                for f in now_converted {
                    match to {
                        Visibility::Shared => reference.shared.insert(f),
                        Visibility::Private => reference.shared.remove(&f),
                    };
                }
            }
            Err(err) => prop_assert!(false, "{:?}", err),
        }
        let np_after = m.not_present_entries();
        for (at, entry) in &np_before {
            let now = np_after.get(at).copied();
            prop_assert!(
                now == Some(*entry),
                "not-present entry {:#x}[{}] = {:#x} became {:x?}",
                at.0,
                at.1,
                entry,
                now
            );
        }
        check(w, e, &reference)?;
        if let Some(trace) = trace.as_deref_mut() {
            trace.push(m.snapshot());
        }
    }
    // Everything back to private: the original huge layout returns (where
    // no frame was poisoned). Buffers go back through their own address:
    // by physical address the engine would not know their mapping.
    for (b, &va) in buffers.iter().zip(&vas) {
        let frames = b.frames();
        let some_shared = frames.iter().any(|f| reference.state(*f) == PageState::Shared);
        let all_shared = frames.iter().all(|f| reference.state(*f) == PageState::Shared);
        if some_shared && !all_shared {
            // Part of it poisoned: the buffer cannot convert as a whole.
            // The OS unmaps it, then converts its frames by address.
            unmap_buffer(m, va, b.pages().len() as u64 * 4096);
            continue;
        }
        if b.hole.is_none() && all_shared {
            e.convert(
                Target::Virtual {
                    va,
                    len: b.pages().len() as u64 * 4096,
                },
                Visibility::Private,
            )
            .unwrap();
            for f in frames {
                reference.shared.remove(&f);
            }
        }
    }
    let shared: Vec<u64> = reference.shared.iter().copied().collect();
    for pa in shared {
        e.convert(Target::Physical { pa, len: 4096 }, Visibility::Private)
            .unwrap();
        reference.shared.remove(&pa);
    }
    check(w, e, &reference)?;
    if let Some(trace) = trace {
        trace.push(m.snapshot());
    }
    if reference.poisoned.is_empty() && holes.is_empty() {
        huge_layout_restored(&original, tables, m)?;
    }
    if let Some(id) = alias.take() {
        if alias_all_private(&reference) {
            prop_assert!(e.unregister_alias(id).is_some());
            alias_fixture.unmap(m);
            check(w, e, &reference)?;
        }
    }
    Ok(())
}

/// Found by the TDX property test: a one-frame vmalloc buffer whose frame
/// begins a 2 MiB direct-map leaf the OS left not present (frame kept),
/// and a host that fails.
#[test]
fn a_failed_vmalloc_conversion_poisons_only_its_frame_beside_an_os_hole() {
    let config = TdxConfig {
        map_gpa_chunk_pages: Some(97),
        ..TdxConfig::default()
    };
    let w = TdxWorld::with_machine(config, |enc| machine(Layout::FOUR, enc, false, 0));
    let e = w.engine();
    let buffer = Buffer {
        huge: vec![],
        small: vec![789 * 2 * MIB],
        twice: vec![],
        hole: None,
    };
    let ops = vec![
        Op::FailNext,
        Op::Vmalloc {
            buffer: 0,
            to_shared: true,
            scratch: 1,
        },
    ];
    run(&w, &e, &[Hole::Region(789, HoleKind::FrameKept)], &[buffer], ops, None).unwrap();
}
