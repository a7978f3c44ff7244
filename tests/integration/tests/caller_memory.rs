//! The memory a caller lends a conversion: a frame list
//! (`Engine::convert_frames`) or a vmalloc-style range's scratch. The
//! engine reads it on every pass, after the frames are unmapped and while
//! the host holds them, so it is refused with
//! `ConvertError::CallerMemoryNotPrivate`, before anything changes, where
//! it lies in a frame that is not private: one of the conversion's own
//! frames, a frame shared with the host, or one another CPU is converting.

use coco_convert::platform::tdx::Tdx;
use coco_convert::{ConvertError, Engine, Level, PageState, PhysMem, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig};
use integration::lent::{spaced, store_list, PausingTdx, WalkedPhys};
use integration::world::{Machine, Shape, SnpWorld, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

fn states(
    e: &Engine<
        '_,
        impl PhysMem,
        impl coco_convert::FrameSource,
        impl coco_convert::TlbShootdown,
        impl coco_convert::Platform,
    >,
    frames: &[u64],
) -> Vec<Option<PageState>> {
    frames.iter().map(|&pa| e.state(pa)).collect()
}

#[test]
fn a_list_reaching_into_one_of_its_own_frames_is_refused_and_nothing_changes() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    // 600 frames, 4800 bytes: stored from the middle of a frame that is not
    // listed, the list's second page is the first listed frame.
    let store = GIB + 40 * MIB;
    let list = spaced(store + PAGE, 600);
    let in_place = store_list(&w.m.mem, store + 2048, &list);
    let before = w.m.snapshot();
    let calls = e.counters().hypercalls();
    let result = e.convert_frames(in_place, Visibility::Shared);
    assert_eq!(
        result,
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store + PAGE,
            state: PageState::Converting
        })
    );
    assert_eq!(e.counters().hypercalls(), calls, "no host call");
    assert!(w.m.snapshot() == before, "tables and states as they were");
    assert_eq!(in_place, &list[..], "the list is intact");
    // The same list elsewhere converts.
    e.convert_frames(&list, Visibility::Shared)
        .expect("a list in host memory");
    assert!(states(&e, &list).iter().all(|&s| s == Some(PageState::Shared)));
}

#[test]
fn a_list_in_memory_shared_with_the_host_is_refused() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    let store = GIB + 40 * MIB;
    e.convert(Target::Physical { pa: store, len: PAGE }, Visibility::Shared)
        .expect("the page the list will be in, shared");
    let list = spaced(store + PAGE, 8);
    let in_place = store_list(&w.m.mem, store, &list);
    let calls = e.counters().hypercalls();
    assert_eq!(
        e.convert_frames(in_place, Visibility::Shared),
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store,
            state: PageState::Shared
        }),
        "the host could rewrite the list between the engine's passes"
    );
    assert_eq!(e.counters().hypercalls(), calls, "no host call");
    assert!(states(&e, &list).iter().all(|&s| s == Some(PageState::Private)));
}

#[test]
fn a_list_in_private_guest_memory_outside_its_frames_converts() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    let store = GIB + 40 * MIB;
    // Two pages of list, and the frames after them.
    let list = spaced(store + 2 * PAGE, 600);
    let in_place = store_list(&w.m.mem, store, &list);
    let report = e.convert_frames(in_place, Visibility::Shared).expect("conversion");
    assert_eq!(report.frames, 600);
    e.convert_frames(in_place, Visibility::Private).expect("and back");
    assert!(states(&e, &list).iter().all(|&s| s == Some(PageState::Private)));
    assert_eq!(w.m.watch.violations(), Vec::<String>::new());
}

#[test]
fn a_vmalloc_scratch_in_one_of_the_ranges_frames_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let frames = spaced(GIB + 40 * MIB, 16);
    let va = w.m.vmalloc(&frames);
    // SAFETY: a frame of simulated guest memory, 4 KiB aligned, that the
    // test uses for nothing else while the slice lives.
    let scratch = unsafe { std::slice::from_raw_parts_mut(w.m.mem.ptr(frames[3]).cast::<u64>(), 4) };
    let before = w.m.snapshot();
    assert_eq!(
        e.convert_with_scratch(Target::Virtual { va, len: 16 * PAGE }, Visibility::Shared, scratch),
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: frames[3],
            state: PageState::Converting
        })
    );
    assert!(w.m.snapshot() == before, "tables and states as they were");
    let mut own = [0; 4];
    e.convert_with_scratch(Target::Virtual { va, len: 16 * PAGE }, Visibility::Shared, &mut own)
        .expect("with scratch of its own");
}

#[test]
fn a_list_in_a_frame_another_cpu_is_converting_is_refused() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let tdx = PausingTdx::new();
    let e = m.engine(Tdx::new(&tdx, 1 << 47).unwrap());
    let store = GIB + 40 * MIB;
    let list = spaced(store + PAGE, 8);
    let in_place = store_list(&m.mem, store, &list);
    let refused = std::thread::scope(|s| {
        let other = s.spawn(|| e.convert(Target::Physical { pa: store, len: PAGE }, Visibility::Shared));
        tdx.in_call.wait();
        // The other CPU's host call is in flight: the list's frame is its.
        let refused = e.convert_frames(in_place, Visibility::Shared);
        tdx.resume.wait();
        other.join().unwrap().expect("the other CPU's conversion");
        refused
    });
    assert_eq!(
        refused,
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store,
            state: PageState::Converting
        })
    );
    assert!(states(&e, &list).iter().all(|&s| s == Some(PageState::Private)));
}

#[test]
fn without_the_oss_translation_the_engine_walks_its_tables_for_the_list() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let phys = WalkedPhys(&w.m.phys);
    let e = Engine::new(
        w.m.config(),
        &phys,
        &w.m.frames,
        &w.m.tlb,
        Tdx::new(&w.tdx, 1 << 47).unwrap(),
        w.m.state_table(),
    );
    let store = GIB + 40 * MIB;
    let list = spaced(store, 8);
    let in_place = store_list(&w.m.mem, store, &list);
    // The guest's tables map the list's address (this process's, standing
    // in for a kernel virtual address) to the frame it is stored in.
    let va = in_place.as_ptr() as u64 / PAGE * PAGE;
    w.m.map_pieces(va, &[(store, Level::Pt)]);
    assert_eq!(
        e.convert_frames(in_place, Visibility::Shared),
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store,
            state: PageState::Converting
        })
    );
    assert!(states(&e, &list).iter().all(|&s| s == Some(PageState::Private)));
}
