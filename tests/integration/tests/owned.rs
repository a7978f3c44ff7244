//! Owned shared buffers, from the pool and from direct conversions, and
//! the pool's capacity, over the engine and the TDX and SNP models. The
//! host is the test: it reads and writes the frames through simulated
//! memory, and breaks conversions with the models' hostile modes.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use coco_convert::pool::{
    Convert, DirectShare, OutOfBounds, PoolError, Reclaim, ReleaseError, ShareError, SharedPool, SharedRange, CHUNK,
};
use coco_convert::{ConvertError, PageState, Report, Target, Visibility};
use hvmock::{SnpConfig, SnpHostile, TdxConfig, TdxHostile, TdxPageState};
use integration::sim::{chunk_slots, ChunkStack, SimAccess};
use integration::world::{Shape, SnpWorld, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;
/// Frames the direct tests share: in the 2 MiB-mapped half, away from the
/// pool's chunks.
const DIRECT: u64 = GIB + 100 * MIB;

/// `n` chunks from the 2 MiB-mapped half of the test guest.
fn chunks(n: u64) -> ChunkStack {
    ChunkStack::new((0..n).rev().map(|i| GIB + 256 * MIB + i * CHUNK).collect())
}

/// What the OS's reclaim callback was told.
#[derive(Default, Debug)]
struct Recorder {
    reclaimed: Mutex<Vec<(u64, u64)>>,
    lost: Mutex<Vec<(u64, u64, ConvertError)>>,
}

impl Reclaim for Recorder {
    fn reclaimed(&self, pa: u64, len: u64) {
        self.reclaimed.lock().unwrap().push((pa, len));
    }
    fn lost(&self, pa: u64, len: u64, error: ConvertError) {
        self.lost.lock().unwrap().push((pa, len, error));
    }
}

fn frames(pa: u64, len: u64) -> impl Iterator<Item = u64> {
    (pa..pa + len).step_by(PAGE as usize)
}

// ---- capacity ---------------------------------------------------------------

/// More chunks than the old fixed table's 64: every one is converted,
/// distinct, shared on the host's side, and goes back.
#[test]
fn a_pool_holds_more_than_64_chunks() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let source = chunks(100);
    let pool = SharedPool::new(&e, &source, chunk_slots(128), 0);
    assert_eq!(pool.capacity(), 128);
    let all: Vec<SharedRange> = (0..100).map(|_| pool.alloc(CHUNK).unwrap()).collect();
    let mut pas: Vec<u64> = all.iter().map(|r| r.pa).collect();
    pas.sort();
    pas.dedup();
    assert_eq!(pas.len(), 100, "100 distinct chunks");
    for r in &all {
        assert_eq!(e.state(r.pa + r.len - PAGE), Some(PageState::Shared));
        assert_eq!(w.tdx.page(r.pa).state, TdxPageState::Shared);
    }
    assert_eq!(pool.stats().chunks_held, 100);
    assert_eq!(pool.alloc(PAGE), Err(PoolError::Exhausted), "the source is empty");
    for r in all {
        pool.free(r).unwrap();
    }
    let stats = pool.stats();
    assert_eq!((stats.chunks_held, stats.chunks_returned), (0, 100));
    assert_eq!(source.held().len(), 100, "every chunk back to the source");
    assert!(w.tdx.violations().is_empty());
}

/// Slots bound the pool, not the source: with every slot holding a full
/// chunk the pool says so, takes no chunk it cannot hold, and serves again
/// once a chunk empties.
#[test]
fn a_pool_at_its_slots_reports_at_capacity() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let source = chunks(5);
    let pool = SharedPool::new(&e, &source, chunk_slots(3), 1);
    let full: Vec<SharedRange> = (0..3).map(|_| pool.alloc(CHUNK).unwrap()).collect();
    assert_eq!(pool.alloc(PAGE), Err(PoolError::AtCapacity { slots: 3 }));
    assert_eq!(source.held().len(), 2, "no chunk taken that the pool cannot hold");
    pool.free(full[1]).unwrap();
    let b = pool.alloc(PAGE).unwrap();
    assert_eq!(b.pa, full[1].pa, "served from the chunk that emptied");
}

