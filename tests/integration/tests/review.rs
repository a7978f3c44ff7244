//! Regression tests from a hostile review of the conversion engine: each
//! test is a promise of `docs/contract.md` that the engine once broke (each
//! failed against the commit reviewed, and passes since the fix).

use std::collections::BTreeSet;

use coco_convert::{ConvertError, Level, PageState, Target, Visibility};
use hvmock::{TdxConfig, TdxHostile, TdxPageState};
use integration::world::{Machine, Shape, TdxWorld, DIRECT_MAP_FLAGS};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

fn tdx(shape: Shape) -> TdxWorld {
    TdxWorld::new(TdxConfig::default(), shape)
}

// ---------------------------------------------------------------------
// Contract, "Results": `Platform { converted, .. }`: "`converted` frames
// reached the new state before the failure and are mapped with the new
// attribute; every other frame of the call is as before. `Engine::state`
// tells each frame's fate."
//
// What happens: `send_fresh` (engine/transaction.rs) moves a frame to
// `Sent` *before* it flushes the extents it has rewritten so far; if that
// flush is the call the host fails, the frame is left in `Sent` although
// the host never saw it. `restore_all` then maps it with the NEW attribute
// and `settle_all` settles it to the new side: the engine says "shared",
// the TDX module says "private", and `converted` does not count it.
#[test]
fn a_frame_never_sent_to_the_host_is_not_reported_converted() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let f = GIB + 100 * MIB;
    // Page 0 maps f+1 (sent alone in the first chunk of a one-extent
    // scratch); pages 1..4 map f, f+1, f+2: the second chunk [f, 3 pages)
    // is rewritten to [f], [f+2] and [f] is flushed after f+2 was marked.
    let frames = [f + PAGE, f, f + PAGE, f + 2 * PAGE];
    let va = m.vmalloc(&frames);
    let len = frames.len() as u64 * PAGE;
    w.tdx.set_hostile_after(1, TdxHostile::NoProgressForever);
    let err = e
        .convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut [0; 1])
        .unwrap_err();
    let ConvertError::Platform {
        converted, poisoned, ..
    } = err
    else {
        panic!("{err:?}")
    };
    let distinct: BTreeSet<u64> = frames.iter().copied().collect();
    for &frame in &distinct {
        let host_shared = w.tdx.page(frame).state == TdxPageState::Shared;
        let engine = e.state(frame);
        if engine == Some(PageState::Poisoned) {
            continue;
        }
        assert_eq!(
            engine == Some(PageState::Shared),
            host_shared,
            "frame {frame:#x}: engine says {engine:?}, host says {:?}",
            w.tdx.page(frame).state
        );
    }
    let shared = distinct
        .iter()
        .filter(|&&f| e.state(f) == Some(PageState::Shared))
        .count() as u64;
    let lost = distinct
        .iter()
        .filter(|&&f| e.state(f) == Some(PageState::Poisoned))
        .count() as u64;
    assert_eq!((shared, lost), (converted, poisoned), "states agree with the report");
}

