//! A user-space stand-in for an OS's #PF path: a SIGSEGV handler that maps
//! the signal frame's registers onto the zeropad fix-up and resumes, and a
//! pair of pages whose second one can be made PROT_NONE.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use coco_convert::zeropad::{self, FaultKind, Gpr, RegisterAccess};

/// Faults the handler fixed up.
pub static FIXUPS: AtomicU64 = AtomicU64::new(0);

/// The signal frame's general registers, as the fix-up sees them.
struct Ucontext<'a>(&'a mut [libc::greg_t; 23]);

fn greg(reg: Gpr) -> usize {
    (match reg {
        Gpr::Rax => libc::REG_RAX,
        Gpr::Rcx => libc::REG_RCX,
        Gpr::Rdx => libc::REG_RDX,
        Gpr::Rbx => libc::REG_RBX,
        Gpr::Rsp => libc::REG_RSP,
        Gpr::Rbp => libc::REG_RBP,
        Gpr::Rsi => libc::REG_RSI,
        Gpr::Rdi => libc::REG_RDI,
        Gpr::R8 => libc::REG_R8,
        Gpr::R9 => libc::REG_R9,
        Gpr::R10 => libc::REG_R10,
        Gpr::R11 => libc::REG_R11,
        Gpr::R12 => libc::REG_R12,
        Gpr::R13 => libc::REG_R13,
        Gpr::R14 => libc::REG_R14,
        Gpr::R15 => libc::REG_R15,
    }) as usize
}

impl RegisterAccess for Ucontext<'_> {
    fn gpr(&self, reg: Gpr) -> u64 {
        self.0[greg(reg)] as u64
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.0[greg(reg)] = value as libc::greg_t;
    }
    fn rip(&self) -> u64 {
        self.0[libc::REG_RIP as usize] as u64
    }
    fn set_rip(&mut self, rip: u64) {
        self.0[libc::REG_RIP as usize] = rip as libc::greg_t;
    }
}

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an
    // SA_SIGINFO handler.
    let (fault, uc) = unsafe { ((*info).si_addr() as u64, &mut *(context as *mut libc::ucontext_t)) };
    let mut regs = Ucontext(&mut uc.uc_mcontext.gregs);
    if zeropad::handle_fault(&mut regs, fault, FaultKind::PageFault).is_ok() {
        FIXUPS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Not ours: die of it, as without a handler.
    // SAFETY: restoring the default action is async-signal-safe; returning
    // re-executes the faulting instruction, which now kills the process.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
}

/// Installs the handler (once) and gives the calling thread an alternate
/// signal stack (the RSP variants below point RSP elsewhere at the fault).
pub fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        zeropad::init();
        // SAFETY: a plain sigaction installation.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_segv as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut()), 0);
        }
    });
    thread_local! { static ALT: Cell<bool> = const { Cell::new(false) }; }
    if !ALT.with(|a| a.replace(true)) {
        let size = 64 * 1024;
        let stack = Box::leak(vec![0u8; size].into_boxed_slice());
        let ss = libc::stack_t {
            ss_sp: stack.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: size,
        };
        // SAFETY: the stack is leaked, so it outlives the thread.
        assert_eq!(unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) }, 0);
    }
}

/// Two pages: the first readable with known bytes, the second filled with
/// 0xAB and then made PROT_NONE. Returns the address of the boundary.
#[derive(Debug)]
pub struct Pages {
    base: *mut u8,
}

// SAFETY: the mapping is plain memory shared by the test's threads.
unsafe impl Send for Pages {}
// SAFETY: as above.
unsafe impl Sync for Pages {}

impl Default for Pages {
    fn default() -> Self {
        Self::new()
    }
}

impl Pages {
    /// Maps the pages.
    pub fn new() -> Pages {
        // SAFETY: an anonymous private mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as *mut u8;
        for i in 0..4096 {
            // SAFETY: inside the mapping.
            unsafe {
                *base.add(i) = (i % 251) as u8;
                *base.add(4096 + i) = 0xAB;
            }
        }
        let pages = Pages { base };
        pages.protect_second(libc::PROT_NONE);
        pages
    }

    /// Address of the boundary between the pages.
    pub fn boundary(&self) -> u64 {
        self.base as u64 + 4096
    }

    /// Sets the second page's protection.
    pub fn protect_second(&self, prot: libc::c_int) {
        // SAFETY: the second page of our own mapping.
        assert_eq!(unsafe { libc::mprotect(self.base.add(4096).cast(), 4096, prot) }, 0);
    }

    /// What a load at `boundary - k` returns when the second page faults:
    /// the k bytes up to the boundary, zero-padded.
    pub fn padded(&self, k: u64) -> u64 {
        (0..k).fold(0u64, |v, i| v | (((4096 - k + i) % 251) << (8 * i)))
    }

    /// What it returns when the second page is readable.
    pub fn full(&self, k: u64) -> u64 {
        self.padded(k) | (0..8 - k).fold(0u64, |v, i| v | (0xABu64 << (8 * (k + i))))
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.base.cast(), 8192) };
    }
}
