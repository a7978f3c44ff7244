//! PVALIDATE: the guest's half of the RMP (AMD APM vol. 3, "PVALIDATE").

use crate::hypervisor::{Pvalidate, RawPvalidate};

/// Page size operand of PVALIDATE (ECX) and of PSC entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Size4K = 0,
    /// 2 MiB.
    Size2M = 1,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 0x1000,
            PageSize::Size2M => 0x20_0000,
        }
    }
}

/// `PVALIDATE_FAIL_INPUT`: bad operands (alignment, size, address).
pub const FAIL_INPUT: u32 = 1;
/// `PVALIDATE_FAIL_SIZEMISMATCH`: the RMP entry's page size differs from
/// the one requested.
pub const FAIL_SIZEMISMATCH: u32 = 6;

/// CPUID Fn8000_001F EBX bit 31, COHERENCY_SFW_NO: the CPU keeps caches
/// coherent when a page becomes private, so software need not evict the
/// page's cache lines after validating it (AMD's mitigation for stale
/// lines, which Linux applies since 2025 on CPUs without the bit).
pub const COHERENCY_SFW_NO: u32 = 1 << 31;

/// Whether CPUID Fn8000_001F EBX `ebx` reports COHERENCY_SFW_NO.
pub const fn coherency_sfw_no(ebx: u32) -> bool {
    ebx & COHERENCY_SFW_NO != 0
}

/// A PVALIDATE that did not change the page as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PvalidateError {
    /// `FAIL_INPUT`.
    FailInput,
    /// `FAIL_SIZEMISMATCH`.
    SizeMismatch,
    /// CF = 1: the Validated bit already had the requested value. For a
    /// conversion this is an error: validating a page that is already
    /// valid means the host remapped a page behind the guest's back (or the
    /// guest converts twice), and the guest must not accept it as new.
    NoUpdate,
    /// Any other return code.
    Other(u32),
}

impl core::fmt::Display for PvalidateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PvalidateError::FailInput => f.write_str("PVALIDATE: FAIL_INPUT"),
            PvalidateError::SizeMismatch => f.write_str("PVALIDATE: FAIL_SIZEMISMATCH"),
            PvalidateError::NoUpdate => f.write_str("PVALIDATE: the page already had the requested validation state"),
            PvalidateError::Other(code) => write!(f, "PVALIDATE returned {code:#x}"),
        }
    }
}

impl core::error::Error for PvalidateError {}

/// Decodes what PVALIDATE returned.
pub fn decode(raw: RawPvalidate) -> Result<(), PvalidateError> {
    match raw.eax {
        0 if raw.carry => Err(PvalidateError::NoUpdate),
        0 => Ok(()),
        FAIL_INPUT => Err(PvalidateError::FailInput),
        FAIL_SIZEMISMATCH => Err(PvalidateError::SizeMismatch),
        other => Err(PvalidateError::Other(other)),
    }
}

/// A PVALIDATE over a range that stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PvalidateRangeError {
    /// The range is empty, unaligned or wraps.
    InvalidRange {
        /// Start of the range.
        va: u64,
        /// Its length.
        len: u64,
    },
    /// One page failed; pages before it were changed.
    Page {
        /// Virtual address of the page.
        va: u64,
        /// Size asked for.
        size: PageSize,
        /// What PVALIDATE said.
        error: PvalidateError,
    },
}

impl core::fmt::Display for PvalidateRangeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PvalidateRangeError::InvalidRange { va, len } => {
                write!(f, "cannot validate {va:#x}+{len:#x}: empty, unaligned or wrapping")
            }
            PvalidateRangeError::Page { va, size, error } => write!(f, "{error} at {va:#x} ({size:?})"),
        }
    }
}

impl core::error::Error for PvalidateRangeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PvalidateRangeError::Page { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// PVALIDATEs issued by a successful [`pvalidate_range`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvalidateCalls {
    /// Pages changed at 4 KiB and at 2 MiB.
    pub pages_4k: u64,
    /// 2 MiB pages changed.
    pub pages_2m: u64,
    /// Every PVALIDATE issued, size mismatches included.
    pub calls: u64,
}

