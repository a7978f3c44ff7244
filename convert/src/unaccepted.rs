//! The bitmap of memory the firmware handed over unaccepted: one bit per
//! acceptance unit, set while the unit is unaccepted.
//!
//! The layout is the one UEFI-booted Linux keeps in its unaccepted-memory
//! configuration table (bit `i` of the little-endian bitmap is the unit at
//! `phys_base + i * unit_size`), so the OS can pass the firmware's or a
//! previous kernel's bitmap as the storage, and hand it on to the next
//! kernel in turn.

use core::ops::Range;
use core::sync::atomic::Ordering;

use crate::sync::AtomicU64;

const PAGE: u64 = 4096;

/// Which acceptance units are still unaccepted, in storage the OS provides
/// (zeroed: everything accepted).
#[derive(Debug)]
pub struct UnacceptedBitmap<'a> {
    phys_base: u64,
    unit_shift: u32,
    bits: &'a [AtomicU64],
}

/// Why an [`UnacceptedBitmap`] could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BitmapError {
    /// The unit size is not a power of two of at least 4 KiB.
    InvalidUnit(u64),
    /// The base is not aligned to the unit, or the bitmap reaches past the
    /// end of the physical address space.
    InvalidBase(u64),
}

impl core::fmt::Display for BitmapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BitmapError::InvalidUnit(unit) => write!(f, "acceptance unit {unit:#x} is not a power of two >= 4 KiB"),
            BitmapError::InvalidBase(base) => {
                write!(f, "bitmap base {base:#x} is unaligned to its unit or the bitmap wraps")
            }
        }
    }
}

impl core::error::Error for BitmapError {}

impl<'a> UnacceptedBitmap<'a> {
    /// The default acceptance unit, as UEFI-booted Linux uses it.
    pub const UNIT_2M: u64 = 2 << 20;

    /// A bitmap of `bits.len() * 64` units of `unit_size` bytes from
    /// `phys_base`.
    pub fn new(phys_base: u64, unit_size: u64, bits: &'a [AtomicU64]) -> Result<Self, BitmapError> {
        if !unit_size.is_power_of_two() || unit_size < PAGE {
            return Err(BitmapError::InvalidUnit(unit_size));
        }
        let unit_shift = unit_size.trailing_zeros();
        let covered = (bits.len() as u64)
            .checked_mul(64)
            .and_then(|units| units.checked_mul(unit_size));
        let fits = covered.and_then(|c| phys_base.checked_add(c)).is_some();
        if phys_base % unit_size != 0 || !fits {
            return Err(BitmapError::InvalidBase(phys_base));
        }
        Ok(UnacceptedBitmap {
            phys_base,
            unit_shift,
            bits,
        })
    }

    /// Bytes per unit.
    pub fn unit_size(&self) -> u64 {
        1 << self.unit_shift
    }

    /// The first byte the bitmap describes.
    pub fn phys_base(&self) -> u64 {
        self.phys_base
    }

    /// How many units the bitmap describes.
    pub fn units(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// The bitmap's words, for handing it to the next kernel.
    pub fn words(&self) -> &'a [AtomicU64] {
        self.bits
    }

    /// Physical address of unit `unit`.
    pub fn unit_pa(&self, unit: u64) -> u64 {
        self.phys_base + (unit << self.unit_shift)
    }

    /// The units `[pa, end)` touches, clipped to the bitmap.
    pub fn units_touching(&self, pa: u64, end: u64) -> Range<u64> {
        let first = pa.saturating_sub(self.phys_base) >> self.unit_shift;
        let last = end.saturating_sub(self.phys_base).div_ceil(self.unit_size());
        first.min(self.units())..last.min(self.units())
    }

    /// The units lying wholly inside `[pa, end)`.
    pub fn units_inside(&self, pa: u64, end: u64) -> Range<u64> {
        let first = pa.saturating_sub(self.phys_base).div_ceil(self.unit_size());
        let last = end.saturating_sub(self.phys_base) >> self.unit_shift;
        first.min(self.units())..last.min(self.units()).max(first.min(self.units()))
    }

