//! TDG.VP.VMCALL\<Instruction.RDMSR\> and \<Instruction.WRMSR\>: the MSRs
//! the TDX module leaves to the VMM.
//!
//! GHCI v1.5, "TDG.VP.VMCALL\<Instruction.RDMSR\>": R12 = MSR index; the
//! value comes back in R11. "TDG.VP.VMCALL\<Instruction.WRMSR\>": R12 = MSR
//! index, R13 = the value. The TDX module handles the MSRs the TD's
//! security rests on itself and raises #VE only for the others, so what the
//! VMM reads and writes here is state it emulates anyway.

use crate::regs::Tdcall;
use crate::vmcall::{instruction_vmcall, subfunction, VmcallError};

/// Reads MSR `index` through the VMM. An MSR the VMM does not emulate is
/// an error (`TDG.VP.VMCALL_INVALID_OPERAND` from an honest VMM), as is any
/// status but success.
pub fn rdmsr<T: Tdcall + ?Sized>(tdcall: &T, index: u32) -> Result<u64, VmcallError> {
    instruction_vmcall(tdcall, subfunction::INSTRUCTION_RDMSR, [index as u64, 0, 0, 0]).map(|regs| regs.r11)
}

/// Writes `value` to MSR `index` through the VMM. Any status but success is
/// an error.
pub fn wrmsr<T: Tdcall + ?Sized>(tdcall: &T, index: u32, value: u64) -> Result<(), VmcallError> {
    instruction_vmcall(tdcall, subfunction::INSTRUCTION_WRMSR, [index as u64, value, 0, 0]).map(|_| ())
}
