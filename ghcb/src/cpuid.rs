//! CPUID through the GHCB: the CPUID NAE event (GHCB spec #56421 rev 2.03,
//! Table 7, "List of Supported Non-Automatic Events": SW_EXITCODE 0x72;
//! RAX and RCX to the hypervisor, and XCR0 for leaf 0xD; RAX, RBX, RCX
//! and RDX back).
//!
//! The answer is the hypervisor's word and nothing more: it can claim any
//! feature, any topology, any XSAVE size. A production SEV-SNP guest takes
//! its CPUID values from the SNP CPUID page, the table the firmware checked
//! against the CPU at launch, and asks the hypervisor only for leaves that
//! table does not hold, treating the answer as untrusted input.
//!
//! What is checked is the form of the answer: all four result registers
//! marked valid (the guest never marks RBX and RDX itself, so those two
//! bits are the hypervisor's), and only their low 32 bits used, as CPUID
//! writes 32-bit registers (bits above are whatever the hypervisor left).

use crate::event::{self, EventError};
use crate::hypervisor::GhcbMsr;
use crate::layout::Field;
use crate::page::GhcbPage;

/// SW_EXITCODE of the CPUID NAE event (the SVM exit code of a CPUID
/// intercept).
pub const CPUID_EXIT_CODE: u64 = 0x72;

/// The leaf whose answer depends on XCR0 (the XSAVE area's layout).
pub const XSAVE_LEAF: u32 = 0xD;

/// What CPUID returned, each register as the instruction writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Asks the hypervisor for CPUID `leaf`, `subleaf`.
///
/// `xcr0` is the guest's XCR0 (what `XGETBV` with ECX = 0 reads; 1, x87
/// only, while CR4.OSXSAVE is clear and XGETBV would fault). It is sent
/// for leaf 0xD alone.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`] (the request changes no memory).
pub unsafe fn cpuid<H: GhcbMsr + ?Sized>(
    ghcb: &mut GhcbPage,
    hv: &H,
    leaf: u32,
    subleaf: u32,
    xcr0: u64,
) -> Result<CpuidResult, EventError> {
    ghcb.invalidate();
    ghcb.set_field(Field::Rax, leaf as u64);
    ghcb.set_field(Field::Rcx, subleaf as u64);
    if leaf == XSAVE_LEAF {
        ghcb.set_field(Field::Xcr0, xcr0);
    }
    // SAFETY: forwarded to the caller.
    unsafe { event::exit(ghcb, hv, CPUID_EXIT_CODE, 0) }?;
    Ok(CpuidResult {
        eax: event::result(ghcb, Field::Rax)? as u32,
        ebx: event::result(ghcb, Field::Rbx)? as u32,
        ecx: event::result(ghcb, Field::Rcx)? as u32,
        edx: event::result(ghcb, Field::Rdx)? as u32,
    })
}
