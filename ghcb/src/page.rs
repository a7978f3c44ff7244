//! Volatile access to a GHCB page and the NAE call through it.

use core::ptr::NonNull;

use crate::hypervisor::GhcbMsr;
use crate::layout::{
    Field, Ghcb, GHCB_PROTOCOL_VERSION, GHCB_USAGE_OFFSET, GHCB_USAGE_STANDARD, PROTOCOL_VERSION_OFFSET,
    SHARED_BUFFER_OFFSET, SHARED_BUFFER_SIZE, VALID_BITMAP_OFFSET,
};

/// Quadwords in the shared buffer.
pub const SHARED_BUFFER_QWORDS: usize = SHARED_BUFFER_SIZE / 8;

/// A GHCB page this CPU owns.
///
/// Holds a raw pointer, never a reference: the hypervisor may write the page
/// at any time (it is shared), so every access is one volatile read or write
/// and every host-written value is read once, then validated as a copy.
#[derive(Debug)]
pub struct GhcbPage {
    base: NonNull<u8>,
    gpa: u64,
}

// SAFETY: the page is plain memory; `&mut self` on every writer keeps one
// CPU's use of it ordered. Moving the handle to another CPU is how per-CPU
// pages are set up.
unsafe impl Send for GhcbPage {}

/// An NAE event the hypervisor did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NaeError {
    /// SW_EXITINFO1\[31:0\] = 1: the hypervisor reports an error; SW_EXITINFO2
    /// says which (GHCB spec, "Hypervisor error reporting").
    Hypervisor {
        /// SW_EXITINFO2 as the hypervisor left it.
        info2: u64,
    },
    /// SW_EXITINFO1\[31:0\] is neither 0 nor 1.
    Unexpected {
        /// SW_EXITINFO1 as the hypervisor left it.
        info1: u64,
    },
}

impl core::fmt::Display for NaeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            NaeError::Hypervisor { info2 } => write!(f, "the hypervisor reported an error (SW_EXITINFO2 {info2:#x})"),
            NaeError::Unexpected { info1 } => write!(f, "SW_EXITINFO1 {info1:#x} is neither 0 nor 1"),
        }
    }
}

impl core::error::Error for NaeError {}

impl GhcbPage {
    /// Wraps the GHCB at `ptr`, whose guest physical address is `gpa`.
    ///
    /// # Safety
    ///
    /// `ptr` must map a 4 KiB page shared with the hypervisor (C-bit clear)
    /// whose GPA is `gpa`, valid for as long as the handle lives, and used by
    /// nothing else on any CPU.
    pub unsafe fn new(ptr: NonNull<Ghcb>, gpa: u64) -> Self {
        Self { base: ptr.cast(), gpa }
    }

    /// The page's guest physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// GPA of the shared buffer, for SW_SCRATCH.
    pub fn shared_buffer_gpa(&self) -> u64 {
        self.gpa + SHARED_BUFFER_OFFSET as u64
    }

