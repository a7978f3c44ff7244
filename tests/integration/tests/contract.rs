//! The engine's contract, promise by promise, each against the case an
//! adversarial OS produces: guard pages and software bits in the direct
//! map, tables built at boot, a frame mapped twice, a huge leaf in a
//! vmalloc-style range, conversions racing each other and an alias being
//! removed, a frame source that has nothing left.
//!
//! The SharedPool's promises are in `pool.rs`, MapGPA's in
//! `tdx_map_gpa.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use coco_convert::bits::{PRESENT, TABLE_POINTER};
use coco_convert::{Alias, ConvertError, FrameSource, Level, PageState, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig, TdxHostile};
use integration::invariants::assert_consistent;
use integration::sim::{set_cpu, ALIAS_VA};
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, DIRECT_MAP_FLAGS};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

/// The physical address of the direct-map entry of `pa` at `level`.
fn dm_entry(m: &Machine, pa: u64, level: Level) -> u64 {
    let va = Machine::direct(pa);
    m.builder().table_at(va, level) + 8 * level.index(va) as u64
}

fn tdx(shape: Shape) -> TdxWorld {
    TdxWorld::new(TdxConfig::default(), shape)
}

fn tdx_platform(w: &TdxWorld) -> coco_convert::platform::tdx::Tdx<&hvmock::MockTdx> {
    coco_convert::platform::tdx::Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap()
}

fn assert_clean(m: &Machine) {
    let v = m.watch.violations();
    assert!(v.is_empty(), "{v:?}");
}

// 1. Entries the OS left not present stay exactly as the OS left them.

#[test]
fn guard_pages_and_software_bits_in_the_direct_map_stay_not_present() {
    for target_of in [
        |pa, len| Target::Physical { pa, len },
        |pa, len| Target::Virtual {
            va: Machine::direct(pa),
            len,
        },
    ] {
        let w = tdx(Shape::Small);
        let e = w.engine();
        let m = &w.m;
        let base = GIB + 10 * MIB;
        let guard = dm_entry(m, base + 3 * PAGE, Level::Pt);
        let software = dm_entry(m, base + 5 * PAGE, Level::Pt);
        let zero = dm_entry(m, base + 6 * PAGE, Level::Pt);
        m.mem.write_u64(guard, m.mem.read_u64(guard) & !PRESENT);
        m.mem.write_u64(software, 0x0E00 | (0x7F << 52));
        m.mem.write_u64(zero, 0);
        let before: Vec<u64> = [guard, software, zero].iter().map(|&a| m.mem.read_u64(a)).collect();
        for to in [Visibility::Shared, Visibility::Private] {
            let report = e.convert(target_of(base, 8 * PAGE), to).unwrap();
            assert_eq!(report.frames, 8);
            let now: Vec<u64> = [guard, software, zero].iter().map(|&a| m.mem.read_u64(a)).collect();
            assert_eq!(now, before, "the OS's not-present entries, bit for bit ({to:?})");
            let t = m.page_tables();
            assert!(t.translate(&m.mem, Machine::direct(base + 3 * PAGE)).is_none());
            assert!(t.translate(&m.mem, Machine::direct(base + 5 * PAGE)).is_none());
            let neighbour = t.translate(&m.mem, Machine::direct(base + 4 * PAGE)).unwrap();
            assert_eq!(neighbour.enc_set, to == Visibility::Shared);
        }
        assert!(w.tdx.violations().is_empty());
        assert_clean(m);
    }
}

#[test]
fn a_not_present_huge_entry_is_never_split_nor_made_present() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    // A 2 MiB region the OS unmapped, frame kept; a conversion's boundary
    // falls inside it.
    let region = GIB + 40 * MIB;
    let pde = dm_entry(m, region, Level::Pd);
    m.mem.write_u64(pde, m.mem.read_u64(pde) & !PRESENT);
    let np = m.mem.read_u64(pde);
    m.frames.set_allowance(Some(0));
    let before = e.counters();
    for to in [Visibility::Shared, Visibility::Private] {
        e.convert(
            Target::Physical {
                pa: region + MIB,
                len: MIB,
            },
            to,
        )
        .expect("no table needed: the only leaf at the boundary is not present");
        assert_eq!(m.mem.read_u64(pde), np, "not split, not made present");
    }
    assert_eq!(e.counters().since(&before).splits_2m, 0);
    let t = m.page_tables();
    assert!(t.translate(&m.mem, Machine::direct(region + MIB)).is_none());
    assert_clean(m);
}

