//! Port I/O: the exit qualification decoded, the access carried out by the
//! VMM.

use tdcall::{io_read, io_write, IoSize, Tdcall, VeInfo};

use super::{VeError, Writes};
use crate::exception::{Gpr, RegisterAccess};

// Intel SDM vol. 3C, table "Exit Qualification for I/O Instructions". Bit 6
// (immediate or DX operand) changes nothing here: the port is in bits
// 31:16 either way. Bits 15:7 and 63:32 are reserved, cleared by the CPU.
/// Bits 2:0: the size of the access less one (0, 1 or 3).
const SIZE_LESS_ONE: u64 = 0b111;
/// Bit 3: 1 for IN, 0 for OUT.
const DIRECTION_IN: u64 = 1 << 3;
/// Bit 4: INS or OUTS.
const STRING: u64 = 1 << 4;
/// Bit 5: a REP prefix.
const REP: u64 = 1 << 5;
/// Bits 31:16: the port.
const PORT_SHIFT: u32 = 16;

/// `IN` or `OUT` of AL, AX or EAX: the only forms emulated.
pub(super) fn emulate<T: Tdcall + ?Sized, R: RegisterAccess + ?Sized>(
    tdcall: &T,
    ve: &VeInfo,
    regs: &R,
) -> Result<Writes, VeError> {
    let qualification = ve.exit_qualification;
    if qualification & (STRING | REP) != 0 {
        return Err(VeError::StringIo { qualification });
    }
    let size =
        IoSize::from_bytes((qualification & SIZE_LESS_ONE) + 1).ok_or(VeError::InvalidIoSize { qualification })?;
    let port = (qualification >> PORT_SHIFT) as u16;
    let rax = regs.gpr(Gpr::Rax);
    if qualification & DIRECTION_IN == 0 {
        io_write(tdcall, port, size, rax as u32)?;
        return Ok([None; 4]);
    }
    let value = io_read(tdcall, port, size)? as u64;
    // An 8- or 16-bit register write leaves the rest of RAX as it was; a
    // 32-bit one zero-extends into RAX.
    let rax = match size {
        IoSize::Dword => value,
        IoSize::Byte | IoSize::Word => rax & !(size.mask() as u64) | value,
    };
    Ok([Some((Gpr::Rax, rax)), None, None, None])
}
