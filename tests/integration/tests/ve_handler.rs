//! The TDX #VE handler against the model: each instruction carried out
//! through the VMM, each check against a VMM that lies, EPT violations
//! classified (fatal, MMIO, zeropad), and, whatever goes wrong, no register
//! changed.

use coco_convert::exception::ve::{MmioAccess, VeError, VeHandler, VeOutcome};
use coco_convert::exception::{FaultFrame, Gpr};
use coco_convert::zeropad::{self, NotHandled};
use hvmock::emulation::{COM1, DEBUG_EXIT};
use hvmock::{MockTdx, TdxConfig, TdxEmulationHostile, TdxEvent};
use integration::{tdx, MIB};
use proptest::prelude::*;
use tdcall::{TdxError, VeInfo, VmcallError, VmcallStatus};

const SHARED: u64 = 1 << 47;
const RIP: u64 = 0xFFFF_FFFF_8100_0000;
const MSR_KVM_WALL_CLOCK: u32 = 0x4B56_4D00;
const VMCALL_INVALID_OPERAND: u64 = 1 << 63;
const TDX_OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;
/// A port nothing answers on.
const NOWHERE: u16 = 0x80;
const COM1_LSR: u16 = COM1 + 5;

const CPUID: u32 = 10;
const IO: u32 = 30;
const RDMSR: u32 = 31;
const WRMSR: u32 = 32;
const EPT_VIOLATION: u32 = 48;

fn td() -> MockTdx {
    tdx(MIB, TdxConfig::default())
}

fn handler() -> VeHandler {
    VeHandler::new(SHARED).unwrap()
}

fn ve(exit_reason: u32, exit_qualification: u64, instruction_length: u32) -> VeInfo {
    VeInfo {
        exit_reason,
        exit_qualification,
        gla: 0,
        gpa: 0,
        instruction_length,
        instruction_info: 0,
    }
}

/// Every register holds something distinct, with bits in both halves.
fn frame() -> FaultFrame {
    FaultFrame {
        gprs: core::array::from_fn(|i| 0xA5A5_0000_0000_0000 | (i as u64) << 40 | (0x0101_0101 * (i as u64 + 1))),
        rip: RIP,
    }
}

fn with(mut f: FaultFrame, values: &[(Gpr, u64)]) -> FaultFrame {
    for &(reg, value) in values {
        f.gprs[reg as usize] = value;
    }
    f
}

/// The exit qualification of `IN`/`OUT` (Intel SDM vol. 3C, "Exit
/// Qualification for I/O Instructions"): size - 1 in bits 2:0, bit 3 = IN,
/// port in bits 31:16.
fn io(port: u16, bytes: u64, input: bool) -> u64 {
    (port as u64) << 16 | (bytes - 1) | (input as u64) << 3
}

fn handle(td: &MockTdx, ve: &VeInfo, f: &mut FaultFrame) -> Result<VeOutcome, VeError> {
    handler().handle(td, ve, f)
}

/// Handles `ve` and requires an error that changed nothing.
fn refused(td: &MockTdx, ve: &VeInfo, f: FaultFrame) -> VeError {
    let mut after = f;
    let e = handle(td, ve, &mut after).expect_err("refused");
    assert_eq!(after, f, "{ve:?}: {e:?} changed registers");
    e
}

fn vmm_calls(td: &MockTdx) -> usize {
    td.events()
        .iter()
        .filter(|e| {
            matches!(
                e,
                TdxEvent::Io { .. } | TdxEvent::Cpuid { .. } | TdxEvent::Rdmsr { .. } | TdxEvent::Wrmsr { .. }
            )
        })
        .count()
}

#[test]
fn only_tdxs_shared_bits_make_a_handler() {
    assert_eq!(VeHandler::new(1 << 47).map(|h| h.shared_mask()), Some(1 << 47));
    assert_eq!(VeHandler::new(1 << 51).map(|h| h.shared_mask()), Some(1 << 51));
    for mask in [0, 1 << 46, 1 << 48, 3 << 47, 1 << 63] {
        assert_eq!(VeHandler::new(mask), None, "{mask:#x}");
    }
}

// ---- CPUID ----------------------------------------------------------------

