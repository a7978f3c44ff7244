//! Properties of the #VC handler over random bytes, registers and lies:
//! the decoder agrees with a second, independent reading of the encoding
//! (so it never panics and never takes other bytes for IN/OUT); a refused
//! #VC leaves every register as it was, a completed one changes only what
//! the instruction writes; an IN never leaves bits above its size.

use coco_convert::exception::vc::{decode_port_io, decode_system, handle_vc, PortOperand, SystemInstruction};
use coco_convert::exception::vc::{EXIT_CPUID, EXIT_IOIO, EXIT_MSR};
use coco_convert::exception::{FaultFrame, Gpr, RegisterAccess};
use hvmock::{GhcbReg, MockSnp, SnpConfig, SnpHostile};
use integration::{boot_ghcb, snp, MIB};
use proptest::prelude::*;
use snp_ghcb::ioio::{AddressSize, Direction};
use snp_ghcb::{GhcbPage, IoSize};

const SEGMENTS: [u8; 6] = [0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65];

/// The IN/OUT encoding read a second way: (direction, size, port, address
/// size, length), or `None` for anything else.
fn reference(bytes: &[u8]) -> Option<(Direction, IoSize, PortOperand, AddressSize, usize)> {
    let mut at = 0;
    let (mut o16, mut a32, mut w) = (false, false, false);
    while let Some(&b) = bytes.get(at) {
        if b == 0x66 {
            o16 = true;
        } else if b == 0x67 {
            a32 = true;
        } else if !SEGMENTS.contains(&b) {
            break;
        }
        at += 1;
    }
    if let Some(&b) = bytes.get(at) {
        if (0x40..=0x4F).contains(&b) {
            w = b & 8 != 0;
            at += 1;
        }
    }
    let op = *bytes.get(at)?;
    let (direction, port, len) = match op {
        0xE4 | 0xE5 => (Direction::In, PortOperand::Imm8(*bytes.get(at + 1)?), at + 2),
        0xE6 | 0xE7 => (Direction::Out, PortOperand::Imm8(*bytes.get(at + 1)?), at + 2),
        0xEC | 0xED => (Direction::In, PortOperand::Dx, at + 1),
        0xEE | 0xEF => (Direction::Out, PortOperand::Dx, at + 1),
        _ => return None,
    };
    if len > 15 {
        return None;
    }
    let size = match (op % 2, w, o16) {
        (0, _, _) => IoSize::Byte,
        (_, false, true) => IoSize::Word,
        _ => IoSize::Dword,
    };
    let address = if a32 { AddressSize::Bits32 } else { AddressSize::Bits64 };
    Some((direction, size, port, address, len))
}

/// Bytes that are mostly prefixes and the opcodes around IN/OUT, so the
/// interesting encodings come up often.
fn code() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => prop::sample::select(vec![
            0x66u8, 0x67, 0x2E, 0x3E, 0x64, 0x40, 0x41, 0x48, 0x4F, 0xF0, 0xF2, 0xF3, 0x6C, 0x6D, 0x6E, 0x6F,
            0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x0F, 0xA2, 0x30, 0x32,
        ]),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..20)
}

fn guest() -> (MockSnp, GhcbPage) {
    let hv = snp(MIB, SnpConfig::default());
    let ghcb = boot_ghcb(&hv);
    (hv, ghcb)
}

fn lie() -> impl Strategy<Value = Option<SnpHostile>> {
    let reg = prop::sample::select(vec![GhcbReg::Rax, GhcbReg::Rbx, GhcbReg::Rcx, GhcbReg::Rdx]);
    prop_oneof![
        Just(None),
        Just(Some(SnpHostile::NaeNothingValid)),
        reg.prop_map(|r| Some(SnpHostile::NaeNotValid(r))),
        any::<u64>().prop_map(|g| Some(SnpHostile::NaeGarbageAbove(g))),
        any::<u64>().prop_map(|i| Some(SnpHostile::NaeExitInfo1(i))),
        any::<u64>().prop_map(|i| Some(SnpHostile::NaeInject(i))),
    ]
}

/// An instruction the handler completes, or bytes it should refuse, with
/// the error code a #VC would carry (sometimes the wrong one).
fn instruction() -> impl Strategy<Value = (u64, Vec<u8>)> {
    let known = prop::sample::select(vec![
        (EXIT_IOIO, vec![0xEC]),
        (EXIT_IOIO, vec![0x66, 0xED]),
        (EXIT_IOIO, vec![0xED]),
        (EXIT_IOIO, vec![0xE4, 0x80]),
        (EXIT_IOIO, vec![0x66, 0x48, 0xE5, 0xF4]),
        (EXIT_IOIO, vec![0xEE]),
        (EXIT_IOIO, vec![0x66, 0xEF]),
        (EXIT_IOIO, vec![0xE7, 0xF4]),
        (EXIT_IOIO, vec![0xF3, 0x6C]),
        (EXIT_CPUID, vec![0x0F, 0xA2]),
        (EXIT_MSR, vec![0x0F, 0x32]),
        (EXIT_MSR, vec![0x0F, 0x30]),
        (EXIT_MSR, vec![0x0F, 0xA2]),
    ]);
    prop_oneof![
        4 => known,
        1 => (prop::sample::select(vec![EXIT_IOIO, EXIT_CPUID, EXIT_MSR, 0x400]), code()),
    ]
}

