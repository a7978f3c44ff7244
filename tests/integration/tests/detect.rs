//! Platform detection against CPUs that answer as a TD, an SNP guest, an
//! ordinary VM, and hosts that lie.

use coco_convert::platform::detect::{
    detect, sev_status, snp_c_bit, DetectError, Detected, SEV_CPUID_LEAF, SEV_STATUS_MSR, TDX_CPUID_LEAF,
};
use integration::fake_cpu::FakeCpu;
use proptest::prelude::*;

fn word(s: &[u8]) -> u32 {
    u32::from_le_bytes(s.try_into().unwrap())
}

/// CPUID leaf 0x21 with `signature` in EBX, EDX, ECX, and a max basic
/// leaf of `max`.
fn td(max: u32, signature: &[u8; 12]) -> FakeCpu {
    let mut cpu = FakeCpu::default();
    cpu.cpuid.insert((0, 0), [max, 0, 0, 0]);
    cpu.cpuid.insert(
        (TDX_CPUID_LEAF, 0),
        [0, word(&signature[..4]), word(&signature[8..]), word(&signature[4..8])],
    );
    cpu
}

/// An AMD CPU with SEV in CPUID (C-bit `c_bit`), and SEV_STATUS `status`
/// (absent: `None`).
fn amd(c_bit: u32, status: Option<u64>) -> FakeCpu {
    let mut cpu = FakeCpu::default();
    cpu.cpuid.insert((0, 0), [0x10, 0, 0, 0]);
    cpu.cpuid.insert((0x8000_0000, 0), [SEV_CPUID_LEAF, 0, 0, 0]);
    cpu.cpuid.insert((SEV_CPUID_LEAF, 0), [0b11, c_bit, 0, 0]);
    if let Some(status) = status {
        cpu.msrs.insert(SEV_STATUS_MSR, status);
    }
    cpu
}

const SNP: u64 = sev_status::SEV | sev_status::SEV_ES | sev_status::SNP;

#[test]
fn a_td_is_found_by_its_signature_and_no_msr_is_read() {
    let mut cpu = td(0x23, b"IntelTDX    ");
    // A VMM answering RDMSR for the TD would claim SNP: never asked.
    cpu.msrs.insert(SEV_STATUS_MSR, SNP);
    cpu.cpuid.insert((0x8000_0000, 0), [SEV_CPUID_LEAF, 0, 0, 0]);
    cpu.cpuid.insert((SEV_CPUID_LEAF, 0), [0b11, 51, 0, 0]);
    assert_eq!(detect(&cpu), Ok(Detected::Tdx));
    assert!(cpu.msr_reads.borrow().is_empty(), "a TD must read no MSR to find out");
}

#[test]
fn a_signature_in_the_wrong_register_order_or_beyond_the_max_leaf_is_not_tdx() {
    // EBX, ECX, EDX instead of EBX, EDX, ECX.
    let mut swapped = td(0x21, b"IntelTDX    ");
    let [a, b, c, d] = swapped.cpuid[&(TDX_CPUID_LEAF, 0)];
    swapped.cpuid.insert((TDX_CPUID_LEAF, 0), [a, b, d, c]);
    assert_eq!(detect(&swapped), Ok(Detected::Neither));
    // Leaf 0x21 answered, but the max basic leaf says it does not exist.
    assert_eq!(detect(&td(0x20, b"IntelTDX    ")), Ok(Detected::Neither));
    assert_eq!(detect(&td(0x21, b"IntelTDX   \0")), Ok(Detected::Neither));
    assert_eq!(detect(&td(0x21, b"IntelTDX    ")), Ok(Detected::Tdx));
}

#[test]
fn an_snp_guest_is_found_by_sev_status() {
    let cpu = amd(51, Some(SNP | (1 << 16)));
    assert_eq!(
        detect(&cpu),
        Ok(Detected::Snp {
            sev_status: SNP | (1 << 16)
        })
    );
    assert_eq!(*cpu.msr_reads.borrow(), vec![SEV_STATUS_MSR]);
}

#[test]
fn a_cpu_without_sev_in_cpuid_is_neither_only_if_sev_status_faults() {
    // CPUID denies SEV, and the MSR faults: neither.
    let mut cpu = amd(51, None);
    cpu.cpuid.insert((SEV_CPUID_LEAF, 0), [0b01, 51, 0, 0]);
    assert_eq!(detect(&cpu), Ok(Detected::Neither));
    assert_eq!(*cpu.msr_reads.borrow(), [SEV_STATUS_MSR]);
    assert_eq!(detect(&FakeCpu::default()), Ok(Detected::Neither));
    // CPUID denies SEV (the hypervisor answers it in an SNP guest), but
    // the hardware's SEV_STATUS says SNP: SNP.
    let mut short = amd(51, Some(SNP));
    short.cpuid.insert((0x8000_0000, 0), [SEV_CPUID_LEAF - 1, 0, 0, 0]);
    assert_eq!(detect(&short), Ok(Detected::Snp { sev_status: SNP }));
}

