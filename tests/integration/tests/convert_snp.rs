//! The engine on SEV-SNP: GHCB set up shared from the start, PSC batched,
//! PVALIDATE through the private scratch window.

use coco_convert::platform::SnpOptions;
use coco_convert::{PageState, Target, Visibility};
use hvmock::{RmpEntry, SnpConfig};
use integration::world::{Machine, Shape, SnpWorld};
use integration::{GIB, MIB};

const GHCB_PA: u64 = 1536 * MIB;

#[test]
fn ghcb_is_shared_from_the_start_through_the_msr_protocol() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, GHCB_PA);
    let c = e.counters();
    assert_eq!(
        (c.psc_msr, c.psc_exits, c.pvalidate),
        (1, 0, 1),
        "before a GHCB: the MSR protocol"
    );
    assert_eq!(w.snp.registered_ghcb(), Some(GHCB_PA));
    assert_eq!(
        w.snp.rmp(GHCB_PA),
        RmpEntry {
            assigned: false,
            validated: false,
            huge: false
        }
    );
    let m = w.m.page_tables().translate(&w.m.mem, Machine::direct(GHCB_PA)).unwrap();
    assert!(!m.enc_set, "the direct map maps the GHCB shared (C-bit clear)");
    assert_eq!(e.state(GHCB_PA), Some(PageState::Shared));
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

#[test]
fn round_trip_uses_2m_psc_and_pvalidate_where_aligned() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, GHCB_PA);
    let before = e.counters();
    // 64 MiB, 2 MiB aligned, in the 1 GiB page.
    let (pa, len) = (64 * MIB, 64 * MIB);
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
    let c = e.counters().since(&before);
    // The RMP holds 4 KiB entries at boot: each 2 MiB rescind falls back.
    assert_eq!(c.psc_exits, 1);
    assert_eq!(c.psc_entries, 32);
    assert_eq!(c.shootdowns, 1);
    assert!((pa..pa + len).step_by(4096).all(|g| !w.snp.rmp(g).assigned));
    let before = e.counters();
    e.convert(Target::Physical { pa, len }, Visibility::Private).unwrap();
    let c = e.counters().since(&before);
    assert_eq!(
        (c.psc_exits, c.psc_entries, c.pvalidate),
        (1, 32, 32),
        "2 MiB PSC entries, 2 MiB PVALIDATE"
    );
    assert!((pa..pa + len).step_by(4096).all(|g| w.snp.rmp(g)
        == RmpEntry {
            assigned: true,
            validated: true,
            huge: true
        }));
    e.release_deferred_tables();
    assert_eq!(w.m.frames.in_use(), 1, "only the PT around the (shared) GHCB remains");
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// Where the strategies differ: a vmalloc buffer. Ours packs 253 entries
/// per exit and uses a 2 MiB entry and PVALIDATE where the buffer's frames
/// happen to form an aligned 2 MiB; Linux sends 64 entries per exit, 4 KiB
/// each.
#[test]
fn linux_strategy_costs_more_calls_for_the_same_work() {
    let mut frames: Vec<u64> = (0..512).map(|i| GIB + 64 * MIB + i * 4096).collect();
    frames.extend((0..100).map(|i| GIB + 200 * MIB + i * 3 * 4096));
    let run = |options| {
        let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
        let e = w.engine_with(options);
        w.boot_ghcb(&e, GHCB_PA);
        let va = w.m.vmalloc(&frames);
        let len = frames.len() as u64 * 4096;
        let mut scratch = vec![0; frames.len()];
        e.convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut scratch)
            .unwrap();
        let before = e.counters();
        e.convert_with_scratch(Target::Virtual { va, len }, Visibility::Private, &mut scratch)
            .unwrap();
        assert!(w.snp.violations().is_empty());
        e.counters().since(&before)
    };
    let ours = run(SnpOptions::MINIMAL);
    let linux = run(SnpOptions::LINUX);
    assert_eq!((ours.psc_exits, ours.psc_entries, ours.pvalidate), (1, 101, 101));
    assert_eq!((linux.psc_exits, linux.psc_entries, linux.pvalidate), (10, 612, 612));
}

/// Without a scratch window SNP cannot PVALIDATE: the engine refuses
/// before it claims or unmaps anything, so nothing is poisoned.
#[test]
fn without_a_window_snp_refuses_and_changes_nothing() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let platform =
        coco_convert::platform::snp::Snp::new(&w.snp, &w.snp, coco_convert::platform::snp::NoGhcb, 51).unwrap();
    let e = coco_convert::Engine::new(
        w.m.config(),
        &w.m.phys,
        &w.m.frames,
        &w.m.tlb,
        platform,
        coco_convert::StateTable::new(0, &w.m.states),
    );
    let before = w.m.snapshot();
    let err = e
        .convert(Target::Physical { pa: 4 * MIB, len: 4096 }, Visibility::Shared)
        .unwrap_err();
    assert_eq!(err, coco_convert::ConvertError::NoScratchWindow);
    assert_eq!(e.state(4 * MIB), Some(PageState::Private));
    assert_eq!(e.counters().hypercalls(), 0);
    assert_eq!(w.m.snapshot(), before, "tables and states exactly as before");
}
