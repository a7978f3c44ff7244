//! The real path's exits, run in the emulated mode against the models:
//! the #VE and #VC handlers entered through gates, as the CPU would enter
//! them, for CPUID and port I/O; and the console carried by TDVMCALL and
//! by the GHCB's IOIO event, with the model's COM1 forwarded to the real
//! one. A console write the host never carried out is a line (or a
//! verdict) that never reaches the serial port, so a broken route fails
//! the run.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use coco_convert::exception::vc::{EXIT_CPUID, EXIT_IOIO};
use hvmock::emulation::{COM1, DEBUG_EXIT};
use hvmock::{MockSnp, MockTdx};
use tdcall::VeInfo;

use crate::emulate::{snp_model, tdx_model};
use crate::io::{self, Route};
use crate::scenarios::check;
use crate::trap::Frame;
use crate::{exits, println};

/// COM1's scratch register: QEMU's UART and the models' both keep what is
/// written there and read it back, so an access the handler failed to
/// take from the CPU reaches the real device and reads back its value.
const SCRATCH: u16 = COM1 + 7;
/// A hypervisor leaf (one the #VE handler sends to the VMM), answered by
/// the models with a value no CPU gives.
const HV_LEAF: u32 = 0x4000_0000;
const HV_ANSWER: [u32; 4] = [0x4000_0001, 0x6F63_6F63, 0x7473_6574, 0x6B73_6167];

/// The software interrupt that enters the #VC handler: `int` pushes no
/// error code, so the exit code the CPU would push comes from
/// [`INJECTED_EXIT_CODE`].
pub const INJECTED_VC: u64 = 241;
static INJECTED_EXIT_CODE: AtomicU64 = AtomicU64::new(0);
const VE: u8 = 20;
const VC: u8 = INJECTED_VC as u8;

/// Vector 241: the #VC handler, with the exit code armed for it.
pub fn on_injected_vc(frame: &mut Frame) {
    frame.error = INJECTED_EXIT_CODE.swap(0, Ordering::AcqRel);
    exits::on_vc(frame);
}

#[derive(Clone, Copy)]
enum Exit {
    Cpuid,
    PortOut,
    PortIn,
}

/// CPUID of `leaf`, subleaf 0, right after the exception vector `V`: the
/// handler must complete the CPUID and step over it.
fn cpuid_after<const V: u8>(leaf: u32) -> [u32; 4] {
    let (eax, ecx, edx);
    let mut rbx: u64 = 0;
    // SAFETY: the gate's handler emulates the CPUID (or the CPU runs it);
    // RBX, which the compiler keeps for itself, is swapped out and back.
    unsafe {
        core::arch::asm!(
            "xchg {rbx}, rbx", "int {v}", "cpuid", "xchg {rbx}, rbx",
            v = const V, rbx = inout(reg) rbx,
            inout("eax") leaf => eax, inout("ecx") 0u32 => ecx, out("edx") edx,
        )
    };
    [eax, rbx as u32, ecx, edx]
}

/// `out dx, al` right after the exception vector `V`.
fn out_after<const V: u8>(port: u16, value: u8) {
    // SAFETY: a write to COM1's scratch register, by the handler or the CPU.
    unsafe { core::arch::asm!("int {v}", "out dx, al", v = const V, in("dx") port, in("al") value) };
}

/// `in al, dx` right after the exception vector `V`, with RAX `rax`
/// before: RAX after.
fn in_after<const V: u8>(port: u16, rax: u64) -> u64 {
    let out;
    // SAFETY: a read of COM1's scratch register, by the handler or the CPU.
    unsafe { core::arch::asm!("int {v}", "in al, dx", v = const V, in("dx") port, inout("rax") rax => out) };
    out
}

