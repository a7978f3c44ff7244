//! Everything private again before a kexec or kdump kernel: conversions
//! stop, a mix of shared memory goes back in runs, the GHCBs last through
//! the MSR protocol, and the count is checked against the state table.

use std::sync::atomic::{AtomicBool, Ordering};

use coco_convert::pool::{PoolError, SharedPool};
use coco_convert::{Alias, ConvertError, PageState, Platform, Target, Visibility};
use hvmock::{GuestMemory, GuestPageTables, SnpConfig, SnpHostile, TdxConfig, TdxHostile};
use integration::sim::{chunk_slots, set_cpu, ChunkStack, Layout};
use integration::world::{EngineOf, Machine, Shape, SnpWorld, TdxWorld, TABLES};
use integration::MIB;

const GHCB_PA: u64 = 1536 * MIB;

/// Every present mapping of RAM maps it private (the encryption bit says
/// private on both platforms' terms).
fn every_mapping_private(mem: &GuestMemory, tables: GuestPageTables, private_is_set: bool, ram: u64) {
    let mut shared = Vec::new();
    tables.for_each_mapping(mem, &mut |m| {
        if m.pa < ram && m.enc_set != private_is_set {
            shared.push(m);
        }
    });
    assert!(
        shared.is_empty(),
        "mappings left shared: {:x?}",
        &shared[..shared.len().min(4)]
    );
}

/// Shares `[pa, pa + len)` through `e`.
fn share<P: Platform>(e: &EngineOf<'_, P>, pa: u64, len: u64) {
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
}

/// Shares a mix through `e`: a 2 MiB chunk as a pool takes it, a direct
/// range, a registered alias's range, and a vmalloc-style buffer of
/// scattered frames, returned as the target to name.
fn share_a_mix<P: Platform>(m: &Machine, e: &EngineOf<'_, P>) -> (Target, u64) {
    share(e, 256 * MIB, 2 * MIB);
    share(e, 300 * MIB + 4096, 40960);
    let alias = e
        .register_alias(Alias {
            va: m.layout.alias,
            pa: 1200 * MIB,
            len: 4 * MIB,
        })
        .unwrap();
    let _ = alias;
    e.convert(
        Target::Virtual {
            va: m.layout.alias + MIB,
            len: 8192,
        },
        Visibility::Shared,
    )
    .unwrap();
    let frames = [1100 * MIB, 1100 * MIB + 3 * 4096, 700 * MIB, 1300 * MIB + 8192];
    let va = m.vmalloc(&frames);
    let buffer = Target::Virtual {
        va,
        len: frames.len() as u64 * 4096,
    };
    e.convert(buffer, Visibility::Shared).unwrap();
    (buffer, 512 + 10 + 2 + 4)
}

#[test]
fn tdx_every_shared_frame_goes_private_in_one_mapgpa_per_run() {
    tdx_every_shared_frame_goes_private(Layout::FOUR, TdxConfig::default());
}

#[test]
fn tdx_with_five_level_paging_every_shared_frame_goes_private() {
    let gpaw_52 = TdxConfig {
        gpaw: 52,
        ..TdxConfig::default()
    };
    tdx_every_shared_frame_goes_private(Layout::FIVE, gpaw_52);
}

fn tdx_every_shared_frame_goes_private(layout: Layout, config: TdxConfig) {
    let w = TdxWorld::with_machine(config, |enc| Machine::new_in(layout, enc, Shape::Mixed, TABLES));
    let e = w.engine();
    let (buffer, frames) = share_a_mix(&w.m, &e);
    assert_eq!(e.census().shared, frames);
    let before = e.counters();
    let report = e.unshare_all(&[buffer]);
    assert!(report.complete() && report.accounting_matches(), "{report:?}");
    assert_eq!(report.made_private, frames);
    assert_eq!((report.expected_shared, report.found_shared), (frames, frames));
    assert_eq!(e.census().shared, 0);
    let c = e.counters().since(&before);
    // The buffer's 4 frames make 4 runs, then the chunk, the direct range
    // and the alias's range: 7 runs, one MapGPA each.
    assert_eq!(c.map_gpa, 7, "{c:?}");
    assert!((0..w.m.size())
        .step_by(4096)
        .all(|pa| w.host_side(pa) == Some(Visibility::Private)));
    every_mapping_private(&w.m.mem, w.m.page_tables(), false, w.m.size());
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

#[test]
fn after_unshare_all_conversions_are_refused_and_change_nothing() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    share(&e, 64 * MIB, 4096);
    assert!(e.unshare_all(&[]).complete());
    let before = w.m.snapshot();
    let err = e
        .convert(
            Target::Physical {
                pa: 64 * MIB,
                len: 4096,
            },
            Visibility::Shared,
        )
        .unwrap_err();
    assert_eq!(err, ConvertError::Stopped);
    assert!(err.changed_nothing());
    assert_eq!(w.m.snapshot(), before);
}

