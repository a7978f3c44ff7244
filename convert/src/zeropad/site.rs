//! The site table: where `load_unaligned_zeropad` loads are.
//!
//! Every load is emitted with [`zeropad_asm!`](crate::zeropad_asm), which
//! records, in the linker section `zeropad_sites`, the load's address
//! (relative to the entry, so the table needs no relocation in a PIE
//! executable or a relocatable kernel) and its length. (In a UEFI image
//! the section is `zpsites`, found through the image's PE headers.) A host
//! ELF linker defines `__start_zeropad_sites` and `__stop_zeropad_sites` by
//! itself; a kernel linker script must keep the section and define them:
//!
//! ```text
//! .rodata : {
//!     . = ALIGN(4);
//!     __start_zeropad_sites = .;
//!     KEEP(*(zeropad_sites))
//!     __stop_zeropad_sites = .;
//! }
//! ```

/// One recorded load.
#[derive(Debug)]
#[repr(C)]
pub struct Site {
    /// The load's address minus this entry's address.
    offset: i32,
    /// The load instruction's length in bytes (0: the table's sentinel).
    len: u8,
    _pad: [u8; 3],
}

impl Site {
    /// Address of the load instruction.
    pub fn address(&self) -> u64 {
        (self as *const Site as u64).wrapping_add(self.offset as i64 as u64)
    }

    /// Length of the load instruction.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether this is the sentinel entry (no load).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Emits `asm!` whose load (the instruction between `;`s) is recorded as a
/// zeropad site. Instructions before and after it go outside the record.
///
/// ```text
/// zeropad_asm!(; "mov {v}, qword ptr [{p}]" ; ; v = lateout(reg) value, p = in(reg) ptr, options(nostack));
/// ```
#[macro_export]
macro_rules! zeropad_asm {
    ($($before:expr),* ; $load:expr ; $($after:expr),* ; $($operands:tt)*) => {
        core::arch::asm!(
            $($before,)*
            "8471:",
            $load,
            "8472:",
            $crate::zeropad_sites_section!(),
            ".balign 4",
            ".long 8471b - .",
            ".byte 8472b - 8471b, 0, 0, 0",
            ".popsection",
            $($after,)*
            $($operands)*
        )
    };
}

/// The directive that opens the site table's section: `zeropad_sites` in
/// an ELF image; `zpsites` in a UEFI (PE) image, whose section names are at
/// most eight bytes and whose linker brackets no section with symbols.
#[doc(hidden)]
#[cfg(not(target_os = "uefi"))]
#[macro_export]
macro_rules! zeropad_sites_section {
    () => {
        ".pushsection zeropad_sites, \"aR\""
    };
}

#[doc(hidden)]
#[cfg(target_os = "uefi")]
#[macro_export]
macro_rules! zeropad_sites_section {
    () => {
        ".pushsection zpsites, \"dr\""
    };
}

// A sentinel entry, so the section (and its start/stop symbols) exists even
// in a program that never loads through a site.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    zeropad_sites_section!(),
    ".balign 4",
    ".long 0",
    ".byte 0, 0, 0, 0",
    ".popsection"
);

#[cfg(all(target_arch = "x86_64", not(target_os = "uefi")))]
extern "C" {
    #[link_name = "__start_zeropad_sites"]
    static SITES_START: Site;
    #[link_name = "__stop_zeropad_sites"]
    static SITES_STOP: Site;
}

/// Every recorded site.
#[cfg(all(target_arch = "x86_64", not(target_os = "uefi")))]
pub fn sites() -> &'static [Site] {
    // SAFETY: the linker (or the kernel linker script) brackets the
    // section, which holds only `Site` entries, with these symbols.
    unsafe {
        let start = core::ptr::addr_of!(SITES_START);
        let stop = core::ptr::addr_of!(SITES_STOP);
        let count = (stop as usize - start as usize) / core::mem::size_of::<Site>();
        core::slice::from_raw_parts(start, count)
    }
}

/// Every recorded site, in a UEFI image: the linker merges every object's
/// `zpsites` section into one image section, found through the image's
/// own PE headers (Microsoft PE/COFF specification, "Section Table").
#[cfg(all(target_arch = "x86_64", target_os = "uefi"))]
pub fn sites() -> &'static [Site] {
    extern "C" {
        // Defined by the PE linker at the image's first byte.
        static __ImageBase: u8;
    }
    // SAFETY: the image's headers are loaded with it, read-only, and
    // describe its sections; the section found holds only `Site` entries
    // (and zero padding, which reads as sentinels).
    unsafe {
        let base = core::ptr::addr_of!(__ImageBase);
        let read16 = |at: usize| base.add(at).cast::<u16>().read_unaligned() as usize;
        let read32 = |at: usize| base.add(at).cast::<u32>().read_unaligned() as usize;
        let coff = read32(0x3C) + 4;
        let sections = coff + 20 + read16(coff + 16);
        for i in 0..read16(coff + 2) {
            let header = sections + 40 * i;
            let name = core::slice::from_raw_parts(base.add(header), 8);
            if name == b"zpsites\0" {
                let count = read32(header + 8) / core::mem::size_of::<Site>();
                return core::slice::from_raw_parts(base.add(read32(header + 12)).cast::<Site>(), count);
            }
        }
        &[]
    }
}

/// The site whose load is at `rip`.
#[cfg(target_arch = "x86_64")]
pub fn find(rip: u64) -> Option<&'static Site> {
    sites().iter().find(|s| !s.is_empty() && s.address() == rip)
}

/// Whether `rip` is a recorded zeropad load.
#[cfg(target_arch = "x86_64")]
pub fn is_zeropad_site(rip: u64) -> bool {
    find(rip).is_some()
}

/// Loads 8 bytes from `ptr`, which need not be aligned. If the bytes run
/// into a page that faults, the fault handler ([`handle_fault`](super::handle_fault))
/// completes the load with the bytes up to the page end, zero-padded.
///
/// # Safety
///
/// The byte at `ptr` must be readable. The following seven may fault only
/// if the OS routes that fault to [`handle_fault`](super::handle_fault)
/// after calling [`init`](super::init); otherwise they must be readable too.
#[cfg(target_arch = "x86_64")]
#[inline]
pub unsafe fn load_unaligned_zeropad(ptr: *const u8) -> u64 {
    let value: u64;
    // SAFETY: the caller guarantees the first byte is readable and the
    // fault handler is in place for the rest; the load writes no memory.
    unsafe {
        zeropad_asm!(; "mov {v}, qword ptr [{p}]" ; ; v = lateout(reg) value, p = in(reg) ptr, options(nostack, readonly, preserves_flags));
    }
    value
}
