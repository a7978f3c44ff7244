//! The IDT, a TSS with IST stacks (libcore assumes a red zone, so no
//! exception may land on the interrupted stack), and the saved-register
//! frame every handler works on.

use coco_convert::exception::{Gpr, RegisterAccess};

/// All GPRs as the entry stub pushes them, then the vector, the error
/// code, and what the CPU pushed.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl RegisterAccess for Frame {
    fn gpr(&self, reg: Gpr) -> u64 {
        match reg {
            Gpr::Rax => self.rax,
            Gpr::Rcx => self.rcx,
            Gpr::Rdx => self.rdx,
            Gpr::Rbx => self.rbx,
            Gpr::Rsp => self.rsp,
            Gpr::Rbp => self.rbp,
            Gpr::Rsi => self.rsi,
            Gpr::Rdi => self.rdi,
            Gpr::R8 => self.r8,
            Gpr::R9 => self.r9,
            Gpr::R10 => self.r10,
            Gpr::R11 => self.r11,
            Gpr::R12 => self.r12,
            Gpr::R13 => self.r13,
            Gpr::R14 => self.r14,
            Gpr::R15 => self.r15,
        }
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        let slot = match reg {
            Gpr::Rax => &mut self.rax,
            Gpr::Rcx => &mut self.rcx,
            Gpr::Rdx => &mut self.rdx,
            Gpr::Rbx => &mut self.rbx,
            Gpr::Rsp => &mut self.rsp,
            Gpr::Rbp => &mut self.rbp,
            Gpr::Rsi => &mut self.rsi,
            Gpr::Rdi => &mut self.rdi,
            Gpr::R8 => &mut self.r8,
            Gpr::R9 => &mut self.r9,
            Gpr::R10 => &mut self.r10,
            Gpr::R11 => &mut self.r11,
            Gpr::R12 => &mut self.r12,
            Gpr::R13 => &mut self.r13,
            Gpr::R14 => &mut self.r14,
            Gpr::R15 => &mut self.r15,
        };
        *slot = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
}

macro_rules! stubs {
    ($($vector:literal $has_error:literal),*) => {
        core::arch::global_asm!(
            $(
                concat!(".global trap_stub_", $vector),
                concat!("trap_stub_", $vector, ":"),
                concat!(".if ", $has_error, " == 0"),
                "push 0",
                ".endif",
                concat!("push ", $vector),
                "jmp trap_common",
            )*
            "trap_common:",
            "push rax", "push rcx", "push rdx", "push rbx", "push rbp", "push rsi", "push rdi",
            "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
            "mov rdi, rsp",
            "cld",
            "call {dispatch}",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
            "pop rdi", "pop rsi", "pop rbp", "pop rbx", "pop rdx", "pop rcx", "pop rax",
            "add rsp, 16",
            "iretq",
            dispatch = sym dispatch,
        );
    };
}

// Vector, and whether the CPU pushes an error code: #VE (20) has none,
// #VC (29) carries the exit code. 241 is the emulated mode's way into the
// #VC handler (`int` pushes no error code; the handler supplies it).
stubs!(6 0, 8 1, 13 1, 14 1, 20 0, 29 1, 240 0, 241 0);

extern "C" {
    fn trap_stub_6();
    fn trap_stub_20();
    fn trap_stub_29();
    fn trap_stub_8();
    fn trap_stub_13();
    fn trap_stub_14();
    fn trap_stub_240();
    #[cfg(feature = "emulator")]
    fn trap_stub_241();
}

// The System V ABI on both builds (a UEFI target's "C" is Microsoft's): the
// stub passes the frame in RDI.
extern "sysv64" fn dispatch(frame: &mut Frame) {
    crate::handle_trap(frame);
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap: u16,
}

const CPUS: usize = 2;
static mut TSS: [Tss; CPUS] = [const {
    Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap: 104,
    }
}; CPUS];

#[repr(C, align(16))]
struct IstStacks([[u8; 32 * 1024]; 4]);
static mut IST: [IstStacks; CPUS] = [const { IstStacks([[0; 32 * 1024]; 4]) }; CPUS];

fn set_gate(vector: usize, handler: unsafe extern "C" fn(), ist: u64) {
    let addr = handler as usize as u64;
    let low = (addr & 0xFFFF) | (0x08 << 16) | (ist << 32) | (0x8E << 40) | ((addr >> 16) & 0xFFFF) << 48;
    // SAFETY: written before the IDT is loaded (CPU 0 at boot).
    unsafe {
        IDT.0[vector * 2] = low;
        IDT.0[vector * 2 + 1] = addr >> 32;
    }
}

/// Builds the IDT (once) and loads it, with this CPU's TSS.
pub fn init(cpu: usize) {
    if cpu == 0 {
        set_gate(6, trap_stub_6, 2);
        set_gate(8, trap_stub_8, 3);
        set_gate(13, trap_stub_13, 2);
        set_gate(14, trap_stub_14, 1);
        // Their own stack: a #VE or #VC can arrive inside any other
        // handler that does port I/O or CPUID (printing a failure).
        set_gate(20, trap_stub_20, 4);
        set_gate(29, trap_stub_29, 4);
        set_gate(240, trap_stub_240, 2);
        #[cfg(feature = "emulator")]
        set_gate(crate::exit_checks::INJECTED_VC as usize, trap_stub_241, 4);
    }
    // SAFETY: each CPU sets up its own TSS and GDT slot, then loads them.
    unsafe {
        let tss = core::ptr::addr_of_mut!(TSS[cpu]);
        for i in 0..4 {
            let top = core::ptr::addr_of_mut!(IST[cpu].0[i]) as u64 + 32 * 1024;
            core::ptr::addr_of_mut!((*tss).ist[i]).write_unaligned(top);
        }
        let base = tss as u64;
        let limit = core::mem::size_of::<Tss>() as u64 - 1;
        let low = (limit & 0xFFFF)
            | (base & 0xFF_FFFF) << 16
            | 0x89 << 40
            | ((limit >> 16) & 0xF) << 48
            | ((base >> 24) & 0xFF) << 56;
        let gdt = core::ptr::addr_of_mut!(crate::boot::GDT) as *mut u64;
        gdt.add(3 + 2 * cpu).write(low);
        gdt.add(4 + 2 * cpu).write(base >> 32);
        let sel: u16 = (3 + 2 * cpu as u16) * 8;
        core::arch::asm!("ltr {0:x}", in(reg) sel, options(nostack));
        #[repr(C, packed)]
        struct Ptr {
            limit: u16,
            base: u64,
        }
        let ptr = Ptr {
            limit: (512 * 8 - 1) as u16,
            base: core::ptr::addr_of!(IDT) as u64,
        };
        core::arch::asm!("lidt [{0}]", in(reg) &ptr, options(nostack));
    }
}
