//! The GHCB page layout (GHCB spec #56421 rev 2.03, section 2.6, "GHCB
//! Layout", and its save-area table), with every offset the guest uses
//! checked at compile time.
//!
//! The fields are private: the page is shared with the hypervisor, which may
//! write it at any time, so a `&Ghcb` or `&mut Ghcb` must never exist while
//! the guest runs. Access goes through [`GhcbPage`](crate::GhcbPage), one
//! volatile access per value.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The GHCB protocol version this crate speaks: 2, the first with SEV-SNP
/// (Page State Change, the hypervisor feature request).
pub const GHCB_PROTOCOL_VERSION: u16 = 2;

/// Size of the shared buffer.
pub const SHARED_BUFFER_SIZE: usize = 2032;

/// The 4 KiB GHCB.
///
/// No `Debug`: printing it would read host-written memory through a
/// reference.
#[allow(missing_debug_implementations)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(4096))]
pub struct Ghcb {
    reserved_0: [u8; 0x1F8],
    rax: u64,
    reserved_1: [u8; 0x308 - 0x200],
    rcx: u64,
    rdx: u64,
    rbx: u64,
    reserved_2: [u8; 0x390 - 0x320],
    sw_exit_code: u64,
    sw_exit_info_1: u64,
    sw_exit_info_2: u64,
    sw_scratch: u64,
    reserved_3: [u8; 0x3E8 - 0x3B0],
    xcr0: u64,
    valid_bitmap: [u8; 16],
    reserved_4: [u8; 0x800 - 0x400],
    shared_buffer: [u8; SHARED_BUFFER_SIZE],
    reserved_5: [u8; 10],
    protocol_version: u16,
    ghcb_usage: u32,
}

const _: () = {
    assert!(size_of::<Ghcb>() == 4096);
    assert!(offset_of!(Ghcb, rax) == 0x1F8);
    assert!(offset_of!(Ghcb, rcx) == 0x308);
    assert!(offset_of!(Ghcb, rdx) == 0x310);
    assert!(offset_of!(Ghcb, rbx) == 0x318);
    assert!(offset_of!(Ghcb, sw_exit_code) == 0x390);
    assert!(offset_of!(Ghcb, sw_exit_info_1) == 0x398);
    assert!(offset_of!(Ghcb, sw_exit_info_2) == 0x3A0);
    assert!(offset_of!(Ghcb, sw_scratch) == 0x3A8);
    assert!(offset_of!(Ghcb, xcr0) == 0x3E8);
    assert!(offset_of!(Ghcb, valid_bitmap) == 0x3F0);
    assert!(offset_of!(Ghcb, shared_buffer) == 0x800);
    assert!(offset_of!(Ghcb, protocol_version) == 0xFFA);
    assert!(offset_of!(Ghcb, ghcb_usage) == 0xFFC);
};

impl Ghcb {
    /// An all-zero GHCB, for a `static` or a page the guest initialises
    /// before sharing it. `Ghcb` also implements zerocopy's byte traits
    /// (the compiler's proof that any bytes the hypervisor writes are a
    /// valid `Ghcb`); nothing in this crate's API asks you to use them.
    pub const fn zeroed() -> Ghcb {
        const fn any_bytes_are_valid<T: FromBytes>() {}
        any_bytes_are_valid::<Ghcb>();
        // SAFETY: `Ghcb` is `FromBytes` (derived, so checked by zerocopy):
        // every bit pattern, zero included, is a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Byte offset of the valid bitmap.
pub const VALID_BITMAP_OFFSET: usize = offset_of!(Ghcb, valid_bitmap);
/// Byte offset of the shared buffer.
pub const SHARED_BUFFER_OFFSET: usize = offset_of!(Ghcb, shared_buffer);
/// Byte offset of the protocol version.
pub const PROTOCOL_VERSION_OFFSET: usize = offset_of!(Ghcb, protocol_version);
/// Byte offset of the usage field.
pub const GHCB_USAGE_OFFSET: usize = offset_of!(Ghcb, ghcb_usage);
/// GHCB usage 0: the standard GHCB format.
pub const GHCB_USAGE_STANDARD: u32 = 0;

/// A quadword field of the save area. Each one has a bit in the valid
/// bitmap: bit number = offset / 8 (GHCB spec, "GHCB Valid Bitmap").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// RAX.
    Rax,
    /// RBX.
    Rbx,
    /// RCX.
    Rcx,
    /// RDX.
    Rdx,
    /// SW_EXITCODE: the NAE event requested.
    SwExitCode,
    /// SW_EXITINFO1.
    SwExitInfo1,
    /// SW_EXITINFO2.
    SwExitInfo2,
    /// SW_SCRATCH: GPA of the event's data (for PSC, the shared buffer).
    SwScratch,
    /// XCR0: the guest's, for CPUID leaf 0xD, whose answer (the XSAVE
    /// area's size) depends on the features XCR0 enables.
    Xcr0,
}

impl Field {
    /// Byte offset in the GHCB.
    pub const fn offset(self) -> usize {
        match self {
            Field::Rax => offset_of!(Ghcb, rax),
            Field::Rbx => offset_of!(Ghcb, rbx),
            Field::Rcx => offset_of!(Ghcb, rcx),
            Field::Rdx => offset_of!(Ghcb, rdx),
            Field::SwExitCode => offset_of!(Ghcb, sw_exit_code),
            Field::SwExitInfo1 => offset_of!(Ghcb, sw_exit_info_1),
            Field::SwExitInfo2 => offset_of!(Ghcb, sw_exit_info_2),
            Field::SwScratch => offset_of!(Ghcb, sw_scratch),
            Field::Xcr0 => offset_of!(Ghcb, xcr0),
        }
    }

    /// Bit of this field in the valid bitmap.
    pub const fn valid_bit(self) -> usize {
        self.offset() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_bits_are_offset_over_8() {
        assert_eq!(Field::SwExitCode.valid_bit(), 0x390 / 8);
        assert_eq!(Field::SwScratch.valid_bit(), 117);
        assert_eq!(Field::Rax.valid_bit(), 63);
        assert_eq!(Field::Xcr0.valid_bit(), 125);
        // Every field's bit fits the 128-bit bitmap.
        for f in [
            Field::Rax,
            Field::Rbx,
            Field::Rcx,
            Field::Rdx,
            Field::SwExitCode,
            Field::SwExitInfo1,
            Field::SwExitInfo2,
            Field::SwScratch,
            Field::Xcr0,
        ] {
            assert!(f.valid_bit() < 128);
        }
    }
}
