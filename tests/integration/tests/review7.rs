//! Tests from a seventh hostile review (region counts, the XOR collapse
//! check, `Collapse::OnCompact` and `Engine::compact`, the SNP scratch
//! window's exact invalidation, frame lists and the split plan; commits
//! 5b36d74..895f890). Each test fails against the commit reviewed
//! (895f890) and names the promise it breaks and where that promise is
//! written.

use coco_convert::platform::tdx::Tdx;
use coco_convert::{Alias, Collapse, Engine, Level, StateTable, Target, Visibility};
use hvmock::TdxConfig;
use integration::world::{Machine, Shape, TdxWorld, DIRECT_MAP_FLAGS};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

fn tdx_with(shape: Shape, collapse: Collapse, region_counts: bool) -> TdxWorld {
    TdxWorld::with_machine(TdxConfig::default(), |enc| {
        let mut m = Machine::new(enc, shape);
        m.collapse = collapse;
        m.region_counts = region_counts;
        m
    })
}

/// The size of the leaf that maps `va`.
fn leaf_size_at(m: &Machine, va: u64) -> u64 {
    m.page_tables().translate(&m.mem, va).expect("mapped").size
}

// ---------------------------------------------------------------------
// Finding 1: `compact()` overflows on a registered alias near the top of
// the address space, such as the kernel-image mapping itself.
//
// Promise broken: `Engine::register_alias` accepts any canonical alias
// that does not wrap (`AliasRegistry::register`, aliases.rs), the
// README/`Alias` doc name "a kernel-image mapping of the same frames" as
// the alias to register, and `Engine::compact` (tidy.rs) "walks the direct
// map and the registered aliases". Linux links its image at
// 0xffff_ffff_8100_0000 (`_text`) and puts modules and the fixmap in the
// last GiB (0xffff_ffff_c000_0000..).
//
// Cause: convert/src/engine/tidy.rs:113-114 (`compact`): for the 1 GiB
// pass, `region = gib.max(alias.va).next_multiple_of(span)` is the next
// GiB boundary after an unaligned alias start, 0xffff_ffff_c000_0000 for
// an alias in the second-to-last GiB, and `region + span` is 2^64; for an
// alias in the last GiB `gib + GIB` (line 114) and `gib += GIB` (line
// 122) are 2^64 too. Debug builds panic ("attempt to add with
// overflow"); release builds wrap: `region + span` becomes 0 and passes
// the `<=` test, so `collapse_one` runs on region 0xffff_ffff_c000_0000
// and then, with `region += span` wrapped to 0, on every GiB from VA 0
// up (2^34 of them, under one hold of the table lock); `gib` wraps to 0
// and the outer loop walks the whole address space again.
// ---------------------------------------------------------------------

#[test]
fn compact_survives_a_kernel_image_alias() {
    let w = tdx_with(Shape::Mixed, Collapse::OnCompact, true);
    let e = w.engine();
    // The kernel image as Linux maps it: from _text, 2 MiB leaves.
    let va = 0xFFFF_FFFF_8100_0000;
    let pa = GIB + 16 * MIB;
    let len = 32 * MIB;
    w.m.builder()
        .map(va, pa, len, Level::Pd, DIRECT_MAP_FLAGS, Visibility::Private);
    e.register_alias(Alias { va, pa, len }).expect("a valid alias");
    // Conversions through it work.
    let frame = pa + 4 * MIB;
    e.convert(Target::Physical { pa: frame, len: PAGE }, Visibility::Shared)
        .unwrap();
    e.convert(Target::Physical { pa: frame, len: PAGE }, Visibility::Private)
        .unwrap();
    assert_eq!(leaf_size_at(&w.m, va + 4 * MIB), PAGE, "split, waiting for compact()");
    // Compaction panics (debug) or runs away (release).
    let report = e.compact();
    assert_eq!(leaf_size_at(&w.m, va + 4 * MIB), 2 * MIB, "{report:?}");
}

