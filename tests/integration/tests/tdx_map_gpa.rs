//! MapGPA against the model: the honest retry protocol, and every way the
//! VMM can lie about it.

use hvmock::{MockTdx, TdxConfig, TdxEvent, TdxHostile, TdxPageState};
use integration::{tdx, MIB};
use tdcall::{map_gpa, MapGpaError, Visibility, VmcallStatus, MAX_RETRIES_WITHOUT_PROGRESS};

const SHARED_BIT_48: u64 = 1 << 47;

fn map(td: &MockTdx, start: u64, len: u64, to: Visibility) -> Result<tdcall::MapGpaCalls, MapGpaError> {
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { map_gpa(td, start, len, to, td.shared_mask()) }
}

fn map_gpa_calls(td: &MockTdx) -> Vec<(u64, u64, u64, u64)> {
    td.events()
        .into_iter()
        .filter_map(|e| match e {
            TdxEvent::MapGpa {
                gpa,
                size,
                status,
                resume,
            } => Some((gpa, size, status, resume)),
            _ => None,
        })
        .collect()
}

fn all_pages(td: &MockTdx, start: u64, len: u64, state: TdxPageState) -> bool {
    (start..start + len)
        .step_by(4096)
        .all(|gpa| td.page(gpa).state == state)
}

#[test]
fn to_shared_in_one_call_sets_the_shared_bit_in_r12() {
    let td = tdx(4 * MIB, TdxConfig::default());
    let calls = map(&td, MIB, MIB, Visibility::Shared).unwrap();
    assert_eq!(calls.calls, 1);
    assert_eq!(map_gpa_calls(&td), vec![(MIB | SHARED_BIT_48, MIB, 0, 0)]);
    assert!(all_pages(&td, MIB, MIB, TdxPageState::Shared));
    assert!(
        all_pages(&td, 0, MIB, TdxPageState::Accepted),
        "pages outside the range are untouched"
    );
    assert!(all_pages(&td, 2 * MIB, 2 * MIB, TdxPageState::Accepted));
}

#[test]
fn gpaw_52_uses_bit_51() {
    let td = tdx(
        MIB,
        TdxConfig {
            gpaw: 52,
            ..TdxConfig::default()
        },
    );
    map(&td, 0, 4096, Visibility::Shared).unwrap();
    assert_eq!(map_gpa_calls(&td)[0].0, 1 << 51);
}

/// An honest VMM that converts 3 pages per call answers RETRY with R11 in
/// shared form. A guest that compares R11 against addresses stripped of the
/// shared bit (a known bug in other guests) rejects this honest VMM; we
/// must follow it to the end.
#[test]
fn honest_chunked_retry_with_shared_bit_in_r11_is_followed() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(3),
            ..TdxConfig::default()
        },
    );
    let calls = map(&td, 0, 10 * 4096, Visibility::Shared).unwrap();
    assert_eq!(calls.calls, 4);
    let seen = map_gpa_calls(&td);
    assert_eq!(seen[0], (SHARED_BIT_48, 10 * 4096, 1, SHARED_BIT_48 | (3 * 4096)));
    assert_eq!(
        seen[1].0,
        SHARED_BIT_48 | (3 * 4096),
        "resumes where the VMM said, in shared form"
    );
    assert_eq!(seen[3].2, 0);
    assert!(all_pages(&td, 0, 10 * 4096, TdxPageState::Shared));
}

#[test]
fn honest_chunked_retry_to_private_has_no_shared_bit() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(2),
            ..TdxConfig::default()
        },
    );
    map(&td, 0, 5 * 4096, Visibility::Shared).unwrap();
    td.clear_events();
    map(&td, 0, 5 * 4096, Visibility::Private).unwrap();
    assert!(map_gpa_calls(&td)
        .iter()
        .all(|c| c.0 & SHARED_BIT_48 == 0 && c.3 & SHARED_BIT_48 == 0));
    assert!(all_pages(&td, 0, 5 * 4096, TdxPageState::Pending));
}

