//! Tests from a fourteenth hostile review (platform detection, the TDX #VE
//! and SEV-SNP #VC handlers, the Instruction.* and NAE events, the UEFI
//! guest's memory map; commits 00d16a0..c01b48c). Each test fails against
//! the commit reviewed (c01b48c) and names the promise it breaks and where
//! that promise is written.

use coco_convert::platform::detect::{detect, sev_status, Detected, SEV_CPUID_LEAF, SEV_STATUS_MSR};
use integration::fake_cpu::FakeCpu;

// The UEFI guest's memory-map reader, compiled for the host (as
// firmware_map.rs does): its statics are this binary's own.
#[path = "../../guest/src/boot/firmware_map.rs"]
#[allow(dead_code)]
mod firmware_map;

use firmware_map::{all, free_bytes, record, Use};
use std::sync::Mutex;

/// The map is one static, as in the guest: tests take turns.
static MAP: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------
// Finding D1 (security): a hypervisor that answers CPUID makes an SEV-SNP
// guest believe it runs unprotected, SEV_STATUS never consulted.
//
// Promise broken: convert/src/platform/detect.rs, module docs: "Elsewhere
// the SEV_STATUS MSR decides: the hardware answers it, the hypervisor
// cannot intercept it. A host can still hide a platform (by failing the
// guest), but cannot make a confidential guest believe it runs
// unprotected without the hardware's own answer agreeing." The trait
// docs of `CpuProbe` allow CPUID from "a #VC handler", and the #VC
// handler (exception::vc, "CPUID answers are the hypervisor's word ...
// This handler asks the hypervisor for every leaf") hands CPUID to the
// host.
//
// Cause: detect.rs `detect` reads SEV_STATUS only if CPUID says so
// (`has_leaf(probe, SEV_CPUID_LEAF) && cpuid(SEV_CPUID_LEAF)[0] & 2`):
// a max extended leaf below 0x8000_001F, or EAX[1] clear, returns
// `Neither` with the MSR unread. The hardware's answer is never asked, so
// it cannot "agree".
//
// Fix: `CpuProbe::read_msr` is already fault-tolerant by contract ("the
// OS's fault fix-up turns it into None"), so read SEV_STATUS whenever the
// leaf-0x21 signature is absent, whatever CPUID says (a #GP is `None`:
// neither); or, where CPUID comes from the hypervisor, refuse `Neither`
// unless SEV_STATUS reads 0 or faults. Keep the CPUID gate only in
// `Hardware`, which has no fix-up.
// ---------------------------------------------------------------------

const SNP: u64 = sev_status::SEV | sev_status::SEV_ES | sev_status::SNP;

#[test]
fn d1_a_hypervisor_cpuid_answer_cannot_make_an_snp_guest_believe_it_is_unprotected() {
    // The hardware says SNP: SEV_STATUS is not interceptable.
    let hardware = |cpu: &mut FakeCpu| {
        cpu.msrs.insert(SEV_STATUS_MSR, SNP);
    };
    // Lie 1: the hypervisor's CPUID 0x8000_0000 says the SEV leaf does
    // not exist.
    let mut short = FakeCpu::default();
    hardware(&mut short);
    short.cpuid.insert((0, 0), [0x10, 0, 0, 0]);
    short.cpuid.insert((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]);
    // Lie 2: the leaf exists but denies SEV (EAX[1] clear).
    let mut denied = FakeCpu::default();
    hardware(&mut denied);
    denied.cpuid.insert((0, 0), [0x10, 0, 0, 0]);
    denied.cpuid.insert((0x8000_0000, 0), [SEV_CPUID_LEAF, 0, 0, 0]);
    denied.cpuid.insert((SEV_CPUID_LEAF, 0), [0, 51, 0, 0]);
    for (lie, cpu) in [("max extended leaf", &short), ("SEV bit", &denied)] {
        assert_ne!(
            detect(cpu),
            Ok(Detected::Neither),
            "{lie}: the hypervisor's CPUID made an SNP guest (SEV_STATUS {SNP:#x}) 'neither'; \
             SEV_STATUS reads: {:x?}",
            cpu.msr_reads.borrow()
        );
    }
}

// ---------------------------------------------------------------------
// Finding F1 (correctness): overlapping descriptors defeat the UEFI
// guest's free-memory check: a hole, or a range the firmware keeps,
// passes as free.
//
// Promise broken: tests/guest/src/boot/mod.rs `check_free` ("Every byte
// described as free: a hole the map leaves out (MMIO, or memory the
// firmware never reported) is not free either"; "must not be the
// firmware's runtime code or data, ACPI tables, or reserved"), commit
// c01b48c ("the UEFI guest's free-memory check refuses a hole the
// firmware's map leaves out"), and firmware_map.rs's `MapError` ("A
// malformed map: the firmware broke its own format") with "a map is
// checked whole before any of it is kept" (commit 3744f33).
//
// Cause: firmware_map.rs `all` sums the bytes of every `wanted` range
// that meets [start, end) and compares the sum with the length, relying
// on "Ranges do not overlap (UEFI 2.10, GetMemoryMap)"; `record` never
// checks that. Two free descriptors over the same pages count them
// twice, so a hole beside them is "covered"; a free descriptor over a
// runtime-services one hides it (`first_other` is asked only when `all`
// says no).
//
// Fix: in `record`, refuse a map whose ranges overlap (sort a copy of the
// (start, end) pairs, or check each pair: 512 ranges are cheap) with a new
// `MapError::Overlap`; or make `all` walk the covered intervals (merge,
// then compare) and make `check_free` also require `first_other` to be
// `None`.
// ---------------------------------------------------------------------

