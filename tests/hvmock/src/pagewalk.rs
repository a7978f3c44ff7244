//! The models' own reading of the guest's page tables, as the hardware
//! walks them: to translate the address PVALIDATE is given, and to check,
//! at every hypercall, that no alias of a converting frame is present.
//!
//! Written independently of the engine's walker, so that the two check each
//! other.

use alloc::vec::Vec;

use crate::memory::GuestMemory;

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;

/// Where the guest's page tables are: CR3, CR4.LA57 and the PTE
/// encryption bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPageTables {
    /// Physical address of the root table: the PML4, or the PML5 when
    /// `la57` is set.
    pub cr3: u64,
    /// CR4.LA57: five levels and 57-bit virtual addresses instead of four
    /// and 48.
    pub la57: bool,
    /// The encryption bit (TDX shared bit, SNP C-bit, or a test bit).
    pub enc_mask: u64,
}

/// One present leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Canonical virtual address.
    pub va: u64,
    /// Physical address.
    pub pa: u64,
    /// Bytes mapped (4 KiB, 2 MiB or 1 GiB).
    pub size: u64,
    /// Whether the entry carries the encryption bit.
    pub enc_set: bool,
}

impl Mapping {
    /// Whether it maps any of `[pa, pa + len)`.
    pub fn overlaps(&self, pa: u64, len: u64) -> bool {
        self.pa < pa + len && pa < self.pa + self.size
    }
}

impl GuestPageTables {
    /// Levels of the hierarchy, the root's included.
    fn depth(&self) -> u32 {
        if self.la57 {
            5
        } else {
            4
        }
    }

    /// The highest bit a virtual address carries before sign extension:
    /// 47, or 56 with LA57.
    fn top_bit(&self) -> u32 {
        12 + 9 * self.depth() - 1
    }

    /// `va` with its top bit copied into every bit above.
    fn canonical(&self, va: u64) -> u64 {
        let above = u64::MAX << (self.top_bit() + 1);
        if va & (1 << self.top_bit()) != 0 {
            va | above
        } else {
            va & !above
        }
    }

    fn entry(&self, mem: &GuestMemory, table: u64, index: u64) -> u64 {
        mem.read_u64(table + index * 8)
    }

    fn next_table(&self, entry: u64) -> u64 {
        entry & ADDRESS & !self.enc_mask
    }

    /// Every present leaf mapping.
    pub fn mappings(&self, mem: &GuestMemory) -> Vec<Mapping> {
        let mut out = Vec::new();
        self.for_each_mapping(mem, &mut |m| out.push(m));
        out
    }

    /// Calls `f` with every present leaf mapping, without collecting them
    /// (the alias check runs at every hypercall over trees of 100,000s of
    /// leaves).
    pub fn for_each_mapping(&self, mem: &GuestMemory, f: &mut dyn FnMut(Mapping)) {
        self.visit(mem, self.cr3, self.depth(), 0, f);
    }

    fn visit(&self, mem: &GuestMemory, table: u64, level: u32, va_base: u64, f: &mut dyn FnMut(Mapping)) {
        let span = 1u64 << (12 + 9 * (level - 1));
        assert!(mem.contains(table, 4096), "table {table:#x} outside guest memory");
        // SAFETY: the table lies inside guest memory (checked above) and is
        // 4 KiB aligned (addresses come from entries' 4 KiB address fields).
        let entries = unsafe { core::slice::from_raw_parts(mem.ptr(table).cast::<u64>(), 512) };
        for (i, &e) in entries.iter().enumerate() {
            if e & PRESENT == 0 {
                continue;
            }
            let va = va_base + i as u64 * span;
            if level == 1 || (level < 4 && e & PAGE_SIZE_BIT != 0) {
                let pa = e & ADDRESS & !self.enc_mask & !(span - 1);
                f(Mapping {
                    va: self.canonical(va),
                    pa,
                    size: span,
                    enc_set: e & self.enc_mask != 0,
                });
            } else {
                self.visit(mem, self.next_table(e), level - 1, va, f);
            }
        }
    }

    /// The leaf mapping `va`, if present; `pa` is that of `va` itself.
    /// `None` for a non-canonical `va`, which the CPU never translates.
    pub fn translate(&self, mem: &GuestMemory, va: u64) -> Option<Mapping> {
        if self.canonical(va) != va {
            return None;
        }
        let mut table = self.cr3;
        for level in (1..=self.depth()).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = self.entry(mem, table, (va >> shift) & 511);
            if e & PRESENT == 0 {
                return None;
            }
            if level == 1 || (level < 4 && e & PAGE_SIZE_BIT != 0) {
                let span = 1u64 << shift;
                let pa = (e & ADDRESS & !self.enc_mask & !(span - 1)) + (va & (span - 1));
                return Some(Mapping {
                    va,
                    pa,
                    size: span,
                    enc_set: e & self.enc_mask != 0,
                });
            }
            table = self.next_table(e);
        }
        None
    }
}

/// A hypercall made while a mapping of one of its frames was present: the
/// window in which an access could go through a mapping whose attribute
/// disagrees with the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The call.
    pub call: &'static str,
    /// Start of the frames it concerned.
    pub pa: u64,
    /// The mapping that was present.
    pub mapping: Mapping,
}

