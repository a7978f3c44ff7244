//! x86-64 page-table entries as the hardware reads them (Intel SDM vol. 3A
//! 4.5, "4-Level Paging and 5-Level Paging"; AMD APM vol. 2 5.3), with the
//! encryption bit treated as an opaque, runtime mask.

use x86::bits64::paging::{PDFlags, PTFlags};

/// Present.
pub const PRESENT: u64 = PTFlags::P.bits();
/// Writable.
pub const WRITABLE: u64 = PTFlags::RW.bits();
/// User-accessible.
pub const USER: u64 = PTFlags::US.bits();
/// Accessed (set by hardware).
pub const ACCESSED: u64 = PTFlags::A.bits();
/// Dirty (set by hardware, leaves only).
pub const DIRTY: u64 = PTFlags::D.bits();
/// Page size: in a PDPT or PD entry, the entry maps a 1 GiB / 2 MiB page.
pub const HUGE: u64 = PDFlags::PS.bits();
/// PAT bit of a 4 KiB PTE: bit 7 (Intel SDM vol. 3A, table 4-20; the `x86`
/// crate's `PTFlags` does not name it).
pub const PAT_4K: u64 = 1 << 7;
/// PAT bit of a 2 MiB / 1 GiB leaf (bit 12).
pub const PAT_HUGE: u64 = PDFlags::PAT.bits();
/// Execute disable.
pub const NO_EXECUTE: u64 = PTFlags::XD.bits();
/// Physical-address bits of an entry (51:12), before the encryption bit is
/// removed.
pub const ADDRESS_BITS: u64 = 0x000F_FFFF_FFFF_F000;

/// Flags of the table-pointer entries the engine creates when it splits: as
/// permissive as possible, so the leaves alone decide the access rights
/// they had before.
pub const TABLE_POINTER: u64 = PRESENT | WRITABLE | USER | ACCESSED;

const _: () = assert!(HUGE == 1 << 7 && PAT_HUGE == 1 << 12 && NO_EXECUTE == 1 << 63);

/// A level of the hierarchy, named by what one of its leaves maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// A page table (PT) entry: 4 KiB.
    Pt = 1,
    /// A page directory (PD) entry: 2 MiB leaf or a PT pointer.
    Pd = 2,
    /// A PDPT entry: 1 GiB leaf or a PD pointer.
    Pdpt = 3,
    /// A PML4 entry: always a PDPT pointer.
    Pml4 = 4,
    /// A PML5 entry (5-level paging only): always a PML4 pointer.
    Pml5 = 5,
}

impl Level {
    /// Bytes one entry of this level covers.
    pub const fn span(self) -> u64 {
        1 << (12 + 9 * (self as u32 - 1))
    }

    /// The index of `va` in a table of this level.
    pub const fn index(self, va: u64) -> usize {
        ((va >> (12 + 9 * (self as u32 - 1))) & 511) as usize
    }

    /// The next level down.
    pub const fn lower(self) -> Option<Level> {
        match self {
            Level::Pml5 => Some(Level::Pml4),
            Level::Pml4 => Some(Level::Pdpt),
            Level::Pdpt => Some(Level::Pd),
            Level::Pd => Some(Level::Pt),
            Level::Pt => None,
        }
    }

    /// Whether an entry of this level may be a leaf: PML4 and PML5 entries
    /// always point to a table (their bit 7 is reserved, not PS).
    pub const fn can_be_leaf(self) -> bool {
        !matches!(self, Level::Pml4 | Level::Pml5)
    }
}

/// How many levels the page tables have: what CR4.LA57 selects. Four
/// levels translate 48-bit virtual addresses, five levels 57-bit ones. The
/// engine walks, splits and collapses the same way at either depth; the
/// depth decides where a walk starts (the PML4 or the PML5 the root
/// points to) and which virtual addresses are canonical.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Paging {
    /// 4-level paging (CR4.LA57 clear): the root is a PML4.
    #[default]
    Four,
    /// 5-level paging (CR4.LA57 set): the root is a PML5.
    Five,
}

impl Paging {
    /// CR4.LA57.
    pub const CR4_LA57: u64 = 1 << 12;

    /// The depth a CR4 value selects.
    pub const fn from_cr4(cr4: u64) -> Self {
        if cr4 & Self::CR4_LA57 != 0 {
            Paging::Five
        } else {
            Paging::Four
        }
    }

    /// The level of the root table.
    pub const fn top(self) -> Level {
        match self {
            Paging::Four => Level::Pml4,
            Paging::Five => Level::Pml5,
        }
    }

    /// Bits of a virtual address the tables translate: 48 or 57.
    pub const fn va_bits(self) -> u32 {
        match self {
            Paging::Four => 48,
            Paging::Five => 57,
        }
    }

