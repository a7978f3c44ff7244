//! From QEMU's PVH entry (32-bit protected mode, paging off) to 64-bit
//! Rust: identity-map the first 4 GiB with 1 GiB pages, enable PAE, long
//! mode, NX and SSE, load a 64-bit GDT, jump.
//!
//! With `la57` on the kernel command line (QEMU's `-append`), and a CPU
//! that has LA57, paging starts with five levels: CR4.LA57 can be set only
//! while paging is off, so here or never. Rust checks the outcome
//! ([`la57`]) and fails the run if the CPU lacks LA57.

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
    // EBX: the PVH start info. Is "la57" in the command line?
    "cmp dword ptr [ebx], {pvh_magic}",
    "jne boot_tables",
    "mov esi, [ebx + 0x18]",
    "test esi, esi",
    "jz boot_tables",
    "boot_cmdline_loop:",
    "cmp dword ptr [esi], {la57_word}",
    "je boot_la57_requested",
    "cmp byte ptr [esi], 0",
    "je boot_tables",
    "inc esi",
    "jmp boot_cmdline_loop",
    "boot_la57_requested:",
    "mov dword ptr [{requested}], 1",
    // Setting CR4.LA57 on a CPU without it faults, with nothing to report
    // the fault yet: leave it off and let Rust say why.
    "xor eax, eax",
    "cpuid",
    "cmp eax, 7",
    "jb boot_tables",
    "mov eax, 7",
    "xor ecx, ecx",
    "cpuid",
    "test ecx, {cpuid_la57}",
    "jz boot_tables",
    "mov dword ptr [{enabled}], 1",
    // PML5[0] -> PML4.
    "mov eax, offset {pml4}",
    "or eax, 3",
    "mov [{pml5}], eax",
    "mov dword ptr [{pml5} + 4], 0",
    "boot_tables:",
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
    "mov edx, cr4",
    "or edx, {cr4}",
    "cmp dword ptr [{enabled}], 0",
    "je boot_paging",
    "mov eax, offset {pml5}",
    "or edx, {cr4_la57}",
    "boot_paging:",
    "mov cr3, eax",
    "mov cr4, edx",
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
    pml5 = sym BOOT_PML5,
    pml4 = sym BOOT_PML4,
    pdpt = sym BOOT_PDPT,
    requested = sym LA57_REQUESTED,
    enabled = sym LA57_ENABLED,
    pvh_magic = const PVH_START_MAGIC,
    la57_word = const u32::from_le_bytes(*b"la57"),
    cpuid_la57 = const CPUID_7_ECX_LA57,
    cr4_la57 = const CR4_LA57,
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

/// CR4.LA57: five levels of paging.
pub const CR4_LA57: u32 = coco_convert::Paging::CR4_LA57 as u32;
/// CPUID.(EAX=7,ECX=0):ECX bit 16: the CPU has LA57.
pub const CPUID_7_ECX_LA57: u32 = 1 << 16;
/// `hvm_start_info.magic`: EBX points to a PVH start info.
const PVH_START_MAGIC: u32 = 0x336E_C578;

/// Whether the command line asked for five levels.
#[no_mangle]
static mut LA57_REQUESTED: u32 = 0;
/// Whether paging started with five levels.
#[no_mangle]
static mut LA57_ENABLED: u32 = 0;

/// Whether the command line asked for 5-level paging. Written once, by the
/// 32-bit entry, before any Rust runs.
pub fn la57_requested() -> bool {
    // SAFETY: written only before Rust starts; a plain read after.
    unsafe { core::ptr::addr_of!(LA57_REQUESTED).read_volatile() != 0 }
}

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

#[no_mangle]
pub static mut BOOT_PML5: Table = Table([0; 512]);
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
