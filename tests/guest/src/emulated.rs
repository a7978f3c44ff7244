//! The emulated mode: TDX and SNP modelled inside the guest ([`crate::emulate`]
//! catches their instructions), with the models' own checks around the
//! scenarios: no hypercall while an alias of its frames was present, every
//! frame's state as the platform holds it, and hosts told to lie.

use core::sync::atomic::Ordering;

use coco_convert::platform::detect::Detected;
use coco_convert::platform::snp::{PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::{EncryptionBit, Visibility};
use snp_ghcb::{GhcbMsrInstruction, PvalidateInstruction};
use tdcall::TdcallInstruction;

use crate::io::Route;
use crate::memory::{direct_map, HOST_VIEW, RAM};
use crate::{
    ap_main, boot, emulate, exit_checks, fail, io, lifecycle, memory, println, probe_checks, probes, race, scenarios,
    smp, walk, GHCB_SLOTS, WINDOWS_SNP, WINDOWS_TDX,
};

/// Runs every scenario on both emulated platforms (TDX only with 5-level
/// paging, as a TD with GPAW 52); a real platform is the other image's.
pub fn run(found: Detected, firmware: boot::Firmware, depth: u32, image: (u64, u64)) -> ! {
    if found != Detected::Neither {
        fail("a real TDX or SEV-SNP platform: this image runs the emulated scenarios; boot the real-host image");
    }
    crate::check_memory_is_free(false);
    emulate::host_memory();
    crate::booted(firmware, depth, image, "emulated mode");
    if depth == 5 {
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

/// Whether the direct map maps `pa` present and private.
fn mapped_private(tables: &memory::Tables, pa: u64) -> bool {
    walk::translate(tables, direct_map() + pa).is_some_and(|m| m.pa == pa && m.side == Visibility::Private)
}

/// A probe asks about a mapped page without converting it, so the model's
/// alias check (which watches conversions) has nothing to say and is
/// switched off around it.
fn without_alias_check(set_alias_check: &dyn Fn(bool), probe: &dyn Fn() -> bool) -> bool {
    set_alias_check(false);
    let usable = probe();
    set_alias_check(true);
    usable
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
    exit_checks::route_console_through_tdx();
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
    let mut e = crate::engine(&tables, platform, &WINDOWS_TDX);
    e.adopt_unaccepted(lifecycle::bitmap())
        .unwrap_or_else(|_| fail("unaccepted-memory bitmap"));
    boot::record_unaccepted(&e);
    println!(
        "  TDG.VP.INFO: GPAW {}, GPA shared bit {:#x}",
        info.gpaw,
        info.shared_mask()
    );
    exit_checks::ve_gate(model);
    scenarios::run_all(
        &e,
        &mut tables,
        &scenarios::Hooks {
            name: "TDX",
            clean: Some(&|| aliases_absent(&model.violations())),
            lie: Some(&|on| model.set_hostile(on.then_some(hvmock::TdxHostile::NoProgressForever))),
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
    let probe = |pa| without_alias_check(&|on| model.set_alias_check(on), &|| probes::td_accepted(pa));
    let set = |pa, len, large: bool, usable: bool| {
        let state = if usable {
            hvmock::TdxPageState::Accepted
        } else {
            hvmock::TdxPageState::Pending
        };
        model.set_pages(
            pa,
            len,
            hvmock::TdxPage {
                state,
                level: large as u8,
            },
        )
    };
    let restore = |block| {
        // SAFETY: TDCALL traps to the emulator; the block is free memory.
        let accept = || unsafe { tdcall::accept_range(&TdcallInstruction::new(), block, 2 << 20) }.is_ok();
        scenarios::check(
            without_alias_check(&|on| model.set_alias_check(on), &accept),
            "probes: accepting the block back",
        );
    };
    let probe_case = probe_checks::Probe {
        name: "TDX",
        ask: &probe,
        usable: lifecycle.usable,
        set: &set,
        leaves_the_page_usable: true,
        restore: &restore,
        host_splits_2m: None,
    };
    probe_checks::check_probe(&probe_case, &|pa| mapped_private(&tables, pa));
    let usable = |pa| (lifecycle.usable)(pa) && probe(pa);
    lifecycle::unshare_all(&e, &mut tables, &usable, &|| lifecycle::model_agrees(&e, &lifecycle));
    aliases_absent(&model.violations());
    exit_checks::check_console_went_through_the_host("TDVMCALL<Instruction.IO>");
    io::set_route(Route::Instruction);
}

fn snp() {
    println!("== SEV-SNP (emulated hypervisor + RMP; PTE C-bit: 53, a bit the MMU ignores)");
    for s in &scenarios::STATES {
        s.store(0, Ordering::Relaxed);
    }
    let model = emulate::install_snp(hvmock::SnpConfig::default());
    exit_checks::vc_before_ghcb(model);
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
    let mut e = crate::engine(&tables, platform, &WINDOWS_SNP);
    e.adopt_unaccepted(lifecycle::bitmap())
        .unwrap_or_else(|_| fail("unaccepted-memory bitmap"));
    boot::record_unaccepted(&e);
    println!(
        "  SEV info: protocol {}..{}, C-bit {}",
        info.min_version, info.max_version, info.c_bit
    );
    let setup_ghcb = || {
        let before = e.counters();
        scenarios::check(crate::setup_ghcb(&e), "GHCB setup");
        scenarios::check(
            e.counters().since(&before).psc_msr == 1,
            "GHCB: not through the MSR protocol",
        );
        exit_checks::vc_with_ghcb();
        exit_checks::route_console_through_snp();
        before
    };
    scenarios::run_all(
        &e,
        &mut tables,
        &scenarios::Hooks {
            name: "SNP",
            clean: Some(&|| aliases_absent(&model.violations())),
            lie: Some(&|on| model.set_hostile(on.then_some(hvmock::SnpHostile::PscStall))),
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
    let probe = |pa| without_alias_check(&|on| model.set_alias_check(on), &|| probes::snp_validated(pa));
    let set = |pa, len, large, usable| {
        let entry = hvmock::RmpEntry {
            assigned: true,
            validated: usable,
            huge: large,
        };
        model.set_rmp(pa, len, entry)
    };
    let restore = |block| {
        let validate = || {
            // SAFETY: PVALIDATE traps to the emulator; the block is free
            // memory the direct map maps private.
            unsafe {
                let p = PvalidateInstruction::new();
                snp_ghcb::pvalidate::pvalidate_range(&p, direct_map() + block, 2 << 20, true, false).is_ok()
            }
        };
        scenarios::check(
            without_alias_check(&|on| model.set_alias_check(on), &validate),
            "probes: validating the block back",
        );
    };
    let probe_case = probe_checks::Probe {
        name: "SNP",
        ask: &probe,
        usable: lifecycle.usable,
        set: &set,
        leaves_the_page_usable: false,
        restore: &restore,
        host_splits_2m: Some(&|on| model.set_npt_4k(on)),
    };
    probe_checks::check_probe(&probe_case, &|pa| mapped_private(&tables, pa));
    let usable = |pa| (lifecycle.usable)(pa) && probe(pa);
    lifecycle::unshare_all(&e, &mut tables, &usable, &|| {
        lifecycle::model_agrees(&e, &lifecycle);
        scenarios::check(
            GHCB_SLOTS.iter().all(|slot| !slot.is_filled()),
            "unshare: a GHCB slot still filled",
        );
        exit_checks::check_console_went_through_the_host("the GHCB's IOIO event");
    });
    aliases_absent(&model.violations());
}
