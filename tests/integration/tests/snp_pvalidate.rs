//! PVALIDATE against the model's RMP.

use hvmock::{MockSnp, SnpConfig};
use integration::{boot_ghcb, snp, va, MIB};
use snp_ghcb::msr_protocol::PscOp;
use snp_ghcb::psc::change_page_state;
use snp_ghcb::pvalidate::{pvalidate, pvalidate_range, PvalidateError, PvalidateRangeError};
use snp_ghcb::PageSize;

/// Makes `[gpa, gpa+len)` private-but-unvalidated the honest way: rescind,
/// PSC shared, PSC private (2 MiB entries where `huge`).
fn fresh_private(hv: &MockSnp, gpa: u64, len: u64, huge: bool) {
    let mut ghcb = boot_ghcb(hv);
    // SAFETY: the model's memory is not used by Rust code.
    unsafe {
        pvalidate_range(hv, va(hv, gpa), len, false, true).unwrap();
        change_page_state(&mut ghcb, hv, gpa, len, PscOp::Shared, huge).unwrap();
        change_page_state(&mut ghcb, hv, gpa, len, PscOp::Private, huge).unwrap();
    }
}

#[test]
fn validate_2m_where_the_rmp_has_a_2m_entry() {
    let hv = snp(8 * MIB, SnpConfig::default());
    fresh_private(&hv, 2 * MIB, 4 * MIB, true);
    // SAFETY: as above.
    let calls = unsafe { pvalidate_range(&hv, va(&hv, 2 * MIB), 4 * MIB, true, true) }.unwrap();
    assert_eq!((calls.pages_2m, calls.pages_4k, calls.calls), (2, 0, 2));
    assert!((2 * MIB..6 * MIB).step_by(4096).all(|g| hv.rmp(g).validated));
}

#[test]
fn size_mismatch_falls_back_to_4k() {
    let hv = snp(8 * MIB, SnpConfig::default());
    fresh_private(&hv, 2 * MIB, 2 * MIB, false);
    // SAFETY: as above.
    let calls = unsafe { pvalidate_range(&hv, va(&hv, 2 * MIB), 2 * MIB, true, true) }.unwrap();
    assert_eq!((calls.pages_2m, calls.pages_4k, calls.calls), (0, 512, 513));
}

#[test]
fn four_k_inside_a_2m_entry_is_a_size_mismatch() {
    let hv = snp(8 * MIB, SnpConfig::default());
    fresh_private(&hv, 2 * MIB, 2 * MIB, true);
    // SAFETY: as above.
    let err = unsafe { pvalidate(&hv, va(&hv, 2 * MIB + 4096), PageSize::Size4K, true) }.unwrap_err();
    assert_eq!(err, PvalidateError::SizeMismatch);
}

/// One page validated on its own is evicted too; rescinding evicts
/// nothing.
#[test]
fn a_single_validated_page_is_evicted() {
    let hv = snp(8 * MIB, SnpConfig::default());
    fresh_private(&hv, 2 * MIB, 2 * MIB, false);
    let before = hv.stats().evictions;
    // SAFETY: as above.
    unsafe { pvalidate(&hv, va(&hv, 2 * MIB + 4096), PageSize::Size4K, true) }.unwrap();
    assert_eq!(hv.stats().evictions - before, 1);
    assert!(!hv.unevicted().contains(&(2 * MIB + 4096)), "{:x?}", hv.unevicted());
    // SAFETY: as above.
    unsafe { pvalidate(&hv, va(&hv, 2 * MIB + 4096), PageSize::Size4K, false) }.unwrap();
    assert_eq!(hv.stats().evictions - before, 1, "rescinding evicts nothing");
}

/// Validating an already-valid page leaves the RMP unchanged (CF=1): the
/// guest reports it; it never takes the page as freshly validated.
#[test]
fn no_update_is_an_error() {
    let hv = snp(MIB, SnpConfig::default());
    // SAFETY: as above.
    let err = unsafe { pvalidate(&hv, va(&hv, 0), PageSize::Size4K, true) }.unwrap_err();
    assert_eq!(err, PvalidateError::NoUpdate);
    // SAFETY: as above.
    let err = unsafe { pvalidate_range(&hv, va(&hv, 0), 3 * 4096, true, true) }.unwrap_err();
    assert_eq!(
        err,
        PvalidateRangeError::Page {
            va: va(&hv, 0),
            size: PageSize::Size4K,
            error: PvalidateError::NoUpdate
        }
    );
}

#[test]
fn validate_of_a_shared_page_fails() {
    let hv = snp(MIB, SnpConfig::default());
    let mut ghcb = boot_ghcb(&hv);
    // SAFETY: as above.
    unsafe {
        pvalidate(&hv, va(&hv, 0), PageSize::Size4K, false).unwrap();
        change_page_state(&mut ghcb, &hv, 0, 4096, PscOp::Shared, false).unwrap();
        assert_eq!(
            pvalidate(&hv, va(&hv, 0), PageSize::Size4K, true),
            Err(PvalidateError::FailInput)
        );
    }
}

#[test]
fn bad_input_is_typed() {
    let hv = snp(4 * MIB, SnpConfig::default());
    // SAFETY: the model rejects these without changes.
    unsafe {
        assert_eq!(
            pvalidate(&hv, va(&hv, 4096), PageSize::Size2M, true),
            Err(PvalidateError::FailInput)
        );
        assert_eq!(
            pvalidate(&hv, 0x1000, PageSize::Size4K, true),
            Err(PvalidateError::FailInput)
        );
        assert_eq!(
            pvalidate_range(&hv, va(&hv, 0), 0, true, true),
            Err(PvalidateRangeError::InvalidRange { va: va(&hv, 0), len: 0 })
        );
    }
    assert_eq!(hv.stats().pvalidates, 2);
}

#[test]
fn decode_maps_every_code() {
    use snp_ghcb::pvalidate::decode;
    use snp_ghcb::RawPvalidate;
    assert_eq!(decode(RawPvalidate { eax: 0, carry: false }), Ok(()));
    assert_eq!(
        decode(RawPvalidate { eax: 0, carry: true }),
        Err(PvalidateError::NoUpdate)
    );
    assert_eq!(
        decode(RawPvalidate { eax: 1, carry: false }),
        Err(PvalidateError::FailInput)
    );
    assert_eq!(
        decode(RawPvalidate { eax: 6, carry: false }),
        Err(PvalidateError::SizeMismatch)
    );
    assert_eq!(
        decode(RawPvalidate { eax: 9, carry: false }),
        Err(PvalidateError::Other(9))
    );
}
