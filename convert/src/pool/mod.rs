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
//! The OS gives the pool its bookkeeping storage, one [`ChunkSlot`] per
//! chunk it may hold at once (about 220 bytes each): the capacity is the
//! OS's choice, and nothing is allocated from a heap.
//!
//! Three ways to use shared memory, all over the same engine:
//! - [`SharedPool::alloc`] / [`SharedPool::free`]: bare [`SharedRange`]s,
//!   for code that tracks its buffers itself;
//! - [`SharedPool::alloc_owned`] and [`DirectShare::share`]: an
//!   [`OwnedShared`] handle, shared while it lives and given back when it
//!   drops, with volatile byte access;
//! - [`Bounce`]: DMA bounce buffers over the pool, as Linux's swiotlb.
//!
//! Thread-safe: one lock, never held across a chunk conversion (which
//! takes hypercalls and a shootdown that other CPUs must answer) nor a call
//! into the chunk source. A chunk converting meanwhile holds its slot but
//! serves no allocation. `no_std`, no heap.
//!
//! # Embedding
//!
//! A network driver receiving a packet through a bounce buffer (compiled,
//! not run):
//!
//! ```no_run
//! use coco_convert::pool::{Bounce, ChunkSlot, ChunkSource, Convert, DmaDirection, SharedPool};
//! use coco_convert::{DirectMap, EncryptionBit};
//!
//! /// 2 MiB chunks from the kernel's page allocator (order 9).
//! struct Order9;
//! // SAFETY: the page allocator hands each chunk to the pool alone.
//! unsafe impl ChunkSource for Order9 {
//!     fn allocate_chunk(&self) -> Option<u64> { /* ... */ None }
//!     fn free_chunk(&self, _pa: u64) { /* ... */ }
//! }
//!
//! /// `engine`: the conversion engine; `slots`: from the boot allocator;
//! /// `direct_map` and `encryption`: what the engine was built with.
//! fn receive(
//!     engine: &(impl Convert + Sync),
//!     slots: &'static mut [ChunkSlot],
//!     direct_map: DirectMap,
//!     encryption: EncryptionBit,
//! ) -> Result<(), coco_convert::pool::BounceError> {
//!     // Up to `slots.len()` chunks of 2 MiB; one empty chunk kept shared.
//!     let pool = SharedPool::new(engine, Order9, slots, 1);
//!     let bounce = Bounce::new(&pool, direct_map, encryption);
//!     let mut packet = [0u8; 1514];
//!     let mapping = bounce.map(&mut packet, DmaDirection::FromDevice)?;
//!     // Give the device `mapping.device_address()` and `mapping.len()`,
//!     // wait for its completion, then:
//!     mapping.unmap();
//!     // `packet` holds what the device wrote, copied once: check it there.
//!     Ok(())
//! }
//! ```

mod access;
mod bounce;
mod direct;
mod error;
mod owned;
mod slots;

use crate::sync::Mutex;

use crate::engine::{ConvertError, Engine, Report, Target};
use crate::platform::Platform;
use crate::pte::Visibility;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::tables::PhysMem;

pub use access::FrameAccess;
pub use bounce::{Bounce, BounceError, BounceMapping, DmaDirection};
pub use direct::{DirectShare, DirectStats, Reclaim};
pub use error::{OutOfBounds, PoolError, ReleaseError, ShareError};
pub use owned::OwnedShared;
pub use slots::ChunkSlot;

use owned::Home;
use slots::{Refusal, Slots};

/// Chunk size: 2 MiB, so a chunk in a direct map of 2 MiB or larger pages
/// converts as whole entries. Also the largest buffer the pool serves.
pub const CHUNK: u64 = 2 << 20;

/// Converts memory: the engine, or anything standing in for it.
pub trait Convert {
    /// Converts `target` to `to`.
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError>;

    /// Whether conversions have stopped for good
    /// ([`Engine::unshare_all`]): memory shared before is being made
    /// private, so none may be handed out as shared any more. Required: a
    /// wrapper that forgot to forward it would hand out memory that is
    /// private again.
    fn stopped(&self) -> bool;
}

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Convert for Engine<'_, M, F, T, P> {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        Engine::convert(self, target, to)
    }

    fn stopped(&self) -> bool {
        Engine::stopped(self)
    }
}

