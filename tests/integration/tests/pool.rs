//! The shared-memory pool over the engine and the TDX model.

use std::sync::atomic::{AtomicU32, Ordering};

use coco_convert::pool::{ChunkSource, Convert, PoolError, SharedPool, SharedRange, CHUNK};
use coco_convert::{ConvertError, PageState, PlatformError, Report, Target, Visibility};
use hvmock::{TdxConfig, TdxHostile, TdxPageState};
use integration::sim::{chunk_slots, ChunkStack};
use integration::world::{Shape, TdxWorld};
use integration::{GIB, MIB};

/// `n` chunks from the 2 MiB-mapped half of the test guest.
fn chunks(n: u64) -> ChunkStack {
    ChunkStack::new((0..n).rev().map(|i| GIB + 256 * MIB + i * CHUNK).collect())
}

#[test]
fn churn_costs_no_split_and_almost_no_hypercalls() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(8), chunk_slots(16), 1);
    let mut live: Vec<SharedRange> = Vec::new();
    let mut x = 12345u64;
    for i in 0..5000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if live.len() < 40 && (x >> 60) % 3 != 0 || live.is_empty() {
            let bytes = 4096 * (1 + (x >> 33) % 16);
            let b = pool.alloc(bytes).unwrap();
            assert_eq!(e.state(b.pa), Some(PageState::Shared), "allocation {i}");
            assert_eq!(w.tdx.page(b.pa + b.len - 4096).state, TdxPageState::Shared);
            live.push(b);
        } else {
            let b = live.swap_remove((x >> 20) as usize % live.len());
            pool.free(b).unwrap();
        }
    }
    let c = e.counters();
    assert_eq!(
        (c.splits_1g, c.splits_2m),
        (0, 0),
        "2 MiB chunks in a 2 MiB-mapped region split nothing"
    );
    let stats = pool.stats();
    assert!(
        c.hypercalls() * 100 < stats.allocations,
        "{} hypercalls for {} allocations",
        c.hypercalls(),
        stats.allocations
    );
    // Buffers never overlap.
    let mut spans: Vec<(u64, u64)> = live.iter().map(|b| (b.pa, b.pa + b.len)).collect();
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    for b in live {
        pool.free(b).unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.chunks_held, 1, "one empty chunk kept (hysteresis)");
    assert_eq!(stats.chunks_shared - stats.chunks_returned, 1);
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn misuse_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(16), 0);
    assert_eq!(pool.alloc(0), Err(PoolError::BadSize(0)));
    assert_eq!(pool.alloc(CHUNK + 1), Err(PoolError::BadSize(CHUNK + 1)));
    let a = pool.alloc(CHUNK).unwrap();
    assert_eq!(
        pool.alloc(4096),
        Err(PoolError::Exhausted),
        "one chunk, full, no more to be had"
    );
    let stranger = SharedRange { pa: 4096, len: 4096 };
    assert_eq!(pool.free(stranger), Err(PoolError::NotAllocated(stranger)));
    pool.free(a).unwrap();
    assert_eq!(pool.free(a), Err(PoolError::NotAllocated(a)), "double free");
    assert_eq!(pool.stats().chunks_returned, 1, "keep_empty 0: back to private at once");
    assert_eq!(e.state(a.pa), Some(PageState::Private));
}

/// A chunk whose conversion fails is poisoned by the engine and never
/// handed out; the pool reports the failure and goes on with other chunks.
#[test]
fn a_poisoned_chunk_is_never_reused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    assert!(matches!(pool.alloc(8192), Err(PoolError::Convert(_))));
    assert_eq!(pool.stats().chunks_lost, 1);
    w.tdx.set_hostile(None);
    let b = pool.alloc(8192).unwrap();
    assert_eq!(e.state(b.pa), Some(PageState::Shared));
    assert_ne!(b.pa, GIB + 256 * MIB, "not the poisoned chunk");
    let _ = e.convert(Target::Physical { pa: b.pa, len: 4096 }, Visibility::Private);
}