#[test]
fn compact_survives_an_alias_in_the_last_gib_of_the_address_space() {
    let w = tdx_with(Shape::Mixed, Collapse::OnCompact, true);
    let e = w.engine();
    // A module-area alias: 2 MiB at 0xffff_ffff_c000_0000, 2 MiB leaves.
    let va = 0xFFFF_FFFF_C000_0000;
    let pa = GIB + 200 * MIB;
    w.m.builder()
        .map(va, pa, 2 * MIB, Level::Pd, DIRECT_MAP_FLAGS, Visibility::Private);
    e.register_alias(Alias { va, pa, len: 2 * MIB }).expect("a valid alias");
    let report = e.compact();
    // The direct map's GiB of the OS's 2 MiB leaves is tidied into one
    // leaf (compaction takes what the OS left collapsible); the alias's own
    // table, the OS's, stays.
    assert_eq!(report.collapses_2m, 0, "{report:?}");
    assert_eq!(leaf_size_at(&w.m, va), 2 * MIB);
}

// ---------------------------------------------------------------------
// Finding 2: with `Collapse::OnCompact`, `compact()` never collapses a
// region at an end of the direct map or of a registered alias that is
// not aligned to the region, even a table the engine's own split made
// there; `AfterEachConversion` (what the engine did before) collapses it.
//
// Promises broken: docs/collapse.md ("With `OnCompact` the churn splits
// each region once ... and one `compact()` when it stops gives all of it
// back"), `Collapse::OnCompact` (engine/mod.rs: "deferring the collapse to
// `Engine::compact` ... still ends with the direct map whole") and
// `compact`'s doc ("Collapses every table of the direct map and of the
// registered aliases that maps a uniform region").
//
// Cause: convert/src/engine/tidy.rs:113-114, `compact`: the regions tried are
// `gib.max(alias.va).next_multiple_of(span)` while `region + span <=
// (gib + GIB).min(end)`: only regions wholly inside the mapping. A
// conversion's own pass (`collapse_regions`) tries every region its range
// touches (`va / span * span`), so the edge regions are collapsed only by
// `AfterEachConversion`. A direct map whose size is not a multiple of
// 1 GiB whose last GiB the OS mapped with one 1 GiB leaf keeps the
// engine's PD for good. (The same holds for a registered alias whose end
// cuts a huge leaf; docs/contract.md asks the OS to "Map an alias with
// leaves that lie inside it", so that variant is not tested here; nothing
// asks it of the direct map.)
// ---------------------------------------------------------------------

/// An engine whose direct map is `[0, 512 MiB)`: the OS's 1 GiB leaf over
/// `[0, 1 GiB)` reaches past its end.
fn short_direct_map(w: &TdxWorld) -> integration::world::TdxEngine<'_> {
    let mut config = w.m.config();
    config.direct_map.len = 512 * MIB;
    Engine::new(
        config,
        &w.m.phys,
        &w.m.frames,
        &w.m.tlb,
        Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap(),
        w.m.state_table(),
    )
}

#[test]
fn compact_gives_back_the_gib_leaf_a_conversion_split_at_the_direct_maps_end() {
    // The engine before deferral: the 1 GiB leaf comes back at once.
    let eager = tdx_with(Shape::Mixed, Collapse::AfterEachConversion, true);
    let e = short_direct_map(&eager);
    let pa = 64 * MIB + 3 * PAGE;
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared)
        .unwrap();
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    assert_eq!(leaf_size_at(&eager.m, Machine::direct(pa)), GIB, "eager: whole again");
    e.release_deferred_tables();
    assert_eq!(eager.m.frames.in_use(), 0, "eager: no table held");

    // Deferred: the same round trip, then compaction.
    let w = tdx_with(Shape::Mixed, Collapse::OnCompact, true);
    let e = short_direct_map(&w);
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared)
        .unwrap();
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    let report = e.compact();
    assert_eq!(
        (
            report.collapses_2m,
            report.collapses_1g,
            leaf_size_at(&w.m, Machine::direct(pa))
        ),
        (1, 1, GIB),
        "compact() left the engine's split of the OS's 1 GiB leaf ({report:?}); \
         the engine holds {} table page(s)",
        w.m.frames.in_use()
    );
}

