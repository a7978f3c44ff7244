//! From QEMU's PVH entry (32-bit protected mode, paging off) to 64-bit
//! Rust: identity-map the first 4 GiB with 1 GiB pages, enable PAE, long
//! mode, NX and SSE, load a 64-bit GDT, jump.

core::arch::global_asm!(
    // PVH: an ELF note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) giving the
    // 32-bit entry point; its segment must be 4-aligned for QEMU 7.2.
    ".pushsection .note.Xen, \"a\"",
    ".p2align 2",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".long start32",
    ".popsection",
    ".pushsection .text.boot, \"ax\"",
    ".code32",
    ".global start32",
    "start32:",
    "cli",
    "mov esp, offset {stack_top}",
    // PML4[0] -> PDPT; PDPT[0..4] = 1 GiB identity leaves (P|RW|PS).
    "mov eax, offset {pdpt}",
    "or eax, 3",
    "mov [{pml4}], eax",
    "mov dword ptr [{pml4} + 4], 0",
    "xor ecx, ecx",
    "boot_identity_loop:",
    "mov eax, ecx",
    "shl eax, 30",
    "or eax, 0x83",
    "mov [{pdpt} + ecx * 8], eax",
    "mov dword ptr [{pdpt} + ecx * 8 + 4], 0",
    "inc ecx",
    "cmp ecx, 4",
    "jne boot_identity_loop",
    "mov eax, offset {pml4}",
    "mov cr3, eax",
    "mov eax, cr4",
    "or eax, {cr4}",
    "mov cr4, eax",
    "mov ecx, 0xC0000080",
    "rdmsr",
    "or eax, {efer}",
    "wrmsr",
    "mov eax, cr0",
    "and eax, {not_em}",
    "or eax, {cr0}",
    "mov cr0, eax",
    "mov dword ptr [{gdt_ptr} + 2], offset {gdt}",
    "mov dword ptr [{gdt_ptr} + 6], 0",
    "lgdt [{gdt_ptr}]",
    "mov eax, offset start64",
    "push 0x08",
    "push eax",
    "retf",
    ".code64",
    "start64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    // Upper register halves are undefined after the switch.
    "mov rsp, offset {stack_top}",
    "xor rbp, rbp",
    "call {main}",
    "boot_halt:",
    "hlt",
    "jmp boot_halt",
    ".popsection",
    stack_top = sym BOOT_STACK_TOP,
    pml4 = sym BOOT_PML4,
    pdpt = sym BOOT_PDPT,
    gdt_ptr = sym GDT_PTR,
    gdt = sym GDT,
    main = sym crate::kernel_main,
    cr4 = const CR4_LONG_MODE,
    efer = const EFER_LONG_MODE,
    cr0 = const CR0_LONG_MODE,
    not_em = const !CR0_EM,
);

/// CR4 for long mode with SSE: PAE, OSFXSR, OSXMMEXCPT.
pub const CR4_LONG_MODE: u32 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: LME, NXE.
pub const EFER_LONG_MODE: u32 = (1 << 8) | (1 << 11);
/// CR0: PG, WP, MP (PE is already on when PVH enters).
pub const CR0_LONG_MODE: u32 = (1 << 31) | (1 << 16) | (1 << 1);
/// CR0.EM, which must be off for SSE.
pub const CR0_EM: u32 = 1 << 2;

#[repr(C, align(4096))]
pub struct Table(pub [u64; 512]);

#[no_mangle]
pub static mut BOOT_PML4: Table = Table([0; 512]);
#[no_mangle]
pub static mut BOOT_PDPT: Table = Table([0; 512]);

#[repr(C, align(16))]
pub struct Stack(pub [u8; 64 * 1024]);

#[no_mangle]
pub static mut BOOT_STACK: Stack = Stack([0; 64 * 1024]);

extern "C" {
    static BOOT_STACK_TOP: u8;
}
core::arch::global_asm!(".set BOOT_STACK_TOP, BOOT_STACK + 65536");

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
