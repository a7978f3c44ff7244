//! A pool of shared memory for drivers that churn small shared buffers
//! (DMA bounce buffers, virtio rings): it converts whole 2 MiB-aligned
//! chunks once, so no allocation needs a split or a hypercall, and hands
//! out 4 KiB-granular buffers from them. A chunk that empties goes back to
//! private only when more than `keep_empty` chunks are empty (hysteresis),
//! so a driver that frees and reallocates does not convert back and forth.
//! A chunk whose return fails without changing anything stays in the pool,
//! shared and reusable, and a later free tries again; only a chunk the
//! engine poisoned is lost.
//!
//! Thread-safe: one lock, never held across a chunk conversion (which
//! takes hypercalls and a shootdown that other CPUs must answer) nor a call
//! into the chunk source. A chunk converting meanwhile holds its slot but
//! serves no allocation. `no_std`, no heap.

use crate::sync::Mutex;

use crate::engine::{ConvertError, Engine, Report, Target};
use crate::platform::Platform;
use crate::pte::Visibility;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::tables::PhysMem;

/// Chunk size: 2 MiB, so a chunk in a direct map of 2 MiB or larger pages
/// converts as whole entries.
pub const CHUNK: u64 = 2 << 20;
const PAGES: usize = 512;
/// The most chunks a pool holds (128 MiB).
pub const MAX_CHUNKS: usize = 64;
// One bit per slot in `Inner::converting`.
const _: () = assert!(MAX_CHUNKS <= 64);

/// Converts memory: the engine, or anything standing in for it.
pub trait Convert {
    /// Converts `target` to `to`.
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError>;
}

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Convert for Engine<'_, M, F, T, P> {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        Engine::convert(self, target, to)
    }
}

impl<C: Convert + ?Sized> Convert for &C {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        (**self).convert(target, to)
    }
}

/// Where chunks come from: 2 MiB-aligned, private, otherwise unused
/// physical memory.
pub trait ChunkSource {
    /// A chunk, or `None`.
    fn allocate_chunk(&self) -> Option<u64>;
    /// Gives a chunk back (private again).
    fn free_chunk(&self, pa: u64);
}

/// A buffer from the pool: shared, physically contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedBuffer {
    /// Physical address.
    pub pa: u64,
    /// Bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// Why the pool could not serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// Zero bytes, or more than a chunk.
    BadSize(u64),
    /// No room, and no chunk to be had (or the pool is at `MAX_CHUNKS`).
    Exhausted,
    /// Converting a new chunk failed. If the error changed nothing the
    /// chunk went back to the source; otherwise it is lost (poisoned).
    Convert(ConvertError),
    /// `free` of a buffer the pool did not hand out.
    NotAllocated(SharedBuffer),
}

/// What the pool has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers handed out.
    pub allocations: u64,
    /// Buffers given back.
    pub frees: u64,
    /// Chunks converted to shared.
    pub chunks_shared: u64,
    /// Chunks converted back to private and returned.
    pub chunks_returned: u64,
    /// Chunks lost to a failed conversion (poisoned by the engine).
    pub chunks_lost: u64,
    /// Chunks held now.
    pub chunks_held: u64,
}

#[derive(Clone, Copy)]
struct Chunk {
    pa: u64,
    /// One bit per page, set = free.
    free: [u64; PAGES / 64],
    /// One bit per page, set = first page of a live allocation. With `free`
    /// it gives every allocation's bounds, so `free` can tell the buffer it
    /// handed out from a part of it, a span of two, or a stale copy of one
    /// whose pages were handed out again.
    starts: [u64; PAGES / 64],
    used: u16,
}

fn bit(bits: &[u64; PAGES / 64], page: usize) -> bool {
    bits[page / 64] & (1 << (page % 64)) != 0
}

impl Chunk {
    fn new(pa: u64) -> Self {
        Chunk {
            pa,
            free: [!0; PAGES / 64],
            starts: [0; PAGES / 64],
            used: 0,
        }
    }

    fn is_free(&self, page: usize) -> bool {
        bit(&self.free, page)
    }

    fn is_start(&self, page: usize) -> bool {
        bit(&self.starts, page)
    }