// 2, 5, 10, 11. A vmalloc-style range is one transaction.

/// Maps `frames` at a fresh vmalloc-style address with 4 KiB pages, then
/// 2 MiB leaves for `huge`; returns the address.
fn vmalloc_mixed(m: &Machine, frames: &[u64], huge: &[u64]) -> (u64, u64) {
    let small = frames.len() as u64 * PAGE;
    let huge_start = small.next_multiple_of(2 * MIB);
    let len = huge_start + huge.len() as u64 * 2 * MIB;
    let va = m.vmalloc_area(len);
    let mut b = m.builder();
    for (i, &pa) in frames.iter().enumerate() {
        b.map(
            va + i as u64 * PAGE,
            pa,
            PAGE,
            Level::Pt,
            DIRECT_MAP_FLAGS,
            Visibility::Private,
        );
    }
    // Filler up to the 2 MiB boundary.
    for (i, off) in (small..huge_start).step_by(PAGE as usize).enumerate() {
        b.map(
            va + off,
            1700 * MIB + i as u64 * PAGE,
            PAGE,
            Level::Pt,
            DIRECT_MAP_FLAGS,
            Visibility::Private,
        );
    }
    for (i, &pa) in huge.iter().enumerate() {
        b.map(
            va + huge_start + i as u64 * 2 * MIB,
            pa,
            2 * MIB,
            Level::Pd,
            DIRECT_MAP_FLAGS,
            Visibility::Private,
        );
    }
    (va, len)
}

#[test]
fn a_frame_mapped_twice_far_apart_converts_once_with_both_mappings() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let mut frames: Vec<u64> = (0..600).map(|i| GIB + 100 * MIB + i * 3 * PAGE).collect();
    frames[450] = frames[3]; // the same frame again, hundreds of pages later
    let va = m.vmalloc(&frames);
    let len = frames.len() as u64 * PAGE;
    for to in [Visibility::Shared, Visibility::Private] {
        let report = e
            .convert_with_scratch(Target::Virtual { va, len }, to, &mut [0; 16])
            .unwrap();
        assert_eq!(report.frames, 599, "distinct frames");
        let t = m.page_tables();
        for at in [va + 3 * PAGE, va + 450 * PAGE, Machine::direct(frames[3])] {
            assert_eq!(
                t.translate(&m.mem, at).unwrap().enc_set,
                to == Visibility::Shared,
                "{at:#x}"
            );
        }
        assert_eq!(e.state(frames[3]), Some(PageState::of(to)));
    }
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
    assert_eq!(e.counters().shootdowns, 2, "one per conversion");
    assert_clean(m);
}

#[test]
fn a_huge_leaf_of_a_vmalloc_range_keeps_its_size() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let frames: Vec<u64> = (0..300).map(|i| GIB + 100 * MIB + i * 5 * PAGE).collect();
    let (va, len) = vmalloc_mixed(m, &frames, &[GIB + 300 * MIB]);
    let t = m.page_tables();
    let layout = |t: &hvmock::GuestPageTables| {
        t.mappings(&m.mem)
            .into_iter()
            .filter(|x| x.va >= va && x.va < va + len)
            .map(|x| (x.va, x.size))
            .collect::<Vec<_>>()
    };
    let before = layout(&t);
    for to in [Visibility::Shared, Visibility::Private] {
        e.convert_with_scratch(Target::Virtual { va, len }, to, &mut [0; 8])
            .unwrap();
        assert_eq!(layout(&t), before, "the owner's layout ({to:?})");
    }
    // Ending inside the huge leaf splits it; coming back collapses the
    // table the engine made.
    let part = len - MIB;
    e.convert(Target::Virtual { va, len: part }, Visibility::Shared)
        .unwrap();
    assert_ne!(layout(&t), before);
    e.convert(Target::Virtual { va, len: part }, Visibility::Private)
        .unwrap();
    e.release_deferred_tables();
    assert_eq!(layout(&t), before, "collapsed back");
    assert_eq!(m.frames.in_use(), 0, "the engine's table went back to the frame source");
    assert!(w.tdx.violations().is_empty());
    assert_clean(m);
}

