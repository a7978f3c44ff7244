//! TDG.VP.VEINFO.GET: what caused the current #VE.

use crate::regs::{leaf, Registers, Tdcall};
use crate::status::{TdxError, TdxStatus};

/// The #VE information the TDX module saved when it injected the #VE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VeInfo {
    /// The VM exit reason that was turned into a #VE (48 = EPT violation).
    pub exit_reason: u32,
    /// The exit qualification.
    pub exit_qualification: u64,
    /// The guest linear address of the access (valid for EPT violations).
    pub gla: u64,
    /// The guest physical address of the access.
    pub gpa: u64,
    /// Length of the instruction that caused the #VE. Defined for the
    /// #VEs an instruction raises (CPUID, port I/O, RDMSR, WRMSR), not for
    /// EPT violations.
    pub instruction_length: u32,
    /// VMX instruction information.
    pub instruction_info: u32,
}

/// Basic exit reasons (Intel SDM vol. 3C, appendix C, "VMX Basic Exit
/// Reasons") of the #VEs a guest handles.
impl VeInfo {
    /// CPUID.
    pub const EXIT_REASON_CPUID: u32 = 10;
    /// IN, INS, OUT or OUTS; the exit qualification says which.
    pub const EXIT_REASON_IO_INSTRUCTION: u32 = 30;
    /// RDMSR.
    pub const EXIT_REASON_RDMSR: u32 = 31;
    /// WRMSR.
    pub const EXIT_REASON_WRMSR: u32 = 32;
    /// An EPT violation.
    pub const EXIT_REASON_EPT_VIOLATION: u32 = 48;
}

/// Calls TDG.VP.VEINFO.GET. Must be called from the #VE handler before
/// anything can cause another #VE: the module keeps only one.
pub fn ve_info<T: Tdcall + ?Sized>(tdcall: &T) -> Result<VeInfo, TdxError> {
    let mut regs = Registers {
        rax: leaf::VP_VEINFO_GET,
        ..Registers::default()
    };
    // SAFETY: TDG.VP.VEINFO.GET only reports; the `Tdcall` contract says it
    // leaves memory alone.
    unsafe { tdcall.tdcall(&mut regs) };
    TdxStatus(regs.rax).into_result()?;
    Ok(VeInfo {
        exit_reason: regs.rcx as u32,
        exit_qualification: regs.rdx,
        gla: regs.r8,
        gpa: regs.r9,
        instruction_length: regs.r10 as u32,
        instruction_info: (regs.r10 >> 32) as u32,
    })
}