#[test]
fn a_pool_with_no_slots_reports_exhaustion_and_converts_nothing() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let source = chunks(2);
    let pool = SharedPool::new(&e, &source, chunk_slots(0), 0);
    let access = SimAccess(w.m.mem.clone());
    assert_eq!(pool.alloc(PAGE), Err(PoolError::AtCapacity { slots: 0 }));
    assert_eq!(
        pool.alloc_owned(PAGE, &access).unwrap_err(),
        PoolError::AtCapacity { slots: 0 }
    );
    let err = pool.alloc(PAGE).unwrap_err();
    assert!(err.to_string().contains("0 chunk slots"), "{err}");
    assert_eq!(e.counters().conversions, 0);
    assert_eq!(source.held().len(), 2);
}

// ---- owned buffers from the pool ---------------------------------------------

#[test]
fn an_owned_pool_buffer_is_shared_while_alive_and_goes_back_to_the_pool() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let source = chunks(2);
    let pool = SharedPool::new(&e, &source, chunk_slots(4), 0);
    let access = SimAccess(w.m.mem.clone());
    let mut buf = pool.alloc_owned(5000, &access).unwrap();
    assert_eq!(buf.len(), 8192, "rounded up to pages");
    for pa in frames(buf.pa(), 8192) {
        assert_eq!(e.state(pa), Some(PageState::Shared));
        assert_eq!(w.tdx.page(pa).state, TdxPageState::Shared);
    }
    // The guest writes, the host sees it; the host writes, the guest sees it.
    buf.write(4000, b"to the host").unwrap();
    let mut seen = [0u8; 11];
    // SAFETY: the test is the host; nothing else touches these bytes.
    unsafe { std::ptr::copy_nonoverlapping(w.m.mem.ptr(buf.pa() + 4000), seen.as_mut_ptr(), 11) };
    assert_eq!(&seen, b"to the host");
    w.m.mem.fill(buf.pa() + 8000, 192, 0xC3);
    let mut got = [0u8; 192];
    buf.read(8000, &mut got).unwrap();
    assert_eq!(got, [0xC3; 192]);
    // A copy of its range cannot free it from under the handle.
    let range = buf.range();
    assert_eq!(pool.free(range), Err(PoolError::Owned(range)));
    assert_eq!(pool.stats().frees, 0);
    drop(buf);
    let stats = pool.stats();
    assert_eq!(
        (stats.frees, stats.chunks_returned),
        (1, 1),
        "keep_empty 0: back to private"
    );
    assert_eq!(e.state(range.pa), Some(PageState::Private));
    assert_eq!(pool.free(range), Err(PoolError::NotAllocated(range)), "given back once");
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn byte_access_outside_the_buffer_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(1), 0);
    let access = SimAccess(w.m.mem.clone());
    let mut buf = pool.alloc_owned(PAGE, &access).unwrap();
    w.m.mem.fill(buf.pa() + PAGE, PAGE, 0x77);
    let size = PAGE as usize;
    assert_eq!(
        buf.read(size - 1, &mut [0; 2]),
        Err(OutOfBounds {
            offset: size - 1,
            len: 2,
            size
        })
    );
    assert_eq!(
        buf.write(usize::MAX, &[1]),
        Err(OutOfBounds {
            offset: usize::MAX,
            len: 1,
            size
        })
    );
    assert!(buf.fill(1, size, 0).is_err());
    buf.write(0, &[0xAA; 4096]).unwrap();
    assert!(
        w.m.mem.is_filled(buf.pa() + PAGE, PAGE, 0x77),
        "nothing written past the buffer"
    );
    assert_eq!(buf.read(size, &mut []), Ok(()), "an empty read at the end is in bounds");
}

