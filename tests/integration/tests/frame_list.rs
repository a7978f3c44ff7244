//! Frame lists (`Engine::convert_frames`): scattered frames converted in
//! one transaction, one shootdown, the host asked in requests as large as
//! its ABI allows; all or nothing before the host is asked; after a failed
//! request, exactly its frames poisoned and out of reach in every alias.

use coco_convert::platform::SnpOptions;
use coco_convert::{Alias, ConvertError, Level, PageState, PlatformError, Target, Visibility};
use hvmock::{SnpConfig, SnpHostile, TdxConfig, TdxHostile};
use integration::sim::ALIAS_VA;
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, DIRECT_MAP_FLAGS};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

/// 600 frames no two of which are adjacent (every 7th page), 400 under the
/// direct map's 1 GiB leaf and 200 among its 2 MiB leaves, then a run of 3
/// and a 2 MiB-aligned run of 512: 602 runs, ascending.
fn mixed_list() -> Vec<u64> {
    let mut v: Vec<u64> = (0..400).map(|i| 3 * MIB + i * 7 * PAGE).collect();
    v.extend([40 * MIB, 40 * MIB + PAGE, 40 * MIB + 2 * PAGE]);
    v.extend((0..512).map(|i| 64 * MIB + i * PAGE));
    v.extend((0..200).map(|i| GIB + 3 * MIB + i * 7 * PAGE));
    v
}

/// `n` frames, every 7th page from `start`: `n` runs.
fn singles(start: u64, n: u64) -> Vec<u64> {
    (0..n).map(|i| start + i * 7 * PAGE).collect()
}

/// The side the mapping at `va` gives its frame, if present.
fn side(m: &Machine, va: u64) -> Option<Visibility> {
    let map = m.page_tables().translate(&m.mem, va)?;
    Some(m.enc.side_of(if map.enc_set { m.enc.mask() } else { 0 }))
}

/// The direct map's leaves by size: 1 GiB, 2 MiB, 4 KiB.
fn direct_map_leaves(m: &Machine) -> [u64; 3] {
    let (start, end) = (Machine::direct(0), Machine::direct(m.size()));
    let mut counts = [0; 3];
    m.page_tables().for_each_mapping(&m.mem, &mut |map| {
        if (start..end).contains(&map.va) {
            counts[[GIB, 2 * MIB, PAGE].iter().position(|&s| s == map.size).unwrap()] += 1;
        }
    });
    counts
}

/// After a round trip: every frame's state as before, and the direct map
/// whole, with the `leaves` given (its split regions collapsed), no table
/// page held.
fn assert_whole_again(m: &Machine, before: &integration::watch::Snapshot, tables_before: usize, leaves: [u64; 3]) {
    let after = m.snapshot();
    assert!(after.states == before.states, "a frame's state changed");
    assert_eq!(direct_map_leaves(m), leaves);
    assert_eq!(m.frames.in_use(), tables_before, "a table page left held");
}

/// Each of `frames` settled on `to`, its direct-map entry present with
/// that attribute.
fn assert_settled(m: &Machine, state: impl Fn(u64) -> Option<PageState>, frames: &[u64], to: Visibility) {
    for &pa in frames {
        assert_eq!(state(pa), Some(PageState::of(to)), "{pa:#x}");
        assert_eq!(side(m, Machine::direct(pa)), Some(to), "direct map of {pa:#x}");
    }
}