#[test]
fn conversions_in_flight_finish_and_later_ones_are_stopped() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Small);
    let e = w.engine();
    let started = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|cpu| {
                let (e, started) = (&e, &started);
                s.spawn(move || {
                    set_cpu(cpu as usize + 1);
                    let mut stopped = 0;
                    for i in 0..400u64 {
                        let pa = 1024 * MIB + (cpu * 400 + i) * 8192;
                        let r = e.convert(Target::Physical { pa, len: 4096 }, Visibility::Shared);
                        started.store(true, Ordering::Release);
                        match r {
                            Ok(_) => {}
                            Err(ConvertError::Stopped) => stopped += 1,
                            Err(other) => panic!("{other:?}"),
                        }
                    }
                    stopped
                })
            })
            .collect();
        while !started.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let report = e.unshare_all(&[]);
        let stopped: u64 = workers.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(
            stopped > 0,
            "unshare_all ran after both threads finished: no overlap tested"
        );
        report
    });
    assert!(report.complete() && report.accounting_matches(), "{report:?}");
    assert_eq!(e.census().shared, 0, "nothing shared after unshare_all returned");
    assert_eq!(e.census().converting, 0);
    every_mapping_private(&w.m.mem, w.m.page_tables(), false, w.m.size());
}

#[test]
fn a_failing_host_leaves_poisoned_frames_listed_for_the_next_kernel() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    share(&e, 64 * MIB, 8192);
    share(&e, 96 * MIB, 4096);
    // The first run's MapGPA is answered honestly, then the VMM lies.
    w.tdx.set_hostile_after(1, TdxHostile::GarbageStatus(0xDEAD));
    let report = e.unshare_all(&[]);
    assert_eq!((report.made_private, report.failed), (2, 1), "{report:?}");
    assert!(!report.complete());
    assert_eq!(report.poisoned, 1);
    assert_eq!(e.runs(PageState::Poisoned).collect::<Vec<_>>(), vec![(96 * MIB, 4096)]);
    assert_eq!(e.census().shared, 0);
}

#[test]
fn a_frame_shared_behind_the_engines_back_breaks_the_count() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    share(&e, 64 * MIB, 4096);
    // The OS writes a state byte itself: "shared" (1).
    w.m.states[(80 * MIB / 4096) as usize].store(1, Ordering::Release);
    let report = e.unshare_all(&[]);
    assert_eq!((report.expected_shared, report.found_shared), (1, 2));
    assert!(!report.accounting_matches());
}

/// A driver's shared pool (chunks in use, a free one kept by hysteresis)
/// goes private with everything else, in one MapGPA per chunk-sized run,
/// and from then on the pool hands out nothing: its chunks no longer reach
/// the host.
#[test]
fn a_shared_pools_chunks_go_private_and_the_pool_serves_no_more() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    // Three chunks, not adjacent: three runs.
    let chunks = ChunkStack::new(vec![1200 * MIB, 1100 * MIB, 1000 * MIB]);
    let pool = SharedPool::new(&e, &chunks, chunk_slots(4), 1);
    let a = pool.alloc(2 * MIB).unwrap();
    let b = pool.alloc(2 * MIB).unwrap();
    let c = pool.alloc(8192).unwrap();
    pool.free(c).unwrap();
    assert_eq!(pool.stats().chunks_held, 3, "two full, one empty kept");
    assert_eq!(e.census().shared, 3 * 512);
    let before = e.counters();
    let report = e.unshare_all(&[]);
    assert!(report.complete() && report.accounting_matches(), "{report:?}");
    assert_eq!(report.made_private, 3 * 512);
    assert_eq!(e.counters().since(&before).map_gpa, 3);
    for pa in [1000 * MIB, 1100 * MIB, 1200 * MIB] {
        assert!((pa..pa + 2 * MIB)
            .step_by(4096)
            .all(|f| e.state(f) == Some(PageState::Private) && w.host_side(f) == Some(Visibility::Private)));
    }
    every_mapping_private(&w.m.mem, w.m.page_tables(), false, w.m.size());
    assert!(e.stopped());
    assert_eq!(
        pool.alloc(4096),
        Err(PoolError::Convert(ConvertError::Stopped)),
        "a buffer from a chunk that is private now"
    );
    // Buffers handed out before go back without harm, and without a call.
    let calls = e.counters().hypercalls();
    pool.free(a).unwrap();
    pool.free(b).unwrap();
    assert_eq!(e.counters().hypercalls(), calls);
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

