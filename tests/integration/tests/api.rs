//! The public API's promises beyond the transaction: platform backends
//! built symmetrically from their discovery calls (with the host lying in
//! them), errors that explain themselves down to the host's answer, the
//! per-CPU GHCB set up and installed in one call, frames the firmware left
//! shared recorded without touching raw state bytes.

use std::error::Error;

use coco_convert::platform::snp::{GhcbProvider, GhcbSlot, NoGhcb, PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::platform::{PlatformError, SetupError};
use coco_convert::{ConvertError, GhcbSetupError, PageState, RecordError, StateTable, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig, TdxHostile};
use integration::sim::current_cpu;
use integration::world::{Shape, SnpWorld, TdxWorld};
use integration::{snp, tdx, GIB, MIB};
use snp_ghcb::protocol::ProtocolError;
use tdcall::{InfoError, MapGpaError};

const PAGE: u64 = 4096;

#[test]
fn tdx_from_vp_info_takes_the_shared_bit_from_the_gpa_width() {
    for (gpaw, bit) in [(48, 47), (52, 51)] {
        let model = tdx(
            GIB,
            TdxConfig {
                gpaw,
                ..TdxConfig::default()
            },
        );
        let platform = Tdx::from_vp_info(&model).unwrap();
        use coco_convert::Platform;
        assert_eq!(platform.encryption().mask(), 1 << bit, "GPAW {gpaw}");
    }
}

#[test]
fn tdx_setup_refuses_a_gpa_width_or_mask_tdx_does_not_define() {
    let model = tdx(
        GIB,
        TdxConfig {
            gpaw: 50,
            ..TdxConfig::default()
        },
    );
    assert_eq!(
        Tdx::from_vp_info(&model).unwrap_err(),
        SetupError::VpInfo(InfoError::UnsupportedGpaw(50))
    );
    for mask in [0, 3 << 47, 1 << 12, 1 << 52, 1 << 63] {
        assert_eq!(Tdx::new(&model, mask).unwrap_err(), SetupError::InvalidSharedMask(mask));
    }
}

#[test]
fn snp_negotiate_takes_the_c_bit_from_the_hypervisor() {
    for c_bit in [47, 51] {
        let model = snp(
            GIB,
            SnpConfig {
                c_bit,
                ..SnpConfig::default()
            },
        );
        // SAFETY: the model stands in for the hypervisor.
        let platform = unsafe { Snp::negotiate(&model, &model, NoGhcb) }.unwrap();
        use coco_convert::Platform;
        assert_eq!(platform.encryption().mask(), 1 << c_bit);
        assert_eq!(platform.encryption().set_means(), Visibility::Private);
    }
}

/// A hypervisor that offers no SEV-SNP, another protocol version, or a
/// C-bit no page table can hold gets no backend.
#[test]
fn snp_negotiate_refuses_what_a_lying_hypervisor_reports() {
    let cases = [
        (
            SnpConfig {
                features: 0,
                ..SnpConfig::default()
            },
            "no SNP",
        ),
        (
            SnpConfig {
                min_version: 3,
                max_version: 3,
                ..SnpConfig::default()
            },
            "version",
        ),
        (
            SnpConfig {
                c_bit: 60,
                ..SnpConfig::default()
            },
            "C-bit",
        ),
    ];
    for (config, case) in cases {
        let model = snp(GIB, config);
        // SAFETY: the model stands in for the hypervisor.
        let err = unsafe { Snp::negotiate(&model, &model, NoGhcb) }.unwrap_err();
        assert!(matches!(err, SetupError::Negotiation(_)), "{case}: {err:?}");
        assert!(err.source().is_some(), "{case}");
    }
    let model = snp(GIB, SnpConfig::default());
    assert_eq!(
        Snp::new(&model, &model, NoGhcb, 20).unwrap_err(),
        SetupError::InvalidCBit(20)
    );
}

/// The message of a failed conversion names the host's lie, and the error
/// chain leads to it.
#[test]
fn a_platform_failure_explains_itself_down_to_the_host_answer() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    let err = e
        .convert(
            Target::Physical {
                pa: 64 * MIB,
                len: PAGE,
            },
            Visibility::Shared,
        )
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("RETRY") && text.contains("poisoned"), "{text}");
    let platform = err.source().expect("a platform error");
    let map_gpa = platform.source().expect("the MapGPA error");
    assert!(map_gpa.downcast_ref::<MapGpaError>().is_some(), "{map_gpa:?}");
    assert!(matches!(
        err,
        ConvertError::Platform {
            error: PlatformError::MapGpa(MapGpaError::NoProgress { .. }),
            ..
        }
    ));
}