    /// Marks the allocation of `count` pages at `first` as handed out, or
    /// as given back.
    fn set(&mut self, first: usize, count: usize, free: bool) {
        for page in first..first + count {
            if free {
                self.free[page / 64] |= 1 << (page % 64);
            } else {
                self.free[page / 64] &= !(1 << (page % 64));
            }
        }
        if free {
            self.starts[first / 64] &= !(1 << (first % 64));
        } else {
            self.starts[first / 64] |= 1 << (first % 64);
        }
    }

    /// Whether pages `[first, first + count)` are exactly one live
    /// allocation: it starts at `first`, no other starts inside it, and the
    /// page after it is not its continuation.
    fn is_allocation(&self, first: usize, count: usize) -> bool {
        let end = first + count;
        count > 0
            && end <= PAGES
            && self.is_start(first)
            && (first..end).all(|p| !self.is_free(p))
            && (first + 1..end).all(|p| !self.is_start(p))
            && (end == PAGES || self.is_free(end) || self.is_start(end))
    }

    /// First run of `count` free pages.
    fn find(&self, count: usize) -> Option<usize> {
        let mut run = 0;
        for page in 0..PAGES {
            run = if self.is_free(page) { run + 1 } else { 0 };
            if run == count {
                return Some(page + 1 - count);
            }
        }
        None
    }
}

struct Inner {
    chunks: [Option<Chunk>; MAX_CHUNKS],
    /// Slots whose chunk is converting with the lock dropped, one bit each.
    converting: u64,
    stats: PoolStats,
}

impl Inner {
    /// A fitting run of pages: in a partly used chunk first, so that empty
    /// ones can go back.
    fn fitting(&self, pages: usize) -> Option<(usize, usize)> {
        let fits = |empty: bool| {
            self.chunks.iter().enumerate().find_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| (c.used == 0) == empty)
                    .and_then(|c| c.find(pages))
                    .map(|page| (i, page))
            })
        };
        fits(false).or_else(|| fits(true))
    }

    fn hand_out(&mut self, slot: usize, page: usize, pages: usize) -> Option<SharedBuffer> {
        let chunk = self.chunks[slot].as_mut()?;
        chunk.set(page, pages, false);
        chunk.used += pages as u16;
        self.stats.allocations += 1;
        Some(SharedBuffer {
            pa: chunk.pa + page as u64 * 4096,
            len: pages as u64 * 4096,
        })
    }

    fn idle_slot(&self) -> Option<usize> {
        (0..MAX_CHUNKS).find(|&i| self.chunks[i].is_none() && self.converting & (1 << i) == 0)
    }

    /// An empty chunk beyond `keep_empty`, the one in `prefer` first.
    fn surplus(&self, keep_empty: usize, prefer: usize) -> Option<usize> {
        let empty = |c: &Option<Chunk>| c.is_some_and(|c| c.used == 0);
        if self.chunks.iter().filter(|c| empty(c)).count() <= keep_empty {
            return None;
        }
        Some(prefer)
            .filter(|&s| empty(&self.chunks[s]))
            .or_else(|| self.chunks.iter().position(empty))
    }
}

/// The shared-memory pool.
pub struct SharedPool<C: Convert, S: ChunkSource> {
    converter: C,
    source: S,
    keep_empty: usize,
    inner: Mutex<Inner>,
}

impl<C: Convert, S: ChunkSource> core::fmt::Debug for SharedPool<C, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedPool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<C: Convert, S: ChunkSource> SharedPool<C, S> {
    /// A pool converting through `converter`, chunks from `source`, keeping
    /// up to `keep_empty` empty chunks shared.
    pub fn new(converter: C, source: S, keep_empty: usize) -> Self {
        SharedPool {
            converter,
            source,
            keep_empty,
            inner: Mutex::new(Inner {
                chunks: [None; MAX_CHUNKS],
                converting: 0,
                stats: PoolStats::default(),
            }),
        }
    }

    /// What the pool has done.
    pub fn stats(&self) -> PoolStats {
        self.inner.lock().stats
    }