    /// Whether `va` is canonical: every bit from `va_bits() - 1` up equal.
    pub const fn is_canonical(self, va: u64) -> bool {
        let shift = 64 - self.va_bits();
        ((va << shift) as i64 >> shift) as u64 == va
    }
}

/// Which side of memory a page is on: the TDX crate's type, so a TDX
/// guest and the engine speak of one `Visibility`.
pub use tdcall::Visibility;

/// The encryption bit of a PTE: a runtime mask whose meaning depends on the
/// platform. TDX: bit GPAW-1 set means *shared*. SNP: the C-bit set means
/// *private*. A test platform may use any bit the hardware ignores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncryptionBit {
    mask: u64,
    set_means: Visibility,
}

impl EncryptionBit {
    /// A mask of one bit inside the address field (or a software-available
    /// bit, 52..=58) and what setting it means. `None` if `mask` is not a
    /// single such bit.
    pub const fn new(mask: u64, set_means: Visibility) -> Option<Self> {
        let ok = mask.is_power_of_two() && (mask & (ADDRESS_BITS | 0x07F0_0000_0000_0000)) != 0 && mask >= 1 << 32;
        if ok {
            Some(EncryptionBit { mask, set_means })
        } else {
            None
        }
    }

    /// TDX: the shared bit, GPAW-1.
    pub const fn tdx(shared_mask: u64) -> Option<Self> {
        Self::new(shared_mask, Visibility::Shared)
    }

    /// SNP: the C-bit at position `c_bit`.
    pub const fn snp(c_bit: u8) -> Option<Self> {
        if c_bit >= 64 {
            return None;
        }
        Self::new(1 << c_bit, Visibility::Private)
    }

    /// The mask.
    pub const fn mask(self) -> u64 {
        self.mask
    }

    /// What the bit being set means.
    pub const fn set_means(self) -> Visibility {
        self.set_means
    }

    /// The encryption bits an entry carries for a page on `side`.
    pub const fn bits_for(self, side: Visibility) -> u64 {
        if side as u8 == self.set_means as u8 {
            self.mask
        } else {
            0
        }
    }

    /// The side an entry's bits select.
    pub const fn side_of(self, entry: u64) -> Visibility {
        if entry & self.mask != 0 {
            self.set_means
        } else {
            self.set_means.other()
        }
    }

    /// The physical address an entry points to: the address field with the
    /// encryption bit removed, aligned to `level`'s span if it is a leaf
    /// there (PAT and reserved low bits dropped).
    pub const fn address(self, entry: u64, leaf_level: Level) -> u64 {
        entry & ADDRESS_BITS & !self.mask & !(leaf_level.span() - 1)
    }
}

/// The flags of a huge leaf in 4 KiB-PTE form (PAT moved from bit 12 to bit
/// 7, PS cleared), address and encryption bit removed.
pub const fn huge_flags_to_4k(flags: u64) -> u64 {
    let pat = if flags & PAT_HUGE != 0 { PAT_4K } else { 0 };
    (flags & !(PAT_HUGE | HUGE)) | pat
}