#[test]
fn a_vmalloc_conversion_racing_another_never_reports_nothing_changed_after_a_change() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let frames: Vec<u64> = (0..600).map(|i| GIB + 100 * MIB + i * 2 * PAGE).collect();
    let va = m.vmalloc(&frames);
    let len = frames.len() as u64 * PAGE;
    let tail = va + 300 * PAGE;
    for round in 0..40 {
        let stop = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                set_cpu(1);
                while !stop.load(Ordering::Relaxed) {
                    for to in [Visibility::Shared, Visibility::Private] {
                        let _ = e.convert(
                            Target::Virtual {
                                va: tail,
                                len: 300 * PAGE,
                            },
                            to,
                        );
                    }
                }
                // Leave the tail private.
                let _ = e.convert(
                    Target::Virtual {
                        va: tail,
                        len: 300 * PAGE,
                    },
                    Visibility::Private,
                );
            });
            std::thread::sleep(Duration::from_micros(200 * (round % 5)));
            let r = e.convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut [0; 32]);
            stop.store(true, Ordering::Relaxed);
            r
        });
        let shared = frames
            .iter()
            .filter(|&&f| e.state(f) == Some(PageState::Shared))
            .count();
        match result {
            Ok(r) => {
                assert_eq!(r.frames, 600);
                // The other CPU may have taken the tail back meanwhile.
                for half in [va, tail] {
                    let first = m.page_tables().translate(&m.mem, half).unwrap().pa;
                    if e.state(first) == Some(PageState::Shared) {
                        e.convert(
                            Target::Virtual {
                                va: half,
                                len: 300 * PAGE,
                            },
                            Visibility::Private,
                        )
                        .unwrap();
                    }
                }
            }
            Err(err) => {
                assert!(err.changed_nothing(), "{err:?}");
                assert_eq!(shared, 0, "round {round}: {err:?} said nothing changed");
            }
        }
    }
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
    assert_clean(m);
}

#[test]
fn a_host_failure_in_a_long_vmalloc_range_reports_frames_exactly() {
    let w = TdxWorld::new(
        TdxConfig {
            map_gpa_chunk_pages: Some(1),
            ..TdxConfig::default()
        },
        Shape::Mixed,
    );
    let e = w.engine();
    let m = &w.m;
    let mut frames: Vec<u64> = (0..40).map(|i| GIB + 100 * MIB + i * 2 * PAGE).collect();
    frames.push(frames[0]); // twice
    let va = m.vmalloc(&frames);
    let len = frames.len() as u64 * PAGE;
    // The host lies from the 25th MapGPA on: the scratch of 8 extents makes
    // five calls of eight frames; the fourth fails.
    w.tdx.set_hostile_after(24, TdxHostile::NoProgressForever);
    let err = e
        .convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut [0; 8])
        .unwrap_err();
    let ConvertError::Platform {
        poisoned,
        converted,
        pa,
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!((converted, poisoned), (24, 8), "frames, not bytes");
    let count = |s| frames[..40].iter().filter(|&&f| e.state(f) == Some(s)).count() as u64;
    assert_eq!(count(PageState::Shared), converted);
    assert_eq!(count(PageState::Poisoned), poisoned);
    assert_eq!(count(PageState::Private), 40 - converted - poisoned);
    assert_eq!(e.state(pa), Some(PageState::Poisoned));
    let t = m.page_tables();
    for (i, &f) in frames[..40].iter().enumerate() {
        let mapped = t.translate(&m.mem, va + i as u64 * PAGE);
        match e.state(f) {
            Some(PageState::Poisoned) => assert!(mapped.is_none()),
            Some(s) => assert_eq!(mapped.unwrap().enc_set, s == PageState::Shared),
            None => unreachable!(),
        }
    }
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn unknown_frame_names_the_first_frame_outside_the_state_table() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let end = w.m.size();
    assert_eq!(
        e.convert(
            Target::Physical {
                pa: end - 2 * PAGE,
                len: 4 * PAGE
            },
            Visibility::Shared
        ),
        Err(ConvertError::UnknownFrame { pa: end })
    );
}

// 3, 4. Frees only after a covering shootdown; no lock across OS calls.