#[test]
fn tdx_a_list_goes_shared_and_back_with_one_mapgpa_per_run_and_one_shootdown_each_way() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let list = mixed_list();
    let (before, tables_before) = (w.m.snapshot(), w.m.frames.in_use());
    assert_eq!(direct_map_leaves(&w.m), [1, 512, 0]);

    let c0 = e.counters();
    let report = e.convert_frames(&list, Visibility::Shared).unwrap();
    assert_eq!(report.frames, 1115);
    let c = e.counters().since(&c0);
    assert_eq!((c.map_gpa, c.accept, c.shootdowns), (602, 0, 1), "{c:?}");
    assert_settled(&w.m, |pa| e.state(pa), &list, Visibility::Shared);
    assert!(list.iter().all(|&pa| w.host_side(pa) == Some(Visibility::Shared)));
    // The frames beside the list are untouched.
    for pa in [3 * MIB + PAGE, 40 * MIB + 3 * PAGE, 64 * MIB - PAGE, 66 * MIB] {
        assert_eq!(e.state(pa), Some(PageState::Private), "{pa:#x}");
        assert_eq!(side(&w.m, Machine::direct(pa)), Some(Visibility::Private), "{pa:#x}");
    }

    let c0 = e.counters();
    e.convert_frames(&list, Visibility::Private).unwrap();
    let c = e.counters().since(&c0);
    // 600 + 3 ACCEPTs of 4 KiB, one of 2 MiB.
    assert_eq!((c.map_gpa, c.accept, c.shootdowns), (602, 604, 1), "{c:?}");
    e.release_deferred_tables();
    // The second GiB's 2 MiB leaves collapse into one 1 GiB leaf too.
    assert_whole_again(&w.m, &before, tables_before, [2, 0, 0]);
    assert_eq!(e.census().converting, 0);
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

#[test]
fn snp_a_list_takes_253_entries_an_exit_and_one_shootdown_each_way() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, 1536 * MIB);
    let list = mixed_list();
    let (before, tables_before) = (w.m.snapshot(), w.m.frames.in_use());
    // The shared GHCB keeps its 2 MiB region in 4 KiB leaves.
    let leaves = direct_map_leaves(&w.m);
    assert_eq!(leaves, [1, 511, 512]);

    // Going shared, the RMP holds the 2 MiB block as 4 KiB entries (from
    // launch): its 2 MiB PVALIDATE fails on the size and 512 of 4 KiB
    // follow. The page state change to private makes it one 2 MiB entry.
    for (to, pvalidates) in [(Visibility::Shared, 603 + 1 + 512), (Visibility::Private, 604)] {
        let c0 = e.counters();
        let report = e.convert_frames(&list, to).unwrap();
        assert_eq!(report.frames, 1115);
        let c = e.counters().since(&c0);
        // 603 entries of 4 KiB and one of 2 MiB: three exits, not the
        // four that cutting a list at 256 frames would cost.
        assert_eq!(
            (c.psc_entries, c.psc_exits, c.pvalidate, c.psc_msr, c.shootdowns),
            (604, 3, pvalidates, 0, 1),
            "{to:?}: {c:?}"
        );
        assert_settled(&w.m, |pa| e.state(pa), &list, to);
        assert!(list.iter().all(|&pa| w.host_side(pa) == Some(to)), "{to:?}");
    }
    e.release_deferred_tables();
    assert_whole_again(&w.m, &before, tables_before, leaves);
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// Before a GHCB exists every page is a request of its own (the MSR
/// protocol): a failed one poisons its page only.
#[test]
fn snp_without_a_ghcb_a_list_goes_one_page_a_request() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    let list = singles(5 * MIB, 20);
    e.convert_frames(&list, Visibility::Shared).unwrap();
    let c = e.counters();
    assert_eq!(
        (c.psc_msr, c.psc_exits, c.pvalidate, c.shootdowns),
        (20, 0, 20, 1),
        "{c:?}"
    );
    assert_settled(&w.m, |pa| e.state(pa), &list, Visibility::Shared);

    let list = singles(GIB + 5 * MIB, 20);
    w.snp.set_hostile_after(7, SnpHostile::MsrPscError);
    let err = e.convert_frames(&list, Visibility::Shared).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Platform {
                error: PlatformError::PscMsr(_),
                pa,
                poisoned: 1,
                converted: 7,
            } if pa == list[7]
        ),
        "{err:?}"
    );
    w.snp.set_hostile(None);
    assert_settled(&w.m, |pa| e.state(pa), &list[..7], Visibility::Shared);
    assert_settled(&w.m, |pa| e.state(pa), &list[8..], Visibility::Private);
    assert_eq!(e.state(list[7]), Some(PageState::Poisoned));
    assert_eq!(side(&w.m, Machine::direct(list[7])), None);
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// 6000 frames, one every 80 pages: the splits need a table per 2 MiB
/// region touched (938) and one for the 1 GiB leaf; reserving a table per
/// run end would ask the frame source for more than the 8192 it has.
#[test]
fn a_long_list_reserves_a_table_per_region_not_per_frame() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    // Every call would walk half a million mappings: the other tests check
    // the aliases.
    w.tdx.set_alias_check(false);
    let e = w.engine();
    let list: Vec<u64> = (0..6000).map(|i| i * 80 * PAGE).collect();
    let tables_before = w.m.frames.in_use();
    e.convert_frames(&list, Visibility::Shared).unwrap();
    let c = e.counters();
    assert_eq!((c.map_gpa, c.shootdowns), (6000, 1), "{c:?}");
    assert_eq!((c.splits_1g, c.splits_2m), (1, 938), "{c:?}");
    assert_eq!(w.m.frames.in_use() - tables_before, 939, "reserve handed back");
    assert_settled(&w.m, |pa| e.state(pa), &list, Visibility::Shared);
    e.convert_frames(&list, Visibility::Private).unwrap();
    e.release_deferred_tables();
    assert_eq!(direct_map_leaves(&w.m), [2, 0, 0]);
    assert_eq!(w.m.frames.in_use(), tables_before);
}