#[test]
fn concurrent_allocations_never_overlap() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(16), chunk_slots(16), 2);
    let all: Vec<Vec<SharedRange>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..500u64 {
                        let b = pool.alloc(4096 * (1 + (i * 7 + t) % 16)).unwrap();
                        if i % 3 == 0 {
                            pool.free(b).unwrap();
                        } else {
                            mine.push(b);
                        }
                        if mine.len() > 30 {
                            pool.free(mine.remove(0)).unwrap();
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut spans: Vec<(u64, u64)> = all.iter().flatten().map(|b| (b.pa, b.pa + b.len)).collect();
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlapping buffers");
    assert!(spans.iter().all(|&(pa, _)| e.state(pa) == Some(PageState::Shared)));
}

/// Refuses `b` and checks that the refusal changed nothing the stats show.
fn refused<C: Convert, S: ChunkSource>(pool: &SharedPool<'_, C, S>, b: SharedRange) {
    let before = pool.stats();
    assert_eq!(pool.free(b), Err(PoolError::NotAllocated(b)), "{b:x?}");
    assert_eq!(pool.stats(), before, "a refused free of {b:x?} changed the pool");
}

/// After refusals: every live buffer is still allocated (a new allocation
/// overlaps none of them, and each frees exactly once), and the pool still
/// serves.
fn still_works<C: Convert, S: ChunkSource>(pool: &SharedPool<'_, C, S>, live: &[SharedRange]) {
    let fresh = pool.alloc(4096).unwrap();
    for b in live {
        assert!(
            fresh.pa + fresh.len <= b.pa || b.pa + b.len <= fresh.pa,
            "{fresh:x?} handed out over live {b:x?}"
        );
    }
    for &b in live.iter().chain([&fresh]) {
        pool.free(b).unwrap();
        refused(pool, b);
    }
}

const PAGE: u64 = 4096;

#[test]
fn free_of_a_huge_length_or_a_pa_near_the_top_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(2 * PAGE).unwrap();
    // u64::MAX rounded down to a page.
    let top = !(PAGE - 1);
    for b in [
        SharedRange { pa: a.pa, len: top },
        SharedRange {
            pa: a.pa,
            len: CHUNK + PAGE,
        },
        SharedRange { pa: top, len: PAGE },
        SharedRange { pa: top, len: top },
        SharedRange {
            pa: top - PAGE,
            len: 2 * PAGE,
        },
    ] {
        refused(&pool, b);
    }
    assert_eq!(e.state(a.pa), Some(PageState::Shared));
    still_works(&pool, &[a]);
}

#[test]
fn free_of_an_unaligned_length_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(PAGE).unwrap();
    let b = pool.alloc(2 * PAGE).unwrap();
    for len in [100, PAGE - 1, PAGE + 1] {
        refused(&pool, SharedRange { pa: a.pa, len });
    }
    for len in [100, PAGE + 1, 2 * PAGE - 1, 2 * PAGE + 1] {
        refused(&pool, SharedRange { pa: b.pa, len });
    }
    still_works(&pool, &[a, b]);
}

#[test]
fn free_of_an_unaligned_pa_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(2 * PAGE).unwrap();
    for pa in [a.pa + 1, a.pa + 100, a.pa + PAGE - 1, a.pa - 1] {
        refused(&pool, SharedRange { pa, len: a.len });
        refused(&pool, SharedRange { pa, len: PAGE });
    }
    still_works(&pool, &[a]);
}

#[test]
fn free_of_a_sub_range_of_a_live_buffer_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(4 * PAGE).unwrap();
    for (offset, len) in [(PAGE, PAGE), (PAGE, 3 * PAGE), (3 * PAGE, PAGE), (PAGE, 2 * PAGE)] {
        refused(&pool, SharedRange { pa: a.pa + offset, len });
    }
    still_works(&pool, &[a]);
}

#[test]
fn free_of_a_range_spanning_two_live_buffers_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(2 * PAGE).unwrap();
    let b = pool.alloc(2 * PAGE).unwrap();
    assert_eq!(b.pa, a.pa + a.len, "adjacent");
    for (pa, len) in [
        (a.pa, 4 * PAGE),
        (a.pa + PAGE, 2 * PAGE),
        (a.pa, 3 * PAGE),
        (a.pa + PAGE, 3 * PAGE),
    ] {
        refused(&pool, SharedRange { pa, len });
    }
    still_works(&pool, &[a, b]);
}