// ---------------------------------------------------------------------
// Finding 3: a region partly outside the state table can never collapse
// all shared, though its entries are uniform: a collapse the engine made
// before region counts, missed.
//
// Promise broken: docs/collapse.md ("The counts only ever rule a collapse
// out" where it would fail) and `StateTable::with_region_counts` ("a
// collapse is tried only where a region's frames are all private or all
// shared"): here they are all shared, and the entries say so.
//
// Cause: convert/src/regions.rs, `Regions::may_be_uniform`: a region the
// table covers only in part has a count (`count` returns `Some` for every
// region the table's frames touch), but it can reach at most the covered
// frames, never `span / PAGE`. Frames outside the table are whatever the
// OS mapped: here a range below the table's base the firmware shared (the
// table starts at 1 MiB, as a state table that leaves out the legacy
// first megabyte does).
// ---------------------------------------------------------------------

#[test]
fn a_region_partly_outside_the_state_table_collapses_all_shared() {
    let run = |region_counts: bool| {
        let w = tdx_with(Shape::Small, Collapse::AfterEachConversion, region_counts);
        let m = &w.m;
        // The OS maps [0, 2 MiB) with 4 KiB pages: [0, 1 MiB) shared (the
        // firmware's, not in the state table), [1 MiB, 2 MiB) private.
        let pd = m.builder().table_at(Machine::direct(0), Level::Pd);
        m.mem.write_u64(pd, 0);
        let mut b = m.builder();
        b.map(
            Machine::direct(0),
            0,
            MIB,
            Level::Pt,
            DIRECT_MAP_FLAGS,
            Visibility::Shared,
        );
        b.map(
            Machine::direct(MIB),
            MIB,
            MIB,
            Level::Pt,
            DIRECT_MAP_FLAGS,
            Visibility::Private,
        );
        // SAFETY: the model stands in for the VMM.
        unsafe { tdcall::map_gpa(&w.tdx, 0, MIB, Visibility::Shared, w.tdx.shared_mask()) }.unwrap();
        // The state table from 1 MiB.
        let states = &m.states[256..];
        let words: Vec<std::sync::atomic::AtomicU32> = (0..StateTable::region_words(MIB, states.len()))
            .map(|_| std::sync::atomic::AtomicU32::new(0))
            .collect();
        let table = StateTable::new(MIB, states);
        let table = if region_counts {
            table.with_region_counts(&words).unwrap()
        } else {
            table
        };
        let e = Engine::new(
            m.config(),
            &m.phys,
            &m.frames,
            &m.tlb,
            Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap(),
            table,
        );
        e.convert(Target::Physical { pa: MIB, len: MIB }, Visibility::Shared)
            .unwrap();
        leaf_size_at(m, Machine::direct(MIB))
    };
    assert_eq!(run(false), 2 * MIB, "without counts: one shared 2 MiB leaf");
    assert_eq!(run(true), 2 * MIB, "with counts: left split");
}

// ---------------------------------------------------------------------
// Finding 4: the region counts drift for good, and wrap, when a frame is
// recorded shared through another view of the same state storage after
// `with_region_counts` took its count.
//
// Promise broken: `StateTable::record_shared` ("Records that the firmware
// or the loader left [pa, pa + len) shared before the engine ran ... so
// conversions take these frames back to private") — done before the
// engine runs, through `StateTable::new(base, &storage)` as the tests
// (api.rs) do — and docs/collapse.md ("the counts only ever rule a
// collapse out" where it would fail). The engine's own running count
// (`Engine::new` takes `census()`) sees the record; the region counts do
// not, and the frame's conversion back to private takes the count of its
// regions below zero: `fetch_sub` wraps the `AtomicU32` to 4294967295,
// which is never 0 nor full again. Every later conversion in that 2 MiB
// and 1 GiB region leaves it split.
//
// Cause: convert/src/regions.rs, `Regions::add` (`count.fetch_sub(frames,
// ..)`: no floor, no resync), and convert/src/state.rs,
// `with_region_counts` (a snapshot of the storage: a record through any
// other view is lost). (`count_shared` in unshare.rs wraps deliberately
// for the same case, "memory shared behind the engine's back", and
// `UnshareReport::accounting_matches` reports it; the region counts have
// no such check.)
// ---------------------------------------------------------------------

