//! The UEFI test guest's reading of the firmware's memory map, on the host:
//! descriptors of the firmware's own size, what is free after the exit from
//! boot services, what is unaccepted, and maps a broken firmware might
//! write.

// The guest's module itself (core only), compiled for the host.
#[path = "../../guest/src/boot/firmware_map.rs"]
#[allow(dead_code)]
mod firmware_map;

use firmware_map::{all, first_other, free_bytes, ranges, record, unaccepted_bytes, MapError, Use};
use std::sync::Mutex;

/// The map is one static, as in the guest: tests take turns.
static MAP: Mutex<()> = Mutex::new(());

/// EFI_MEMORY_DESCRIPTOR (UEFI 2.10, section 7.2), padded to `size`.
/// (Shorter than 40 bytes: cut, as a broken firmware would write it.)
fn descriptor(kind: u32, start: u64, pages: u64, size: usize) -> Vec<u8> {
    let mut d = vec![0; size.max(40)];
    d[0..4].copy_from_slice(&kind.to_le_bytes());
    d[8..16].copy_from_slice(&start.to_le_bytes());
    d[16..24].copy_from_slice(&0xDEAD_0000u64.to_le_bytes());
    d[24..32].copy_from_slice(&pages.to_le_bytes());
    d[32..40].copy_from_slice(&0xFu64.to_le_bytes());
    d.truncate(size);
    d
}

fn map(entries: &[(u32, u64, u64)], size: usize) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|&(k, s, p)| descriptor(k, s, p, size))
        .collect()
}

const MIB: u64 = 1 << 20;

#[test]
fn descriptors_are_read_at_the_firmwares_stride_and_sorted_into_uses() {
    let _turn = MAP.lock().unwrap_or_else(|e| e.into_inner());
    // OVMF's stride is 48 bytes, larger than the 40-byte structure.
    for size in [40, 48, 64] {
        let bytes = map(
            &[
                (7, 0, 0x9F),                // conventional
                (3, MIB, 256),               // boot-services code
                (4, 2 * MIB, 256),           // boot-services data
                (2, 3 * MIB, 256),           // loader data: the guest's
                (15, 4 * MIB, 1024),         // unaccepted
                (5, 8 * MIB, 16),            // runtime-services code
                (10, 9 * MIB, 16),           // ACPI NVS
                (0x8000_0001, 10 * MIB, 16), // OEM-defined
            ],
            size,
        );
        assert_eq!(record(&bytes, size, 1).unwrap(), 8);
        let uses: Vec<Use> = ranges().map(|(_, _, u)| u).collect();
        assert_eq!(
            uses,
            [
                Use::Free,
                Use::Free,
                Use::Free,
                Use::Guest,
                Use::Unaccepted,
                Use::Firmware,
                Use::Firmware,
                Use::Firmware
            ]
        );
        assert_eq!(free_bytes(), 0x9F * 4096 + 2 * MIB);
        assert_eq!(unaccepted_bytes(), 4 * MIB);
        assert!(
            all(MIB, 3 * MIB, &[Use::Free]),
            "boot-services memory is free after the exit"
        );
        assert!(!all(MIB, 3 * MIB + 4096, &[Use::Free]), "one page of the guest's own");
        assert_eq!(
            first_other(2 * MIB, 9 * MIB, &[Use::Free]),
            Some((3 * MIB, 4 * MIB, Use::Guest))
        );
        assert_eq!(
            first_other(0x9F000, MIB, &[Use::Free]),
            None,
            "a hole is not memory in use"
        );
        assert!(!all(0x9F000, MIB, &[Use::Free]), "but not free either");
        // Memory the guest accepts before use may be handed over
        // unaccepted; the guest's own image may not be taken for either.
        assert!(!all(MIB, 8 * MIB, &[Use::Free, Use::Unaccepted]));
        assert!(all(4 * MIB, 8 * MIB, &[Use::Free, Use::Unaccepted]));
        assert!(!all(4 * MIB, 8 * MIB, &[Use::Free]));
        assert_eq!(
            first_other(MIB, 9 * MIB, &[Use::Free, Use::Unaccepted]),
            Some((3 * MIB, 4 * MIB, Use::Guest))
        );
    }
}

#[test]
fn a_map_a_broken_firmware_writes_is_refused_and_the_last_good_one_kept() {
    let _turn = MAP.lock().unwrap_or_else(|e| e.into_inner());
    record(&map(&[(7, 0, 16)], 48), 48, 1).unwrap();
    assert!(matches!(
        record(&map(&[(7, 0, 16)], 32), 32, 1),
        Err(MapError::DescriptorSize(32))
    ));
    assert!(matches!(
        record(&map(&[(7, 0, 16)], 44), 44, 1),
        Err(MapError::DescriptorSize(44))
    ));
    assert!(matches!(
        record(&map(&[(7, 0, 16)], 48), 48, 2),
        Err(MapError::Version(2))
    ));
    assert!(matches!(
        record(&map(&[(7, u64::MAX - 4095, 2)], 48), 48, 1),
        Err(MapError::Range { .. })
    ));
    assert!(matches!(
        record(&map(&[(7, 0, u64::MAX / 2)], 48), 48, 1),
        Err(MapError::Range { .. })
    ));
    assert!(matches!(
        record(&map(&[(7, 0x800, 1)], 48), 48, 1),
        Err(MapError::Range { .. })
    ));
    // Good descriptors first, a bad one last: none of them is kept.
    assert!(matches!(
        record(&map(&[(5, 0, 1), (5, 4096, 1), (7, 0x800, 1)], 48), 48, 1),
        Err(MapError::Range { .. })
    ));
    let many: Vec<(u32, u64, u64)> = (0..513).map(|i| (7, i * 4096, 1)).collect();
    assert!(matches!(record(&map(&many, 40), 40, 1), Err(MapError::TooMany)));
    assert_eq!(
        ranges().collect::<Vec<_>>(),
        [(0, 16 * 4096, Use::Free)],
        "a refused map leaves the one before it"
    );
}
