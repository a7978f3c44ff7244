//! The #VC handler against the SNP model: each instruction it completes,
//! decoded from its bytes, the registers and RIP after it, the bytes it
//! refuses, and every lie of the hypervisor leaving the registers as they
//! were.

use coco_convert::exception::vc::{
    handle_vc, DecodeError, Handled, SystemInstruction, VcError, EXIT_CPUID, EXIT_IOIO, EXIT_MSR,
};
use coco_convert::exception::{FaultFrame, Gpr, RegisterAccess};
use coco_convert::platform::snp::{PerCpuGhcbs, Snp};
use coco_convert::{Target, Visibility};
use hvmock::emulation::{COM1, DEBUG_EXIT};
use hvmock::snp::nae::INJECT_GP;
use hvmock::{GhcbReg, MockSnp, SnpConfig, SnpHostile};
use integration::sim::current_cpu;
use integration::world::{Shape, SnpWorld};
use integration::{boot_ghcb, snp, MIB};
use snp_ghcb::{EventError, Exception, Field, GhcbMsr, GhcbPage, IoSize};

const RIP: u64 = 0xFFFF_FFFF_8100_0000;
/// COM1's line status register: "transmitter empty", nothing received.
const COM1_LSR: u16 = COM1 + 5;
/// KVM's wall-clock MSR, which the model's VMM emulates.
const KVM_WALL_CLOCK: u32 = 0x4B56_4D00;

fn guest() -> (MockSnp, GhcbPage) {
    let hv = snp(MIB, SnpConfig::default());
    let ghcb = boot_ghcb(&hv);
    (hv, ghcb)
}

/// Every GPR distinct, so a stray write shows.
fn frame(rax: u64, rcx: u64, rdx: u64) -> FaultFrame {
    let mut f = FaultFrame {
        gprs: core::array::from_fn(|i| 0x0101_0101_0101_0101 * (i as u64 + 1)),
        rip: RIP,
    };
    f.set_gpr(Gpr::Rax, rax);
    f.set_gpr(Gpr::Rcx, rcx);
    f.set_gpr(Gpr::Rdx, rdx);
    f
}

fn vc(hv: &MockSnp, ghcb: &mut GhcbPage, code: u64, regs: &mut FaultFrame, bytes: &[u8]) -> Result<Handled, VcError> {
    // SAFETY: the model's memory is not used by Rust code; the GHCB is in
    // no other call.
    unsafe { handle_vc(hv, ghcb, code, regs, bytes, 0x7) }
}

/// `after` is `before` with `changed` set and RIP moved by `len`.
fn assert_only(before: &FaultFrame, after: &FaultFrame, changed: &[(Gpr, u64)], len: u64) {
    let mut expected = *before;
    for &(r, v) in changed {
        expected.set_gpr(r, v);
    }
    expected.rip = before.rip + len;
    assert_eq!(*after, expected);
}

#[test]
fn out_dx_al_writes_the_console_and_advances_rip() {
    let (hv, mut ghcb) = guest();
    let mut regs = frame(0xAAAA_AAAA_AAAA_AA41, 0, COM1 as u64);
    let before = regs;
    let done = vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, &[0xEE, 0x90, 0x90]);
    assert_eq!(
        done,
        Ok(Handled::PortOut {
            port: COM1,
            size: IoSize::Byte,
            value: 0x41
        })
    );
    assert_eq!(hv.console(), b"A");
    assert_only(&before, &regs, &[], 1);
    // Only AL left the guest.
    assert_eq!(hv.last_nae_inputs().unwrap().rax, Some(0x41));
    assert_eq!(hv.stats().protocol_violations, 0);
}

#[test]
fn out_imm8_writes_al_ax_or_eax() {
    let (hv, mut ghcb) = guest();
    for (bytes, value, len) in [
        (&[0xE6, 0xF4][..], 0x78, 2),
        (&[0x66, 0xE7, 0xF4][..], 0x5678, 3),
        (&[0xE7, 0xF4][..], 0x1234_5678, 2),
    ] {
        let mut regs = frame(0xFFFF_FFFF_1234_5678, 0, 0);
        let before = regs;
        vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes).unwrap();
        assert_eq!(hv.debug_exit(), Some(value), "{bytes:x?}");
        assert_only(&before, &regs, &[], len);
    }
}

