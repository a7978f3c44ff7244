//! Memory the firmware hands over unaccepted: recorded from the memory map,
//! accepted lazily (each unit once, the guard unit after a range that ends
//! on a unit boundary) or eagerly over several CPUs, and a host or firmware
//! that lies about it.

use std::sync::Barrier;

use coco_convert::{AcceptMemoryError, ConvertError, PageState, PlatformError, Target, UnacceptedBitmap, Visibility};
use hvmock::{RmpEntry, SnpConfig, SnpHostile, TdxConfig, TdxEvent, TdxPageState};
use integration::sim::Layout;
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, TABLES};
use integration::{GIB, MIB};
use snp_ghcb::pvalidate::{PvalidateError, PvalidateRangeError};
use tdcall::AcceptError;

const UNIT: u64 = 2 * MIB;
/// Where the tests put unaccepted memory: 1 GiB aligned, clear of the
/// tables and the GHCB.
const BASE: u64 = GIB;

fn accepts(w: &TdxWorld) -> Vec<(u64, u8, u64)> {
    w.tdx
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TdxEvent::Accept { gpa, level, status } => Some((gpa, level, status)),
            _ => None,
        })
        .collect()
}

fn unit_of(pa: u64) -> u64 {
    pa / UNIT
}

#[test]
fn a_lazy_accept_takes_the_units_it_needs_once_each() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 64 * MIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 64 * MIB).unwrap();
    assert_eq!(e.census().unaccepted, 64 * MIB / 4096);
    assert_eq!(e.state(BASE + 5 * UNIT), Some(PageState::Unaccepted));

    w.tdx.clear_events();
    let report = e.accept(BASE + 5 * UNIT + 8192, 4096).unwrap();
    assert_eq!(report.units, 1, "a page inside one unit accepts that unit");
    assert_eq!(accepts(&w), vec![(BASE + 5 * UNIT, 1, 0)], "one 2 MiB ACCEPT");
    assert!((BASE + 5 * UNIT..BASE + 6 * UNIT)
        .step_by(4096)
        .all(|pa| e.state(pa) == Some(PageState::Private)));
    assert!(!e.unaccepted().unwrap().is_unaccepted(unit_of(BASE) + 5));
    assert_eq!(
        e.state(BASE + 6 * UNIT),
        Some(PageState::Unaccepted),
        "its neighbour is untouched"
    );

    w.tdx.clear_events();
    assert_eq!(e.accept(BASE + 5 * UNIT, 4096).unwrap().units, 0);
    assert!(accepts(&w).is_empty(), "an accepted unit costs no call");
    assert_eq!(e.counters().units_accepted, 1);
}

#[test]
fn a_range_ending_on_a_unit_boundary_accepts_the_next_unit_too() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 64 * MIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 64 * MIB).unwrap();
    let bitmap = e.unaccepted().unwrap();
    assert!(bitmap.range_needs_accept(BASE, UNIT));

    assert_eq!(e.accept(BASE, UNIT).unwrap().units, 2, "the unit and its guard");
    assert!(!bitmap.is_unaccepted(unit_of(BASE)) && !bitmap.is_unaccepted(unit_of(BASE) + 1));
    assert!(bitmap.is_unaccepted(unit_of(BASE) + 2));
    assert_eq!(accepts(&w).len(), 2, "two 2 MiB ACCEPTs in one run");

    assert_eq!(
        e.accept(BASE + 4 * UNIT, UNIT - 4096).unwrap().units,
        1,
        "ends inside: no guard"
    );
    assert!(bitmap.is_unaccepted(unit_of(BASE) + 5));
    assert!(!bitmap.range_needs_accept(BASE, UNIT), "the guard is accepted now");
}

#[test]
fn eager_acceptance_uses_1g_accepts_and_takes_everything() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(0, GIB, 2);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    // [0, 1 GiB) holds the test's GHCB area and nothing the engine uses.
    e.record_unaccepted(0, GIB).unwrap();
    w.tdx.clear_events();
    let report = e.accept_all(0, 1).unwrap();
    assert_eq!(report.units, 512);
    assert_eq!(accepts(&w), vec![(0, 2, 0)], "one 1 GiB ACCEPT");
    assert_eq!(e.unaccepted().unwrap().count(), 0);
    assert_eq!(e.census().unaccepted, 0);
    assert_eq!(w.tdx.page(GIB - 4096).state, TdxPageState::Accepted);
}

