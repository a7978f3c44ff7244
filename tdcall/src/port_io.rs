//! TDG.VP.VMCALL\<Instruction.IO\>: port I/O carried out by the VMM.
//!
//! GHCI v1.5, "TDG.VP.VMCALL\<Instruction.IO\>": R12 = size of the access in
//! bytes (1, 2 or 4), R13 = direction (0 = read, 1 = write), R14 = port,
//! R15 = the data to write; a read returns its data in R11.
//!
//! R11 is the VMM's to fill, all 64 bits of it. An `IN AL, DX` cannot bring
//! more than 8 bits into the guest, so neither may [`io_read`]: the answer
//! is cut to the access size before anyone sees it.

use crate::regs::Tdcall;
use crate::vmcall::{instruction_vmcall, subfunction, VmcallError};

/// R13 of a read (GHCI v1.5, "TDG.VP.VMCALL\<Instruction.IO\>").
const DIRECTION_READ: u64 = 0;
/// R13 of a write.
const DIRECTION_WRITE: u64 = 1;

/// The width of a port access: the only three an `IN` or `OUT` can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoSize {
    /// 1 byte (`IN AL` / `OUT AL`).
    Byte = 1,
    /// 2 bytes (`IN AX` / `OUT AX`).
    Word = 2,
    /// 4 bytes (`IN EAX` / `OUT EAX`).
    Dword = 4,
}

impl IoSize {
    /// The size in bytes, as R12 carries it.
    pub const fn bytes(self) -> u64 {
        self as u64
    }

    /// The bits an access of this size covers: `0xFF`, `0xFFFF` or
    /// `0xFFFF_FFFF`.
    pub const fn mask(self) -> u32 {
        match self {
            IoSize::Byte => 0xFF,
            IoSize::Word => 0xFFFF,
            IoSize::Dword => 0xFFFF_FFFF,
        }
    }

    /// The size of `bytes` bytes, if an access can have it.
    pub const fn from_bytes(bytes: u64) -> Option<IoSize> {
        match bytes {
            1 => Some(IoSize::Byte),
            2 => Some(IoSize::Word),
            4 => Some(IoSize::Dword),
            _ => None,
        }
    }
}

/// Reads `size` bytes from `port` through the VMM (what `IN` does in a TD).
///
/// The result holds the access's bits only: whatever the VMM put above
/// them is dropped. Any status but success is an error.
pub fn io_read<T: Tdcall + ?Sized>(tdcall: &T, port: u16, size: IoSize) -> Result<u32, VmcallError> {
    let regs = instruction_vmcall(
        tdcall,
        subfunction::INSTRUCTION_IO,
        [size.bytes(), DIRECTION_READ, port as u64, 0],
    )?;
    Ok(regs.r11 as u32 & size.mask())
}

/// Writes the low `size` bytes of `value` to `port` through the VMM (what
/// `OUT` does in a TD). Bits of `value` above the access are not sent.
pub fn io_write<T: Tdcall + ?Sized>(tdcall: &T, port: u16, size: IoSize, value: u32) -> Result<(), VmcallError> {
    instruction_vmcall(
        tdcall,
        subfunction::INSTRUCTION_IO,
        [size.bytes(), DIRECTION_WRITE, port as u64, (value & size.mask()) as u64],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_and_nothing_else_is_a_size() {
        for size in [IoSize::Byte, IoSize::Word, IoSize::Dword] {
            assert_eq!(IoSize::from_bytes(size.bytes()), Some(size));
            assert_eq!(size.mask() as u64, (1u64 << (8 * size.bytes())) - 1);
        }
        for bytes in [0, 3, 5, 8, u64::MAX] {
            assert_eq!(IoSize::from_bytes(bytes), None, "{bytes}");
        }
    }
}
