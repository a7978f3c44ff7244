//! What a failed acceptance leaves: the poisoned frames are taken out of
//! reach as a failed conversion's are. Every linear alias of them (the
//! direct map, registered aliases) is split to fit and made not present
//! under one shootdown, so a load that runs off the end of accepted memory
//! takes a #PF the zeropad fix-up handles, never an access to memory the
//! platform did not accept; everything around them stays mapped as it was.

use coco_convert::{AcceptMemoryError, Alias, Level, PageState, PlatformError, Visibility};
use hvmock::{RmpEntry, SnpConfig, SnpHostile, TdxConfig};
use integration::sim::{ALIAS_VA, DIRECT_MAP_VA};
use integration::world::{Shape, SnpWorld, TdxWorld, DIRECT_MAP_FLAGS};
use integration::MIB;
use tdcall::AcceptError;

const PAGE: u64 = 4096;
const UNIT: u64 = 2 * MIB;
const GHCB_PA: u64 = 1536 * MIB;

/// The frames of `[start, end)` the direct map still maps.
fn mapped(e_translate: impl Fn(u64) -> Option<u64>, start: u64, end: u64) -> Vec<u64> {
    (start..end)
        .step_by(PAGE as usize)
        .filter(|&pa| e_translate(DIRECT_MAP_VA + pa).is_some())
        .collect()
}

/// Four units in the 1 GiB direct-map leaf at GiB 0; the third one is
/// accepted behind the guest's back, so its acceptance fails.
#[test]
fn tdx_a_failed_unit_inside_a_1g_leaf_is_split_out_and_not_present() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let base = 256 * MIB;
    w.hand_over_unaccepted(base, 4 * UNIT, 0);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(base, 4 * UNIT).unwrap();
    w.accepted_behind_the_guests_back(base + 2 * UNIT, UNIT, 0);
    let before = e.counters();
    let shootdowns = w.m.tlb.count.load(std::sync::atomic::Ordering::Relaxed);
    let err = e.accept(base + UNIT, UNIT).unwrap_err();
    assert!(
        matches!(
            err,
            AcceptMemoryError::Platform {
                error: PlatformError::Accept(AcceptError::AlreadyAccepted { .. }),
                pa,
                poisoned: 512,
                accepted: 1,
                left_mapped: false,
            } if pa == base + 2 * UNIT
        ),
        "the guard unit fails: {err:?}"
    );
    let bad = base + 2 * UNIT..base + 3 * UNIT;
    assert!(bad
        .clone()
        .step_by(PAGE as usize)
        .all(|pa| e.state(pa) == Some(PageState::Poisoned)));
    assert_eq!(
        mapped(|va| e.translate(va), bad.start, bad.end),
        Vec::<u64>::new(),
        "a poisoned frame is still mapped"
    );
    assert_eq!(
        mapped(|va| e.translate(va), base, bad.start).len() as u64,
        2 * UNIT / PAGE,
        "the units before it stay mapped"
    );
    assert_eq!(
        mapped(|va| e.translate(va), bad.end, bad.end + UNIT).len() as u64,
        UNIT / PAGE,
        "the unit after it stays mapped"
    );
    assert_eq!(e.translate(DIRECT_MAP_VA), Some(0), "the rest of the 1 GiB leaf too");
    let c = e.counters().since(&before);
    assert_eq!((c.splits_1g, c.splits_2m, c.table_pages_taken), (1, 0, 1), "{c:?}");
    assert_eq!(
        w.m.tlb.count.load(std::sync::atomic::Ordering::Relaxed),
        shootdowns + 1,
        "one shootdown"
    );
    let last = w.m.tlb.last.lock().unwrap().clone();
    assert!(
        last.iter()
            .any(|r| r.va <= DIRECT_MAP_VA + bad.start && r.va + r.len >= DIRECT_MAP_VA + bad.end),
        "the shootdown covers the poisoned unit: {last:x?}"
    );
    assert_eq!(
        e.accept(bad.start, PAGE),
        Err(AcceptMemoryError::Poisoned { pa: bad.start })
    );
}

