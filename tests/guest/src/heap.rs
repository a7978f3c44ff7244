//! A bump heap for the in-guest emulators (and iced-x86's tables, built
//! once by `zeropad::init`). The engine itself never allocates: during a
//! "no heap" phase every allocation fails unless it comes from inside an
//! emulated instruction (the emulators stand for hardware and host, which
//! are not the guest's heap).

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const SIZE: usize = 8 << 20;

#[repr(C, align(4096))]
struct Arena([u8; SIZE]);

static mut ARENA: Arena = Arena([0; SIZE]);
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// While set, only emulation may allocate.
pub static NO_HEAP: AtomicBool = AtomicBool::new(false);
/// Set while an emulated instruction runs (per CPU would be exact; the
/// emulators run with interrupts off, one at a time).
pub static EMULATING: AtomicBool = AtomicBool::new(false);
/// Allocations refused during the no-heap phase.
pub static REFUSED: AtomicUsize = AtomicUsize::new(0);

struct Bump;

// SAFETY: hands out disjoint, aligned pieces of a static arena; never
// frees (the emulators' footprint is small and bounded).
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if NO_HEAP.load(Ordering::Acquire) && !EMULATING.load(Ordering::Acquire) {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return core::ptr::null_mut();
        }
        let mut start = 0;
        let claimed = NEXT.fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
            start = (next + layout.align() - 1) & !(layout.align() - 1);
            (start + layout.size() <= SIZE).then_some(start + layout.size())
        });
        match claimed {
            // SAFETY: inside the arena, which lives forever.
            Ok(_) => unsafe { core::ptr::addr_of_mut!(ARENA.0).cast::<u8>().add(start) },
            Err(_) => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static HEAP: Bump = Bump;
