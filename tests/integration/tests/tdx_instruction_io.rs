//! TDG.VP.VMCALL\<Instruction.IO\>, \<Instruction.CPUID\>,
//! \<Instruction.RDMSR\> and \<Instruction.WRMSR\> against the model: the
//! registers each wrapper sends, what comes back from an honest VMM, and
//! every way the VMM can lie about it.

use hvmock::emulation::{COM1, DEBUG_EXIT};
use hvmock::{MockTdx, TdxConfig, TdxEmulationHostile, TdxEvent};
use integration::{tdx, MIB};
use proptest::prelude::*;
use tdcall::{
    cpuid, io_read, io_write, rdmsr, subfunction, tdvmcall, wrmsr, CpuidResult, IoSize, TdxError, VmcallError,
    VmcallStatus,
};

const SIZES: [IoSize; 3] = [IoSize::Byte, IoSize::Word, IoSize::Dword];
/// A port nothing answers on.
const NOWHERE: u16 = 0x80;
const COM1_LSR: u16 = COM1 + 5;
const COM1_SCRATCH: u16 = COM1 + 7;
/// KVM's paravirtual wall-clock MSR, which the model's VMM emulates.
const MSR_KVM_WALL_CLOCK: u32 = 0x4B56_4D00;
const VMCALL_INVALID_OPERAND: u64 = 1 << 63;
const TDX_OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;

fn td() -> MockTdx {
    tdx(MIB, TdxConfig::default())
}

/// (R12 size, R13 direction, R14 port, data, status) of every
/// Instruction.IO call.
fn io_calls(td: &MockTdx) -> Vec<(u64, u64, u64, u64, u64)> {
    td.events()
        .into_iter()
        .filter_map(|e| match e {
            TdxEvent::Io {
                size,
                direction,
                port,
                data,
                status,
            } => Some((size, direction, port, data, status)),
            _ => None,
        })
        .collect()
}

#[test]
fn bytes_out_to_com1_reach_the_console_one_call_each() {
    let td = td();
    for &b in b"hello\n" {
        io_write(&td, COM1, IoSize::Byte, b as u32).unwrap();
    }
    assert_eq!(td.console(), b"hello\n");
    let calls = io_calls(&td);
    assert_eq!(calls.len(), 6);
    assert_eq!(
        calls[0],
        (1, 1, 0x3F8, b'h' as u64, 0),
        "R12 = 1 byte, R13 = 1 (write), R14 = port, R15 = data"
    );
}

#[test]
fn the_console_is_read_on_from_where_the_reader_left_it() {
    let td = td();
    for &b in b"hello, world" {
        io_write(&td, COM1, IoSize::Byte, b as u32).unwrap();
    }
    let mut into = [0u8; 5];
    let mut read = Vec::new();
    let mut at = 0;
    loop {
        let n = td.read_console(at, &mut into);
        if n == 0 {
            break;
        }
        read.extend_from_slice(&into[..n]);
        at += n;
    }
    assert_eq!(read, b"hello, world");
    assert_eq!(td.read_console(100, &mut into), 0, "past the end: nothing");
}

#[test]
fn out_sends_only_the_bits_of_its_size() {
    let td = td();
    io_write(&td, COM1, IoSize::Byte, 0xDEAD_BE41).unwrap();
    io_write(&td, DEBUG_EXIT, IoSize::Word, 0x1234_5678).unwrap();
    assert_eq!(td.console(), b"A");
    assert_eq!(td.debug_exit(), Some(0x5678));
    assert_eq!(
        io_calls(&td),
        vec![(1, 1, 0x3F8, 0x41, 0), (2, 1, 0xF4, 0x5678, 0)],
        "R15 carries nothing above the access"
    );
}

#[test]
fn isa_debug_exit_keeps_the_last_value_written() {
    let td = td();
    assert_eq!(td.debug_exit(), None);
    io_write(&td, DEBUG_EXIT, IoSize::Dword, 0x31).unwrap();
    io_write(&td, DEBUG_EXIT, IoSize::Byte, 0x10).unwrap();
    assert_eq!(td.debug_exit(), Some(0x10));
}