#[test]
fn a_size_mismatch_falls_back_to_4k_accepts() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 4 * MIB, 0);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 4 * MIB).unwrap();
    w.tdx.clear_events();
    e.accept(BASE, 4096).unwrap();
    let calls = accepts(&w);
    assert_eq!(calls.len(), 1 + 512, "2 MiB refused, then 512 4 KiB ACCEPTs");
    assert_eq!(calls[0].0, BASE);
    assert_ne!(calls[0].2, 0, "the 2 MiB ACCEPT failed with a size mismatch");
    assert!(calls[1..].iter().all(|&(_, level, status)| level == 0 && status == 0));
    assert!((BASE..BASE + UNIT)
        .step_by(4096)
        .all(|pa| w.tdx.page(pa).state == TdxPageState::Accepted));
}

#[test]
fn converting_unaccepted_memory_is_refused_and_changes_nothing() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 8 * MIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 8 * MIB).unwrap();
    let before = w.m.snapshot();
    let err = e
        .convert(
            Target::Physical {
                pa: BASE - 4096,
                len: 8192,
            },
            Visibility::Shared,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ConvertError::Refused {
            pa: BASE,
            state: PageState::Unaccepted
        }
    );
    assert!(err.changed_nothing());
    assert_eq!(w.m.snapshot(), before);
    e.accept(BASE, 4096).unwrap();
    e.convert(
        Target::Physical {
            pa: BASE - 4096,
            len: 8192,
        },
        Visibility::Shared,
    )
    .expect("accepted memory converts");
}

#[test]
fn recording_a_range_accepts_the_ends_that_fill_no_unit_at_once() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 8 * MIB, 0);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.tdx.clear_events();
    let (pa, end) = (BASE + UNIT - 8192, BASE + 3 * UNIT + 4096);
    e.record_unaccepted(pa, end - pa).unwrap();
    let bitmap = e.unaccepted().unwrap();
    assert_eq!(bitmap.count(), 2, "units 1 and 2 lie wholly inside");
    assert!(bitmap.is_unaccepted(unit_of(BASE) + 1) && bitmap.is_unaccepted(unit_of(BASE) + 2));
    let edges: Vec<u64> = accepts(&w).iter().map(|a| a.0).collect();
    assert_eq!(
        edges,
        vec![pa, pa + 4096, BASE + 3 * UNIT],
        "the 3 edge pages, accepted now"
    );
    for page in [pa, pa + 4096, BASE + 3 * UNIT] {
        assert_eq!(e.state(page), Some(PageState::Private));
        assert_eq!(w.tdx.page(page).state, TdxPageState::Accepted);
    }
    assert_eq!(e.state(BASE + UNIT), Some(PageState::Unaccepted));
}

#[test]
fn a_filled_bitmap_is_adopted_and_one_over_memory_in_use_is_refused_whole() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let storage = integration::bitmap_storage();
    let first = unit_of(BASE);
    storage[(first / 64) as usize].store(0b101 << (first % 64), std::sync::atomic::Ordering::Relaxed);
    let mut e = w.engine();
    e.convert(
        Target::Physical {
            pa: BASE + 2 * UNIT,
            len: 4096,
        },
        Visibility::Shared,
    )
    .unwrap();
    let before = w.m.snapshot();
    let err = e
        .adopt_unaccepted(UnacceptedBitmap::new(0, UNIT, &storage).unwrap())
        .unwrap_err();
    assert_eq!(
        err,
        AcceptMemoryError::NotPrivate {
            pa: BASE + 2 * UNIT,
            state: Some(PageState::Shared)
        }
    );
    assert_eq!(w.m.snapshot(), before, "the first unit's marks were undone");
    assert!(e.unaccepted().is_none(), "the refused bitmap was kept");

    // The same engine, kept through the error, takes one that fits; once.
    let storage = integration::bitmap_storage();
    storage[(first / 64) as usize].store(0b1 << (first % 64), std::sync::atomic::Ordering::Relaxed);
    e.adopt_unaccepted(UnacceptedBitmap::new(0, UNIT, &storage).unwrap())
        .unwrap();
    assert_eq!(e.state(BASE + UNIT - 4096), Some(PageState::Unaccepted));
    assert_eq!(e.census().unaccepted, UNIT / 4096);
    let again = integration::bitmap_storage();
    let before = w.m.snapshot();
    assert_eq!(
        e.adopt_unaccepted(UnacceptedBitmap::new(0, UNIT, &again).unwrap()),
        Err(AcceptMemoryError::BitmapInUse)
    );
    assert_eq!(w.m.snapshot(), before);
    assert!(e.unaccepted().unwrap().is_unaccepted(first), "the first bitmap stays");
}

