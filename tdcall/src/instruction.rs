//! The only inline assembly of this crate: the TDCALL instruction itself.

use crate::regs::{Registers, Tdcall};

/// The real TDCALL instruction (`66 0F 01 CC`).
///
/// Every register that can carry an input or an output, including all those
/// exposed to the VMM by TDG.VP.VMCALL, is an in/out operand of the
/// instruction, so the compiler treats each one as clobbered.
#[derive(Debug)]
pub struct TdcallInstruction {
    _private: (),
}

impl TdcallInstruction {
    /// Returns a handle to the TDCALL instruction.
    ///
    /// # Safety
    ///
    /// The code must run inside an Intel TDX trust domain at CPL 0; TDCALL
    /// raises #UD anywhere else.
    pub const unsafe fn new() -> Self {
        Self { _private: () }
    }
}

// SAFETY: the hardware instruction only changes memory through the leaves
// that are documented to do so (ACCEPT, MapGPA via the VMM); the reporting
// leaves leave memory alone.
unsafe impl Tdcall for TdcallInstruction {
    #[cfg(target_arch = "x86_64")]
    unsafe fn tdcall(&self, regs: &mut Registers) {
        // SAFETY: `new` required that we run in a TD at CPL 0; the caller
        // guarantees the leaf's effect on memory is acceptable. The asm
        // touches no stack and declares every register it can change.
        unsafe {
            core::arch::asm!(
                ".byte 0x66, 0x0f, 0x01, 0xcc",
                inout("rax") regs.rax,
                inout("rcx") regs.rcx,
                inout("rdx") regs.rdx,
                inout("rsi") regs.rsi,
                inout("rdi") regs.rdi,
                inout("r8") regs.r8,
                inout("r9") regs.r9,
                inout("r10") regs.r10,
                inout("r11") regs.r11,
                inout("r12") regs.r12,
                inout("r13") regs.r13,
                inout("r14") regs.r14,
                inout("r15") regs.r15,
                options(nostack),
            );
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tdcall(&self, _regs: &mut Registers) {
        unreachable!("TdcallInstruction::new requires an x86-64 TD guest")
    }
}