// ---------------------------------------------------------------------
// Contract, "Results": after a host failure "every other frame of the call
// is as before" (and converted frames "are mapped with the new
// attribute"); "a huge leaf wholly inside keeps its size".
//
// What happens: a 2 MiB leaf of a vmalloc-style range whose frames the
// 16 MiB extent limit spreads over two host calls. The first call fails:
// the leaf's first frame is poisoned, its other 511 frames never reached
// the host and are reported untouched (state Private). But
// `restore_all`'s `uniform_side` (engine/transaction.rs) keeps the whole
// leaf not present because one of its frames is poisoned: 511 frames the
// report calls "as before" are no longer mapped in the buffer.
#[test]
fn frames_the_host_never_saw_are_mapped_again_in_a_huge_vmalloc_leaf() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let huge = GIB + 200 * MIB;
    // 4095 4 KiB pages right below the huge leaf's frames, so that the
    // first extent ([first, +16 MiB)) takes the leaf's first frame too.
    let first = huge - 4095 * PAGE;
    let area = m.vmalloc_area(20 * MIB);
    let mut pieces: Vec<(u64, Level)> = vec![(0, Level::Pt)]; // placeholder page, not converted
    pieces.extend((0..4095).map(|i| (first + i * PAGE, Level::Pt)));
    pieces.push((huge, Level::Pd));
    // Start at `area` so the 2 MiB leaf lands 2 MiB aligned at area + 16 MiB.
    m.map_pieces(area, &pieces);
    let va = area + PAGE; // skip the placeholder
    let len = 4095 * PAGE + 2 * MIB;
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    let err = e
        .convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut [0; 1])
        .unwrap_err();
    let ConvertError::Platform {
        converted, poisoned, ..
    } = err
    else {
        panic!("{err:?}")
    };
    // The first call (4095 small frames and the leaf's first) failed; the
    // leaf's other frames never reached the host, but the leaf can be
    // mapped neither way: the whole leaf is poisoned, and reported so.
    assert_eq!(
        (converted, poisoned),
        (0, 4096 + 511),
        "the failed call, and the rest of the leaf it cut"
    );
    let t = m.page_tables();
    let leaf_va = area + 16 * MIB;
    for f in (huge..huge + 2 * MIB).step_by(PAGE as usize) {
        assert_eq!(e.state(f), Some(PageState::Poisoned), "{f:#x}");
    }
    assert!(
        t.translate(&m.mem, leaf_va + PAGE).is_none(),
        "a poisoned frame is never mapped"
    );
    assert!(t.translate(&m.mem, Machine::direct(huge + PAGE)).is_none());
    assert!(w.tdx.violations().is_empty());
}

// ---------------------------------------------------------------------
// Contract, "Page-table pages": "Nothing goes back before a shootdown
// covering it" — the point being that nobody walks a table page once it
// is given back. And "Results": `UnknownFrame { pa }` — "`pa` is the first
// frame the state table does not cover" (of the conversion's frames).
//
// What happens: the engine walks page tables WITHOUT the table lock in
// `claim` (engine/transaction.rs, `pieces` over a vmalloc-style range), in
// `plan`/`tables_needed`, and in `for_each_chunk` of `settle_all`. A
// shootdown only protects hardware walkers; another CPU's conversion can
// collapse a table (tidy.rs `collapse_regions`) and free it
// (`release_deferred_tables`, or the next conversion's shootdown) while
// this CPU's software walk is inside it. The walk then follows whatever
// the reused page holds. A vCPU preempted by the (hostile) host for a
// moment in the middle of its walk is all it takes. Here the freed table
// page is reused by its next owner for data that happens to look like
// PTEs: the claim walk claims 256 frames the buffer never mapped (left
// Converting for good), then `unmap_all`/`send`/`restore_all` walk the
// new, collapsed tables, find none of their frames claimed, convert
// nothing, leave the buffer's half not present, and report
// `Ok(Report { frames: 0 })`. (With the page merely scribbled by the test
// OS's frame source, the same race yields a spurious `NotMapped`.)
mod uaf {
    use super::*;
    use coco_convert::{FrameSource, PhysMem};
    use integration::sim::{SimFrames, SimPhys};
    use std::cell::Cell;
    use std::sync::{Arc, Barrier, Mutex};