#[test]
fn recording_refuses_frames_in_use_and_changes_nothing() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.convert(
        Target::Physical {
            pa: BASE + 3 * UNIT,
            len: 4096,
        },
        Visibility::Shared,
    )
    .unwrap();
    let before = w.m.snapshot();
    w.tdx.clear_events();
    let err = e.record_unaccepted(BASE + UNIT - 4096, 4 * UNIT).unwrap_err();
    assert_eq!(
        err,
        AcceptMemoryError::NotPrivate {
            pa: BASE + 3 * UNIT,
            state: Some(PageState::Shared)
        }
    );
    assert_eq!(w.m.snapshot(), before);
    assert_eq!(e.unaccepted().unwrap().count(), 0);
    assert!(accepts(&w).is_empty(), "no edge was accepted");
    assert_eq!(
        e.record_unaccepted(BASE, 4095),
        Err(AcceptMemoryError::InvalidRange { pa: BASE, len: 4095 })
    );
}

#[test]
fn many_cpus_asking_for_the_same_units_accept_each_once() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 32 * MIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 32 * MIB).unwrap();
    w.tdx.clear_events();
    let start = Barrier::new(4);
    std::thread::scope(|s| {
        for cpu in 0..4u64 {
            let (e, start) = (&e, &start);
            s.spawn(move || {
                start.wait();
                // Overlapping requests, in different orders.
                for i in 0..16u64 {
                    let unit = (i * (cpu + 1) * 7) % 15;
                    let (pa, len) = (BASE + unit * UNIT + 4096, UNIT);
                    e.accept(pa, len).expect("honest TD");
                    // Returned: every unit it needs is accepted, even one
                    // another CPU was accepting.
                    assert!(!e.unaccepted().unwrap().range_needs_accept(pa, len));
                    assert_eq!(e.state(pa + UNIT - 4096), Some(PageState::Private));
                }
            });
        }
    });
    let calls = accepts(&w);
    assert!(
        calls.iter().all(|&(_, _, status)| status == 0),
        "no ACCEPT failed, none twice: {calls:x?}"
    );
    let mut gpas: Vec<u64> = calls.iter().map(|c| c.0).collect();
    gpas.sort_unstable();
    let before = gpas.len();
    gpas.dedup();
    assert_eq!(gpas.len(), before, "each unit accepted exactly once");
    assert_eq!(e.counters().units_accepted, gpas.len() as u64);
}

#[test]
fn eager_acceptance_spreads_over_cpus_without_accepting_twice() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(0, GIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(0, GIB).unwrap();
    w.tdx.clear_events();
    let start = Barrier::new(3);
    let units: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..3)
            .map(|cpu| {
                let (e, start) = (&e, &start);
                s.spawn(move || {
                    start.wait();
                    e.accept_all(cpu, 3).unwrap().units
                })
            })
            .collect();
        workers.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(units, 512);
    assert_eq!(e.unaccepted().unwrap().count(), 0);
    let calls = accepts(&w);
    let mut done: Vec<u64> = calls.iter().filter(|c| c.2 == 0).map(|c| c.0).collect();
    done.sort_unstable();
    done.dedup();
    assert_eq!(done.len(), 512, "one successful 2 MiB ACCEPT per unit");
    assert_eq!(calls.iter().filter(|c| c.2 == 0).count(), 512, "none twice");
    assert!(
        calls.iter().all(|c| c.2 == 0 || c.1 == 2),
        "the only failures are 1 GiB tries over 2 MiB pages: {calls:x?}"
    );
}

#[test]
fn a_unit_the_firmware_accepted_behind_the_guests_back_is_poisoned() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 8 * MIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 8 * MIB).unwrap();
    // The memory map says unaccepted; the TD module knows better.
    w.accepted_behind_the_guests_back(BASE + UNIT, UNIT, 1);
    let err = e.accept(BASE, UNIT).unwrap_err();
    let AcceptMemoryError::Platform {
        error: PlatformError::Accept(AcceptError::AlreadyAccepted { gpa, .. }),
        pa,
        poisoned,
        accepted,
        left_mapped: false,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!((gpa, pa, poisoned, accepted), (BASE + UNIT, BASE + UNIT, 512, 1));
    assert_eq!(
        e.state(BASE),
        Some(PageState::Private),
        "the unit before it is accepted"
    );
    assert!((BASE + UNIT..BASE + 2 * UNIT)
        .step_by(4096)
        .all(|p| e.state(p) == Some(PageState::Poisoned)));
    assert!(
        e.unaccepted().unwrap().is_unaccepted(unit_of(BASE) + 1),
        "never reported accepted"
    );
    assert_eq!(
        e.accept(BASE + UNIT + 4096, 4096),
        Err(AcceptMemoryError::Poisoned { pa: BASE + UNIT })
    );
    assert!(matches!(
        e.convert(
            Target::Physical {
                pa: BASE + UNIT,
                len: 4096
            },
            Visibility::Shared
        ),
        Err(ConvertError::Refused {
            state: PageState::Poisoned,
            ..
        })
    ));
    assert_eq!(e.census().poisoned, 512);
}

