//! A conversion handshake against the hypercall models, printing every
//! exchange: what a TDX and an SEV-SNP guest say to the firmware and the
//! host to share a buffer and take it back, and what happens when the host
//! lies.
//!
//! Run: `cargo run -p integration --example handshake`

use hvmock::{SnpConfig, SnpHostile, TdxConfig, TdxEvent, TdxHostile};
use integration::{boot_ghcb, snp, tdx, va, MIB};
use snp_ghcb::msr_protocol::PscOp;
use snp_ghcb::psc::change_page_state;
use snp_ghcb::pvalidate::pvalidate_range;
use tdcall::{accept_range, map_gpa, vp_info, Visibility};

fn main() {
    tdx_demo();
    snp_demo();
}

fn print_tdx_events(events: &[TdxEvent]) {
    for e in events {
        match *e {
            TdxEvent::MapGpa {
                gpa,
                size,
                status,
                resume,
            } => {
                println!("    VMCALL<MapGPA> R12={gpa:#014x} R13={size:#x} -> R10={status:#x} R11={resume:#x}")
            }
            TdxEvent::Accept { gpa, level, status } => {
                println!(
                    "    TDCALL ACCEPT  RCX={:#x} ({}) -> RAX={status:#x}",
                    gpa | level as u64,
                    ["4K", "2M", "1G"][level as usize]
                )
            }
            other => println!("    {other:?}"),
        }
    }
}

fn tdx_demo() {
    println!("== TDX: share 2 MiB + 8 KiB, then take it back ==");
    // A VMM that converts at most 512 pages per MapGPA and answers RETRY.
    let td = tdx(
        8 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(512),
            ..TdxConfig::default()
        },
    );
    let info = vp_info(&td).expect("TDG.VP.INFO");
    println!(
        "  TDG.VP.INFO: GPAW {} -> shared bit {:#x}, attributes {:?}",
        info.gpaw,
        info.shared_mask(),
        info.attributes
    );
    let (start, len) = (2 * MIB, 2 * MIB + 2 * 4096);
    td.clear_events();
    // SAFETY: the model's memory is not used by Rust code.
    let calls = unsafe { map_gpa(&td, start, len, Visibility::Shared, info.shared_mask()) }.expect("to shared");
    println!("  to shared: {} MapGPA calls", calls.calls);
    print_tdx_events(&td.events());
    td.clear_events();
    // SAFETY: as above.
    let accepted = unsafe {
        map_gpa(&td, start, len, Visibility::Private, info.shared_mask()).expect("to private");
        accept_range(&td, start, len).expect("accept")
    };
    println!(
        "  to private: MapGPA, then ACCEPT by size [4K, 2M, 1G] = {:?}",
        accepted.accepted
    );
    print_tdx_events(&td.events());

    println!("  a lying VMM: RETRY with the resume GPA stripped of the shared bit");
    td.set_hostile(Some(TdxHostile::ResumeWithoutSharedBit));
    // SAFETY: as above.
    let err = unsafe { map_gpa(&td, start, len, Visibility::Shared, info.shared_mask()) }.unwrap_err();
    println!("    -> {err:?}");
    println!("  a lying VMM: RETRY without progress, forever");
    td.set_hostile(Some(TdxHostile::NoProgressForever));
    // SAFETY: as above.
    let err = unsafe { map_gpa(&td, start, len, Visibility::Shared, info.shared_mask()) }.unwrap_err();
    println!("    -> {err:?}");
    println!("  a lying VMM: 'success' without converting, then ACCEPT");
    td.set_hostile(Some(TdxHostile::SuccessWithoutConverting));
    // SAFETY: as above.
    let err = unsafe {
        map_gpa(&td, 6 * MIB, 4096, Visibility::Shared, info.shared_mask()).expect("claimed");
        map_gpa(&td, 6 * MIB, 4096, Visibility::Private, info.shared_mask()).expect("claimed");
        accept_range(&td, 6 * MIB, 4096).unwrap_err()
    };
    println!("    -> {err:?} (stale contents never pass as fresh)");
}

fn snp_demo() {
    println!();
    println!("== SEV-SNP: GHCB at boot, share 4 MiB + 4 KiB, take it back ==");
    // A hypervisor that does at most 600 pages per PSC exit.
    let hv = snp(
        16 * MIB,
        SnpConfig {
            psc_pages_per_exit: Some(600),
            ..SnpConfig::default()
        },
    );
    let mut ghcb = boot_ghcb(&hv);
    // SAFETY: the model's memory is not used by Rust code.
    let features = unsafe { snp_ghcb::protocol::hv_features(&hv) }.expect("features");
    println!(
        "  MSR protocol: version 2 agreed, GHCB {:#x} made shared (1 PSC request) and registered, features {features:?}",
        ghcb.gpa()
    );
    let (start, len) = (2 * MIB, 4 * MIB + 4096);
    // SAFETY: as above.
    let (rescind, to_shared) = unsafe {
        let r = pvalidate_range(&hv, va(&hv, start), len, false, true).expect("rescind");
        (
            r,
            change_page_state(&mut ghcb, &hv, start, len, PscOp::Shared, true).expect("PSC shared"),
        )
    };
    println!(
        "  to shared: PVALIDATE rescind {} calls (2M: {}, 4K: {}), PSC {} entries in {} exits",
        rescind.calls, rescind.pages_2m, rescind.pages_4k, to_shared.entries, to_shared.exits
    );
    // SAFETY: as above.
    let (to_private, validate) = unsafe {
        let p = change_page_state(&mut ghcb, &hv, start, len, PscOp::Private, true).expect("PSC private");
        (
            p,
            pvalidate_range(&hv, va(&hv, start), len, true, true).expect("validate"),
        )
    };
    println!(
        "  to private: PSC {} entries in {} exits, PVALIDATE {} calls (2M: {}, 4K: {})",
        to_private.entries, to_private.exits, validate.calls, validate.pages_2m, validate.pages_4k
    );
    println!("  hypervisor counters: {:?}", hv.stats());

    for lie in [
        SnpHostile::PscCurEntryBackwards,
        SnpHostile::PscRewriteDescriptor,
        SnpHostile::PscStall,
    ] {
        hv.set_hostile(Some(lie));
        // SAFETY: as above.
        let err =
            unsafe { change_page_state(&mut ghcb, &hv, 8 * MIB + 4096, 700 * 4096, PscOp::Shared, false) }.unwrap_err();
        println!("  a lying hypervisor ({lie:?}) -> {err:?}");
    }
}
