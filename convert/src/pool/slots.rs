//! The pool's per-chunk bookkeeping, in storage the OS gives: one
//! [`ChunkSlot`] per chunk the pool may hold at once. Everything here runs
//! under the pool's lock, which the pool holds through its exclusive
//! borrow of the slots; nothing here converts or calls out.

use super::{SharedRange, CHUNK};

const PAGES: usize = 512;
const WORDS: usize = PAGES / 64;
const PAGE: u64 = 4096;

/// Room for one chunk in a pool: its page bitmaps and state (about 220
/// bytes). The OS gives a pool as many as it may hold chunks at once, in
/// any storage (a `static`, a boot-time allocation);
/// [`SharedPool::new`](super::SharedPool::new) resets them.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkSlot(Slot);

impl ChunkSlot {
    /// An empty slot.
    pub const fn new() -> Self {
        ChunkSlot(Slot::Idle)
    }
}

// The slot is the chunk's storage, so its size is the held variant's by
// design (boxing it would need a heap).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, Default)]
enum Slot {
    /// No chunk.
    #[default]
    Idle,
    /// Its chunk is being converted with the lock dropped: the slot is
    /// taken (another CPU must not put a chunk there) but serves nothing.
    Converting,
    /// A shared chunk serving allocations.
    Held(Chunk),
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Chunk {
    pub(super) pa: u64,
    /// One bit per page, set = free.
    free: [u64; WORDS],
    /// One bit per page, set = first page of a live allocation. With `free`
    /// it gives every allocation's bounds, so `free` can tell the buffer it
    /// handed out from a part of it, a span of two, or a stale copy of one
    /// whose pages were handed out again.
    starts: [u64; WORDS],
    /// Set at the first page of an allocation an owning handle holds: only
    /// the handle may give it back, so a stray `free` of a copied range
    /// cannot pull the pages from under it.
    owned: [u64; WORDS],
    pub(super) used: u16,
}

fn bit(bits: &[u64; WORDS], page: usize) -> bool {
    bits[page / 64] & (1 << (page % 64)) != 0
}

fn put(bits: &mut [u64; WORDS], page: usize, value: bool) {
    if value {
        bits[page / 64] |= 1 << (page % 64);
    } else {
        bits[page / 64] &= !(1 << (page % 64));
    }
}

impl Chunk {
    fn new(pa: u64) -> Self {
        Chunk {
            pa,
            free: [!0; WORDS],
            starts: [0; WORDS],
            owned: [0; WORDS],
            used: 0,
        }
    }

    fn is_free(&self, page: usize) -> bool {
        bit(&self.free, page)
    }

    fn is_start(&self, page: usize) -> bool {
        bit(&self.starts, page)
    }

    /// Marks the allocation of `count` pages at `first` as handed out
    /// (held by a handle if `owned`), or as given back.
    fn set(&mut self, first: usize, count: usize, free: bool, owned: bool) {
        for page in first..first + count {
            put(&mut self.free, page, free);
        }
        put(&mut self.starts, first, !free);
        put(&mut self.owned, first, !free && owned);
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

/// Why a range could not be given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not exactly one live allocation.
    NotAllocated,
    /// One, but a handle holds it (or, for a handle, one no handle holds).
    Ownership,
}

/// The slots, seen under the pool's lock.
pub(super) struct Slots<'a>(pub(super) &'a mut [ChunkSlot]);

impl Slots<'_> {
    pub(super) fn reset(&mut self) {
        self.0.fill(ChunkSlot::new());
    }

    fn held(&self) -> impl Iterator<Item = (usize, &Chunk)> {
        self.0.iter().enumerate().filter_map(|(i, s)| match &s.0 {
            Slot::Held(c) => Some((i, c)),
            _ => None,
        })
    }

    /// A fitting run of pages: in a partly used chunk first, so that empty
    /// ones can go back.
    pub(super) fn fitting(&self, pages: usize) -> Option<(usize, usize)> {
        let fits = |empty: bool| {
            self.held()
                .filter(|(_, c)| (c.used == 0) == empty)
                .find_map(|(i, c)| c.find(pages).map(|page| (i, page)))
        };
        fits(false).or_else(|| fits(true))
    }

    pub(super) fn hand_out(&mut self, slot: usize, page: usize, pages: usize, owned: bool) -> Option<SharedRange> {
        let Slot::Held(chunk) = &mut self.0[slot].0 else {
            return None;
        };
        chunk.set(page, pages, false, owned);
        chunk.used += pages as u16;
        Some(SharedRange {
            pa: chunk.pa + page as u64 * PAGE,
            len: pages as u64 * PAGE,
        })
    }

    /// A slot with no chunk and none converting into it, taken for a
    /// conversion.
    pub(super) fn take_idle(&mut self) -> Option<usize> {
        let slot = self.0.iter().position(|s| matches!(s.0, Slot::Idle))?;
        self.0[slot].0 = Slot::Converting;
        Some(slot)
    }

    /// Ends a conversion into `slot`: the chunk now shared, or none.
    pub(super) fn settle(&mut self, slot: usize, chunk: Option<u64>) {
        self.0[slot].0 = chunk.map_or(Slot::Idle, |pa| Slot::Held(Chunk::new(pa)));
    }

    /// Puts back a chunk whose conversion changed nothing.
    pub(super) fn restore(&mut self, slot: usize, chunk: Chunk) {
        self.0[slot].0 = Slot::Held(chunk);
    }

    /// Gives `range` back, if it is exactly one live allocation held by a
    /// handle (`owned`) or by nobody; returns its slot.
    pub(super) fn give_back(&mut self, range: SharedRange, owned: bool) -> Result<usize, Refusal> {
        // Bounded before any arithmetic on it: the range may be anything.
        if range.len == 0 || range.len > CHUNK || (range.pa | range.len) % PAGE != 0 {
            return Err(Refusal::NotAllocated);
        }
        let pages = (range.len / PAGE) as usize;
        let (slot, chunk) = self
            .0
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| match &mut s.0 {
                Slot::Held(c) if range.pa >= c.pa && range.pa - c.pa < CHUNK => Some((i, c)),
                _ => None,
            })
            .ok_or(Refusal::NotAllocated)?;
        let first = ((range.pa - chunk.pa) / PAGE) as usize;
        if !chunk.is_allocation(first, pages) {
            return Err(Refusal::NotAllocated);
        }
        if bit(&chunk.owned, first) != owned {
            return Err(Refusal::Ownership);
        }
        chunk.set(first, pages, true, false);
        chunk.used -= pages as u16;
        Ok(slot)
    }

    /// An empty chunk beyond `keep_empty`, the one in `prefer` first.
    pub(super) fn surplus(&self, keep_empty: usize, prefer: usize) -> Option<usize> {
        let empty = |s: &ChunkSlot| matches!(s.0, Slot::Held(c) if c.used == 0);
        if self.0.iter().filter(|s| empty(s)).count() <= keep_empty {
            return None;
        }
        Some(prefer)
            .filter(|&s| self.0.get(s).is_some_and(empty))
            .or_else(|| self.0.iter().position(empty))
    }

    /// Takes the chunk out of `slot` for a conversion; the slot stays
    /// taken until [`settle`](Self::settle) or [`restore`](Self::restore).
    pub(super) fn take_chunk(&mut self, slot: usize) -> Option<Chunk> {
        match core::mem::replace(&mut self.0[slot].0, Slot::Converting) {
            Slot::Held(c) => Some(c),
            other => {
                self.0[slot].0 = other;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_as_large_as_its_docs_say() {
        assert!(core::mem::size_of::<ChunkSlot>() <= 224);
    }
}