    fn ptr_at<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset + core::mem::size_of::<T>() <= 4096 && offset % core::mem::align_of::<T>() == 0);
        // SAFETY: every caller passes an offset inside the 4 KiB page.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: `new`'s contract makes the page valid; the offset is in
        // bounds and aligned (checked in debug builds, fixed by the layout).
        unsafe { self.ptr_at::<T>(offset).read_volatile() }
    }

    fn write<T: Copy>(&mut self, offset: usize, value: T) {
        // SAFETY: as for `read`.
        unsafe { self.ptr_at::<T>(offset).write_volatile(value) }
    }

    /// Clears the valid bitmap: no field is valid until written again. Done
    /// before filling in each new request, so no field of an earlier one is
    /// passed on by mistake.
    pub fn invalidate(&mut self) {
        self.write::<u64>(VALID_BITMAP_OFFSET, 0);
        self.write::<u64>(VALID_BITMAP_OFFSET + 8, 0);
    }

    /// Writes a save-area field and marks it valid.
    pub fn set_field(&mut self, field: Field, value: u64) {
        self.write::<u64>(field.offset(), value);
        let byte = VALID_BITMAP_OFFSET + field.valid_bit() / 8;
        let bits = self.read::<u8>(byte) | 1 << (field.valid_bit() % 8);
        self.write::<u8>(byte, bits);
    }

    /// Reads a save-area field once.
    pub fn field(&self, field: Field) -> u64 {
        self.read::<u64>(field.offset())
    }

    /// Whether the valid bitmap marks `field` valid.
    pub fn is_valid(&self, field: Field) -> bool {
        self.read::<u8>(VALID_BITMAP_OFFSET + field.valid_bit() / 8) & (1 << (field.valid_bit() % 8)) != 0
    }

    /// Reads quadword `index` of the shared buffer once.
    ///
    /// # Panics
    ///
    /// If `index >= SHARED_BUFFER_QWORDS` (a guest bug, never host input).
    pub fn shared_qword(&self, index: usize) -> u64 {
        assert!(index < SHARED_BUFFER_QWORDS);
        self.read::<u64>(SHARED_BUFFER_OFFSET + index * 8)
    }

    /// Writes quadword `index` of the shared buffer.
    ///
    /// # Panics
    ///
    /// If `index >= SHARED_BUFFER_QWORDS` (a guest bug, never host input).
    pub fn set_shared_qword(&mut self, index: usize, value: u64) {
        assert!(index < SHARED_BUFFER_QWORDS);
        self.write::<u64>(SHARED_BUFFER_OFFSET + index * 8, value);
    }

    /// Sends an NAE event: sets SW_EXITCODE/INFO1/INFO2 (other fields must
    /// have been set after [`invalidate`](Self::invalidate)), the protocol
    /// version and usage, exits with the GHCB's GPA in the MSR, and checks
    /// SW_EXITINFO1.
    ///
    /// # Safety
    ///
    /// As for [`GhcbMsr::vmgexit`]: the event's effect (e.g. page state
    /// changes) must be acceptable to the caller.
    pub unsafe fn nae_call<H: GhcbMsr + ?Sized>(
        &mut self,
        hv: &H,
        exit_code: u64,
        info1: u64,
        info2: u64,
    ) -> Result<(), NaeError> {
        self.set_field(Field::SwExitCode, exit_code);
        self.set_field(Field::SwExitInfo1, info1);
        self.set_field(Field::SwExitInfo2, info2);
        self.write::<u16>(PROTOCOL_VERSION_OFFSET, GHCB_PROTOCOL_VERSION);
        self.write::<u32>(GHCB_USAGE_OFFSET, GHCB_USAGE_STANDARD);
        // SAFETY: forwarded to the caller.
        unsafe { hv.vmgexit(self.gpa) };
        let info1 = self.field(Field::SwExitInfo1);
        match info1 as u32 {
            0 => Ok(()),
            1 => Err(NaeError::Hypervisor {
                info2: self.field(Field::SwExitInfo2),
            }),
            _ => Err(NaeError::Unexpected { info1 }),
        }
    }
}

/// Size check: a `Ghcb` is exactly the page `GhcbPage` addresses.
const _: () = assert!(core::mem::size_of::<Ghcb>() == 4096);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;

    #[test]
    fn fields_and_valid_bitmap_stay_in_step() {
        let mut raw = Box::new(Ghcb::zeroed());
        let ptr = NonNull::from(&mut *raw);
        // SAFETY: the box outlives the handle and nothing else touches it.
        let mut page = unsafe { GhcbPage::new(ptr, 0x7000) };
        page.set_field(Field::SwScratch, 0x7800);
        page.set_field(Field::Rax, 5);
        assert!(page.is_valid(Field::SwScratch) && page.is_valid(Field::Rax));
        assert!(!page.is_valid(Field::SwExitCode));
        assert_eq!(page.field(Field::SwScratch), 0x7800);
        page.invalidate();
        assert!(!page.is_valid(Field::SwScratch) && !page.is_valid(Field::Rax));
        let bytes = zerocopy::IntoBytes::as_bytes(&*raw);
        assert_eq!(u64::from_le_bytes(bytes[0x3A8..0x3B0].try_into().unwrap()), 0x7800);
        drop::<Box<Ghcb>>(raw);
    }
}
