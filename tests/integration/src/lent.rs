//! For tests of the memory a caller lends a conversion (a frame list, a
//! scratch): lists stored in simulated guest memory, an OS that gives the
//! engine no reverse translation, and a host call that pauses so another
//! CPU's conversion can be caught in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;

use coco_convert::PhysMem;
use hvmock::GuestMemory;
use tdcall::{leaf, subfunction, Registers, Tdcall};

use crate::null::NullTdx;
use crate::sim::SimPhys;

const PAGE: u64 = 4096;

/// `count` frames, one every 7 pages from `first`.
pub fn spaced(first: u64, count: u64) -> Vec<u64> {
    (0..count).map(|i| first + i * 7 * PAGE).collect()
}

/// Writes `list` into simulated guest memory at `pa` and returns it as the
/// slice the engine is handed (the list where the guest keeps it).
pub fn store_list<'m>(mem: &'m GuestMemory, pa: u64, list: &[u64]) -> &'m [u64] {
    for (i, &frame) in list.iter().enumerate() {
        mem.write_u64(pa + 8 * i as u64, frame);
    }
    // SAFETY: `list.len()` words of simulated guest memory, 8-byte
    // aligned, which the test uses for nothing else while the slice lives.
    unsafe { std::slice::from_raw_parts(mem.ptr(pa).cast::<u64>(), list.len()) }
}

/// Simulated memory with no reverse translation of its own, as a kernel's
/// `PhysMem` may be: the engine walks its tables for a list's address.
#[derive(Debug)]
pub struct WalkedPhys<'a>(pub &'a SimPhys);

// SAFETY: forwards `page_ptr`, whose guarantees `SimPhys` keeps.
unsafe impl PhysMem for WalkedPhys<'_> {
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        self.0.page_ptr(pa)
    }
}

/// TDX whose first MapGPA pauses until the test has looked: `in_call`
/// is passed once the call is in flight, `resume` lets it answer.
#[derive(Debug)]
pub struct PausingTdx {
    armed: AtomicBool,
    /// Waited on by the host call and the test: the call is in flight.
    pub in_call: Barrier,
    /// Waited on by both: the test has looked, the call may answer.
    pub resume: Barrier,
    answers: NullTdx,
}

impl PausingTdx {
    /// Armed for one MapGPA.
    pub fn new() -> Self {
        PausingTdx {
            armed: AtomicBool::new(true),
            in_call: Barrier::new(2),
            resume: Barrier::new(2),
            answers: NullTdx::default(),
        }
    }
}

impl Default for PausingTdx {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: answers as the null TDX does, and changes no memory.
unsafe impl Tdcall for PausingTdx {
    unsafe fn tdcall(&self, regs: &mut Registers) {
        if regs.rax == leaf::VP_VMCALL && regs.r11 == subfunction::MAP_GPA && self.armed.swap(false, Ordering::AcqRel) {
            self.in_call.wait();
            self.resume.wait();
        }
        // SAFETY: forwarded.
        unsafe { self.answers.tdcall(regs) }
    }
}
