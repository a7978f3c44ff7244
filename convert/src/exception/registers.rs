//! The saved registers an exception handler works on.

/// A general-purpose register, numbered as the hardware encodes it
/// (ModRM.reg / REX.R, Intel SDM vol. 2, table 2-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each variant is the register of that name
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// All sixteen, in encoding order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];
}

/// Reads and writes the registers an OS saved on a fault: implement it over
/// the OS's own frame (a Linux-style `pt_regs`, a signal `ucontext`), or
/// use [`FaultFrame`].
pub trait RegisterAccess {
    /// The saved value of `reg`.
    fn gpr(&self, reg: Gpr) -> u64;
    /// Changes the value `reg` will have on return.
    fn set_gpr(&mut self, reg: Gpr, value: u64);
    /// The saved RIP (the faulting instruction).
    fn rip(&self) -> u64;
    /// Changes where execution resumes.
    fn set_rip(&mut self, rip: u64);
}

/// All 16 GPRs, in encoding order, and RIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FaultFrame {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    pub gprs: [u64; 16],
    /// RIP.
    pub rip: u64,
}

impl RegisterAccess for FaultFrame {
    fn gpr(&self, reg: Gpr) -> u64 {
        self.gprs[reg as usize]
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.gprs[reg as usize] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
}