#[test]
fn a_busy_td_module_poisons_the_unit_it_never_finished() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.hand_over_unaccepted(BASE, 8 * MIB, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(BASE, 8 * MIB).unwrap();
    w.tdx.set_busy_answers(u32::MAX);
    let err = e.accept(BASE, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            AcceptMemoryError::Platform {
                error: PlatformError::Accept(AcceptError::Busy { .. }),
                pa: BASE,
                poisoned: 512,
                accepted: 0,
                left_mapped: false,
            }
        ),
        "{err:?}"
    );
    w.tdx.set_busy_answers(0);
    assert_eq!(
        e.accept(BASE, 4096),
        Err(AcceptMemoryError::Poisoned { pa: BASE }),
        "not tried again"
    );
    assert_eq!(
        e.accept(BASE + UNIT, 4096).unwrap().units,
        1,
        "other units still accept"
    );
}

// SEV-SNP

const GHCB_PA: u64 = 1536 * MIB;

#[test]
fn snp_accepts_by_page_state_change_then_pvalidate_and_evicts_the_cache_lines() {
    snp_accepts_and_evicts(Layout::FOUR);
}

/// PVALIDATE goes through the scratch window, which sits where only 57-bit
/// addresses reach.
#[test]
fn snp_with_five_level_paging_accepts_through_the_window() {
    snp_accepts_and_evicts(Layout::FIVE);
}

fn snp_accepts_and_evicts(layout: Layout) {
    let w = SnpWorld::with_machine(SnpConfig::default(), |enc| {
        Machine::new_in(layout, enc, Shape::Mixed, TABLES)
    });
    w.hand_over_unvalidated(BASE, 16 * MIB);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(BASE, 16 * MIB).unwrap();
    let before = e.counters();
    assert_eq!(e.accept(BASE + UNIT, UNIT).unwrap().units, 2);
    let c = e.counters().since(&before);
    assert_eq!(
        (c.psc_exits, c.psc_entries, c.pvalidate),
        (1, 2, 2),
        "2 MiB entries and PVALIDATEs"
    );
    assert!((BASE + UNIT..BASE + 3 * UNIT)
        .step_by(4096)
        .all(|p| w.snp.rmp(p).validated));
    assert!(!w.snp.rmp(BASE).validated && !w.snp.rmp(BASE + 3 * UNIT).validated);
    assert_eq!(w.snp.stats().evictions, 1024, "every 4 KiB page of both units");
    assert!(w.snp.unevicted().is_empty());
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

#[test]
fn snp_with_coherency_sfw_no_evicts_nothing() {
    let w = SnpWorld::new(
        SnpConfig {
            coherency_sfw_no: true,
            ..SnpConfig::default()
        },
        Shape::Mixed,
    );
    w.hand_over_unvalidated(BASE, 16 * MIB);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(BASE, 16 * MIB).unwrap();
    e.accept(BASE, 4096).unwrap();
    e.convert(
        Target::Physical {
            pa: 64 * MIB,
            len: 4 * MIB,
        },
        Visibility::Shared,
    )
    .unwrap();
    e.convert(
        Target::Physical {
            pa: 64 * MIB,
            len: 4 * MIB,
        },
        Visibility::Private,
    )
    .unwrap();
    assert_eq!(w.snp.stats().evictions, 0);
}

#[test]
fn snp_conversion_to_private_evicts_every_page_it_validates() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, GHCB_PA);
    let evicted = w.snp.stats().evictions;
    let (pa, len) = (64 * MIB + 4096, 3 * MIB);
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
    assert_eq!(w.snp.stats().evictions, evicted, "rescinding evicts nothing");
    e.convert(Target::Physical { pa, len }, Visibility::Private).unwrap();
    assert_eq!(w.snp.stats().evictions - evicted, len / 4096);
    assert!(w.snp.unevicted().is_empty());
}