#[test]
fn in_al_keeps_the_rest_of_rax() {
    let (hv, mut ghcb) = guest();
    let mut regs = frame(0x1122_3344_5566_7788, 0, COM1_LSR as u64);
    let before = regs;
    let done = vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, &[0xEC]).unwrap();
    assert_eq!(
        done,
        Handled::PortIn {
            port: COM1_LSR,
            size: IoSize::Byte,
            value: 0x60
        }
    );
    assert_only(&before, &regs, &[(Gpr::Rax, 0x1122_3344_5566_7760)], 1);
}

/// 0x66 makes eAX AX: the 16 bits merge into RAX, where EAX would clear
/// bits 63:32.
#[test]
fn in_ax_with_0x66_reads_16_bits() {
    let (hv, mut ghcb) = guest();
    let mut regs = frame(0x1122_3344_5566_7788, 0, 0x80);
    let before = regs;
    vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, &[0x66, 0xED]).unwrap();
    assert_only(&before, &regs, &[(Gpr::Rax, 0x1122_3344_5566_FFFF)], 2);
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(sent.info1, 0x80 << 16 | 1 << 9 | 1 << 5 | 1, "SZ16");
    let mut regs = frame(0x1122_3344_5566_7788, 0, 0x80);
    vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, &[0xED]).unwrap();
    assert_eq!(regs.gpr(Gpr::Rax), 0xFFFF_FFFF);
    assert_eq!(hv.last_nae_inputs().unwrap().info1 & 0x70, 1 << 6, "SZ32");
}

#[test]
fn in_imm8_forms_take_their_port_from_the_byte() {
    let (hv, mut ghcb) = guest();
    for (bytes, size, len) in [
        (&[0xE4, 0x80][..], IoSize::Byte, 2),
        (&[0x66, 0xE5, 0x80][..], IoSize::Word, 3),
        (&[0xE5, 0x80][..], IoSize::Dword, 2),
    ] {
        // DX points elsewhere: the immediate wins.
        let mut regs = frame(0, 0, COM1 as u64);
        let done = vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes).unwrap();
        let all_ones = size.mask() as u32;
        assert_eq!(
            done,
            Handled::PortIn {
                port: 0x80,
                size,
                value: all_ones
            }
        );
        assert_eq!(regs.gpr(Gpr::Rax), all_ones as u64);
        assert_eq!(regs.rip, RIP + len);
    }
}

/// REX.W takes precedence over 0x66 (a port access has no 64-bit form, so
/// it stays 32 bits); other REX bits change nothing.
#[test]
fn rex_prefixes_are_taken_and_rex_w_overrides_0x66() {
    let (hv, mut ghcb) = guest();
    for (bytes, rax, len) in [
        (&[0x66, 0x48, 0xED][..], 0xFFFF_FFFF, 3),
        (&[0x66, 0x41, 0xED][..], 0x1122_3344_5566_FFFF, 3),
        (&[0x48, 0xEC][..], 0x1122_3344_5566_77FF, 2),
    ] {
        let mut regs = frame(0x1122_3344_5566_7788, 0, 0x80);
        vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes).unwrap();
        assert_eq!((regs.gpr(Gpr::Rax), regs.rip), (rax, RIP + len), "{bytes:x?}");
    }
}

#[test]
fn segment_and_address_size_prefixes_are_taken() {
    let (hv, mut ghcb) = guest();
    let mut regs = frame(0, 0, COM1_LSR as u64);
    vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, &[0x2E, 0x67, 0x3E, 0xEC]).unwrap();
    assert_eq!((regs.gpr(Gpr::Rax), regs.rip), (0x60, RIP + 4));
    assert_eq!(hv.last_nae_inputs().unwrap().info1 & (0x7 << 7), 1 << 8, "A32");
}

