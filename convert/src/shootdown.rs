//! TLB shootdowns: what the engine asks of the OS, batched.

/// A virtual range to invalidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaRange {
    /// Start (page aligned).
    pub va: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Invalidates TLB entries (and paging-structure caches) on every CPU.
pub trait TlbShootdown {
    /// Invalidates `ranges` on all CPUs and returns when every CPU has
    /// done so. An empty slice means everything.
    fn shootdown(&self, ranges: &[VaRange]);
}

impl<T: TlbShootdown + ?Sized> TlbShootdown for &T {
    fn shootdown(&self, ranges: &[VaRange]) {
        (**self).shootdown(ranges)
    }
}

/// Ranges gathered for one shootdown: up to `MAX` distinct ranges (adjacent
/// ones merged); past that, everything is flushed.
pub(crate) struct ShootdownSet {
    ranges: [VaRange; Self::MAX],
    len: usize,
    everything: bool,
}

impl ShootdownSet {
    const MAX: usize = 8;

    pub const fn new() -> Self {
        ShootdownSet {
            ranges: [VaRange { va: 0, len: 0 }; Self::MAX],
            len: 0,
            everything: false,
        }
    }

    pub fn add(&mut self, va: u64, len: u64) {
        if self.everything || len == 0 {
            return;
        }
        if let Some(last) = self.ranges[..self.len].last_mut() {
            if last.va + last.len == va {
                last.len += len;
                return;
            }
        }
        if self.len == Self::MAX {
            self.everything = true;
        } else {
            self.ranges[self.len] = VaRange { va, len };
            self.len += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && !self.everything
    }

    pub fn ranges(&self) -> &[VaRange] {
        if self.everything {
            &[]
        } else {
            &self.ranges[..self.len]
        }
    }
}