/// In GiB 1 the direct map has 2 MiB leaves: the failed unit's own leaf
/// goes not present, with no split and no table page.
#[test]
fn snp_a_unit_the_host_never_assigned_is_not_present_after_it_fails() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let base = 1024 * MIB;
    w.snp.set_rmp(base, 4 * UNIT, RmpEntry::default());
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(base, 4 * UNIT).unwrap();
    w.snp.set_hostile(Some(SnpHostile::PscSuccessWithoutRmpChange));
    let before = e.counters();
    let err = e.accept(base + UNIT + PAGE, PAGE).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, poisoned: 512, left_mapped: false, .. } if pa == base + UNIT),
        "{err:?}"
    );
    assert!(mapped(|va| e.translate(va), base + UNIT, base + 2 * UNIT).is_empty());
    assert_eq!(
        mapped(|va| e.translate(va), base, base + UNIT).len() as u64,
        UNIT / PAGE
    );
    assert_eq!(
        mapped(|va| e.translate(va), base + 2 * UNIT, base + 4 * UNIT).len() as u64,
        2 * UNIT / PAGE
    );
    let c = e.counters().since(&before);
    assert_eq!((c.splits_1g, c.splits_2m, c.table_pages_taken), (0, 0, 0), "{c:?}");
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// An edge of a recorded range (less than a unit) fails part way: TDX
/// says exactly where, so only the frames from there on are poisoned, and
/// only those are unmapped, page by page.
#[test]
fn a_failed_edge_is_unmapped_from_the_failing_page_on() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let base = 1024 * MIB;
    w.hand_over_unaccepted(base, 2 * UNIT, 0);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    // The tail edge [base + UNIT, base + UNIT + 16 pages); its sixth page
    // accepted behind the guest's back.
    let tail = base + UNIT;
    w.accepted_behind_the_guests_back(tail + 5 * PAGE, PAGE, 0);
    let err = e.record_unaccepted(base, UNIT + 16 * PAGE).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, poisoned: 11, left_mapped: false, .. } if pa == tail + 5 * PAGE),
        "{err:?}"
    );
    assert_eq!(
        mapped(|va| e.translate(va), tail, tail + UNIT),
        (tail..tail + 5 * PAGE)
            .step_by(PAGE as usize)
            .chain((tail + 16 * PAGE..tail + UNIT).step_by(PAGE as usize))
            .collect::<Vec<_>>(),
        "exactly the 11 poisoned frames are unmapped"
    );
    assert_eq!(e.state(tail + 4 * PAGE), Some(PageState::Private));
    assert_eq!(e.state(tail + 5 * PAGE), Some(PageState::Poisoned));
    assert_eq!(e.state(tail + 16 * PAGE), Some(PageState::Private));
    assert_eq!(
        mapped(|va| e.translate(va), base, tail).len() as u64,
        UNIT / PAGE,
        "the recorded unit"
    );
}

/// A registered alias of the failed unit goes not present with the direct
/// map.
#[test]
fn a_registered_alias_of_a_failed_unit_is_not_present_either() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let base = 1024 * MIB;
    w.hand_over_unaccepted(base, 2 * UNIT, 0);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(base, 2 * UNIT).unwrap();
    w.m.builder().map(
        ALIAS_VA,
        base,
        2 * UNIT,
        Level::Pd,
        DIRECT_MAP_FLAGS,
        Visibility::Private,
    );
    e.register_alias(Alias {
        va: ALIAS_VA,
        pa: base,
        len: 2 * UNIT,
    })
    .unwrap();
    assert_eq!(e.translate(ALIAS_VA + UNIT), Some(base + UNIT), "the OS maps it");
    w.accepted_behind_the_guests_back(base + UNIT, UNIT, 0);
    let err = e.accept(base, UNIT).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, left_mapped: false, .. } if pa == base + UNIT),
        "{err:?}"
    );
    assert!((0..UNIT)
        .step_by(PAGE as usize)
        .all(|off| e.translate(ALIAS_VA + UNIT + off).is_none()));
    assert_eq!(e.translate(ALIAS_VA + UNIT - PAGE), Some(base + UNIT - PAGE));
}

