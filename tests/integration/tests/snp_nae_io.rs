//! Port I/O, CPUID and MSR accesses through a real GHCB page in guest
//! memory, against the model's devices and tables: what reaches the
//! hypervisor, what comes back, and every lie about the answer.

use hvmock::emulation::{COM1, DEBUG_EXIT};
use hvmock::snp::nae::{GHCB_ERR_INVALID_INPUT, GHCB_ERR_MISSING_INPUT, INJECT_GP, IOIO_EXIT, MSR_EXIT};
use hvmock::{GhcbReg, MockSnp, SnpConfig, SnpHostile};
use integration::{boot_ghcb, snp, MIB};
use snp_ghcb::cpuid::{cpuid, CpuidResult, CPUID_EXIT_CODE};
use snp_ghcb::ioio::{exit_info, port_in, port_out, AddressSize, IOIO_EXIT_CODE};
use snp_ghcb::msr::{rdmsr, wrmsr, MSR_EXIT_CODE};
use snp_ghcb::{EventError, Exception, Field, GhcbPage, IoSize, NaeError, PortAccess};

/// COM1's line status register: "transmitter empty", nothing received.
const COM1_LSR: u16 = COM1 + 5;
/// KVM's wall-clock MSR, which the model's VMM emulates.
const KVM_WALL_CLOCK: u32 = 0x4B56_4D00;
/// EVENTINJ: valid, exception, vector 6.
const INJECT_UD: u64 = 1 << 31 | 3 << 8 | 6;

fn guest() -> (MockSnp, GhcbPage) {
    let hv = snp(MIB, SnpConfig::default());
    let ghcb = boot_ghcb(&hv);
    (hv, ghcb)
}

fn inb(hv: &MockSnp, ghcb: &mut GhcbPage, port: u16, size: IoSize) -> Result<u32, EventError> {
    // SAFETY: the model's memory is not used by Rust code.
    unsafe { port_in(ghcb, hv, PortAccess::new(port, size)) }
}

fn outb(hv: &MockSnp, ghcb: &mut GhcbPage, port: u16, size: IoSize, value: u32) -> Result<(), EventError> {
    // SAFETY: as above.
    unsafe { port_out(ghcb, hv, PortAccess::new(port, size), value) }
}

fn cpuid_of(hv: &MockSnp, ghcb: &mut GhcbPage, leaf: u32, subleaf: u32, xcr0: u64) -> Result<CpuidResult, EventError> {
    // SAFETY: as above.
    unsafe { cpuid(ghcb, hv, leaf, subleaf, xcr0) }
}

fn read_msr(hv: &MockSnp, ghcb: &mut GhcbPage, msr: u32) -> Result<u64, EventError> {
    // SAFETY: as above.
    unsafe { rdmsr(ghcb, hv, msr) }
}

fn write_msr(hv: &MockSnp, ghcb: &mut GhcbPage, msr: u32, value: u64) -> Result<(), EventError> {
    // SAFETY: as above.
    unsafe { wrmsr(ghcb, hv, msr, value) }
}

#[test]
fn the_exit_codes_are_the_svm_ones() {
    assert_eq!((CPUID_EXIT_CODE, IOIO_EXIT_CODE, MSR_EXIT_CODE), (0x72, 0x7B, 0x7C));
    assert_eq!((IOIO_EXIT, MSR_EXIT), (IOIO_EXIT_CODE, MSR_EXIT_CODE));
}

