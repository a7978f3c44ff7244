//! TDG.VP.INFO, TDG.VP.VEINFO.GET and ReportFatalError against the model.

use hvmock::TdxConfig;
use integration::{tdx, MIB};
use tdcall::{report_fatal_error, ve_info, vp_info, InfoError, TdAttributes, TdxError, VeInfo};

#[test]
fn vp_info_decodes_gpaw_shared_bit_and_attributes() {
    for (gpaw, bit) in [(48u8, 47), (52, 51)] {
        let attrs = (1 << 28) | (1 << 0) | (1 << 40);
        let td = tdx(
            MIB,
            TdxConfig {
                gpaw,
                attributes: attrs,
                ..TdxConfig::default()
            },
        );
        let info = vp_info(&td).unwrap();
        assert_eq!(info.gpaw, gpaw);
        assert_eq!(info.shared_mask(), 1 << bit);
        assert!(info
            .attributes
            .contains(TdAttributes::SEPT_VE_DISABLE | TdAttributes::DEBUG));
        assert!(!info.attributes.contains(TdAttributes::PKS));
        assert_eq!(info.attributes.bits(), attrs, "unknown bits are kept");
        assert_eq!((info.num_vcpus, info.max_vcpus, info.vcpu_index), (1, 1, 0));
    }
}

#[test]
fn vp_info_rejects_a_gpaw_tdx_does_not_define() {
    let td = tdx(
        MIB,
        TdxConfig {
            gpaw: 40,
            ..TdxConfig::default()
        },
    );
    assert_eq!(vp_info(&td), Err(InfoError::UnsupportedGpaw(40)));
}

#[test]
fn ve_info_decodes_every_field() {
    let td = tdx(MIB, TdxConfig::default());
    td.inject_ve([48, 0x181, 0xFFFF_8000_0000_1FFC, 0x1000, 3 | (0x55 << 32)]);
    assert_eq!(
        ve_info(&td),
        Ok(VeInfo {
            exit_reason: VeInfo::EXIT_REASON_EPT_VIOLATION,
            exit_qualification: 0x181,
            gla: 0xFFFF_8000_0000_1FFC,
            gpa: 0x1000,
            instruction_length: 3,
            instruction_info: 0x55,
        })
    );
    assert_eq!(
        ve_info(&td),
        Err(TdxError::NoValidVeInfo),
        "the module keeps one #VE only"
    );
}

#[test]
fn report_fatal_error_reaches_the_vmm() {
    let td = tdx(MIB, TdxConfig::default());
    assert_eq!(report_fatal_error(&td, 0x1234), Ok(()));
    assert_eq!(td.fatal_error(), Some(0x1234));
}