/// A failure to make the chunk private, after a buffer's handle is
/// dropped: the chunk is poisoned, counted lost, and never given to the
/// source nor handed out again.
#[test]
fn an_owned_pool_buffer_dropped_while_the_host_breaks_the_return_loses_its_chunk_and_says_so() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let source = chunks(2);
    let pool = SharedPool::new(&e, &source, chunk_slots(2), 0);
    let access = SimAccess(w.m.mem.clone());
    let buf = pool.alloc_owned(PAGE, &access).unwrap();
    let pa = buf.pa();
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    drop(buf);
    w.tdx.set_hostile(None);
    let stats = pool.stats();
    assert_eq!((stats.chunks_lost, stats.chunks_returned, stats.chunks_held), (1, 0, 0));
    assert!(!source.held().contains(&pa), "a poisoned chunk went back to the source");
    assert!(frames(pa, CHUNK).all(|f| e.state(f) == Some(PageState::Poisoned)));
    let next = pool.alloc_owned(PAGE, &access).unwrap();
    assert_ne!(next.pa(), pa, "the poisoned chunk served again");
}

// ---- owned buffers from direct conversions -----------------------------------

#[test]
fn a_direct_buffer_is_shared_while_alive_then_private_and_reclaimed() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let reclaim = Recorder::default();
    let direct = DirectShare::new(&e, SimAccess(w.m.mem.clone()), &reclaim);
    // SAFETY: nothing in the test uses these frames.
    let mut buf = unsafe { direct.share(DIRECT, 3 * PAGE) }.unwrap();
    for pa in frames(DIRECT, 3 * PAGE) {
        assert_eq!(e.state(pa), Some(PageState::Shared));
        assert_eq!(w.tdx.page(pa).state, TdxPageState::Shared);
    }
    buf.fill(0, buf.len(), 0x11).unwrap();
    assert!(w.m.mem.is_filled(DIRECT, 3 * PAGE, 0x11));
    // Moved to another CPU and given back there.
    std::thread::scope(|s| {
        s.spawn(move || drop(buf));
    });
    assert_eq!(*reclaim.reclaimed.lock().unwrap(), vec![(DIRECT, 3 * PAGE)]);
    assert!(reclaim.lost.lock().unwrap().is_empty());
    for pa in frames(DIRECT, 3 * PAGE) {
        assert_eq!(e.state(pa), Some(PageState::Private));
        assert_eq!(w.tdx.page(pa).state, TdxPageState::Accepted);
    }
    let stats = direct.stats();
    assert_eq!((stats.shared, stats.returned, stats.lost), (1, 1, 0));
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn sharing_what_cannot_be_shared_is_refused_and_changes_nothing() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let reclaim = Recorder::default();
    let direct = DirectShare::new(&e, SimAccess(w.m.mem.clone()), &reclaim);
    let beyond = w.m.size();
    // SAFETY: the refusals below touch no frame.
    unsafe {
        assert_eq!(
            direct.share(beyond, PAGE).unwrap_err(),
            ShareError::Unreachable { pa: beyond, len: PAGE }
        );
        assert!(matches!(
            direct.share(DIRECT + 1, PAGE),
            Err(ShareError::Convert(ConvertError::InvalidRange { .. }))
        ));
        let held = direct.share(DIRECT, PAGE).unwrap();
        assert!(matches!(
            direct.share(DIRECT, PAGE),
            Err(ShareError::Convert(ConvertError::Refused {
                state: PageState::Shared,
                ..
            }))
        ));
        drop(held);
    }
    assert_eq!(direct.stats().shared, 1);
    assert_eq!(e.state(DIRECT), Some(PageState::Private));
}