/// Input the engine refuses, each with the error it gets: nothing changes
/// and the host is never asked.
#[test]
fn a_refused_list_changes_no_state_and_no_entry() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let shared = 9 * MIB;
    e.convert(Target::Physical { pa: shared, len: PAGE }, Visibility::Shared)
        .unwrap();
    let (a, b, c) = (5 * MIB, GIB + 5 * MIB, GIB + 7 * MIB);
    let beyond = w.m.size();
    let cases: [(Vec<u64>, ConvertError); 8] = [
        (
            vec![a, shared, b],
            ConvertError::Refused {
                pa: shared,
                state: PageState::Shared,
            },
        ),
        (vec![a, b, beyond], ConvertError::UnknownFrame { pa: beyond }),
        (vec![a, c, b], ConvertError::InvalidFrame { index: 2, pa: b }),
        (vec![a, b, b], ConvertError::InvalidFrame { index: 2, pa: b }),
        (vec![a, b + 8, c], ConvertError::InvalidFrame { index: 1, pa: b + 8 }),
        (vec![a, !0xFFF], ConvertError::InvalidFrame { index: 1, pa: !0xFFF }),
        (vec![0x800], ConvertError::InvalidFrame { index: 0, pa: 0x800 }),
        (vec![], ConvertError::InvalidRange { addr: 0, len: 0 }),
    ];
    let before = w.m.snapshot();
    let c0 = e.counters();
    for (list, expected) in cases {
        let err = e.convert_frames(&list, Visibility::Shared).unwrap_err();
        assert_eq!(err, expected, "{list:x?}");
        assert!(err.changed_nothing());
        let now = w.m.snapshot();
        assert!(now == before, "{list:x?}: {:?}", now.first_difference(&before));
    }
    let c = e.counters().since(&c0);
    assert_eq!((c.map_gpa, c.shootdowns, c.conversions), (0, 0, 0), "{c:?}");
    // Back to private: the shared frame would do, the private one before
    // it is refused and named, and the shared one stays shared.
    assert_eq!(
        e.convert_frames(&[a, shared], Visibility::Private),
        Err(ConvertError::Refused {
            pa: a,
            state: PageState::Private
        })
    );
    assert!(w.m.snapshot() == before);
    assert_eq!(e.unshare_all(&[]).made_private, 1);
    assert_eq!(e.convert_frames(&[a], Visibility::Shared), Err(ConvertError::Stopped));
}

