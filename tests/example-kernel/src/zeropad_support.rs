//! What the zeropad fix-up needs from the kernel: a heap for the
//! decoder's tables, built once by `zeropad::init`, and a call from the #PF
//! handler.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use coco_convert::zeropad::{self, FaultFrame, FaultKind};

/// Enough for the decoder's tables.
const HEAP: usize = 1 << 20;

#[repr(C, align(4096))]
struct Heap(UnsafeCell<[u8; HEAP]>);

// SAFETY: the bump pointer hands each byte out once.
unsafe impl Sync for Heap {}

static HEAP_MEMORY: Heap = Heap(UnsafeCell::new([0; HEAP]));
static HEAP_USED: AtomicUsize = AtomicUsize::new(0);

/// A bump allocator: the kernel's early heap.
struct BumpAllocator;

// SAFETY: every block handed out lies inside `HEAP_MEMORY`, is aligned as
// asked, and is never handed out again.
unsafe impl GlobalAlloc for BumpAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = HEAP_MEMORY.0.get() as usize;
        let mut used = HEAP_USED.load(Ordering::Relaxed);
        loop {
            let start = (base + used).next_multiple_of(layout.align()) - base;
            let end = start + layout.size();
            if end > HEAP {
                return core::ptr::null_mut();
            }
            match HEAP_USED.compare_exchange(used, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => used = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: BumpAllocator = BumpAllocator;

/// The kernel's #PF handler, kernel-mode branch: a `load_unaligned_zeropad`
/// that ran into a page a conversion made not present is fixed up and
/// resumed; anything else is the kernel's to handle.
#[no_mangle]
pub extern "C" fn page_fault(frame: &mut FaultFrame, cr2: u64) -> bool {
    zeropad::handle_fault(frame, cr2, FaultKind::PageFault).is_ok()
}