/// The retry counter resets on progress: a VMM that stalls the maximum
/// number of times before every chunk still completes.
#[test]
fn stalls_up_to_the_limit_between_progress_are_tolerated() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(1),
            map_gpa_stalls_per_chunk: MAX_RETRIES_WITHOUT_PROGRESS,
            ..TdxConfig::default()
        },
    );
    let calls = map(&td, 0, 4 * 4096, Visibility::Shared).unwrap();
    assert_eq!(calls.calls, 4 * (MAX_RETRIES_WITHOUT_PROGRESS as u64 + 1));
    assert!(all_pages(&td, 0, 4 * 4096, TdxPageState::Shared));
}

#[test]
fn one_stall_more_than_the_limit_fails() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(1),
            map_gpa_stalls_per_chunk: MAX_RETRIES_WITHOUT_PROGRESS + 1,
            ..TdxConfig::default()
        },
    );
    assert_eq!(
        map(&td, 0, 4 * 4096, Visibility::Shared),
        Err(MapGpaError::NoProgress { gpa: SHARED_BIT_48 })
    );
}

/// Unbounded retry loops are the other known bug: a VMM that never makes
/// progress gets exactly MAX_RETRIES_WITHOUT_PROGRESS retries.
#[test]
fn hostile_no_progress_forever_is_bounded() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.set_hostile(Some(TdxHostile::NoProgressForever));
    assert_eq!(
        map(&td, MIB, MIB, Visibility::Shared),
        Err(MapGpaError::NoProgress {
            gpa: MIB | SHARED_BIT_48
        })
    );
    assert_eq!(map_gpa_calls(&td).len(), MAX_RETRIES_WITHOUT_PROGRESS as usize + 1);
}

/// A VMM that alternates one page forward and one back would keep a guest
/// that accepts any resume GPA in [start, end) looping forever, resetting
/// its no-progress counter every other call.
#[test]
fn hostile_rewind_is_rejected_not_looped_on() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.set_hostile(Some(TdxHostile::ResumeRewind));
    let err = map(&td, MIB, MIB, Visibility::Shared).unwrap_err();
    assert!(
        matches!(err, MapGpaError::ResumeOutOfRange { resume, .. } if resume == MIB | SHARED_BIT_48),
        "{err:?}"
    );
    assert_eq!(map_gpa_calls(&td).len(), 2);
}

#[test]
fn hostile_resume_below_start() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.set_hostile(Some(TdxHostile::ResumeBelowStart));
    let err = map(&td, MIB, MIB, Visibility::Shared).unwrap_err();
    assert_eq!(
        err,
        MapGpaError::ResumeOutOfRange {
            resume: (MIB - 4096) | SHARED_BIT_48,
            current: MIB | SHARED_BIT_48,
            end: (2 * MIB) | SHARED_BIT_48
        }
    );
}

#[test]
fn hostile_resume_at_end() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.set_hostile(Some(TdxHostile::ResumeAtEnd));
    let err = map(&td, MIB, MIB, Visibility::Private).unwrap_err();
    assert!(
        matches!(err, MapGpaError::ResumeOutOfRange { resume, .. } if resume == 2 * MIB),
        "{err:?}"
    );
}

#[test]
fn hostile_resume_unaligned() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.set_hostile(Some(TdxHostile::ResumeUnaligned));
    assert_eq!(
        map(&td, MIB, MIB, Visibility::Shared),
        Err(MapGpaError::ResumeUnaligned {
            resume: (MIB + 2048) | SHARED_BIT_48
        })
    );
}

/// The other half of the shared-bit bug: R11 without the shared bit, which
/// a guest comparing against stripped addresses would take as in range.
#[test]
fn hostile_resume_without_shared_bit() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(4),
            ..TdxConfig::default()
        },
    );
    td.set_hostile(Some(TdxHostile::ResumeWithoutSharedBit));
    assert_eq!(
        map(&td, MIB, MIB, Visibility::Shared),
        Err(MapGpaError::ResumeWrongForm { resume: MIB + 4 * 4096 })
    );
}

#[test]
fn hostile_garbage_status_is_a_typed_error() {
    let td = tdx(4 * MIB, TdxConfig::default());
    for garbage in [2, 0x8000_0000_0000_0001, 0x8000_0000_0000_0002, 0xFFFF_FFFF_FFFF_FFFF] {
        td.set_hostile(Some(TdxHostile::GarbageStatus(garbage)));
        let err = map(&td, 0, 4096, Visibility::Shared).unwrap_err();
        assert_eq!(
            err,
            MapGpaError::Refused {
                status: VmcallStatus::from_raw(garbage),
                gpa: SHARED_BIT_48
            }
        );
        assert!(!matches!(
            VmcallStatus::from_raw(garbage),
            VmcallStatus::Success | VmcallStatus::Retry
        ));
    }
}