/// (In)validates one page. After validating it, evicts its cache lines
/// unless the CPU reports COHERENCY_SFW_NO ([`Pvalidate::evict_cache_lines`]),
/// as [`pvalidate_range`] does.
///
/// # Safety
///
/// As for [`Pvalidate::pvalidate`].
pub unsafe fn pvalidate<P: Pvalidate + ?Sized>(
    p: &P,
    va: u64,
    size: PageSize,
    validate: bool,
) -> Result<(), PvalidateError> {
    // SAFETY: forwarded to the caller.
    unsafe { pvalidate_then_evict(p, va, size, validate, needs_eviction(p, validate)) }
}

/// Whether pages just (in)validated need their cache lines evicted: only
/// after validating, and only without COHERENCY_SFW_NO.
fn needs_eviction<P: Pvalidate + ?Sized>(p: &P, validate: bool) -> bool {
    validate && !p.coherency_sfw_no()
}

/// # Safety
///
/// As for [`Pvalidate::pvalidate`].
unsafe fn pvalidate_then_evict<P: Pvalidate + ?Sized>(
    p: &P,
    va: u64,
    size: PageSize,
    validate: bool,
    evict: bool,
) -> Result<(), PvalidateError> {
    // SAFETY: forwarded to the caller.
    decode(unsafe { p.pvalidate(va, size, validate) })?;
    if evict {
        // SAFETY: `va` maps the page just validated, private and readable.
        unsafe { p.evict_cache_lines(va, size.bytes() / PageSize::Size4K.bytes()) };
    }
    Ok(())
}

/// (In)validates `[va, va + len)`: 2 MiB pages where `allow_2m`, the
/// address is 2 MiB aligned and the range covers the whole page; on a size
/// mismatch (the RMP holds 4 KiB entries there) that 2 MiB is done as 512
/// 4 KiB pages. Stops at the first failure. After validating, evicts each
/// page's cache lines unless the CPU reports COHERENCY_SFW_NO
/// ([`Pvalidate::evict_cache_lines`]), as [`pvalidate`] does; rescinding
/// needs no eviction.
///
/// # Safety
///
/// As for [`Pvalidate::pvalidate`], for every page of the range.
pub unsafe fn pvalidate_range<P: Pvalidate + ?Sized>(
    p: &P,
    va: u64,
    len: u64,
    validate: bool,
    allow_2m: bool,
) -> Result<PvalidateCalls, PvalidateRangeError> {
    let invalid = PvalidateRangeError::InvalidRange { va, len };
    let end = va.checked_add(len).ok_or(invalid)?;
    if len == 0 || (va | len) & (PageSize::Size4K.bytes() - 1) != 0 {
        return Err(invalid);
    }
    let evict = needs_eviction(p, validate);
    let mut calls = PvalidateCalls::default();
    let mut page = va;
    while page < end {
        let huge = PageSize::Size2M.bytes();
        if allow_2m && page % huge == 0 && end - page >= huge {
            calls.calls += 1;
            // SAFETY: forwarded to the caller.
            match unsafe { pvalidate_then_evict(p, page, PageSize::Size2M, validate, evict) } {
                Ok(()) => {
                    calls.pages_2m += 1;
                    page += huge;
                    continue;
                }
                // The RMP maps this 2 MiB with 4 KiB entries: fall through
                // and do it page by page.
                Err(PvalidateError::SizeMismatch) => {}
                Err(error) => {
                    return Err(PvalidateRangeError::Page {
                        va: page,
                        size: PageSize::Size2M,
                        error,
                    })
                }
            }
            for small in (page..page + huge).step_by(PageSize::Size4K.bytes() as usize) {
                // SAFETY: forwarded to the caller.
                unsafe { pvalidate_4k(p, small, validate, evict, &mut calls)? };
            }
            page += huge;
        } else {
            // SAFETY: forwarded to the caller.
            unsafe { pvalidate_4k(p, page, validate, evict, &mut calls)? };
            page += PageSize::Size4K.bytes();
        }
    }
    Ok(calls)
}

/// # Safety
///
/// As for [`Pvalidate::pvalidate`].
unsafe fn pvalidate_4k<P: Pvalidate + ?Sized>(
    p: &P,
    va: u64,
    validate: bool,
    evict: bool,
    calls: &mut PvalidateCalls,
) -> Result<(), PvalidateRangeError> {
    calls.calls += 1;
    // SAFETY: forwarded to the caller.
    unsafe { pvalidate_then_evict(p, va, PageSize::Size4K, validate, evict) }.map_err(|error| {
        PvalidateRangeError::Page {
            va,
            size: PageSize::Size4K,
            error,
        }
    })?;
    calls.pages_4k += 1;
    Ok(())
}