/// Every error type the crates export formats a message that is not its
/// Debug form.
#[test]
fn every_error_displays_a_sentence() {
    let errors: Vec<Box<dyn Error>> = vec![
        Box::new(ConvertError::NoScratchWindow),
        Box::new(SetupError::InvalidCBit(3)),
        Box::new(GhcbSetupError::NoSlot),
        Box::new(RecordError::Uncovered { pa: 0 }),
        Box::new(coco_convert::AliasError::Full),
        Box::new(InfoError::UnsupportedGpaw(3)),
        Box::new(tdcall::AcceptError::Busy { gpa: 0 }),
        Box::new(tdcall::TdxError::EptWalkFailed),
        Box::new(tdcall::VmcallError::Status(tdcall::VmcallStatus::GpaInUse)),
        Box::new(MapGpaError::InvalidSharedMask(3)),
        Box::new(ProtocolError::BadCBit(3)),
        Box::new(snp_ghcb::NaeError::Unexpected { info1: 2 }),
        Box::new(snp_ghcb::psc::PscError::InvalidRange),
        Box::new(snp_ghcb::pvalidate::PvalidateError::NoUpdate),
        Box::new(snp_ghcb::msr_protocol::MsrProtocolError::ReservedBits { response: 1 }),
    ];
    for e in errors {
        let text = e.to_string();
        assert!(text.contains(' ') && text != format!("{e:?}"), "{text}");
    }
}

/// One call per CPU: the page goes shared through the MSR protocol, is
/// registered, and the CPU's later conversions use it.
#[test]
fn setup_ghcb_installs_the_page_for_the_calling_cpu() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pa = 1536 * MIB;
    let ptr = std::ptr::NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
    // SAFETY: the page is used by nothing else.
    unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.unwrap();
    assert_eq!(e.state(pa), Some(PageState::Shared));
    let before = e.counters();
    e.convert(
        Target::Physical {
            pa: 64 * MIB,
            len: PAGE,
        },
        Visibility::Shared,
    )
    .unwrap();
    let used = e.counters().since(&before);
    assert_eq!((used.psc_exits, used.psc_msr), (1, 0), "{used:?}");
}

/// Without a slot for this CPU the setup refuses before converting
/// anything: the page stays private.
#[test]
fn setup_ghcb_without_a_slot_changes_nothing() {
    fn check(ghcbs: impl GhcbProvider) {
        let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
        let platform = Snp::new(&w.snp, &w.snp, ghcbs, 51).unwrap();
        let e = w.m.engine(platform).with_window(&w.m.windows);
        let pa = 1536 * MIB;
        let ptr = std::ptr::NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
        // SAFETY: the page is used by nothing else.
        let err = unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.unwrap_err();
        assert_eq!(err, GhcbSetupError::NoSlot);
        assert_eq!(e.state(pa), Some(PageState::Private));
        assert_eq!(w.host_side(pa), Some(Visibility::Private));
    }
    let no_slots: &[GhcbSlot] = &[];
    check(PerCpuGhcbs::new(no_slots, current_cpu));
    check(NoGhcb);
}

/// A frame the firmware left shared, recorded as such, converts back to
/// private; without the record the engine would refuse it as "already
/// private".
#[test]
fn a_frame_recorded_shared_converts_back_to_private() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let pa = 64 * MIB;
    // The firmware's doing: the host side shared, before the engine runs.
    // SAFETY: the model stands in for the VMM.
    unsafe { tdcall::map_gpa(&w.tdx, pa, 2 * PAGE, Visibility::Shared, w.tdx.shared_mask()) }.unwrap();
    StateTable::new(0, &w.m.states).record_shared(pa, 2 * PAGE).unwrap();
    let e = w.engine();
    assert_eq!(e.state(pa + PAGE), Some(PageState::Shared));
    assert_eq!(e.census().shared, 2);
    e.convert(Target::Physical { pa, len: 2 * PAGE }, Visibility::Private)
        .unwrap();
    for frame in [pa, pa + PAGE] {
        assert_eq!(e.state(frame), Some(PageState::Private));
        assert_eq!(w.host_side(frame), Some(Visibility::Private));
    }
    assert_eq!(
        StateTable::new(0, &w.m.states).record_shared(pa, 2 * GIB + PAGE),
        Err(RecordError::Uncovered { pa: 2 * GIB })
    );
}
