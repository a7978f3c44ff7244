//! Deferred collapse: with `Collapse::OnCompact` conversions leave the
//! direct map split (as an engine that never collapses would), and
//! `Engine::compact` gives it its huge leaves back, frees the tables it
//! replaced after one shootdown, and leaves alone every region that is
//! mixed or that the OS made different.

use coco_convert::bits::WRITABLE;
use coco_convert::{Collapse, Level, Target, Visibility};
use hvmock::TdxConfig;
use integration::world::{Machine, Shape, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

/// `[0, 1 GiB)` one 1 GiB page, `[1 GiB, 2 GiB)` 2 MiB pages; collapse on
/// compaction only.
fn deferred() -> TdxWorld {
    TdxWorld::with_machine(TdxConfig::default(), |enc| {
        let mut m = Machine::new(enc, Shape::Mixed);
        m.collapse = Collapse::OnCompact;
        m
    })
}

fn leaf_size(w: &TdxWorld, pa: u64) -> u64 {
    w.m.page_tables()
        .translate(&w.m.mem, Machine::direct(pa))
        .expect("mapped")
        .size
}

fn there_and_back(e: &integration::world::TdxEngine<'_>, pa: u64, len: u64) {
    e.convert(Target::Physical { pa, len }, Visibility::Shared).unwrap();
    e.convert(Target::Physical { pa, len }, Visibility::Private).unwrap();
}

#[test]
fn conversions_leave_the_split_and_compact_takes_it_back_to_one_gib() {
    let w = deferred();
    let e = w.engine();
    let pa = GIB + 20 * MIB + 7 * PAGE;
    there_and_back(&e, pa, PAGE);
    there_and_back(&e, pa + 3 * PAGE, PAGE);
    let c = e.counters();
    assert_eq!(
        (c.splits_2m, c.collapses_2m, c.collapses_1g),
        (1, 0, 0),
        "split once, not collapsed"
    );
    assert_eq!(leaf_size(&w, pa), PAGE);
    let shootdowns = c.shootdowns;

    let report = e.compact();
    assert_eq!((report.collapses_2m, report.collapses_1g), (1, 1));
    assert_eq!(leaf_size(&w, pa), GIB, "the 2 MiB leaves of the OS's GiB became one");
    let c = e.counters();
    assert_eq!(
        c.shootdowns,
        shootdowns + 1,
        "one shootdown frees what compaction replaced"
    );
    assert_eq!(
        c.table_pages_net(),
        0,
        "the engine's table went back to its frame source"
    );
    assert_eq!(
        c.os_tables_retired, 1,
        "the OS's table under the GiB went back to the OS"
    );
    assert!(w.tdx.violations().is_empty());
    let v = w.m.watch.violations();
    assert!(v.is_empty(), "{v:?}");
    // Nothing more to do: a second compaction changes nothing.
    let snapshot = w.m.snapshot();
    assert_eq!(e.compact(), Default::default());
    assert!(w.m.snapshot() == snapshot);
}

#[test]
fn a_region_with_a_shared_frame_stays_split() {
    let w = deferred();
    let e = w.engine();
    let pa = GIB + 40 * MIB;
    e.convert(Target::Physical { pa, len: 2 * PAGE }, Visibility::Shared)
        .unwrap();
    e.convert(Target::Physical { pa, len: PAGE }, Visibility::Private)
        .unwrap();
    assert_eq!(e.compact(), Default::default());
    let shared =
        w.m.page_tables()
            .translate(&w.m.mem, Machine::direct(pa + PAGE))
            .unwrap();
    assert!(shared.enc_set && shared.size == PAGE);
    assert_eq!(leaf_size(&w, pa + 2 * MIB), 2 * MIB, "the neighbours untouched");
}

#[test]
fn an_entry_the_os_changed_keeps_its_region_split() {
    let w = deferred();
    let e = w.engine();
    let pa = GIB + 60 * MIB;
    there_and_back(&e, pa, PAGE);
    // The OS makes one page of the region read-only, as it may through
    // the table lock.
    let va = Machine::direct(pa + 100 * PAGE);
    let pt = w.m.builder().table_at(va, Level::Pt);
    let slot = pt + 8 * Level::Pt.index(va) as u64;
    e.with_table_lock(|| w.m.mem.write_u64(slot, w.m.mem.read_u64(slot) & !WRITABLE));
    let report = e.compact();
    assert_eq!(report.collapses_2m, 0, "{report:?}");
    assert_eq!(leaf_size(&w, pa), PAGE);
    assert_eq!(w.m.mem.read_u64(slot) & WRITABLE, 0, "the OS's change stands");
}

#[test]
fn a_vmalloc_huge_leaf_the_engine_split_collapses_with_its_conversion() {
    let w = deferred();
    let e = w.engine();
    // A 2 MiB vmalloc-style leaf over frames at 1 GiB + 80 MiB.
    let frames = GIB + 80 * MIB;
    let va = w.m.vmalloc_area(2 * MIB);
    w.m.map_pieces(va, &[(frames, Level::Pd)]);
    let size_at = |va| w.m.page_tables().translate(&w.m.mem, va).unwrap().size;
    let part = Target::Virtual {
        va: va + 16 * PAGE,
        len: PAGE,
    };
    e.convert(part, Visibility::Shared).unwrap();
    assert_eq!(size_at(va), PAGE, "split to convert one page");
    e.convert(part, Visibility::Private).unwrap();
    // Nothing else could find that table later: it goes back at once,
    // while the direct map waits for compaction.
    assert_eq!(size_at(va), 2 * MIB);
    assert_eq!(leaf_size(&w, frames + 16 * PAGE), PAGE);
    let report = e.compact();
    assert_eq!(report.collapses_2m, 1, "{report:?}");
    assert_eq!(leaf_size(&w, frames), GIB);
}
