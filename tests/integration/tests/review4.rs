//! Tests from a fourth hostile review (the day's API, the poisoned-frame
//! hole-mark fix, the GHCB setup, the platform constructors, the pool).
//! Each one fails against the commit reviewed (423fd1c) and names the
//! promise it breaks and where that promise is written.

#![allow(clippy::too_many_lines)]

use std::cell::Cell;
use std::ptr::NonNull;

use coco_convert::bits::PRESENT;
use coco_convert::platform::snp::{NoGhcb, PerCpuGhcbs, Snp};
use coco_convert::platform::SetupError;
use coco_convert::{setup_ghcb, ConvertError, GhcbSetupError, Level, PageState, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig, TdxHostile};
use integration::sim::DIRECT_MAP_VA;
use integration::world::{Shape, SnpWorld, TdxWorld};
use integration::{snp, MIB};

const PAGE: u64 = 4096;

// ---------------------------------------------------------------------
// Promise: docs/contract.md, "Results": on `Platform { .. }` "The frames
// of the failed call (`poisoned` of them ...) are poisoned ... every other
// frame of the call is as before. One exception: a huge leaf the
// conversion made not present ... whose frames the failure left in
// different states ... all its frames are poisoned too". And "What the
// engine may change": an entry the OS left not present "is a hole ...
// left bit for bit as it was". Today's fix (d31d6f4, `StateTable::poison`)
// says poisoned frames keep their hole marks "until the conversion
// settles: they tell the OS's not-present leaves from the conversion's
// own".
//
// Why it fails: the fix covers only the frames of the failed host call.
// `poison_mixed_leaves` (engine/transaction.rs) poisons the other frames
// of a mixed huge leaf of the vmalloc range with `StateTable::settle`,
// which CLEARS their hole marks, and then, in the same pass, uses the hole
// mark of a run's first frame to decide whether a not-present direct-map
// leaf is the OS's. A run that starts at such a frame finds no mark, takes
// the OS's not-present 1 GiB direct-map leaf for the conversion's own, and
// poisons all 262,144 frames under it: OS memory the conversion never
// owned, lost for good.
//
// Setup: the first GiB of the direct map is one 1 GiB leaf the OS has made
// not present (frame kept: a hole, as the contract allows at 1 GiB). A
// vmalloc-style range maps, with 4 KiB leaves, frames G+4K..G+2M+4K, then
// with one 2 MiB leaf frames G..G+2M (G+4K.. mapped twice, as the contract
// allows). Scratch of one extent: the first host call carries the 512
// 4 KiB frames and fails; G (never sent) and the failed frames mix in the
// 2 MiB leaf, so G is poisoned by `settle` and loses its mark.
// ---------------------------------------------------------------------
#[test]
fn a_failed_vmalloc_conversion_never_poisons_the_os_frames_of_a_1g_direct_map_hole() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let m = &w.m;
    // The OS's own: the direct map's first GiB made not present, frame
    // kept (as `set_memory_np` leaves a huge leaf).
    let pdpte = m.builder().table_at(DIRECT_MAP_VA, Level::Pdpt) + 8 * Level::Pdpt.index(DIRECT_MAP_VA) as u64;
    let leaf = m.mem.read_u64(pdpte);
    assert!(leaf & PRESENT != 0, "fixture: the first GiB is one present 1 GiB leaf");
    m.mem.write_u64(pdpte, leaf & !PRESENT);

    let g = 512 * MIB;
    let va = m.vmalloc_area(4 * MIB);
    let mut pieces: Vec<(u64, Level)> = (1..=512).map(|i| (g + i * PAGE, Level::Pt)).collect();
    pieces.push((g, Level::Pd));
    assert_eq!(m.map_pieces(va, &pieces), 4 * MIB);

    let e = w.engine();
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    let err = e
        .convert_with_scratch(Target::Virtual { va, len: 4 * MIB }, Visibility::Shared, &mut [0; 1])
        .unwrap_err();
    w.tdx.set_hostile(None);
    let ConvertError::Platform { poisoned, .. } = err else {
        panic!("expected a host failure, got {err:?}");
    };
    // The conversion's frames: G..G+2M+4K, 513 of them.
    let os_frame = 100 * MIB;
    let census = e.census();
    assert!(
        poisoned <= 513 && e.state(os_frame) == Some(PageState::Private),
        "a conversion of 513 frames reported {poisoned} poisoned; the OS's frame {os_frame:#x} \
         (never part of it) is {:?}; census {census:?}",
        e.state(os_frame)
    );
    assert_eq!(
        m.mem.read_u64(pdpte),
        leaf & !PRESENT,
        "the OS's hole is left bit for bit"
    );
}

