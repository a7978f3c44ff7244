//! How the guest is started, and what every start leaves behind: 64-bit
//! mode on identity-mapped tables, the guest's GDT, and a [`BootInfo`].
//!
//! Two entries, one per build:
//! - [`pvh`] (the ELF build): QEMU's `-kernel` PVH loader, 32-bit protected
//!   mode; the guest sets up long mode itself, with 5-level paging on
//!   request;
//! - [`uefi`] (the `x86_64-unknown-uefi` build): a UEFI application
//!   started by the firmware (OVMF), which hands over its memory map and
//!   exits boot services.

#[cfg(target_os = "uefi")]
pub mod firmware_map;
#[cfg(not(target_os = "uefi"))]
mod pvh;
#[cfg(target_os = "uefi")]
mod uefi;

/// What the entry found, for the common kernel.
pub struct BootInfo {
    pub firmware: Firmware,
    /// The kernel command line asked for 5-level paging.
    pub la57_requested: bool,
    /// The loaded image, `[start, end)`: it must stay mapped, and nothing
    /// may be built over it.
    pub image: (u64, u64),
    /// A page below 1 MiB for the second CPU's real-mode start.
    pub trampoline: u64,
}

/// Fails the run unless the firmware left `[start, end)` free for the
/// guest: page-table frames, and the memory the scenarios convert, must
/// not be the firmware's runtime code or data, ACPI tables, or reserved.
/// Memory the firmware hands over unaccepted counts as free where the
/// caller accepts it before use (`unaccepted_allowed`). PVH hands the
/// guest all of RAM.
pub fn check_free(start: u64, end: u64, what: &str, unaccepted_allowed: bool) {
    // Every byte described as free: a hole the map leaves out (MMIO, or
    // memory the firmware never reported) is not free either.
    #[cfg(target_os = "uefi")]
    {
        let free: &[firmware_map::Use] = if unaccepted_allowed {
            &[firmware_map::Use::Free, firmware_map::Use::Unaccepted]
        } else {
            &[firmware_map::Use::Free]
        };
        if !firmware_map::all(start, end, free) {
            match firmware_map::first_other(start, end, free) {
                Some((s, e, u)) => crate::println!(
                    "  {what}: [{start:#x}, {end:#x}) overlaps [{s:#x}, {e:#x}), which the firmware's map gives as {u:?}"
                ),
                None => crate::println!("  {what}: [{start:#x}, {end:#x}) has a hole the firmware's map leaves out"),
            }
            crate::fail("memory the guest needs is not free in the firmware's map");
        }
    }
    let _ = (start, end, what, unaccepted_allowed);
}

/// Gives the engine the memory the firmware's map hands over unaccepted
/// (UEFI type 15): whole units go into its bitmap, the edges are accepted
/// at once. OVMF in a plain VM reports none; TDVF and the OVMF AMD SEV
/// build do, for memory not accepted or validated at launch.
pub fn record_unaccepted<P: coco_convert::Platform>(e: &crate::scenarios::GuestEngine<P>) {
    #[cfg(target_os = "uefi")]
    for (start, end, _) in firmware_map::ranges().filter(|&(_, _, u)| u == firmware_map::Use::Unaccepted) {
        if let Err(why) = e.record_unaccepted(start, end - start) {
            crate::println!("  unaccepted memory [{start:#x}, {end:#x}): {why:?}");
            crate::fail("the firmware's unaccepted memory could not be recorded");
        }
    }
    let _ = e;
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Pvh,
    Uefi,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Pvh => "PVH",
            Firmware::Uefi => "UEFI (OVMF)",
        }
    }
}

/// CR4 for long mode with SSE: PAE, OSFXSR, OSXMMEXCPT.
pub const CR4_LONG_MODE: u32 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: LME, NXE.
pub const EFER_LONG_MODE: u32 = (1 << 8) | (1 << 11);
/// CR0: PG, WP, MP (PE is already on when PVH enters, and paging when UEFI does).
pub const CR0_LONG_MODE: u32 = (1 << 31) | (1 << 16) | (1 << 1);
/// CR0.EM, which must be off for SSE.
pub const CR0_EM: u32 = 1 << 2;

/// CR4.LA57: five levels of paging.
pub const CR4_LA57: u32 = coco_convert::Paging::CR4_LA57 as u32;
/// CPUID.(EAX=7,ECX=0):ECX bit 16: the CPU has LA57.
pub const CPUID_7_ECX_LA57: u32 = 1 << 16;

/// Whether this CPU runs with 5-level paging (CR4.LA57).
pub fn la57() -> bool {
    let cr4: u64;
    // SAFETY: reading CR4 at CPL 0 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags)) };
    coco_convert::Paging::from_cr4(cr4) == coco_convert::Paging::Five
}

/// Whether the CPU has LA57: CPUID.(EAX=7,ECX=0):ECX[16].
pub fn cpu_has_la57() -> bool {
    let max = core::arch::x86_64::__cpuid(0).eax;
    max >= 7 && core::arch::x86_64::__cpuid_count(7, 0).ecx & CPUID_7_ECX_LA57 != 0
}

#[repr(C, align(4096))]
pub struct Table(pub [u64; 512]);

#[repr(C, align(16))]
pub struct Stack(pub [u8; 64 * 1024]);

#[no_mangle]
pub static mut BOOT_STACK: Stack = Stack([0; 64 * 1024]);

/// Null, 64-bit code (0x08), data (0x10), then a TSS per CPU (0x18, 0x28).
#[no_mangle]
pub static mut GDT: [u64; 7] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF, 0, 0, 0, 0];

#[repr(C, packed)]
pub struct GdtPtr {
    pub limit: u16,
    pub base: u64,
}

#[no_mangle]
pub static mut GDT_PTR: GdtPtr = GdtPtr {
    limit: 7 * 8 - 1,
    base: 0,
};