/// Page tables to check at every call, and what was found.
#[derive(Debug, Default)]
pub(crate) struct AliasCheck {
    pub tables: Option<GuestPageTables>,
    pub violations: Vec<Violation>,
    /// Checks skipped on purpose: a run that measures something else.
    pub disabled: bool,
    /// A virtual range whose mappings are not aliases: the emulator's own
    /// view of guest memory, in a test guest.
    pub ignore: Option<(u64, u64)>,
    /// Per page: handed over unaccepted by the firmware and not accepted
    /// or converted since. Accepting such memory with its mappings present
    /// is what every guest does (nothing in it is relied on yet), so calls
    /// that concern only such pages are not checked.
    unaccepted: Vec<bool>,
}

impl AliasCheck {
    /// Marks `[pa, pa + len)` as handed over unaccepted (`true`) or as
    /// ordinary memory again.
    pub fn set_unaccepted(&mut self, pa: u64, len: u64, unaccepted: bool) {
        let (first, last) = ((pa / 4096) as usize, (pa + len).div_ceil(4096) as usize);
        if unaccepted && self.unaccepted.len() < last {
            self.unaccepted.resize(last, false);
        }
        for page in self.unaccepted.iter_mut().take(last).skip(first) {
            *page = unaccepted;
        }
    }

    fn only_unaccepted(&self, pa: u64, len: u64) -> bool {
        let (first, last) = ((pa / 4096) as usize, (pa + len).div_ceil(4096) as usize);
        self.unaccepted
            .get(first..last)
            .is_some_and(|pages| pages.iter().all(|&p| p))
    }

    /// Records every present mapping of `[pa, pa + len)` except the one at
    /// `allowed_va` (PVALIDATE's own address).
    pub fn check(&mut self, mem: &GuestMemory, call: &'static str, pa: u64, len: u64, allowed_va: Option<u64>) {
        let Some(tables) = self.tables.filter(|_| !self.disabled) else {
            return;
        };
        if self.only_unaccepted(pa, len) {
            return;
        }
        let violations = &mut self.violations;
        let ignore = self.ignore;
        tables.for_each_mapping(mem, &mut |mapping| {
            let ignored = ignore.is_some_and(|(va, len)| mapping.va >= va && mapping.va - va < len);
            let allowed = ignored || allowed_va.is_some_and(|va| va >= mapping.va && va - mapping.va < mapping.size);
            if mapping.overlaps(pa, len) && !allowed {
                violations.push(Violation { call, pa, mapping });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables written by hand, bit by bit as the SDM lays them out: a
    /// 2 MiB leaf at `va` through a root, a second-level table and a PDPT
    /// at 0x1000..0x4000 (with five levels one more table, 0x4000).
    fn hand_built(la57: bool, va: u64) -> (GuestMemory, GuestPageTables) {
        let mem = GuestMemory::new(64 << 20);
        let tables: &[u64] = if la57 {
            &[0x1000, 0x2000, 0x3000, 0x4000]
        } else {
            &[0x1000, 0x2000, 0x3000]
        };
        let mut shift = if la57 { 48 } else { 39 };
        for pair in tables.windows(2) {
            mem.write_u64(pair[0] + 8 * ((va >> shift) & 511), pair[1] | 3);
            shift -= 9;
        }
        let pd = *tables.last().unwrap();
        mem.write_u64(pd + 8 * ((va >> 21) & 511), 0x60_0000 | 0x83);
        let t = GuestPageTables {
            cr3: 0x1000,
            la57,
            enc_mask: 1 << 51,
        };
        (mem, t)
    }

    #[test]
    fn five_levels_translate_57_bit_addresses() {
        for va in [0xFF11_0000_0020_0000u64, 0x00F0_0000_0020_0000] {
            let (mem, t) = hand_built(true, va);
            let m = t.translate(&mem, va + 0x1234).expect("mapped");
            assert_eq!((m.pa, m.size), (0x60_1234, 2 << 20), "{va:#x}");
            assert_eq!(
                t.mappings(&mem),
                [Mapping {
                    va,
                    pa: 0x60_0000,
                    size: 2 << 20,
                    enc_set: false
                }]
            );
            // The same tables read with four levels map something else.
            let four = GuestPageTables { la57: false, ..t };
            assert_eq!(four.translate(&mem, va), None, "{va:#x}: not 48-bit canonical");
            assert!(four.mappings(&mem).iter().all(|m| m.va != va));
        }
    }

    #[test]
    fn four_levels_are_unchanged() {
        let va = 0xFFFF_8880_0020_0000;
        let (mem, t) = hand_built(false, va);
        assert_eq!(t.translate(&mem, va).map(|m| m.pa), Some(0x60_0000));
        assert_eq!(t.mappings(&mem)[0].va, va);
    }

    #[test]
    fn bit_7_of_a_pml5_entry_is_not_a_page_size() {
        let va = 0xFF11_0000_0020_0000;
        let (mem, t) = hand_built(true, va);
        let pml5e = 0x1000 + 8 * ((va >> 48) & 511);
        mem.write_u64(pml5e, mem.read_u64(pml5e) | PAGE_SIZE_BIT);
        assert_eq!(t.translate(&mem, va).map(|m| m.size), Some(2 << 20));
    }
}