#[test]
fn partial_free_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(4 * PAGE).unwrap();
    for len in [PAGE, 2 * PAGE, 3 * PAGE] {
        refused(&pool, SharedRange { pa: a.pa, len });
    }
    still_works(&pool, &[a]);
}

/// A stale free whose pages were handed out again: the pages are all in
/// use, but not as the allocation being freed.
#[test]
fn double_free_after_reuse_is_refused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 1);
    let a = pool.alloc(4 * PAGE).unwrap();
    pool.free(a).unwrap();
    // Over A's first pages, and the rest of A by another allocation.
    let b = pool.alloc(2 * PAGE).unwrap();
    let c = pool.alloc(2 * PAGE).unwrap();
    assert_eq!((b.pa, c.pa), (a.pa, a.pa + 2 * PAGE));
    refused(&pool, a);
    assert_eq!(e.state(b.pa), Some(PageState::Shared));
    still_works(&pool, &[b, c]);
    // Over all of A and beyond.
    let d = pool.alloc(6 * PAGE).unwrap();
    assert_eq!(d.pa, a.pa);
    refused(&pool, a);
    still_works(&pool, &[d]);
    // Over A's first pages only.
    let b = pool.alloc(2 * PAGE).unwrap();
    assert_eq!(b.pa, a.pa);
    refused(&pool, a);
    still_works(&pool, &[b]);
}

/// The engine, except that it can be told to refuse the next conversions
/// to one side with an error that changed nothing.
struct Flaky<C> {
    inner: C,
    fail_private: AtomicU32,
    fail_shared: AtomicU32,
}

const UNCHANGED: ConvertError = ConvertError::OutOfTableMemory { needed: 1 };

impl<C: Convert> Flaky<C> {
    fn new(inner: C) -> Self {
        Flaky {
            inner,
            fail_private: AtomicU32::new(0),
            fail_shared: AtomicU32::new(0),
        }
    }

    fn fail_next(&self, to: Visibility, n: u32) {
        match to {
            Visibility::Private => self.fail_private.store(n, Ordering::SeqCst),
            Visibility::Shared => self.fail_shared.store(n, Ordering::SeqCst),
        }
    }
}

impl<C: Convert> Convert for Flaky<C> {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        let fail = match to {
            Visibility::Private => &self.fail_private,
            Visibility::Shared => &self.fail_shared,
        };
        if fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(UNCHANGED);
        }
        self.inner.convert(target, to)
    }

    fn stopped(&self) -> bool {
        self.inner.stopped()
    }
}

/// A chunk whose return to private failed without changing anything is
/// still shared and whole: the pool keeps it, serves from it without a
/// new conversion, and returns it once the converter works again.
#[test]
fn a_chunk_that_could_not_go_private_is_kept_and_reused() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let flaky = Flaky::new(&e);
    let pool = SharedPool::new(&flaky, chunks(2), chunk_slots(16), 0);
    let a = pool.alloc(2 * PAGE).unwrap();
    flaky.fail_next(Visibility::Private, 1);
    assert_eq!(
        pool.free(a),
        Ok(()),
        "the buffer was freed; only its chunk stayed shared"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.frees, stats.chunks_held, stats.chunks_returned, stats.chunks_lost),
        (1, 1, 0, 0)
    );
    assert_eq!(e.state(a.pa), Some(PageState::Shared));
    let conversions = e.counters().conversions;
    let b = pool.alloc(4 * PAGE).unwrap();
    assert_eq!(b.pa, a.pa, "served from the kept chunk");
    assert_eq!(pool.stats().chunks_shared, 1, "no new chunk");
    assert_eq!(e.counters().conversions, conversions, "no conversion");
    assert_eq!(w.tdx.page(b.pa + b.len - PAGE).state, TdxPageState::Shared);
    pool.free(b).unwrap();
    let stats = pool.stats();
    assert_eq!((stats.chunks_held, stats.chunks_returned, stats.chunks_lost), (0, 1, 0));
    assert_eq!(e.state(a.pa), Some(PageState::Private));
    assert!(w.tdx.violations().is_empty());
}

