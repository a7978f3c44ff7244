//! The fix-up against random instruction bytes, registers and fault
//! addresses: never a panic; when it declines, nothing changed and nothing
//! was read; when it accepts, it read the aligned word just below the fault
//! and changed one register and RIP, exactly as a zero-padded load would.

use coco_convert::zeropad::{self, FaultFrame, Gpr};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const WORD: u64 = 0x0123_4567_89AB_CDEF;

fn code() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Anything at all.
        prop::collection::vec(any::<u8>(), 0..16),
        // Something close to the real thing: optional prefixes, REX,
        // 8B, ModRM, SIB, displacement.
        (
            prop::collection::vec(
                prop::sample::select(vec![0x26u8, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3]),
                0..2
            ),
            0x40u8..0x50,
            prop::sample::select(vec![0x8Bu8, 0x89, 0x8D, 0x8A, 0x03]),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..6),
        )
            .prop_map(|(prefixes, rex, op, modrm, tail)| {
                let mut v = prefixes;
                v.extend([rex, op, modrm]);
                v.extend(tail);
                v
            }),
        // A real MOV r64, m64 with disp32 (mod=10): any destination, any
        // base, SIB with any index and scale. With every register zero the
        // effective address is the displacement, near a page end.
        (0u8..8, 0u8..8, 0u8..8, any::<u8>(), 0x6FF8u32..0x7001).prop_map(|(rxb, reg, rm, sib, disp)| {
            let mut v = vec![0x48 | rxb, 0x8B, 0x80 | (reg << 3) | rm];
            if rm == 4 {
                v.push(sib);
            }
            v.extend(disp.to_le_bytes());
            v
        }),
    ]
}

#[test]
fn fixup_never_misbehaves() {
    zeropad::init();
    let accepted = Cell::new(0u32);
    let strategy = (
        code(),
        prop_oneof![
            Just([0u64; 16]),
            prop::array::uniform16(prop_oneof![
                any::<u64>(),
                0x7000u64..0x7010,
                0x6FF0u64..0x7000,
                0u64..16
            ]),
        ],
        any::<u64>(),
        prop_oneof![Just(0x7000u64), any::<u64>(), 0x6FF8u64..0x7010],
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 5000,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |(code, gprs, rip, fault)| {
            let mut frame = FaultFrame { gprs, rip };
            let before = frame;
            let mut loads = Vec::new();
            let result = zeropad::fixup_with(&mut frame, &code, fault, |aligned| {
                loads.push(aligned);
                WORD
            });
            match result {
                Err(_) => {
                    prop_assert_eq!(frame, before);
                    prop_assert!(loads.is_empty());
                }
                Ok(()) => {
                    accepted.set(accepted.get() + 1);
                    prop_assert_eq!(loads, vec![fault.wrapping_sub(8)]);
                    prop_assert_eq!(frame.rip, rip.wrapping_add(code.len() as u64));
                    let changed: Vec<Gpr> = Gpr::ALL
                        .into_iter()
                        .filter(|&g| frame.gprs[g as usize] != before.gprs[g as usize])
                        .collect();
                    prop_assert!(changed.len() <= 1, "{:?}", changed);
                    // The destination holds WORD shifted by 1..=7 bytes (or
                    // kept its value if that happened to be it already).
                    let shifted: Vec<u64> = (1..8).map(|k| WORD >> (8 * k)).collect();
                    if let Some(&g) = changed.first() {
                        prop_assert!(shifted.contains(&frame.gprs[g as usize]));
                    }
                    prop_assert!(code.contains(&0x8B));
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(
        accepted.get() >= 20,
        "only {} cases reached the fix-up: the property would be vacuous",
        accepted.get()
    );
}
