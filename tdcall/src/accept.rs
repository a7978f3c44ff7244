//! TDG.MEM.PAGE.ACCEPT: taking ownership of pending private pages.
//!
//! "Already accepted" is reported, never ignored: the guest asked for a
//! fresh (zeroed) private page, and a page that was already accepted still
//! holds whatever it held before. Linux's early code silently tolerated it;
//! a host that skips the MapGPA round trip could then hand the guest a page
//! with stale contents that the guest believes is new. The caller (the
//! conversion engine) treats the error as a failed conversion.

use crate::page::PageLevel;
use crate::regs::{leaf, Registers, Tdcall};
use crate::status::{TdxError, TdxStatus};

/// How many times one ACCEPT is retried while the module answers
/// `TDX_OPERAND_BUSY` before giving up. Busy means another vCPU holds the
/// Secure EPT lock for a short flow; a module that stays busy longer than
/// this is not making progress on our behalf.
pub const BUSY_RETRY_LIMIT: u32 = 64;

/// Bits 11:3 of ACCEPT's RCX are reserved.
const LEVEL_MASK: u64 = 0x7;

/// An ACCEPT that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcceptError {
    /// The range is empty, not 4 KiB aligned, or wraps around.
    InvalidRange {
        /// Start of the requested range.
        start: u64,
        /// Length of the requested range.
        len: u64,
    },
    /// The page was already accepted: its contents are not fresh.
    AlreadyAccepted {
        /// The page's GPA.
        gpa: u64,
        /// The size at which it was found accepted.
        level: PageLevel,
    },
    /// The module stayed busy for [`BUSY_RETRY_LIMIT`] attempts.
    Busy {
        /// The page's GPA.
        gpa: u64,
    },
    /// Any other failure, including a size mismatch at 4 KiB.
    Tdx {
        /// The page's GPA.
        gpa: u64,
        /// The size requested.
        level: PageLevel,
        /// What the module said.
        error: TdxError,
    },
}

impl core::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            AcceptError::InvalidRange { start, len } => {
                write!(f, "cannot accept {start:#x}+{len:#x}: empty, unaligned or wrapping")
            }
            AcceptError::AlreadyAccepted { gpa, level } => {
                write!(
                    f,
                    "{gpa:#x} was already accepted ({level:?}): its contents are not fresh"
                )
            }
            AcceptError::Busy { gpa } => write!(f, "the TDX module stayed busy accepting {gpa:#x}"),
            AcceptError::Tdx { gpa, level, error } => write!(f, "accepting {gpa:#x} ({level:?}) failed: {error}"),
        }
    }
}

impl core::error::Error for AcceptError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            AcceptError::Tdx { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// TDCALLs issued by a successful [`accept_range`], by page size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptCalls {
    /// Pages accepted at each level, indexed by [`PageLevel`] as `usize`.
    pub accepted: [u64; 3],
    /// Every ACCEPT issued, including those answered with size mismatch or
    /// busy.
    pub calls: u64,
}

/// Accepts one page of size `level` at `gpa` (private GPA, aligned to the
/// size), retrying while the module is busy.
///
/// # Safety
///
/// On success the module zeroes the page: nothing may rely on its contents.
/// The GPA must be one the guest has asked the VMM to map private.
pub unsafe fn accept_page<T: Tdcall + ?Sized>(tdcall: &T, gpa: u64, level: PageLevel) -> Result<(), AcceptError> {
    let mut calls = 0;
    // SAFETY: forwarded to the caller.
    unsafe { accept_one(tdcall, gpa, level, &mut calls) }
}

/// One ACCEPT, retried while busy; `calls` counts the TDCALLs.
///
/// # Safety
///
/// As for [`accept_page`].
unsafe fn accept_one<T: Tdcall + ?Sized>(
    tdcall: &T,
    gpa: u64,
    level: PageLevel,
    calls: &mut u64,
) -> Result<(), AcceptError> {
    if gpa & (level.bytes() - 1) != 0 {
        return Err(AcceptError::InvalidRange {
            start: gpa,
            len: level.bytes(),
        });
    }
    for _ in 0..BUSY_RETRY_LIMIT {
        let mut regs = Registers {
            rax: leaf::MEM_PAGE_ACCEPT,
            rcx: gpa | (level as u64 & LEVEL_MASK),
            ..Registers::default()
        };
        *calls += 1;
        // SAFETY: forwarded to the caller.
        unsafe { tdcall.tdcall(&mut regs) };
        match TdxStatus(regs.rax).into_result() {
            Ok(()) => return Ok(()),
            Err(TdxError::OperandBusy { .. }) => core::hint::spin_loop(),
            Err(TdxError::PageAlreadyAccepted) => return Err(AcceptError::AlreadyAccepted { gpa, level }),
            Err(error) => return Err(AcceptError::Tdx { gpa, level, error }),
        }
    }
    Err(AcceptError::Busy { gpa })
}

/// Accepts `[start, start + len)`: each piece at the largest size its
/// alignment and the range allow (1 GiB, 2 MiB, 4 KiB); where the module
/// reports a size mismatch (the host mapped smaller pages), that piece is
/// accepted at the next smaller size. Stops at the first failure; pages
/// before it stay accepted.
///
/// # Safety
///
/// As for [`accept_page`], for every page of the range.
pub unsafe fn accept_range<T: Tdcall + ?Sized>(tdcall: &T, start: u64, len: u64) -> Result<AcceptCalls, AcceptError> {
    let invalid = AcceptError::InvalidRange { start, len };
    let end = start.checked_add(len).ok_or(invalid)?;
    if len == 0 || (start | len) & (PageLevel::Size4K.bytes() - 1) != 0 {
        return Err(invalid);
    }
    let mut counts = AcceptCalls::default();
    let mut gpa = start;
    while gpa < end {
        let level = PageLevel::LARGEST_FIRST
            .into_iter()
            .find(|l| gpa & (l.bytes() - 1) == 0 && end - gpa >= l.bytes())
            .unwrap_or(PageLevel::Size4K);
        // SAFETY: forwarded to the caller.
        unsafe { accept_block(tdcall, gpa, level, &mut counts)? };
        gpa += level.bytes();
    }
    Ok(counts)
}

/// Accepts one aligned block, splitting it on size mismatch. Recursion depth
/// is at most two.
///
/// # Safety
///
/// As for [`accept_page`], for every page of the block.
unsafe fn accept_block<T: Tdcall + ?Sized>(
    tdcall: &T,
    gpa: u64,
    level: PageLevel,
    counts: &mut AcceptCalls,
) -> Result<(), AcceptError> {
    // SAFETY: forwarded to the caller.
    match unsafe { accept_one(tdcall, gpa, level, &mut counts.calls) } {
        Ok(()) => {
            counts.accepted[level as usize] += 1;
            Ok(())
        }
        Err(AcceptError::Tdx {
            error: TdxError::PageSizeMismatch,
            ..
        }) if level != PageLevel::Size4K => {
            let smaller = level.smaller().unwrap_or(PageLevel::Size4K);
            for i in 0..512 {
                // SAFETY: forwarded to the caller.
                unsafe { accept_block(tdcall, gpa + i * smaller.bytes(), smaller, counts)? };
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}