#[test]
fn rip_advances_by_the_decoded_length() {
    let (hv, mut ghcb) = guest();
    for (bytes, len) in [
        (&[0x2E, 0x66, 0x67, 0x41, 0xE5, 0x80, 0x90][..], 6),
        (&[0x66; 14].iter().chain(&[0xEC]).copied().collect::<Vec<u8>>()[..], 15),
        (
            &[0x66; 13].iter().chain(&[0xE4, 0x80]).copied().collect::<Vec<u8>>()[..],
            15,
        ),
    ] {
        let mut regs = frame(0, 0, 0x80);
        vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes).unwrap();
        assert_eq!(regs.rip, RIP + len);
    }
    let mut regs = frame(0, 0, 0);
    vc(&hv, &mut ghcb, EXIT_CPUID, &mut regs, &[0x0F, 0xA2, 0x0F]).unwrap();
    assert_eq!(regs.rip, RIP + 2);
    let mut regs = frame(0, KVM_WALL_CLOCK as u64, 0);
    vc(&hv, &mut ghcb, EXIT_MSR, &mut regs, &[0x3E, 0x0F, 0x32]).unwrap();
    assert_eq!(regs.rip, RIP + 3);
}

#[test]
fn string_io_is_refused() {
    let (hv, mut ghcb) = guest();
    for (bytes, op) in [
        (&[0x6C][..], 0x6C),
        (&[0x6D][..], 0x6D),
        (&[0x6E][..], 0x6E),
        (&[0x6F][..], 0x6F),
        (&[0xF3, 0x6C][..], 0x6C),
        (&[0xF3, 0x66, 0x6D][..], 0x6D),
        (&[0x66, 0xF3, 0x48, 0x6F][..], 0x6F),
        (&[0xF2, 0x6E][..], 0x6E),
    ] {
        let mut regs = frame(0x41, 1, COM1 as u64);
        let before = regs;
        let refused = vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes);
        assert_eq!(refused, Err(VcError::Decode(DecodeError::StringIo(op))), "{bytes:x?}");
        assert_eq!(regs, before);
    }
    assert_eq!(hv.last_nae_inputs(), None, "no exit was made");
    assert!(hv.console().is_empty());
}

#[test]
fn other_bytes_are_refused() {
    let (hv, mut ghcb) = guest();
    let sixteen: Vec<u8> = [0x66; 15].iter().chain(&[0xEC]).copied().collect();
    let imm_past_15: Vec<u8> = [0x66; 14].iter().chain(&[0xE4, 0x80]).copied().collect();
    for (bytes, error) in [
        (&[0xF0, 0xEC][..], DecodeError::Prefix(0xF0)),
        (&[0xF3, 0xEC][..], DecodeError::Prefix(0xF3)),
        (&[0xF2, 0xEE][..], DecodeError::Prefix(0xF2)),
        (&[0x90][..], DecodeError::Unexpected(0x90)),
        (&[0x0F, 0xA2][..], DecodeError::Unexpected(0x0F)),
        // A REX before a legacy prefix does not count; the decoder does
        // not guess.
        (&[0x48, 0x66, 0xED][..], DecodeError::Unexpected(0x66)),
        (&[][..], DecodeError::Truncated),
        (&[0x66][..], DecodeError::Truncated),
        (&[0xE4][..], DecodeError::Truncated),
        (&sixteen[..], DecodeError::TooLong),
        (&imm_past_15[..], DecodeError::TooLong),
    ] {
        let mut regs = frame(0x41, 1, COM1 as u64);
        let before = regs;
        assert_eq!(
            vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes),
            Err(VcError::Decode(error)),
            "{bytes:x?}"
        );
        assert_eq!(regs, before);
    }
    assert_eq!(hv.last_nae_inputs(), None, "no exit was made");
}

