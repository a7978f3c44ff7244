//! The SEV-SNP #VC handler, for the instructions the hypervisor must carry
//! out for the guest: CPUID, RDMSR/WRMSR and port IN/OUT.
//!
//! The guest's registers are encrypted, so an intercepted instruction
//! raises #VC (vector 29) in the guest instead of exiting; the OS's #VC
//! entry saves the registers and calls [`handle_vc`] with the exception's
//! error code (the SVM exit code, AMD APM vol. 2, section 15.35.5: 0x72
//! CPUID, 0x7B IOIO, 0x7C MSR), the saved registers and the instruction's
//! bytes. The handler sends the
//! instruction's inputs through the GHCB (the NAE events of
//! [`snp_ghcb::cpuid`], [`snp_ghcb::ioio`] and [`snp_ghcb::msr`]), checks
//! the answer, and then writes the registers the instruction writes and
//! moves RIP past it. On any error it changes nothing and says why; when
//! the hypervisor asks for an exception
//! ([`VcError::exception`]), the OS raises it at the same RIP.
//!
//! Port I/O is decoded from the instruction bytes, since the exception
//! carries no operands: `IN`/`OUT` with an 8-bit immediate port or DX,
//! 8/16/32-bit (an 0x66 prefix for 16), REX allowed. String I/O
//! (`INS`/`OUTS`, `REP` or not) is refused with
//! [`DecodeError::StringIo`]: it would need the guest's memory copied
//! through a shared buffer, which this handler does not do. The handler
//! decodes 64-bit-mode code only. An `IN` writes AL or AX and keeps the
//! rest of RAX, or writes EAX and clears bits 63:32, as the CPU does.
//!
//! # SEV-SNP caveats
//!
//! - **CPUID answers are the hypervisor's word.** It can report any
//!   feature, topology or XSAVE size. A production SNP guest answers CPUID
//!   from the SNP CPUID page (the table the firmware checked against the
//!   CPU at launch) and only falls back to the hypervisor for leaves that
//!   table lacks, treating that answer as untrusted input. This handler
//!   asks the hypervisor for every leaf: put the CPUID page lookup in
//!   front of it.
//! - **The GHCB must not be mid-call on this CPU.** The handler rewrites
//!   the page; if the #VC arrived while a GHCB call on the same CPU was
//!   between filling the page and reading the answer (a page state change,
//!   or another #VC's event, from an NMI handler that does port I/O), that
//!   call's request is destroyed. Under SNP the hypervisor accepts only
//!   the GHCB GPA registered for the vCPU, so a second page is no way out
//!   without registering it. Do as Linux does: keep a per-CPU "GHCB in
//!   use" mark and, when a #VC finds it set, copy the page to private
//!   memory (Linux's backup GHCB), handle the #VC through the page, and
//!   copy it back before returning. With the engine's per-CPU slots,
//!   [`GhcbSlot::try_with`](crate::platform::snp::GhcbSlot::try_with)
//!   lends the page only when no page state change holds it.
//! - **The bytes at RIP are the OS's to fetch.** For a #VC from user mode
//!   they must be read as user memory, with the user's permissions; pass
//!   the bytes up to 15 or up to the end of the readable mapping,
//!   whichever comes first (a short slice is refused as
//!   [`DecodeError::Truncated`], never read past).

mod decode;

pub use decode::{
    decode_port_io, decode_system, DecodeError, PortIo, PortOperand, SystemInstruction, MAX_INSTRUCTION_LEN,
};

use snp_ghcb::ioio::{self, Direction, PortAccess};
use snp_ghcb::{cpuid, msr, EventError, Exception, GhcbMsr, GhcbPage, IoSize};

use super::{Gpr, RegisterAccess};

/// #VC error code of CPUID.
pub const EXIT_CPUID: u64 = 0x72;
/// #VC error code of IN/OUT/INS/OUTS.
pub const EXIT_IOIO: u64 = 0x7B;
/// #VC error code of RDMSR/WRMSR.
pub const EXIT_MSR: u64 = 0x7C;

