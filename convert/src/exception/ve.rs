//! The TDX #VE handler.
//!
//! In a TD, the TDX module turns some instructions and accesses into a
//! virtualization exception (#VE) for the guest to deal with: CPUID leaves
//! it does not answer itself, port I/O, the MSRs it leaves to the VMM, and
//! EPT violations on shared memory (MMIO). [`VeHandler::handle`] carries
//! out the instructions through the VMM (TDG.VP.VMCALL\<Instruction.*\>),
//! classifies EPT violations, and distrusts every answer:
//!
//! - CPUID goes to the VMM only for the hypervisor leaves
//!   ([`tdcall::VMM_CPUID_LEAVES`]); any other leaf that raises a #VE
//!   reads as zeros, as an unsupported leaf does on a CPU. The TDX module
//!   answers every leaf it virtualises itself, so a leaf that reaches the
//!   guest outside that range is one the host would otherwise get to
//!   invent (Linux's TDX guest follows the same rule).
//! - Data from the VMM fills only what the instruction writes: `IN AL`
//!   changes AL and keeps the rest of RAX, `IN AX` AX, `IN EAX` all of RAX
//!   (a 32-bit write zero-extends); CPUID and RDMSR write 32-bit halves.
//! - String and REP port I/O (`INS`, `OUTS`) is refused: emulating it
//!   would mean the VMM's data written to guest memory at addresses the
//!   saved registers name.
//! - An EPT violation on a *private* GPA is fatal: the host took a page
//!   the guest owns. On a shared GPA, an access across a page is a
//!   `load_unaligned_zeropad` (with feature `zeropad`, finished here through
//!   `zeropad::handle_fault`); within one page it is MMIO, handed back to
//!   the OS ([`VeOutcome::Mmio`]).
//!
//! Either the instruction completes (registers written, RIP past it, by
//! the length the TDX module reported) or nothing in the registers changes
//! and a [`VeError`] says why.
//!
//! The handler does not know the privilege level of the interrupted
//! context: an OS whose user space can raise #VEs (CPUID is the one Linux
//! emulates there) hands over only those it allows.
//!
//! ```no_run
//! use coco_convert::exception::ve::{VeHandler, VeOutcome};
//! use coco_convert::exception::FaultFrame;
//! use tdcall::TdcallInstruction;
//!
//! # fn emulate_mmio(_: &mut FaultFrame, _: coco_convert::exception::ve::MmioAccess) {}
//! # fn halt_forever() -> ! { loop {} }
//! /// The kernel's #VE entry, with the interrupted context saved in `frame`.
//! fn on_ve(handler: &VeHandler, frame: &mut FaultFrame) {
//!     // SAFETY: we run in a TD at CPL 0.
//!     let tdcall = unsafe { TdcallInstruction::new() };
//!     // First, before anything can raise another #VE: the module keeps one.
//!     let Ok(ve) = tdcall::ve_info(&tdcall) else { halt_forever() };
//!     match handler.handle(&tdcall, &ve, frame) {
//!         Ok(VeOutcome::Emulated) => {}
//!         Ok(VeOutcome::Mmio(access)) => emulate_mmio(frame, access),
//!         Err(_) => {
//!             let _ = tdcall::report_fatal_error(&tdcall, ve.exit_reason);
//!             halt_forever()
//!         }
//!     }
//! }
//!
//! // At boot: the shared bit from TDG.VP.INFO.
//! # fn main() -> Result<(), tdcall::InfoError> {
//! // SAFETY: as above.
//! let info = tdcall::vp_info(&unsafe { TdcallInstruction::new() })?;
//! let handler = VeHandler::new(info.shared_mask()).expect("TDX's shared bit is 47 or 51");
//! # let _ = (handler, on_ve);
//! # Ok(())
//! # }
//! ```

mod classify;
mod ept;
mod port_io;

use tdcall::{CpuidResult, Tdcall, VeInfo, VmcallError, VMM_CPUID_LEAVES};

use super::{Gpr, RegisterAccess};
pub use classify::{classify_ve, VeClass};

/// Handles #VEs for a TD; configured once, with the TD's shared bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VeHandler {
    shared_mask: u64,
}