#[test]
fn cpuid_fills_four_registers_zero_extended() {
    let (hv, mut ghcb) = guest();
    hv.set_cpuid(1, 0, [0x11, 0x22, 0x33, 0x44]);
    let mut regs = frame(0xFFFF_FFFF_0000_0001, 0xAAAA_AAAA_0000_0000, 0xDDDD_DDDD_DDDD_DDDD);
    let before = regs;
    let done = vc(&hv, &mut ghcb, EXIT_CPUID, &mut regs, &[0x0F, 0xA2]);
    assert_eq!(done, Ok(Handled::Cpuid { leaf: 1, subleaf: 0 }));
    assert_only(
        &before,
        &regs,
        &[(Gpr::Rax, 0x11), (Gpr::Rbx, 0x22), (Gpr::Rcx, 0x33), (Gpr::Rdx, 0x44)],
        2,
    );
    // EAX and ECX alone left the guest.
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!((sent.rax, sent.rcx, sent.rdx), (Some(1), Some(0), None));
}

#[test]
fn cpuid_leaf_0xd_uses_the_xcr0_given() {
    let (hv, mut ghcb) = guest();
    let mut regs = frame(0xD, 0, 0);
    // SAFETY: as in `vc`.
    unsafe { handle_vc(&hv, &mut ghcb, EXIT_CPUID, &mut regs, &[0x0F, 0xA2], 0x3) }.unwrap();
    assert_eq!(regs.gpr(Gpr::Rbx), 576);
    assert_eq!(hv.last_nae_inputs().unwrap().xcr0, Some(0x3));
    let mut regs = frame(0xD, 0, 0);
    vc(&hv, &mut ghcb, EXIT_CPUID, &mut regs, &[0x0F, 0xA2]).unwrap();
    assert_eq!(regs.gpr(Gpr::Rbx), 832);
}

#[test]
fn rdmsr_and_wrmsr_are_told_apart_by_their_opcode() {
    let (hv, mut ghcb) = guest();
    let mut regs = frame(
        0xFFFF_FFFF_9ABC_DEF0,
        0xFFFF_FFFF_0000_0000 | KVM_WALL_CLOCK as u64,
        0xFFFF_FFFF_1234_5678,
    );
    let before = regs;
    assert_eq!(
        vc(&hv, &mut ghcb, EXIT_MSR, &mut regs, &[0x0F, 0x30]),
        Ok(Handled::Wrmsr { msr: KVM_WALL_CLOCK })
    );
    assert_only(&before, &regs, &[], 2);
    assert_eq!(hv.msr(KVM_WALL_CLOCK), Some(0x1234_5678_9ABC_DEF0));
    let sent = hv.last_nae_inputs().unwrap();
    assert_eq!(
        (sent.info1, sent.rcx, sent.rax, sent.rdx),
        (1, Some(KVM_WALL_CLOCK as u64), Some(0x9ABC_DEF0), Some(0x1234_5678))
    );
    let mut regs = frame(0xFFFF_FFFF_FFFF_FFFF, KVM_WALL_CLOCK as u64, 0xFFFF_FFFF_FFFF_FFFF);
    let before = regs;
    assert_eq!(
        vc(&hv, &mut ghcb, EXIT_MSR, &mut regs, &[0x0F, 0x32]),
        Ok(Handled::Rdmsr { msr: KVM_WALL_CLOCK })
    );
    assert_only(&before, &regs, &[(Gpr::Rax, 0x9ABC_DEF0), (Gpr::Rdx, 0x1234_5678)], 2);
    assert_eq!(hv.last_nae_inputs().unwrap().info1, 0);
}

#[test]
fn an_msr_the_hypervisor_refuses_is_a_gp_to_raise() {
    let (hv, mut ghcb) = guest();
    for bytes in [[0x0F, 0x32], [0x0F, 0x30]] {
        let mut regs = frame(1, 0x1234, 2);
        let before = regs;
        let refused = vc(&hv, &mut ghcb, EXIT_MSR, &mut regs, &bytes).unwrap_err();
        assert_eq!(refused.exception(), Some(Exception::GeneralProtection(0)));
        assert_eq!(
            refused,
            VcError::Event(EventError::Exception(Exception::GeneralProtection(0)))
        );
        assert_eq!(regs, before);
    }
}

