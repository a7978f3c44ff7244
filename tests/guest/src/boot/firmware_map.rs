//! The firmware's memory map, kept past the exit from boot services: which
//! memory the guest may use, which the firmware keeps (runtime services,
//! ACPI, reserved), and which it hands over unaccepted (UEFI 2.9+ type 15,
//! `EfiUnacceptedMemoryType`, what TDVF and the OVMF AMD SEV build report
//! for memory the guest must accept or validate before its first use).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// UEFI 2.10, section 7.2 (`EFI_MEMORY_TYPE`): the types the guest tells
/// apart.
mod kind {
    pub const LOADER_CODE: u32 = 1;
    pub const LOADER_DATA: u32 = 2;
    pub const BOOT_SERVICES_CODE: u32 = 3;
    pub const BOOT_SERVICES_DATA: u32 = 4;
    pub const CONVENTIONAL: u32 = 7;
    pub const UNACCEPTED: u32 = 15;
}

/// What the guest makes of one range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Free once boot services have exited (conventional memory, and the
    /// firmware's boot-services code and data).
    Free,
    /// The guest's own image and the pages it allocated before the exit.
    Guest,
    /// Handed over unaccepted: free once accepted.
    Unaccepted,
    /// The firmware's, or not memory: runtime services, ACPI, reserved,
    /// MMIO, persistent memory, anything unknown.
    Firmware,
}

impl Use {
    fn of(kind: u32) -> Use {
        match kind {
            kind::CONVENTIONAL | kind::BOOT_SERVICES_CODE | kind::BOOT_SERVICES_DATA => Use::Free,
            kind::LOADER_CODE | kind::LOADER_DATA => Use::Guest,
            kind::UNACCEPTED => Use::Unaccepted,
            _ => Use::Firmware,
        }
    }
}

/// A malformed map: the firmware broke its own format.
#[derive(Debug)]
pub enum MapError {
    /// Descriptors smaller than the UEFI 2.0 layout (40 bytes), or not
    /// 8-byte multiples.
    DescriptorSize(usize),
    /// A version other than 1 (`EFI_MEMORY_DESCRIPTOR_VERSION`).
    Version(u32),
    /// A range whose end overflows, or that is not page-aligned.
    Range { start: u64, pages: u64 },
    /// More ranges than the guest keeps.
    TooMany,
    /// A map whose size is not a whole number of descriptors (GetMemoryMap
    /// returns whole ones, UEFI 2.10 section 7.2).
    Length { bytes: usize, descriptor_size: usize },
    /// Two descriptors describe the same memory (GetMemoryMap's ranges do
    /// not overlap): which one is right cannot be told.
    Overlap { first: u64, second: u64 },
}

const MAX_RANGES: usize = 512;
static STARTS: [AtomicU64; MAX_RANGES] = [const { AtomicU64::new(0) }; MAX_RANGES];
static ENDS: [AtomicU64; MAX_RANGES] = [const { AtomicU64::new(0) }; MAX_RANGES];
static KINDS: [AtomicU64; MAX_RANGES] = [const { AtomicU64::new(0) }; MAX_RANGES];
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Keeps the map `bytes` (descriptors `descriptor_size` apart, of format
/// `version`). Takes no lock and allocates nothing: it runs between
/// GetMemoryMap and ExitBootServices.
pub fn record(bytes: &[u8], descriptor_size: usize, version: u32) -> Result<u64, MapError> {
    if descriptor_size < 40 || descriptor_size & 7 != 0 {
        return Err(MapError::DescriptorSize(descriptor_size));
    }
    if version != 1 {
        return Err(MapError::Version(version));
    }
    if bytes.len().checked_rem(descriptor_size) != Some(0) {
        return Err(MapError::Length {
            bytes: bytes.len(),
            descriptor_size,
        });
    }
    let count = bytes.len() / descriptor_size;
    if count > MAX_RANGES {
        return Err(MapError::TooMany);
    }
    let word = |d: &[u8], at: usize| u64::from_le_bytes(d[at..at + 8].try_into().unwrap_or([0; 8]));
    // EFI_MEMORY_DESCRIPTOR: Type (u32), pad, PhysicalStart, VirtualStart,
    // NumberOfPages, Attribute.
    let decode = |d: &[u8]| {
        let kind = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let (start, pages) = (word(d, 8), word(d, 24));
        pages
            .checked_mul(4096)
            .and_then(|len| start.checked_add(len))
            .filter(|_| start & 0xFFF == 0)
            .map(|end| (start, end, kind))
            .ok_or(MapError::Range { start, pages })
    };
    // All checked before any is kept: a refused map leaves the last good
    // one whole.
    for (i, d) in bytes.chunks_exact(descriptor_size).enumerate() {
        let (start, end, _) = decode(d)?;
        // Pairwise (at most 512 ranges, no allocation this early): every
        // sum over kept ranges below relies on no byte being counted twice.
        for other in bytes.chunks_exact(descriptor_size).skip(i + 1) {
            let (other_start, other_end, _) = decode(other)?;
            if start < other_end && other_start < end {
                return Err(MapError::Overlap {
                    first: start,
                    second: other_start,
                });
            }
        }
    }
    for (i, d) in bytes.chunks_exact(descriptor_size).enumerate() {
        let (start, end, kind) = decode(d)?;
        STARTS[i].store(start, Ordering::Relaxed);
        ENDS[i].store(end, Ordering::Relaxed);
        KINDS[i].store(kind as u64, Ordering::Relaxed);
    }
    COUNT.store(count, Ordering::Release);
    Ok(count as u64)
}

/// Every range kept, as `(start, end, use)`.
pub fn ranges() -> impl Iterator<Item = (u64, u64, Use)> {
    (0..COUNT.load(Ordering::Acquire)).map(|i| {
        (
            STARTS[i].load(Ordering::Relaxed),
            ENDS[i].load(Ordering::Relaxed),
            Use::of(KINDS[i].load(Ordering::Relaxed) as u32),
        )
    })
}

/// Whether every byte of `[start, end)` is described as one of `wanted`.
pub fn all(start: u64, end: u64, wanted: &[Use]) -> bool {
    // `record` keeps no overlapping ranges, so the covered bytes add up
    // (and within one address space, cannot overflow).
    let covered: u64 = ranges()
        .filter(|&(_, _, u)| wanted.contains(&u))
        .map(|(s, e, _)| e.min(end).saturating_sub(s.max(start)))
        .sum();
    covered == end - start
}

/// The first range in `[start, end)` not described as one of `wanted`.
pub fn first_other(start: u64, end: u64, wanted: &[Use]) -> Option<(u64, u64, Use)> {
    ranges().find(|&(s, e, u)| !wanted.contains(&u) && s < end && e > start)
}

fn bytes_of(wanted: Use) -> u64 {
    ranges().filter(|&(_, _, u)| u == wanted).map(|(s, e, _)| e - s).sum()
}

pub fn free_bytes() -> u64 {
    bytes_of(Use::Free)
}

pub fn unaccepted_bytes() -> u64 {
    bytes_of(Use::Unaccepted)
}