#[test]
fn a_hypervisor_leaf_is_answered_by_the_vmm() {
    let td = td();
    // The leaf is EAX and the sub-leaf ECX: the upper halves are not asked.
    let before = with(
        frame(),
        &[(Gpr::Rax, 0xFFFF_FFFF_4000_0000), (Gpr::Rcx, 0xDEAD_0000_0000_0000)],
    );
    let mut f = before;
    assert_eq!(handle(&td, &ve(CPUID, 0, 2), &mut f), Ok(VeOutcome::Emulated));
    let expected = with(
        before,
        &[
            (Gpr::Rax, 0x4000_0001),
            (Gpr::Rbx, 0x4B4D_564B),
            (Gpr::Rcx, 0x564B_4D56),
            (Gpr::Rdx, 0x4D),
        ],
    );
    assert_eq!(f.gprs, expected.gprs, "EAX..EDX zero-extended, nothing else");
    assert_eq!(f.rip, RIP + 2);
    assert!(td.events().contains(&TdxEvent::Cpuid {
        leaf: 0x4000_0000,
        subleaf: 0,
        status: 0
    }));
}

/// Linux's rule: the TDX module answers every leaf it virtualises, so any
/// other leaf that reaches the guest would be the host's invention. It
/// reads as zeros, as an unsupported leaf does, and the VMM is not asked.
#[test]
fn a_leaf_outside_the_hypervisor_range_reads_zeros_and_the_vmm_is_not_asked() {
    let td = td();
    td.set_emulation_hostile(Some(TdxEmulationHostile::Answer(u64::MAX)));
    for leaf in [0, 1, 7, 0x3FFF_FFFF, 0x5000_0000, 0x8000_0001, u32::MAX] {
        let mut f = with(frame(), &[(Gpr::Rax, leaf as u64)]);
        let before = f;
        assert_eq!(handle(&td, &ve(CPUID, 0, 2), &mut f), Ok(VeOutcome::Emulated));
        let zeros = with(before, &[(Gpr::Rax, 0), (Gpr::Rbx, 0), (Gpr::Rcx, 0), (Gpr::Rdx, 0)]);
        assert_eq!(f.gprs, zeros.gprs, "leaf {leaf:#x}");
        assert_eq!(f.rip, RIP + 2);
    }
    assert_eq!(vmm_calls(&td), 0);
}

#[test]
fn both_ends_of_the_hypervisor_range_go_to_the_vmm() {
    let td = td();
    td.set_cpuid(0x4FFF_FFFF, 0, [1, 2, 3, 4]);
    let mut f = with(frame(), &[(Gpr::Rax, 0x4FFF_FFFF), (Gpr::Rcx, 0)]);
    handle(&td, &ve(CPUID, 0, 2), &mut f).unwrap();
    assert_eq!(&f.gprs[..4], &[1, 3, 4, 2], "RAX, RCX, RDX, RBX in encoding order");
    let mut f = with(frame(), &[(Gpr::Rax, 0x4000_0000), (Gpr::Rcx, 0)]);
    handle(&td, &ve(CPUID, 0, 2), &mut f).unwrap();
    assert_eq!(vmm_calls(&td), 2);
}

#[test]
fn the_subleaf_is_ecx() {
    let td = td();
    td.set_cpuid(0x4000_0010, 5, [5, 6, 7, 8]);
    let mut f = with(frame(), &[(Gpr::Rax, 0x4000_0010), (Gpr::Rcx, 0xFFFF_FFFF_0000_0005)]);
    handle(&td, &ve(CPUID, 0, 2), &mut f).unwrap();
    assert_eq!(f.gprs[Gpr::Rax as usize], 5);
    assert_eq!(f.gprs[Gpr::Rdx as usize], 8);
}

#[test]
fn cpuid_answers_are_zero_extended_whatever_the_vmm_sets_above_them() {
    let td = td();
    td.set_emulation_hostile(Some(TdxEmulationHostile::GarbageAboveAccess));
    let mut f = with(frame(), &[(Gpr::Rax, 0x4000_0000), (Gpr::Rcx, 0)]);
    handle(&td, &ve(CPUID, 0, 2), &mut f).unwrap();
    assert_eq!(&f.gprs[..4], &[0x4000_0001, 0x564B_4D56, 0x4D, 0x4B4D_564B]);
}

