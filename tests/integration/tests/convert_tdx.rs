//! The engine on TDX: the transaction against the TDX model, on real
//! page-table formats in simulated memory.

use coco_convert::{ConvertError, PageState, Target, Visibility};
use hvmock::{TdxConfig, TdxPageState};
use integration::world::{Machine, Shape, TdxWorld};
use integration::{GIB, MIB};

fn world() -> TdxWorld {
    TdxWorld::new(TdxConfig::default(), Shape::Mixed)
}

#[test]
fn one_page_in_a_1g_leaf_splits_twice_and_collapses_back() {
    let w = world();
    let e = w.engine();
    let pa = 5 * MIB + 3 * 4096;
    e.convert(Target::Physical { pa, len: 4096 }, Visibility::Shared)
        .unwrap();
    let c = e.counters();
    assert_eq!((c.splits_1g, c.splits_2m), (1, 1));
    assert_eq!(c.table_pages_net(), 2);
    assert_eq!(c.map_gpa, 1);
    assert_eq!(c.shootdowns, 1);
    assert_eq!(w.tdx.page(pa).state, TdxPageState::Shared);
    assert_eq!(e.state(pa), Some(PageState::Shared));
    // The shared mapping carries the shared bit; its neighbours do not.
    let tables = w.m.page_tables();
    let shared = tables.translate(&w.m.mem, Machine::direct(pa)).unwrap();
    assert!(shared.enc_set && shared.size == 4096 && shared.pa == pa);
    let neighbour = tables.translate(&w.m.mem, Machine::direct(pa + 4096)).unwrap();
    assert!(!neighbour.enc_set && neighbour.size == 4096);
    assert_eq!(
        tables.translate(&w.m.mem, Machine::direct(pa + 4 * MIB)).unwrap().size,
        2 * MIB
    );

    e.convert(Target::Physical { pa, len: 4096 }, Visibility::Private)
        .unwrap();
    let c = e.counters();
    assert_eq!((c.collapses_2m, c.collapses_1g), (1, 1));
    assert_eq!(c.accept, 1);
    e.release_deferred_tables();
    assert_eq!(e.counters().table_pages_net(), 0);
    assert_eq!(w.m.frames.in_use(), 0, "no table page leaked");
    assert_eq!(w.m.os_frames.in_use(), w.m.boot_tables, "the OS tables untouched");
    assert_eq!(
        tables.translate(&w.m.mem, Machine::direct(pa)).unwrap().size,
        GIB,
        "back to one 1 GiB page"
    );
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

#[test]
fn aligned_huge_ranges_change_as_one_entry() {
    let w = world();
    let e = w.engine();
    // A 2 MiB-aligned 2 MiB in the 2 MiB-mapped half: no split.
    e.convert(
        Target::Physical {
            pa: GIB + 4 * MIB,
            len: 2 * MIB,
        },
        Visibility::Shared,
    )
    .unwrap();
    let c = e.counters();
    assert_eq!((c.splits_1g, c.splits_2m, c.pte_writes), (0, 0, 2));
    // The whole 1 GiB page: no split either.
    e.convert(Target::Physical { pa: 0, len: GIB }, Visibility::Shared)
        .unwrap();
    let c = e.counters();
    assert_eq!((c.splits_1g, c.splits_2m, c.pte_writes), (0, 0, 4));
    assert_eq!(c.map_gpa, 2);
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn a_2m_range_inside_a_1g_leaf_splits_only_the_1g() {
    let w = world();
    let e = w.engine();
    e.convert(
        Target::Physical {
            pa: 6 * MIB,
            len: 2 * MIB,
        },
        Visibility::Shared,
    )
    .unwrap();
    let c = e.counters();
    assert_eq!((c.splits_1g, c.splits_2m, c.table_pages_net()), (1, 0, 1));
    e.convert(
        Target::Physical {
            pa: 6 * MIB,
            len: 2 * MIB,
        },
        Visibility::Private,
    )
    .unwrap();
    let c = e.counters();
    assert_eq!((c.collapses_2m, c.collapses_1g), (0, 1));
    // ACCEPT of the 2 MiB in one call: the VMM mapped it 2 MiB.
    assert_eq!(c.accept, 1);
}

#[test]
fn wrong_state_is_refused_before_anything_changes() {
    let w = world();
    let e = w.engine();
    let err = e
        .convert(Target::Physical { pa: 0, len: 4096 }, Visibility::Private)
        .unwrap_err();
    assert_eq!(
        err,
        ConvertError::Refused {
            pa: 0,
            state: PageState::Private,
        }
    );
    assert_eq!(e.counters().hypercalls(), 0);
    assert_eq!(e.counters().splits_1g, 0);
    assert_eq!(w.m.frames.in_use(), 0);
}
