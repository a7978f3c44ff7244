//! The Page State Change NAE event through a real GHCB page in guest
//! memory: batching, 2 MiB entries, resuming after partial progress, and
//! every lie in the header and entries.

use hvmock::{MockSnp, RmpEntry, SnpConfig, SnpHostile};
use integration::{boot_ghcb, snp, MIB};
use snp_ghcb::msr_protocol::PscOp;
use snp_ghcb::psc::{change_page_state, PscBatches, PscError, MAX_ENTRIES, PSC_EXIT_CODE};
use snp_ghcb::{Field, GhcbPage, NaeError};

fn psc(hv: &MockSnp, ghcb: &mut GhcbPage, gpa: u64, len: u64, op: PscOp) -> Result<snp_ghcb::psc::PscExits, PscError> {
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { change_page_state(ghcb, hv, gpa, len, op, true) }
}

fn rmp_all(hv: &MockSnp, gpa: u64, len: u64, f: impl Fn(RmpEntry) -> bool) -> bool {
    (gpa..gpa + len).step_by(4096).all(|g| f(hv.rmp(g)))
}

#[test]
fn two_mib_aligned_range_uses_2m_entries_and_one_exit() {
    let hv = snp(16 * MIB, SnpConfig::default());
    let mut ghcb = boot_ghcb(&hv);
    let done = psc(&hv, &mut ghcb, 2 * MIB, 8 * MIB, PscOp::Shared).unwrap();
    assert_eq!((done.exits, done.entries), (1, 4));
    assert!(rmp_all(&hv, 2 * MIB, 8 * MIB, |e| !e.assigned));
    let done = psc(&hv, &mut ghcb, 2 * MIB, 8 * MIB, PscOp::Private).unwrap();
    assert_eq!(done.entries, 4);
    assert!(rmp_all(&hv, 2 * MIB, 8 * MIB, |e| e.assigned && !e.validated && e.huge));
    assert_eq!(ghcb.field(Field::SwExitCode), PSC_EXIT_CODE);
    assert_eq!(ghcb.field(Field::SwScratch), ghcb.shared_buffer_gpa());
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn more_than_253_entries_take_several_descriptors() {
    let hv = snp(4 * MIB, SnpConfig::default());
    let mut ghcb = boot_ghcb(&hv);
    // 600 4 KiB pages, not 2 MiB aligned: 253 + 253 + 94 entries.
    let done = psc(&hv, &mut ghcb, 4096, 600 * 4096, PscOp::Shared).unwrap();
    assert_eq!((done.exits, done.entries), (3, 600));
    assert!(rmp_all(&hv, 4096, 600 * 4096, |e| !e.assigned));
    assert!(hv.rmp(0).assigned && hv.rmp(601 * 4096).assigned);
}

#[test]
fn batches_mix_4k_edges_and_2m_middles() {
    let batches: Vec<_> = PscBatches::new(2 * MIB - 4096, 4 * MIB + 2 * 4096, PscOp::Private, true)
        .unwrap()
        .collect();
    assert_eq!(batches.len(), 1);
    let sizes: Vec<_> = batches[0].entries().iter().map(|e| e.pages()).collect();
    assert_eq!(sizes, vec![1, 512, 512, 1]);
    let all_4k: usize = PscBatches::new(0, 4 * MIB, PscOp::Shared, false)
        .unwrap()
        .map(|d| d.entries().len())
        .sum();
    assert_eq!(all_4k, 1024);
    assert_eq!(
        PscBatches::new(0, 1024 * 4096, PscOp::Shared, false)
            .unwrap()
            .next()
            .unwrap()
            .entries()
            .len(),
        MAX_ENTRIES
    );
    assert!(PscBatches::new(1, 4096, PscOp::Shared, true).is_none());
}

/// The hypervisor does 100 pages per exit, so 2 MiB entries are resumed
/// mid-entry through cur_page; the guest loops until all is done.
#[test]
fn partial_progress_is_resumed_including_inside_2m_entries() {
    let hv = snp(
        8 * MIB,
        SnpConfig {
            psc_pages_per_exit: Some(100),
            ..SnpConfig::default()
        },
    );
    let mut ghcb = boot_ghcb(&hv);
    let done = psc(&hv, &mut ghcb, 0, 4 * MIB, PscOp::Shared).unwrap();
    assert_eq!(done.exits, 1024_u64.div_ceil(100));
    assert!(rmp_all(&hv, 0, 4 * MIB, |e| !e.assigned));
    assert_eq!(hv.stats().protocol_violations, 0);
}

fn hostile(mode: SnpHostile, pages_per_exit: Option<u64>) -> PscError {
    let hv = snp(
        8 * MIB,
        SnpConfig {
            psc_pages_per_exit: pages_per_exit,
            ..SnpConfig::default()
        },
    );
    let mut ghcb = boot_ghcb(&hv);
    hv.set_hostile(Some(mode));
    let exits_before = hv.stats().nae_exits;
    let err = psc(&hv, &mut ghcb, 0, 8 * 4096, PscOp::Shared).unwrap_err();
    assert!(hv.stats().nae_exits - exits_before <= 1 + snp_ghcb::psc::MAX_EXITS_WITHOUT_PROGRESS as u64 + 8);
    err
}

#[test]
fn hostile_cur_entry_backwards() {
    // The model does one page on the first exit, then rewinds.
    let err = hostile(SnpHostile::PscCurEntryBackwards, None);
    assert_eq!(
        err,
        PscError::Backwards {
            was: (1, 0),
            now: (0, 0)
        }
    );
}

#[test]
fn hostile_end_entry_raised() {
    assert_eq!(
        hostile(SnpHostile::PscEndEntryRaised, None),
        PscError::EndEntryChanged { expected: 7, found: 8 }
    );
}

/// Lowering end_entry would end the guest's loop with work undone.
#[test]
fn hostile_end_entry_lowered() {
    assert_eq!(
        hostile(SnpHostile::PscEndEntryLowered, None),
        PscError::EndEntryChanged { expected: 7, found: 0 }
    );
}

#[test]
fn hostile_reserved_set() {
    assert!(matches!(hostile(SnpHostile::PscReservedSet, None), PscError::ReservedSet { header } if header >> 32 == 1));
}

#[test]
fn hostile_exit_info_2_error() {
    assert_eq!(
        hostile(SnpHostile::PscExitInfo2Error, None),
        PscError::HostError {
            info2: hvmock::snp::PSC_ERROR_GENERIC
        }
    );
}

#[test]
fn hostile_exit_info_1_error() {
    assert_eq!(
        hostile(SnpHostile::PscExitInfo1Error, None),
        PscError::Nae(NaeError::Hypervisor {
            info2: hvmock::snp::PSC_ERROR_GENERIC
        })
    );
}

#[test]
fn hostile_stall_is_bounded() {
    let hv = snp(8 * MIB, SnpConfig::default());
    let mut ghcb = boot_ghcb(&hv);
    hv.set_hostile(Some(SnpHostile::PscStall));
    let before = hv.stats().nae_exits;
    assert_eq!(
        psc(&hv, &mut ghcb, 0, 4096, PscOp::Shared),
        Err(PscError::Stalled { at: (0, 0) })
    );
    assert_eq!(
        hv.stats().nae_exits - before,
        1 + snp_ghcb::psc::MAX_EXITS_WITHOUT_PROGRESS as u64
    );
}

#[test]
fn hostile_rewritten_descriptor() {
    let err = hostile(SnpHostile::PscRewriteDescriptor, None);
    assert!(
        matches!(err, PscError::EntryTampered { index: 7, expected, found } if found == expected + 4096),
        "{err:?}"
    );
}

/// A claimed success without RMP change passes the PSC checks (the header
/// is consistent); the validation that follows a to-private change catches
/// it. The same lie for to-shared leaves the page private, which hurts only
/// the host's own view.
#[test]
fn hostile_psc_success_without_rmp_change_is_caught_by_pvalidate() {
    let hv = snp(8 * MIB, SnpConfig::default());
    let mut ghcb = boot_ghcb(&hv);
    let va = integration::va(&hv, 0);
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { snp_ghcb::pvalidate::pvalidate_range(&hv, va, 2 * MIB, false, true).unwrap() };
    psc(&hv, &mut ghcb, 0, 2 * MIB, PscOp::Shared).unwrap();
    hv.set_hostile(Some(SnpHostile::PscSuccessWithoutRmpChange));
    psc(&hv, &mut ghcb, 0, 2 * MIB, PscOp::Private).unwrap();
    assert!(rmp_all(&hv, 0, 2 * MIB, |e| !e.assigned), "the hypervisor lied");
    // SAFETY: as above.
    let err = unsafe { snp_ghcb::pvalidate::pvalidate_range(&hv, va, 2 * MIB, true, true) }.unwrap_err();
    assert!(matches!(
        err,
        snp_ghcb::pvalidate::PvalidateRangeError::Page {
            error: snp_ghcb::pvalidate::PvalidateError::FailInput,
            ..
        }
    ));
}

/// A GHCB the hypervisor never registered is not used by an honest guest:
/// the model counts it as a protocol violation and writes nothing.
#[test]
fn unregistered_ghcb_is_a_violation_in_the_model() {
    let hv = snp(MIB, SnpConfig::default());
    // SAFETY: the page is ours alone.
    let mut ghcb = unsafe { integration::wrap_ghcb(&hv, 0) };
    let before = ghcb.field(Field::SwExitInfo1);
    let _ = psc(&hv, &mut ghcb, 4096, 4096, PscOp::Shared);
    assert_eq!(
        hv.stats().protocol_violations,
        1 + snp_ghcb::psc::MAX_EXITS_WITHOUT_PROGRESS as u64
    );
    assert_eq!(before, 0);
}