    thread_local! {
        static PAUSE_AT: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// The sim's memory, with a hook: the thread that set `PAUSE_AT`
    /// stops (as a preempted vCPU would) the first time it touches that
    /// table page; every access to a page given back is recorded.
    pub struct Hook {
        pub inner: SimPhys,
        pub given_back: Arc<Mutex<BTreeSet<u64>>>,
        pub stale_reads: Arc<Mutex<Vec<u64>>>,
        pub paused: Arc<Barrier>,
        pub resume: Arc<Barrier>,
    }

    // SAFETY: forwards to SimPhys.
    unsafe impl PhysMem for Hook {
        fn page_ptr(&self, pa: u64) -> *mut u64 {
            if PAUSE_AT.with(|p| p.get()) == Some(pa) {
                PAUSE_AT.with(|p| p.set(None));
                self.paused.wait();
                self.resume.wait();
            }
            if self.given_back.lock().unwrap().contains(&pa) {
                self.stale_reads.lock().unwrap().push(pa);
            }
            self.inner.page_ptr(pa)
        }
    }

    /// The sim's engine frame source, noting what goes back.
    pub struct Tracking<'a> {
        pub inner: &'a SimFrames,
        pub given_back: Arc<Mutex<BTreeSet<u64>>>,
    }

    impl FrameSource for Tracking<'_> {
        fn allocate_frame(&self) -> Option<u64> {
            let pa = self.inner.allocate_frame()?;
            self.given_back.lock().unwrap().remove(&pa);
            Some(pa)
        }
        fn free_frame(&self, pa: u64) {
            self.given_back.lock().unwrap().insert(pa);
            self.inner.free_frame(pa)
        }
        fn retire_os_table(&self, pa: u64) {
            self.given_back.lock().unwrap().insert(pa);
            self.inner.retire_os_table(pa)
        }
    }

    pub fn set_pause(pa: u64) {
        PAUSE_AT.with(|p| p.set(Some(pa)));
    }
}

