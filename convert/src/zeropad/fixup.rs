//! Decoding the faulting load and finishing it.

use core::sync::atomic::{AtomicBool, Ordering};

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

use crate::exception::{Gpr, RegisterAccess};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Builds the decoder's tables (a heap allocation, once). Call it at boot,
/// before anything can fault: until it has run, every fault is reported
/// [`NotHandled::NotInitialised`] rather than allocate in the fault path.
pub fn init() {
    let mut decoder = Decoder::with_ip(64, &[0x48, 0x8B, 0x00], 0, DecoderOptions::NONE);
    let _ = decoder.decode();
    INITIALISED.store(true, Ordering::Release);
}

/// Whether [`init`] has run.
pub fn is_initialised() -> bool {
    INITIALISED.load(Ordering::Acquire)
}

/// The exception that brought the OS here. Both are handled the same way;
/// only the origin of the fault address differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// #PF: the fault address is CR2.
    PageFault,
    /// TDX #VE (EPT violation on a shared GPA): the fault address is the
    /// GLA from TDG.VP.VEINFO.GET.
    VirtualizationException,
}

/// Why a fault was left to the OS. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotHandled {
    /// [`init`] has not run.
    NotInitialised,
    /// RIP is not a recorded zeropad load.
    NotASite,
    /// The bytes do not decode (or are cut short).
    Undecodable,
    /// The instruction is not `MOV r64, m64`.
    NotMovR64M64,
    /// The decoded length is not the recorded one.
    LengthMismatch {
        /// Decoded.
        decoded: usize,
        /// Recorded.
        recorded: usize,
    },
    /// A lock, rep or segment prefix.
    Prefixed,
    /// RIP-relative or 32-bit addressing.
    UnsupportedAddressing,
    /// The fault is not at the next 8-byte boundary of an unaligned load:
    /// the load did not fault because it ran into the next page.
    NotAtNextWord {
        /// The load's effective address.
        address: u64,
        /// The fault address.
        fault: u64,
    },
}

/// Handles a fault at a zeropad site: see the [module docs](super). Call
/// from the #PF handler with CR2, and from the #VE handler with the GLA.
///
/// Takes no lock and allocates nothing.
#[cfg(target_arch = "x86_64")]
pub fn handle_fault<R: RegisterAccess + ?Sized>(regs: &mut R, fault: u64, kind: FaultKind) -> Result<(), NotHandled> {
    let _ = kind;
    if !is_initialised() {
        return Err(NotHandled::NotInitialised);
    }
    let site = super::site::find(regs.rip()).ok_or(NotHandled::NotASite)?;
    // SAFETY: the site table records an instruction of `len` bytes at RIP,
    // in this program's code, which is mapped while it runs.
    let code = unsafe { core::slice::from_raw_parts(regs.rip() as *const u8, site.len()) };
    fixup_with(regs, code, fault, |aligned| {
        // SAFETY: `aligned` is the 8-aligned word holding the load's first
        // byte, which the caller of `load_unaligned_zeropad` guarantees
        // readable; the word ends at the page boundary, inside that page.
        unsafe { (aligned as *const u64).read_volatile() }
    })
}

/// Where the recorded load at RIP reads from, decoded and checked as
/// [`handle_fault`] decodes and checks it: `Ok(None)` if RIP is not a
/// recorded load. For a #VE handler, which must know whether the access
/// runs across a page before it calls [`handle_fault`].
#[cfg(target_arch = "x86_64")]
pub(crate) fn site_load_address<R: RegisterAccess + ?Sized>(regs: &R) -> Result<Option<u64>, NotHandled> {
    let Some(site) = super::site::find(regs.rip()) else {
        return Ok(None);
    };
    if !is_initialised() {
        return Err(NotHandled::NotInitialised);
    }
    // SAFETY: as in `handle_fault`.
    let code = unsafe { core::slice::from_raw_parts(regs.rip() as *const u8, site.len()) };
    decode_load(regs, code).map(|load| Some(load.address))
}

/// The checks and the fix-up, given the instruction bytes at RIP and a way
/// to load the aligned word: everything [`handle_fault`] does but the site
/// lookup and the memory reads, so that any bytes and register state can be
/// tried against it.
pub fn fixup_with<R: RegisterAccess + ?Sized>(
    regs: &mut R,
    code: &[u8],
    fault: u64,
    load_aligned: impl FnOnce(u64) -> u64,
) -> Result<(), NotHandled> {
    if !is_initialised() {
        return Err(NotHandled::NotInitialised);
    }
    let Load { dest, address, next_ip } = decode_load(regs, code)?;
    let aligned = address & !7;
    if address & 7 == 0 || aligned.checked_add(8) != Some(fault) {
        return Err(NotHandled::NotAtNextWord { address, fault });
    }
    let word = load_aligned(aligned);
    regs.set_gpr(dest, word >> ((address & 7) * 8));
    regs.set_rip(next_ip);
    Ok(())
}

