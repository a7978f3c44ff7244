//! Physical runs: maximal stretches of contiguous frames.

const PAGE: u64 = 4096;

/// The frames of one platform call: one contiguous run, or sorted,
/// disjoint extents that are merged into runs on the fly.
#[derive(Clone, Copy, Debug)]
pub enum Runs<'a> {
    /// `[pa, pa + len)`.
    One {
        /// Start.
        pa: u64,
        /// Length.
        len: u64,
    },
    /// Sorted, disjoint extents, each `pa | (pages - 1)` for a 4 KiB
    /// aligned `pa` and 1 to 4096 pages.
    Extents(&'a [u64]),
}

impl<'a> Runs<'a> {
    /// The runs as `(pa, len)`, ascending, adjacent extents merged.
    pub fn iter(&self) -> RunsIter<'a> {
        match *self {
            Runs::One { pa, len } => RunsIter {
                one: Some((pa, len)),
                extents: &[],
            },
            Runs::Extents(extents) => RunsIter { one: None, extents },
        }
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.iter().map(|(_, len)| len).sum()
    }

    /// Every 4 KiB frame.
    pub fn frames(&self) -> impl Iterator<Item = u64> + 'a {
        self.iter().flat_map(|(pa, len)| (pa..pa + len).step_by(PAGE as usize))
    }

    /// Whether the frames came from a scattered (vmalloc-style) range.
    pub fn is_scattered(&self) -> bool {
        matches!(self, Runs::Extents(_))
    }
}

/// The most pages one extent describes (its count lives in the low 12
/// bits).
pub(crate) const EXTENT_PAGES: u64 = 4096;

/// An extent in one `u64`: `pa | (pages - 1)`, 1 to [`EXTENT_PAGES`] pages.
pub(crate) const fn extent(pa: u64, pages: u64) -> u64 {
    pa | (pages - 1)
}

/// `(pa, bytes)` of an extent.
pub(crate) const fn decode(e: u64) -> (u64, u64) {
    (e & !(PAGE - 1), ((e & (PAGE - 1)) + 1) * PAGE)
}

/// Iterator over [`Runs`].
#[derive(Clone, Debug)]
pub struct RunsIter<'a> {
    one: Option<(u64, u64)>,
    extents: &'a [u64],
}

impl Iterator for RunsIter<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if let Some(run) = self.one.take() {
            return Some(run);
        }
        let (&first, mut rest) = self.extents.split_first()?;
        let (pa, mut len) = decode(first);
        while let Some((&next, after)) = rest.split_first() {
            let (npa, nlen) = decode(next);
            if npa != pa + len {
                break;
            }
            len += nlen;
            rest = after;
        }
        self.extents = rest;
        Some((pa, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_into_runs() {
        let extents = [0x1000 | 2, 0x4000, 0x8000, 0xA000 | 1, 0x20_0000 | 511];
        let runs: [(u64, u64); 4] = [
            (0x1000, 0x4000),
            (0x8000, 0x1000),
            (0xA000, 0x2000),
            (0x20_0000, 2 << 20),
        ];
        assert!(Runs::Extents(&extents).iter().eq(runs));
        assert_eq!(Runs::Extents(&extents).bytes(), 7 * 4096 + (2 << 20));
        assert!(Runs::Extents(&extents[..3])
            .frames()
            .eq([0x1000, 0x2000, 0x3000, 0x4000, 0x8000]));
        assert!(Runs::One {
            pa: 0x4000,
            len: 0x2000
        }
        .frames()
        .eq([0x4000, 0x5000]));
        assert_eq!(Runs::Extents(&[]).iter().next(), None);
    }
}
