//! TDX and SNP, emulated inside the guest: the TDX module + VMM and the SNP
//! hypervisor + RMP are the host-side models (`hvmock`), reached from the
//! traps the real instructions raise under TCG, so the crates' real asm
//! wrappers and their register ABI run:
//! - TDCALL (`66 0F 01 CC`), PVALIDATE (`F2 0F 01 FF`) and VMGEXIT
//!   (`F3 0F 01 D9`) raise #UD;
//! - `wrmsr`/`rdmsr` of the GHCB MSR (0xC001_0130) would raise #GP on a
//!   CPU without it; QEMU 7.2's TCG instead ignores the write and reads 0,
//!   so the VMGEXIT handler takes the value from the registers the `wrmsr`
//!   just used and completes the `rdmsr` after it (both paths are here).

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use alloc::boxed::Box;
use alloc::sync::Arc;

use hvmock::{GuestMemory, MockSnp, MockTdx};
use snp_ghcb::{GhcbMsr, PageSize, Pvalidate};
use tdcall::{Registers, Tdcall};

use crate::heap::EMULATING;
use crate::memory::{HOST_VIEW, RAM};
use crate::trap::Frame;

static MEMORY: AtomicPtr<Arc<GuestMemory>> = AtomicPtr::new(core::ptr::null_mut());
static TDX: AtomicPtr<MockTdx> = AtomicPtr::new(core::ptr::null_mut());
static SNP: AtomicPtr<MockSnp> = AtomicPtr::new(core::ptr::null_mut());
/// The (virtual) GHCB MSR.
static GHCB_MSR: AtomicU64 = AtomicU64::new(0);
pub static EMULATED: AtomicU64 = AtomicU64::new(0);

/// The host's view of guest memory.
pub fn host_memory() -> &'static GuestMemory {
    let p = MEMORY.load(Ordering::Acquire);
    if p.is_null() {
        // SAFETY: the host view maps all RAM for the guest's lifetime.
        let mem = Box::leak(Box::new(Arc::new(unsafe {
            GuestMemory::from_raw(HOST_VIEW as *mut u8, RAM)
        })));
        MEMORY.store(mem, Ordering::Release);
        return mem;
    }
    // SAFETY: leaked, lives forever.
    unsafe { &*p }
}

fn memory_arc() -> Arc<GuestMemory> {
    host_memory();
    // SAFETY: set by `host_memory`, leaked.
    unsafe { (*MEMORY.load(Ordering::Acquire)).clone() }
}

/// Installs a fresh TDX model (a new boot of the platform).
pub fn install_tdx(config: hvmock::TdxConfig) -> &'static MockTdx {
    let model = Box::leak(Box::new(MockTdx::new(memory_arc(), config)));
    TDX.store(model, Ordering::Release);
    model
}

/// Installs a fresh SNP model.
pub fn install_snp(config: hvmock::SnpConfig) -> &'static MockSnp {
    let model = Box::leak(Box::new(MockSnp::new(memory_arc(), config)));
    SNP.store(model, Ordering::Release);
    GHCB_MSR.store(0, Ordering::Release);
    model
}

fn code(frame: &Frame, n: usize) -> &'static [u8] {
    // SAFETY: RIP points into this kernel's code.
    unsafe { core::slice::from_raw_parts(frame.rip as *const u8, n) }
}

/// Handles #UD and #GP raised by the instructions it emulates; `false` if
/// the fault is something else.
pub fn emulate(frame: &mut Frame) -> bool {
    EMULATING.store(true, Ordering::Release);
    let done = emulate_inner(frame);
    EMULATING.store(false, Ordering::Release);
    if done {
        EMULATED.fetch_add(1, Ordering::Relaxed);
    }
    done
}

