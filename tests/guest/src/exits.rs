//! What a TD or an SNP guest cannot do on its own: port I/O, and on SNP
//! CPUID, go through the host. The console takes the direct route (a
//! TDVMCALL, a GHCB event) once the platform is known; the #VE (TDX) and
//! #VC (SNP) handlers here complete whatever else traps, through the
//! crates' handlers, and stop the guest on anything they refuse.
//!
//! The gates are installed on every build; outside a TD or an SNP guest
//! the CPU never raises either exception.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use coco_convert::exception::vc::{handle_vc, EXIT_CPUID};
use coco_convert::exception::ve::{VeHandler, VeOutcome};
use coco_convert::exception::{Gpr, RegisterAccess};
use snp_ghcb::GhcbMsrInstruction;
use tdcall::TdcallInstruction;

use crate::io::{self, Route};
use crate::trap::Frame;
use crate::{fail, println};

/// The TD's shared bit, from TDG.VP.INFO; 0 until known.
static TD_SHARED_MASK: AtomicU64 = AtomicU64::new(0);
/// The CPU raised a #VC: it is an SEV-ES or SNP guest, whatever CPUID
/// answers (the answers are the hypervisor's word).
pub static VC_SEEN: AtomicBool = AtomicBool::new(false);

fn tdcall() -> TdcallInstruction {
    // SAFETY: called only in a TD (after a #VE, or once detection found
    // TDX), at CPL 0.
    unsafe { TdcallInstruction::new() }
}

fn ghcb_msr() -> GhcbMsrInstruction {
    // SAFETY: called only in an SEV-ES or SNP guest (after a #VC, or once
    // detection found SNP), at CPL 0.
    unsafe { GhcbMsrInstruction::new() }
}

fn io_size(width: u8) -> tdcall::IoSize {
    match width {
        1 => tdcall::IoSize::Byte,
        2 => tdcall::IoSize::Word,
        _ => tdcall::IoSize::Dword,
    }
}

/// A port write in a TD: TDVMCALL\<Instruction.IO\>.
pub fn td_port_out(port: u16, value: u32, width: u8) {
    // A VMM that refuses a console write loses the byte, nothing else.
    let _ = tdcall::io_write(&tdcall(), port, io_size(width), value);
}

/// A port write in an SNP guest: the GHCB's IOIO event, through this
/// CPU's GHCB. While a page state change holds the page (a failure
/// reported from inside a conversion), or once the GHCB is gone, the byte
/// is lost rather than the request the page holds.
#[cfg(not(feature = "emulator"))]
pub fn snp_port_out(port: u16, value: u32, width: u8) {
    let _ = snp_port_out_carried(port, value, width);
}

/// [`snp_port_out`], saying whether the host carried the write out.
pub fn snp_port_out_carried(port: u16, value: u32, width: u8) -> bool {
    let size = match width {
        1 => snp_ghcb::IoSize::Byte,
        2 => snp_ghcb::IoSize::Word,
        _ => snp_ghcb::IoSize::Dword,
    };
    let hv = ghcb_msr();
    crate::GHCB_SLOTS[crate::smp::cpu()]
        .try_with(|page| {
            // SAFETY: the page is this CPU's registered GHCB, lent by its
            // slot; a console or debug-exit write is what the guest asked for.
            unsafe { snp_ghcb::ioio::port_out(page, &hv, snp_ghcb::PortAccess::new(port, size), value) }.is_ok()
        })
        .unwrap_or(false)
}

/// The TD's shared bit, asked once.
pub fn td_shared_mask() -> u64 {
    match TD_SHARED_MASK.load(Ordering::Acquire) {
        0 => {
            let mask = tdcall::vp_info(&tdcall()).map_or(0, |info| info.shared_mask());
            TD_SHARED_MASK.store(mask, Ordering::Release);
            mask
        }
        mask => mask,
    }
}

/// #VE: the TDX module's report first (it keeps one, and another #VE
/// would need it), then the crate's handler.
pub fn on_ve(frame: &mut Frame) {
    let tdcall = tdcall();
    let ve = tdcall::ve_info(&tdcall);
    // Whatever happens next is printed through the VMM.
    if !matches!(io::route(), Route::Host(_)) {
        io::set_route(Route::Host(td_port_out));
    }
    let Ok(ve) = ve else {
        fail("#VE: TDG.VP.VEINFO.GET failed")
    };
    let Some(handler) = VeHandler::new(td_shared_mask()) else {
        fail("#VE: TDG.VP.INFO gave no usable shared bit")
    };
    match handler.handle(&tdcall, &ve, frame) {
        Ok(VeOutcome::Emulated) => {}
        Ok(VeOutcome::Mmio(access)) => {
            println!("#VE: MMIO at {:#x} (RIP {:#x}): {access:?}", ve.gpa, frame.rip);
            fail("#VE: this guest does no MMIO");
        }
        Err(why) => {
            println!("#VE: exit reason {}, RIP {:#x}: {why}", ve.exit_reason, frame.rip);
            let _ = tdcall::report_fatal_error(&tdcall, ve.exit_reason);
            fail("#VE the handler refused");
        }
    }
}