#[test]
fn a_lock_free_walk_never_follows_a_table_another_cpu_freed() {
    use coco_convert::platform::tdx::Tdx;
    use std::sync::{Arc, Barrier, Mutex};
    let w = tdx(Shape::Mixed);
    let m = &w.m;
    let given_back = Arc::new(Mutex::new(BTreeSet::new()));
    let stale_reads = Arc::new(Mutex::new(Vec::new()));
    let paused = Arc::new(Barrier::new(2));
    let resume = Arc::new(Barrier::new(2));
    let hook = uaf::Hook {
        inner: m.phys.clone(),
        given_back: given_back.clone(),
        stale_reads: stale_reads.clone(),
        paused: paused.clone(),
        resume: resume.clone(),
    };
    let frames = uaf::Tracking {
        inner: &m.frames,
        given_back: given_back.clone(),
    };
    let e = coco_convert::Engine::new(
        m.config(),
        hook,
        frames,
        &m.tlb,
        Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap(),
        coco_convert::StateTable::new(0, &m.states),
    );
    // A vmalloc-style buffer of one 2 MiB leaf.
    let huge = GIB + 300 * MIB;
    let l = m.vmalloc_area(2 * MIB);
    m.map_pieces(l, &[(huge, Level::Pd)]);
    // Converting its first half splits the leaf: T is the engine's table.
    e.convert(Target::Virtual { va: l, len: MIB }, Visibility::Shared)
        .unwrap();
    let t = m.builder().table_at(l, Level::Pt);
    // Frames nobody converts: what the reused page happens to name.
    let victim = GIB + 500 * MIB;
    let freed_during_walk = std::thread::scope(|s| {
        let a = s.spawn(|| {
            integration::sim::set_cpu(1);
            uaf::set_pause(t);
            e.convert(Target::Virtual { va: l + MIB, len: MIB }, Visibility::Shared)
        });
        // CPU 1 is inside T, in its claim walk. CPU 0 converts the first
        // half back, which would make T uniform, collapse it and free it:
        // it must wait until CPU 1's walk is done.
        paused.wait();
        let b = s.spawn(|| {
            integration::sim::set_cpu(0);
            e.convert(Target::Virtual { va: l, len: MIB }, Visibility::Private)?;
            e.release_deferred_tables();
            Ok::<(), ConvertError>(())
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let freed = given_back.lock().unwrap().contains(&t);
        resume.wait();
        let first = a.join().unwrap();
        b.join().unwrap().unwrap();
        (freed, first)
    });
    let (freed, result) = freed_during_walk;
    let stale = stale_reads.lock().unwrap().clone();
    let victims = (0..512)
        .filter(|i| e.state(victim + i * PAGE) != Some(PageState::Private))
        .count();
    assert!(!freed, "T was given back while CPU 1 was walking it");
    assert_eq!(victims, 0);
    assert_eq!(result.unwrap().frames, 256);
    assert!(
        stale.is_empty(),
        "the engine read page-table pages after giving them back: {stale:x?}"
    );
    assert!(m.page_tables().translate(&m.mem, l + MIB).unwrap().enc_set);
    assert!(!m.page_tables().translate(&m.mem, l).unwrap().enc_set);
}

// ---------------------------------------------------------------------
// Contract: `InvalidRange` only for "empty, unaligned, wrapping" ranges (a
// range ending below 2^64 is accepted), and "Shootdowns": before a
// collapsed table is freed, a shootdown names "each table's whole region".
// Brief: integer overflow at address-space edges.
//
// What happens: a vmalloc-style range in the last 2 MiB of the address
// space, mapped by one 2 MiB leaf (Linux's fixmap/vsyscall neighbourhood).
// Converting its first half splits the leaf; converting it back collapses
// the engine's table, whose region [0xFFFF_FFFF_FFE0_0000, +2 MiB) ends at
// 2^64; the same collapse pass then collapses the direct map's GiB. When
// the deferred regions go into one shootdown set, `ShootdownSet::add`
// (shootdown.rs) computes `last.va + last.len` for the top region: an
// arithmetic overflow — a panic in a debug build (a wrapped end in
// release) inside the engine. The same happens for a registered alias in
// the last 2 MiB.
#[test]
fn a_range_in_the_last_2_mib_of_the_address_space_converts_and_collapses() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let top = 0xFFFF_FFFF_FFE0_0000u64;
    let pa = GIB + 10 * MIB;
    m.builder()
        .map(top, pa, 2 * MIB, Level::Pd, DIRECT_MAP_FLAGS, Visibility::Private);
    let half = Target::Virtual { va: top, len: MIB };
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.convert(half, Visibility::Shared).unwrap();
        e.convert(half, Visibility::Private).unwrap();
        e.release_deferred_tables();
    }));
    assert!(run.is_ok(), "the engine panicked converting a valid range");
    assert_eq!(e.state(pa), Some(PageState::Private));
}

// ---------------------------------------------------------------------
// Contract, "Page-table pages": "A frame the source hands out that is not
// private or not covered is given straight back: `UnusableTableFrame`,
// nothing changed." The engine checks what a lying frame source may get
// wrong — except that what it hands out is a frame at all.
//
// What happens: a frame source returning a 4 KiB frame's address plus 8
// (an off-by-a-field bug in an allocator) passes `take_table`
// (state.rs, which indexes by `pa / 4096`), and `Reserve::fill_to`
// (reserve.rs) accepts it. `split_leaf` (split.rs) then builds the table at
// the unaligned address: a debug assertion panics in `Tables::entries`; in
// a release build the pointer `pa | TABLE_POINTER` sets PWT and names the
// aligned frame, whose entries are shifted by one slot: every 4 KiB page
// of the split region maps its neighbour's frame.
#[test]
fn a_frame_source_handing_out_an_unaligned_address_is_refused() {
    use coco_convert::platform::tdx::Tdx;
    use coco_convert::FrameSource;
    struct OffByEight<'a>(&'a integration::sim::SimFrames);
    impl FrameSource for OffByEight<'_> {
        fn allocate_frame(&self) -> Option<u64> {
            self.0.allocate_frame().map(|pa| pa + 8)
        }
        fn free_frame(&self, pa: u64) {
            self.0.free_frame(pa & !0xFFF)
        }
    }
    let w = tdx(Shape::Mixed);
    let m = &w.m;
    let e = coco_convert::Engine::new(
        m.config(),
        &m.phys,
        OffByEight(&m.frames),
        &m.tlb,
        Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap(),
        coco_convert::StateTable::new(0, &m.states),
    );
    let pa = GIB + 10 * MIB + PAGE;
    let before = m.snapshot();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared)
    }));
    let Ok(r) = r else {
        panic!("the engine panicked on a frame source's bad frame");
    };
    assert!(matches!(r, Err(ConvertError::UnusableTableFrame { .. })), "{r:x?}");
    assert_eq!(m.snapshot().first_difference(&before), None);
}

