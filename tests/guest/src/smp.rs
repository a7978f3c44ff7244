//! The second CPU: started with INIT-SIPI-SIPI through the xAPIC, from a
//! real-mode trampoline copied below 1 MiB, straight into long mode on the same page
//! tables, as deep as CPU 0's (CR4.LA57 goes on with the rest of CR4,
//! before paging); and TLB shootdowns by IPI.
//!
//! The image for real hosts starts no second CPU (a TD's vCPUs wake
//! through the ACPI multiprocessor wakeup mailbox, an SNP guest's through
//! the AP-creation event, and neither is built), so there it is compiled
//! but never entered.
#![cfg_attr(not(feature = "emulator"), allow(dead_code))]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const CPUS: usize = 2;
const APIC: u64 = 0xFEE0_0000;
pub const SHOOTDOWN_VECTOR: u64 = 240;

// Position-independent, so that it runs from whichever page below 1 MiB the
// firmware lets the guest have: real mode addresses its data through
// DS = CS (the SIPI vector's segment), long mode through RIP, and the two
// linear addresses it needs (its GDT, its 64-bit entry) are written into
// the copy at run time.
core::arch::global_asm!(
    ".global ap_trampoline",
    ".global ap_trampoline_end",
    ".p2align 4",
    "ap_trampoline:",
    ".code16",
    // A two-byte jump, so the fields sit where `field` says.
    ".byte 0xEB, {real} - 2",
    ".p2align 3",
    "ap_t_cr3: .quad 0",
    "ap_t_cr4: .long 0, 0",
    "ap_t_stack: .quad 0",
    "ap_t_entry: .quad 0",
    "ap_t_gdt_ptr: .word 23",
    "ap_t_gdt_base: .long 0",
    ".word 0",
    "ap_t_far: .long 0",
    ".word 0x08, 0",
    "ap_t_gdt:",
    ".quad 0",
    ".quad 0x00AF9A000000FFFF",
    ".quad 0x00CF92000000FFFF",
    "ap_t_long_offset: .long ap_long - ap_trampoline, 0",
    ".global ap_real",
    "ap_real:",
    "cli",
    "cld",
    "mov ax, cs",
    "mov ds, ax",
    "lgdt [{gdt_ptr}]",
    "mov eax, [{cr4}]",
    "mov cr4, eax",
    "mov eax, [{cr3}]",
    "mov cr3, eax",
    "mov ecx, 0xC0000080",
    "rdmsr",
    "or eax, {efer}",
    "wrmsr",
    "mov eax, cr0",
    "and eax, {not_em}",
    // From real mode, PE and PG go on together.
    "or eax, {cr0}",
    "mov cr0, eax",
    // jmp far m16:32 [ap_t_far]: into the 64-bit code segment.
    ".byte 0x66, 0xFF, 0x2E",
    ".word {far_jump}",
    ".code64",
    "ap_long:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "mov rsp, [rip + ap_t_stack]",
    "xor rbp, rbp",
    "mov rax, [rip + ap_t_entry]",
    "call rax",
    "ap_halt:",
    "hlt",
    "jmp ap_halt",
    "ap_trampoline_end:",
    cr3 = const field::CR3,
    cr4 = const field::CR4,
    gdt_ptr = const field::GDT_PTR,
    far_jump = const field::FAR_JUMP,
    real = const field::REAL,
    efer = const crate::boot::EFER_LONG_MODE,
    cr0 = const crate::boot::CR0_LONG_MODE | 1,
    not_em = const !crate::boot::CR0_EM,
);

extern "C" {
    static ap_trampoline: u8;
    static ap_real: u8;
    static ap_trampoline_end: u8;
}

/// Where the trampoline's fields are, from its start (see the layout above).
mod field {
    pub const CR3: usize = 8;
    pub const CR4: usize = 16;
    pub const STACK: usize = 24;
    pub const ENTRY: usize = 32;
    pub const GDT_PTR: usize = 40;
    pub const GDT_BASE: usize = 42;
    pub const FAR_JUMP: usize = 48;
    pub const GDT: usize = 56;
    pub const LONG_OFFSET: usize = 80;
    pub const REAL: usize = 88;
}

#[repr(C, align(16))]
struct Stack([u8; 64 * 1024]);
static mut AP_STACK: Stack = Stack([0; 64 * 1024]);

static AP_ONLINE: AtomicBool = AtomicBool::new(false);
static SHOOTDOWN_ACKS: AtomicU64 = AtomicU64::new(0);
pub static IPIS: AtomicU64 = AtomicU64::new(0);
/// The page below 1 MiB the boot entry set aside for the trampoline.
static TRAMPOLINE_PAGE: AtomicU64 = AtomicU64::new(0);

/// Records where the trampoline goes (a free page below 1 MiB).
pub fn set_trampoline_page(pa: u64) {
    TRAMPOLINE_PAGE.store(pa, Ordering::Relaxed);
}

