//! TDG.VP.VMCALL\<Instruction.CPUID\>: CPUID answered by the VMM.
//!
//! GHCI v1.5, "TDG.VP.VMCALL\<Instruction.CPUID\>": R12 = leaf (EAX), R13 =
//! sub-leaf (ECX); the VMM returns EAX, EBX, ECX and EDX in R12, R13, R14 and
//! R15.

use core::ops::RangeInclusive;

use crate::regs::Tdcall;
use crate::vmcall::{instruction_vmcall, subfunction, VmcallError};

/// The leaves reserved to hypervisors: Intel SDM vol. 2A, "CPUID", says no
/// existing or future processor returns information for an initial EAX in
/// 40000000H-4FFFFFFFH. These are the only leaves whose answer may come
/// from the VMM: see [`cpuid`].
pub const VMM_CPUID_LEAVES: RangeInclusive<u32> = 0x4000_0000..=0x4FFF_FFFF;

/// The four registers CPUID writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each field is the register of the same name
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Asks the VMM for CPUID leaf `leaf`, sub-leaf `subleaf`.
///
/// CPUID writes 32-bit registers, so each answer is cut to 32 bits: bits
/// the VMM set above them are dropped. Any status but success is an error.
///
/// The answer is whatever the host chose. The TDX module answers every
/// leaf it virtualises itself, from values the TD's measurement covers, so
/// ask the VMM only about the leaves reserved to hypervisors
/// ([`VMM_CPUID_LEAVES`]): a guest that believed it about a feature leaf
/// would let the host pick, for one, which security features the guest
/// thinks it has.
pub fn cpuid<T: Tdcall + ?Sized>(tdcall: &T, leaf: u32, subleaf: u32) -> Result<CpuidResult, VmcallError> {
    let regs = instruction_vmcall(
        tdcall,
        subfunction::INSTRUCTION_CPUID,
        [leaf as u64, subleaf as u64, 0, 0],
    )?;
    Ok(CpuidResult {
        eax: regs.r12 as u32,
        ebx: regs.r13 as u32,
        ecx: regs.r14 as u32,
        edx: regs.r15 as u32,
    })
}