#[test]
fn the_error_code_and_the_bytes_must_agree() {
    let (hv, mut ghcb) = guest();
    for (code, bytes, error) in [
        (
            EXIT_CPUID,
            &[0x0F, 0x32][..],
            VcError::ExitMismatch {
                error_code: EXIT_CPUID,
                found: SystemInstruction::Rdmsr,
            },
        ),
        (
            EXIT_MSR,
            &[0x0F, 0xA2][..],
            VcError::ExitMismatch {
                error_code: EXIT_MSR,
                found: SystemInstruction::Cpuid,
            },
        ),
        (EXIT_MSR, &[0xEC][..], VcError::Decode(DecodeError::Unexpected(0xEC))),
        (
            EXIT_CPUID,
            &[0x0F, 0x31][..],
            VcError::Decode(DecodeError::Unexpected(0x31)),
        ),
        (
            EXIT_CPUID,
            &[0xF0, 0x0F, 0xA2][..],
            VcError::Decode(DecodeError::Prefix(0xF0)),
        ),
        (EXIT_CPUID, &[0x0F][..], VcError::Decode(DecodeError::Truncated)),
        (0x400, &[0x8B, 0x00][..], VcError::UnsupportedExit(0x400)),
        (0x6E, &[0x0F, 0x31][..], VcError::UnsupportedExit(0x6E)),
    ] {
        let mut regs = frame(1, KVM_WALL_CLOCK as u64, 2);
        let before = regs;
        assert_eq!(
            vc(&hv, &mut ghcb, code, &mut regs, bytes),
            Err(error),
            "{code:#x} {bytes:x?}"
        );
        assert_eq!(regs, before);
    }
    assert_eq!(hv.last_nae_inputs(), None, "no exit was made");
}

/// Every lie, against every instruction: refused wherever the lie touches
/// what the instruction reads back, and then not one register, RIP
/// included, changed.
#[test]
fn a_refused_answer_changes_no_register() {
    use GhcbReg::{Rax, Rbx, Rcx, Rdx};
    let (hv, mut ghcb) = guest();
    let lies = [
        SnpHostile::NaeNothingValid,
        SnpHostile::NaeNotValid(Rax),
        SnpHostile::NaeNotValid(Rbx),
        SnpHostile::NaeNotValid(Rcx),
        SnpHostile::NaeNotValid(Rdx),
        SnpHostile::NaeExitInfo1(2),
        SnpHostile::NaeExitInfo1(7),
        SnpHostile::NaeInject(INJECT_GP),
        SnpHostile::NaeInject(1 << 31 | 3 << 8 | 14),
    ];
    // (error code, bytes, DX, the registers the instruction reads back)
    let instructions: [(u64, &[u8], u64, &[GhcbReg]); 6] = [
        (EXIT_IOIO, &[0xEC], COM1_LSR as u64, &[Rax]),
        (EXIT_IOIO, &[0x66, 0xE5, 0x80], 0, &[Rax]),
        (EXIT_IOIO, &[0xEF], DEBUG_EXIT as u64, &[]),
        (EXIT_CPUID, &[0x0F, 0xA2], 0, &[Rax, Rbx, Rcx, Rdx]),
        (EXIT_MSR, &[0x0F, 0x32], 0, &[Rax, Rdx]),
        (EXIT_MSR, &[0x0F, 0x30], 0, &[]),
    ];
    for lie in lies {
        hv.set_hostile(Some(lie));
        for (code, bytes, rdx, reads) in instructions {
            let must_refuse = match lie {
                SnpHostile::NaeNothingValid => !reads.is_empty(),
                SnpHostile::NaeNotValid(reg) => reads.contains(&reg),
                _ => true,
            };
            let mut regs = frame(0x1122_3344_5566_7788, KVM_WALL_CLOCK as u64, rdx);
            let before = regs;
            let done = vc(&hv, &mut ghcb, code, &mut regs, bytes);
            assert_eq!(done.is_err(), must_refuse, "{lie:?} {bytes:x?}: {done:?}");
            if let Err(e) = done {
                assert!(matches!(e, VcError::Event(_)), "{e:?}");
                assert_eq!(regs, before, "{lie:?} {bytes:x?}");
            }
        }
    }
}

