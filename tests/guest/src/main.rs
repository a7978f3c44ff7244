//! The QEMU test guest: runs the conversion engine on real x86-64 page
//! tables, with real #PF delivery and real TLB invalidation, against TDX
//! and SNP emulated inside the guest from the traps their instructions
//! raise under TCG.
//!
//! Booted with `la57` on the command line, it runs with 5-level paging
//! instead, the TDX scenarios only (as a TD with GPAW 52 would).
#![no_std]
#![no_main]

extern crate alloc;

pub mod boot;
#[cfg(feature = "emulator")]
mod emulate;
#[cfg(feature = "emulator")]
mod emulated;
#[cfg(feature = "emulator")]
mod exit_checks;
mod exits;
mod heap;
mod io;
mod lifecycle;
mod memory;
mod platform;
#[cfg(feature = "emulator")]
mod probe_checks;
mod probes;
mod race;
#[cfg(not(feature = "emulator"))]
mod real;
mod rt;
mod scenarios;
mod smp;
mod trap;
mod walk;

use core::sync::atomic::{AtomicU64, Ordering};

use coco_convert::platform::snp::{GhcbSlot, PerCpuGhcbs, Snp};
use coco_convert::{Config, DirectMap, Engine, PerCpuWindows, Platform, StateTable};
use snp_ghcb::{GhcbMsrInstruction, PvalidateInstruction};

use memory::{direct_map, RAM};

pub static ZEROPAD_FIXUPS: AtomicU64 = AtomicU64::new(0);

pub fn fail(what: &str) -> ! {
    println!("FAIL: {what}");
    io::exit(io::FAIL)
}

/// The common kernel, entered from either boot path on the boot stack,
/// with interrupts off and the guest's GDT loaded.
pub fn kernel_main(boot: boot::BootInfo) -> ! {
    trap::init(0);
    let (image_start, image_end) = boot.image;
    scenarios::check(
        image_end <= memory::TABLE_FRAMES.0 || image_start >= memory::TABLE_FRAMES.1,
        "kernel image runs into the page-table frames",
    );
    memory::set_image(boot.image);
    smp::set_trampoline_page(boot.trampoline);
    coco_convert::zeropad::init();
    let found = platform::detect_platform();
    let la57 = boot.la57_requested;
    if la57 && !boot::cpu_has_la57() {
        fail("5-level paging asked for (la57), but the CPU lacks LA57: CPUID.(EAX=7,ECX=0):ECX[16] is clear");
    }
    scenarios::check(
        boot::la57() == la57,
        "the paging depth is not the one the command line asked for",
    );
    let depth = if la57 { 5 } else { 4 };
    #[cfg(feature = "emulator")]
    emulated::run(found, boot.firmware, depth, (image_start, image_end));
    #[cfg(not(feature = "emulator"))]
    real::run(found, boot.firmware, depth, (image_start, image_end));
}

/// The firmware's map leaves the guest the memory it builds on and the
/// memory the scenarios convert (where they accept what the firmware
/// handed over unaccepted first, `unaccepted_allowed`).
pub fn check_memory_is_free(unaccepted_allowed: bool) {
    boot::check_free(
        memory::TABLE_FRAMES.0,
        memory::TABLE_FRAMES.1,
        "page-table frames",
        false,
    );
    boot::check_free(
        scenarios::SPAN.0,
        scenarios::SPAN.1,
        "the memory the scenarios convert",
        unaccepted_allowed,
    );
}

/// The boot line every run prints before its scenarios.
pub fn booted(firmware: boot::Firmware, depth: u32, (start, end): (u64, u64), mode: &str) {
    println!(
        "guest: booted by {}, long mode ({depth}-level paging), IDT/TSS, heap, zeropad decoder ready; kernel at [{start:#x}, {end:#x}); {mode}",
        firmware.name(),
    );
}

/// The engine the scenarios run, on the guest's tables, frames and state
/// table, with `windows`' scratch windows.
pub fn engine<P: Platform>(tables: &memory::Tables, platform: P, windows: &WindowsCell) -> scenarios::GuestEngine<P> {
    Engine::new(
        config(tables),
        memory::Identity,
        &memory::FRAMES,
        memory::Shootdown,
        platform,
        StateTable::new(0, &scenarios::STATES),
    )
    .with_window(windows.init(tables))
}

/// Where CPU 0's GHCB lives, on SNP (emulated or real): a page no scenario
/// converts.
const GHCB_PA: u64 = 1536 << 20;

