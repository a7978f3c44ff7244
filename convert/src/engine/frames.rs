//! The frames of one conversion, and how the transaction's passes visit
//! them.
//!
//! A linear range (physical, or in the direct map or a registered alias)
//! is one physical run. A frame list is sorted already, each frame an
//! extent of one page, so every pass reads it as it is. A vmalloc-style
//! range is whatever its entries map:
//! each pass walks the range's entries again (they stay in place, present
//! or made not present by the engine) and hands the frames over in chunks
//! of sorted, merged extents that fit the caller's scratch, so a range of
//! any size is one transaction with no heap.

use crate::leaves::{pieces, Piece};
use crate::platform::{decode, extent, Runs, EXTENT_PAGES};
use crate::tables::{PhysMem, Tables};

const PAGE: u64 = 4096;

/// The frames of one conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frames<'f> {
    /// `[pa, pa + len)`.
    Linear { pa: u64, len: u64 },
    /// The frames the entries of `[va, va + len)` map.
    Mapped { va: u64, len: u64 },
    /// Strictly ascending 4 KiB aligned frames.
    List(&'f [u64]),
}

/// Appends `[pa, pa + len)` to `out[..*n]`, growing the last extent where
/// contiguous; calls `flush` when `out` is full.
fn push<E>(
    out: &mut [u64],
    n: &mut usize,
    mut pa: u64,
    mut len: u64,
    flush: &mut impl FnMut(&mut [u64]) -> Result<(), E>,
) -> Result<(), E> {
    while len > 0 {
        if let Some(last) = n.checked_sub(1).map(|i| &mut out[i]) {
            let (lpa, llen) = decode(*last);
            let room = EXTENT_PAGES * PAGE - llen;
            if lpa + llen == pa && room > 0 {
                let grow = room.min(len);
                *last = extent(lpa, (llen + grow) / PAGE);
                pa += grow;
                len -= grow;
                continue;
            }
        }
        if *n == out.len() {
            let used = normalize(&mut out[..*n]);
            flush(&mut out[..used])?;
            *n = 0;
        }
        let take = len.min(EXTENT_PAGES * PAGE);
        out[*n] = extent(pa, take / PAGE);
        *n += 1;
        pa += take;
        len -= take;
    }
    Ok(())
}

/// Sorts extents and merges overlapping and adjacent ones (a frame mapped
/// twice appears once); returns how many remain. The output never
/// outgrows the input: a union of k extents of at most `EXTENT_PAGES`
/// pages needs at most k.
pub(crate) fn normalize(extents: &mut [u64]) -> usize {
    extents.sort_unstable();
    let mut w = 0;
    let mut current: Option<(u64, u64)> = None;
    let emit = |extents: &mut [u64], w: &mut usize, (pa, end): (u64, u64)| {
        let mut at = pa;
        while at < end {
            let pages = ((end - at) / PAGE).min(EXTENT_PAGES);
            extents[*w] = extent(at, pages);
            *w += 1;
            at += pages * PAGE;
        }
    };
    for r in 0..extents.len() {
        let (pa, len) = decode(extents[r]);
        current = match current {
            Some((start, end)) if pa <= end => Some((start, end.max(pa + len))),
            Some(done) => {
                emit(extents, &mut w, done);
                Some((pa, pa + len))
            }
            None => Some((pa, pa + len)),
        };
    }
    if let Some(done) = current {
        emit(extents, &mut w, done);
    }
    w
}

/// One pass's share of a conversion's frames.
pub(crate) enum Chunk<'s> {
    /// A linear conversion's whole run.
    One { pa: u64, len: u64 },
    /// Sorted, disjoint extents of a mapped range, which a pass may rewrite
    /// in place.
    Extents(&'s mut [u64]),
    /// A whole frame list: one-page extents, distinct, ascending.
    List(&'s [u64]),
}

impl Chunk<'_> {
    pub fn runs(&self) -> Runs<'_> {
        match self {
            Chunk::One { pa, len } => Runs::One { pa: *pa, len: *len },
            Chunk::Extents(e) => Runs::Extents(e),
            Chunk::List(frames) => Runs::Extents(frames),
        }
    }
}

/// Calls `f` with the frames of `frames`: the linear run or the list at
/// once, a mapped range chunk by chunk through `scratch`.
pub(crate) fn for_each_chunk<M: PhysMem, E>(
    t: &Tables<'_, M>,
    frames: Frames<'_>,
    scratch: &mut [u64],
    mut f: impl FnMut(Chunk<'_>) -> Result<(), E>,
) -> Result<(), E> {
    match frames {
        Frames::Linear { pa, len } => f(Chunk::One { pa, len }),
        Frames::List(list) => f(Chunk::List(list)),
        Frames::Mapped { va, len } => {
            let mut n = 0;
            let mut flush = |chunk: &mut [u64]| f(Chunk::Extents(chunk));
            let walked = pieces(t, va, len, false, |p: Piece| {
                push(scratch, &mut n, p.pa, p.len, &mut flush)
            })?;
            debug_assert!(walked.is_ok(), "a mapped range of a conversion in flight stays mapped");
            if n > 0 {
                let used = normalize(&mut scratch[..n]);
                flush(&mut scratch[..used])?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn extents_round_trip() {
        assert_eq!(decode(extent(0x1234_5000, 1)), (0x1234_5000, 4096));
        assert_eq!(decode(extent(0x4000_0000, 4096)), (0x4000_0000, 16 << 20));
    }

    #[test]
    fn normalize_merges_duplicates_overlaps_and_neighbours() {
        let mut v = [
            extent(0x5000, 1),
            extent(0x1000, 2),
            extent(0x5000, 1),
            extent(0x2000, 1),
            extent(0x3000, 1),
            extent(0x20_0000, 512),
            extent(0x20_0000 + 7 * 4096, 1),
        ];
        let n = normalize(&mut v);
        assert_eq!(&v[..n], &[extent(0x1000, 3), extent(0x5000, 1), extent(0x20_0000, 512)]);
    }

    #[test]
    fn long_runs_split_into_extents_of_at_most_16_mib() {
        let mut out = [0u64; 4];
        let mut n = 0;
        let mut chunks = std::vec::Vec::new();
        let mut flush = |c: &mut [u64]| -> Result<(), ()> {
            chunks.push(c.to_vec());
            Ok(())
        };
        push(&mut out, &mut n, 0, 1 << 30, &mut flush).unwrap();
        assert_eq!(chunks.len(), 15, "64 extents of 16 MiB, four per chunk");
        assert!(chunks.iter().flatten().all(|&e| decode(e).1 == 16 << 20));
    }
}
