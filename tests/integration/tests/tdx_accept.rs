//! TDG.MEM.PAGE.ACCEPT against the model, and a whole TDX conversion round
//! trip (MapGPA + ACCEPT).

use hvmock::{MockTdx, TdxConfig, TdxEvent, TdxPageState, SCRIBBLE};
use integration::{tdx, GIB, MIB};
use tdcall::{accept_page, accept_range, map_gpa, AcceptError, PageLevel, TdxError, Visibility, BUSY_RETRY_LIMIT};

fn to_shared_then_private(td: &MockTdx, start: u64, len: u64) {
    // SAFETY: the model's memory is not used by Rust code.
    unsafe {
        map_gpa(td, start, len, Visibility::Shared, td.shared_mask()).unwrap();
        map_gpa(td, start, len, Visibility::Private, td.shared_mask()).unwrap();
    }
    td.clear_events();
}

fn accepts(td: &MockTdx) -> Vec<(u64, u8, u64)> {
    td.events()
        .into_iter()
        .filter_map(|e| match e {
            TdxEvent::Accept { gpa, level, status } => Some((gpa, level, status)),
            _ => None,
        })
        .collect()
}

fn accept(td: &MockTdx, start: u64, len: u64) -> Result<tdcall::AcceptCalls, AcceptError> {
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { accept_range(td, start, len) }
}

#[test]
fn largest_aligned_first_over_a_mixed_range() {
    // 4K + 2M-aligned 2M pieces + 4K tail: 4K pages up to 2M, one 2M page,
    // then 4K pages.
    let td = tdx(8 * MIB, TdxConfig::default());
    let (start, len) = (2 * MIB - 2 * 4096, 2 * MIB + 3 * 4096);
    to_shared_then_private(&td, start, len);
    let calls = accept(&td, start, len).unwrap();
    assert_eq!(calls.accepted, [2 + 1, 1, 0]);
    assert_eq!(calls.calls, 4);
    let seen = accepts(&td);
    assert_eq!(seen[2], (2 * MIB, 1, 0), "the aligned 2 MiB goes in one call");
    assert!((start..start + len)
        .step_by(4096)
        .all(|g| td.page(g).state == TdxPageState::Accepted));
    assert!(td.memory().is_filled(start, len, 0), "accepted pages are zeroed");
}

#[test]
fn one_gib_is_accepted_in_one_call() {
    let td = tdx(2 * GIB, TdxConfig::default());
    to_shared_then_private(&td, GIB, GIB);
    let calls = accept(&td, GIB, GIB).unwrap();
    assert_eq!((calls.accepted, calls.calls), ([0, 0, 1], 1));
    assert_eq!(accepts(&td), vec![(GIB, 2, 0)]);
}

/// The VMM mapped 4 KiB pages: the 2 MiB ACCEPT gets a size mismatch and
/// falls back to 512 4 KiB ACCEPTs.
#[test]
fn size_mismatch_falls_back_to_smaller_pages() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            max_aug_level: 0,
            ..TdxConfig::default()
        },
    );
    to_shared_then_private(&td, 0, 2 * MIB);
    let calls = accept(&td, 0, 2 * MIB).unwrap();
    assert_eq!(calls.accepted, [512, 0, 0]);
    assert_eq!(calls.calls, 513);
    assert_eq!(accepts(&td)[0], (0, 1, 0xC000_0B0B_0000_0001));
}

/// 1 GiB requested, VMM mapped 2 MiB: two levels of fallback stop at 2 MiB.
#[test]
fn one_gib_falls_back_to_2m_where_the_vmm_mapped_2m() {
    let td = tdx(
        GIB,
        TdxConfig {
            max_aug_level: 1,
            ..TdxConfig::default()
        },
    );
    to_shared_then_private(&td, 0, GIB);
    let calls = accept(&td, 0, GIB).unwrap();
    assert_eq!(calls.accepted, [0, 512, 0]);
    assert_eq!(calls.calls, 1 + 512);
}