/// EFI_MEMORY_DESCRIPTOR (UEFI 2.10, section 7.2) at OVMF's 48-byte
/// stride, attributes UC|WC|WT|WB.
fn descriptor(kind: u32, start: u64, pages: u64) -> Vec<u8> {
    let mut d = vec![0; 48];
    d[0..4].copy_from_slice(&kind.to_le_bytes());
    d[8..16].copy_from_slice(&start.to_le_bytes());
    d[24..32].copy_from_slice(&pages.to_le_bytes());
    d[32..40].copy_from_slice(&0xFu64.to_le_bytes());
    d
}

fn map(entries: &[(u32, u64, u64)]) -> Vec<u8> {
    entries.iter().flat_map(|&(k, s, p)| descriptor(k, s, p)).collect()
}

const CONVENTIONAL: u32 = 7;
const RUNTIME_SERVICES_DATA: u32 = 6;
const PAGE: u64 = 4096;

#[test]
fn f1_overlapping_free_descriptors_do_not_cover_a_hole() {
    let _turn = MAP.lock().unwrap_or_else(|e| e.into_inner());
    // [0, 8 KiB) described twice; [8 KiB, 16 KiB) not at all (a hole).
    let accepted = record(&map(&[(CONVENTIONAL, 0, 2), (CONVENTIONAL, 0, 2)]), 48, 1);
    if accepted.is_err() {
        return; // a map with overlapping ranges refused: the fix
    }
    assert!(
        !all(0, 4 * PAGE, &[Use::Free]),
        "[0x2000, 0x4000) is described by no descriptor, yet check_free would pass it as free"
    );
}

#[test]
fn f1_a_free_descriptor_over_runtime_services_data_does_not_make_it_free() {
    let _turn = MAP.lock().unwrap_or_else(|e| e.into_inner());
    // Conventional [0, 16 KiB) over runtime-services data [4 KiB, 8 KiB).
    let accepted = record(&map(&[(CONVENTIONAL, 0, 4), (RUNTIME_SERVICES_DATA, PAGE, 1)]), 48, 1);
    if accepted.is_err() {
        return; // refused: the fix
    }
    assert!(
        !all(0, 4 * PAGE, &[Use::Free]),
        "the runtime-services page [0x1000, 0x2000) passes check_free as free"
    );
}

// ---------------------------------------------------------------------
// Finding F2 (robustness): a map `record` accepts makes `free_bytes` (and
// `all`) panic on overflow.
//
// Promise broken: the project rule that bad input gets a typed error, not
// a panic; firmware_map.rs `record` returns `Ok` for the map, and
// uefi.rs `on_own_stack` then calls `free_bytes()` to print it.
//
// Cause: firmware_map.rs `bytes_of` and `all` add range lengths with
// `Iterator::sum::<u64>()`; each range is checked not to overflow on its
// own, but two overlapping ranges of 2^63 bytes each sum to 2^64. (In the
// guest's release build, without overflow checks, the sum wraps to 0 and
// `all` compares a wrapped sum.)
//
// Fix: refuse overlapping maps in `record` (F1), after which the lengths
// of disjoint ranges cannot exceed 2^64 - 1; or sum with
// `saturating_add`.
// ---------------------------------------------------------------------

#[test]
fn f2_an_accepted_map_does_not_make_free_bytes_panic() {
    let _turn = MAP.lock().unwrap_or_else(|e| e.into_inner());
    let half = 1u64 << 51; // pages: 2^63 bytes
    if record(&map(&[(CONVENTIONAL, 0, half), (CONVENTIONAL, 0, half)]), 48, 1).is_err() {
        return; // refused: the fix
    }
    let free = std::panic::catch_unwind(free_bytes);
    let all_free = std::panic::catch_unwind(|| all(0, 1 << 63, &[Use::Free]));
    assert!(
        free.is_ok() && all_free.is_ok(),
        "a map record() accepted panics free_bytes ({}) / all ({})",
        if free.is_ok() { "ok" } else { "panicked" },
        if all_free.is_ok() { "ok" } else { "panicked" },
    );
}

// ---------------------------------------------------------------------
// Finding F3 (robustness, low): a map whose size is not a whole number of
// descriptors is accepted, its tail silently dropped.
//
// Promise broken: firmware_map.rs `MapError` ("A malformed map: the
// firmware broke its own format"); UEFI 2.10 section 7.2 GetMemoryMap
// returns `MemoryMapSize` bytes of an "array of EFI_MEMORY_DESCRIPTORs"
// each `DescriptorSize` bytes, so a size that is not a multiple of the
// stride is a broken map (or a `size`/`descriptor_size` mix-up in the
// caller), not a shorter one.
//
// Cause: firmware_map.rs `record`: `count = bytes.len() / descriptor_size`
// and `chunks_exact` ignore the remainder.
//
// Fix: `if bytes.len() % descriptor_size != 0 { return
// Err(MapError::DescriptorSize(descriptor_size)) }` (or a new
// `MapError::Length`).
// ---------------------------------------------------------------------

#[test]
fn f3_a_map_that_is_not_a_whole_number_of_descriptors_is_refused() {
    let _turn = MAP.lock().unwrap_or_else(|e| e.into_inner());
    let mut bytes = map(&[(CONVENTIONAL, 0, 16), (CONVENTIONAL, 16 * PAGE, 16)]);
    // The second descriptor cut after its PhysicalStart: 24 of 48 bytes.
    bytes.truncate(48 + 24);
    let kept = record(&bytes, 48, 1);
    assert!(
        kept.is_err(),
        "72 bytes at a 48-byte stride accepted as {:?} descriptor(s)",
        kept.ok()
    );
}