#[test]
fn a_port_nothing_answers_on_reads_all_ones_at_every_size() {
    let td = td();
    for size in SIZES {
        assert_eq!(io_read(&td, NOWHERE, size), Ok(size.mask()), "{size:?}");
    }
    let sizes: Vec<_> = io_calls(&td).iter().map(|c| (c.0, c.1, c.2)).collect();
    assert_eq!(sizes, vec![(1, 0, 0x80), (2, 0, 0x80), (4, 0, 0x80)], "R13 = 0 (read)");
}

#[test]
fn com1_reads_idle_and_keeps_its_scratch_register() {
    let td = td();
    assert_eq!(io_read(&td, COM1_LSR, IoSize::Byte), Ok(0x60));
    io_write(&td, COM1_SCRATCH, IoSize::Byte, 0x5A).unwrap();
    assert_eq!(io_read(&td, COM1_SCRATCH, IoSize::Byte), Ok(0x5A));
    assert_eq!(td.console(), b"", "only the data register feeds the console");
}

/// An `IN AL` cannot bring more than 8 bits into the guest; a VMM that
/// fills R11's other 56 must not either.
#[test]
fn a_read_drops_what_the_vmm_put_above_the_access() {
    let td = td();
    td.set_emulation_hostile(Some(TdxEmulationHostile::GarbageAboveAccess));
    assert_eq!(io_read(&td, COM1_LSR, IoSize::Byte), Ok(0x60));
    // The line status register, then the modem status register (0).
    assert_eq!(io_read(&td, COM1_LSR, IoSize::Word), Ok(0x0060));
    assert_eq!(io_read(&td, NOWHERE, IoSize::Dword), Ok(0xFFFF_FFFF));
    let raw: Vec<u64> = io_calls(&td).iter().map(|c| c.3).collect();
    assert_eq!(
        raw,
        vec![0xFFFF_FFFF_FFFF_FF60, 0xFFFF_FFFF_FFFF_0060, u64::MAX],
        "the VMM did lie"
    );
}

#[test]
fn every_status_but_success_is_an_error_and_nothing_is_carried_out() {
    let statuses = [
        (VMCALL_INVALID_OPERAND, VmcallStatus::InvalidOperand),
        (1, VmcallStatus::Retry),
        (VMCALL_INVALID_OPERAND | 1, VmcallStatus::GpaInUse),
        (0x1234, VmcallStatus::Unknown(0x1234)),
    ];
    for (raw, status) in statuses {
        let td = td();
        td.set_emulation_hostile(Some(TdxEmulationHostile::Status(raw)));
        let refused = Some(VmcallError::Status(status));
        assert_eq!(io_write(&td, COM1, IoSize::Byte, b'x' as u32).err(), refused);
        assert_eq!(io_read(&td, COM1_LSR, IoSize::Byte).err(), refused);
        assert_eq!(cpuid(&td, 0x4000_0000, 0).err(), refused);
        assert_eq!(rdmsr(&td, MSR_KVM_WALL_CLOCK).err(), refused);
        assert_eq!(wrmsr(&td, MSR_KVM_WALL_CLOCK, 7).err(), refused);
        assert_eq!(td.console(), b"", "{status:?}");
        assert_eq!(td.msr(MSR_KVM_WALL_CLOCK), Some(0), "{status:?}");
    }
}

#[test]
fn a_failed_tdcall_is_an_error() {
    let td = td();
    td.set_emulation_hostile(Some(TdxEmulationHostile::TdcallFails(TDX_OPERAND_INVALID | 1)));
    let failed = Some(VmcallError::Tdcall(TdxError::OperandInvalid { operand: 1 }));
    assert_eq!(io_write(&td, COM1, IoSize::Byte, b'x' as u32).err(), failed);
    assert_eq!(io_read(&td, COM1_LSR, IoSize::Byte).err(), failed);
    assert_eq!(cpuid(&td, 0x4000_0000, 0).err(), failed);
    assert_eq!(rdmsr(&td, MSR_KVM_WALL_CLOCK).err(), failed);
    assert_eq!(wrmsr(&td, MSR_KVM_WALL_CLOCK, 7).err(), failed);
    assert_eq!(td.console(), b"");
    assert!(io_calls(&td).is_empty(), "the VMM never saw a call");
}

#[test]
fn cpuid_hypervisor_leaf_comes_from_the_vmms_table() {
    let td = td();
    let r = cpuid(&td, 0x4000_0000, 0).unwrap();
    let signature: Vec<u8> = [r.ebx, r.ecx, r.edx].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&signature, b"KVMKVMKVM\0\0\0");
    assert_eq!(r.eax, 0x4000_0001, "highest hypervisor leaf");
    assert!(td.events().contains(&TdxEvent::Cpuid {
        leaf: 0x4000_0000,
        subleaf: 0,
        status: 0
    }));
}

