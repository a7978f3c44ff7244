//! The PVH entry, for QEMU's `-kernel` loader. From QEMU's PVH entry (32-bit protected mode, paging off) to 64-bit
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
    cpuid_la57 = const super::CPUID_7_ECX_LA57,
    cr4_la57 = const super::CR4_LA57,
    gdt_ptr = sym super::GDT_PTR,
    gdt = sym super::GDT,
    main = sym pvh_main,
    cr4 = const super::CR4_LONG_MODE,
    efer = const super::EFER_LONG_MODE,
    cr0 = const super::CR0_LONG_MODE,
    not_em = const !super::CR0_EM,
);

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
fn la57_requested() -> bool {
    // SAFETY: written only before Rust starts; a plain read after.
    unsafe { core::ptr::addr_of!(LA57_REQUESTED).read_volatile() != 0 }
}

use super::Table;

#[no_mangle]
pub static mut BOOT_PML5: Table = Table([0; 512]);
#[no_mangle]
pub static mut BOOT_PML4: Table = Table([0; 512]);
#[no_mangle]
pub static mut BOOT_PDPT: Table = Table([0; 512]);

extern "C" {
    static BOOT_STACK_TOP: u8;
}
core::arch::global_asm!(".set BOOT_STACK_TOP, BOOT_STACK + 65536");

extern "C" {
    static __bss_end: u8;
}

/// The first CPU comes here from the 32-bit entry, on the boot stack.
extern "sysv64" fn pvh_main() -> ! {
    // A linker-script symbol; only its address is taken.
    let end = core::ptr::addr_of!(__bss_end) as u64;
    crate::kernel_main(super::BootInfo {
        firmware: super::Firmware::Pvh,
        la57_requested: la57_requested(),
        image: (1 << 20, end),
        // Low memory is free under PVH; the linker keeps the kernel above 1 MiB.
        trampoline: 0x8000,
    })
}
