//! Physical runs: maximal stretches of contiguous frames.

/// The frames of one batch: one contiguous run, or sorted, de-duplicated
/// 4 KiB frames that are merged into runs on the fly.
#[derive(Clone, Copy, Debug)]
pub enum Runs<'a> {
    /// `[pa, pa + len)`.
    One {
        /// Start.
        pa: u64,
        /// Length.
        len: u64,
    },
    /// Sorted, distinct 4 KiB frame addresses.
    Frames(&'a [u64]),
}

impl<'a> Runs<'a> {
    /// The runs as `(pa, len)`, ascending.
    pub fn iter(&self) -> RunsIter<'a> {
        match *self {
            Runs::One { pa, len } => RunsIter {
                one: Some((pa, len)),
                frames: &[],
            },
            Runs::Frames(frames) => RunsIter { one: None, frames },
        }
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.iter().map(|(_, len)| len).sum()
    }

    /// Every 4 KiB frame.
    pub fn frames(&self) -> impl Iterator<Item = u64> + 'a {
        self.iter().flat_map(|(pa, len)| (pa..pa + len).step_by(4096))
    }
}

/// Iterator over [`Runs`].
#[derive(Clone, Debug)]
pub struct RunsIter<'a> {
    one: Option<(u64, u64)>,
    frames: &'a [u64],
}

impl Iterator for RunsIter<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if let Some(run) = self.one.take() {
            return Some(run);
        }
        let (&first, rest) = self.frames.split_first()?;
        let n = 1 + rest
            .iter()
            .enumerate()
            .take_while(|&(i, &f)| f == first + 4096 * (i as u64 + 1))
            .count();
        self.frames = &self.frames[n..];
        Some((first, n as u64 * 4096))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_merge_into_runs() {
        let frames = [0x1000, 0x2000, 0x3000, 0x8000, 0xA000, 0xB000];
        let runs: [(u64, u64); 3] = [(0x1000, 0x3000), (0x8000, 0x1000), (0xA000, 0x2000)];
        assert!(Runs::Frames(&frames).iter().eq(runs));
        assert_eq!(Runs::Frames(&frames).bytes(), 6 * 4096);
        assert!(Runs::Frames(&frames).frames().eq(frames));
        assert!(Runs::One {
            pa: 0x4000,
            len: 0x2000
        }
        .frames()
        .eq([0x4000, 0x5000]));
        assert_eq!(Runs::Frames(&[]).iter().next(), None);
    }
}
