//! Every alias of every frame goes not-present together: a vmalloc
//! buffer's scattered frames and their direct-map aliases, registered
//! aliases; and the models' check catches a mapping the engine was not
//! told about.

use coco_convert::{Alias, PageState, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig};
use integration::sim::ALIAS_VA;
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, DIRECT_MAP_FLAGS};
use integration::{GIB, MIB};

/// Scattered frames: every 7th page from `start`, `n` of them, plus one
/// run of 3 contiguous frames.
fn scattered(start: u64, n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(|i| start + i * 7 * 4096).collect();
    v.extend([start + 5000 * 4096, start + 5001 * 4096, start + 5002 * 4096]);
    v
}

#[test]
fn vmalloc_buffer_converts_its_direct_map_aliases_tdx() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let frames = scattered(3 * MIB, 300);
    let va = w.m.vmalloc(&frames);
    let tables_before = w.m.frames.in_use();
    let len = frames.len() as u64 * 4096;
    let report = e.convert(Target::Virtual { va, len }, Visibility::Shared).unwrap();
    assert_eq!(report.frames, 303, "distinct frames converted");
    let tables = w.m.page_tables();
    for (i, &pa) in frames.iter().enumerate() {
        assert!(
            tables.translate(&w.m.mem, va + i as u64 * 4096).unwrap().enc_set,
            "vmalloc alias shared"
        );
        assert!(
            tables.translate(&w.m.mem, Machine::direct(pa)).unwrap().enc_set,
            "direct-map alias shared"
        );
        assert_eq!(e.state(pa), Some(PageState::Shared));
    }
    let c = e.counters();
    // One MapGPA per contiguous physical run: 300 single frames + 1 run.
    assert_eq!(c.map_gpa, 301);
    assert_eq!(c.shootdowns, 1, "the whole buffer is one transaction");
    e.convert(Target::Virtual { va, len }, Visibility::Private).unwrap();
    e.release_deferred_tables();
    assert_eq!(
        w.m.frames.in_use(),
        tables_before,
        "direct map collapsed back, no table leaked"
    );
    assert_eq!(
        tables.translate(&w.m.mem, Machine::direct(frames[0])).unwrap().size,
        GIB
    );
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

#[test]
fn vmalloc_buffer_converts_its_direct_map_aliases_snp() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, 1536 * MIB);
    let frames = scattered(GIB + 3 * MIB, 200);
    let va = w.m.vmalloc(&frames);
    let len = frames.len() as u64 * 4096;
    let before = e.counters();
    e.convert(Target::Virtual { va, len }, Visibility::Shared).unwrap();
    let c = e.counters().since(&before);
    assert_eq!(c.psc_entries, 203);
    assert_eq!(c.psc_exits, 1, "203 entries fit one descriptor");
    assert_eq!(c.pvalidate, 203);
    e.convert(Target::Virtual { va, len }, Visibility::Private).unwrap();
    assert!(frames.iter().all(|&pa| w.snp.rmp(pa).validated));
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

#[test]
fn registered_alias_is_converted_in_the_same_transaction() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    // A kernel-image-like alias of [GIB + 8 MiB, +4 MiB), 2 MiB pages.
    let (pa, len) = (GIB + 8 * MIB, 4 * MIB);
    w.m.builder().map(
        ALIAS_VA,
        pa,
        len,
        coco_convert::Level::Pd,
        DIRECT_MAP_FLAGS,
        Visibility::Private,
    );
    e.register_alias(Alias { va: ALIAS_VA, pa, len }).unwrap();
    e.convert(
        Target::Physical {
            pa: pa + MIB,
            len: 4096,
        },
        Visibility::Shared,
    )
    .unwrap();
    let tables = w.m.page_tables();
    assert!(tables.translate(&w.m.mem, ALIAS_VA + MIB).unwrap().enc_set);
    assert!(!tables.translate(&w.m.mem, ALIAS_VA + MIB + 4096).unwrap().enc_set);
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

/// The check inside the model is real: a mapping the engine does not know
/// about stays present through the hypercall and is reported.
#[test]
fn an_unregistered_alias_is_caught_by_the_model() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pa = GIB + 20 * MIB;
    w.m.builder().map(
        ALIAS_VA,
        pa,
        2 * MIB,
        coco_convert::Level::Pd,
        DIRECT_MAP_FLAGS,
        Visibility::Private,
    );
    e.convert(Target::Physical { pa, len: 4096 }, Visibility::Shared)
        .unwrap();
    let v = w.tdx.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].call, v[0].mapping.va), ("MapGPA", ALIAS_VA));
}