impl<C: Convert + ?Sized> Convert for &C {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        (**self).convert(target, to)
    }

    fn stopped(&self) -> bool {
        (**self).stopped()
    }
}

/// Where chunks come from.
///
/// # Safety
///
/// Every chunk `allocate_chunk` returns is 2 MiB-aligned, private, inside
/// the engine's state table, and used by nothing else (no Rust reference,
/// no device) until the pool gives it back with `free_chunk`: the pool
/// converts it and hands its bytes out to safe code through
/// [`OwnedShared`] and [`Bounce`].
pub unsafe trait ChunkSource {
    /// A chunk, or `None`.
    fn allocate_chunk(&self) -> Option<u64>;
    /// Gives a chunk back (private again).
    fn free_chunk(&self, pa: u64);
}

// SAFETY: forwarding keeps the implementation's guarantees.
unsafe impl<S: ChunkSource + ?Sized> ChunkSource for &S {
    fn allocate_chunk(&self) -> Option<u64> {
        (**self).allocate_chunk()
    }
    fn free_chunk(&self, pa: u64) {
        (**self).free_chunk(pa)
    }
}

/// A range of shared memory the pool handed out: physically contiguous, a
/// plain description (`Copy`) that owns nothing. [`OwnedShared`] is the
/// owning handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedRange {
    /// Physical address (4 KiB aligned).
    pub pa: u64,
    /// Bytes (a multiple of 4 KiB).
    pub len: u64,
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
    /// Chunks lost to a failed conversion (poisoned by the engine): never
    /// handed out again nor given to the source.
    pub chunks_lost: u64,
    /// Chunks held now.
    pub chunks_held: u64,
}

struct Inner<'a> {
    slots: Slots<'a>,
    stats: PoolStats,
}

impl Inner<'_> {
    fn hand_out(&mut self, slot: usize, page: usize, pages: usize, owned: bool) -> Result<SharedRange, PoolError> {
        let range = self
            .slots
            .hand_out(slot, page, pages, owned)
            .ok_or(PoolError::Exhausted)?;
        self.stats.allocations += 1;
        Ok(range)
    }
}

/// The shared-memory pool, its chunk bookkeeping in the `'a` storage the
/// OS gave it.
pub struct SharedPool<'a, C: Convert, S: ChunkSource> {
    converter: C,
    source: S,
    keep_empty: usize,
    capacity: usize,
    inner: Mutex<Inner<'a>>,
}

