//! TDG.VP.VMCALL: calls from the TD to the host VMM (Intel GHCI v1.5).

use crate::regs::{leaf, Registers, Tdcall};
use crate::status::{TdxError, TdxStatus};

/// TDG.VP.VMCALL sub-function numbers, passed in R11 (GHCI v1.5, "TDG.VP.VMCALL
/// Interface"). Below 0x10000 a sub-function asks the VMM to carry out an
/// instruction, and its number is that instruction's VMX basic exit reason
/// (Intel SDM vol. 3C, appendix C, "VMX Basic Exit Reasons"); the TDX
/// services start at 0x10000.
pub mod subfunction {
    /// `\<Instruction.CPUID\>`: exit reason 10 (GHCI v1.5,
    /// "TDG.VP.VMCALL\<Instruction.CPUID\>").
    pub const INSTRUCTION_CPUID: u64 = 10;
    /// `\<Instruction.IO\>`: exit reason 30, "I/O instruction" (GHCI v1.5,
    /// "TDG.VP.VMCALL\<Instruction.IO\>").
    pub const INSTRUCTION_IO: u64 = 30;
    /// `\<Instruction.RDMSR\>`: exit reason 31 (GHCI v1.5,
    /// "TDG.VP.VMCALL\<Instruction.RDMSR\>").
    pub const INSTRUCTION_RDMSR: u64 = 31;
    /// `\<Instruction.WRMSR\>`: exit reason 32 (GHCI v1.5,
    /// "TDG.VP.VMCALL\<Instruction.WRMSR\>").
    pub const INSTRUCTION_WRMSR: u64 = 32;
    /// `\<MapGPA\>`: change a GPA range between private and shared.
    pub const MAP_GPA: u64 = 0x10001;
    /// `\<ReportFatalError\>`: tell the VMM the TD cannot continue.
    pub const REPORT_FATAL_ERROR: u64 = 0x10003;
}

/// RCX for TDG.VP.VMCALL: the GPRs whose values the VMM may see and change.
/// Only R10-R15 are exposed: the sub-functions this crate uses need no
/// others, and the fewer registers the VMM sees, the less it can learn.
pub const VMCALL_EXPOSED_REGS: u64 = 0xFC00;

/// TDG.VP.VMCALL status in R10 on return (GHCI v1.5, table "TDG.VP.VMCALL
/// Instruction Return Codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmcallStatus {
    /// `TDG.VP.VMCALL_SUCCESS` (0).
    Success,
    /// `TDG.VP.VMCALL_RETRY` (1).
    Retry,
    /// `TDG.VP.VMCALL_INVALID_OPERAND` (0x8000000000000000).
    InvalidOperand,
    /// `TDG.VP.VMCALL_GPA_INUSE` (0x8000000000000001).
    GpaInUse,
    /// `TDG.VP.VMCALL_ALIGN_ERROR` (0x8000000000000002).
    AlignError,
    /// Any other value, which no VMM following the GHCI returns.
    Unknown(u64),
}

impl core::fmt::Display for VmcallStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            VmcallStatus::Success => f.write_str("success"),
            VmcallStatus::Retry => f.write_str("retry"),
            VmcallStatus::InvalidOperand => f.write_str("invalid operand"),
            VmcallStatus::GpaInUse => f.write_str("GPA in use"),
            VmcallStatus::AlignError => f.write_str("alignment error"),
            VmcallStatus::Unknown(v) => write!(f, "unknown status {v:#x}"),
        }
    }
}

impl VmcallStatus {
    /// Decodes R10.
    pub const fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Self::Success,
            1 => Self::Retry,
            0x8000_0000_0000_0000 => Self::InvalidOperand,
            0x8000_0000_0000_0001 => Self::GpaInUse,
            0x8000_0000_0000_0002 => Self::AlignError,
            other => Self::Unknown(other),
        }
    }
}

/// A TDG.VP.VMCALL that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmcallError {
    /// The TDCALL itself failed: the TDX module refused the call.
    Tdcall(TdxError),
    /// The VMM answered with a status other than success.
    Status(VmcallStatus),
}

impl core::fmt::Display for VmcallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            VmcallError::Tdcall(e) => write!(f, "TDG.VP.VMCALL failed: {e}"),
            VmcallError::Status(s) => write!(f, "the VMM answered: {s}"),
        }
    }
}

impl core::error::Error for VmcallError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            VmcallError::Tdcall(e) => Some(e),
            _ => None,
        }
    }
}

/// Issues TDG.VP.VMCALL with sub-function `subfunction` and arguments in
/// R12..R15, exposing only R10-R15. Returns the VMM's status and the
/// registers as it left them (R11 and up carry sub-function outputs).
///
/// # Safety
///
/// As for [`Tdcall::tdcall`]: the sub-function's effect on guest memory must
/// be acceptable to the caller.
pub unsafe fn tdvmcall<T: Tdcall + ?Sized>(
    tdcall: &T,
    subfunction: u64,
    args: [u64; 4],
) -> Result<(VmcallStatus, Registers), TdxError> {
    let mut regs = Registers {
        rax: leaf::VP_VMCALL,
        rcx: VMCALL_EXPOSED_REGS,
        r10: 0, // 0 selects the GHCI-standard sub-function space.
        r11: subfunction,
        r12: args[0],
        r13: args[1],
        r14: args[2],
        r15: args[3],
        ..Registers::default()
    };
    // SAFETY: forwarded to the caller.
    unsafe { tdcall.tdcall(&mut regs) };
    TdxStatus(regs.rax).into_result()?;
    Ok((VmcallStatus::from_raw(regs.r10), regs))
}

/// Issues one of the `Instruction.*` sub-functions and requires
/// `TDG.VP.VMCALL_SUCCESS`. Returns the registers as the VMM left them: the
/// caller takes its outputs from them and trusts none of their bits beyond
/// what the instruction could have produced.
pub(crate) fn instruction_vmcall<T: Tdcall + ?Sized>(
    tdcall: &T,
    subfunction: u64,
    args: [u64; 4],
) -> Result<Registers, VmcallError> {
    // SAFETY: the instruction sub-functions cannot change private guest
    // memory: the VMM reaches only shared memory (an emulated device's DMA,
    // a paravirtual MSR naming a GPA), which it may rewrite at any time
    // anyway, so no invariant of Rust code can rest on it.
    let (status, regs) = unsafe { tdvmcall(tdcall, subfunction, args) }.map_err(VmcallError::Tdcall)?;
    match status {
        VmcallStatus::Success => Ok(regs),
        other => Err(VmcallError::Status(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decode() {
        assert_eq!(VmcallStatus::from_raw(0), VmcallStatus::Success);
        assert_eq!(VmcallStatus::from_raw(1), VmcallStatus::Retry);
        assert_eq!(VmcallStatus::from_raw(1 << 63), VmcallStatus::InvalidOperand);
        assert_eq!(VmcallStatus::from_raw((1 << 63) | 1), VmcallStatus::GpaInUse);
        assert_eq!(VmcallStatus::from_raw((1 << 63) | 2), VmcallStatus::AlignError);
        assert_eq!(VmcallStatus::from_raw(2), VmcallStatus::Unknown(2));
    }

    #[test]
    fn only_r10_to_r15_are_exposed() {
        assert_eq!(VMCALL_EXPOSED_REGS, (10..=15).map(|b| 1u64 << b).sum::<u64>());
    }
}
