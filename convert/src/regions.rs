//! How many frames of each 2 MiB and 1 GiB physical region are shared,
//! kept up to date by every conversion, so the question "could a table
//! over this region collapse?" is answered in O(1) instead of by reading
//! 512 entries.
//!
//! A table can collapse only if its 512 entries map one aligned region
//! with one encryption attribute, that is, only if the region's frames are
//! all private or all shared. A count strictly between those says "no" at
//! once; "maybe" is confirmed by reading the table, so a count that is
//! off (a frame the OS mapped against its state) can cost a collapse but
//! never make a wrong one.

use crate::sync::AtomicU32;
use core::sync::atomic::Ordering;

const PAGE: u64 = 4096;
const SPAN_2M: u64 = 2 << 20;
const SPAN_1G: u64 = 1 << 30;

/// Shared-frame counts per region, in storage the OS provides.
#[derive(Debug)]
pub(crate) struct Regions<'a> {
    /// Address of the first 2 MiB region covered.
    base_2m: u64,
    /// Address of the first 1 GiB region covered.
    base_1g: u64,
    counts_2m: &'a [AtomicU32],
    counts_1g: &'a [AtomicU32],
    /// The frames counted, `[first, end)`: a region not wholly inside has
    /// frames nobody counts, so its count says nothing.
    first: u64,
    end: u64,
}

/// A count that went below zero (a frame made shared behind the counts'
/// back, then converted back): unknown from then on, so it never rules a
/// collapse out again.
const UNKNOWN: u32 = u32::MAX;

/// Words of storage for the regions of frames `[base, base + 4096 * frames)`.
pub(crate) const fn words_for(base: u64, frames: usize) -> (usize, usize) {
    (
        regions_touched(base, frames, SPAN_2M),
        regions_touched(base, frames, SPAN_1G),
    )
}

const fn regions_touched(base: u64, frames: usize, span: u64) -> usize {
    if frames == 0 {
        return 0;
    }
    let end = base + frames as u64 * PAGE;
    (end.div_ceil(span) - base / span) as usize
}

impl<'a> Regions<'a> {
    /// Counts over `words` (at least `words_for(base, frames)` summed),
    /// set from the shared frames `is_shared` finds.
    pub(crate) fn new(
        base: u64,
        frames: usize,
        words: &'a [AtomicU32],
        is_shared: impl Fn(usize) -> bool,
    ) -> Option<Self> {
        let (n2m, n1g) = words_for(base, frames);
        let words = words.get(..n2m + n1g)?;
        let (counts_2m, counts_1g) = words.split_at(n2m);
        let regions = Regions {
            base_2m: base / SPAN_2M * SPAN_2M,
            base_1g: base / SPAN_1G * SPAN_1G,
            counts_2m,
            counts_1g,
            first: base,
            end: base + frames as u64 * PAGE,
        };
        for w in words {
            w.store(0, Ordering::Relaxed);
        }
        for frame in (0..frames).filter(|&i| is_shared(i)) {
            regions.add(base + frame as u64 * PAGE, PAGE, true);
        }
        Some(regions)
    }

    #[inline]
    fn count(&self, pa: u64, span: u64) -> Option<&AtomicU32> {
        let (base, counts) = if span == SPAN_2M {
            (self.base_2m, self.counts_2m)
        } else {
            (self.base_1g, self.counts_1g)
        };
        counts.get(usize::try_from(pa.wrapping_sub(base) / span).ok()?)
    }

    /// Counts `[pa, pa + len)` as shared (`true`) or no longer shared.
    pub(crate) fn add(&self, pa: u64, len: u64, shared: bool) {
        for span in [SPAN_2M, SPAN_1G] {
            let end = pa + len;
            let mut at = pa;
            while at < end {
                let stop = (at / span + 1).saturating_mul(span).min(end);
                if let Some(count) = self.count(at, span) {
                    let frames = ((stop - at) / PAGE) as u32;
                    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
                        UNKNOWN => None,
                        n if shared => Some(n.saturating_add(frames).min(UNKNOWN - 1)),
                        n => Some(n.checked_sub(frames).unwrap_or(UNKNOWN)),
                    });
                }
                at = stop;
            }
        }
    }

    /// Whether the `span`-sized region at `pa` (2 MiB or 1 GiB, aligned)
    /// may be uniform: all its frames private or all shared. `true` when
    /// the region is not counted.
    #[inline]
    pub(crate) fn may_be_uniform(&self, pa: u64, span: u64) -> bool {
        if pa < self.first || pa.saturating_add(span) > self.end {
            return true;
        }
        self.count(pa, span).is_none_or(|count| {
            let shared = count.load(Ordering::Relaxed);
            shared == 0 || shared == UNKNOWN || u64::from(shared) == span / PAGE
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn words_cover_every_region_a_frame_is_in() {
        assert_eq!(words_for(0, 0), (0, 0));
        assert_eq!(words_for(0, 512), (1, 1));
        assert_eq!(words_for(0, 513), (2, 1));
        // Unaligned: one frame either side of a 2 MiB and a 1 GiB boundary.
        assert_eq!(words_for(SPAN_1G - PAGE, 2), (2, 2));
    }

    #[test]
    fn counts_say_maybe_only_for_all_private_or_all_shared() {
        let base = SPAN_1G - SPAN_2M;
        let frames = 1024;
        let (a, b) = words_for(base, frames);
        let words: Vec<AtomicU32> = (0..a + b).map(|_| AtomicU32::new(7)).collect();
        // The first frame starts shared; the storage's 7s are overwritten.
        let r = Regions::new(base, frames, &words, |i| i == 0).unwrap();
        assert!(!r.may_be_uniform(base, SPAN_2M));
        assert!(r.may_be_uniform(SPAN_1G, SPAN_2M));
        r.add(base + PAGE, SPAN_2M - PAGE, true);
        assert!(r.may_be_uniform(base, SPAN_2M), "all shared");
        assert!(r.may_be_uniform(0, SPAN_1G), "a GiB only partly counted: maybe");
        r.add(base, SPAN_2M, false);
        assert!(r.may_be_uniform(base, SPAN_2M));
        // Below zero (a frame shared behind the counts' back): unknown.
        r.add(base, PAGE, false);
        r.add(base + PAGE, PAGE, true);
        assert!(r.may_be_uniform(base, SPAN_2M), "unknown stays maybe");
        assert!(r.may_be_uniform(4 * SPAN_1G, SPAN_2M), "not counted: maybe");
        assert!(Regions::new(base, frames, &words[..a + b - 1], |_| false).is_none());
    }
}