#[test]
fn out_to_com1_reaches_the_console() {
    let (hv, mut ghcb) = guest();
    for &b in b"hi\n" {
        outb(&hv, &mut ghcb, COM1, IoSize::Byte, b as u32).unwrap();
    }
    assert_eq!(hv.console(), b"hi\n");
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(sent.exit_code, 0x7B);
    // PORT 0x3F8, A64, SZ8, TYPE 0 (OUT), as the model decodes it.
    assert_eq!(sent.info1, 0x3F8 << 16 | 1 << 9 | 1 << 4);
    assert_eq!(sent.rax, Some(b'\n' as u64));
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn in_reads_the_models_ports() {
    let (hv, mut ghcb) = guest();
    assert_eq!(inb(&hv, &mut ghcb, COM1_LSR, IoSize::Byte), Ok(0x60));
    assert_eq!(inb(&hv, &mut ghcb, COM1, IoSize::Byte), Ok(0));
    // Nothing behind port 0x80: all ones, as wide as the access.
    assert_eq!(inb(&hv, &mut ghcb, 0x80, IoSize::Byte), Ok(0xFF));
    assert_eq!(inb(&hv, &mut ghcb, 0x80, IoSize::Word), Ok(0xFFFF));
    assert_eq!(inb(&hv, &mut ghcb, 0x80, IoSize::Dword), Ok(0xFFFF_FFFF));
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(sent.info1, 0x80 << 16 | 1 << 9 | 1 << 6 | 1, "TYPE 1 (IN), SZ32, A64");
    // An IN sends no RAX.
    assert_eq!(sent.rax, None);
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn the_address_size_is_passed_on() {
    let (hv, mut ghcb) = guest();
    for (size, bit) in [
        (AddressSize::Bits16, exit_info::A16),
        (AddressSize::Bits32, exit_info::A32),
        (AddressSize::Bits64, exit_info::A64),
    ] {
        let access = PortAccess {
            port: COM1_LSR,
            size: IoSize::Byte,
            address_size: size,
        };
        // SAFETY: the model's memory is not used by Rust code.
        assert_eq!(unsafe { port_in(&mut ghcb, &hv, access) }, Ok(0x60));
        assert_eq!(hv.last_nae_inputs().unwrap().info1 & (0x7 << 7), bit);
    }
}

#[test]
fn debug_exit_keeps_the_last_value_written() {
    let (hv, mut ghcb) = guest();
    assert_eq!(hv.debug_exit(), None);
    outb(&hv, &mut ghcb, DEBUG_EXIT, IoSize::Dword, 0x31).unwrap();
    assert_eq!(hv.debug_exit(), Some(0x31));
    outb(&hv, &mut ghcb, DEBUG_EXIT, IoSize::Byte, 0x1FF).unwrap();
    assert_eq!(hv.debug_exit(), Some(0xFF));
}

/// Bits of the value above the access size are the guest's own: they
/// never reach the shared page.
#[test]
fn out_sends_only_the_bytes_of_its_size() {
    let (hv, mut ghcb) = guest();
    outb(&hv, &mut ghcb, DEBUG_EXIT, IoSize::Word, 0xDEAD_BEEF).unwrap();
    assert_eq!(hv.last_nae_inputs().unwrap().rax, Some(0xBEEF));
    assert_eq!(hv.debug_exit(), Some(0xBEEF));
    outb(&hv, &mut ghcb, COM1, IoSize::Byte, 0xDEAD_BE41).unwrap();
    assert_eq!(hv.last_nae_inputs().unwrap().rax, Some(0x41));
    assert_eq!(hv.console(), b"A");
}

#[test]
fn in_data_above_the_access_size_is_dropped() {
    let (hv, mut ghcb) = guest();
    hv.set_hostile(Some(SnpHostile::NaeGarbageAbove(!0)));
    assert_eq!(inb(&hv, &mut ghcb, COM1_LSR, IoSize::Byte), Ok(0x60));
    assert_eq!(inb(&hv, &mut ghcb, COM1, IoSize::Word), Ok(0));
    assert_eq!(inb(&hv, &mut ghcb, COM1, IoSize::Dword), Ok(0));
    // The lie is there to be dropped.
    assert_eq!(ghcb.field(Field::Rax), !0xFFFF_FFFF);
}

#[test]
fn an_in_whose_rax_is_not_marked_valid_is_refused() {
    let (hv, mut ghcb) = guest();
    for lie in [SnpHostile::NaeNothingValid, SnpHostile::NaeNotValid(GhcbReg::Rax)] {
        hv.set_hostile(Some(lie));
        assert_eq!(
            inb(&hv, &mut ghcb, COM1_LSR, IoSize::Byte),
            Err(EventError::NotValid(Field::Rax)),
            "{lie:?}"
        );
    }
    // RAX is what the model wrote; only the bitmap lies.
    assert_eq!(ghcb.field(Field::Rax), 0x60);
    // An OUT reads nothing back, so nothing has to be valid.
    hv.set_hostile(Some(SnpHostile::NaeNothingValid));
    assert_eq!(outb(&hv, &mut ghcb, COM1, IoSize::Byte, b'x' as u32), Ok(()));
}

#[test]
fn cpuid_answers_from_the_table() {
    let (hv, mut ghcb) = guest();
    // The VMM's signature leaf: "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
    let signature = cpuid_of(&hv, &mut ghcb, 0x4000_0000, 0, 1).unwrap();
    let mut name = [0u8; 12];
    for (i, r) in [signature.ebx, signature.ecx, signature.edx].into_iter().enumerate() {
        name[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
    }
    assert_eq!(&name, b"KVMKVMKVM\0\0\0");
    hv.set_cpuid(7, 0, [1, 2, 3, 4]);
    hv.set_cpuid(7, 1, [5, 6, 7, 8]);
    assert_eq!(
        cpuid_of(&hv, &mut ghcb, 7, 0, 1),
        Ok(CpuidResult {
            eax: 1,
            ebx: 2,
            ecx: 3,
            edx: 4
        })
    );
    assert_eq!(cpuid_of(&hv, &mut ghcb, 7, 1, 1).unwrap().eax, 5);
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(
        (sent.exit_code, sent.info1, sent.rax, sent.rcx),
        (0x72, 0, Some(7), Some(1))
    );
    // A leaf the table lacks: zeros.
    assert_eq!(cpuid_of(&hv, &mut ghcb, 0x8000_001F, 0, 1), Ok(CpuidResult::default()));
    assert_eq!(hv.stats().protocol_violations, 0);
}

/// Leaf 0xD's answer depends on XCR0, so XCR0 goes with it, and with no
/// other leaf.
#[test]
fn cpuid_sends_xcr0_with_leaf_0xd_only() {
    let (hv, mut ghcb) = guest();
    assert_eq!(cpuid_of(&hv, &mut ghcb, 0xD, 0, 0x7).unwrap().ebx, 832);
    assert_eq!(hv.last_nae_inputs().unwrap().xcr0, Some(0x7));
    assert_eq!(cpuid_of(&hv, &mut ghcb, 0xD, 0, 0x3).unwrap().ebx, 576);
    cpuid_of(&hv, &mut ghcb, 1, 0, 0x7).unwrap();
    assert_eq!(hv.last_nae_inputs().unwrap().xcr0, None);
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn cpuid_keeps_the_low_32_bits_of_each_register() {
    let (hv, mut ghcb) = guest();
    hv.set_cpuid(1, 0, [0x11, 0x22, 0x33, 0x44]);
    hv.set_hostile(Some(SnpHostile::NaeGarbageAbove(!0)));
    assert_eq!(
        cpuid_of(&hv, &mut ghcb, 1, 0, 1),
        Ok(CpuidResult {
            eax: 0x11,
            ebx: 0x22,
            ecx: 0x33,
            edx: 0x44
        })
    );
    assert_eq!(ghcb.field(Field::Rdx), 0xFFFF_FFFF_0000_0044);
}

#[test]
fn cpuid_needs_each_of_its_four_registers_marked_valid() {
    let (hv, mut ghcb) = guest();
    for (reg, field) in [
        (GhcbReg::Rax, Field::Rax),
        (GhcbReg::Rbx, Field::Rbx),
        (GhcbReg::Rcx, Field::Rcx),
        (GhcbReg::Rdx, Field::Rdx),
    ] {
        hv.set_hostile(Some(SnpHostile::NaeNotValid(reg)));
        assert_eq!(cpuid_of(&hv, &mut ghcb, 1, 0, 1), Err(EventError::NotValid(field)));
    }
}

#[test]
fn msrs_are_read_and_written_through_edx_eax() {
    let (hv, mut ghcb) = guest();
    write_msr(&hv, &mut ghcb, KVM_WALL_CLOCK, 0x1234_5678_9ABC_DEF0).unwrap();
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(
        (sent.exit_code, sent.info1, sent.rcx, sent.rax, sent.rdx),
        (
            0x7C,
            1,
            Some(KVM_WALL_CLOCK as u64),
            Some(0x9ABC_DEF0),
            Some(0x1234_5678)
        )
    );
    assert_eq!(hv.msr(KVM_WALL_CLOCK), Some(0x1234_5678_9ABC_DEF0));
    assert_eq!(read_msr(&hv, &mut ghcb, KVM_WALL_CLOCK), Ok(0x1234_5678_9ABC_DEF0));
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(
        (sent.info1, sent.rcx, sent.rax, sent.rdx),
        (0, Some(KVM_WALL_CLOCK as u64), None, None)
    );
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn an_unknown_msr_comes_back_as_a_gp() {
    let (hv, mut ghcb) = guest();
    let gp = EventError::Exception(Exception::GeneralProtection(0));
    assert_eq!(read_msr(&hv, &mut ghcb, 0x1234), Err(gp));
    assert_eq!(write_msr(&hv, &mut ghcb, 0x1234, 5), Err(gp));
    assert_eq!(hv.msr(0x1234), None);
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn rdmsr_needs_rax_and_rdx_marked_valid_and_keeps_their_low_halves() {
    let (hv, mut ghcb) = guest();
    hv.set_msr(KVM_WALL_CLOCK, 0x0000_0001_0000_0002);
    for (reg, field) in [(GhcbReg::Rax, Field::Rax), (GhcbReg::Rdx, Field::Rdx)] {
        hv.set_hostile(Some(SnpHostile::NaeNotValid(reg)));
        assert_eq!(
            read_msr(&hv, &mut ghcb, KVM_WALL_CLOCK),
            Err(EventError::NotValid(field))
        );
    }
    hv.set_hostile(Some(SnpHostile::NaeGarbageAbove(0xABCD_0000_0000_0000)));
    assert_eq!(read_msr(&hv, &mut ghcb, KVM_WALL_CLOCK), Ok(0x0000_0001_0000_0002));
}

#[test]
fn exit_info1_other_than_0_fails_every_event() {
    let (hv, mut ghcb) = guest();
    for info1 in [2, 3, 0xFFFF_FFFF, 0x1_0000_0002] {
        hv.set_hostile(Some(SnpHostile::NaeExitInfo1(info1)));
        let failed = EventError::Failed { info1 };
        assert_eq!(inb(&hv, &mut ghcb, COM1_LSR, IoSize::Byte), Err(failed));
        assert_eq!(outb(&hv, &mut ghcb, COM1, IoSize::Byte, 0), Err(failed));
        assert_eq!(cpuid_of(&hv, &mut ghcb, 1, 0, 1), Err(failed));
        assert_eq!(read_msr(&hv, &mut ghcb, KVM_WALL_CLOCK), Err(failed));
        assert_eq!(write_msr(&hv, &mut ghcb, KVM_WALL_CLOCK, 1), Err(failed));
    }
}

/// Only SW_EXITINFO1[31:0] carries the result: bits above it are not an
/// error.
#[test]
fn exit_info1_bits_above_31_are_not_an_error() {
    let (hv, mut ghcb) = guest();
    hv.set_hostile(Some(SnpHostile::NaeExitInfo1(0xFFFF_FFFF_0000_0000)));
    assert_eq!(inb(&hv, &mut ghcb, COM1_LSR, IoSize::Byte), Ok(0x60));
}

#[test]
fn an_injected_exception_must_be_one_the_instruction_can_raise() {
    let (hv, mut ghcb) = guest();
    hv.set_hostile(Some(SnpHostile::NaeInject(INJECT_UD)));
    assert_eq!(
        cpuid_of(&hv, &mut ghcb, 1, 0, 1),
        Err(EventError::Exception(Exception::InvalidOpcode))
    );
    // #GP with an error code (EV, bit 11).
    hv.set_hostile(Some(SnpHostile::NaeInject(INJECT_GP | 1 << 11 | 0x10 << 32)));
    assert_eq!(
        inb(&hv, &mut ghcb, 0x80, IoSize::Byte),
        Err(EventError::Exception(Exception::GeneralProtection(0x10)))
    );
    // A #PF, an exception without V, an NMI: not the instruction's to raise.
    for info2 in [1 << 31 | 3 << 8 | 14, 3 << 8 | 13, 1 << 31 | 2 << 8 | 2] {
        hv.set_hostile(Some(SnpHostile::NaeInject(info2)));
        assert_eq!(
            outb(&hv, &mut ghcb, COM1, IoSize::Byte, 0),
            Err(EventError::BadException { info2 })
        );
    }
}

/// The model is strict about what the guest sends, so the honest tests'
/// zero protocol violations mean something: a string access, a request
/// without a size, an OUT without RAX are each refused as malformed.
#[test]
fn the_model_refuses_malformed_requests() {
    let (hv, mut ghcb) = guest();
    let a64_sz8 = 1 << 9 | 1 << 4;
    for (info1, rax) in [
        (0x3F8 << 16 | a64_sz8 | exit_info::STR, Some(0)),
        (0x3F8 << 16 | a64_sz8 | exit_info::REP, Some(0)),
        (0x3F8 << 16 | 1 << 9, Some(0)),
        (0x3F8 << 16 | a64_sz8 | 1 << 5, Some(0)),
        (0x3F8 << 16 | a64_sz8, None),
    ] {
        ghcb.invalidate();
        if let Some(rax) = rax {
            ghcb.set_field(Field::Rax, rax);
        }
        // SAFETY: the model's memory is not used by Rust code.
        let done = unsafe { ghcb.nae_call(&hv, IOIO_EXIT_CODE, info1, 0) };
        assert_eq!(done, Err(NaeError::Unexpected { info1: 2 }), "{info1:#x}");
        assert_eq!(
            ghcb.field(Field::SwExitInfo2),
            if rax.is_some() {
                GHCB_ERR_INVALID_INPUT
            } else {
                GHCB_ERR_MISSING_INPUT
            }
        );
    }
    assert_eq!(hv.stats().protocol_violations, 5);
    assert!(hv.console().is_empty());
}

/// Before a GHCB exists, CPUID goes through the GHCB MSR, one register per
/// request, for subleaf 0.
#[test]
fn cpuid_through_the_msr_protocol_asks_one_register_at_a_time() {
    use snp_ghcb::msr_protocol::{cpuid_request, CpuidRegister};
    assert_eq!(cpuid_request(0x8000_001F, CpuidRegister::Ebx), 0x8000_001F_4000_0004);
    assert_eq!(cpuid_request(7, CpuidRegister::Edx), 0x7_C000_0004);
    let hv = snp(MIB, SnpConfig::default());
    hv.set_cpuid(7, 0, [1, 0xDEAD_BEEF, 3, 0xFFFF_FFFF]);
    hv.set_cpuid(7, 1, [5, 6, 7, 8]);
    let before = hv.stats().msr_requests;
    // SAFETY: requests change no memory.
    let answer = unsafe { snp_ghcb::protocol::cpuid(&hv, 7) };
    assert_eq!(answer, Ok([1, 0xDEAD_BEEF, 3, 0xFFFF_FFFF]));
    assert_eq!(hv.stats().msr_requests - before, 4);
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn a_cpuid_answer_through_the_msr_protocol_with_the_wrong_code_or_reserved_bits_is_refused() {
    use snp_ghcb::msr_protocol::{cpuid_response, CpuidRegister, MsrProtocolError};
    use snp_ghcb::protocol::ProtocolError;
    assert_eq!(
        cpuid_response(0x1234_5678_4000_0005, CpuidRegister::Ebx),
        Ok(0x1234_5678)
    );
    assert_eq!(
        cpuid_response(0x1234_5678_4000_0005, CpuidRegister::Eax),
        Err(MsrProtocolError::WrongRegister {
            expected: CpuidRegister::Eax,
            response: 0x1234_5678_4000_0005
        })
    );
    assert_eq!(
        cpuid_response(0x1234_5678_0000_1005, CpuidRegister::Eax),
        Err(MsrProtocolError::ReservedBits {
            response: 0x1234_5678_0000_1005
        })
    );
    assert!(matches!(
        cpuid_response(0x1234_5678_0000_0001, CpuidRegister::Eax),
        Err(MsrProtocolError::WrongCode { expected: 5, .. })
    ));
    for lie in [SnpHostile::MsrWrongCode, SnpHostile::MsrReservedBits] {
        let hv = snp(MIB, SnpConfig::default());
        hv.set_hostile(Some(lie));
        // SAFETY: requests change no memory.
        let answer = unsafe { snp_ghcb::protocol::cpuid(&hv, 0) };
        assert!(matches!(answer, Err(ProtocolError::Msr(_))), "{lie:?}: {answer:?}");
    }
}