#[test]
fn snp_4k_rmp_entries_after_a_migration_fall_back_to_4k_pvalidate() {
    let w = SnpWorld::new(
        SnpConfig {
            rmp_4k_only: true,
            ..SnpConfig::default()
        },
        Shape::Mixed,
    );
    w.hand_over_unvalidated(BASE, 4 * MIB);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(BASE, 4 * MIB).unwrap();
    let before = e.counters();
    e.accept(BASE, 4096).unwrap();
    let c = e.counters().since(&before);
    assert_eq!(c.pvalidate, 1 + 512, "2 MiB refused, then 512 4 KiB");
    assert!((BASE..BASE + UNIT).step_by(4096).all(|p| w.snp.rmp(p).validated));
    assert!(w.snp.unevicted().is_empty());
}

#[test]
fn snp_a_unit_the_host_claims_validated_is_poisoned() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    w.hand_over_unvalidated(BASE, 8 * MIB);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(BASE, 8 * MIB).unwrap();
    // Validated behind the guest's back, and the page state change that
    // would reset it only pretends.
    w.validated_behind_the_guests_back(BASE + 2 * UNIT, UNIT);
    w.snp.set_hostile(Some(SnpHostile::PscSuccessWithoutRmpChange));
    let err = e.accept(BASE + 2 * UNIT, 4096).unwrap_err();
    let AcceptMemoryError::Platform {
        error: PlatformError::Pvalidate(PvalidateRangeError::Page { error, .. }),
        pa,
        poisoned,
        left_mapped: false,
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!((error, pa, poisoned), (PvalidateError::NoUpdate, BASE + 2 * UNIT, 512));
    assert_eq!(e.state(BASE + 2 * UNIT + 4096), Some(PageState::Poisoned));
    assert_eq!(
        e.accept(BASE + 2 * UNIT, 4096),
        Err(AcceptMemoryError::Poisoned { pa: BASE + 2 * UNIT })
    );
}

#[test]
fn snp_a_unit_the_host_never_assigned_fails_pvalidate_and_is_poisoned() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    w.snp.set_rmp(BASE, 8 * MIB, RmpEntry::default());
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(BASE, 8 * MIB).unwrap();
    w.snp.set_hostile(Some(SnpHostile::PscSuccessWithoutRmpChange));
    let err = e.accept(BASE, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            AcceptMemoryError::Platform {
                error: PlatformError::Pvalidate(PvalidateRangeError::Page {
                    error: PvalidateError::FailInput,
                    ..
                }),
                pa: BASE,
                left_mapped: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!((BASE..BASE + UNIT)
        .step_by(4096)
        .all(|p| e.state(p) == Some(PageState::Poisoned)));
    w.snp.set_hostile(None);
    assert_eq!(
        e.accept(BASE + 2 * UNIT, 4096).unwrap().units,
        1,
        "an honest answer accepts the next"
    );
}

#[test]
fn snp_without_a_scratch_window_nothing_is_claimed() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    w.hand_over_unvalidated(BASE, 8 * MIB);
    let storage = integration::bitmap_storage();
    let platform =
        coco_convert::platform::snp::Snp::new(&w.snp, &w.snp, coco_convert::platform::snp::NoGhcb, 51).unwrap();
    let mut e = w.m.engine(platform);
    e.adopt_unaccepted(UnacceptedBitmap::new(0, UNIT, &storage).unwrap())
        .unwrap();
    assert_eq!(
        e.record_unaccepted(BASE + 4096, UNIT),
        Err(AcceptMemoryError::NoScratchWindow)
    );
    assert_eq!(e.unaccepted().unwrap().count(), 0, "nothing recorded");
    e.record_unaccepted(BASE, 8 * MIB).unwrap();
    assert_eq!(e.accept(BASE, 4096), Err(AcceptMemoryError::NoScratchWindow));
    assert_eq!(
        e.state(BASE),
        Some(PageState::Unaccepted),
        "still unaccepted, not poisoned"
    );
}

#[test]
fn snp_eager_acceptance_fills_every_page_state_change_exit() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    w.hand_over_unvalidated(0, GIB);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(0, GIB).unwrap();
    // The GHCB lives above the unaccepted gibibyte.
    w.boot_ghcb(&e, GHCB_PA);
    let before = e.counters();
    assert_eq!(e.accept_all(0, 1).unwrap().units, 512);
    let c = e.counters().since(&before);
    assert_eq!(c.psc_exits, 512u64.div_ceil(253), "253 2 MiB entries per exit: {c:?}");
    assert_eq!((c.psc_entries, c.pvalidate), (512, 512));
    assert!((0..GIB).step_by(4096).all(|p| w.snp.rmp(p).validated));
}