    /// A shared buffer of `bytes` (rounded up to 4 KiB, at most 2 MiB).
    pub fn alloc(&self, bytes: u64) -> Result<SharedBuffer, PoolError> {
        if bytes == 0 || bytes > CHUNK {
            return Err(PoolError::BadSize(bytes));
        }
        let pages = bytes.div_ceil(4096) as usize;
        let slot = {
            let mut inner = self.inner.lock();
            if let Some((slot, page)) = inner.fitting(pages) {
                return inner.hand_out(slot, page, pages).ok_or(PoolError::Exhausted);
            }
            let slot = inner.idle_slot().ok_or(PoolError::Exhausted)?;
            inner.converting |= 1 << slot;
            slot
        };
        let added = self.new_chunk();
        let mut inner = self.inner.lock();
        inner.converting &= !(1 << slot);
        match added {
            Ok(pa) => {
                inner.stats.chunks_shared += 1;
                inner.stats.chunks_held += 1;
                inner.chunks[slot] = Some(Chunk::new(pa));
                inner.hand_out(slot, 0, pages).ok_or(PoolError::Exhausted)
            }
            Err(e) => {
                if matches!(e, PoolError::Convert(e) if !e.changed_nothing()) {
                    inner.stats.chunks_lost += 1;
                }
                Err(e)
            }
        }
    }

    /// A chunk from the source, converted to shared; called without the
    /// lock.
    fn new_chunk(&self) -> Result<u64, PoolError> {
        let pa = self.source.allocate_chunk().ok_or(PoolError::Exhausted)?;
        match self
            .converter
            .convert(Target::Physical { pa, len: CHUNK }, Visibility::Shared)
        {
            Ok(_) => Ok(pa),
            Err(e) => {
                // Refused before any change: the chunk is still private and
                // can go back. Failed later: poisoned, and lost.
                if e.changed_nothing() {
                    self.source.free_chunk(pa);
                }
                Err(PoolError::Convert(e))
            }
        }
    }

    /// Gives `buffer` back: exactly a buffer `alloc` returned and not yet
    /// freed. Anything else (a part of one, a span of several, a stale copy)
    /// is refused with nothing changed. An emptied chunk beyond `keep_empty`
    /// goes back to private and to the source.
    pub fn free(&self, buffer: SharedBuffer) -> Result<(), PoolError> {
        let not_allocated = PoolError::NotAllocated(buffer);
        // Bounded before any arithmetic on it: the buffer may be anything.
        if buffer.len == 0 || buffer.len > CHUNK || (buffer.pa | buffer.len) % 4096 != 0 {
            return Err(not_allocated);
        }
        let pages = (buffer.len / 4096) as usize;
        let mut inner = self.inner.lock();
        let slot = inner
            .chunks
            .iter()
            .position(|c| c.is_some_and(|c| buffer.pa >= c.pa && buffer.pa - c.pa < CHUNK))
            .ok_or(not_allocated)?;
        let chunk = inner.chunks[slot].as_mut().ok_or(not_allocated)?;
        let first = ((buffer.pa - chunk.pa) / 4096) as usize;
        if !chunk.is_allocation(first, pages) {
            return Err(not_allocated);
        }
        chunk.set(first, pages, true);
        chunk.used -= pages as u16;
        inner.stats.frees += 1;
        drop(inner);
        // Not only when this free empties a chunk: an earlier return may
        // have failed and left a surplus one. The buffer is free whatever
        // becomes of the chunks.
        self.return_surplus(slot);
        Ok(())
    }

    /// Converts empty chunks beyond `keep_empty` back to private and gives
    /// them to the source, the one in `prefer` first. Each is taken out of
    /// service under the lock and converted without it.
    fn return_surplus(&self, prefer: usize) {
        loop {
            let (slot, chunk) = {
                let mut inner = self.inner.lock();
                let Some(slot) = inner.surplus(self.keep_empty, prefer) else {
                    return;
                };
                let Some(chunk) = inner.chunks[slot].take() else {
                    return;
                };
                inner.converting |= 1 << slot;
                (slot, chunk)
            };
            let result = self.converter.convert(
                Target::Physical {
                    pa: chunk.pa,
                    len: CHUNK,
                },
                Visibility::Private,
            );
            let mut inner = self.inner.lock();
            inner.converting &= !(1 << slot);
            match result {
                Ok(_) => {
                    inner.stats.chunks_held -= 1;
                    inner.stats.chunks_returned += 1;
                    drop(inner);
                    self.source.free_chunk(chunk.pa);
                }
                // Still shared and whole: it serves allocations until a
                // later free manages to return it. Trying the others now
                // would most likely fail the same way.
                Err(e) if e.changed_nothing() => {
                    inner.chunks[slot] = Some(chunk);
                    return;
                }
                // Poisoned by the engine: never handed out again.
                Err(_) => {
                    inner.stats.chunks_held -= 1;
                    inner.stats.chunks_lost += 1;
                }
            }
        }
    }
}
