//! The kernel's entry: the zeropad fix-up made ready, then the boot path of
//! the platform the CPU reports. Linked for `x86_64-unknown-none` so that
//! every symbol the crates need (the zeropad site table, the allocator the
//! decoder uses once) is resolved as in a real kernel.
#![no_std]
#![no_main]

#[cfg(feature = "zeropad")]
mod zeropad_support;

fn running_in_a_td() -> bool {
    // CPUID leaf 0x21 ("IntelTDX    ") exists only in a TD.
    let leaf = core::arch::x86_64::__cpuid_count(0x21, 0);
    [leaf.ebx, leaf.edx, leaf.ecx] == [0x6574_6E49, 0x5844_546C, 0x2020_2020]
}

#[no_mangle]
extern "C" fn _start() -> ! {
    #[cfg(feature = "zeropad")]
    coco_convert::zeropad::init();
    let (cr3, cr4): (u64, u64);
    // SAFETY: reading CR3 and CR4 at CPL 0 has no side effect.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
    }
    let _ = if running_in_a_td() {
        example_kernel::tdx::boot(cr3, cr4)
    } else {
        example_kernel::snp::boot(cr3, cr4)
    };
    halt()
}

fn halt() -> ! {
    loop {
        // SAFETY: `hlt` waits for an interrupt; nothing else changes.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    halt()
}