/// `in al, dx` on the CPU: the real UART's register.
fn in_instruction(port: u16) -> u8 {
    let value: u8;
    // SAFETY: a read of COM1's scratch register.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// CPUID, a port write and a port read through the gate of vector `V`,
/// each exception armed by `arm` first. Each instruction's result must be
/// the model's and not the CPU's: the models answer CPUID `HV_LEAF` with
/// a value no CPU gives, the real scratch register must keep what it
/// held across the write, and holds another value than the model's at
/// the read.
fn cpuid_and_port_io<const V: u8>(what: &str, arm: &dyn Fn(Exit)) {
    arm(Exit::Cpuid);
    check(
        cpuid_after::<V>(HV_LEAF) == HV_ANSWER,
        "exits: CPUID was not answered by the host",
    );
    io::out_instruction(SCRATCH, 0x3C, 1);
    arm(Exit::PortOut);
    out_after::<V>(SCRATCH, 0xA5);
    check(
        in_instruction(SCRATCH) == 0x3C,
        "exits: the OUT the host carried out ran on the CPU too (RIP not stepped over it)",
    );
    arm(Exit::PortIn);
    check(
        in_after::<V>(SCRATCH, 0x1122_3344_5566_7700) == 0x1122_3344_5566_77A5,
        "exits: the port write and read did not go through the host (or IN AL changed more than AL)",
    );
    println!("  exits: {what}: CPUID, OUT and IN completed by the host, RIP stepped over each");
}

/// The TD's #VE gate: TDG.VP.VEINFO.GET reports what the TDX module
/// would, the handler carries the instruction out through the VMM.
pub fn ve_gate(model: &MockTdx) {
    model.set_cpuid(HV_LEAF, 0, HV_ANSWER);
    let io = |direction_in: u64| (SCRATCH as u64) << 16 | direction_in << 3;
    cpuid_and_port_io::<VE>("#VE (TDVMCALL)", &|exit| {
        // Exit reason, qualification (Intel SDM vol. 3C, table 28-5:
        // size - 1 in [2:0], IN in bit 3, the port in [31:16]), GLA, GPA,
        // instruction length.
        model.inject_ve(match exit {
            Exit::Cpuid => [VeInfo::EXIT_REASON_CPUID as u64, 0, 0, 0, 2],
            Exit::PortOut => [VeInfo::EXIT_REASON_IO_INSTRUCTION as u64, io(0), 0, 0, 1],
            Exit::PortIn => [VeInfo::EXIT_REASON_IO_INSTRUCTION as u64, io(1), 0, 0, 1],
        })
    });
}

fn arm_vc(exit: Exit) {
    let code = match exit {
        Exit::Cpuid => EXIT_CPUID,
        Exit::PortOut | Exit::PortIn => EXIT_IOIO,
    };
    INJECTED_EXIT_CODE.store(code, Ordering::Release);
}

/// SNP's #VC before this CPU has a GHCB: CPUID alone, through the GHCB
/// MSR protocol.
pub fn vc_before_ghcb(model: &MockSnp) {
    model.set_cpuid(HV_LEAF, 0, HV_ANSWER);
    arm_vc(Exit::Cpuid);
    check(
        cpuid_after::<VC>(HV_LEAF) == HV_ANSWER,
        "exits: CPUID before a GHCB was not answered through the MSR protocol",
    );
    println!("  exits: #VC before a GHCB: CPUID completed through the GHCB MSR protocol");
}

/// SNP's #VC with this CPU's GHCB.
pub fn vc_with_ghcb() {
    cpuid_and_port_io::<VC>("#VC (GHCB)", &arm_vc);
}

/// How much of the model's console has reached the real one.
static FORWARDED: AtomicUsize = AtomicUsize::new(0);
/// Bytes the guest sent to COM1 by the host's route.
static SENT: AtomicUsize = AtomicUsize::new(0);

fn forward(read_console: &dyn Fn(usize, &mut [u8]) -> usize, port: u16, debug_exit: Option<u32>) {
    let mut bytes = [0; 64];
    loop {
        let at = FORWARDED.load(Ordering::Relaxed);
        let n = read_console(at, &mut bytes);
        if n == 0 {
            break;
        }
        for &b in &bytes[..n] {
            io::out_instruction(COM1, b as u32, 1);
        }
        FORWARDED.store(at + n, Ordering::Relaxed);
    }
    if port == DEBUG_EXIT {
        if let Some(verdict) = debug_exit {
            io::out_instruction(DEBUG_EXIT, verdict, 4);
        }
    }
}

fn console_through_tdx(port: u16, value: u32, width: u8) {
    exits::td_port_out(port, value, width);
    SENT.fetch_add((port == COM1) as usize, Ordering::Relaxed);
    let Some(model) = tdx_model() else { return };
    forward(&|at, into| model.read_console(at, into), port, model.debug_exit());
}

fn console_through_snp(port: u16, value: u32, width: u8) {
    if !exits::snp_port_out_carried(port, value, width) {
        // No GHCB (scenario 8 took it private): the emulated mode still
        // has the instruction.
        io::out_instruction(port, value, width);
        return;
    }
    SENT.fetch_add((port == COM1) as usize, Ordering::Relaxed);
    let Some(model) = snp_model() else { return };
    forward(&|at, into| model.read_console(at, into), port, model.debug_exit());
}

/// The console and the verdict through TDVMCALL\<Instruction.IO\>, for as
/// long as this TDX model runs.
pub fn route_console_through_tdx() {
    FORWARDED.store(0, Ordering::Relaxed);
    SENT.store(0, Ordering::Relaxed);
    io::set_route(Route::Host(console_through_tdx));
}

/// The console and the verdict through the GHCB's IOIO event while this
/// CPU has a GHCB.
pub fn route_console_through_snp() {
    FORWARDED.store(0, Ordering::Relaxed);
    SENT.store(0, Ordering::Relaxed);
    io::set_route(Route::Host(console_through_snp));
}

/// Fails the run unless the console went through the host, and every
/// byte sent that way reached the model's COM1 (and from there the real
/// one).
pub fn check_console_went_through_the_host(route: &str) {
    let (sent, forwarded) = (SENT.load(Ordering::Relaxed), FORWARDED.load(Ordering::Relaxed));
    if sent == 0 || sent != forwarded {
        println!("{route}: {sent} bytes sent to COM1, {forwarded} reached the model's");
        crate::fail("the console did not go through the host");
    }
}