// ---------------------------------------------------------------------
// Promise: `GhcbSetupError::NoSlot` (convert/src/ghcb_setup.rs): "The
// platform's GHCB provider has no slot for this CPU. Nothing changed."
// and `setup_ghcb`'s commit (d0c2d4d): it "refuses first when the CPU has
// no slot".
//
// Why it fails: `setup_ghcb` asks `can_install` first, but the install
// itself comes last, after the page was converted to shared and
// registered with the hypervisor, and a failed install is mapped to the
// same `NoSlot` (`.map_err(|_| GhcbSetupError::NoSlot)`). With the
// ready-made `PerCpuGhcbs`, `cpu()` is read once by `can_install` and
// again by `install`: a caller whose CPU index differs between the two
// (the task moved, nothing in `setup_ghcb`'s safety section forbids it)
// gets "no slot, nothing changed" while its page is shared and is the
// hypervisor's registered GHCB for the vCPU. The caller, told nothing
// changed, reuses the page as private memory: the hypervisor then writes
// into it on the next exit.
// ---------------------------------------------------------------------
thread_local! {
    static CPU_READS: Cell<u32> = const { Cell::new(0) };
}

/// CPU 0 the first time it is asked, then CPU 9 (no such slot): the task
/// moved between `can_install` and `install`.
fn moving_cpu() -> usize {
    CPU_READS.with(|c| {
        c.set(c.get() + 1);
        if c.get() == 1 {
            0
        } else {
            9
        }
    })
}

