//! TLB shootdowns: what the engine asks of the OS, batched.

/// A virtual range to invalidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaRange {
    /// Start (page aligned).
    pub va: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Invalidates translations on every CPU.
///
/// The engine calls this in two cases, never with one of its locks held:
/// - after it made leaf entries not present, with their virtual ranges;
/// - before it frees page-table pages a collapse replaced by a huge leaf,
///   with each replaced table's whole region (2 MiB or 1 GiB).
///
/// When `shootdown` returns, no CPU may hold, for any address in `ranges`
/// (everything, if `ranges` is empty):
/// - a TLB entry, global entries and entries of every PCID included;
/// - a paging-structure-cache entry (PML5E, PML4E, PDPTE or PDE cache)
///   on the path to it, for any PCID.
///
/// How an x86 OS meets this:
/// - Intel `INVLPG` invalidates the page's TLB entries, global ones
///   included, and *all* paging-structure-cache entries, but only for the
///   current PCID (SDM vol. 3A, 4.10.4.1). With PCIDs, kernel mappings
///   also need `INVPCID` (type 0 for each PCID in use, or type 2) or a CR4
///   write that clears and sets PGE/PCIDE.
/// - AMD `INVLPGB` must be issued with "final translation only" (rAX bit
///   4) clear and "include global" (bit 3) set, followed by `TLBSYNC`.
/// - A full flush (all PCIDs, global entries included) always qualifies;
///   an OS may flush more than asked, e.g. everything beyond a ceiling of
///   pages as Linux does.
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
            // A range may end at the top of the address space.
            if last.va.checked_add(last.len) == Some(va) {
                last.len = last.len.saturating_add(len);
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