#[test]
fn a_collapsed_table_is_freed_after_a_shootdown_naming_its_region() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let _probe = m.probe_lock(&e);
    let pa = GIB + 20 * MIB + 7 * PAGE;
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared)
        .unwrap();
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    assert_eq!(e.counters().collapses_2m, 1);
    // A conversion far away frees the collapsed table with its shootdown.
    let far = GIB + 900 * MIB;
    e.convert(Target::Physical { pa: far, len: PAGE }, Visibility::Shared)
        .unwrap();
    assert_eq!(e.counters().table_pages_freed, 1);
    let last = m.tlb.last.lock().unwrap().clone();
    let region = Machine::direct(pa & !(2 * MIB - 1));
    assert!(
        last.is_empty() || last.iter().any(|r| r.va <= region && region < r.va + r.len),
        "{last:x?}"
    );
    assert_clean(m);
}

#[test]
fn many_collapses_with_no_frame_to_spare_never_call_out_under_the_lock() {
    let w = tdx(Shape::Small);
    let e = w.engine();
    let m = &w.m;
    let _probe = m.probe_lock(&e);
    m.frames.set_allowance(Some(0));
    // 40 whole 2 MiB regions the OS mapped with 4 KiB pages: each becomes
    // uniform and collapses; the deferred list overflows with no chain page
    // to be had.
    let (pa, len) = (GIB + 64 * MIB, 80 * MIB);
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
    assert_eq!(e.counters().collapses_2m, 40);
    e.release_deferred_tables();
    assert_eq!(m.frames.retired().len(), 40, "the OS's tables went back to the OS");
    assert_eq!(e.counters().os_tables_retired, 40);
    assert_clean(m);
    // With frames to spare, the overflow goes to chain pages: one shootdown.
    let w = tdx(Shape::Small);
    let e = w.engine();
    let _probe = w.m.probe_lock(&e);
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
    assert_eq!(e.counters().shootdowns, 1);
    assert_clean(&w.m);
}

// 8. SNP's scratch window is checked before anything changes.

#[test]
fn snp_window_with_a_preinstalled_pde_is_used_and_a_foreign_one_refused() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, 1536 * MIB);
    let m = &w.m;
    let slot = m.windows.slot_of(0);
    let pd = m.builder().table_at(slot.va, Level::Pd);
    let pde = pd + 8 * Level::Pd.index(slot.va) as u64;
    let enc = m.enc.bits_for(Visibility::Private);
    m.mem.write_u64(pde, slot.pt | TABLE_POINTER | enc);
    e.convert(Target::Physical { pa: 4 * MIB, len: PAGE }, Visibility::Shared)
        .expect("the window's own PT, pre-installed");
    let foreign = m.os_frames.allocate_frame().unwrap();
    m.mem.write_u64(pde, foreign | TABLE_POINTER | enc);
    let before = m.snapshot();
    assert_eq!(
        e.convert(Target::Physical { pa: 8 * MIB, len: PAGE }, Visibility::Shared),
        Err(ConvertError::NoScratchWindow)
    );
    assert_eq!(m.snapshot(), before, "nothing changed");
    assert_eq!(e.state(8 * MIB), Some(PageState::Private));
    assert!(w.snp.violations().is_empty());
}

// 9. Only frames from the frame source go back to it.

#[test]
fn a_collapse_gives_boot_tables_to_the_os_not_to_the_frame_source() {
    let w = tdx(Shape::Small);
    let e = w.engine();
    let m = &w.m;
    let pa = GIB + 3 * PAGE;
    let pt = m.builder().table_at(Machine::direct(pa), Level::Pt);
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared)
        .unwrap();
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    e.release_deferred_tables();
    // SimFrames panics on a free of a frame it never handed out; the OS's
    // table instead comes back through retire_os_table.
    assert_eq!(m.frames.retired(), [pt].into_iter().collect());
    assert_eq!(e.counters().table_pages_freed, 0);
    assert_eq!(m.frames.in_use(), 0);
}