/// What the handler completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Handled {
    /// An IN: `value` went to AL/AX/EAX.
    PortIn {
        /// The port.
        port: u16,
        /// The width.
        size: IoSize,
        /// The value read, masked to the width.
        value: u32,
    },
    /// An OUT of `value` (AL/AX/EAX).
    PortOut {
        /// The port.
        port: u16,
        /// The width.
        size: IoSize,
        /// The value written.
        value: u32,
    },
    /// CPUID of (EAX, ECX) = (`leaf`, `subleaf`).
    Cpuid {
        /// EAX on entry.
        leaf: u32,
        /// ECX on entry.
        subleaf: u32,
    },
    /// RDMSR of ECX = `msr`.
    Rdmsr {
        /// The MSR.
        msr: u32,
    },
    /// WRMSR of ECX = `msr`.
    Wrmsr {
        /// The MSR.
        msr: u32,
    },
}

/// A #VC the handler did not complete; the registers are as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcError {
    /// The error code is not one of [`EXIT_CPUID`], [`EXIT_IOIO`],
    /// [`EXIT_MSR`] (e.g. an MMIO #NPF, 0x400, or the instructions this
    /// handler does not complete).
    UnsupportedExit(u64),
    /// The bytes at RIP are not an instruction the handler completes for
    /// that error code.
    Decode(DecodeError),
    /// The bytes at RIP are an instruction of another error code (a CPUID
    /// #VC over RDMSR bytes): refused, never completed as either.
    ExitMismatch {
        /// The #VC error code.
        error_code: u64,
        /// The instruction the bytes hold.
        found: SystemInstruction,
    },
    /// The hypervisor's answer cannot be used, or it asks for an exception
    /// ([`VcError::exception`]).
    Event(EventError),
}

impl VcError {
    /// The exception the hypervisor asks the guest to raise at the
    /// instruction instead (e.g. #GP for an MSR it refuses), if that is
    /// what happened.
    pub fn exception(&self) -> Option<Exception> {
        match self {
            VcError::Event(EventError::Exception(e)) => Some(*e),
            _ => None,
        }
    }
}

impl core::fmt::Display for VcError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VcError::UnsupportedExit(code) => write!(f, "#VC for exit code {code:#x} is not handled"),
            VcError::Decode(e) => write!(f, "#VC instruction: {e}"),
            VcError::ExitMismatch { error_code, found } => {
                write!(f, "#VC error code {error_code:#x} over the bytes of {found:?}")
            }
            VcError::Event(e) => write!(f, "#VC event: {e}"),
        }
    }
}

impl core::error::Error for VcError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            VcError::UnsupportedExit(_) | VcError::ExitMismatch { .. } => None,
            VcError::Decode(e) => Some(e),
            VcError::Event(e) => Some(e),
        }
    }
}

impl From<DecodeError> for VcError {
    fn from(e: DecodeError) -> Self {
        VcError::Decode(e)
    }
}

impl From<EventError> for VcError {
    fn from(e: EventError) -> Self {
        VcError::Event(e)
    }
}

/// Completes the instruction a #VC with `error_code` stopped, through the
/// GHCB `ghcb`: on success the registers hold what the instruction writes
/// and RIP points past it; on error nothing in `regs` has changed.
///
/// `code` holds the bytes at RIP (see the module docs on fetching them);
/// `xcr0` is the guest's XCR0 (`XGETBV` with ECX = 0, or 1 while
/// CR4.OSXSAVE is clear), sent with CPUID leaf 0xD only.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]; `ghcb` must be the page registered for
/// this CPU and in no GHCB call on it (see the module docs); the
/// instruction's effect (a port or MSR written) must be acceptable, as it
/// was to the code that executed it.
pub unsafe fn handle_vc<H: GhcbMsr + ?Sized, R: RegisterAccess + ?Sized>(
    hv: &H,
    ghcb: &mut GhcbPage,
    error_code: u64,
    regs: &mut R,
    code: &[u8],
    xcr0: u64,
) -> Result<Handled, VcError> {
    match error_code {
        // SAFETY: forwarded to the caller.
        EXIT_IOIO => unsafe { port_io(hv, ghcb, regs, code) },
        // SAFETY: forwarded to the caller.
        EXIT_CPUID | EXIT_MSR => unsafe { system(hv, ghcb, error_code, regs, code, xcr0) },
        other => Err(VcError::UnsupportedExit(other)),
    }
}