/// A decoded `MOV r64, m64`.
struct Load {
    dest: Gpr,
    /// Its effective address.
    address: u64,
    /// The RIP after it.
    next_ip: u64,
}

/// Decodes `code` (the bytes at RIP) as a `MOV r64, m64` this fix-up
/// finishes, and computes its effective address from the saved registers.
/// The caller has checked [`is_initialised`].
fn decode_load<R: RegisterAccess + ?Sized>(regs: &R, code: &[u8]) -> Result<Load, NotHandled> {
    let mut decoder =
        Decoder::try_with_ip(64, code, regs.rip(), DecoderOptions::NONE).map_err(|_| NotHandled::Undecodable)?;
    let mut insn = Instruction::default();
    decoder.decode_out(&mut insn);
    if insn.is_invalid() {
        return Err(NotHandled::Undecodable);
    }
    if insn.len() != code.len() {
        return Err(NotHandled::LengthMismatch {
            decoded: insn.len(),
            recorded: code.len(),
        });
    }
    if insn.code() != Code::Mov_r64_rm64 || insn.op1_kind() != OpKind::Memory {
        return Err(NotHandled::NotMovR64M64);
    }
    if insn.has_lock_prefix()
        || insn.has_rep_prefix()
        || insn.has_repne_prefix()
        || insn.segment_prefix() != Register::None
    {
        return Err(NotHandled::Prefixed);
    }
    let dest = gpr(insn.op0_register()).ok_or(NotHandled::NotMovR64M64)?;
    let address = effective_address(&insn, regs)?;
    Ok(Load {
        dest,
        address,
        next_ip: insn.next_ip(),
    })
}

/// base + index * scale + displacement, from the saved registers.
fn effective_address<R: RegisterAccess + ?Sized>(insn: &Instruction, regs: &R) -> Result<u64, NotHandled> {
    let register = |r: Register| -> Result<u64, NotHandled> {
        match r {
            Register::None => Ok(0),
            r => gpr(r).map(|g| regs.gpr(g)).ok_or(NotHandled::UnsupportedAddressing),
        }
    };
    let base = register(insn.memory_base())?;
    let index = register(insn.memory_index())?;
    Ok(base
        .wrapping_add(index.wrapping_mul(insn.memory_index_scale() as u64))
        .wrapping_add(insn.memory_displacement64()))
}

