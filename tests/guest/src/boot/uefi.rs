//! The UEFI entry: the firmware (OVMF, or TDVF and the OVMF AMD SEV build
//! on a confidential host) starts the guest as an application in 64-bit
//! mode on its own identity-mapped tables. The guest takes what it needs
//! while boot services last (where it was loaded, a page below 1 MiB for
//! the second CPU, the memory map), exits boot services, and from then on
//! owns the machine: its own stack, GDT, IDT and page tables.

use core::ffi::c_void;

use r_efi::efi;
use r_efi::protocols::loaded_image;

use super::firmware_map;
use crate::{fail, println};

/// The memory map as the firmware writes it: descriptors of its own size.
#[repr(C, align(8))]
struct MapBuffer([u8; MAP_BYTES]);
const MAP_BYTES: usize = 64 * 1024;
static mut MAP: MapBuffer = MapBuffer([0; MAP_BYTES]);

/// Called by the firmware.
#[no_mangle]
extern "efiapi" fn efi_main(image: efi::Handle, system_table: *mut efi::SystemTable) -> efi::Status {
    println!("guest: UEFI entry");
    // SAFETY: the firmware passes a valid system table, and boot services
    // stay valid until they are exited below.
    let bs = unsafe { &*(*system_table).boot_services };
    let image_range = loaded_image_range(bs, image);
    let trampoline = low_page(bs);
    // SAFETY: exits boot services; nothing below calls the firmware again.
    let map = unsafe { exit_boot_services(bs, image) };
    // SAFETY: the boot stack is the image's own, unused until now; the
    // firmware's stack is boot-services memory, free from here on.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "jmp {next}",
            top = in(reg) core::ptr::addr_of!(super::BOOT_STACK) as u64 + 64 * 1024,
            next = sym on_own_stack,
            in("rdi") image_range.0,
            in("rsi") image_range.1,
            in("rdx") trampoline,
            in("rcx") map,
            options(noreturn)
        )
    }
}

/// Where the firmware loaded this image.
fn loaded_image_range(bs: &efi::BootServices, image: efi::Handle) -> (u64, u64) {
    let mut guid = loaded_image::PROTOCOL_GUID;
    let mut protocol: *mut c_void = core::ptr::null_mut();
    let status = (bs.handle_protocol)(image, &mut guid, &mut protocol);
    if status.is_error() || protocol.is_null() {
        fail("UEFI: no loaded-image protocol for the guest's own image");
    }
    // SAFETY: the firmware returned the image's protocol structure.
    let li = unsafe { &*(protocol as *const loaded_image::Protocol) };
    let start = li.image_base as u64;
    (start, start + li.image_size)
}

/// A page below 1 MiB, the firmware's to give (a real-mode start address
/// must lie there).
fn low_page(bs: &efi::BootServices) -> u64 {
    let mut page: efi::PhysicalAddress = 0xF_FFFF;
    let status = (bs.allocate_pages)(efi::ALLOCATE_MAX_ADDRESS, efi::LOADER_DATA, 1, &mut page);
    if status.is_error() {
        fail("UEFI: no free page below 1 MiB for the second CPU's start");
    }
    page
}

/// Reads the memory map and exits boot services with its key, again if
/// the map changed in between (the firmware may allocate while it runs
/// its exit handlers). Returns how many ranges were kept.
///
/// # Safety
///
/// Boot services end here: nothing after may call them.
unsafe fn exit_boot_services(bs: &efi::BootServices, image: efi::Handle) -> u64 {
    for _ in 0..4 {
        let mut size = MAP_BYTES;
        let (mut key, mut descriptor_size, mut version) = (0, 0, 0);
        let status = (bs.get_memory_map)(
            &mut size,
            core::ptr::addr_of_mut!(MAP).cast(),
            &mut key,
            &mut descriptor_size,
            &mut version,
        );
        if status.is_error() {
            fail("UEFI: GetMemoryMap failed (more than 64 KiB of descriptors?)");
        }
        // SAFETY: the firmware wrote `size` bytes of descriptors.
        let bytes = unsafe { core::slice::from_raw_parts(core::ptr::addr_of!(MAP).cast::<u8>(), size) };
        // Read before exiting: no allocation, no firmware call, so the key
        // stays valid.
        let kept = firmware_map::record(bytes, descriptor_size, version).unwrap_or_else(|e| {
            println!("UEFI memory map: {e:?}");
            fail("UEFI: the firmware's memory map is malformed")
        });
        // The caller's promise covers it; `key` is the map just read.
        let status = (bs.exit_boot_services)(image, key);
        if !status.is_error() {
            return kept;
        }
    }
    fail("UEFI: ExitBootServices kept failing")
}

/// Interrupts off for good on this CPU (the firmware's timer no longer has
/// a handler), the guest's GDT and segments, NX on (the guest's tables use
/// it), then the common kernel.
extern "sysv64" fn on_own_stack(image_start: u64, image_end: u64, trampoline: u64, kept: u64) -> ! {
    // SAFETY: CPL 0; the GDT is the image's; the PIC masks stop legacy
    // interrupts the firmware left routed.
    unsafe {
        core::arch::asm!("cli", options(nomem, nostack));
        // Only where `out` is the route: in a TD or an SNP guest it would
        // trap before the guest has a handler. CPU 0 never enables
        // interrupts again, so the masks matter only to the second CPU's
        // runs, which only the emulated mode has.
        #[cfg(feature = "emulator")]
        {
            crate::io::out_instruction(0x21, 0xFF, 1);
            crate::io::out_instruction(0xA1, 0xFF, 1);
        }
        let gdt_ptr = core::ptr::addr_of_mut!(super::GDT_PTR);
        core::ptr::addr_of_mut!((*gdt_ptr).base).write_unaligned(core::ptr::addr_of!(super::GDT) as u64);
        core::arch::asm!(
            "lgdt [{ptr}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, 0x10",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            ptr = in(reg) gdt_ptr,
            tmp = out(reg) _,
        );
        core::arch::asm!(
            "rdmsr",
            "or eax, {nxe}",
            "wrmsr",
            nxe = const 1 << 11,
            in("ecx") 0xC000_0080u32,
            out("eax") _,
            out("edx") _,
            options(nostack)
        );
    }
    println!(
        "guest: boot services exited; the firmware's memory map has {kept} ranges, {} MiB free, {} MiB unaccepted",
        firmware_map::free_bytes() >> 20,
        firmware_map::unaccepted_bytes() >> 20
    );
    crate::kernel_main(super::BootInfo {
        firmware: super::Firmware::Uefi,
        la57_requested: false,
        image: (image_start, image_end),
        trampoline,
    })
}