    /// Whether unit `unit` is unaccepted.
    pub fn is_unaccepted(&self, unit: u64) -> bool {
        self.word(unit)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (unit % 64)) != 0)
    }

    /// Whether any unit `[pa, pa + len)` touches is unaccepted, the next
    /// unit included when the range ends on a unit boundary: the unit a
    /// word-at-a-time load past the range's last byte would reach.
    pub fn range_needs_accept(&self, pa: u64, len: u64) -> bool {
        let end = guarded_end(pa.saturating_add(len), self.unit_size());
        self.units_touching(pa, end).any(|u| self.is_unaccepted(u))
    }

    /// How many units are unaccepted.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The first unaccepted unit and one past the last (`(0, 0)` if none).
    pub(crate) fn unaccepted_span(&self) -> (u64, u64) {
        let set = |(i, w): (usize, &AtomicU64)| {
            let v = w.load(Ordering::Relaxed);
            (v != 0).then_some((i as u64, v))
        };
        let first = self.bits.iter().enumerate().find_map(set);
        let last = self.bits.iter().enumerate().rev().find_map(set);
        match (first, last) {
            (Some((i, v)), Some((j, w))) => (
                i * 64 + u64::from(v.trailing_zeros()),
                j * 64 + 64 - u64::from(w.leading_zeros()),
            ),
            _ => (0, 0),
        }
    }

    pub(crate) fn set(&self, unit: u64) {
        if let Some(w) = self.word(unit) {
            w.fetch_or(1 << (unit % 64), Ordering::AcqRel);
        }
    }

    pub(crate) fn clear(&self, unit: u64) {
        if let Some(w) = self.word(unit) {
            w.fetch_and(!(1 << (unit % 64)), Ordering::AcqRel);
        }
    }

    fn word(&self, unit: u64) -> Option<&AtomicU64> {
        self.bits.get(usize::try_from(unit / 64).ok()?)
    }
}

/// `end`, extended by one unit when it lies on a unit boundary.
///
/// A kernel's `load_unaligned_zeropad` reads a whole word that may run past
/// the last byte it owns into the next page. Next to a page the guest has
/// not accepted that read cannot be fixed up: on TDX it exits to the VMM,
/// which can only end the TD; on SEV-SNP it raises a #VC the guest must
/// treat as fatal. Accepting memory up to a unit boundary therefore accepts
/// the next unit too, so the page after the last one in use is always
/// accepted. A range ending inside a unit needs nothing more: its unit is
/// accepted whole.
pub(crate) fn guarded_end(end: u64, unit: u64) -> u64 {
    if end % unit == 0 {
        end.saturating_add(unit)
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = 2 << 20;

    #[test]
    fn bits_follow_the_little_endian_layout() {
        let words: [AtomicU64; 2] = Default::default();
        let map = UnacceptedBitmap::new(1 << 30, M2, &words).unwrap();
        map.set(0);
        map.set(65);
        assert_eq!(words[0].load(Ordering::Relaxed), 1);
        assert_eq!(words[1].load(Ordering::Relaxed), 2);
        assert_eq!(map.unit_pa(65), (1 << 30) + 65 * M2);
        assert_eq!(map.count(), 2);
        map.clear(0);
        assert!(!map.is_unaccepted(0) && map.is_unaccepted(65) && !map.is_unaccepted(500));
    }

    #[test]
    fn unit_ranges_clip_to_the_bitmap() {
        let words: [AtomicU64; 1] = Default::default();
        let map = UnacceptedBitmap::new(M2 * 4, M2, &words).unwrap();
        assert_eq!(map.units_touching(M2 * 4 + 4096, M2 * 6), 0..2);
        assert_eq!(map.units_touching(0, M2 * 5), 0..1, "below the base");
        assert_eq!(map.units_touching(M2 * 60, M2 * 100), 56..64, "past the end");
        assert_eq!(map.units_inside(M2 * 4 + 4096, M2 * 7 - 4096), 1..2);
        assert_eq!(map.units_inside(M2 * 4 + 4096, M2 * 5 - 4096), 1..1, "no whole unit");
        assert_eq!(map.units_inside(0, M2), 0..0);
    }

    #[test]
    fn the_guard_unit_follows_a_range_that_ends_on_a_boundary() {
        let words: [AtomicU64; 1] = Default::default();
        let map = UnacceptedBitmap::new(0, M2, &words).unwrap();
        map.set(1);
        assert!(map.range_needs_accept(0, M2), "ends where unit 1 begins");
        assert!(!map.range_needs_accept(0, M2 - 4096), "ends inside unit 0");
        assert_eq!(guarded_end(M2, M2), 2 * M2);
        assert_eq!(guarded_end(M2 + 4096, M2), M2 + 4096);
    }

    #[test]
    fn bad_geometry_is_refused() {
        let words: [AtomicU64; 1] = Default::default();
        assert_eq!(
            UnacceptedBitmap::new(0, 3 << 20, &words).unwrap_err(),
            BitmapError::InvalidUnit(3 << 20)
        );
        assert_eq!(
            UnacceptedBitmap::new(0, 2048, &words).unwrap_err(),
            BitmapError::InvalidUnit(2048)
        );
        assert_eq!(
            UnacceptedBitmap::new(4096, M2, &words).unwrap_err(),
            BitmapError::InvalidBase(4096)
        );
        assert_eq!(
            UnacceptedBitmap::new(u64::MAX - M2 + 1, M2, &words).unwrap_err(),
            BitmapError::InvalidBase(u64::MAX - M2 + 1)
        );
    }
}
