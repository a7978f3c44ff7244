//! Asking the platform itself whether a private page is usable: what the
//! real path checks scenario 8 with, where no model holds the page states.
//! Each asks to accept or validate the page again, which a page in the
//! right state refuses without change. A page in the wrong state is
//! changed by the question, by no more than that one page (TDX), or not at
//! all (SEV-SNP: the question is taken back); the answer is "not usable"
//! either way.

use snp_ghcb::pvalidate::{decode, PvalidateError};
use snp_ghcb::{PageSize, Pvalidate, PvalidateInstruction};
use tdcall::TdcallInstruction;

use crate::memory::direct_map;

/// Whether the TD holds the page at `pa` accepted: a second 4 KiB
/// TDG.MEM.PAGE.ACCEPT must say "already accepted". It says so inside a
/// larger Secure-EPT leaf the TD can use as well: the module's walk stops at
/// that leaf (no size mismatch, which only a request larger than the
/// mapping gets). Inside a pending larger leaf, the ACCEPT exits to the VMM,
/// which must split the leaf for the TD to go on: the question accepts
/// this one page, never its neighbours.
pub fn td_accepted(pa: u64) -> bool {
    // SAFETY: called in a TD (or the emulated one) at CPL 0.
    let tdcall = unsafe { TdcallInstruction::new() };
    // SAFETY: the page is private in the guest's view; if it is pending
    // after all, accepting it is what the answer reports.
    let again = unsafe { tdcall::accept_page(&tdcall, pa, tdcall::PageLevel::Size4K) };
    matches!(again, Err(tdcall::AcceptError::AlreadyAccepted { .. }))
}

/// Whether the SNP guest holds the page at `pa` validated: a second
/// PVALIDATE must change nothing and say so (CF = 1). A page the RMP holds
/// as part of a 2 MiB entry answers a 4 KiB PVALIDATE with a size mismatch
/// whatever its state, and is asked again at 2 MiB. A PVALIDATE that did
/// validate is rescinded at once, so the question leaves every page's
/// validation as it found it (nothing reads the page in between, so no
/// cache lines need evicting); a host may split a 2 MiB RMP entry on the
/// question.
pub fn snp_validated(pa: u64) -> bool {
    // SAFETY: called in an SNP guest (or the emulated one) at CPL 0.
    let pvalidate = unsafe { PvalidateInstruction::new() };
    let ask = |pa: u64, size: PageSize| {
        let va = direct_map() + pa;
        // SAFETY: the direct map maps the page private. Validating a page
        // that was not is taken back before anything touches it.
        let answer = decode(unsafe { pvalidate.pvalidate(va, size, true) });
        if answer.is_ok() {
            // SAFETY: as above; the page was unvalidated a moment ago.
            // Should a hostile host make this fail, the page stays
            // validated, unread, and the answer is "not usable" all the same.
            let _ = decode(unsafe { pvalidate.pvalidate(va, size, false) });
        }
        answer
    };
    match ask(pa, PageSize::Size4K) {
        Err(PvalidateError::NoUpdate) => true,
        Err(PvalidateError::SizeMismatch) => match ask(pa & !0x1F_FFFF, PageSize::Size2M) {
            Err(PvalidateError::NoUpdate) => true,
            // A host whose nested tables map the page at 4 KiB splits the
            // RMP entry on a 2 MiB question (PSMASH); ask again at 4 KiB.
            Err(PvalidateError::SizeMismatch) => ask(pa, PageSize::Size4K) == Err(PvalidateError::NoUpdate),
            _ => false,
        },
        _ => false,
    }
}
