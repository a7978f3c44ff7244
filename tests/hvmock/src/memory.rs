//! Simulated guest physical memory.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

/// Guest physical memory `[0, size)`, backed by one zeroed host allocation
/// aligned to 2 MiB so that 2 MiB guest pages are 2 MiB aligned in the host
/// too. GPA `g` lives at `base() + g`.
///
/// The allocation is made with the allocator's natural alignment and
/// aligned by hand: an over-aligned `alloc_zeroed` is a `memset` of the
/// whole size, while a plain one is `calloc`, whose pages stay untouched
/// (and cost nothing) until used.
///
/// Both the guest code under test and the models reach it through raw
/// pointers, as a CPU and a device reach physical memory.
#[derive(Debug)]
pub struct GuestMemory {
    base: NonNull<u8>,
    /// The allocation to free, or `None` for memory the model does not own.
    allocation: Option<(NonNull<u8>, Layout)>,
    size: u64,
}

// SAFETY: the memory is a plain byte array reached only through raw
// pointers; the handle itself holds no thread-bound state.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; callers synchronise their accesses as they would for
// physical memory.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Allocates `size` bytes (a multiple of 4 KiB, non-zero) of zeroed
    /// guest memory. Large sizes cost nothing until touched.
    ///
    /// # Panics
    ///
    /// If `size` is zero or not a multiple of 4 KiB, or the host is out of
    /// memory: a test setup error.
    pub fn new(size: u64) -> Self {
        assert!(
            size > 0 && size % crate::PAGE_SIZE == 0,
            "guest memory size must be whole pages"
        );
        const ALIGN: usize = 2 << 20;
        let layout = Layout::from_size_align(size as usize + ALIGN, 16).expect("guest memory layout");
        // SAFETY: the layout has a non-zero size.
        let allocation = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("guest memory allocation");
        let offset = allocation.as_ptr().align_offset(ALIGN);
        // SAFETY: `offset < ALIGN`, inside the allocation's slack.
        let base = unsafe { allocation.add(offset) };
        GuestMemory {
            base,
            allocation: Some((allocation, layout)),
            size,
        }
    }

    /// Memory the model does not own: `[base, base + size)` is where GPA 0
    /// and up can be reached (a test guest's own view of its RAM).
    ///
    /// # Safety
    ///
    /// The range must stay mapped, readable and writable while the model
    /// lives.
    pub unsafe fn from_raw(base: *mut u8, size: u64) -> Self {
        GuestMemory {
            base: NonNull::new(base).expect("non-null base"),
            allocation: None,
            size,
        }
    }

    /// Size in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size() / crate::PAGE_SIZE
    }

    /// Host address of GPA 0.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Whether `[gpa, gpa + len)` lies inside the memory.
    #[inline]
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size())
    }

    /// Host address of `gpa`.
    ///
    /// # Panics
    ///
    /// If `gpa` is outside the memory.
    #[inline]
    pub fn ptr(&self, gpa: u64) -> *mut u8 {
        assert!(gpa < self.size(), "GPA {gpa:#x} outside guest memory");
        // SAFETY: in bounds of the allocation.
        unsafe { self.base.as_ptr().add(gpa as usize) }
    }

    /// The GPA of a host address inside the memory.
    pub fn gpa_of(&self, addr: u64) -> Option<u64> {
        let gpa = addr.checked_sub(self.base.as_ptr() as u64)?;
        (gpa < self.size()).then_some(gpa)
    }

    /// Fills `[gpa, gpa + len)` with `byte`.
    ///
    /// # Panics
    ///
    /// If the range is outside the memory.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) {
        assert!(self.contains(gpa, len));
        // SAFETY: in bounds; the memory is plain bytes.
        unsafe { self.ptr(gpa).write_bytes(byte, len as usize) }
    }

    /// Whether every byte of `[gpa, gpa + len)` is `byte`.
    ///
    /// # Panics
    ///
    /// If the range is outside the memory.
    pub fn is_filled(&self, gpa: u64, len: u64, byte: u8) -> bool {
        assert!(self.contains(gpa, len));
        // SAFETY: in bounds; plain bytes.
        unsafe { core::slice::from_raw_parts(self.ptr(gpa), len as usize) }
            .iter()
            .all(|&b| b == byte)
    }

    /// Reads one byte.
    pub fn read_u8(&self, gpa: u64) -> u8 {
        // SAFETY: `ptr` checks bounds.
        unsafe { self.ptr(gpa).read_volatile() }
    }

    /// Reads an aligned quadword.
    ///
    /// # Panics
    ///
    /// If unaligned or out of bounds.
    #[inline]
    pub fn read_u64(&self, gpa: u64) -> u64 {
        assert!(gpa % 8 == 0 && self.contains(gpa, 8));
        // SAFETY: in bounds and aligned.
        unsafe { self.ptr(gpa).cast::<u64>().read_volatile() }
    }

    /// Writes an aligned quadword.
    ///
    /// # Panics
    ///
    /// If unaligned or out of bounds.
    #[inline]
    pub fn write_u64(&self, gpa: u64, value: u64) {
        assert!(gpa % 8 == 0 && self.contains(gpa, 8));
        // SAFETY: in bounds and aligned.
        unsafe { self.ptr(gpa).cast::<u64>().write_volatile(value) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        if let Some((allocation, layout)) = self.allocation {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(allocation.as_ptr(), layout) }
        }
    }
}
