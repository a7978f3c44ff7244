//! The second CPU: started with INIT-SIPI-SIPI through the xAPIC, from a
//! real-mode trampoline at 0x8000 straight into long mode on the same page
//! tables, as deep as CPU 0's (CR4.LA57 goes on with the rest of CR4,
//! before paging); and TLB shootdowns by IPI.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const CPUS: usize = 2;
const APIC: u64 = 0xFEE0_0000;
pub const SHOOTDOWN_VECTOR: u64 = 240;

core::arch::global_asm!(
    ".pushsection .trampoline, \"awx\"",
    ".code16",
    ".global ap_trampoline",
    "ap_trampoline:",
    "cli",
    "cld",
    "xor ax, ax",
    "mov ds, ax",
    "lgdt [ap_gdt_ptr]",
    "mov eax, [ap_cr4]",
    "mov cr4, eax",
    "mov eax, [ap_cr3]",
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
    // Far jump to the 64-bit code segment (16-bit offset: we are below 64 KiB).
    ".byte 0xEA",
    ".word ap_long",
    ".word 0x08",
    ".code64",
    "ap_long:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "mov rsp, [ap_stack]",
    "xor rbp, rbp",
    "mov rax, [ap_entry]",
    "call rax",
    "ap_halt:",
    "hlt",
    "jmp ap_halt",
    ".p2align 3",
    "ap_gdt:",
    ".quad 0",
    ".quad 0x00AF9A000000FFFF",
    ".quad 0x00CF92000000FFFF",
    "ap_gdt_ptr:",
    ".word 23",
    ".long ap_gdt",
    ".p2align 3",
    ".global ap_cr3",
    "ap_cr3: .quad 0",
    ".global ap_cr4",
    "ap_cr4: .long 0",
    ".p2align 3",
    ".global ap_stack",
    "ap_stack: .quad 0",
    ".global ap_entry",
    "ap_entry: .quad 0",
    ".popsection",
    efer = const crate::boot::EFER_LONG_MODE,
    cr0 = const crate::boot::CR0_LONG_MODE | 1,
    not_em = const !crate::boot::CR0_EM,
);

extern "C" {
    static mut ap_cr3: u64;
    static mut ap_cr4: u32;
    static mut ap_stack: u64;
    static mut ap_entry: u64;
}

#[repr(C, align(16))]
struct Stack([u8; 64 * 1024]);
static mut AP_STACK: Stack = Stack([0; 64 * 1024]);

static AP_ONLINE: AtomicBool = AtomicBool::new(false);
static SHOOTDOWN_ACKS: AtomicU64 = AtomicU64::new(0);
pub static IPIS: AtomicU64 = AtomicU64::new(0);

fn apic_read(reg: u64) -> u32 {
    // SAFETY: the xAPIC page is mapped uncached in every hierarchy.
    unsafe { ((APIC + reg) as *const u32).read_volatile() }
}

fn apic_write(reg: u64, value: u32) {
    // SAFETY: as above.
    unsafe { ((APIC + reg) as *mut u32).write_volatile(value) };
}

/// The calling CPU (its APIC ID: 0 and 1 under QEMU).
pub fn cpu() -> usize {
    (apic_read(0x20) >> 24) as usize % CPUS
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
pub fn start_ap(cr3: u64, entry: extern "C" fn() -> !) {
    apic_write(0xF0, 0x1FF); // software-enable the local APIC, spurious vector 0xFF
    let la57 = if crate::boot::la57() { crate::boot::CR4_LA57 } else { 0 };
    // SAFETY: the trampoline's data, written before the AP starts.
    unsafe {
        core::ptr::addr_of_mut!(ap_cr3).write_volatile(cr3);
        core::ptr::addr_of_mut!(ap_cr4).write_volatile(crate::boot::CR4_LONG_MODE | la57);
        core::ptr::addr_of_mut!(ap_stack).write_volatile(core::ptr::addr_of!(AP_STACK) as u64 + 64 * 1024);
        core::ptr::addr_of_mut!(ap_entry).write_volatile(entry as usize as u64);
    }
    apic_write(0x310, 1 << 24);
    apic_write(0x300, 0x4500); // INIT
    wait_icr_idle();
    delay(100_000);
    for _ in 0..2 {
        apic_write(0x310, 1 << 24);
        apic_write(0x300, 0x4600 | 0x08); // SIPI: start at 0x8000
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