// ---- MSRs -------------------------------------------------------------------

#[test]
fn rdmsr_splits_the_value_into_edx_eax() {
    let td = td();
    td.set_msr(MSR_KVM_WALL_CLOCK, 0x1122_3344_5566_7788);
    let before = with(
        frame(),
        &[(Gpr::Rcx, 0xFFFF_FFFF_0000_0000 | MSR_KVM_WALL_CLOCK as u64)],
    );
    let mut f = before;
    assert_eq!(handle(&td, &ve(RDMSR, 0, 2), &mut f), Ok(VeOutcome::Emulated));
    assert_eq!(
        f.gprs,
        with(before, &[(Gpr::Rax, 0x5566_7788), (Gpr::Rdx, 0x1122_3344)]).gprs
    );
    assert_eq!(f.rip, RIP + 2);
}

#[test]
fn wrmsr_sends_edx_eax_and_ignores_their_upper_halves() {
    let td = td();
    let before = with(
        frame(),
        &[
            (Gpr::Rcx, MSR_KVM_WALL_CLOCK as u64),
            (Gpr::Rax, 0xAAAA_AAAA_5566_7788),
            (Gpr::Rdx, 0xBBBB_BBBB_1122_3344),
        ],
    );
    let mut f = before;
    assert_eq!(handle(&td, &ve(WRMSR, 0, 2), &mut f), Ok(VeOutcome::Emulated));
    assert_eq!(td.msr(MSR_KVM_WALL_CLOCK), Some(0x1122_3344_5566_7788));
    assert_eq!((f.gprs, f.rip), (before.gprs, RIP + 2));
}

#[test]
fn an_msr_the_vmm_refuses_changes_no_register() {
    let td = td();
    let f = with(frame(), &[(Gpr::Rcx, 0x1B)]);
    let invalid = VeError::Vmcall(VmcallError::Status(VmcallStatus::InvalidOperand));
    assert_eq!(refused(&td, &ve(RDMSR, 0, 2), f), invalid);
    assert_eq!(refused(&td, &ve(WRMSR, 0, 2), f), invalid);
}

// ---- port I/O -------------------------------------------------------------

#[test]
fn out_sends_al_ax_or_eax() {
    let td = td();
    let before = with(frame(), &[(Gpr::Rax, 0x1234_5678_9ABC_DE41)]);
    for (port, bytes) in [(COM1, 1), (DEBUG_EXIT, 2), (NOWHERE, 4)] {
        let mut f = before;
        assert_eq!(
            handle(&td, &ve(IO, io(port, bytes, false), 1), &mut f),
            Ok(VeOutcome::Emulated)
        );
        assert_eq!((f.gprs, f.rip), (before.gprs, RIP + 1));
    }
    assert_eq!(td.console(), b"A");
    assert_eq!(td.debug_exit(), Some(0xDE41));
    let sent: Vec<_> = td
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TdxEvent::Io {
                size, direction, data, ..
            } => Some((size, direction, data)),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![(1, 1, 0x41), (2, 1, 0xDE41), (4, 1, 0x9ABC_DE41)]);
}

/// `IN AL` and `IN AX` leave the rest of RAX as it was; `IN EAX`
/// zero-extends into RAX, as any 32-bit register write does.
#[test]
fn in_writes_only_its_part_of_rax() {
    for hostile in [None, Some(TdxEmulationHostile::GarbageAboveAccess)] {
        let td = td();
        td.set_emulation_hostile(hostile);
        let rax = 0x1234_5678_9ABC_DEF0;
        for (port, bytes, expected) in [
            (COM1_LSR, 1, 0x1234_5678_9ABC_DE60),
            (NOWHERE, 2, 0x1234_5678_9ABC_FFFF),
            (NOWHERE, 4, 0xFFFF_FFFF),
        ] {
            let before = with(frame(), &[(Gpr::Rax, rax)]);
            let mut f = before;
            assert_eq!(
                handle(&td, &ve(IO, io(port, bytes, true), 2), &mut f),
                Ok(VeOutcome::Emulated)
            );
            assert_eq!(
                f.gprs,
                with(before, &[(Gpr::Rax, expected)]).gprs,
                "{bytes} bytes, {hostile:?}"
            );
            assert_eq!(f.rip, RIP + 2);
        }
    }
}

