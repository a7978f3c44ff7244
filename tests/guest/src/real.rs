//! The real path: in a TD or an SNP guest, the crates' instructions run as
//! they are, with no emulator and no model in the image. The same
//! scenarios run as in the emulated mode; what only a model can do (tell
//! the host to lie, hand memory over unaccepted on demand, see every
//! mapping at every hypercall) is reported as skipped, and the checks ask
//! the platform instead: the guest's own page walk, and a second ACCEPT
//! or PVALIDATE that must find the page already accepted or validated.
//!
//! Never run on hardware: this machine has neither platform. Under plain
//! OVMF the image finds neither and says so.

use core::sync::atomic::{AtomicU64, Ordering};

use coco_convert::platform::detect::{snp_c_bit, Detected};
use coco_convert::platform::snp::{PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::{CounterSnapshot, EncryptionBit, Platform};
use snp_ghcb::{GhcbMsrInstruction, PvalidateInstruction};
use tdcall::TdcallInstruction;

use crate::exits::{self, snp_port_out, td_port_out};
use crate::io::{self, Route};
use crate::scenarios::{self, GuestEngine};
use crate::{boot, fail, lifecycle, memory, platform, println, probes, GHCB_SLOTS, WINDOWS_SNP, WINDOWS_TDX};

pub fn run(found: Detected, firmware: boot::Firmware, depth: u32, image: (u64, u64)) -> ! {
    match found {
        Detected::Tdx => tdx(firmware, depth, image),
        Detected::Snp { .. } => snp(firmware, depth, image),
        Detected::Neither => {
            if exits::VC_SEEN.load(core::sync::atomic::Ordering::Acquire) {
                // CPUID raised #VC, so this is an SEV-ES or SNP guest whose
                // hypervisor hid SEV from its answers.
                exits::terminate(io::FAIL);
            }
            io::set_route(Route::Instruction);
            println!("guest: neither TDX nor SEV-SNP: this image runs only in a TD or an SNP guest (the emulated scenarios are in the other image)");
            io::exit(io::NOT_CONFIDENTIAL)
        }
    }
}

fn td_stop(_code: u32) -> ! {
    exits::hang()
}

/// On SNP the last scenario takes the GHCB, the only way to the console,
/// private with everything else: the verdict ends the guest through the
/// GHCB MSR protocol's termination request, with this guest's own reason
/// code set.
fn snp_stop(code: u32) -> ! {
    exits::terminate(code)
}

/// Memory the firmware handed over unaccepted goes to the engine; what of
/// it the scenarios use is accepted before they start.
fn take_over_memory<P: Platform>(e: &mut GuestEngine<P>) {
    e.adopt_unaccepted(lifecycle::bitmap())
        .unwrap_or_else(|_| fail("unaccepted-memory bitmap"));
    boot::record_unaccepted(e);
    let (start, end) = scenarios::SPAN;
    match e.accept(start, end - start) {
        Ok(report) => println!("  accepted before the scenarios: {} units", report.units),
        Err(why) => {
            println!("  {why:?}");
            fail("accepting the scenarios' memory");
        }
    }
}

fn run_scenarios<P: Platform>(
    e: &GuestEngine<P>,
    tables: &mut memory::Tables,
    name: &str,
    expected_layout: [u64; 3],
    before_boot: &dyn Fn() -> CounterSnapshot,
    usable: &dyn Fn(u64) -> bool,
    after: &dyn Fn(),
) -> ! {
    scenarios::run_all(
        e,
        tables,
        &scenarios::Hooks {
            name,
            clean: None,
            lie: None,
            expected_layout,
            before_boot,
        },
    );
    println!("  7 unaccepted memory: SKIPPED (needs memory handed over unaccepted on demand; the firmware's own went through the engine at boot)");
    if name == "SNP" {
        println!("  8 unshare all: next; it takes the GHCB private too, so nothing more is printed: the guest asks the hypervisor to end it if scenario 8 passes, and hangs if not");
    }
    lifecycle::unshare_all(e, tables, usable, after);
    println!("guest: all scenarios passed ({name}, real platform; 5, 6 and 7 skipped)");
    io::exit(io::PASS)
}

fn tdx(firmware: boot::Firmware, depth: u32, image: (u64, u64)) -> ! {
    io::set_stop(td_stop);
    io::set_route(Route::Host(td_port_out));
    crate::check_memory_is_free(true);
    crate::booted(firmware, depth, image, "TDX, real");
    // SAFETY: detection found a TD; CPL 0.
    let tdcall = unsafe { TdcallInstruction::new() };
    let info = tdcall::vp_info(&tdcall).unwrap_or_else(|_| fail("TDG.VP.INFO"));
    let mask = exits::td_shared_mask();
    let enc = EncryptionBit::tdx(mask).unwrap_or_else(|| fail("TDG.VP.INFO: no usable shared bit"));
    println!("  TDG.VP.INFO: GPAW {}, GPA shared bit {:#x}", info.gpaw, mask);
    let mut tables = memory::build(enc);
    // SAFETY: as above.
    let platform = Tdx::new(unsafe { TdcallInstruction::new() }, mask).unwrap_or_else(|_| fail("shared bit"));
    let mut e = crate::engine(&tables, platform, &WINDOWS_TDX);
    take_over_memory(&mut e);
    run_scenarios(
        &e,
        &mut tables,
        "TDX",
        [2, 0, 0],
        &|| e.counters(),
        &probes::td_accepted,
        &|| {},
    )
}

/// A value the host cannot predict, written through the firmware's
/// tables (which map memory private with the real C-bit) and read back
/// through tables built with the C-bit the host reported.
static C_BIT_WITNESS: AtomicU64 = AtomicU64::new(0);

fn rdrand() -> Option<u64> {
    (0..16).find_map(|_| {
        let (value, ok): (u64, u8);
        // SAFETY: RDRAND only writes its registers and CF.
        unsafe {
            core::arch::asm!("rdrand {0}", "setc {1}", out(reg) value, out(reg_byte) ok, options(nomem, nostack))
        };
        (ok == 1).then_some(value)
    })
}

/// Builds the tables with `enc` and switches to them, then checks the
/// C-bit the way Linux's `sev_verify_cbit` does: in an SNP guest CPUID
/// goes to the hypervisor too, so the two answers `snp_c_bit` compared
/// are both the host's. With a wrong bit the new tables map the witness
/// shared (the host's view of its ciphertext) or somewhere else, and it
/// reads back different; the guest stops. (Under TCG there is no
/// encryption, so this check passes whatever the bit: never run where it
/// could fail.)
fn build_checking_the_c_bit(enc: EncryptionBit) -> memory::Tables {
    let witness = rdrand().unwrap_or_else(|| exits::terminate(io::FAIL));
    C_BIT_WITNESS.store(witness, Ordering::SeqCst);
    let tables = memory::build(enc);
    if C_BIT_WITNESS.load(Ordering::SeqCst) != witness {
        // The stack may now be the host's to write: asking to terminate
        // returns through it if the host ignores the request. Stop here,
        // as Linux does, so no forward progress is left to steer.
        exits::hang();
    }
    tables
}

fn snp(firmware: boot::Firmware, depth: u32, image: (u64, u64)) -> ! {
    // Until a GHCB exists nothing can be printed: the output waits, and a
    // failure ends in the termination request.
    io::set_stop(snp_stop);
    // SAFETY: detection found an SNP guest; CPL 0.
    let hv = unsafe { GhcbMsrInstruction::new() };
    // SAFETY: the request changes no memory.
    let info = unsafe { snp_ghcb::protocol::negotiate(&hv) }.unwrap_or_else(|_| exits::terminate(io::FAIL));
    let c_bit = snp_c_bit(&platform::probe(), info.c_bit).unwrap_or_else(|_| exits::terminate(io::FAIL));
    let enc = EncryptionBit::snp(c_bit).unwrap_or_else(|| exits::terminate(io::FAIL));
    crate::check_memory_is_free(true);
    let mut tables = build_checking_the_c_bit(enc);
    let platform = Snp::new(
        hv,
        // SAFETY: an SNP guest at CPL 0.
        unsafe { PvalidateInstruction::new() },
        PerCpuGhcbs::new(&GHCB_SLOTS, crate::smp::cpu),
        c_bit,
    )
    .unwrap_or_else(|_| exits::terminate(io::FAIL));
    let mut e = crate::engine(&tables, platform, &WINDOWS_SNP);
    take_over_memory(&mut e);
    let setup_ghcb = || {
        let before = e.counters();
        if !crate::setup_ghcb(&e) {
            exits::terminate(io::FAIL);
        }
        io::set_route(Route::Host(snp_port_out));
        crate::booted(firmware, depth, image, "SEV-SNP, real");
        println!(
            "  SEV info: protocol {}..{}, C-bit {} (CPUID Fn8000_001F agrees, and a value written private before the switch to tables built with it reads back the same)",
            info.min_version, info.max_version, c_bit
        );
        before
    };
    run_scenarios(
        &e,
        &mut tables,
        "SNP",
        [1, 511, 512],
        &setup_ghcb,
        &probes::snp_validated,
        &|| {
            scenarios::check(
                GHCB_SLOTS.iter().all(|slot| !slot.is_filled()),
                "unshare: a GHCB slot still filled",
            )
        },
    )
}
