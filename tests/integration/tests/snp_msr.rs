//! The GHCB MSR protocol against the model: negotiation, features,
//! registration, single-page PSC, termination, and lies about each.

use hvmock::{RmpEntry, SnpConfig, SnpHostile};
use integration::{boot_ghcb, ghcb_gpa, snp, MIB};
use snp_ghcb::msr_protocol::{MsrProtocolError, PscOp};
use snp_ghcb::protocol::{self, HvFeatures, ProtocolError};

#[test]
fn negotiate_reports_versions_and_c_bit() {
    let hv = snp(
        MIB,
        SnpConfig {
            c_bit: 47,
            ..SnpConfig::default()
        },
    );
    // SAFETY: no memory effect.
    let info = unsafe { protocol::negotiate(&hv) }.unwrap();
    assert_eq!((info.min_version, info.max_version, info.c_bit), (1, 2, 47));
}

#[test]
fn negotiate_refuses_a_hypervisor_without_version_2() {
    for (min, max) in [(1, 1), (3, 4)] {
        let hv = snp(
            MIB,
            SnpConfig {
                min_version: min,
                max_version: max,
                ..SnpConfig::default()
            },
        );
        // SAFETY: no memory effect.
        let err = unsafe { protocol::negotiate(&hv) }.unwrap_err();
        assert_eq!(err, ProtocolError::UnsupportedVersion { min, max });
    }
}

#[test]
fn negotiate_refuses_an_impossible_c_bit() {
    let hv = snp(
        MIB,
        SnpConfig {
            c_bit: 63,
            ..SnpConfig::default()
        },
    );
    // SAFETY: no memory effect.
    assert_eq!(unsafe { protocol::negotiate(&hv) }, Err(ProtocolError::BadCBit(63)));
}

#[test]
fn features_require_snp() {
    let hv = snp(
        MIB,
        SnpConfig {
            features: 0b11,
            ..SnpConfig::default()
        },
    );
    // SAFETY: no memory effect.
    let f = unsafe { protocol::hv_features(&hv) }.unwrap();
    assert_eq!(f, HvFeatures::SNP | HvFeatures::SNP_AP_CREATION);
    let hv = snp(
        MIB,
        SnpConfig {
            features: 0b10,
            ..SnpConfig::default()
        },
    );
    // SAFETY: no memory effect.
    let refused = unsafe { protocol::hv_features(&hv) };
    assert_eq!(refused, Err(ProtocolError::NoSnp(HvFeatures::SNP_AP_CREATION)));
}