/// "Success" without conversion cannot be seen at MapGPA; for to-private it
/// is caught by ACCEPT, which finds the page still accepted (stale
/// contents), or not mapped at all.
#[test]
fn hostile_success_without_converting_is_caught_by_accept() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.set_hostile(Some(TdxHostile::SuccessWithoutConverting));
    map(&td, 0, 2 * MIB, Visibility::Shared).unwrap();
    assert!(
        all_pages(&td, 0, 2 * MIB, TdxPageState::Accepted),
        "the VMM lied: nothing moved"
    );
    map(&td, 0, 2 * MIB, Visibility::Private).unwrap();
    // SAFETY: the model's memory is not used by Rust code.
    let err = unsafe { tdcall::accept_range(&td, 0, 2 * MIB) }.unwrap_err();
    assert_eq!(
        err,
        tdcall::AcceptError::AlreadyAccepted {
            gpa: 0,
            level: tdcall::PageLevel::Size4K
        }
    );
}

#[test]
fn vmm_errors_are_typed() {
    let td = tdx(4 * MIB, TdxConfig::default());
    // Beyond guest memory: the model's VMM answers INVALID_OPERAND.
    assert_eq!(
        map(&td, 8 * MIB, 4096, Visibility::Shared),
        Err(MapGpaError::Refused {
            status: VmcallStatus::InvalidOperand,
            gpa: (8 * MIB) | SHARED_BIT_48
        })
    );
}

#[test]
fn malformed_requests_send_nothing() {
    let td = tdx(4 * MIB, TdxConfig::default());
    let mask = td.shared_mask();
    for (start, len) in [(0, 0), (1, 4096), (0, 4095), (!0xFFF, 8192), (mask - 4096, 8192)] {
        // SAFETY: nothing is sent.
        let err = unsafe { map_gpa(&td, start, len, Visibility::Shared, mask) }.unwrap_err();
        assert_eq!(err, MapGpaError::InvalidRange { start, len });
    }
    // SAFETY: nothing is sent.
    let err = unsafe { map_gpa(&td, 0, 4096, Visibility::Shared, 3 << 46) }.unwrap_err();
    assert_eq!(err, MapGpaError::InvalidSharedMask(3 << 46));
    assert!(td.events().is_empty());
}

/// The VMM clobbers every exposed register it does not answer in; the
/// wrapper must not depend on any of them (the mock writes CLOBBER there).
#[test]
fn exposed_registers_are_treated_as_clobbered() {
    let td = tdx(4 * MIB, TdxConfig::default());
    let mut regs = tdcall::Registers {
        rax: 0,
        rcx: tdcall::VMCALL_EXPOSED_REGS,
        r11: 0x10001,
        r12: 0,
        r13: 4096,
        ..Default::default()
    };
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { tdcall::Tdcall::tdcall(&td, &mut regs) };
    assert_eq!(
        (regs.r12, regs.r13, regs.r14, regs.r15),
        (
            hvmock::tdx::CLOBBER,
            hvmock::tdx::CLOBBER,
            hvmock::tdx::CLOBBER,
            hvmock::tdx::CLOBBER
        )
    );
    assert_eq!(regs.r10, 0);
    // And the typed wrapper still succeeds against such a VMM.
    assert!(map(&td, 4096, 4096, Visibility::Shared).is_ok());
}