fn registers() -> impl Strategy<Value = FaultFrame> {
    (
        prop::array::uniform16(any::<u64>()),
        any::<u64>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(mut gprs, rip, port, model_msr)| {
            // DX: a port of the model's devices half the time, the MSR in
            // RCX one the model knows half the time.
            gprs[Gpr::Rdx as usize] = gprs[Gpr::Rdx as usize] & !0xFFFF | [port as u64, 0x3FD][port as usize % 2];
            if model_msr {
                gprs[Gpr::Rcx as usize] = 0x4B56_4D00;
            }
            FaultFrame { gprs, rip }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_agrees_with_a_second_reading(bytes in code()) {
        let decoded = decode_port_io(&bytes).ok().map(|d| (d.direction, d.size, d.port, d.address_size, d.len));
        prop_assert_eq!(decoded, reference(&bytes));
        // CPUID/RDMSR/WRMSR: only 0F A2/32/30 after the prefixes.
        if let Ok((insn, len)) = decode_system(&bytes) {
            let (op, rest) = (bytes[len - 1], &bytes[..len - 2]);
            prop_assert_eq!(bytes[len - 2], 0x0F);
            let expected = match op {
                0xA2 => SystemInstruction::Cpuid,
                0x32 => SystemInstruction::Rdmsr,
                _ => SystemInstruction::Wrmsr,
            };
            prop_assert!([0xA2, 0x32, 0x30].contains(&op));
            prop_assert_eq!(insn, expected);
            let legacy = rest.iter().take_while(|b| **b == 0x66 || **b == 0x67 || SEGMENTS.contains(b)).count();
            prop_assert!(rest.len() == legacy || (rest.len() == legacy + 1 && rest[legacy] & 0xF0 == 0x40));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_refused_vc_changes_no_register_and_a_completed_one_only_its_own(
        (code, bytes) in instruction(),
        regs in registers(),
        lie in lie(),
    ) {
        let (hv, mut ghcb) = guest();
        hv.set_hostile(lie);
        let mut after = regs;
        // SAFETY: the model's memory is not used by Rust code.
        let done = unsafe { handle_vc(&hv, &mut ghcb, code, &mut after, &bytes, 0x7) };
        match done {
            Err(_) => prop_assert_eq!(after, regs),
            Ok(_) => {
                let (len, written): (usize, &[Gpr]) = if code == EXIT_IOIO {
                    let (direction, _, _, _, len) = reference(&bytes).expect("completed, so IN or OUT");
                    (len, if direction == Direction::In { &[Gpr::Rax] } else { &[] })
                } else {
                    // Prefixes never hold 0x0F: the opcode ends one past it.
                    let len = bytes.iter().position(|&b| b == 0x0F).expect("completed, so 0F xx") + 2;
                    let written: &[Gpr] = match bytes[len - 1] {
                        0xA2 => &[Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx],
                        0x32 => &[Gpr::Rax, Gpr::Rdx],
                        _ => &[],
                    };
                    (len, written)
                };
                prop_assert_eq!(after.rip, regs.rip.wrapping_add(len as u64));
                for r in Gpr::ALL.into_iter().filter(|r| !written.contains(r)) {
                    prop_assert_eq!(after.gpr(r), regs.gpr(r), "{:?}", r);
                }
            }
        }
        // Whatever the lie, the guest never sent a malformed request.
        prop_assert_eq!(hv.stats().protocol_violations, 0);
    }

    #[test]
    fn an_in_never_leaves_bits_above_its_size(
        rax in any::<u64>(),
        port in any::<u16>(),
        form in 0..3usize,
        garbage in any::<u64>(),
    ) {
        let (hv, mut ghcb) = guest();
        hv.set_hostile(Some(SnpHostile::NaeGarbageAbove(garbage)));
        let (bytes, mask): (&[u8], u64) = [(&[0xEC][..], 0xFF), (&[0x66, 0xED][..], 0xFFFF), (&[0xED][..], 0xFFFF_FFFF)][form];
        let mut regs = FaultFrame::default();
        regs.set_gpr(Gpr::Rax, rax);
        regs.set_gpr(Gpr::Rdx, port as u64);
        // SAFETY: as above.
        unsafe { handle_vc(&hv, &mut ghcb, EXIT_IOIO, &mut regs, bytes, 1) }.unwrap();
        let new = regs.gpr(Gpr::Rax);
        if mask == 0xFFFF_FFFF {
            // A 32-bit register write clears bits 63:32.
            prop_assert_eq!(new >> 32, 0);
        } else {
            prop_assert_eq!(new & !mask, rax & !mask);
        }
        // And the bits of the access are the devices', not the lie's: each
        // byte port read in turn, COM1's line status "transmitter empty",
        // its other registers 0, nothing elsewhere (all ones).
        let bytes = mask.count_ones() / 8;
        let device = (0..bytes).fold(0u64, |value, i| {
            let byte = match port.wrapping_add(i as u16) {
                0x3FD => 0x60,
                0x3F8..=0x3FF => 0,
                _ => 0xFF,
            };
            value | byte << (8 * i)
        });
        prop_assert_eq!(new & mask, device);
    }
}