/// The host breaks the conversion back: dropped, the buffer's frames stay
/// poisoned, are not reclaimed, and the failure reaches the OS's callback
/// and the counters.
#[test]
fn a_direct_buffer_dropped_while_the_host_breaks_the_return_is_withheld_and_reported_tdx() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let reclaim = Recorder::default();
    let direct = DirectShare::new(&e, SimAccess(w.m.mem.clone()), &reclaim);
    // SAFETY: nothing in the test uses these frames.
    let buf = unsafe { direct.share(DIRECT, 4 * PAGE) }.unwrap();
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    drop(buf);
    w.tdx.set_hostile(None);
    assert!(
        reclaim.reclaimed.lock().unwrap().is_empty(),
        "withheld frames reclaimed"
    );
    let lost = reclaim.lost.lock().unwrap().clone();
    assert_eq!(lost.len(), 1);
    let (pa, len, error) = lost[0];
    assert_eq!((pa, len), (DIRECT, 4 * PAGE));
    assert!(!error.changed_nothing(), "{error:?}");
    assert!(frames(DIRECT, 4 * PAGE).all(|f| e.state(f) == Some(PageState::Poisoned)));
    assert_eq!(direct.stats().lost, 1);
}

/// The same through `release`, on SNP: the error comes back to the caller
/// as well as to the callback.
#[test]
fn a_direct_buffer_released_while_the_host_breaks_the_return_is_withheld_and_reported_snp() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, 1536 * MIB);
    let reclaim = Recorder::default();
    let direct = DirectShare::new(&e, SimAccess(w.m.mem.clone()), &reclaim);
    // SAFETY: nothing in the test uses these frames.
    let buf = unsafe { direct.share(DIRECT, 2 * PAGE) }.unwrap();
    assert!(!w.snp.rmp(DIRECT).assigned, "shared on the host's side");
    w.snp.set_hostile(Some(SnpHostile::PscStall));
    let err: ReleaseError = buf.release().unwrap_err();
    w.snp.set_hostile(None);
    assert_eq!((err.pa, err.len), (DIRECT, 2 * PAGE));
    assert!(!err.error.changed_nothing(), "{err}");
    assert!(err.to_string().contains("withheld"), "{err}");
    assert_eq!(reclaim.lost.lock().unwrap().len(), 1);
    assert!(reclaim.reclaimed.lock().unwrap().is_empty());
    assert!(frames(DIRECT, 2 * PAGE).all(|f| e.state(f) == Some(PageState::Poisoned)));
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// The engine, refusing the next conversion to private with an error that
/// changed nothing.
struct RefusesPrivate<C> {
    inner: C,
    refusals: AtomicU32,
}

impl<C: Convert> Convert for RefusesPrivate<C> {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        if to == Visibility::Private
            && self
                .refusals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(ConvertError::OutOfTableMemory { needed: 1 });
        }
        self.inner.convert(target, to)
    }

    fn stopped(&self) -> bool {
        self.inner.stopped()
    }
}

/// A refusal that changed nothing leaves the frames shared and whole: still
/// not handed back as private, reported, and the OS can convert them later.
#[test]
fn a_direct_buffer_whose_return_changed_nothing_stays_shared_and_is_reported() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let reclaim = Recorder::default();
    let converter = RefusesPrivate {
        inner: &e,
        refusals: AtomicU32::new(1),
    };
    let direct = DirectShare::new(&converter, SimAccess(w.m.mem.clone()), &reclaim);
    // SAFETY: nothing in the test uses these frames.
    drop(unsafe { direct.share(DIRECT, PAGE) }.unwrap());
    let lost = reclaim.lost.lock().unwrap().clone();
    assert_eq!(lost, vec![(DIRECT, PAGE, ConvertError::OutOfTableMemory { needed: 1 })]);
    assert!(reclaim.reclaimed.lock().unwrap().is_empty());
    assert_eq!(e.state(DIRECT), Some(PageState::Shared));
    assert_eq!(w.tdx.page(DIRECT).state, TdxPageState::Shared);
    e.convert(Target::Physical { pa: DIRECT, len: PAGE }, Visibility::Private)
        .unwrap();
}