#[test]
fn string_and_rep_io_are_refused_before_the_vmm_sees_them() {
    let td = td();
    for flags in [1 << 4, 1 << 5, 3 << 4] {
        for input in [false, true] {
            let qualification = io(COM1, 1, input) | flags;
            assert_eq!(
                refused(&td, &ve(IO, qualification, 2), frame()),
                VeError::StringIo { qualification }
            );
        }
    }
    assert_eq!(vmm_calls(&td), 0);
}

/// Bits 2:0 hold 0, 1 or 3; the SDM uses no other value.
#[test]
fn an_io_size_the_sdm_does_not_define_is_refused() {
    let td = td();
    for size_less_one in [2, 4, 5, 6, 7] {
        let qualification = io(COM1, 1, false) | size_less_one;
        assert_eq!(
            refused(&td, &ve(IO, qualification, 1), frame()),
            VeError::InvalidIoSize { qualification }
        );
    }
    assert_eq!(vmm_calls(&td), 0);
}

/// RIP moves by the length the module reported, and only a length an x86
/// instruction can have is believed; a bad one is refused before the VMM
/// is asked, so an OUT with nowhere to resume never reaches the device.
#[test]
fn the_instruction_length_moves_rip_and_must_be_1_to_15() {
    let td = td();
    for length in [0, 16, 255, u32::MAX] {
        let f = with(frame(), &[(Gpr::Rax, b'x' as u64)]);
        assert_eq!(
            refused(&td, &ve(IO, io(COM1, 1, false), length), f),
            VeError::InvalidInstructionLength(length)
        );
    }
    assert_eq!(td.console(), b"");
    assert_eq!(vmm_calls(&td), 0);
    for length in [1, 15] {
        let mut f = with(frame(), &[(Gpr::Rax, 0)]);
        handle(&td, &ve(CPUID, 0, length), &mut f).unwrap();
        assert_eq!(f.rip, RIP + length as u64);
    }
}

// ---- a VMM that fails -----------------------------------------------------

#[test]
fn whatever_the_vmm_or_the_module_refuses_changes_no_register() {
    let cases: [(Gpr, u64, VeInfo); 5] = [
        (Gpr::Rax, 0x4000_0000, ve(CPUID, 0, 2)),
        (Gpr::Rcx, MSR_KVM_WALL_CLOCK as u64, ve(RDMSR, 0, 2)),
        (Gpr::Rcx, MSR_KVM_WALL_CLOCK as u64, ve(WRMSR, 0, 2)),
        (Gpr::Rax, 0, ve(IO, io(COM1_LSR, 1, true), 1)),
        (Gpr::Rax, b'x' as u64, ve(IO, io(COM1, 1, false), 1)),
    ];
    let modes = [
        (
            TdxEmulationHostile::Status(VMCALL_INVALID_OPERAND),
            VmcallError::Status(VmcallStatus::InvalidOperand),
        ),
        (TdxEmulationHostile::Status(1), VmcallError::Status(VmcallStatus::Retry)),
        (
            TdxEmulationHostile::Status(42),
            VmcallError::Status(VmcallStatus::Unknown(42)),
        ),
        (
            TdxEmulationHostile::TdcallFails(TDX_OPERAND_INVALID | 1),
            VmcallError::Tdcall(TdxError::OperandInvalid { operand: 1 }),
        ),
    ];
    for (mode, error) in modes {
        let td = td();
        td.set_emulation_hostile(Some(mode));
        for (reg, value, ve) in cases {
            assert_eq!(
                refused(&td, &ve, with(frame(), &[(reg, value)])),
                VeError::Vmcall(error)
            );
        }
        assert_eq!(td.console(), b"", "{mode:?}");
        assert_eq!(td.msr(MSR_KVM_WALL_CLOCK), Some(0), "{mode:?}");
    }
}

#[test]
fn other_exit_reasons_are_left_to_the_os() {
    let td = td();
    for reason in [0, 12, 28, 49, u32::MAX] {
        assert_eq!(
            refused(&td, &ve(reason, 0, 1), frame()),
            VeError::UnsupportedExitReason(reason)
        );
    }
    assert_eq!(vmm_calls(&td), 0);
}

