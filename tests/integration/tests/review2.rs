//! Regression tests from a second hostile review of the conversion engine
//! (after the fixes of the first round, `review.rs`): each failed against
//! the commit reviewed, and passes since the fix.

#![allow(clippy::too_many_lines)]

use coco_convert::{ConvertError, PageState, Target, Visibility};
use hvmock::{TdxConfig, TdxHostile, TdxPageState};
use integration::world::{Machine, Shape, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

fn tdx(shape: Shape) -> TdxWorld {
    TdxWorld::new(TdxConfig::default(), shape)
}

// ---------------------------------------------------------------------
// Contract, "What the engine may change": "It never makes present an entry
// of a poisoned frame"; "Results": `Platform`: "The frames of the failed
// call ... are poisoned: their mappings stay not present"; "every other
// frame of the call is as before".
//
// What happens: since runs are joined across scratch chunks
// (`for_each_run`, engine/transaction.rs), a direct-map 2 MiB leaf that
// lies wholly inside a run of contiguous frames is no longer split even
// when the run's frames go to the host in two different calls (a chunk
// edge inside the leaf). If one of those calls fails, the leaf holds
// frames with different fates. `restore_all` then restores the direct map
// run by run through `leaves::restore`, which makes the WHOLE not-present
// huge leaf present as soon as a run's first frame lies in it, with that
// run's attribute: poisoned frames are mapped present again (with the
// shared bit when the other part of the leaf was converted, with the old
// attribute when it never reached the host). `poison_mixed_leaves` only
// looks at huge leaves of the vmalloc-style range, not at the direct
// map's.
//
// The buffer: 5120 contiguous frames from 4 KiB into a 2 MiB direct-map
// leaf, mapped with 4 KiB pages; a one-extent scratch cuts it at 16 MiB,
// i.e. one frame into the direct-map leaf at +116 MiB.
#[test]
fn a_poisoned_frame_is_never_mapped_present_in_the_direct_map() {
    let mut failures = Vec::new();
    for fail_first_call in [false, true] {
        let w = tdx(Shape::Mixed);
        let e = w.engine();
        let m = &w.m;
        let p = GIB + 100 * MIB + PAGE;
        let frames: Vec<u64> = (0..5120).map(|i| p + i * PAGE).collect();
        let va = m.vmalloc(&frames);
        let len = frames.len() as u64 * PAGE;
        if fail_first_call {
            w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
        } else {
            w.tdx.set_hostile_after(1, TdxHostile::NoProgressForever);
        }
        let err = e
            .convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut [0; 1])
            .unwrap_err();
        assert!(matches!(err, ConvertError::Platform { .. }), "{err:?}");
        let t = m.page_tables();
        let present: Vec<(u64, bool)> = frames
            .iter()
            .filter(|&&f| e.state(f) == Some(PageState::Poisoned))
            .filter_map(|&f| t.translate(&m.mem, Machine::direct(f)).map(|x| (f, x.enc_set)))
            .collect();
        if let Some(&(first, shared)) = present.first() {
            failures.push(format!(
                "failing call {}: {} poisoned frames mapped present in the direct map, first {first:#x} \
                 (shared bit {shared}); host says {:?}; {err:?}",
                if fail_first_call { 1 } else { 2 },
                present.len(),
                w.tdx.page(first).state,
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------
// Contract, "What the engine may change": "It restores exactly the entries
// it made not present, with the new encryption bit (or the old one for
// frames the host never saw)"; "Results": `Platform`: "every other frame of
// the call is as before".
//
// What happens (same root cause as the test above, in a 1 GiB direct-map
// leaf, which can hold a whole host call): a vmalloc-style buffer maps the
// frames of [0, 1 GiB) with 4 KiB pages, so the run is the direct map's
// 1 GiB leaf exactly and it is not split. A one-extent scratch sends it in
// 64 calls of 16 MiB; the 11th fails. `restore_all` restores the run of
// converted frames [0, 160 MiB) through `leaves::restore`, which makes the
// whole 1 GiB leaf present with the SHARED bit: 848 MiB of frames the host
// never saw (private, accepted, state `Private`) are mapped shared in the
// direct map — everything the kernel writes there goes to host-visible
// memory — and the 16 MiB of poisoned frames are mapped too.
#[test]
fn frames_the_host_never_saw_keep_the_old_attribute_in_the_direct_map() {
    let w = tdx(Shape::Mixed);
    w.tdx.set_alias_check(false); // 64 calls over a million mappings: slow, and not the point
    let e = w.engine();
    let m = &w.m;
    let frames: Vec<u64> = (0..GIB / PAGE).map(|i| i * PAGE).collect();
    let va = m.vmalloc(&frames);
    let len = GIB;
    w.tdx.set_hostile_after(10, TdxHostile::NoProgressForever);
    let err = e
        .convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, &mut [0; 1])
        .unwrap_err();
    let ConvertError::Platform { converted, .. } = err else {
        panic!("{err:?}")
    };
    // The 1 GiB direct-map leaf now holds frames the host converted,
    // frames of the failed call and frames it never saw: one entry cannot
    // map them all, so the whole leaf is poisoned, and reported so.
    let ConvertError::Platform { poisoned, .. } = err else {
        unreachable!()
    };
    let states: Vec<Option<PageState>> = frames.iter().map(|&f| e.state(f)).collect();
    let count = |s| states.iter().filter(|&&x| x == Some(s)).count() as u64;
    assert_eq!(
        (count(PageState::Shared), count(PageState::Poisoned)),
        (converted, poisoned),
        "{err:?}"
    );
    assert_eq!(poisoned, GIB / PAGE, "every frame of the mixed leaf");
    let t = m.page_tables();
    for f in (0..GIB).step_by(2 * MIB as usize).chain([512 * MIB, 160 * MIB + PAGE]) {
        assert!(
            t.translate(&m.mem, Machine::direct(f)).is_none(),
            "poisoned {f:#x} mapped"
        );
        assert!(
            t.translate(&m.mem, va + f).is_none(),
            "poisoned {f:#x} mapped in the buffer"
        );
    }
    let _ = TdxPageState::Accepted;
}
