//! Five-level paging (LA57): the engine on tables whose root is a PML5,
//! every mapping at an address only 57-bit paging translates, checked by
//! the models' own 5-level walker.

use coco_convert::{Alias, AliasError, ConvertError, Level, PageState, Paging, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig};
use integration::invariants::assert_consistent;
use integration::sim::Layout;
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, DIRECT_MAP_FLAGS, TABLES};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

/// A TD with GPAW 52, as one that uses LA57 has.
fn tdx(layout: Layout) -> TdxWorld {
    let config = TdxConfig {
        gpaw: 52,
        ..TdxConfig::default()
    };
    TdxWorld::with_machine(config, |enc| Machine::new_in(layout, enc, Shape::Mixed, TABLES))
}

fn snp(layout: Layout) -> SnpWorld {
    SnpWorld::with_machine(SnpConfig::default(), |enc| {
        Machine::new_in(layout, enc, Shape::Mixed, TABLES)
    })
}

#[test]
fn the_five_level_layout_is_beyond_four_level_reach() {
    let five = Layout::FIVE;
    for va in [five.direct_map, five.vmalloc, five.alias, five.windows] {
        assert!(
            Paging::Five.is_canonical(va) && !Paging::Four.is_canonical(va),
            "{va:#x}"
        );
    }
    let w = tdx(five);
    let four = hvmock::GuestPageTables {
        la57: false,
        ..w.m.page_tables()
    };
    assert!(w.m.page_tables().translate(&w.m.mem, five.direct_map).is_some());
    assert!(
        four.mappings(&w.m.mem).iter().all(|m| m.va != five.direct_map),
        "read with four levels, the tables map something else"
    );
}

#[test]
fn one_page_in_a_1g_leaf_splits_and_collapses_under_a_pml5() {
    let w = tdx(Layout::FIVE);
    let (e, m) = (w.engine(), &w.m);
    let pa = 5 * MIB + 3 * PAGE;
    e.convert(
        Target::Virtual {
            va: m.direct_va(pa),
            len: PAGE,
        },
        Visibility::Shared,
    )
    .unwrap();
    let c = e.counters();
    assert_eq!((c.splits_1g, c.splits_2m, c.map_gpa, c.shootdowns), (1, 1, 1, 1));
    let tables = m.page_tables();
    let shared = tables.translate(&m.mem, m.direct_va(pa)).unwrap();
    assert!(shared.enc_set && shared.size == PAGE && shared.pa == pa);
    let neighbour = tables.translate(&m.mem, m.direct_va(pa + PAGE)).unwrap();
    assert!(!neighbour.enc_set && neighbour.size == PAGE);
    assert_eq!(w.host_side(pa), Some(Visibility::Shared));
    assert_consistent(m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());

    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    e.release_deferred_tables();
    let c = e.counters();
    assert_eq!((c.collapses_2m, c.collapses_1g), (1, 1));
    assert_eq!(tables.translate(&m.mem, m.direct_va(pa)).unwrap().size, GIB);
    assert_consistent(m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
    assert!(m.watch.violations().is_empty(), "{:?}", m.watch.violations());
}

#[test]
fn snp_validates_through_a_window_under_a_pml5() {
    let w = snp(Layout::FIVE);
    let (e, m) = (w.engine(), &w.m);
    w.boot_ghcb(&e, 1536 * MIB);
    // 2 MiB-aligned frames and a ragged tail: 2 MiB and 4 KiB PVALIDATE,
    // both through this CPU's window.
    let (pa, len) = (GIB + 64 * MIB, 2 * MIB + 3 * PAGE);
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
    let before = e.counters();
    e.convert(Target::Physical { pa, len }, Visibility::Private).unwrap();
    e.release_deferred_tables();
    assert!(
        e.counters().since(&before).pvalidate > 0,
        "validated through the window"
    );
    assert!((pa..pa + len)
        .step_by(PAGE as usize)
        .all(|f| w.host_side(f) == Some(Visibility::Private)));
    let window = m.windows.slot_of(0);
    assert_eq!(
        m.page_tables().translate(&m.mem, window.va),
        None,
        "the window maps nothing between conversions"
    );
    assert_consistent(m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

#[test]
fn a_lower_half_alias_converts_with_its_frames_under_a_pml5() {
    let w = tdx(Layout::FIVE);
    let (e, m) = (w.engine(), &w.m);
    let alias = Alias {
        va: m.layout.alias,
        pa: GIB + 200 * MIB,
        len: 4 * MIB,
    };
    m.builder().map(
        alias.va,
        alias.pa,
        alias.len,
        Level::Pd,
        DIRECT_MAP_FLAGS,
        Visibility::Private,
    );
    let id = e.register_alias(alias).unwrap();
    let pa = alias.pa + MIB;
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared)
        .unwrap();
    let tables = m.page_tables();
    let through_alias = tables.translate(&m.mem, alias.va + MIB).unwrap();
    assert!(through_alias.enc_set && through_alias.pa == pa);
    assert!(tables.translate(&m.mem, m.direct_va(pa)).unwrap().enc_set);
    assert_consistent(m, |pa| e.state(pa), |pa| w.host_side(pa), e.census());
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    assert_eq!(e.unregister_alias(id), Some(alias));
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
}

/// Contract, "Addresses": canonical means 48 bits with four levels, 57
/// with five; a range must not cross the hole between the halves.
#[test]
fn the_canonical_hole_follows_the_paging_depth() {
    // Five levels: the last lower-half page and the first upper-half one,
    // both mapped; a range across the hole between them is refused and
    // changes nothing.
    let w = tdx(Layout::FIVE);
    let (e, m) = (w.engine(), &w.m);
    let (user, kernel) = (0x00FF_FFFF_FFFF_F000u64, 0xFF00_0000_0000_0000u64);
    let (u, k) = (GIB + 50 * MIB, GIB + 60 * MIB);
    let mut b = m.builder();
    b.map(user, u, PAGE, Level::Pt, DIRECT_MAP_FLAGS, Visibility::Private);
    b.map(kernel, k, PAGE, Level::Pt, DIRECT_MAP_FLAGS, Visibility::Private);
    let before = m.snapshot();
    let across = Target::Virtual {
        va: user,
        len: 2 * PAGE,
    };
    assert!(matches!(
        e.convert(across, Visibility::Shared),
        Err(ConvertError::InvalidRange { .. })
    ));
    assert!(m.snapshot() == before, "{:?}", before.first_difference(&m.snapshot()));
    // Each page alone is canonical with five levels: both convert.
    for (va, pa) in [(user, u), (kernel, k)] {
        e.convert(Target::Virtual { va, len: PAGE }, Visibility::Shared)
            .unwrap();
        assert_eq!(e.state(pa), Some(PageState::Shared), "{va:#x}");
    }
    assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());

    // Four levels: the same addresses are not canonical; the 5-level
    // direct map's address is refused as a target and as an alias.
    let w = tdx(Layout::FOUR);
    let e = w.engine();
    for va in [user, kernel, Layout::FIVE.direct_map] {
        assert!(
            matches!(
                e.convert(Target::Virtual { va, len: PAGE }, Visibility::Shared),
                Err(ConvertError::InvalidRange { .. })
            ),
            "{va:#x}"
        );
    }
    let la57_alias = Alias {
        va: Layout::FIVE.alias,
        pa: GIB,
        len: 2 * MIB,
    };
    assert_eq!(e.register_alias(la57_alias), Err(AliasError::Invalid));
    assert_eq!(tdx(Layout::FIVE).engine().register_alias(la57_alias), Ok(0));
}