/// The top private pages end exactly at the shared bit, so their end in
/// private form is the shared bit itself: an end computed as `end | form`
/// then lies below the shared-form start, and `end - current` wraps.
/// GPAW 22 puts the shared bit at 2 MiB, so the model's memory can reach
/// the top of the private half.
#[test]
fn top_private_pages_map_to_shared_and_back() {
    let td = tdx(
        2 * MIB,
        TdxConfig {
            gpaw: 22,
            map_gpa_chunk_pages: Some(1),
            ..TdxConfig::default()
        },
    );
    let mask = td.shared_mask();
    assert_eq!(mask, 2 * MIB);
    let start = mask - 2 * 4096;
    let calls = map(&td, start, 2 * 4096, Visibility::Shared).unwrap();
    assert_eq!(calls.calls, 2);
    assert_eq!(
        map_gpa_calls(&td),
        vec![
            (start | mask, 2 * 4096, 1, (start + 4096) | mask),
            ((start + 4096) | mask, 4096, 0, 0)
        ]
    );
    assert!(all_pages(&td, start, 2 * 4096, TdxPageState::Shared));
    assert!(all_pages(&td, 0, start, TdxPageState::Accepted), "nothing below moved");
    td.clear_events();
    let calls = map(&td, start, 2 * 4096, Visibility::Private).unwrap();
    assert_eq!(calls.calls, 2);
    assert_eq!(
        map_gpa_calls(&td),
        vec![(start, 2 * 4096, 1, start + 4096), (start + 4096, 4096, 0, 0)]
    );
    assert!(all_pages(&td, start, 2 * 4096, TdxPageState::Pending));
}

/// A VMM of the real 48-bit layout, reduced to what MapGPA needs: it
/// records R12/R13 and converts one page per call.
#[derive(Default)]
struct OnePagePerCall {
    calls: std::sync::Mutex<Vec<(u64, u64)>>,
}

// SAFETY: it touches no memory; it only records and answers.
unsafe impl tdcall::Tdcall for OnePagePerCall {
    unsafe fn tdcall(&self, regs: &mut tdcall::Registers) {
        assert_eq!(
            (regs.rax, regs.r11),
            (tdcall::leaf::VP_VMCALL, tdcall::subfunction::MAP_GPA)
        );
        self.calls.lock().unwrap().push((regs.r12, regs.r13));
        regs.rax = 0;
        if regs.r13 > 4096 {
            (regs.r10, regs.r11) = (1, regs.r12 + 4096);
        } else {
            (regs.r10, regs.r11) = (0, 0);
        }
    }
}

/// The same request against the real shared bit (bit 47), where no model
/// memory reaches: R12 and R13 describe exactly the top two pages.
#[test]
fn top_private_pages_with_the_48_bit_shared_bit() {
    for (to, form) in [(Visibility::Shared, SHARED_BIT_48), (Visibility::Private, 0)] {
        let vmm = OnePagePerCall::default();
        let start = SHARED_BIT_48 - 2 * 4096;
        // SAFETY: the stand-in VMM touches no memory.
        let calls = unsafe { map_gpa(&vmm, start, 2 * 4096, to, SHARED_BIT_48) }.unwrap();
        assert_eq!(calls.calls, 2);
        assert_eq!(
            *vmm.calls.lock().unwrap(),
            vec![(start | form, 2 * 4096), ((start + 4096) | form, 4096)],
            "{to:?}"
        );
    }
}

/// The resume checks hold at the top too: the request-form end of the top
/// pages is twice the shared bit, which carries the next bit up instead of
/// the shared bit, and a VMM resuming there is refused.
#[test]
fn hostile_resume_at_end_of_the_top_pages() {
    let td = tdx(
        2 * MIB,
        TdxConfig {
            gpaw: 22,
            ..TdxConfig::default()
        },
    );
    td.set_hostile(Some(TdxHostile::ResumeAtEnd));
    let mask = td.shared_mask();
    let start = mask - 2 * 4096;
    assert_eq!(
        map(&td, start, 2 * 4096, Visibility::Shared),
        Err(MapGpaError::ResumeWrongForm { resume: 2 * mask })
    );
}

/// With the shared bit at 63 the top page's shared-form end would be 2^64:
/// refused before anything is sent, not wrapped.
#[test]
fn shared_bit_63_top_page_is_refused_not_wrapped() {
    let vmm = OnePagePerCall::default();
    let (mask, start) = (1 << 63, (1 << 63) - 4096);
    // SAFETY: nothing is sent.
    let err = unsafe { map_gpa(&vmm, start, 4096, Visibility::Shared, mask) }.unwrap_err();
    assert_eq!(err, MapGpaError::InvalidRange { start, len: 4096 });
    assert!(vmm.calls.lock().unwrap().is_empty());
    // SAFETY: the stand-in VMM touches no memory.
    unsafe { map_gpa(&vmm, start, 4096, Visibility::Private, mask) }.unwrap();
    assert_eq!(*vmm.calls.lock().unwrap(), vec![(start, 4096)]);
}