/// The 64-bit GPR `r` names (RIP, 32-bit and other registers: `None`).
fn gpr(r: Register) -> Option<Gpr> {
    Some(match r {
        Register::RAX => Gpr::Rax,
        Register::RCX => Gpr::Rcx,
        Register::RDX => Gpr::Rdx,
        Register::RBX => Gpr::Rbx,
        Register::RSP => Gpr::Rsp,
        Register::RBP => Gpr::Rbp,
        Register::RSI => Gpr::Rsi,
        Register::RDI => Gpr::Rdi,
        Register::R8 => Gpr::R8,
        Register::R9 => Gpr::R9,
        Register::R10 => Gpr::R10,
        Register::R11 => Gpr::R11,
        Register::R12 => Gpr::R12,
        Register::R13 => Gpr::R13,
        Register::R14 => Gpr::R14,
        Register::R15 => Gpr::R15,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zeropad::FaultFrame;

    const WORD: u64 = 0x8877_6655_4433_2211;
    const PAGE_END: u64 = 0x1000_1000;

    fn frame_with(reg: Gpr, value: u64) -> FaultFrame {
        let mut f = FaultFrame {
            gprs: core::array::from_fn(|i| 0x1111 * i as u64),
            rip: 0x40_0000,
        };
        f.gprs[reg as usize] = value;
        f
    }

    fn run(frame: &mut FaultFrame, code: &[u8], fault: u64) -> (Result<(), NotHandled>, Option<u64>) {
        init();
        let mut loaded = None;
        let r = fixup_with(frame, code, fault, |a| {
            loaded = Some(a);
            WORD
        });
        (r, loaded)
    }

    #[test]
    fn mov_rax_from_rcx_at_every_offset() {
        for offset in 1..8u64 {
            let mut f = frame_with(Gpr::Rcx, PAGE_END - 8 + offset);
            let (r, loaded) = run(&mut f, &[0x48, 0x8B, 0x01], PAGE_END);
            assert_eq!(r, Ok(()));
            assert_eq!(loaded, Some(PAGE_END - 8));
            assert_eq!(f.gprs[Gpr::Rax as usize], WORD >> (offset * 8));
            assert_eq!(f.rip, 0x40_0003);
        }
    }

    #[test]
    fn every_destination_register() {
        for dest in Gpr::ALL {
            let d = dest as u8;
            // REX.W, REX.R for r8-r15; ModRM mod=00 reg=dest rm=001 (rcx).
            let code = [0x48 | ((d >> 3) << 2), 0x8B, ((d & 7) << 3) | 0x01];
            let mut f = frame_with(Gpr::Rcx, PAGE_END - 3);
            let before = f;
            let (r, _) = run(&mut f, &code, PAGE_END);
            assert_eq!(r, Ok(()), "{dest:?}");
            assert_eq!(f.gprs[d as usize], WORD >> 40);
            for other in Gpr::ALL.iter().filter(|&&g| g != dest) {
                assert_eq!(
                    f.gprs[*other as usize], before.gprs[*other as usize],
                    "{dest:?} changed {other:?}"
                );
            }
        }
    }

    #[test]
    fn addressing_forms() {
        let addr = PAGE_END - 6;
        // (bytes, registers to set: (reg, value))
        type Case<'a> = (&'a [u8], &'a [(Gpr, u64)]);
        let cases: [Case; 8] = [
            (&[0x48, 0x8B, 0x04, 0x24], &[(Gpr::Rsp, addr)]),        // [rsp]: SIB
            (&[0x49, 0x8B, 0x04, 0x24], &[(Gpr::R12, addr)]),        // [r12]: SIB
            (&[0x48, 0x8B, 0x45, 0x00], &[(Gpr::Rbp, addr)]),        // [rbp+0]: disp8
            (&[0x49, 0x8B, 0x45, 0x00], &[(Gpr::R13, addr)]),        // [r13+0]: disp8
            (&[0x48, 0x8B, 0x41, 0x10], &[(Gpr::Rcx, addr - 0x10)]), // [rcx+0x10]
            (&[0x48, 0x8B, 0x41, 0xF0], &[(Gpr::Rcx, addr + 0x10)]), // [rcx-0x10]
            (
                &[0x48, 0x8B, 0x81, 0x00, 0x10, 0x00, 0x00],
                &[(Gpr::Rcx, addr - 0x1000)],
            ), // [rcx+0x1000]
            (&[0x4A, 0x8B, 0x04, 0xF9], &[(Gpr::Rcx, addr - 0x40), (Gpr::R15, 8)]), // [rcx+r15*8]
        ];
        for (code, regs) in cases {
            let mut f = frame_with(Gpr::Rax, 0);
            for &(g, v) in regs {
                f.gprs[g as usize] = v;
            }
            let (r, loaded) = run(&mut f, code, PAGE_END);
            assert_eq!(r, Ok(()), "{code:x?}");
            assert_eq!(loaded, Some(PAGE_END - 8));
            assert_eq!(f.gprs[0], WORD >> 16, "{code:x?}");
            assert_eq!(f.rip, 0x40_0000 + code.len() as u64);
        }
    }

    #[test]
    fn everything_else_is_left_alone() {
        let addr = PAGE_END - 3;
        let cases: [(&str, &[u8], u64, NotHandled); 11] = [
            ("4-byte mov", &[0x8B, 0x01], PAGE_END, NotHandled::NotMovR64M64),
            ("2-byte mov", &[0x66, 0x8B, 0x01], PAGE_END, NotHandled::NotMovR64M64),
            ("store", &[0x48, 0x89, 0x01], PAGE_END, NotHandled::NotMovR64M64),
            ("lea", &[0x48, 0x8D, 0x01], PAGE_END, NotHandled::NotMovR64M64),
            (
                "register source",
                &[0x48, 0x8B, 0xC1],
                PAGE_END,
                NotHandled::NotMovR64M64,
            ),
            ("truncated", &[0x48, 0x8B], PAGE_END, NotHandled::Undecodable),
            (
                "trailing byte",
                &[0x48, 0x8B, 0x01, 0x90],
                PAGE_END,
                NotHandled::LengthMismatch {
                    decoded: 3,
                    recorded: 4,
                },
            ),
            ("fs prefix", &[0x64, 0x48, 0x8B, 0x01], PAGE_END, NotHandled::Prefixed),
            (
                "rip-relative",
                &[0x48, 0x8B, 0x05, 0, 0, 0, 0],
                PAGE_END,
                NotHandled::UnsupportedAddressing,
            ),
            (
                "32-bit addressing",
                &[0x67, 0x48, 0x8B, 0x01],
                PAGE_END,
                NotHandled::UnsupportedAddressing,
            ),
            (
                "fault inside the first page",
                &[0x48, 0x8B, 0x01],
                addr,
                NotHandled::NotAtNextWord {
                    address: addr,
                    fault: addr,
                },
            ),
        ];
        for (what, code, fault, expected) in cases {
            let mut f = frame_with(Gpr::Rcx, addr);
            let before = f;
            let (r, loaded) = run(&mut f, code, fault);
            assert_eq!(r, Err(expected), "{what}");
            assert_eq!(f, before, "{what}: registers changed");
            assert_eq!(loaded, None, "{what}: memory read");
        }
        // Not at aligned + 8, and an aligned load (which cannot cross).
        for (a, fault) in [(addr, PAGE_END + 8), (PAGE_END - 8, PAGE_END)] {
            let mut f = frame_with(Gpr::Rcx, a);
            let before = f;
            let (r, loaded) = run(&mut f, &[0x48, 0x8B, 0x01], fault);
            assert_eq!(r, Err(NotHandled::NotAtNextWord { address: a, fault }));
            assert_eq!((f, loaded), (before, None));
        }
    }
}