/// A state byte the engine does not know says nothing about its frame:
/// the next kernel must exclude it, as the census counts it.
#[test]
fn a_state_byte_the_engine_does_not_know_is_listed_as_poisoned() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pa = 72 * MIB;
    w.m.states[(pa / 4096) as usize].store(0x0F, Ordering::Release);
    assert_eq!(e.state(pa), Some(PageState::Poisoned));
    let report = e.unshare_all(&[]);
    assert_eq!(report.poisoned, 1);
    assert_eq!(e.runs(PageState::Poisoned).collect::<Vec<_>>(), vec![(pa, 4096)]);
}

#[test]
fn snp_the_ghcbs_go_private_last_through_the_msr_protocol() {
    snp_the_ghcbs_go_private_last(Layout::FOUR);
}

#[test]
fn snp_with_five_level_paging_the_ghcbs_go_private_last() {
    snp_the_ghcbs_go_private_last(Layout::FIVE);
}

fn snp_the_ghcbs_go_private_last(layout: Layout) {
    let w = SnpWorld::with_machine(SnpConfig::default(), |enc| {
        Machine::new_in(layout, enc, Shape::Mixed, TABLES)
    });
    let e = w.engine();
    w.boot_ghcb(&e, GHCB_PA);
    set_cpu(1);
    w.boot_ghcb(&e, GHCB_PA + 4096 * 3);
    set_cpu(0);
    let (buffer, frames) = share_a_mix(&w.m, &e);
    let msr_before = w.snp.stats().msr_requests;
    let psc_msr_before = e.counters().psc_msr;
    let report = e.unshare_all(&[buffer]);
    assert!(report.complete() && report.accounting_matches(), "{report:?}");
    assert_eq!(report.made_private, frames + 2, "the mix and two GHCBs");
    assert!(w.ghcbs.iter().all(|slot| !slot.is_filled()), "every slot emptied");
    assert_eq!(
        e.counters().psc_msr - psc_msr_before,
        2,
        "only the GHCBs used the MSR protocol"
    );
    assert!(w.snp.stats().msr_requests > msr_before);
    for pa in [GHCB_PA, GHCB_PA + 3 * 4096] {
        assert_eq!(w.host_side(pa), Some(Visibility::Private));
        assert_eq!(e.state(pa), Some(PageState::Private));
    }
    assert!((0..w.m.size())
        .step_by(4096)
        .all(|pa| w.host_side(pa) == Some(Visibility::Private)));
    every_mapping_private(&w.m.mem, w.m.page_tables(), true, w.m.size());
    assert!(w.snp.unevicted().is_empty(), "validated pages evicted");
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

#[test]
fn snp_a_ghcb_the_host_fails_to_take_back_is_poisoned_and_reported() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, GHCB_PA);
    share(&e, 64 * MIB, 4096);
    w.snp.set_hostile(Some(SnpHostile::MsrPscError));
    let report = e.unshare_all(&[]);
    assert_eq!((report.made_private, report.failed), (1, 1), "{report:?}");
    assert_eq!(e.runs(PageState::Poisoned).collect::<Vec<_>>(), vec![(GHCB_PA, 4096)]);
    assert_eq!(
        e.state(64 * MIB),
        Some(PageState::Private),
        "went through the GHCB before it"
    );
}
