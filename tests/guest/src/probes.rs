//! Asking the platform itself whether a private page is usable: what the
//! real path checks scenario 8 with, where no model holds the page states.
//! Each asks to accept or validate the page again, which a page in the
//! right state refuses without change. A page in the wrong state is
//! accepted or validated by the question: the answer is still "not
//! usable", as it must be.

use snp_ghcb::pvalidate::PvalidateError;
use snp_ghcb::PvalidateInstruction;
use tdcall::TdcallInstruction;

use crate::memory::direct_map;

/// Whether the TD holds the page at `pa` accepted: a second
/// TDG.MEM.PAGE.ACCEPT must say so. A page the Secure EPT maps as part of
/// a 2 MiB page answers a 4 KiB ACCEPT with a size mismatch, and is asked
/// again at 2 MiB.
pub fn td_accepted(pa: u64) -> bool {
    // SAFETY: called in a TD (or the emulated one) at CPL 0.
    let tdcall = unsafe { TdcallInstruction::new() };
    let again = |pa: u64, level| {
        // SAFETY: the page is private in the guest's view; if it is
        // pending after all, accepting it is what the answer reports.
        unsafe { tdcall::accept_page(&tdcall, pa, level) }
    };
    match again(pa, tdcall::PageLevel::Size4K) {
        Err(tdcall::AcceptError::AlreadyAccepted { .. }) => true,
        Err(tdcall::AcceptError::Tdx {
            error: tdcall::TdxError::PageSizeMismatch,
            ..
        }) => matches!(
            again(pa & !0x1F_FFFF, tdcall::PageLevel::Size2M),
            Err(tdcall::AcceptError::AlreadyAccepted { .. })
        ),
        _ => false,
    }
}

/// Whether the SNP guest holds the page at `pa` validated: a second
/// PVALIDATE must change nothing and say so (CF = 1). A page validated as
/// part of a 2 MiB page answers a 4 KiB PVALIDATE with a size mismatch,
/// and is asked again at 2 MiB.
pub fn snp_validated(pa: u64) -> bool {
    // SAFETY: called in an SNP guest (or the emulated one) at CPL 0.
    let pvalidate = unsafe { PvalidateInstruction::new() };
    let again = |pa: u64, size| {
        // SAFETY: the page is mapped private by the direct map; if it is
        // not validated after all, validating it is what the answer
        // reports.
        unsafe { snp_ghcb::pvalidate::pvalidate(&pvalidate, direct_map() + pa, size, true) }
    };
    match again(pa, snp_ghcb::PageSize::Size4K) {
        Err(PvalidateError::NoUpdate) => true,
        Err(PvalidateError::SizeMismatch) => {
            again(pa & !0x1F_FFFF, snp_ghcb::PageSize::Size2M) == Err(PvalidateError::NoUpdate)
        }
        _ => false,
    }
}