/// A kept surplus chunk goes back on a later free, even one that empties
/// no chunk.
#[test]
fn a_kept_surplus_chunk_is_returned_on_a_later_free() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let flaky = Flaky::new(&e);
    let pool = SharedPool::new(&flaky, chunks(2), chunk_slots(16), 0);
    let x = pool.alloc(CHUNK).unwrap();
    let y1 = pool.alloc(PAGE).unwrap();
    let y2 = pool.alloc(PAGE).unwrap();
    flaky.fail_next(Visibility::Private, 2);
    pool.free(x).unwrap();
    pool.free(y1).unwrap();
    let stats = pool.stats();
    assert_eq!(
        (stats.chunks_held, stats.chunks_returned, stats.chunks_lost),
        (2, 0, 0),
        "both attempts refused: kept"
    );
    assert_eq!(e.state(x.pa), Some(PageState::Shared));
    let y3 = pool.alloc(PAGE).unwrap();
    pool.free(y3).unwrap();
    let stats = pool.stats();
    assert_eq!(
        (stats.chunks_held, stats.chunks_returned, stats.chunks_lost),
        (1, 1, 0),
        "the converter works again: the surplus chunk went back"
    );
    assert_eq!(e.state(x.pa), Some(PageState::Private));
    assert_eq!(e.state(y2.pa), Some(PageState::Shared));
    pool.free(y2).unwrap();
    let stats = pool.stats();
    assert_eq!((stats.chunks_held, stats.chunks_returned, stats.chunks_lost), (0, 2, 0));
    assert_eq!(e.state(y2.pa), Some(PageState::Private));
}

/// A new chunk whose conversion to shared changed nothing is still private
/// and goes back to the source, not lost.
#[test]
fn a_new_chunk_that_could_not_go_shared_goes_back_to_the_source() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let flaky = Flaky::new(&e);
    let pool = SharedPool::new(&flaky, chunks(1), chunk_slots(16), 0);
    flaky.fail_next(Visibility::Shared, 1);
    assert_eq!(pool.alloc(PAGE), Err(PoolError::Convert(UNCHANGED)));
    assert_eq!(pool.stats().chunks_lost, 0);
    let a = pool.alloc(PAGE).unwrap();
    assert_eq!(a.pa, GIB + 256 * MIB, "the same chunk, from the source again");
    assert_eq!(e.state(a.pa), Some(PageState::Shared));
}

/// Only a platform failure, after which the engine has poisoned the
/// frames, loses a chunk going back to private.
#[test]
fn a_chunk_poisoned_going_private_is_lost() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(16), 0);
    let a = pool.alloc(PAGE).unwrap();
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    assert_eq!(pool.free(a), Ok(()));
    w.tdx.set_hostile(None);
    let stats = pool.stats();
    assert_eq!((stats.chunks_held, stats.chunks_returned, stats.chunks_lost), (0, 0, 1));
    assert_eq!(e.state(a.pa), Some(PageState::Poisoned));
    let b = pool.alloc(PAGE).unwrap();
    assert_ne!(b.pa, a.pa, "not the poisoned chunk");
    let _ = e.convert(Target::Physical { pa: b.pa, len: PAGE }, Visibility::Private);
}

/// What the pool relies on to keep or drop a chunk.
#[test]
fn changed_nothing_is_false_only_after_a_change() {
    for e in [
        ConvertError::InvalidRange { addr: 1, len: PAGE },
        ConvertError::NotMapped { va: 0 },
        ConvertError::UnknownFrame { pa: 0 },
        ConvertError::Refused {
            pa: 0,
            state: PageState::Shared,
        },
        ConvertError::OutOfTableMemory { needed: 1 },
        ConvertError::UnusableTableFrame { pa: 0 },
        ConvertError::NoScratchWindow,
    ] {
        assert!(e.changed_nothing(), "{e:?}");
    }
    let poisoned = ConvertError::Platform {
        error: PlatformError::NoScratchWindow,
        pa: 0,
        poisoned: 1,
        converted: 0,
    };
    assert!(!poisoned.changed_nothing(), "{poisoned:?}");
}