#[test]
fn a_frame_source_handing_out_a_shared_frame_is_refused() {
    struct Liar(u64);
    impl FrameSource for Liar {
        fn allocate_frame(&self) -> Option<u64> {
            Some(self.0)
        }
        fn free_frame(&self, pa: u64) {
            assert_eq!(pa, self.0, "only what it handed out");
        }
    }
    let w = tdx(Shape::Mixed);
    let e0 = w.engine();
    let shared = GIB + 500 * MIB;
    e0.convert(Target::Physical { pa: shared, len: PAGE }, Visibility::Shared)
        .unwrap();
    let m = &w.m;
    let e = m.engine_with_frames(Liar(shared), tdx_platform(&w));
    let before = m.snapshot();
    assert_eq!(
        e.convert(
            Target::Physical {
                pa: GIB + 10 * MIB + PAGE,
                len: PAGE
            },
            Visibility::Shared
        ),
        Err(ConvertError::UnusableTableFrame { pa: shared })
    );
    assert_eq!(m.snapshot(), before);
    // And the engine's own table pages cannot be converted.
    let e = w.engine();
    e.convert(
        Target::Physical {
            pa: GIB + 10 * MIB + PAGE,
            len: PAGE,
        },
        Visibility::Shared,
    )
    .unwrap();
    let table = *m.frames.in_use_set().iter().next().unwrap();
    assert_eq!(e.state(table), Some(PageState::PageTable));
    assert_eq!(
        e.convert(Target::Physical { pa: table, len: PAGE }, Visibility::Shared),
        Err(ConvertError::Refused {
            pa: table,
            state: PageState::PageTable
        })
    );
}

// 12. An alias is removed only once no conversion can write through it.

#[test]
fn unregister_alias_waits_for_the_conversion_in_flight() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    let (pa, len) = (GIB + 8 * MIB, 4 * MIB);
    m.builder()
        .map(ALIAS_VA, pa, len, Level::Pd, DIRECT_MAP_FLAGS, Visibility::Private);
    let id = e.register_alias(Alias { va: ALIAS_VA, pa, len }).unwrap();
    let go = Arc::new(Barrier::new(2));
    let returned = Arc::new(AtomicBool::new(false));
    let seen_in_flight = Arc::new(AtomicBool::new(false));
    {
        let (go, returned, seen) = (go.clone(), returned.clone(), seen_in_flight.clone());
        let mut first = true;
        *m.tlb.hook.lock().unwrap() = Some(Box::new(move || {
            if std::mem::take(&mut first) {
                go.wait();
                std::thread::sleep(Duration::from_millis(100));
                seen.store(returned.load(Ordering::SeqCst), Ordering::SeqCst);
            }
        }));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            set_cpu(1);
            go.wait();
            e.unregister_alias(id).unwrap();
            returned.store(true, Ordering::SeqCst);
        });
        e.convert(
            Target::Physical {
                pa: pa + MIB,
                len: PAGE,
            },
            Visibility::Shared,
        )
        .unwrap();
        assert!(
            !seen_in_flight.load(Ordering::SeqCst),
            "unregister returned while the conversion could still write the alias"
        );
    });
    assert!(returned.load(Ordering::SeqCst));
    // Removed, the alias maps nothing, and the table the conversion's
    // split left in it is back with the frame source: the OS may free its
    // own tables of the range and reuse it.
    for va in (ALIAS_VA..ALIAS_VA + len).step_by(PAGE as usize) {
        assert!(m.page_tables().translate(&m.mem, va).is_none(), "{va:#x} still mapped");
    }
    assert_eq!(m.frames.in_use(), 1, "only the direct map's split table is held");
    assert_consistent(m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn overlapping_aliases_are_refused_at_registration() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let a = Alias {
        va: ALIAS_VA,
        pa: GIB,
        len: 4 * MIB,
    };
    e.register_alias(a).unwrap();
    assert_eq!(
        e.register_alias(Alias {
            va: ALIAS_VA + 64 * MIB,
            pa: GIB + MIB,
            ..a
        }),
        Err(coco_convert::AliasError::Overlaps { id: 0 })
    );
    assert_eq!(
        e.register_alias(Alias {
            va: Machine::direct(0),
            ..a
        }),
        Err(coco_convert::AliasError::OverlapsDirectMap)
    );
}

/// Hands out its first frame only once a second CPU has asked for one and
/// finished the conversion it wanted it for; then runs dry.
struct OnePageTwoAsking<'m> {
    frames: &'m integration::sim::SimFrames,
    calls: std::sync::atomic::AtomicUsize,
    second_done: (std::sync::Mutex<bool>, std::sync::Condvar),
}