/// A 4 KiB ACCEPT inside a 2 MiB leaf the TD already accepted: the
/// Secure-EPT walk ends at the larger leaf, which the guest can use, so the
/// module says "already accepted" (with the leaf's level), not a size
/// mismatch, and changes nothing.
#[test]
fn four_k_inside_an_accepted_2m_leaf_is_already_accepted() {
    let td = tdx(4 * MIB, TdxConfig::default());
    to_shared_then_private(&td, 0, 2 * MIB);
    accept(&td, 0, 2 * MIB).unwrap();
    td.memory().fill(4096, 4096, 0x42);
    td.clear_events();
    // SAFETY: the model's memory is not used by Rust code.
    let err = unsafe { accept_page(&td, 4096, PageLevel::Size4K) }.unwrap_err();
    assert_eq!(
        err,
        AcceptError::AlreadyAccepted {
            gpa: 4096,
            level: PageLevel::Size4K
        }
    );
    assert_eq!(accepts(&td), vec![(4096, 0, 0x0000_0B0A_0000_0001)]);
    assert_eq!(td.page(4096).level, 1, "the leaf is not split");
    assert!(td.memory().is_filled(4096, 4096, 0x42));
}

/// A 4 KiB ACCEPT inside a pending 2 MiB leaf: the EPT violation makes the
/// VMM split the leaf, and only the one page is accepted; its 511
/// neighbours stay pending.
#[test]
fn four_k_inside_a_pending_2m_leaf_accepts_only_that_page() {
    let td = tdx(4 * MIB, TdxConfig::default());
    to_shared_then_private(&td, 0, 4 * MIB);
    assert_eq!(td.page(0).level, 1, "the VMM added the range as 2 MiB leaves");
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { accept_page(&td, 4096, PageLevel::Size4K) }.unwrap();
    let accepted: Vec<u64> = (0..2 * MIB)
        .step_by(4096)
        .filter(|&g| td.page(g).state == TdxPageState::Accepted)
        .collect();
    assert_eq!(accepted, vec![4096]);
    assert!((0..2 * MIB).step_by(4096).all(|g| td.page(g).level == 0));
    assert!(
        (2 * MIB..4 * MIB).step_by(4096).all(|g| td.page(g).level == 1),
        "the next leaf stays whole"
    );
}

/// A page shared and made private again inside a pending 1 GiB leaf is
/// its own 4 KiB entry; splitting the leaf around another page later must
/// not make it part of a 2 MiB one again, or a 2 MiB ACCEPT over it would
/// zero it when the module answers a size mismatch.
#[test]
fn a_split_keeps_pages_already_split_finer() {
    let td = tdx(2 * GIB, TdxConfig::default());
    to_shared_then_private(&td, GIB, GIB);
    let x = GIB + 4 * MIB + 4096;
    to_shared_then_private(&td, x, 4096);
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { accept_page(&td, x, PageLevel::Size4K) }.unwrap();
    td.memory().fill(x, 4096, 0x42);
    // SAFETY: as above.
    unsafe { accept_page(&td, GIB, PageLevel::Size4K) }.unwrap();
    assert_eq!(td.page(x).level, 0);
    assert!(accept(&td, GIB + 4 * MIB, 2 * MIB).is_err(), "x was accepted already");
    assert!(td.memory().is_filled(x, 4096, 0x42), "x's contents are kept");
}

/// A 4 KiB ACCEPT inside a pending 1 GiB leaf: the VMM splits down to the
/// one 2 MiB leaf holding the page, then that to 4 KiB; the other 2 MiB
/// leaves stay whole.
#[test]
fn four_k_inside_a_pending_1g_leaf_splits_only_the_2m_holding_it() {
    let td = tdx(2 * GIB, TdxConfig::default());
    to_shared_then_private(&td, GIB, GIB);
    assert_eq!(td.page(GIB).level, 2);
    let page = GIB + 2 * MIB + 4096;
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { accept_page(&td, page, PageLevel::Size4K) }.unwrap();
    assert_eq!(td.page(page).state, TdxPageState::Accepted);
    assert_eq!(td.page(page + 4096).state, TdxPageState::Pending);
    assert_eq!((td.page(page).level, td.page(GIB).level), (0, 1));
    // SAFETY: as above.
    unsafe { accept_page(&td, GIB, PageLevel::Size2M) }.unwrap();
}

/// "Already accepted" is reported, not taken as success, although its
/// status has bit 63 clear: the page still holds its old contents.
#[test]
fn already_accepted_is_reported_and_contents_untouched() {
    let td = tdx(4 * MIB, TdxConfig::default());
    td.memory().fill(0, 4096, 0x42);
    // SAFETY: the model's memory is not used by Rust code.
    let err = unsafe { accept_page(&td, 0, PageLevel::Size4K) }.unwrap_err();
    assert_eq!(
        err,
        AcceptError::AlreadyAccepted {
            gpa: 0,
            level: PageLevel::Size4K
        }
    );
    assert!(
        td.memory().is_filled(0, 4096, 0x42),
        "stale contents are never presented as fresh"
    );
}