/// What the handler did with a #VE it did not refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VeOutcome {
    /// The instruction was carried out: its registers hold the result and
    /// RIP points past it.
    Emulated,
    /// Not handled: MMIO, the OS's to emulate (decode the instruction at
    /// RIP; an access that runs across a page is not MMIO and is fatal).
    /// Nothing was changed.
    Mmio(MmioAccess),
}

/// An EPT violation on a shared GPA, within one page: MMIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// The guest physical address accessed (the shared bit set).
    pub gpa: u64,
    /// The guest linear address accessed.
    pub gla: u64,
}

/// Why a #VE was not handled. Nothing in the registers was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VeError {
    /// A #VE of a kind this handler does not emulate (HLT, for one): the
    /// OS may handle it itself.
    UnsupportedExitReason(u32),
    /// The instruction length the TDX module reported is not 1 to 15
    /// bytes, so RIP cannot be moved past the instruction.
    InvalidInstructionLength(u32),
    /// Port I/O whose exit qualification encodes no access size of 1, 2 or
    /// 4 bytes.
    InvalidIoSize {
        /// The exit qualification.
        qualification: u64,
    },
    /// String or REP port I/O (`INS`, `OUTS`): not emulated, since the
    /// VMM's data would go to guest memory the saved registers point at.
    StringIo {
        /// The exit qualification.
        qualification: u64,
    },
    /// The VMM did not carry the instruction out: the TDCALL failed, or
    /// the VMM answered with a status other than success.
    Vmcall(VmcallError),
    /// An EPT violation on a private GPA: the host removed, or never added,
    /// a page the guest owns. Fatal: report it
    /// (`tdcall::report_fatal_error`) and stop.
    PrivateEptViolation {
        /// The guest physical address accessed.
        gpa: u64,
        /// The guest linear address accessed.
        gla: u64,
    },
    /// A recorded `load_unaligned_zeropad` load faulted on a shared GPA and
    /// the fix-up declined it: fatal, as a load the fix-up does not finish
    /// has no other handler.
    #[cfg(feature = "zeropad")]
    Zeropad(crate::zeropad::NotHandled),
}

impl From<VmcallError> for VeError {
    fn from(e: VmcallError) -> Self {
        VeError::Vmcall(e)
    }
}

impl core::fmt::Display for VeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            VeError::UnsupportedExitReason(r) => write!(f, "#VE for exit reason {r}, which is not emulated"),
            VeError::InvalidInstructionLength(l) => write!(f, "instruction length {l} is not 1 to 15 bytes"),
            VeError::InvalidIoSize { qualification } => {
                write!(f, "port I/O of no valid size (exit qualification {qualification:#x})")
            }
            VeError::StringIo { qualification } => {
                write!(
                    f,
                    "string or REP port I/O is not emulated (exit qualification {qualification:#x})"
                )
            }
            VeError::Vmcall(e) => write!(f, "the VMM did not carry the instruction out: {e}"),
            VeError::PrivateEptViolation { gpa, gla } => {
                write!(
                    f,
                    "EPT violation on private GPA {gpa:#x} (GLA {gla:#x}): a private page is gone"
                )
            }
            #[cfg(feature = "zeropad")]
            VeError::Zeropad(why) => write!(f, "zeropad load across a shared page not fixed up: {why:?}"),
        }
    }
}

impl core::error::Error for VeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            VeError::Vmcall(e) => Some(e),
            _ => None,
        }
    }
}

/// The longest x86 instruction: "the maximum length of an Intel 64 and
/// IA-32 instruction remains 15 bytes" (Intel SDM vol. 2A, 2.3.11); the
/// CPU refuses a longer one (#GP) before it executes.
const MAX_INSTRUCTION_LENGTH: u32 = 15;

/// Registers an emulated instruction writes, applied only once everything
/// it needed from the VMM has succeeded.
type Writes = [Option<(Gpr, u64)>; 4];

impl VeHandler {
    /// A handler for a TD whose shared bit is `shared_mask`
    /// ([`TdInfo::shared_mask`](tdcall::TdInfo::shared_mask)). `None`
    /// unless it is bit 47 or bit 51, the only ones TDX defines (a GPA
    /// width of 48 or 52).
    pub const fn new(shared_mask: u64) -> Option<VeHandler> {
        if shared_mask == 1 << 47 || shared_mask == 1 << 51 {
            Some(VeHandler { shared_mask })
        } else {
            None
        }
    }