impl FrameSource for OnePageTwoAsking<'_> {
    fn allocate_frame(&self) -> Option<u64> {
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            // The first asker waits for the second to have split the leaf
            // with the only page there is.
            0 => {
                let (done, cv) = &self.second_done;
                let _done = cv.wait_while(done.lock().unwrap(), |d| !*d).unwrap();
                None
            }
            1 => self.frames.allocate_frame(),
            _ => None,
        }
    }
    fn free_frame(&self, pa: u64) {
        self.frames.free_frame(pa)
    }
    fn retire_os_table(&self, pa: u64) {
        self.frames.retire_os_table(pa)
    }
}

/// Two CPUs convert frames of one 2 MiB leaf with one table page to spare:
/// the one whose frame source runs dry looks at the tables again and finds
/// the other's split, which is all it needed.
#[test]
fn a_conversion_whose_split_another_cpu_made_meanwhile_needs_no_page() {
    let w = tdx(Shape::Mixed);
    let m = &w.m;
    let source = OnePageTwoAsking {
        frames: &m.frames,
        calls: Default::default(),
        second_done: Default::default(),
    };
    let e = m.engine_with_frames(&source, tdx_platform(&w));
    let leaf = GIB + 40 * MIB;
    let frame = |i: u64| Target::Physical {
        pa: leaf + i * PAGE,
        len: PAGE,
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            set_cpu(0);
            e.convert(frame(0), Visibility::Shared)
        });
        while source.calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        set_cpu(1);
        e.convert(frame(1), Visibility::Shared).unwrap();
        *source.second_done.0.lock().unwrap() = true;
        source.second_done.1.notify_all();
        assert_eq!(first.join().unwrap().map(|r| r.frames), Ok(1));
    });
    assert_eq!(m.frames.in_use(), 1, "one split, one table");
    assert_consistent(m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
}

// "Nothing changed" is literal.

#[test]
fn out_of_table_memory_changes_nothing() {
    let w = tdx(Shape::Mixed);
    let e = w.engine();
    let m = &w.m;
    m.frames.set_allowance(Some(1));
    let before = m.snapshot();
    assert_eq!(
        e.convert(
            Target::Physical {
                pa: 10 * MIB + PAGE,
                len: PAGE
            },
            Visibility::Shared
        ),
        Err(ConvertError::OutOfTableMemory { needed: 2 })
    );
    assert_eq!(m.snapshot(), before);
    assert_eq!(m.frames.in_use(), 0);
}

// Concurrent conversions of overlapping and adjacent ranges.

/// A small xorshift: the threads' choices, reproducible per seed.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn hammer<P: coco_convert::Platform>(e: &integration::world::EngineOf<'_, P>, seed: u64, vmalloc: &[(u64, u64)])
where
    for<'x> integration::world::EngineOf<'x, P>: Sync,
{
    // No lock probe here: it asks whether any CPU holds the table lock,
    // which another CPU's conversion legitimately may. The single-CPU
    // tests and the property tests probe every path that calls out.
    let area = GIB + 20 * MIB;
    std::thread::scope(|s| {
        for cpu in 0..integration::world::CPUS {
            s.spawn(move || {
                set_cpu(cpu);
                let mut x = seed * 77 + cpu as u64 + 1;
                for _ in 0..30 {
                    let to = if next(&mut x) % 2 == 0 {
                        Visibility::Shared
                    } else {
                        Visibility::Private
                    };
                    // Linear ranges stay below the buffers' frames (an OS
                    // converts a vmalloc buffer's frames through it).
                    let page = next(&mut x) % 960;
                    let pages = 1 + next(&mut x) % 64;
                    let target = match next(&mut x) % 3 {
                        0 => Target::Physical {
                            pa: area + page * PAGE,
                            len: pages * PAGE,
                        },
                        1 => Target::Virtual {
                            va: Machine::direct(area + page * PAGE),
                            len: pages * PAGE,
                        },
                        _ => {
                            // A buffer, or a part of one: parts overlap.
                            let (va, len) = vmalloc[(next(&mut x) % vmalloc.len() as u64) as usize];
                            let pages = len / PAGE;
                            let first = next(&mut x) % pages;
                            let count = 1 + next(&mut x) % (pages - first);
                            Target::Virtual {
                                va: va + first * PAGE,
                                len: count * PAGE,
                            }
                        }
                    };
                    let scratch = 1 + (next(&mut x) % 32) as usize;
                    match e.convert_with_scratch(target, to, &mut vec![0; scratch]) {
                        Ok(_) => {}
                        Err(err) => assert!(err.changed_nothing(), "{err:?}"),
                    }
                }
            });
        }
    });
}