// ---- EPT violations -------------------------------------------------------

fn ept(gpa: u64, gla: u64) -> VeInfo {
    VeInfo {
        gpa,
        gla,
        ..ve(EPT_VIOLATION, 0x181, 0)
    }
}

#[test]
fn an_ept_violation_on_a_private_gpa_is_fatal() {
    let td = td();
    assert_eq!(
        refused(&td, &ept(0x7000, 0xFFFF_8880_0000_7000), frame()),
        VeError::PrivateEptViolation {
            gpa: 0x7000,
            gla: 0xFFFF_8880_0000_7000
        }
    );
    assert!(td.events().is_empty(), "nothing asked of anyone");
}

#[test]
fn an_ept_violation_on_a_shared_gpa_is_mmio_for_the_os() {
    let td = td();
    let before = frame();
    let mut f = before;
    assert_eq!(
        handle(&td, &ept(SHARED | 0xFEC0_0000, 0xFFFF_C900_0000_0010), &mut f),
        Ok(VeOutcome::Mmio(MmioAccess {
            gpa: SHARED | 0xFEC0_0000,
            gla: 0xFFFF_C900_0000_0010
        }))
    );
    assert_eq!(f, before, "not handled: nothing changed");
}

/// The kernel's #VE entry as it runs: the module's #VE information read
/// with TDG.VP.VEINFO.GET, then handled.
#[test]
fn from_veinfo_get_to_the_console() {
    let td = td();
    // Exit reason, qualification, GLA, GPA, R10 = length | info << 32.
    td.inject_ve([IO as u64, io(COM1, 1, false), 0, 0, 1]);
    let ve = tdcall::ve_info(&td).unwrap();
    let mut f = with(frame(), &[(Gpr::Rax, b'Z' as u64)]);
    assert_eq!(handle(&td, &ve, &mut f), Ok(VeOutcome::Emulated));
    assert_eq!(td.console(), b"Z");
    assert_eq!(f.rip, RIP + 1);
}

// ---- zeropad loads --------------------------------------------------------

/// `mov rax, [rcx]` (48 8B 01), recorded as a zeropad site.
#[inline(never)]
fn zeropad_load(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: only called on readable bytes.
    unsafe {
        coco_convert::zeropad_asm!(; "mov rax, qword ptr [rcx]" ; ; in("rcx") p, out("rax") v, options(nostack, readonly))
    };
    v
}

/// Where that load is: the recorded site whose bytes are `48 8B 01`.
fn zeropad_site() -> u64 {
    let bytes = [0u8; 8];
    assert_eq!(std::hint::black_box(zeropad_load)(bytes.as_ptr()), 0);
    site_of(&[0x48, 0x8B, 0x01])
}

/// `mov rax, [rip]` (48 8B 05 00 00 00 00), recorded as a zeropad site:
/// a load the fix-up does not finish (RIP-relative). Never run.
#[inline(never)]
fn rip_relative_load() -> u64 {
    let v: u64;
    // SAFETY: reads the bytes after the load, this program's code.
    unsafe { coco_convert::zeropad_asm!(; "mov rax, qword ptr [rip]" ; ; out("rax") v, options(nostack, readonly)) };
    v
}

/// The recorded site whose bytes are `code`.
fn site_of(code: &[u8]) -> u64 {
    zeropad::site::sites()
        .iter()
        .filter(|s| s.len() == code.len())
        .map(|s| s.address())
        // SAFETY: a site's bytes are this program's code.
        .find(|&a| unsafe { std::slice::from_raw_parts(a as *const u8, code.len()) } == code)
        .expect("the site")
}

#[repr(C, align(4096))]
struct TwoPages([u8; 8192]);

/// The page the load starts in, with known bytes, and the address of its
/// end (the faulting page is never read).
fn owned_page() -> (Box<TwoPages>, u64) {
    let mut pages = Box::new(TwoPages([0xAB; 8192]));
    for (i, b) in pages.0[..4096].iter_mut().enumerate() {
        *b = i as u8;
    }
    let end = pages.0.as_ptr() as u64 + 4096;
    (pages, end)
}