#[test]
fn boot_sequence_shares_and_registers_the_ghcb() {
    let hv = snp(MIB, SnpConfig::default());
    let page = boot_ghcb(&hv);
    assert_eq!(hv.registered_ghcb(), Some(page.gpa()));
    assert_eq!(
        hv.rmp(page.gpa()),
        RmpEntry {
            assigned: false,
            validated: false,
            huge: false
        }
    );
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn registering_a_private_page_is_refused() {
    let hv = snp(MIB, SnpConfig::default());
    // SAFETY: no memory effect (the model refuses).
    let err = unsafe { protocol::register_ghcb(&hv, 0) }.unwrap_err();
    assert_eq!(
        err,
        ProtocolError::RegistrationMismatch {
            requested: 0,
            echoed: (1 << 52) - 1
        }
    );
}

#[test]
fn msr_psc_changes_one_page_each_way() {
    let hv = snp(MIB, SnpConfig::default());
    // SAFETY: the model's memory is not used by Rust code.
    unsafe {
        protocol::page_state_change(&hv, 5, PscOp::Shared).unwrap();
        assert!(!hv.rmp(5 * 4096).assigned);
        protocol::page_state_change(&hv, 5, PscOp::Private).unwrap();
    }
    assert_eq!(
        hv.rmp(5 * 4096),
        RmpEntry {
            assigned: true,
            validated: false,
            huge: false
        }
    );
    assert!(
        hv.rmp(4 * 4096).validated && hv.rmp(6 * 4096).validated,
        "neighbours untouched"
    );
}

#[test]
fn msr_psc_error_from_an_honest_hypervisor_is_typed() {
    let hv = snp(MIB, SnpConfig::default());
    // SAFETY: nothing changes (out of range).
    let err = unsafe { protocol::page_state_change(&hv, 1 << 20, PscOp::Shared) }.unwrap_err();
    assert_eq!(err, ProtocolError::PageStateChange { gfn: 1 << 20, error: 1 });
}

#[test]
fn terminate_reaches_the_hypervisor() {
    let hv = snp(MIB, SnpConfig::default());
    // SAFETY: the model records the request.
    unsafe {
        protocol::terminate(
            &hv,
            protocol::reason::SET_GENERAL,
            protocol::reason::PROTOCOL_UNSUPPORTED,
        )
    };
    assert_eq!(hv.terminated(), Some((0, 1)));
}

// ---- hostile hypervisors -------------------------------------------------

#[test]
fn hostile_wrong_response_code_is_rejected_everywhere() {
    let hv = snp(MIB, SnpConfig::default());
    hv.set_hostile(Some(SnpHostile::MsrWrongCode));
    // SAFETY: the model's memory is not used by Rust code.
    unsafe {
        assert!(matches!(
            protocol::negotiate(&hv),
            Err(ProtocolError::Msr(MsrProtocolError::WrongCode { expected: 1, .. }))
        ));
        assert!(matches!(
            protocol::hv_features(&hv),
            Err(ProtocolError::Msr(MsrProtocolError::WrongCode { expected: 0x81, .. }))
        ));
        assert!(matches!(
            protocol::page_state_change(&hv, 1, PscOp::Shared),
            Err(ProtocolError::Msr(MsrProtocolError::WrongCode { expected: 0x15, .. }))
        ));
        assert!(matches!(
            protocol::register_ghcb(&hv, ghcb_gpa(&hv)),
            Err(ProtocolError::Msr(MsrProtocolError::WrongCode { expected: 0x13, .. }))
        ));
    }
}

#[test]
fn hostile_reserved_bits_are_rejected() {
    let hv = snp(MIB, SnpConfig::default());
    hv.set_hostile(Some(SnpHostile::MsrReservedBits));
    // SAFETY: as above.
    unsafe {
        assert!(matches!(
            protocol::negotiate(&hv),
            Err(ProtocolError::Msr(MsrProtocolError::ReservedBits { .. }))
        ));
        assert!(matches!(
            protocol::page_state_change(&hv, 1, PscOp::Shared),
            Err(ProtocolError::Msr(MsrProtocolError::ReservedBits { .. }))
        ));
    }
}

#[test]
fn hostile_wrong_echoed_gfn_is_rejected() {
    let hv = snp(MIB, SnpConfig::default());
    let gpa = ghcb_gpa(&hv);
    // SAFETY: as above.
    unsafe { protocol::page_state_change(&hv, gpa >> 12, PscOp::Shared).unwrap() };
    hv.set_hostile(Some(SnpHostile::MsrWrongGfn));
    // SAFETY: as above.
    let err = unsafe { protocol::register_ghcb(&hv, gpa) }.unwrap_err();
    assert_eq!(
        err,
        ProtocolError::RegistrationMismatch {
            requested: gpa >> 12,
            echoed: (gpa >> 12) + 1
        }
    );
}

#[test]
fn hostile_psc_error_code_is_reported() {
    let hv = snp(MIB, SnpConfig::default());
    hv.set_hostile(Some(SnpHostile::MsrPscError));
    // SAFETY: as above.
    let err = unsafe { protocol::page_state_change(&hv, 3, PscOp::Shared) }.unwrap_err();
    assert_eq!(err, ProtocolError::PageStateChange { gfn: 3, error: 1 });
    assert!(hv.rmp(3 * 4096).assigned);
}

/// The hypervisor claims a page went private but left it shared: PVALIDATE
/// (which the guest must do before use) refuses the page.
#[test]
fn hostile_msr_psc_without_rmp_change_is_caught_by_pvalidate() {
    let hv = snp(MIB, SnpConfig::default());
    let (gpa, va) = (3 * 4096, integration::va(&hv, 3 * 4096));
    // SAFETY: as above.
    unsafe {
        snp_ghcb::pvalidate::pvalidate(&hv, va, snp_ghcb::PageSize::Size4K, false).unwrap();
        protocol::page_state_change(&hv, gpa >> 12, PscOp::Shared).unwrap();
    }
    hv.set_hostile(Some(SnpHostile::MsrPscWithoutRmpChange));
    // SAFETY: as above.
    unsafe { protocol::page_state_change(&hv, gpa >> 12, PscOp::Private) }.unwrap();
    // SAFETY: as above.
    let err = unsafe { snp_ghcb::pvalidate::pvalidate(&hv, va, snp_ghcb::PageSize::Size4K, true) }.unwrap_err();
    assert_eq!(err, snp_ghcb::pvalidate::PvalidateError::FailInput);
    assert!(!hv.rmp(gpa).validated);
}