/// Vmalloc-style buffers over frames of the hammered area, mapped by no
/// other buffer: one adjacent to another, one interleaved.
fn hammer_buffers(m: &Machine) -> Vec<(u64, u64)> {
    let area = GIB + 20 * MIB;
    let buffers: [Vec<u64>; 3] = [
        (1024..1100).map(|i| area + i * PAGE).collect(),
        (1100..1180).rev().map(|i| area + i * PAGE).collect(),
        (0..60).map(|i| area + (1200 + 2 * i) * PAGE).collect(),
    ];
    buffers.iter().map(|b| (m.vmalloc(b), b.len() as u64 * PAGE)).collect()
}

#[test]
fn concurrent_overlapping_and_adjacent_conversions_keep_every_promise_tdx() {
    for seed in 0..6 {
        let w = tdx(if seed % 2 == 0 { Shape::Mixed } else { Shape::Small });
        let e = w.engine();
        let buffers = hammer_buffers(&w.m);
        hammer(&e, seed, &buffers);
        e.release_deferred_tables();
        assert_consistent(&w.m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
        assert!(w.tdx.violations().is_empty(), "seed {seed}: {:?}", w.tdx.violations());
    }
}

#[test]
fn concurrent_overlapping_and_adjacent_conversions_keep_every_promise_snp() {
    for seed in 0..4 {
        let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
        let e = w.engine();
        for cpu in 0..integration::world::CPUS {
            set_cpu(cpu);
            w.boot_ghcb(&e, 1536 * MIB + cpu as u64 * PAGE);
        }
        let buffers = hammer_buffers(&w.m);
        hammer(&e, seed, &buffers);
        e.release_deferred_tables();
        assert_consistent(&w.m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
        assert!(w.snp.violations().is_empty(), "seed {seed}: {:?}", w.snp.violations());
    }
}

#[test]
fn a_frame_source_handing_out_a_table_the_engine_holds_is_refused_and_not_freed() {
    struct Twice<'m> {
        frames: &'m integration::sim::SimFrames,
        table: u64,
        freed: std::sync::Mutex<Vec<u64>>,
    }
    impl FrameSource for Twice<'_> {
        fn allocate_frame(&self) -> Option<u64> {
            Some(self.table)
        }
        fn free_frame(&self, pa: u64) {
            self.freed.lock().unwrap().push(pa);
            self.frames.free_frame(pa);
        }
    }
    let w = tdx(Shape::Mixed);
    let m = &w.m;
    let e = w.engine();
    // The engine holds a table from a split.
    e.convert(
        Target::Physical {
            pa: GIB + 10 * MIB + PAGE,
            len: PAGE,
        },
        Visibility::Shared,
    )
    .unwrap();
    let table = *m.frames.in_use_set().iter().next().unwrap();
    let twice = Twice {
        frames: &m.frames,
        table,
        freed: Default::default(),
    };
    let e2 = m.engine_with_frames(&twice, tdx_platform(&w));
    let before = m.snapshot();
    assert_eq!(
        e2.convert(
            Target::Physical {
                pa: GIB + 30 * MIB + PAGE,
                len: PAGE
            },
            Visibility::Shared
        ),
        Err(ConvertError::UnusableTableFrame { pa: table })
    );
    assert!(twice.freed.lock().unwrap().is_empty(), "a table in use was given back");
    assert_eq!(m.snapshot(), before);
    assert_eq!(e.state(table), Some(PageState::PageTable));
}