/// A `load_unaligned_zeropad` that ran off its page into a shared one the
/// host does not map: finished with the bytes up to the page end,
/// zero-padded, and RIP past the load (3 bytes: the decoded length; the
/// module gives none for an EPT violation).
#[test]
fn a_zeropad_load_across_into_a_shared_page_is_finished() {
    zeropad::init();
    let td = td();
    let site = zeropad_site();
    let (_pages, end) = owned_page();
    let before = FaultFrame {
        rip: site,
        ..with(frame(), &[(Gpr::Rcx, end - 3)])
    };
    let mut f = before;
    assert_eq!(handle(&td, &ept(SHARED | 0x9000, end), &mut f), Ok(VeOutcome::Emulated));
    // The last three bytes of the page are 0xFD, 0xFE, 0xFF.
    assert_eq!(f.gprs, with(before, &[(Gpr::Rax, 0x00FF_FEFD)]).gprs);
    assert_eq!(f.rip, site + 3);
    assert!(td.events().is_empty());
}

#[test]
fn a_zeropad_load_within_one_shared_page_is_mmio() {
    zeropad::init();
    let (_pages, end) = owned_page();
    let before = FaultFrame {
        rip: zeropad_site(),
        ..with(frame(), &[(Gpr::Rcx, end - 13)])
    };
    let mut f = before;
    let outcome = handle(&td(), &ept(SHARED | 0x9000, end - 13), &mut f);
    assert!(matches!(outcome, Ok(VeOutcome::Mmio(_))), "{outcome:?}");
    assert_eq!(f, before);
}

#[test]
fn a_zeropad_load_into_a_private_page_is_still_fatal() {
    zeropad::init();
    let (_pages, end) = owned_page();
    let f = FaultFrame {
        rip: zeropad_site(),
        ..with(frame(), &[(Gpr::Rcx, end - 3)])
    };
    assert_eq!(
        refused(&td(), &ept(0x9000, end), f),
        VeError::PrivateEptViolation { gpa: 0x9000, gla: end }
    );
}

/// A crossing load the fix-up declines (the fault is not at the next word)
/// has no other handler: refused, fatal.
#[test]
fn a_crossing_zeropad_load_the_fixup_declines_is_refused() {
    zeropad::init();
    let (_pages, end) = owned_page();
    let f = FaultFrame {
        rip: zeropad_site(),
        ..with(frame(), &[(Gpr::Rcx, end - 3)])
    };
    assert_eq!(
        refused(&td(), &ept(SHARED | 0x9000, end + 8), f),
        VeError::Zeropad(NotHandled::NotAtNextWord {
            address: end - 3,
            fault: end + 8
        })
    );
}

/// A recorded load the fix-up cannot decode is no more MMIO than one it
/// can: it is a load of the kernel's, not a driver's, and has no handler.
#[test]
fn a_recorded_load_the_fixup_cannot_decode_is_refused() {
    zeropad::init();
    std::hint::black_box(rip_relative_load as fn() -> u64);
    let f = FaultFrame {
        rip: site_of(&[0x48, 0x8B, 0x05, 0, 0, 0, 0]),
        ..frame()
    };
    assert_eq!(
        refused(&td(), &ept(SHARED | 0x9000, 0x9000), f),
        VeError::Zeropad(NotHandled::UnsupportedAddressing)
    );
}

// ---- properties -------------------------------------------------------------

fn hostile() -> impl Strategy<Value = Option<TdxEmulationHostile>> {
    prop_oneof![
        Just(None),
        Just(Some(TdxEmulationHostile::GarbageAboveAccess)),
        any::<u64>().prop_map(|v| Some(TdxEmulationHostile::Answer(v))),
        prop_oneof![Just(VMCALL_INVALID_OPERAND), Just(1), any::<u64>()]
            .prop_map(|s| Some(TdxEmulationHostile::Status(s))),
        Just(Some(TdxEmulationHostile::TdcallFails(TDX_OPERAND_INVALID))),
    ]
}