#[test]
fn a_frame_recorded_shared_through_another_view_does_not_break_the_counts() {
    let w = tdx_with(Shape::Small, Collapse::AfterEachConversion, true);
    let m = &w.m;
    let region = GIB + 100 * MIB;
    let pa = region + 5 * PAGE;
    // The firmware left `pa` shared: the OS maps it so, the host holds it
    // so.
    let va = Machine::direct(pa);
    let pt = m.builder().table_at(va, Level::Pt);
    let slot = pt + 8 * Level::Pt.index(va) as u64;
    let pte = m.mem.read_u64(slot);
    m.mem
        .write_u64(slot, (pte & !m.enc.mask()) | m.enc.bits_for(Visibility::Shared));
    // SAFETY: the model stands in for the VMM.
    unsafe { tdcall::map_gpa(&w.tdx, pa, PAGE, Visibility::Shared, w.tdx.shared_mask()) }.unwrap();
    // The engine's table, with counts; then the record, before the engine
    // runs, through a view of the same storage.
    let table = StateTable::new(0, &m.states)
        .with_region_counts(&m.region_words)
        .unwrap();
    StateTable::new(0, &m.states).record_shared(pa, PAGE).unwrap();
    let e = Engine::new(
        m.config(),
        &m.phys,
        &m.frames,
        &m.tlb,
        Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap(),
        table,
    );
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    // Every frame of the region private, every entry alike: it collapses
    // (and does without the counts).
    assert_eq!(
        leaf_size_at(m, va),
        2 * MIB,
        "the region stayed split; its count is now {} (was 0)",
        m.region_words[(region / (2 * MIB)) as usize].load(std::sync::atomic::Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------
// Finding 5: a vmalloc-style range the engine split stays split (and
// keeps the engine's table for good) when a frame it maps was converted
// through the direct map, as the contract allows, though the range's own
// entries are all alike again. Without region counts it collapses.
//
// Promises broken: README "Choices worth knowing", Collapse: "In a
// vmalloc-style range ... only tables the engine's own splits made are
// collapsed, so the owner's layout comes back as it was"; `Collapse::
// OnCompact` ("the engine's own splits inside a vmalloc-style range ...
// collapse with the conversion that makes them uniform (nothing else can
// find them)"); docs/collapse.md ("The counts only ever rule a collapse
// out" where it would fail). `Engine::convert_frames`'s doc (and
// docs/contract.md) let a frame "converted through the direct map" keep
// its old attribute in a vmalloc mapping: the range's entries can be
// uniform while its frames' states are not.
//
// Cause: convert/src/collapse.rs:40 (`try_collapse` asks
// `may_be_uniform(base, span)` for the physical region the *entries*
// map) with convert/src/engine/tidy.rs:264-265 (the Mapped pass passes
// the region counts as that filter): the counts describe frame states,
// not the attribute a vmalloc range maps them with, so they are no
// necessary condition for a vmalloc table to collapse. (Doc conflict:
// docs/contract.md says "Convert a vmalloc buffer's frames through the
// buffer's own address", which this test does not for one frame; the
// `convert_frames` doc allows it. Either doc or the filter is wrong.)
// ---------------------------------------------------------------------

#[test]
fn a_vmalloc_split_collapses_when_its_entries_are_alike_again() {
    let run = |region_counts: bool| {
        let w = tdx_with(Shape::Mixed, Collapse::OnCompact, region_counts);
        let e = w.engine();
        // A 2 MiB vmalloc-style leaf (vmalloc_huge) over 1 GiB + 80 MiB.
        let frames = GIB + 80 * MIB;
        let va = w.m.vmalloc_area(2 * MIB);
        w.m.map_pieces(va, &[(frames, Level::Pd)]);
        // One page shared through the buffer: its leaf is split.
        let part = Target::Virtual {
            va: va + 16 * PAGE,
            len: PAGE,
        };
        e.convert(part, Visibility::Shared).unwrap();
        // Another frame of the same 2 MiB shared by physical address
        // (the buffer's mapping of it keeps the old attribute).
        e.convert(
            Target::Physical {
                pa: frames + 300 * PAGE,
                len: PAGE,
            },
            Visibility::Shared,
        )
        .unwrap();
        // The page back: every entry of the buffer private again.
        e.convert(part, Visibility::Private).unwrap();
        let size = leaf_size_at(&w.m, va);
        e.release_deferred_tables();
        (size, w.m.frames.in_use())
    };
    assert_eq!(run(false).0, 2 * MIB, "without counts: the buffer's leaf is back");
    let (size, held) = run(true);
    assert_eq!(
        size,
        2 * MIB,
        "with counts: the buffer stays split, {held} engine table page(s) held for good"
    );
}

// ---------------------------------------------------------------------
// Finding 6: `convert_frames` reads the caller's list again after it has
// made the listed frames not present and had the host convert them; a
// list stored in one of its own frames (the first page of the pool it
// describes) is then read through a not-present mapping (a #PF inside the
// engine on real hardware, with the table lock held in `restore_all`) or,
// here, as the host left it: scribbled. Frames of the list are left
// `Converting` and not present for good, and the error names a frame
// that does not exist.
//
// Promises broken: `Engine::convert_frames` ("The list is read where it
// is"; "every frame is claimed or none"; "Frames of the requests before it
// are converted and mapped with the new attribute; frames after it never
// reached the host and are mapped as they were"; `state` "tells each
// frame's fate"). Nothing in its doc or docs/contract.md forbids a list
// that lies in a listed frame, and validation (engine/mod.rs,
// `convert_list`) accepts it.
//
// Cause: convert/src/engine/transaction.rs:431-444 (`send`, `Chunk::List`
// reads `rest` after each request), `restore_all` (:542-573) and
// `settle_all` (:608-612) walk `Frames::List(list)` after the frames were
// unmapped and converted; convert/src/engine/mod.rs:375 `convert_list`
// validates only order and alignment. (The sim cannot fault on the read:
// the list is read from simulated guest memory through a host pointer.
// The model's MapGPA scribbles the converted page, as a real VMM may.)
// ---------------------------------------------------------------------

// Mended: a list (or a vmalloc-style range's scratch) that lies in a
// frame that is not private after the claim is refused before anything
// changes (`ConvertError::CallerMemoryNotPrivate`; engine/caller_memory.rs).
#[test]
fn a_list_stored_in_one_of_its_frames_converts_or_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    // A pool of 21 frames whose first page holds the page array.
    let pool = GIB + 40 * MIB;
    let list: Vec<u64> = (0..21).map(|i| pool + i * 7 * PAGE).collect();
    for (i, &pa) in list.iter().enumerate() {
        w.m.mem.write_u64(pool + 8 * i as u64, pa);
    }
    // SAFETY: 21 words of simulated guest memory, 8-byte aligned, which
    // nothing else uses; only the model writes them meanwhile (as the
    // host would write the page).
    let in_place: &[u64] = unsafe { std::slice::from_raw_parts(w.m.mem.ptr(pool).cast::<u64>(), list.len()) };
    let result = e.convert_frames(in_place, Visibility::Shared);
    let stuck: Vec<u64> = list
        .iter()
        .copied()
        .filter(|&pa| e.state(pa) == Some(coco_convert::PageState::Converting))
        .collect();
    assert!(
        stuck.is_empty(),
        "{} listed frames left Converting (and unmapped), result {result:?}",
        stuck.len()
    );
    assert!(
        result.is_ok()
            || matches!(
                result,
                Err(coco_convert::ConvertError::InvalidFrame { .. }
                    | coco_convert::ConvertError::CallerMemoryNotPrivate { .. })
            ),
        "{result:?}"
    );
}