/// RAX after an IN of `value`: AL and AX merge into RAX, EAX replaces it
/// (a 32-bit register write clears bits 63:32).
fn merge_in(rax: u64, size: IoSize, value: u32) -> u64 {
    match size {
        IoSize::Byte | IoSize::Word => rax & !size.mask() | value as u64 & size.mask(),
        IoSize::Dword => value as u64,
    }
}

/// # Safety
///
/// As for [`handle_vc`].
unsafe fn port_io<H: GhcbMsr + ?Sized, R: RegisterAccess + ?Sized>(
    hv: &H,
    ghcb: &mut GhcbPage,
    regs: &mut R,
    code: &[u8],
) -> Result<Handled, VcError> {
    let insn = decode_port_io(code)?;
    let next = regs.rip().wrapping_add(insn.len as u64);
    let port = match insn.port {
        PortOperand::Imm8(port) => port as u16,
        PortOperand::Dx => regs.gpr(Gpr::Rdx) as u16,
    };
    let access = PortAccess {
        port,
        size: insn.size,
        address_size: insn.address_size,
    };
    let rax = regs.gpr(Gpr::Rax);
    let handled = match insn.direction {
        Direction::In => {
            // SAFETY: forwarded to the caller.
            let value = unsafe { ioio::port_in(ghcb, hv, access) }?;
            regs.set_gpr(Gpr::Rax, merge_in(rax, insn.size, value));
            Handled::PortIn {
                port,
                size: insn.size,
                value,
            }
        }
        Direction::Out => {
            let value = (rax & insn.size.mask()) as u32;
            // SAFETY: forwarded to the caller.
            unsafe { ioio::port_out(ghcb, hv, access, value) }?;
            Handled::PortOut {
                port,
                size: insn.size,
                value,
            }
        }
    };
    regs.set_rip(next);
    Ok(handled)
}

/// # Safety
///
/// As for [`handle_vc`].
unsafe fn system<H: GhcbMsr + ?Sized, R: RegisterAccess + ?Sized>(
    hv: &H,
    ghcb: &mut GhcbPage,
    error_code: u64,
    regs: &mut R,
    code: &[u8],
    xcr0: u64,
) -> Result<Handled, VcError> {
    let (insn, len) = decode_system(code)?;
    // The error code and the bytes must agree: a #VC whose bytes were
    // rewritten under it (self-modifying code, another CPU) is not
    // completed as an instruction it was not raised for.
    let expected = match insn {
        SystemInstruction::Cpuid => EXIT_CPUID,
        SystemInstruction::Rdmsr | SystemInstruction::Wrmsr => EXIT_MSR,
    };
    if expected != error_code {
        return Err(VcError::ExitMismatch {
            error_code,
            found: insn,
        });
    }
    let next = regs.rip().wrapping_add(len as u64);
    // The instructions read 32-bit registers: bits 63:32 never leave.
    let [eax, ecx, edx] = [Gpr::Rax, Gpr::Rcx, Gpr::Rdx].map(|r| regs.gpr(r) as u32);
    let handled = match insn {
        SystemInstruction::Cpuid => {
            // SAFETY: forwarded to the caller.
            let r = unsafe { cpuid::cpuid(ghcb, hv, eax, ecx, xcr0) }?;
            for (reg, value) in [
                (Gpr::Rax, r.eax),
                (Gpr::Rbx, r.ebx),
                (Gpr::Rcx, r.ecx),
                (Gpr::Rdx, r.edx),
            ] {
                regs.set_gpr(reg, value as u64);
            }
            Handled::Cpuid {
                leaf: eax,
                subleaf: ecx,
            }
        }
        SystemInstruction::Rdmsr => {
            // SAFETY: forwarded to the caller.
            let value = unsafe { msr::rdmsr(ghcb, hv, ecx) }?;
            regs.set_gpr(Gpr::Rax, value & 0xFFFF_FFFF);
            regs.set_gpr(Gpr::Rdx, value >> 32);
            Handled::Rdmsr { msr: ecx }
        }
        SystemInstruction::Wrmsr => {
            let value = (edx as u64) << 32 | eax as u64;
            // SAFETY: forwarded to the caller.
            unsafe { msr::wrmsr(ghcb, hv, ecx, value) }?;
            Handled::Wrmsr { msr: ecx }
        }
    };
    regs.set_rip(next);
    Ok(handled)
}