/// No table page for the split: the failure says the frames are left
/// mapped, and the tables are exactly as they were.
#[test]
fn without_a_table_page_the_failed_unit_is_reported_left_mapped() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let base = 256 * MIB;
    w.hand_over_unaccepted(base, 2 * UNIT, 0);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(base, 2 * UNIT).unwrap();
    w.accepted_behind_the_guests_back(base, UNIT, 0);
    w.m.frames.set_allowance(Some(0));
    let tables_before = w.m.snapshot().tables;
    let err = e.accept(base, PAGE).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, poisoned: 512, left_mapped: true, .. } if pa == base),
        "{err:?}"
    );
    assert!(err.to_string().contains("left mapped"), "{err}");
    assert_eq!(w.m.snapshot().tables, tables_before, "no table changed");
    assert_eq!(
        e.state(base),
        Some(PageState::Poisoned),
        "still poisoned, never handed out"
    );
    assert_eq!(w.m.frames.in_use(), 0, "no table page kept");
}

/// PVALIDATE goes in address order and says where it failed: the units of
/// the same call before that point are accepted, not poisoned with it.
#[test]
fn snp_a_failure_in_a_guard_unit_keeps_the_unit_before_it_accepted() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let base = 1024 * MIB;
    w.hand_over_unvalidated(base, 2 * UNIT);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    e.record_unaccepted(base, 2 * UNIT).unwrap();
    // The guard unit validated behind the guest's back, and the page state
    // change that would reset it only pretends.
    w.validated_behind_the_guests_back(base + UNIT, UNIT);
    w.snp.set_hostile(Some(SnpHostile::PscSuccessWithoutRmpChange));
    let before = e.counters();
    let err = e.accept(base, UNIT).unwrap_err();
    assert_eq!(e.counters().since(&before).psc_exits, 1, "both units in one call");
    assert!(
        matches!(
            err,
            AcceptMemoryError::Platform { pa, poisoned: 512, accepted: 1, left_mapped: false, .. } if pa == base + UNIT
        ),
        "{err:?}"
    );
    assert!((base..base + UNIT)
        .step_by(PAGE as usize)
        .all(|pa| e.state(pa) == Some(PageState::Private) && w.snp.rmp(pa).validated));
    assert!(!e.unaccepted().unwrap().is_unaccepted(base / UNIT));
    assert!(e.unaccepted().unwrap().is_unaccepted(base / UNIT + 1));
    assert_eq!(
        mapped(|va| e.translate(va), base, base + UNIT).len() as u64,
        UNIT / PAGE
    );
    assert!(mapped(|va| e.translate(va), base + UNIT, base + 2 * UNIT).is_empty());
    assert!(w.snp.unevicted().is_empty(), "the accepted unit's cache lines evicted");
}

/// As on TDX, an SEV-SNP edge fails exactly where PVALIDATE says.
#[test]
fn snp_a_failed_edge_is_unmapped_from_the_failing_page_on() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let base = 1024 * MIB;
    w.hand_over_unvalidated(base, 2 * UNIT);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    w.boot_ghcb(&e, GHCB_PA);
    let tail = base + UNIT;
    w.validated_behind_the_guests_back(tail + 5 * PAGE, PAGE);
    w.snp.set_hostile(Some(SnpHostile::PscSuccessWithoutRmpChange));
    let err = e.record_unaccepted(base, UNIT + 16 * PAGE).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, poisoned: 11, left_mapped: false, .. } if pa == tail + 5 * PAGE),
        "{err:?}"
    );
    assert_eq!(e.state(tail + 4 * PAGE), Some(PageState::Private));
    assert!(w.snp.rmp(tail + 4 * PAGE).validated);
    assert_eq!(e.state(tail + 5 * PAGE), Some(PageState::Poisoned));
    assert_eq!(
        mapped(|va| e.translate(va), tail, tail + 16 * PAGE),
        (tail..tail + 5 * PAGE).step_by(PAGE as usize).collect::<Vec<_>>()
    );
}
