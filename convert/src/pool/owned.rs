//! The owning handle of a shared buffer: shared while it lives, given
//! back when it goes.

use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use super::access;
use super::{OutOfBounds, ReleaseError, SharedRange};

/// Where a handle's frames go back to: the pool, or a [`DirectShare`]
/// that converts them back to private.
///
/// [`DirectShare`]: super::DirectShare
pub(crate) trait Home: Sync {
    /// Takes back `range`, once, and records a failure itself (a handle
    /// dropped cannot return it).
    fn take_back(&self, range: SharedRange) -> Result<(), ReleaseError>;
}

/// A shared buffer this handle owns: physically contiguous, 4 KiB
/// granular, shared with the host while the handle lives.
///
/// Made by [`SharedPool::alloc_owned`](super::SharedPool::alloc_owned)
/// (it goes back to the pool, still shared, for the next user) or
/// [`DirectShare::share`](super::DirectShare::share) (it is converted
/// back to private and handed to the OS's [`Reclaim`](super::Reclaim)).
/// Give it back with [`release`](Self::release) to see a failure, or drop
/// it: a failure to make the frames private then goes to the home's
/// record ([`Reclaim::lost`](super::Reclaim::lost),
/// [`DirectStats::lost`](super::DirectStats::lost)). Either way frames
/// that could not be made private are never handed back.
///
/// # Byte access
///
/// The host can write these bytes at any moment, so a `&[u8]` over them is
/// a data race as far as Rust is concerned: the compiler may read a byte
/// twice and see two values. Prefer [`read`](Self::read) and
/// [`write`](Self::write), which copy with volatile accesses, each byte
/// once: validate what you copied out, never the shared bytes.
/// [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice)
/// exist for code that knows the host is not writing (a protocol that
/// hands the buffer over), and are `unsafe` for that reason.
pub struct OwnedShared<'h> {
    range: SharedRange,
    ptr: NonNull<u8>,
    home: &'h dyn Home,
}

impl core::fmt::Debug for OwnedShared<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OwnedShared")
            .field("pa", &self.range.pa)
            .field("len", &self.range.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the handle is the only owner of its frames (the pointer is not
// shared with any other Rust object), and its home is `Sync`: it may be
// given back from any CPU.
unsafe impl Send for OwnedShared<'_> {}
// SAFETY: through `&self` the handle only reads, with volatile accesses.
unsafe impl Sync for OwnedShared<'_> {}

impl<'h> OwnedShared<'h> {
    /// # Safety
    ///
    /// `range` is shared, `ptr` reaches all of it for volatile access, and
    /// nothing else uses it until `home` takes it back.
    pub(crate) unsafe fn new(range: SharedRange, ptr: NonNull<u8>, home: &'h dyn Home) -> Self {
        OwnedShared { range, ptr, home }
    }

    /// The frames: physical address and length.
    pub fn range(&self) -> SharedRange {
        self.range
    }

    /// Physical address of the first byte.
    pub fn pa(&self) -> u64 {
        self.range.pa
    }

    /// Bytes (a multiple of 4 KiB, never 0).
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> usize {
        self.range.len as usize
    }

    /// The virtual address of the first byte, for the caller's own
    /// volatile accesses.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(OutOfBounds { offset, len, size }),
        }
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`: one snapshot of
    /// what the host left there, each byte read once.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, dst.len())?;
        // SAFETY: in bounds; the handle owns the range and `ptr` reaches it.
        unsafe { access::copy_out(self.ptr.as_ptr().add(offset), dst) };
        Ok(())
    }

    /// Copies `src` to `offset`, each byte written once.
    pub fn write(&mut self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, src.len())?;
        // SAFETY: as in `read`.
        unsafe { access::copy_in(self.ptr.as_ptr().add(offset), src) };
        Ok(())
    }

    /// Writes `byte` over `len` bytes from `offset` (a buffer from the
    /// pool holds what its last user or the host left there).
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) -> Result<(), OutOfBounds> {
        self.check(offset, len)?;
        // SAFETY: as in `read`.
        unsafe { access::fill(self.ptr.as_ptr().add(offset), len, byte) };
        Ok(())
    }

    /// The bytes as a slice.
    ///
    /// # Safety
    ///
    /// While the slice lives the host and every device must not write the
    /// buffer (the protocol that shares it must guarantee that): a write
    /// from outside is a data race, undefined behaviour.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is reachable and owned; the caller excludes
        // writers from outside.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The bytes as a mutable slice.
    ///
    /// # Safety
    ///
    /// As [`as_slice`](Self::as_slice): nothing outside may read or write
    /// the buffer while the slice lives.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` excludes other handles'
        // access.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// Gives the buffer back and says whether its frames were made private.
    /// From the pool: back to the pool, always `Ok` (a chunk the pool
    /// later fails to return shows in
    /// [`PoolStats::chunks_lost`](super::PoolStats::chunks_lost)). From a
    /// [`DirectShare`](super::DirectShare): converted to private and handed
    /// to the OS's [`Reclaim`](super::Reclaim), or, on failure, withheld,
    /// reported to the `Reclaim` and returned here.
    pub fn release(self) -> Result<(), ReleaseError> {
        let me = ManuallyDrop::new(self);
        me.home.take_back(me.range)
    }
}

impl Drop for OwnedShared<'_> {
    fn drop(&mut self) {
        // The home has recorded any failure: nobody here to return it to.
        let _ = self.home.take_back(self.range);
    }
}
