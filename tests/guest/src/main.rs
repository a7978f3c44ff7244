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
mod emulate;
mod heap;
mod io;
mod lifecycle;
mod memory;
mod platform;
mod race;
mod rt;
mod scenarios;
mod smp;
mod trap;

use core::sync::atomic::{AtomicU64, Ordering};

use coco_convert::platform::snp::{GhcbSlot, PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::{Config, DirectMap, EncryptionBit, Engine, PerCpuWindows, StateTable, Visibility};
use snp_ghcb::{GhcbMsrInstruction, PvalidateInstruction};
use tdcall::TdcallInstruction;

use memory::{direct_map, Identity, Shootdown, FRAMES, HOST_VIEW, RAM};

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
    boot::check_free(memory::TABLE_FRAMES.0, memory::TABLE_FRAMES.1, "page-table frames");
    boot::check_free(scenarios::SPAN.0, scenarios::SPAN.1, "the memory the scenarios convert");
    smp::set_trampoline_page(boot.trampoline);
    coco_convert::zeropad::init();
    emulate::host_memory();
    if platform::detect_platform() != coco_convert::platform::detect::Detected::Neither {
        // What a real TD or SNP guest needs (I/O through the host, #VE and
        // #VC handlers, the real encryption bit, no emulators) is not in
        // this build: stop before anything pretends otherwise.
        fail("a real TDX or SEV-SNP platform: this build runs the emulated scenarios only");
    }
    let la57 = boot.la57_requested;
    if la57 && !boot::cpu_has_la57() {
        fail("5-level paging asked for (la57), but the CPU lacks LA57: CPUID.(EAX=7,ECX=0):ECX[16] is clear");
    }
    scenarios::check(
        boot::la57() == la57,
        "the paging depth is not the one the command line asked for",
    );
    println!(
        "guest: booted by {}, long mode ({}-level paging), IDT/TSS, heap, zeropad decoder ready; kernel at [{:#x}, {:#x})",
        boot.firmware.name(),
        if la57 { 5 } else { 4 },
        image_start,
        image_end
    );

    if la57 {
        tdx(52);
    } else {
        tdx(48);
        snp();
    }
    println!(
        "guest: all scenarios passed ({} instructions emulated)",
        emulate::EMULATED.load(Ordering::Relaxed)
    );
    io::exit(io::PASS)
}

/// The emulators' verdict: no hypercall saw a present alias of its frames.
fn aliases_absent(violations: &[hvmock::pagewalk::Violation]) {
    if let Some(v) = violations.first() {
        println!(
            "{} hypercall(s) saw a present alias; first: {} of {:#x} while {:#x} mapped it",
            violations.len(),
            v.call,
            v.pa,
            v.mapping.va
        );
        fail("the emulators found a present alias of a converting frame");
    }
}