/// A #VE of every kind, with qualifications and lengths both sane and not.
fn any_ve() -> impl Strategy<Value = VeInfo> {
    let reason = prop_oneof![
        Just(CPUID),
        Just(IO),
        Just(RDMSR),
        Just(WRMSR),
        Just(EPT_VIOLATION),
        any::<u32>()
    ];
    let qualification = prop_oneof![
        (any::<u16>(), prop::sample::select(vec![1u64, 2, 4]), any::<bool>()).prop_map(|(p, b, i)| io(p, b, i)),
        (0u64..64).prop_map(|low| 0x3F8 << 16 | low),
        any::<u64>(),
    ];
    let length = prop_oneof![1u32..=15, any::<u32>()];
    let gpa = prop_oneof![any::<u64>(), any::<u64>().prop_map(|g| g | SHARED)];
    (reason, qualification, length, gpa, any::<u64>()).prop_map(|(r, q, l, gpa, gla)| VeInfo {
        gpa,
        gla,
        ..ve(r, q, l)
    })
}

fn any_frame() -> impl Strategy<Value = FaultFrame> {
    (
        any::<[u64; 16]>(),
        any::<u64>(),
        0x4000_0000u64..=0x4000_0001,
        any::<bool>(),
    )
        .prop_map(|(gprs, rip, hv_leaf, ask_hv)| {
            let mut f = FaultFrame { gprs, rip };
            if ask_hv {
                // Often a leaf the VMM answers and an MSR it emulates.
                f.gprs[Gpr::Rax as usize] = hv_leaf;
                f.gprs[Gpr::Rcx as usize] = MSR_KVM_WALL_CLOCK as u64;
            }
            f
        })
}

/// The registers each emulated instruction writes.
fn outputs(ve: &VeInfo) -> &'static [Gpr] {
    match ve.exit_reason {
        CPUID => &[Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx],
        RDMSR => &[Gpr::Rax, Gpr::Rdx],
        IO if ve.exit_qualification & 1 << 3 != 0 => &[Gpr::Rax],
        _ => &[],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Whatever the #VE and whatever the VMM does: an error or MMIO leaves
    /// every register as it was; an emulated instruction moves RIP by its
    /// length and writes no register but its outputs, none of them with a
    /// bit above 32 unless the instruction keeps it from before.
    #[test]
    fn nothing_changes_but_what_the_instruction_writes(ve in any_ve(), before in any_frame(), hostile in hostile()) {
        let td = td();
        td.set_emulation_hostile(hostile);
        let mut f = before;
        match handle(&td, &ve, &mut f) {
            Err(_) | Ok(VeOutcome::Mmio(_)) => prop_assert_eq!(f, before),
            Ok(VeOutcome::Emulated) => {
                prop_assert!(ve.exit_reason != EPT_VIOLATION, "no zeropad site in these frames");
                prop_assert_eq!(f.rip, before.rip.wrapping_add(ve.instruction_length as u64));
                let written = outputs(&ve);
                for reg in Gpr::ALL {
                    let (now, was) = (f.gprs[reg as usize], before.gprs[reg as usize]);
                    if !written.contains(&reg) {
                        prop_assert_eq!(now, was, "{:?} changed", reg);
                    } else if ve.exit_reason == IO {
                        let keep = match ve.exit_qualification & 7 { 0 => !0xFF, 1 => !0xFFFF, _ => 0 };
                        prop_assert_eq!(now & keep, was & keep, "IN changed RAX above its access");
                    } else {
                        prop_assert!(now <= u32::MAX as u64, "{:?} = {:#x}", reg, now);
                    }
                }
            }
        }
    }

    /// Whatever 64 bits the VMM answers an `IN` with, RAX gets the bits of
    /// the access from it and keeps (8 and 16 bits) or clears (32 bits)
    /// the rest.
    #[test]
    fn in_takes_only_its_bytes_from_the_vmm(raw in any::<u64>(), rax in any::<u64>(), port in any::<u16>(), bytes in prop::sample::select(vec![1u64, 2, 4])) {
        let td = td();
        td.set_emulation_hostile(Some(TdxEmulationHostile::Answer(raw)));
        let mut f = with(frame(), &[(Gpr::Rax, rax)]);
        handle(&td, &ve(IO, io(port, bytes, true), 1), &mut f).unwrap();
        let mask = (1u64 << (8 * bytes)) - 1;
        let keep = if bytes == 4 { 0 } else { rax & !mask };
        prop_assert_eq!(f.gprs[Gpr::Rax as usize], keep | raw & mask);
    }
}