// ---------------------------------------------------------------------
// Contract, "Results": `InvalidRange` for an "empty, unaligned, wrapping"
// range; "Shootdowns": the engine names the ranges whose leaves it made
// not present.
//
// What happens: `convert_with_scratch` (engine/mod.rs) checks emptiness,
// alignment and u64 wrap, never canonicality. A range from the last user
// page across the canonical hole, [0x7FFF_FFFF_F000, +8 KiB), is walked
// by table index bits (tables.rs `walk`), so its second page is PML4 slot
// 256: the kernel mapping at 0xFFFF_8000_0000_0000. The engine converts
// that kernel page, and its shootdown names [0x7FFF_FFFF_F000, +8 KiB):
// a non-canonical address, which INVLPG ignores, so every CPU keeps its
// TLB entry for the kernel address while the host converts the frame.
#[test]
fn a_range_across_the_canonical_hole_is_refused() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let user = 0x0000_7FFF_FFFF_F000u64;
    let kernel = 0xFFFF_8000_0000_0000u64;
    let (u, k) = (GIB + 50 * MIB, GIB + 60 * MIB);
    let mut b = m.builder();
    b.map(user, u, PAGE, Level::Pt, DIRECT_MAP_FLAGS, Visibility::Private);
    b.map(kernel, k, PAGE, Level::Pt, DIRECT_MAP_FLAGS, Visibility::Private);
    let r = e.convert(
        Target::Virtual {
            va: user,
            len: 2 * PAGE,
        },
        Visibility::Shared,
    );
    let shot = m.tlb.last.lock().unwrap().clone();
    assert!(
        matches!(r, Err(ConvertError::InvalidRange { .. })),
        "{r:x?}: kernel frame {k:#x} is now {:?}, last shootdown {shot:x?}",
        e.state(k)
    );
}