#[test]
fn sev_status_decides_and_anything_short_of_snp_is_refused() {
    assert_eq!(detect(&amd(51, Some(0))), Ok(Detected::Neither));
    for status in [sev_status::SEV, sev_status::SEV | sev_status::SEV_ES] {
        assert_eq!(
            detect(&amd(51, Some(status))),
            Err(DetectError::SevWithoutSnp { sev_status: status })
        );
    }
    for status in [
        sev_status::SNP,
        sev_status::SNP | sev_status::SEV,
        sev_status::SNP | sev_status::SEV_ES,
    ] {
        assert_eq!(
            detect(&amd(51, Some(status))),
            Err(DetectError::InconsistentSevStatus { sev_status: status })
        );
    }
    assert_eq!(detect(&amd(51, None)), Err(DetectError::SevStatusUnreadable));
}

#[test]
fn the_c_bit_must_agree_between_cpuid_and_the_msr_protocol_and_be_a_physical_address_bit() {
    assert_eq!(snp_c_bit(&amd(51, Some(SNP)), 51), Ok(51));
    assert_eq!(snp_c_bit(&amd(47, Some(SNP)), 47), Ok(47));
    assert_eq!(
        snp_c_bit(&amd(51, Some(SNP)), 47),
        Err(DetectError::CBitMismatch {
            cpuid: 51,
            msr_protocol: 47
        })
    );
    assert_eq!(snp_c_bit(&amd(52, Some(SNP)), 52), Err(DetectError::CBitOutOfRange(52)));
    assert_eq!(snp_c_bit(&amd(31, Some(SNP)), 31), Err(DetectError::CBitOutOfRange(31)));
    // EBX[5:0] only: the reserved-bits position above it is not the C-bit.
    assert_eq!(snp_c_bit(&amd(51 | (1 << 6), Some(SNP)), 51), Ok(51));
    let mut no_sev = amd(51, Some(SNP));
    no_sev.cpuid.insert((SEV_CPUID_LEAF, 0), [0, 51, 0, 0]);
    assert_eq!(snp_c_bit(&no_sev, 51), Err(DetectError::NoSevLeaf));
}

proptest! {
    /// Whatever CPUID and the MSR answer: no panic; TDX only with the
    /// signature and then no MSR read; SNP only with all three SEV_STATUS
    /// bits.
    #[test]
    fn any_answers_give_a_consistent_verdict(
        max in prop_oneof![Just(0x21u32), any::<u32>()],
        leaf21 in prop_oneof![Just([0, word(b"Inte"), word(b"    "), word(b"lTDX")]), any::<[u32; 4]>()],
        max_ext in prop_oneof![Just(SEV_CPUID_LEAF), any::<u32>()],
        sev_leaf in any::<[u32; 4]>(),
        status in prop::option::of(prop_oneof![Just(SNP), any::<u64>()]),
    ) {
        let mut cpu = FakeCpu::default();
        cpu.cpuid.insert((0, 0), [max, 0, 0, 0]);
        cpu.cpuid.insert((TDX_CPUID_LEAF, 0), leaf21);
        cpu.cpuid.insert((0x8000_0000, 0), [max_ext, 0, 0, 0]);
        cpu.cpuid.insert((SEV_CPUID_LEAF, 0), sev_leaf);
        if let Some(s) = status {
            cpu.msrs.insert(SEV_STATUS_MSR, s);
        }
        let signed = max >= 0x21 && leaf21[1..] == [word(b"Inte"), word(b"    "), word(b"lTDX")];
        match detect(&cpu) {
            Ok(Detected::Tdx) => {
                prop_assert!(signed);
                prop_assert!(cpu.msr_reads.borrow().is_empty());
            }
            Ok(Detected::Snp { sev_status }) => {
                prop_assert!(!signed);
                prop_assert_eq!(sev_status & SNP, SNP);
                prop_assert_eq!(Some(sev_status), status);
            }
            Ok(Detected::Neither) => prop_assert!(!signed),
            Err(_) => prop_assert!(!signed && status.is_none_or(|s| s & SNP != SNP)),
        }
    }
}