/// CPU 0's GHCB, made shared and registered through the engine; `false`
/// if that failed (the caller decides how to stop).
pub fn setup_ghcb(e: &scenarios::GuestEngine<GuestSnp>) -> bool {
    let Some(ptr) = core::ptr::NonNull::new((direct_map() + GHCB_PA) as *mut snp_ghcb::Ghcb) else {
        return false;
    };
    // SAFETY: the page is the GHCB's alone, mapped by the direct map.
    unsafe { coco_convert::setup_ghcb(e, GHCB_PA, ptr) }.is_ok()
}

/// SEV-SNP as the guest drives it, emulated or real.
pub type GuestSnp = Snp<GhcbMsrInstruction, PvalidateInstruction, PerCpuGhcbs<'static>>;

pub fn config(t: &memory::Tables) -> Config {
    Config {
        root: t.root,
        paging: t.paging,
        direct_map: DirectMap {
            va: direct_map(),
            pa: 0,
            len: RAM,
        },
        collapse: coco_convert::Collapse::AfterEachConversion,
        collapse_1g: true,
    }
}

/// Each CPU's GHCB, on SNP (emulated or real).
pub static GHCB_SLOTS: [GhcbSlot; smp::CPUS] = [const { GhcbSlot::new() }; smp::CPUS];

/// The scratch windows of one platform's tables, kept for the engine's
/// lifetime.
pub struct WindowsCell(spin::Mutex<Option<&'static PerCpuWindows<'static>>>);

impl WindowsCell {
    pub fn init(&self, t: &memory::Tables) -> &'static PerCpuWindows<'static> {
        let slots = alloc::boxed::Box::leak(alloc::boxed::Box::new(t.windows.slots));
        // SAFETY: each CPU has its own window, whose path down to its PD
        // exists and whose PT page is zeroed; conversions do not migrate
        // between CPUs; the kernel runs at CPL 0.
        let w = alloc::boxed::Box::leak(alloc::boxed::Box::new(unsafe { PerCpuWindows::new(slots, smp::cpu) }));
        *self.0.lock() = Some(w);
        w
    }
}

pub static WINDOWS_TDX: WindowsCell = WindowsCell(spin::Mutex::new(None));
pub static WINDOWS_SNP: WindowsCell = WindowsCell(spin::Mutex::new(None));

#[cfg(feature = "emulator")]
/// CPU 1, from the trampoline: the kernel's GDT, its own TSS and IST
/// stacks, interrupts on (for shootdown IPIs), then the race loop.
extern "sysv64" fn ap_main() -> ! {
    // SAFETY: CPU 0 filled GDT_PTR at boot; the code selector is the same.
    unsafe { core::arch::asm!("lgdt [{0}]", in(reg) core::ptr::addr_of!(boot::GDT_PTR), options(nostack)) };
    trap::init(1);
    smp::ap_online();
    // SAFETY: the IDT is loaded; the shootdown IPI has a handler.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    race::ap_loop()
}

fn handle_trap(frame: &mut trap::Frame) {
    let vector = frame.vector;
    if platform::rdmsr_fault(frame) {
        return;
    }
    #[cfg(feature = "emulator")]
    if (vector == 6 || vector == 13) && emulate::emulate(frame) {
        return;
    }
    #[cfg(feature = "emulator")]
    if vector == exit_checks::INJECTED_VC {
        return exit_checks::on_injected_vc(frame);
    }
    match vector {
        smp::SHOOTDOWN_VECTOR => smp::on_shootdown(),
        20 => exits::on_ve(frame),
        29 => exits::on_vc(frame),
        14 => {
            let cr2: u64;
            // SAFETY: reading CR2 in the #PF handler.
            unsafe { core::arch::asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack)) };
            match coco_convert::zeropad::handle_fault(frame, cr2, coco_convert::zeropad::FaultKind::PageFault) {
                Ok(()) => {
                    ZEROPAD_FIXUPS.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    println!(
                        "unexpected #PF at {:#x}, RIP {:#x}, error {:#x}: {why:?}",
                        cr2, frame.rip, frame.error
                    );
                    io::exit(io::FAIL);
                }
            }
        }
        _ => {
            println!(
                "unexpected trap {} error {:#x} at {:#x}",
                frame.vector, frame.error, frame.rip
            );
            io::exit(io::FAIL);
        }
    }
}