// ---------------------------------------------------------------------
// Contract, "What the OS gives": "`unregister_alias` returns only once no
// conversion that copied the alias is in flight" (and the OS may then
// reuse the range).
//
// What happens: `AliasRegistry::unregister` (aliases.rs) flips `phase` and
// waits for the readers of the phase it flipped FROM. A second unregister
// that starts while the first is still waiting flips again, into the
// parity the first one is draining, and waits for the OTHER counter —
// which the conversion in flight is not counted in. So the second
// unregister returns at once although the conversion in flight copied
// its alias. The OS then unmaps that range; the conversion's restore
// writes a PRESENT leaf (frame 0, shared bit set) into it.
#[test]
fn a_second_concurrent_unregister_waits_for_the_conversion_in_flight() {
    use coco_convert::Alias;
    use integration::sim::{current_cpu, set_cpu, ALIAS_VA};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let a = Alias {
        va: ALIAS_VA,
        pa: GIB + 8 * MIB,
        len: 2 * MIB,
    };
    let b = Alias {
        va: ALIAS_VA + 64 * MIB,
        pa: GIB + 40 * MIB,
        len: 2 * MIB,
    };
    for x in [a, b] {
        m.builder()
            .map(x.va, x.pa, x.len, Level::Pt, DIRECT_MAP_FLAGS, Visibility::Private);
    }
    let id_a = e.register_alias(a).unwrap();
    let id_b = e.register_alias(b).unwrap();
    let frame = b.pa + PAGE;
    let b_pte = m.builder().table_at(b.va + PAGE, Level::Pt) + 8 * Level::Pt.index(b.va + PAGE) as u64;
    let in_flight = Arc::new(Barrier::new(2));
    let go = Arc::new(Barrier::new(2));
    {
        let (in_flight, go) = (in_flight.clone(), go.clone());
        let mut first = true;
        *m.tlb.hook.lock().unwrap() = Some(Box::new(move || {
            if current_cpu() == 1 && std::mem::take(&mut first) {
                in_flight.wait();
                go.wait();
            }
        }));
    }
    let b_returned_in_flight = AtomicBool::new(false);
    let conversion_done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let c = s.spawn(|| {
            set_cpu(1);
            let r = e.convert(Target::Physical { pa: frame, len: PAGE }, Visibility::Shared);
            conversion_done.store(true, Ordering::SeqCst);
            r
        });
        in_flight.wait();
        // The conversion copied both aliases and has B's entry unmapped.
        s.spawn(|| {
            set_cpu(2);
            e.unregister_alias(id_a).unwrap();
        });
        std::thread::sleep(Duration::from_millis(100));
        let u2 = s.spawn(|| {
            set_cpu(3);
            e.unregister_alias(id_b).unwrap();
            if !conversion_done.load(Ordering::SeqCst) {
                b_returned_in_flight.store(true, Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        if u2.is_finished() {
            // As the OS may now: B's range is unmapped for reuse.
            m.mem.write_u64(b_pte, 0);
        }
        go.wait();
        c.join().unwrap().unwrap();
    });
    // (Had unregister waited, the OS would not have touched the entry.)
    let pte = m.mem.read_u64(b_pte);
    assert!(
        !b_returned_in_flight.load(Ordering::SeqCst),
        "unregister_alias(B) returned while a conversion that copied B was in flight \
         ({}); the OS unmapped B's page, and the conversion then wrote {pte:#x} into it",
        b_returned_in_flight.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------
// Contract: "The scratch buffer sets only how many extents go to the host
// per call" / `convert_with_scratch`: "The scratch size changes the number
// of host calls, never what the conversion does"; and "It splits only
// present huge leaves that straddle a range boundary; a huge leaf wholly
// inside keeps its size."
//
// What happens: `plan` and `unmap_all` (engine/transaction.rs) take the
// direct-map boundaries from each scratch-sized chunk's runs, so a chunk
// edge becomes a split boundary. A buffer of 5120 contiguous frames starts
// 4 KiB into a 2 MiB direct-map leaf: with a one-extent scratch the 16 MiB
// extent edge lands inside the direct-map leaf at +116 MiB, which lies
// wholly inside the buffer's frames — it is split (and collapsed again),
// and the plan asks for 4 table pages instead of 2. With a frame source
// that has 2 to give, the same conversion succeeds with a 256-extent
// scratch and fails with `OutOfTableMemory` with a one-extent scratch.
#[test]
fn the_scratch_size_never_changes_what_a_conversion_does() {
    let p = GIB + 100 * MIB + PAGE;
    let frames: Vec<u64> = (0..5120).map(|i| p + i * PAGE).collect();
    let mut outcomes = Vec::new();
    for scratch in [256usize, 1] {
        let w = tdx(Shape::Mixed);
        let e = w.engine();
        let m = &w.m;
        let va = m.vmalloc(&frames);
        let len = frames.len() as u64 * PAGE;
        m.frames.set_allowance(Some(2));
        let r = e.convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut vec![0; scratch]);
        outcomes.push((scratch, r.map(|r| r.frames), e.counters().splits_2m));
    }
    assert_eq!(
        outcomes[0].1, outcomes[1].1,
        "(scratch, result, 2 MiB splits): {outcomes:?}"
    );
}