#[test]
fn cpuid_sends_the_subleaf() {
    let td = td();
    let answer = CpuidResult {
        eax: 1,
        ebx: 2,
        ecx: 3,
        edx: 4,
    };
    td.set_cpuid(0x4000_0010, 3, [1, 2, 3, 4]);
    assert_eq!(cpuid(&td, 0x4000_0010, 3), Ok(answer));
    assert_eq!(cpuid(&td, 0x4000_0010, 2), Ok(CpuidResult::default()));
}

#[test]
fn cpuid_keeps_32_bits_of_each_register() {
    let td = td();
    let honest = cpuid(&td, 0x4000_0000, 0).unwrap();
    td.set_emulation_hostile(Some(TdxEmulationHostile::GarbageAboveAccess));
    assert_eq!(cpuid(&td, 0x4000_0000, 0), Ok(honest));
}

#[test]
fn msrs_round_trip_through_the_vmm() {
    let td = td();
    assert_eq!(rdmsr(&td, MSR_KVM_WALL_CLOCK), Ok(0));
    wrmsr(&td, MSR_KVM_WALL_CLOCK, 0x1234_5678_9ABC_DEF0).unwrap();
    assert_eq!(td.msr(MSR_KVM_WALL_CLOCK), Some(0x1234_5678_9ABC_DEF0));
    assert_eq!(rdmsr(&td, MSR_KVM_WALL_CLOCK), Ok(0x1234_5678_9ABC_DEF0));
    assert!(td.events().contains(&TdxEvent::Wrmsr {
        index: MSR_KVM_WALL_CLOCK as u64,
        value: 0x1234_5678_9ABC_DEF0,
        status: 0
    }));
}

#[test]
fn an_msr_the_vmm_does_not_emulate_is_an_invalid_operand() {
    let td = td();
    let invalid = Some(VmcallError::Status(VmcallStatus::InvalidOperand));
    assert_eq!(rdmsr(&td, 0x1B).err(), invalid);
    assert_eq!(wrmsr(&td, 0x1B, 1).err(), invalid);
    assert_eq!(td.msr(0x1B), None);
}

/// The model checks operands as the GHCI defines them, so the wrappers'
/// encodings above are checked against something: a size of 3 bytes, a
/// direction of 2 or a port above 0xFFFF is refused.
#[test]
fn the_model_refuses_what_the_ghci_does_not_define() {
    let td = td();
    for args in [[3, 0, 0x80, 0], [1, 2, 0x80, 0], [1, 0, 0x1_0000, 0], [8, 1, 0x3F8, 0]] {
        // SAFETY: Instruction.IO changes no guest memory.
        let (status, _) = unsafe { tdvmcall(&td, subfunction::INSTRUCTION_IO, args) }.unwrap();
        assert_eq!(status, VmcallStatus::InvalidOperand, "{args:x?}");
    }
    // SAFETY: as above.
    let (status, _) = unsafe { tdvmcall(&td, subfunction::INSTRUCTION_CPUID, [1 << 32, 0, 0, 0]) }.unwrap();
    assert_eq!(status, VmcallStatus::InvalidOperand, "a leaf wider than EAX");
    assert_eq!(td.console(), b"");
}

fn size() -> impl Strategy<Value = IoSize> {
    prop::sample::select(SIZES.to_vec())
}

proptest! {
    /// Whatever 64 bits the VMM answers with, a read yields only the bits
    /// of its access, and CPUID only 32 bits a register.
    #[test]
    fn no_answer_reaches_above_its_access(raw in any::<u64>(), port in any::<u16>(), size in size(), leaf in 0x4000_0000u32..=0x4FFF_FFFF) {
        let td = td();
        td.set_emulation_hostile(Some(TdxEmulationHostile::Answer(raw)));
        prop_assert_eq!(io_read(&td, port, size), Ok(raw as u32 & size.mask()));
        let r = cpuid(&td, leaf, 0).unwrap();
        prop_assert_eq!([r.eax, r.ebx, r.ecx, r.edx], [raw as u32; 4]);
        prop_assert_eq!(rdmsr(&td, 0x1B), Ok(raw), "an MSR has all 64 bits");
    }
}
