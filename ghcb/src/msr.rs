//! RDMSR and WRMSR through the GHCB: the MSR_PROT NAE event (GHCB spec
//! #56421 rev 2.03, Table 7, "List of Supported Non-Automatic Events":
//! SW_EXITCODE 0x7C; SW_EXITINFO1 0 = RDMSR, 1 = WRMSR; RCX to the
//! hypervisor, with RAX and RDX for WRMSR; RAX and RDX back for RDMSR).
//!
//! Not to be confused with the GHCB MSR *protocol*
//! ([`msr_protocol`](crate::msr_protocol)), which talks to the hypervisor
//! through the GHCB MSR itself: this module reads and writes other MSRs
//! the hypervisor intercepts.
//!
//! Only ECX, EAX and EDX reach the shared page, as those are all the
//! instructions use. A value read is used only if the hypervisor marked
//! both RAX and RDX valid, and only their low 32 bits, as RDMSR writes
//! EDX:EAX. An MSR the hypervisor refuses comes back as
//! [`EventError::Exception`] with a #GP, which the guest raises.

use crate::event::{self, EventError};
use crate::hypervisor::GhcbMsr;
use crate::layout::Field;
use crate::page::GhcbPage;

/// SW_EXITCODE of the MSR_PROT NAE event (the SVM exit code of an MSR
/// intercept).
pub const MSR_EXIT_CODE: u64 = 0x7C;
/// SW_EXITINFO1 of a read.
pub const EXIT_INFO_RDMSR: u64 = 0;
/// SW_EXITINFO1 of a write.
pub const EXIT_INFO_WRMSR: u64 = 1;

/// Reads MSR `msr` (EDX:EAX, as one value).
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`] (reading an MSR changes no guest memory).
pub unsafe fn rdmsr<H: GhcbMsr + ?Sized>(ghcb: &mut GhcbPage, hv: &H, msr: u32) -> Result<u64, EventError> {
    ghcb.invalidate();
    ghcb.set_field(Field::Rcx, msr as u64);
    // SAFETY: forwarded to the caller.
    unsafe { event::exit(ghcb, hv, MSR_EXIT_CODE, EXIT_INFO_RDMSR) }?;
    let eax = event::result(ghcb, Field::Rax)? as u32;
    let edx = event::result(ghcb, Field::Rdx)? as u32;
    Ok((edx as u64) << 32 | eax as u64)
}

/// Writes `value` to MSR `msr` (EAX its low half, EDX its high half).
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]; the write's effect must be acceptable.
pub unsafe fn wrmsr<H: GhcbMsr + ?Sized>(ghcb: &mut GhcbPage, hv: &H, msr: u32, value: u64) -> Result<(), EventError> {
    ghcb.invalidate();
    ghcb.set_field(Field::Rcx, msr as u64);
    ghcb.set_field(Field::Rax, value & 0xFFFF_FFFF);
    ghcb.set_field(Field::Rdx, value >> 32);
    // SAFETY: forwarded to the caller.
    unsafe { event::exit(ghcb, hv, MSR_EXIT_CODE, EXIT_INFO_WRMSR) }
}