#[test]
fn a_ghcb_setup_that_says_nothing_changed_left_nothing_shared_or_registered() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let platform = Snp::new(&w.snp, &w.snp, PerCpuGhcbs::new(w.ghcbs, moving_cpu), 51).unwrap();
    let e = w.m.engine(platform).with_window(&w.m.windows);
    // SAFETY: negotiation has no memory effect.
    unsafe { snp_ghcb::protocol::negotiate(&w.snp) }.unwrap();
    let pa = 1536 * MIB;
    let ptr = NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
    // SAFETY: the page is used by nothing else.
    let result = unsafe { setup_ghcb(&e, pa, ptr) };
    // Fixed: the slot is chosen once, before anything changes, so a later
    // CPU read cannot turn a done setup into "no slot".
    match result {
        Err(GhcbSetupError::NoSlot) => assert_eq!(
            (e.state(pa), w.snp.registered_ghcb()),
            (Some(PageState::Private), None),
            "setup_ghcb said NoSlot, \"Nothing changed\", yet the page is shared and registered"
        ),
        Ok(()) => assert!(w.ghcbs[0].is_filled(), "the GHCB went into the slot chosen first"),
        Err(other) => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------
// Promise: the two SNP constructors are "symmetric" (d0c2d4d: "Symmetric
// platform constructors (Tdx::new/from_vp_info, Snp::new/negotiate, all
// Result<_, SetupError>)"); `Snp::new` takes "C-bit position `c_bit`
// (CPUID 0x8000001F EBX[5:0], or what `negotiate` finds)"; snp-ghcb's
// `ProtocolError::BadCBit` says a C-bit "outside 32..=51" is one "no PTE
// could hold ... alongside a physical address"; and the PTE-bit override
// for "a bit the MMU ignores" is `with_pte_bit`, "behind the test-knobs
// feature ... never for production" (coco-convert's front page).
//
// Why it fails: `negotiate` refuses a hypervisor's C-bit of 52..=58
// (`Negotiation(BadCBit)`), but `Snp::new` builds a backend for the same
// position: `EncryptionBit::snp` accepts any bit 32..=58, and
// `SetupError::InvalidCBit` documents 32..=58 as positions "a page-table
// entry can hold". Bits 52..58 of a PTE are ignored by the MMU: such a
// backend marks "private" mappings with a bit the hardware never sees, so
// every private page is mapped without the real C-bit -- exactly the
// test-knobs override, reachable without the feature, from a CPUID value.
// ---------------------------------------------------------------------
#[test]
fn snp_new_and_negotiate_agree_on_which_c_bits_a_pte_can_hold() {
    let mut disagree = Vec::new();
    for c_bit in 0..64u8 {
        let model = snp(
            64 * MIB,
            SnpConfig {
                c_bit,
                ..SnpConfig::default()
            },
        );
        // SAFETY: the model stands in for the hypervisor.
        let negotiated = unsafe { Snp::negotiate(&model, &model, NoGhcb) }.map(|_| ());
        let built = Snp::new(&model, &model, NoGhcb, c_bit).map(|_| ());
        if negotiated.is_ok() != built.is_ok() {
            disagree.push((c_bit, negotiated, built));
        }
    }
    let accepted_by_new_only: Vec<u8> = disagree.iter().map(|d| d.0).collect();
    assert!(
        disagree.is_empty(),
        "C-bits Snp::new accepts but negotiate refuses: {accepted_by_new_only:?}; first: {:?}",
        disagree.first()
    );
    // And the refusal should be the typed C-bit error either way.
    let model = snp(
        64 * MIB,
        SnpConfig {
            c_bit: 52,
            ..SnpConfig::default()
        },
    );
    assert_eq!(
        Snp::new(&model, &model, NoGhcb, 52).map(|_| ()).unwrap_err(),
        SetupError::InvalidCBit(52)
    );
}

// ---------------------------------------------------------------------
// Promise: `setup_ghcb`'s rustdoc (convert/src/ghcb_setup.rs): "If
// registration fails the page stays shared: the error says so, and the
// caller must not reuse the page as private memory without converting it
// back."
//
// Why it fails: nothing in the error says so. The variant's doc is "The
// hypervisor did not register it." and its message is "registering the
// GHCB failed: GHCB registration of GFN .. answered with GFN ..": neither
// mentions that the page was made shared and left so (compare
// `ConvertError::Platform`, whose message names the poisoned frames, which
// `a_platform_failure_explains_itself_down_to_the_host_answer` checks).
// A caller logging the error and freeing the page back to its allocator
// hands out a shared page as private memory. (Minor: the behaviour is as
// documented, the report is not.)
// ---------------------------------------------------------------------
#[test]
fn a_failed_ghcb_registration_says_the_page_was_left_shared() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    // SAFETY: negotiation has no memory effect.
    unsafe { snp_ghcb::protocol::negotiate(&w.snp) }.unwrap();
    w.snp.set_hostile(Some(hvmock::SnpHostile::MsrWrongGfn));
    let pa = 1536 * MIB;
    let ptr = NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
    // SAFETY: the page is used by nothing else.
    let err = unsafe { setup_ghcb(&e, pa, ptr) }.unwrap_err();
    assert!(matches!(err, GhcbSetupError::Register(_)), "fixture: {err:?}");
    assert_eq!(e.state(pa), Some(PageState::Shared), "fixture: the page stays shared");
    let text = err.to_string();
    assert!(
        text.contains("shared"),
        "the error does not say the page stays shared: {text:?}"
    );
}