fn config(t: &memory::Tables) -> Config {
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

fn attach(tables: &memory::Tables, attach: &dyn Fn(hvmock::GuestPageTables)) {
    attach(tables.page_tables());
}

fn tdx(gpaw: u8) {
    println!(
        "== TDX (emulated TDX module + VMM; PTE shared bit: 52, a bit the MMU ignores; {}-level paging, direct map at {:#x})",
        if boot::la57() { 5 } else { 4 },
        direct_map()
    );
    for s in &scenarios::STATES {
        s.store(0, Ordering::Relaxed);
    }
    let model = emulate::install_tdx(hvmock::TdxConfig {
        gpaw,
        ..hvmock::TdxConfig::default()
    });
    // SAFETY: TDCALL traps to the emulator.
    let info = tdcall::vp_info(&unsafe { TdcallInstruction::new() }).unwrap_or_else(|_| fail("TDG.VP.INFO"));
    let enc = EncryptionBit::new(1 << 52, Visibility::Shared).unwrap_or_else(|| fail("bit"));
    let mut tables = memory::build(enc);
    smp::start_ap(tables.root, ap_main);
    model.set_alias_check_ignore(HOST_VIEW, RAM);
    attach(&tables, &|t| model.attach_page_tables(t));
    // SAFETY: as above.
    let platform = Tdx::new(unsafe { TdcallInstruction::new() }, info.shared_mask())
        .unwrap_or_else(|_| fail("mask"))
        .with_pte_bit(enc);
    let mut e = Engine::new(
        config(&tables),
        Identity,
        &FRAMES,
        Shootdown,
        platform,
        StateTable::new(0, &scenarios::STATES),
    )
    .with_window(WINDOWS_TDX.init(&tables));
    e.adopt_unaccepted(lifecycle::bitmap())
        .unwrap_or_else(|_| fail("unaccepted-memory bitmap"));
    boot::record_unaccepted(&e);
    println!(
        "  TDG.VP.INFO: GPAW {}, GPA shared bit {:#x}",
        info.gpaw,
        info.shared_mask()
    );
    scenarios::run_all(
        &e,
        &mut tables,
        &scenarios::Hooks {
            name: "TDX",
            clean: &|| aliases_absent(&model.violations()),
            lie: &|on| model.set_hostile(on.then_some(hvmock::TdxHostile::NoProgressForever)),
            // Built as one 1 GiB leaf and 512 2 MiB leaves; the 2 MiB half,
            // all private and contiguous again, collapses into 1 GiB too.
            expected_layout: [2, 0, 0],
            before_boot: &|| e.counters(),
        },
    );
    let page = |pa: u64| model.page(pa).state;
    let lifecycle = lifecycle::Model {
        hand_over_unaccepted: &|pa, len| {
            let page = hvmock::TdxPage {
                state: hvmock::TdxPageState::Pending,
                level: 1,
            };
            model.set_pages(pa, len, page)
        },
        usable: &|pa| page(pa) == hvmock::TdxPageState::Accepted,
        unaccepted: &|pa| page(pa) == hvmock::TdxPageState::Pending,
        lie_accepted: &|pa, len| {
            let page = hvmock::TdxPage {
                state: hvmock::TdxPageState::Accepted,
                level: 0,
            };
            model.set_pages(pa, len, page)
        },
        honest: &|| {},
    };
    lifecycle::unaccepted(&e, &lifecycle);
    aliases_absent(&model.violations());
    lifecycle::unshare_all(&e, &mut tables, &lifecycle, &|| {});
    aliases_absent(&model.violations());
}

static GHCB_SLOTS: [GhcbSlot; smp::CPUS] = [const { GhcbSlot::new() }; smp::CPUS];

fn snp() {
    println!("== SEV-SNP (emulated hypervisor + RMP; PTE C-bit: 53, a bit the MMU ignores)");
    for s in &scenarios::STATES {
        s.store(0, Ordering::Relaxed);
    }
    let model = emulate::install_snp(hvmock::SnpConfig::default());
    // SAFETY: the GHCB MSR and VMGEXIT trap to the emulator.
    let hv = unsafe { GhcbMsrInstruction::new() };
    // SAFETY: as above.
    let info = unsafe { snp_ghcb::protocol::negotiate(&hv) }.unwrap_or_else(|e| {
        println!("SEV info: {e:?}");
        fail("SEV info")
    });
    let enc = EncryptionBit::new(1 << 53, Visibility::Private).unwrap_or_else(|| fail("bit"));
    let mut tables = memory::build(enc);
    race::switch_ap(tables.root);
    model.set_alias_check_ignore(HOST_VIEW, RAM);
    attach(&tables, &|t| model.attach_page_tables(t));
    // SAFETY: PVALIDATE traps to the emulator.
    let platform = Snp::new(
        hv,
        unsafe { PvalidateInstruction::new() },
        PerCpuGhcbs::new(&GHCB_SLOTS, smp::cpu),
        info.c_bit,
    )
    .unwrap_or_else(|_| fail("c-bit"))
    .with_pte_bit(enc);
    let mut e = Engine::new(
        config(&tables),
        Identity,
        &FRAMES,
        Shootdown,
        platform,
        StateTable::new(0, &scenarios::STATES),
    )
    .with_window(WINDOWS_SNP.init(&tables));
    e.adopt_unaccepted(lifecycle::bitmap())
        .unwrap_or_else(|_| fail("unaccepted-memory bitmap"));
    boot::record_unaccepted(&e);
    println!(
        "  SEV info: protocol {}..{}, C-bit {}",
        info.min_version, info.max_version, info.c_bit
    );
    let setup_ghcb = || {
        let before = e.counters();
        let ghcb_pa = 1536 << 20;
        let ptr =
            core::ptr::NonNull::new((direct_map() + ghcb_pa) as *mut snp_ghcb::Ghcb).unwrap_or_else(|| fail("ptr"));
        // SAFETY: the page is the GHCB's alone, mapped by the direct map.
        unsafe { coco_convert::setup_ghcb(&e, ghcb_pa, ptr) }.unwrap_or_else(|_| fail("GHCB setup"));
        scenarios::check(
            e.counters().since(&before).psc_msr == 1,
            "GHCB: not through the MSR protocol",
        );
        before
    };
    scenarios::run_all(
        &e,
        &mut tables,
        &scenarios::Hooks {
            name: "SNP",
            clean: &|| aliases_absent(&model.violations()),
            lie: &|on| model.set_hostile(on.then_some(hvmock::SnpHostile::PscStall)),
            // The GHCB stays shared: its 2 MiB region stays split.
            expected_layout: [1, 511, 512],
            before_boot: &setup_ghcb,
        },
    );
    let launch_left = hvmock::RmpEntry {
        assigned: true,
        validated: false,
        huge: false,
    };
    let lifecycle = lifecycle::Model {
        hand_over_unaccepted: &|pa, len| model.set_rmp(pa, len, launch_left),
        usable: &|pa| {
            let r = model.rmp(pa);
            r.assigned && r.validated
        },
        unaccepted: &|pa| model.rmp(pa) == launch_left,
        // Validated behind the guest's back, and the page state change that
        // would reset it only pretends.
        lie_accepted: &|pa, len| {
            let validated = hvmock::RmpEntry {
                assigned: true,
                validated: true,
                huge: false,
            };
            model.set_rmp(pa, len, validated);
            model.set_hostile(Some(hvmock::SnpHostile::PscSuccessWithoutRmpChange));
        },
        honest: &|| model.set_hostile(None),
    };
    lifecycle::unaccepted(&e, &lifecycle);
    aliases_absent(&model.violations());
    lifecycle::unshare_all(&e, &mut tables, &lifecycle, &|| {
        scenarios::check(
            GHCB_SLOTS.iter().all(|slot| !slot.is_filled()),
            "unshare: a GHCB slot still filled",
        )
    });
    aliases_absent(&model.violations());
}

/// The scratch windows of one platform's tables, kept for the engine's
/// lifetime.
struct WindowsCell(spin::Mutex<Option<&'static PerCpuWindows<'static>>>);

impl WindowsCell {
    fn init(&self, t: &memory::Tables) -> &'static PerCpuWindows<'static> {
        let slots = alloc::boxed::Box::leak(alloc::boxed::Box::new(t.windows.slots));
        // SAFETY: each CPU has its own window, whose path down to its PD
        // exists and whose PT page is zeroed; conversions do not migrate
        // between CPUs; the kernel runs at CPL 0.
        let w = alloc::boxed::Box::leak(alloc::boxed::Box::new(unsafe { PerCpuWindows::new(slots, smp::cpu) }));
        *self.0.lock() = Some(w);
        w
    }
}

static WINDOWS_TDX: WindowsCell = WindowsCell(spin::Mutex::new(None));
static WINDOWS_SNP: WindowsCell = WindowsCell(spin::Mutex::new(None));

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
    if (vector == 6 || vector == 13) && emulate::emulate(frame) {
        return;
    }
    match vector {
        smp::SHOOTDOWN_VECTOR => smp::on_shootdown(),
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