fn apic_read(reg: u64) -> u32 {
    // SAFETY: the xAPIC page is mapped uncached in every hierarchy.
    unsafe { ((APIC + reg) as *const u32).read_volatile() }
}

fn apic_write(reg: u64, value: u32) {
    // SAFETY: as above.
    unsafe { ((APIC + reg) as *mut u32).write_volatile(value) };
}

/// The calling CPU (its APIC ID: 0 and 1 under QEMU). Until the second
/// CPU runs, the caller is CPU 0, and the xAPIC is left alone (a TD has
/// none, an SNP guest's traps).
pub fn cpu() -> usize {
    if !ap_is_online() {
        return 0;
    }
    (apic_read(0x20) >> 24) as usize % CPUS
}

/// Whether the second CPU has come up.
pub fn ap_is_online() -> bool {
    AP_ONLINE.load(Ordering::Acquire)
}

fn delay(n: u64) {
    for _ in 0..n {
        core::hint::spin_loop();
    }
}

fn wait_icr_idle() {
    while apic_read(0x300) & (1 << 12) != 0 {
        core::hint::spin_loop();
    }
}

/// Starts CPU 1 on the tables at `cr3`, running `entry`.
pub fn start_ap(cr3: u64, entry: extern "sysv64" fn() -> !) {
    apic_write(0xF0, 0x1FF); // software-enable the local APIC, spurious vector 0xFF
    let la57 = if crate::boot::la57() { crate::boot::CR4_LA57 } else { 0 };
    let page = TRAMPOLINE_PAGE.load(Ordering::Relaxed);
    if page == 0 || page >= 1 << 20 || !page.is_multiple_of(4096) || cr3 >= 1 << 32 {
        crate::fail("no trampoline page below 1 MiB, or page tables above 4 GiB");
    }
    // SAFETY: the trampoline's bytes lie between its two labels; the page
    // is the guest's, identity-mapped, and nothing else runs from it.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline);
        if core::ptr::addr_of!(ap_real) as usize - start as usize != field::REAL {
            crate::fail("the trampoline's fields are not where its writer puts them");
        }
        let len = core::ptr::addr_of!(ap_trampoline_end) as usize - start as usize;
        let dst = page as *mut u8;
        core::ptr::copy_nonoverlapping(start, dst, len);
        let long_offset = dst.add(field::LONG_OFFSET).cast::<u32>().read_unaligned() as u64;
        dst.add(field::CR3).cast::<u64>().write_unaligned(cr3);
        dst.add(field::CR4)
            .cast::<u32>()
            .write_unaligned(crate::boot::CR4_LONG_MODE | la57);
        dst.add(field::STACK)
            .cast::<u64>()
            .write_unaligned(core::ptr::addr_of!(AP_STACK) as u64 + 64 * 1024);
        dst.add(field::ENTRY)
            .cast::<u64>()
            .write_unaligned(entry as usize as u64);
        dst.add(field::GDT_BASE)
            .cast::<u32>()
            .write_unaligned((page as usize + field::GDT) as u32);
        dst.add(field::FAR_JUMP)
            .cast::<u32>()
            .write_unaligned((page + long_offset) as u32);
    }
    apic_write(0x310, 1 << 24);
    apic_write(0x300, 0x4500); // INIT
    wait_icr_idle();
    delay(100_000);
    for _ in 0..2 {
        apic_write(0x310, 1 << 24);
        apic_write(0x300, 0x4600 | (page >> 12) as u32); // SIPI: start at the page
        wait_icr_idle();
        delay(10_000);
    }
    for _ in 0..100_000_000u64 {
        if AP_ONLINE.load(Ordering::Acquire) {
            return;
        }
        core::hint::spin_loop();
    }
    crate::fail("CPU 1 did not come up");
}

/// Called by CPU 1 once it runs Rust with its IDT and TSS.
pub fn ap_online() {
    apic_write(0xF0, 0x1FF);
    AP_ONLINE.store(true, Ordering::Release);
}

/// Asks every other online CPU to flush its TLB and waits for it.
pub fn shootdown_others() {
    if !AP_ONLINE.load(Ordering::Acquire) || cpu() != 0 {
        return;
    }
    let before = SHOOTDOWN_ACKS.load(Ordering::Acquire);
    apic_write(0x310, 1 << 24);
    apic_write(0x300, SHOOTDOWN_VECTOR as u32);
    wait_icr_idle();
    IPIS.fetch_add(1, Ordering::Relaxed);
    for _ in 0..100_000_000u64 {
        if SHOOTDOWN_ACKS.load(Ordering::Acquire) != before {
            return;
        }
        core::hint::spin_loop();
    }
    crate::fail("CPU 1 did not acknowledge a TLB shootdown");
}

/// The shootdown IPI on CPU 1: flush, acknowledge, end of interrupt.
pub fn on_shootdown() {
    crate::memory::reload_cr3();
    SHOOTDOWN_ACKS.fetch_add(1, Ordering::AcqRel);
    apic_write(0xB0, 0);
}