/// A frame with a registered alias: the alias goes not present with the
/// direct map (the model sees no mapping of the frames at the host call)
/// and comes back with the new attribute; its leaves collapse back.
#[test]
fn a_listed_frame_with_a_registered_alias_converts_in_it_too() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let (apa, alen) = (GIB + 8 * MIB, 4 * MIB);
    w.m.builder()
        .map(ALIAS_VA, apa, alen, Level::Pd, DIRECT_MAP_FLAGS, Visibility::Private);
    e.register_alias(Alias {
        va: ALIAS_VA,
        pa: apa,
        len: alen,
    })
    .unwrap();
    let list = [5 * MIB, apa + MIB, apa + 3 * MIB + 5 * PAGE, GIB + 20 * MIB];
    let (before, tables_before) = (w.m.snapshot(), w.m.frames.in_use());
    e.convert_frames(&list, Visibility::Shared).unwrap();
    let c = e.counters();
    assert_eq!((c.map_gpa, c.shootdowns), (4, 1), "{c:?}");
    for pa in [apa + MIB, apa + 3 * MIB + 5 * PAGE] {
        assert_eq!(side(&w.m, ALIAS_VA + (pa - apa)), Some(Visibility::Shared), "{pa:#x}");
        assert_eq!(
            side(&w.m, ALIAS_VA + (pa - apa) + PAGE),
            Some(Visibility::Private),
            "beside {pa:#x}"
        );
    }
    assert_settled(&w.m, |pa| e.state(pa), &list, Visibility::Shared);
    e.convert_frames(&list, Visibility::Private).unwrap();
    e.release_deferred_tables();
    assert_whole_again(&w.m, &before, tables_before, [2, 0, 0]);
    // The alias's tables, the engine's own splits, collapse back too.
    for pa in [apa + MIB, apa + 3 * MIB] {
        let map = w.m.page_tables().translate(&w.m.mem, ALIAS_VA + (pa - apa)).unwrap();
        assert_eq!((map.size, map.enc_set), (2 * MIB, false), "alias of {pa:#x}");
    }
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

/// The VMM fails the 101st MapGPA: the 100 runs before it are shared, the
/// failed run (3 frames, the alias's) poisoned and not present in the
/// direct map nor in the alias, the runs after it private as they were.
#[test]
fn tdx_a_failed_mapgpa_poisons_exactly_its_run() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let (apa, alen) = (GIB + 8 * MIB, 4 * MIB);
    w.m.builder()
        .map(ALIAS_VA, apa, alen, Level::Pd, DIRECT_MAP_FLAGS, Visibility::Private);
    e.register_alias(Alias {
        va: ALIAS_VA,
        pa: apa,
        len: alen,
    })
    .unwrap();
    let run = [apa + MIB, apa + MIB + PAGE, apa + MIB + 2 * PAGE];
    let mut list = singles(3 * MIB, 100);
    list.extend(run);
    list.extend(singles(GIB + 20 * MIB, 50));
    w.tdx.set_hostile_after(100, TdxHostile::GarbageStatus(0xDEAD));
    let err = e.convert_frames(&list, Visibility::Shared).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Platform {
                error: PlatformError::MapGpa(_),
                pa,
                poisoned: 3,
                converted: 100,
            } if pa == run[0]
        ),
        "{err:?}"
    );
    w.tdx.set_hostile(None);
    assert_settled(&w.m, |pa| e.state(pa), &list[..100], Visibility::Shared);
    assert_settled(&w.m, |pa| e.state(pa), &list[103..], Visibility::Private);
    for pa in run {
        assert_eq!(e.state(pa), Some(PageState::Poisoned), "{pa:#x}");
        assert_eq!(side(&w.m, Machine::direct(pa)), None, "direct map of {pa:#x}");
        assert_eq!(side(&w.m, ALIAS_VA + (pa - apa)), None, "alias of {pa:#x}");
    }
    assert_eq!(side(&w.m, ALIAS_VA + MIB + 3 * PAGE), Some(Visibility::Private));
    assert!(list[..100]
        .iter()
        .all(|&pa| w.host_side(pa) == Some(Visibility::Shared)));
    assert!(list[103..]
        .iter()
        .all(|&pa| w.host_side(pa) == Some(Visibility::Private)));
    let census = e.census();
    assert_eq!((census.poisoned, census.shared, census.converting), (3, 100, 0));
    assert_eq!(e.counters().shootdowns, 1);
    // The guest goes on: the converted frames come back; the poisoned
    // ones are refused.
    e.convert_frames(&list[..100], Visibility::Private).unwrap();
    assert!(matches!(
        e.convert_frames(&run, Visibility::Private),
        Err(ConvertError::Refused {
            state: PageState::Poisoned,
            ..
        })
    ));
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