    /// The shared bit it classifies GPAs with.
    pub const fn shared_mask(&self) -> u64 {
        self.shared_mask
    }

    /// Handles the #VE `ve` (from [`tdcall::ve_info`]) raised by the
    /// context saved in `regs`: see the [module docs](self).
    pub fn handle<T: Tdcall + ?Sized, R: RegisterAccess + ?Sized>(
        &self,
        tdcall: &T,
        ve: &VeInfo,
        regs: &mut R,
    ) -> Result<VeOutcome, VeError> {
        type Emulate<T, R> = fn(&T, &VeInfo, &R) -> Result<Writes, VeError>;
        let emulate: Emulate<T, R> = match ve.exit_reason {
            VeInfo::EXIT_REASON_EPT_VIOLATION => return ept::ept_violation(ve, regs, self.shared_mask),
            VeInfo::EXIT_REASON_CPUID => cpuid,
            VeInfo::EXIT_REASON_RDMSR => rdmsr,
            VeInfo::EXIT_REASON_WRMSR => wrmsr,
            VeInfo::EXIT_REASON_IO_INSTRUCTION => port_io::emulate,
            other => return Err(VeError::UnsupportedExitReason(other)),
        };
        // Checked before the VMM is asked: an OUT must not reach the device
        // when the guest could not then resume after it.
        if !(1..=MAX_INSTRUCTION_LENGTH).contains(&ve.instruction_length) {
            return Err(VeError::InvalidInstructionLength(ve.instruction_length));
        }
        let writes = emulate(tdcall, ve, regs)?;
        for (reg, value) in writes.into_iter().flatten() {
            regs.set_gpr(reg, value);
        }
        regs.set_rip(regs.rip().wrapping_add(ve.instruction_length as u64));
        Ok(VeOutcome::Emulated)
    }
}

/// CPUID: EAX = leaf, ECX = sub-leaf; EAX, EBX, ECX, EDX written, each
/// zero-extended into its 64-bit register.
fn cpuid<T: Tdcall + ?Sized, R: RegisterAccess + ?Sized>(
    tdcall: &T,
    _ve: &VeInfo,
    regs: &R,
) -> Result<Writes, VeError> {
    let leaf = regs.gpr(Gpr::Rax) as u32;
    let subleaf = regs.gpr(Gpr::Rcx) as u32;
    let r = if VMM_CPUID_LEAVES.contains(&leaf) {
        tdcall::cpuid(tdcall, leaf, subleaf)?
    } else {
        CpuidResult::default()
    };
    Ok([
        Some((Gpr::Rax, r.eax as u64)),
        Some((Gpr::Rbx, r.ebx as u64)),
        Some((Gpr::Rcx, r.ecx as u64)),
        Some((Gpr::Rdx, r.edx as u64)),
    ])
}

/// RDMSR: ECX = the MSR; EDX:EAX = its value, each half zero-extended.
fn rdmsr<T: Tdcall + ?Sized, R: RegisterAccess + ?Sized>(
    tdcall: &T,
    _ve: &VeInfo,
    regs: &R,
) -> Result<Writes, VeError> {
    let value = tdcall::rdmsr(tdcall, regs.gpr(Gpr::Rcx) as u32)?;
    Ok([
        Some((Gpr::Rax, value & 0xFFFF_FFFF)),
        Some((Gpr::Rdx, value >> 32)),
        None,
        None,
    ])
}

/// WRMSR: ECX = the MSR, EDX:EAX = the value (the upper halves of RDX and
/// RAX are ignored, as the instruction ignores them).
fn wrmsr<T: Tdcall + ?Sized, R: RegisterAccess + ?Sized>(
    tdcall: &T,
    _ve: &VeInfo,
    regs: &R,
) -> Result<Writes, VeError> {
    let value = (regs.gpr(Gpr::Rdx) << 32) | (regs.gpr(Gpr::Rax) & 0xFFFF_FFFF);
    tdcall::wrmsr(tdcall, regs.gpr(Gpr::Rcx) as u32, value)?;
    Ok([None; 4])
}