/// With the engine's per-CPU slots the handler borrows the CPU's page,
/// and never while a page state change of that CPU holds it.
#[test]
fn a_slot_lends_its_page_to_the_vc_handler_unless_a_conversion_holds_it() {
    /// The hypervisor, seen by a #VC that arrives during every exit.
    struct InterruptingHv<'a> {
        snp: &'a MockSnp,
        slots: &'a [coco_convert::platform::snp::GhcbSlot],
        lent_during_exits: std::sync::Mutex<Vec<bool>>,
    }
    // SAFETY: forwards to the model.
    unsafe impl GhcbMsr for InterruptingHv<'_> {
        unsafe fn vmgexit(&self, msr_value: u64) -> u64 {
            if msr_value & 0xFFF == 0 {
                let lent = self.slots[current_cpu()].try_with(|_| ()).is_some();
                self.lent_during_exits.lock().unwrap().push(lent);
            }
            // SAFETY: forwarded.
            unsafe { self.snp.vmgexit(msr_value) }
        }
    }
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let hv = InterruptingHv {
        snp: &w.snp,
        slots: w.ghcbs,
        lent_during_exits: Default::default(),
    };
    let platform = Snp::new(&hv, &w.snp, PerCpuGhcbs::new(w.ghcbs, current_cpu), 51).unwrap();
    let e = w.m.engine(platform).with_window(&w.m.windows);
    let slot = &w.ghcbs[current_cpu()];
    assert_eq!(slot.try_with(|_| ()), None, "an empty slot lends nothing");
    // SAFETY: negotiation has no memory effect.
    unsafe { snp_ghcb::protocol::negotiate(&w.snp) }.unwrap();
    let pa = 1536 * MIB;
    let ptr = std::ptr::NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
    // SAFETY: the page is used by nothing else.
    unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.unwrap();
    e.convert(
        Target::Physical {
            pa: 64 * MIB,
            len: 4096,
        },
        Visibility::Shared,
    )
    .unwrap();
    let lent = hv.lent_during_exits.lock().unwrap().clone();
    assert!(!lent.is_empty() && lent.iter().all(|&l| !l), "{lent:?}");
    // Between conversions the page is the handler's.
    let mut regs = frame(0x41, 0, COM1 as u64);
    let done = slot.try_with(|ghcb| {
        // SAFETY: the slot's page is registered for this CPU and in no
        // call.
        unsafe { handle_vc(&w.snp, ghcb, EXIT_IOIO, &mut regs, &[0xEE], 1) }
    });
    assert!(matches!(done, Some(Ok(Handled::PortOut { .. }))), "{done:?}");
    assert_eq!(w.snp.console(), b"A");
    assert_eq!(slot.try_with(|ghcb| ghcb.field(Field::SwExitCode)), Some(0x7B));
}

/// Another CPU asking whether a slot is filled, or for its GPA (as an OS's
/// bookkeeping does), must never make the owning CPU's #VC handler find
/// its page taken: that handler has no other way to the hypervisor.
#[test]
fn another_cpu_looking_at_a_slot_never_takes_the_page_from_its_vc_handler() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let platform = Snp::new(&w.snp, &w.snp, PerCpuGhcbs::new(w.ghcbs, current_cpu), 51).unwrap();
    let e = w.m.engine(platform).with_window(&w.m.windows);
    // SAFETY: negotiation has no memory effect.
    unsafe { snp_ghcb::protocol::negotiate(&w.snp) }.unwrap();
    let pa = 1536 * MIB;
    let ptr = std::ptr::NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
    // SAFETY: the page is used by nothing else.
    unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.unwrap();
    let slot = &w.ghcbs[current_cpu()];
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let looker = s.spawn(|| {
            let mut looks = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(slot.is_filled());
                assert_eq!(slot.gpa(), Some(pa));
                looks += 1;
            }
            looks
        });
        let refused = (0..300_000).filter(|_| slot.try_with(|_| ()).is_none()).count();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let looks = looker.join().unwrap();
        assert!(looks > 0, "the other CPU never looked");
        assert_eq!(
            refused, 0,
            "the handler found its page taken {refused} times while another CPU looked {looks} times"
        );
    });
}
