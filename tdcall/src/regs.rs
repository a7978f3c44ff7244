//! The register-level TDCALL ABI and the trait every call goes through.

/// TDCALL leaf numbers, passed in RAX (TDX Module v1.5 ABI Specification,
/// "TDCALL Leaf Functions").
pub mod leaf {
    /// TDG.VP.VMCALL: a call to the host VMM.
    pub const VP_VMCALL: u64 = 0;
    /// TDG.VP.INFO: TD execution environment information.
    pub const VP_INFO: u64 = 1;
    /// TDG.VP.VEINFO.GET: information about the last #VE.
    pub const VP_VEINFO_GET: u64 = 3;
    /// TDG.MEM.PAGE.ACCEPT: accept a pending private page.
    pub const MEM_PAGE_ACCEPT: u64 = 6;
}

/// The general-purpose registers a TDCALL reads and writes.
///
/// RBX and RBP are not carried: LLVM reserves them, and no leaf this crate
/// uses needs them. RSP is never exposed to the VMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
#[allow(missing_docs)] // each field is the register of the same name
pub struct Registers {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// Executes TDCALL with the given registers.
///
/// This is the only way the crate reaches the TDX module, so a model of the
/// module can stand in for the instruction in tests.
///
/// # Safety
///
/// Implementors must behave as TDCALL does with respect to memory: leaves
/// that only report information (TDG.VP.INFO, TDG.VP.VEINFO.GET) must not
/// change any memory the caller can observe, because safe wrappers call them
/// without further obligations.
pub unsafe trait Tdcall {
    /// Executes one TDCALL: `regs` holds the inputs on entry and the outputs
    /// on return (RAX = completion status). Registers the leaf does not
    /// define as outputs may be clobbered.
    ///
    /// # Safety
    ///
    /// The leaf and its operands may change the contents or visibility of
    /// guest memory (ACCEPT zeroes pages, MapGPA takes them away from the
    /// guest). The caller must ensure no memory in use by Rust code is
    /// affected in a way that breaks its invariants, and that the CPU is in
    /// a state where TDCALL is permitted (a TD guest at CPL 0).
    unsafe fn tdcall(&self, regs: &mut Registers);
}

// SAFETY: forwarding to the same implementation keeps its guarantees.
unsafe impl<T: Tdcall + ?Sized> Tdcall for &T {
    unsafe fn tdcall(&self, regs: &mut Registers) {
        // SAFETY: the caller upholds the contract of `Tdcall::tdcall`.
        unsafe { (**self).tdcall(regs) }
    }
}