impl<C: Convert, S: ChunkSource> core::fmt::Debug for SharedPool<'_, C, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedPool")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<'a, C: Convert, S: ChunkSource> SharedPool<'a, C, S> {
    /// A pool converting through `converter`, chunks from `source`, holding
    /// at most `slots.len()` chunks at once (any number, 0 included: such
    /// a pool serves nothing), keeping up to `keep_empty` empty chunks
    /// shared. The slots are reset.
    pub fn new(converter: C, source: S, slots: &'a mut [ChunkSlot], keep_empty: usize) -> Self {
        let mut slots = Slots(slots);
        slots.reset();
        SharedPool {
            converter,
            source,
            keep_empty,
            capacity: slots.0.len(),
            inner: Mutex::new(Inner {
                slots,
                stats: PoolStats::default(),
            }),
        }
    }

    /// The most chunks the pool holds at once: its slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// What the pool has done.
    pub fn stats(&self) -> PoolStats {
        self.inner.lock().stats
    }

    /// A shared buffer of `bytes` (rounded up to 4 KiB, at most [`CHUNK`]).
    /// Once the engine has stopped conversions ([`Engine::unshare_all`]),
    /// refused with `PoolError::Convert(ConvertError::Stopped)`.
    pub fn alloc(&self, bytes: u64) -> Result<SharedRange, PoolError> {
        self.allocate(bytes, false)
    }

    /// Gives `range` back: exactly a range `alloc` returned and not yet
    /// freed. Anything else (a part of one, a span of several, a stale
    /// copy, the range of an [`OwnedShared`]) is refused with nothing
    /// changed. An emptied chunk beyond `keep_empty` goes back to private
    /// and to the source.
    pub fn free(&self, range: SharedRange) -> Result<(), PoolError> {
        self.release(range, false)
    }

    /// An owned shared buffer of `bytes` (rounded up to 4 KiB, at most
    /// [`CHUNK`]), its bytes reached through `access`. It goes back to the
    /// pool when dropped or [released](OwnedShared::release).
    pub fn alloc_owned<A: FrameAccess + ?Sized>(&self, bytes: u64, access: &A) -> Result<OwnedShared<'_>, PoolError>
    where
        Self: Sync,
    {
        let range = self.allocate(bytes, true)?;
        let Some(ptr) = access.bytes(range.pa, range.len) else {
            let _ = self.release(range, true);
            return Err(PoolError::Unreachable {
                pa: range.pa,
                len: range.len,
            });
        };
        // SAFETY: the range is shared, and the pool hands it to nobody
        // else until the handle gives it back (the chunk source's
        // contract: nothing else uses the chunk); `access` reaches it
        // (its contract).
        Ok(unsafe { OwnedShared::new(range, ptr, self) })
    }

    fn allocate(&self, bytes: u64, owned: bool) -> Result<SharedRange, PoolError> {
        if bytes == 0 || bytes > CHUNK {
            return Err(PoolError::BadSize(bytes));
        }
        // After `unshare_all` the chunks are private again: a buffer from
        // one would reach the host no more.
        if self.converter.stopped() {
            return Err(PoolError::Convert(ConvertError::Stopped));
        }
        let pages = bytes.div_ceil(4096) as usize;
        let slot = {
            let mut inner = self.inner.lock();
            if let Some((slot, page)) = inner.slots.fitting(pages) {
                return inner.hand_out(slot, page, pages, owned);
            }
            inner
                .slots
                .take_idle()
                .ok_or(PoolError::AtCapacity { slots: self.capacity })?
        };
        let added = self.new_chunk();
        let mut inner = self.inner.lock();
        inner.slots.settle(slot, added.as_ref().ok().copied());
        match added {
            Ok(_) => {
                inner.stats.chunks_shared += 1;
                inner.stats.chunks_held += 1;
                inner.hand_out(slot, 0, pages, owned)
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

    fn release(&self, range: SharedRange, owned: bool) -> Result<(), PoolError> {
        let mut inner = self.inner.lock();
        let slot = inner.slots.give_back(range, owned).map_err(|refusal| match refusal {
            Refusal::NotAllocated => PoolError::NotAllocated(range),
            Refusal::Ownership => PoolError::Owned(range),
        })?;
        inner.stats.frees += 1;
        // Not only when this free empties a chunk: an earlier return may
        // have failed and left a surplus one. The buffer is free whatever
        // becomes of the chunks.
        let surplus = inner.slots.surplus(self.keep_empty, slot).is_some();
        drop(inner);
        if surplus {
            self.return_surplus(slot);
        }
        Ok(())
    }

    /// Converts empty chunks beyond `keep_empty` back to private and gives
    /// them to the source, the one in `prefer` first. Each is taken out of
    /// service under the lock and converted without it.
    fn return_surplus(&self, prefer: usize) {
        loop {
            let (slot, chunk) = {
                let mut inner = self.inner.lock();
                let Some(slot) = inner.slots.surplus(self.keep_empty, prefer) else {
                    return;
                };
                let Some(chunk) = inner.slots.take_chunk(slot) else {
                    return;
                };
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
            match result {
                Ok(_) => {
                    inner.slots.settle(slot, None);
                    inner.stats.chunks_held -= 1;
                    inner.stats.chunks_returned += 1;
                    drop(inner);
                    self.source.free_chunk(chunk.pa);
                }
                // Still shared and whole: it serves allocations until a
                // later free manages to return it. Trying the others now
                // would most likely fail the same way.
                Err(e) if e.changed_nothing() => {
                    inner.slots.restore(slot, chunk);
                    return;
                }
                // Poisoned by the engine: never handed out again.
                Err(_) => {
                    inner.slots.settle(slot, None);
                    inner.stats.chunks_held -= 1;
                    inner.stats.chunks_lost += 1;
                }
            }
        }
    }
}

impl<C: Convert, S: ChunkSource> Home for SharedPool<'_, C, S>
where
    Self: Sync,
{
    fn take_back(&self, range: SharedRange) -> Result<(), ReleaseError> {
        // Only a handle this pool made can call this, once: a refusal
        // would be the pool's own bug, and the pages then stay allocated
        // (lost to the pool, never handed out twice).
        let refused = self.release(range, true);
        debug_assert!(refused.is_ok(), "{refused:?}");
        Ok(())
    }
}
