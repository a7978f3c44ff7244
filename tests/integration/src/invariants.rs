//! The engine contract's end-of-run invariants, for tests that run
//! conversions concurrently and check the machine once they are done.

use std::collections::BTreeSet;
use std::ops::Range;

use coco_convert::{Census, PageState, Visibility};

use crate::world::{Machine, CPUS, TABLES};

/// Every present mapping agrees with the host and with the engine's
/// state, nothing is left converting, every reachable table page is held
/// and only the window tables are held besides, and the watch saw no table
/// freed before a shootdown.
///
/// # Panics
///
/// On the first broken invariant, naming it.
pub fn assert_consistent(
    m: &Machine,
    state: impl Fn(u64) -> Option<PageState>,
    host: impl Fn(u64) -> Option<Visibility>,
    census: Census,
) {
    assert_eq!(census.converting, 0, "nothing left converting");
    assert_consistent_over(m, 0..m.size(), state, host);
}

/// As [`assert_consistent`], for the frames in `frames` only (a schedule
/// explorer counts every read of a state byte as a step), without the
/// census.
///
/// # Panics
///
/// On the first broken invariant, naming it.
pub fn assert_consistent_over(
    m: &Machine,
    frames: Range<u64>,
    state: impl Fn(u64) -> Option<PageState>,
    host: impl Fn(u64) -> Option<Visibility>,
) {
    for map in m.page_tables().mappings(&m.mem) {
        if map.va >= m.direct_va(TABLES) && map.va < m.direct_va(m.size()) {
            continue; // the page-table pages themselves
        }
        let side = m.enc.side_of(if map.enc_set { m.enc.mask() } else { 0 });
        let first = map.pa.max(frames.start);
        let end = (map.pa + map.size).min(frames.end);
        for pa in (first..end).step_by(4096) {
            assert_eq!(host(pa), Some(side), "host disagrees with the mapping {map:x?}");
            assert_eq!(state(pa), Some(PageState::of(side)), "state disagrees with {map:x?}");
        }
    }
    let reachable: BTreeSet<u64> = m.tables_with_regions().into_keys().collect();
    let held = m.table_frames_held();
    assert!(reachable.is_subset(&held), "a reachable table is not held");
    assert_eq!(
        held.len(),
        reachable.len() + CPUS,
        "only the window tables are held unreachable"
    );
    let watched = m.watch.violations();
    assert!(watched.is_empty(), "{watched:?}");
}
