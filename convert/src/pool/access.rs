//! How the CPU reaches the bytes of shared frames, and copying them in and
//! out with volatile accesses.
//!
//! Why volatile: the host (or a device it emulates) may write shared
//! memory at any moment. Rust assumes that memory behind a reference
//! changes only through Rust code, so a `&[u8]` over shared memory lets
//! the compiler read a byte twice and get two values (a check then a use
//! that disagree), or merge and elide reads. Each copy here reads and
//! writes every byte exactly once, through volatile accesses the compiler
//! may neither repeat nor drop: what the caller gets is one snapshot, and
//! what it checks is what it uses.

use core::ptr::NonNull;

use crate::aliases::DirectMap;

/// Reaches shared frames by physical address: in a kernel, the direct map
/// (which the engine converts along with the frames, so it maps them
/// shared while they are).
///
/// # Safety
///
/// When `bytes(pa, len)` returns `Some(p)`, `p..p + len` must map the
/// physically contiguous frames `[pa, pa + len)`, in order, and be valid
/// for volatile reads and writes for as long as those frames stay shared.
/// It is asked only about frames the engine converted to shared for the
/// pool or a [`DirectShare`](super::DirectShare).
pub unsafe trait FrameAccess {
    /// The virtual address of the `len` bytes at `pa`, or `None` if this
    /// access does not reach all of them.
    fn bytes(&self, pa: u64, len: u64) -> Option<NonNull<u8>>;
}

// SAFETY: the direct map maps `[self.pa, self.pa + self.len)` linearly at
// `self.va` (what the engine is configured with), and the engine keeps its
// entries for converted frames present with their new attribute.
unsafe impl FrameAccess for DirectMap {
    fn bytes(&self, pa: u64, len: u64) -> Option<NonNull<u8>> {
        let end = pa.checked_add(len)?;
        if pa < self.pa || end > self.pa.checked_add(self.len)? {
            return None;
        }
        let va = self.va.checked_add(pa - self.pa)?;
        NonNull::new(usize::try_from(va).ok()? as *mut u8)
    }
}

// SAFETY: forwarding keeps the implementation's guarantees.
unsafe impl<T: FrameAccess + ?Sized> FrameAccess for &T {
    fn bytes(&self, pa: u64, len: u64) -> Option<NonNull<u8>> {
        (**self).bytes(pa, len)
    }
}

const WORD: usize = core::mem::size_of::<u64>();

/// Copies `dst.len()` bytes from shared memory at `src` into `dst`, each
/// read once.
///
/// # Safety
///
/// `src..src + dst.len()` is valid for volatile reads.
pub(crate) unsafe fn copy_out(src: *const u8, dst: &mut [u8]) {
    let mut i = 0;
    // Word reads where the shared side is aligned: fewer exits a host can
    // interleave with, and eight times fewer accesses.
    while i < dst.len() && (src as usize + i) % WORD != 0 {
        // SAFETY: `i < dst.len()`, inside the range the caller vouches for.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while dst.len() - i >= WORD {
        // SAFETY: aligned (the loop above), and inside the range.
        let word = unsafe { src.add(i).cast::<u64>().read_volatile() };
        dst[i..i + WORD].copy_from_slice(&word.to_ne_bytes());
        i += WORD;
    }
    while i < dst.len() {
        // SAFETY: as above.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copies `src` into shared memory at `dst`, each byte written once.
///
/// # Safety
///
/// `dst..dst + src.len()` is valid for volatile writes.
pub(crate) unsafe fn copy_in(dst: *mut u8, src: &[u8]) {
    let mut i = 0;
    while i < src.len() && (dst as usize + i) % WORD != 0 {
        // SAFETY: `i < src.len()`, inside the range the caller vouches for.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while src.len() - i >= WORD {
        let mut word = [0; WORD];
        word.copy_from_slice(&src[i..i + WORD]);
        // SAFETY: aligned (the loop above), and inside the range.
        unsafe { dst.add(i).cast::<u64>().write_volatile(u64::from_ne_bytes(word)) };
        i += WORD;
    }
    while i < src.len() {
        // SAFETY: as above.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
}

/// Writes `byte` over `len` bytes of shared memory at `dst`.
///
/// # Safety
///
/// `dst..dst + len` is valid for volatile writes.
pub(crate) unsafe fn fill(dst: *mut u8, len: usize, byte: u8) {
    for i in 0..len {
        // SAFETY: inside the range the caller vouches for.
        unsafe { dst.add(i).write_volatile(byte) };
    }
}