/// The hypervisor fails the second page state change exit of 600 frames
/// going shared: the first 253 are shared, the second 253 poisoned, the
/// last 94 were never sent and stay private and validated.
#[test]
fn snp_a_failed_exit_poisons_exactly_its_253_frames() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, 1536 * MIB);
    let list: Vec<u64> = singles(3 * MIB, 400).into_iter().chain(singles(GIB, 200)).collect();
    let c0 = e.counters();
    w.snp.set_hostile_after(1, SnpHostile::PscExitInfo2Error);
    let err = e.convert_frames(&list, Visibility::Shared).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Platform {
                error: PlatformError::Psc(_),
                pa,
                poisoned: 253,
                converted: 253,
            } if pa == list[253]
        ),
        "{err:?}"
    );
    w.snp.set_hostile(None);
    let (sent, rest) = list.split_at(253);
    let (failed, unsent) = rest.split_at(253);
    assert_settled(&w.m, |pa| e.state(pa), sent, Visibility::Shared);
    assert_settled(&w.m, |pa| e.state(pa), unsent, Visibility::Private);
    for &pa in failed {
        assert_eq!(e.state(pa), Some(PageState::Poisoned), "{pa:#x}");
        assert_eq!(side(&w.m, Machine::direct(pa)), None, "{pa:#x}");
    }
    assert!(sent.iter().all(|&pa| w.host_side(pa) == Some(Visibility::Shared)));
    assert!(unsent.iter().all(|&pa| w.host_side(pa) == Some(Visibility::Private)));
    let c = e.counters().since(&c0);
    assert_eq!((c.psc_exits, c.pvalidate, c.shootdowns), (2, 506, 1), "{c:?}");
    assert_eq!(e.census().converting, 0);
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// With 64 entries of 4 KiB an exit, a 2 MiB-aligned run of 512 frames
/// spans eight requests under one 2 MiB leaf of the direct map. The third
/// fails: frames of that leaf are now on both sides, so it can be mapped
/// neither way and all 512 are poisoned; nothing counts as converted.
#[test]
fn snp_a_request_that_fails_inside_a_huge_leaf_poisons_the_whole_leaf() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine_with(SnpOptions::LINUX);
    w.boot_ghcb(&e, 1536 * MIB);
    let block: Vec<u64> = (0..512).map(|i| GIB + 64 * MIB + i * PAGE).collect();
    let mut list = singles(GIB + 3 * MIB, 10);
    list.extend(&block);
    w.snp.set_hostile_after(2, SnpHostile::PscExitInfo2Error);
    let err = e.convert_frames(&list, Visibility::Shared).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Platform {
                error: PlatformError::Psc(_),
                poisoned: 512,
                converted: 10,
                ..
            }
        ),
        "{err:?}"
    );
    w.snp.set_hostile(None);
    assert_settled(&w.m, |pa| e.state(pa), &list[..10], Visibility::Shared);
    assert!(block.iter().all(|&pa| e.state(pa) == Some(PageState::Poisoned)));
    assert_eq!(side(&w.m, Machine::direct(block[0])), None);
    assert_eq!(side(&w.m, Machine::direct(block[511])), None);
    assert_eq!(e.census().poisoned, 512);
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}