/// The last frames of memory are the top private GPAs when the shared bit
/// is the first address past memory (GPAW 33, 4 GiB): converting them goes
/// right up to the shared bit in MapGPA's request form, through the engine.
#[test]
fn the_top_of_the_gpa_space_converts_both_ways() {
    let config = TdxConfig {
        gpaw: 33,
        map_gpa_chunk_pages: Some(1),
        ..TdxConfig::default()
    };
    let w = TdxWorld::with_machine(config, |enc| {
        Machine::build_with_tables_at(enc, 4 * GIB, GIB, |b| {
            b.map(
                Machine::direct(0),
                0,
                4 * GIB,
                Level::Pdpt,
                DIRECT_MAP_FLAGS,
                Visibility::Private,
            );
        })
    });
    let e = w.engine();
    let top = 4 * GIB - 8 * PAGE;
    for (target, to) in [
        (Target::Physical { pa: top, len: 8 * PAGE }, Visibility::Shared),
        (
            Target::Virtual {
                va: Machine::direct(top),
                len: 8 * PAGE,
            },
            Visibility::Private,
        ),
        (
            Target::Virtual {
                va: Machine::direct(top),
                len: 8 * PAGE,
            },
            Visibility::Shared,
        ),
        (Target::Physical { pa: top, len: 8 * PAGE }, Visibility::Private),
    ] {
        assert_eq!(e.convert(target, to).unwrap().frames, 8);
        for f in (top..4 * GIB).step_by(PAGE as usize) {
            assert_eq!(e.state(f), Some(PageState::of(to)));
            let host = w.tdx.page(f).state;
            assert_eq!(
                host == hvmock::TdxPageState::Shared,
                to == Visibility::Shared,
                "{f:#x}: {host:?}"
            );
        }
    }
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
    assert_clean(&w.m);
}

/// An OS change made inside `with_table_lock` while a conversion reserves
/// its tables (here: the OS merging a 4 KiB-mapped region back into a
/// 2 MiB leaf, at the conversion's boundary) makes the conversion plan
/// again: it then needs one table more, and takes it.
#[test]
fn an_os_merge_inside_with_table_lock_makes_a_conversion_plan_again() {
    type Hook = Box<dyn FnMut() + Send>;
    struct Hooked<'m> {
        inner: &'m integration::sim::SimFrames,
        hook: std::sync::Mutex<Option<Hook>>,
    }
    impl FrameSource for Hooked<'_> {
        fn allocate_frame(&self) -> Option<u64> {
            let hook = self.hook.lock().unwrap().take();
            if let Some(mut hook) = hook {
                hook();
            }
            self.inner.allocate_frame()
        }
        fn free_frame(&self, pa: u64) {
            self.inner.free_frame(pa)
        }
        fn retire_os_table(&self, pa: u64) {
            self.inner.retire_os_table(pa)
        }
    }
    // GiB 1's first 2 MiB mapped by 4 KiB pages, its second by a 2 MiB leaf.
    let w = tdx(Shape::Random(false, 1));
    let m = &w.m;
    let hooked = Hooked {
        inner: &m.frames,
        hook: Default::default(),
    };
    let e = m.engine_with_frames(&hooked, tdx_platform(&w));
    let boundary = GIB + 2 * MIB;
    let pde = dm_entry(m, GIB, Level::Pd);
    let leaf = GIB | coco_convert::bits::flags_4k_to_huge(DIRECT_MAP_FLAGS) | PRESENT;
    let merge: Box<dyn FnMut() + Send + '_> = Box::new(|| e.with_table_lock(|| m.mem.write_u64(pde, leaf)));
    // SAFETY: only the lifetime is erased; the hook runs (and is gone)
    // before `e` and `m` are dropped, inside the conversion below.
    let merge: Hook = unsafe { std::mem::transmute(merge) };
    *hooked.hook.lock().unwrap() = Some(merge);
    let range = Target::Physical {
        pa: boundary - PAGE,
        len: 2 * PAGE,
    };
    assert_eq!(e.convert(range, Visibility::Shared).unwrap().frames, 2);
    assert!(hooked.hook.lock().unwrap().is_none(), "the merge ran mid-conversion");
    assert_eq!(e.counters().splits_2m, 2, "both boundaries' 2 MiB leaves split");
    let t = m.page_tables();
    assert!(t.translate(&m.mem, Machine::direct(boundary - PAGE)).unwrap().enc_set);
    assert!(
        !t.translate(&m.mem, Machine::direct(boundary - 2 * PAGE))
            .unwrap()
            .enc_set
    );
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}