/// The instruction bytes at RIP: up to 15, never past the end of the
/// kernel image they lie in.
fn code_at(rip: u64) -> &'static [u8] {
    let (start, end) = crate::memory::image();
    if rip < start || rip >= end {
        return &[];
    }
    let len = (end - rip).min(coco_convert::exception::vc::MAX_INSTRUCTION_LEN as u64);
    // SAFETY: the image is mapped for the guest's lifetime, and `rip` to
    // `rip + len` lies in it.
    unsafe { core::slice::from_raw_parts(rip as *const u8, len as usize) }
}

/// #VC: through this CPU's GHCB once it has one; before that (or while
/// a page state change holds it) only CPUID, through the GHCB MSR
/// protocol, which answers for subleaf 0 alone.
pub fn on_vc(frame: &mut Frame) {
    VC_SEEN.store(true, Ordering::Release);
    let hv = ghcb_msr();
    let code = code_at(frame.rip);
    let through_ghcb = crate::GHCB_SLOTS[crate::smp::cpu()].try_with(|page| {
        // SAFETY: the page is this CPU's registered GHCB and in no call (the
        // slot lends it only then); the instruction's effect is what the
        // guest's own code asked for. XCR0 is 1: CR4.OSXSAVE stays clear.
        unsafe { handle_vc(&hv, page, frame.error, frame, code, 1) }
    });
    match through_ghcb {
        Some(Ok(_)) => {}
        Some(Err(why)) => {
            println!("#VC: exit code {:#x}, RIP {:#x}: {why}", frame.error, frame.rip);
            fail("#VC the handler refused");
        }
        None if frame.error == EXIT_CPUID && code.starts_with(&[0x0F, 0xA2]) && frame.rcx as u32 == 0 => {
            // SAFETY: CPUID requests change no memory.
            match unsafe { snp_ghcb::protocol::cpuid(&hv, frame.rax as u32) } {
                Ok([eax, ebx, ecx, edx]) => {
                    for (reg, value) in [(Gpr::Rax, eax), (Gpr::Rbx, ebx), (Gpr::Rcx, ecx), (Gpr::Rdx, edx)] {
                        frame.set_gpr(reg, value as u64);
                    }
                    frame.rip += 2;
                }
                Err(_) => cannot_carry("#VC: the GHCB MSR protocol refused CPUID"),
            }
        }
        None => cannot_carry("#VC with no GHCB to carry it"),
    }
}

/// A #VC the handler cannot carry out: no GHCB yet, or this CPU's is in use
/// by the code the #VC interrupted.
fn cannot_carry(why: &str) -> ! {
    // Under TCG port I/O raises no #VC, so the console can still report.
    #[cfg(feature = "emulator")]
    crate::fail(why);
    // Printing would need a GHCB too; the termination request needs none.
    #[cfg(not(feature = "emulator"))]
    {
        let _ = why;
        terminate(io::FAIL)
    }
}

/// A stop with nowhere to report it: a TD waits for the host to notice.
#[cfg(not(feature = "emulator"))]
pub fn hang() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The termination request's reason code set for this guest: one neither
/// Linux (1) nor the SVSM (3) uses, so this guest's verdict is never
/// confused with a generic failure (set 0, reason 0), which Linux's early
/// #VC handler and firmware send on their own errors.
#[cfg(not(feature = "emulator"))]
pub const REASON_SET: u8 = 0xC;

/// Ends an SNP guest through the GHCB MSR protocol's termination request:
/// reason set [`REASON_SET`], the verdict as the reason ([`io::PASS`],
/// 0x10, or [`io::FAIL`], 0x11).
#[cfg(not(feature = "emulator"))]
pub fn terminate(verdict: u32) -> ! {
    // SAFETY: the request changes no memory.
    unsafe { snp_ghcb::protocol::terminate(&ghcb_msr(), REASON_SET, verdict as u8) };
    hang()
}