/// A range in which one page was never converted (the VMM left it
/// accepted) fails at that page; the pages before it are accepted.
#[test]
fn already_accepted_inside_a_range_stops_there() {
    let td = tdx(
        4 * MIB,
        TdxConfig {
            max_aug_level: 0,
            ..TdxConfig::default()
        },
    );
    to_shared_then_private(&td, 0, 2 * 4096);
    to_shared_then_private(&td, 3 * 4096, 4096);
    let err = accept(&td, 0, 4 * 4096).unwrap_err();
    assert_eq!(
        err,
        AcceptError::AlreadyAccepted {
            gpa: 2 * 4096,
            level: PageLevel::Size4K
        }
    );
    assert_eq!(
        td.page(3 * 4096).state,
        TdxPageState::Pending,
        "nothing after the failure is touched"
    );
}

#[test]
fn busy_is_retried_within_the_bound() {
    let td = tdx(4 * MIB, TdxConfig::default());
    to_shared_then_private(&td, 0, 4096);
    td.set_busy_answers(BUSY_RETRY_LIMIT - 1);
    let calls = accept(&td, 0, 4096).unwrap();
    assert_eq!(calls.calls, BUSY_RETRY_LIMIT as u64);
}

#[test]
fn busy_forever_is_bounded() {
    let td = tdx(4 * MIB, TdxConfig::default());
    to_shared_then_private(&td, 0, 4096);
    td.set_busy_answers(u32::MAX);
    assert_eq!(accept(&td, 0, 4096), Err(AcceptError::Busy { gpa: 0 }));
    assert_eq!(accepts(&td).len(), BUSY_RETRY_LIMIT as usize);
    assert_eq!(td.page(0).state, TdxPageState::Pending, "nothing was accepted");
}

#[test]
fn accept_of_a_shared_page_fails() {
    let td = tdx(4 * MIB, TdxConfig::default());
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { map_gpa(&td, 0, 4096, Visibility::Shared, td.shared_mask()).unwrap() };
    assert_eq!(
        accept(&td, 0, 4096),
        Err(AcceptError::Tdx {
            gpa: 0,
            level: PageLevel::Size4K,
            error: TdxError::EptWalkFailed
        })
    );
    assert!(
        td.memory().is_filled(0, 4096, SCRIBBLE),
        "the shared page keeps what the host left"
    );
}

#[test]
fn malformed_ranges_send_nothing() {
    let td = tdx(4 * MIB, TdxConfig::default());
    for (start, len) in [(0, 0), (100, 4096), (0, 100), (!0xFFF, 8192)] {
        assert_eq!(accept(&td, start, len), Err(AcceptError::InvalidRange { start, len }));
    }
    // SAFETY: nothing is sent.
    let err = unsafe { accept_page(&td, 4096, PageLevel::Size2M) }.unwrap_err();
    assert_eq!(
        err,
        AcceptError::InvalidRange {
            start: 4096,
            len: 2 * MIB
        }
    );
    assert!(td.events().is_empty());
}

#[test]
fn shared_gpa_is_refused_by_the_module() {
    let td = tdx(4 * MIB, TdxConfig::default());
    // SAFETY: the model's memory is not used by Rust code.
    let err = unsafe { accept_page(&td, td.shared_mask(), PageLevel::Size4K) }.unwrap_err();
    assert!(
        matches!(
            err,
            AcceptError::Tdx {
                error: TdxError::OperandInvalid { operand: 1 },
                ..
            }
        ),
        "{err:?}"
    );
}

/// The full TDX conversion of a range, private -> shared -> private: the
/// private contents never survive, the new private pages come back zeroed.
#[test]
fn round_trip_private_shared_private() {
    let td = tdx(
        8 * MIB,
        TdxConfig {
            map_gpa_chunk_pages: Some(100),
            ..TdxConfig::default()
        },
    );
    let (start, len) = (2 * MIB, 4 * MIB);
    td.memory().fill(start, len, 0x5A);
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { map_gpa(&td, start, len, Visibility::Shared, td.shared_mask()).unwrap() };
    assert!(
        td.memory().is_filled(start, len, SCRIBBLE),
        "the host never sees private data in clear"
    );
    // SAFETY: as above.
    unsafe { map_gpa(&td, start, len, Visibility::Private, td.shared_mask()).unwrap() };
    let calls = accept(&td, start, len).unwrap();
    // The VMM converted 100 pages per call, so it could map no 2 MiB page.
    assert_eq!(calls.accepted, [len / 4096, 0, 0]);
    assert!(td.memory().is_filled(start, len, 0));
}