fn emulate_inner(frame: &mut Frame) -> bool {
    match (frame.vector, code(frame, 4)) {
        (6, [0x66, 0x0F, 0x01, 0xCC]) => {
            let Some(tdx) = model(&TDX) else { return false };
            let mut regs = Registers {
                rax: frame.rax,
                rcx: frame.rcx,
                rdx: frame.rdx,
                rsi: frame.rsi,
                rdi: frame.rdi,
                r8: frame.r8,
                r9: frame.r9,
                r10: frame.r10,
                r11: frame.r11,
                r12: frame.r12,
                r13: frame.r13,
                r14: frame.r14,
                r15: frame.r15,
            };
            // SAFETY: the model changes only its state and guest memory
            // through the host view, as the TDX module would.
            unsafe { tdx.tdcall(&mut regs) };
            (frame.rax, frame.rcx, frame.rdx, frame.rsi, frame.rdi) =
                (regs.rax, regs.rcx, regs.rdx, regs.rsi, regs.rdi);
            (frame.r8, frame.r9, frame.r10, frame.r11) = (regs.r8, regs.r9, regs.r10, regs.r11);
            (frame.r12, frame.r13, frame.r14, frame.r15) = (regs.r12, regs.r13, regs.r14, regs.r15);
            frame.rip += 4;
            true
        }
        (6, [0xF2, 0x0F, 0x01, 0xFF]) => {
            let Some(snp) = model(&SNP) else { return false };
            let size = if frame.rcx & 1 == 1 {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            // SAFETY: as above, for the RMP.
            let raw = unsafe { snp.pvalidate(frame.rax, size, frame.rdx & 1 == 1) };
            frame.rax = raw.eax as u64;
            frame.rflags = (frame.rflags & !1) | raw.carry as u64;
            frame.rip += 4;
            true
        }
        (6, [0xF3, 0x0F, 0x01, 0xD9]) => {
            let Some(snp) = model(&SNP) else { return false };
            // QEMU 7.2's TCG ignores writes to MSRs it does not know (no
            // #GP) and reads them as 0. The GHCB MSR is written right
            // before VMGEXIT (`wrmsr`, which leaves ECX and EDX:EAX as
            // they were) and read right after: take the written value from
            // the registers, and complete the `rdmsr` that follows.
            if frame.rcx as u32 == 0xC001_0130 {
                GHCB_MSR.store((frame.rdx << 32) | (frame.rax & 0xFFFF_FFFF), Ordering::Release);
            }
            // SAFETY: as above, for the hypervisor.
            let answer = unsafe { snp.vmgexit(GHCB_MSR.load(Ordering::Acquire)) };
            GHCB_MSR.store(answer, Ordering::Release);
            frame.rip += 4;
            if code(frame, 2) == [0x0F, 0x32] && frame.rcx as u32 == 0xC001_0130 {
                (frame.rax, frame.rdx) = (answer & 0xFFFF_FFFF, answer >> 32);
                frame.rip += 2;
            }
            true
        }
        (13, [0x0F, 0x30, ..]) if frame.rcx as u32 == 0xC001_0130 => {
            GHCB_MSR.store((frame.rdx << 32) | (frame.rax & 0xFFFF_FFFF), Ordering::Release);
            frame.rip += 2;
            true
        }
        (13, [0x0F, 0x32, ..]) if frame.rcx as u32 == 0xC001_0130 => {
            let v = GHCB_MSR.load(Ordering::Acquire);
            (frame.rax, frame.rdx) = (v & 0xFFFF_FFFF, v >> 32);
            frame.rip += 2;
            true
        }
        _ => false,
    }
}

/// The TDX model installed last, if any.
pub fn tdx_model() -> Option<&'static MockTdx> {
    model(&TDX)
}

/// The SNP model installed last, if any.
pub fn snp_model() -> Option<&'static MockSnp> {
    model(&SNP)
}

fn model<T>(slot: &AtomicPtr<T>) -> Option<&'static T> {
    let p = slot.load(Ordering::Acquire);
    // SAFETY: models are leaked, they live forever.
    (!p.is_null()).then(|| unsafe { &*p })
}