/// The inverse of [`huge_flags_to_4k`].
pub const fn flags_4k_to_huge(flags: u64) -> u64 {
    let pat = if flags & PAT_4K != 0 { PAT_HUGE } else { 0 };
    (flags & !PAT_4K) | pat | HUGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_indices() {
        assert_eq!(Level::Pt.span(), 4096);
        assert_eq!(Level::Pd.span(), 2 << 20);
        assert_eq!(Level::Pdpt.span(), 1 << 30);
        assert_eq!(Level::Pml4.span(), 1 << 39);
        let va = 0xFFFF_8881_2345_6000u64;
        assert_eq!(
            Level::Pml4.index(va),
            x86::bits64::paging::pml4_index(x86::bits64::paging::VAddr(va))
        );
        assert_eq!(
            Level::Pdpt.index(va),
            x86::bits64::paging::pdpt_index(x86::bits64::paging::VAddr(va))
        );
        assert_eq!(
            Level::Pd.index(va),
            x86::bits64::paging::pd_index(x86::bits64::paging::VAddr(va))
        );
        assert_eq!(
            Level::Pt.index(va),
            x86::bits64::paging::pt_index(x86::bits64::paging::VAddr(va))
        );
    }

    #[test]
    fn the_fifth_level_covers_bits_56_to_48() {
        assert_eq!(Level::Pml5.span(), 1 << 48);
        assert_eq!(Level::Pml5.lower(), Some(Level::Pml4));
        assert!(!Level::Pml5.can_be_leaf() && !Level::Pml4.can_be_leaf());
        assert!(Level::Pdpt.can_be_leaf() && Level::Pd.can_be_leaf() && Level::Pt.can_be_leaf());
        // Linux's 5-level direct map: PML5 slot 0x111, PML4 slot 0.
        for va in [
            0xFF11_0000_0000_0000u64,
            0xFFA0_1234_5678_9000,
            0x00FF_FFFF_FFFF_F000,
            0,
        ] {
            let vaddr = x86::bits64::paging::VAddr(va);
            assert_eq!(Level::Pml5.index(va), x86::bits64::paging::pml5_index(vaddr), "{va:#x}");
            assert_eq!(Level::Pml4.index(va), x86::bits64::paging::pml4_index(vaddr), "{va:#x}");
        }
        assert_eq!(Level::Pml5.index(0xFF11_0000_0000_0000), 0x111);
        assert_eq!(Level::Pml4.index(0xFF11_0000_0000_0000), 0);
        // Every level from the root down, once each.
        for (paging, depth) in [(Paging::Four, 4), (Paging::Five, 5)] {
            let mut level = Some(paging.top());
            let mut seen = 0;
            while let Some(l) = level {
                seen += 1;
                level = l.lower();
            }
            assert_eq!(seen, depth, "{paging:?}");
            assert_eq!(paging.top().span() << 9, 1 << paging.va_bits());
        }
    }

    #[test]
    fn canonical_is_57_bits_with_five_levels() {
        let (four, five) = (Paging::Four, Paging::Five);
        assert_eq!(Paging::default(), four, "four levels unless the OS says");
        assert_eq!(Paging::from_cr4(0x2_06E0), four);
        assert_eq!(Paging::from_cr4(0x2_06E0 | 1 << 12), five);
        // Both depths.
        for va in [0, 0x7FFF_FFFF_F000, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_F000] {
            assert!(four.is_canonical(va) && five.is_canonical(va), "{va:#x}");
        }
        // Five levels only: bits 56..47 not all equal.
        for va in [
            0x8000_0000_0000,
            0xFF11_0000_0000_0000,
            0xFF00_0000_0000_0000,
            0x00FF_FFFF_FFFF_F000,
            0xFFFF_7FFF_FFFF_F000,
        ] {
            assert!(!four.is_canonical(va) && five.is_canonical(va), "{va:#x}");
        }
        // Neither: bits 63..57 differ from bit 56.
        for va in [
            0x0100_0000_0000_0000,
            0xFEFF_FFFF_FFFF_F000,
            0x8000_0000_0000_0000,
            0x7FFF_FFFF_FFFF_F000,
        ] {
            assert!(!four.is_canonical(va) && !five.is_canonical(va), "{va:#x}");
        }
    }

    #[test]
    fn address_never_includes_the_encryption_bit() {
        let tdx = EncryptionBit::tdx(1 << 47).unwrap();
        let entry = (1 << 47) | 0x1234_5000 | PRESENT | NO_EXECUTE;
        assert_eq!(tdx.address(entry, Level::Pt), 0x1234_5000);
        assert_eq!(tdx.side_of(entry), Visibility::Shared);
        let snp = EncryptionBit::snp(51).unwrap();
        let huge = (1 << 51) | 0x4020_0000 | PAT_HUGE | HUGE | PRESENT;
        assert_eq!(snp.address(huge, Level::Pd), 0x4020_0000, "PAT bit 12 is not address");
        assert_eq!(snp.side_of(huge), Visibility::Private);
        assert_eq!(snp.bits_for(Visibility::Private), 1 << 51);
        assert_eq!(snp.bits_for(Visibility::Shared), 0);
        assert_eq!(tdx.bits_for(Visibility::Private), 0);
    }

    #[test]
    fn encryption_bit_must_be_one_high_bit() {
        assert!(EncryptionBit::new(0, Visibility::Shared).is_none());
        assert!(EncryptionBit::new(3 << 40, Visibility::Shared).is_none());
        assert!(EncryptionBit::new(PRESENT, Visibility::Shared).is_none());
        assert!(EncryptionBit::new(NO_EXECUTE, Visibility::Shared).is_none());
        assert!(
            EncryptionBit::new(1 << 52, Visibility::Shared).is_some(),
            "software-available bit for tests"
        );
        assert!(EncryptionBit::snp(64).is_none());
    }

    #[test]
    fn pat_moves_between_forms() {
        let huge = PRESENT | WRITABLE | HUGE | PAT_HUGE | NO_EXECUTE;
        let small = huge_flags_to_4k(huge);
        assert_eq!(small, PRESENT | WRITABLE | PAT_4K | NO_EXECUTE);
        assert_eq!(flags_4k_to_huge(small), huge);
    }
}
