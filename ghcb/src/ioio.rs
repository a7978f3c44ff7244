//! Port I/O through the GHCB: the IOIO_PROT NAE event (GHCB spec #56421
//! rev 2.03, Table 7, "List of Supported Non-Automatic Events": SW_EXITCODE
//! 0x7B; SW_EXITINFO1 the IOIO intercept information; RAX to the
//! hypervisor for OUT, from it for IN).
//!
//! SW_EXITINFO1 is laid out as the hardware's own EXITINFO1 for an IOIO
//! intercept (AMD APM vol. 2, section 15.10.2): TYPE bit 0 (1 = IN), STR
//! bit 2, REP bit 3, SZ8/SZ16/SZ32 bits 4/5/6, A16/A32/A64 bits 7/8/9, SEG
//! bits 12:10, PORT bits 31:16.
//!
//! Only single accesses (`IN`/`OUT`, not `INS`/`OUTS`): STR, REP and SEG
//! are always 0 here. A string access would pass its data through a
//! buffer named by SW_SCRATCH, which this crate does not build.
//!
//! The size is an [`IoSize`], so no other size can be requested. What
//! leaves the guest is only the bytes the access writes (an OUT's value is
//! masked to its size before it reaches the shared page); what comes back
//! is used only if the hypervisor marked RAX valid, and only its low bytes
//! (masked to the size: bits above it are whatever the hypervisor left).

use crate::event::{self, EventError};
use crate::hypervisor::GhcbMsr;
use crate::layout::Field;
use crate::page::GhcbPage;

/// SW_EXITCODE of the IOIO_PROT NAE event (the SVM exit code of an IOIO
/// intercept).
pub const IOIO_EXIT_CODE: u64 = 0x7B;

/// The bits of SW_EXITINFO1 for IOIO_PROT (APM vol. 2, section 15.10.2).
pub mod exit_info {
    /// TYPE: 1 = IN, 0 = OUT.
    pub const TYPE_IN: u64 = 1 << 0;
    /// STR: a string access (INS/OUTS). Never set by this crate.
    pub const STR: u64 = 1 << 2;
    /// REP: a repeated string access. Never set by this crate.
    pub const REP: u64 = 1 << 3;
    /// SZ8: 8-bit access.
    pub const SZ8: u64 = 1 << 4;
    /// SZ16: 16-bit access.
    pub const SZ16: u64 = 1 << 5;
    /// SZ32: 32-bit access.
    pub const SZ32: u64 = 1 << 6;
    /// A16: 16-bit address size.
    pub const A16: u64 = 1 << 7;
    /// A32: 32-bit address size.
    pub const A32: u64 = 1 << 8;
    /// A64: 64-bit address size.
    pub const A64: u64 = 1 << 9;
    /// SEG (bits 12:10): a string access's segment. Never set by this
    /// crate.
    pub const SEG_MASK: u64 = 0x7 << 10;
    /// PORT (bits 31:16): the port number.
    pub const PORT_SHIFT: u32 = 16;
}

/// The width of a port access: the only three the instructions have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoSize {
    /// 8 bits (AL).
    Byte = 1,
    /// 16 bits (AX).
    Word = 2,
    /// 32 bits (EAX).
    Dword = 4,
}

impl IoSize {
    /// Bytes accessed.
    pub const fn bytes(self) -> u32 {
        self as u32
    }

    /// The bits of RAX the access reads or writes.
    pub const fn mask(self) -> u64 {
        match self {
            IoSize::Byte => 0xFF,
            IoSize::Word => 0xFFFF,
            IoSize::Dword => 0xFFFF_FFFF,
        }
    }

    const fn exit_info_bit(self) -> u64 {
        match self {
            IoSize::Byte => exit_info::SZ8,
            IoSize::Word => exit_info::SZ16,
            IoSize::Dword => exit_info::SZ32,
        }
    }
}

/// The address size of the instruction (64 unless an 0x67 prefix made it
/// 32 in 64-bit mode; 16 only outside it). A hypervisor needs it for
/// string accesses alone; it is passed on as the hardware reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSize {
    /// 16-bit.
    Bits16,
    /// 32-bit.
    Bits32,
    /// 64-bit.
    Bits64,
}

/// IN or OUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the port into AL/AX/EAX.
    In,
    /// From AL/AX/EAX to the port.
    Out,
}

/// One port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortAccess {
    /// The port.
    pub port: u16,
    /// The width.
    pub size: IoSize,
    /// The instruction's address size.
    pub address_size: AddressSize,
}

impl PortAccess {
    /// An access of `size` at `port` by an instruction of 64-bit address
    /// size (64-bit mode without an 0x67 prefix).
    pub const fn new(port: u16, size: IoSize) -> Self {
        PortAccess {
            port,
            size,
            address_size: AddressSize::Bits64,
        }
    }

    /// SW_EXITINFO1 for this access.
    pub const fn exit_info1(self, direction: Direction) -> u64 {
        let kind = match direction {
            Direction::In => exit_info::TYPE_IN,
            Direction::Out => 0,
        };
        let address = match self.address_size {
            AddressSize::Bits16 => exit_info::A16,
            AddressSize::Bits32 => exit_info::A32,
            AddressSize::Bits64 => exit_info::A64,
        };
        (self.port as u64) << exit_info::PORT_SHIFT | address | self.size.exit_info_bit() | kind
    }
}

/// Reads the port: the value, masked to the access size.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]; reading the port must be acceptable (a
/// read can have effects on the device: a FIFO pops).
pub unsafe fn port_in<H: GhcbMsr + ?Sized>(ghcb: &mut GhcbPage, hv: &H, access: PortAccess) -> Result<u32, EventError> {
    ghcb.invalidate();
    // SAFETY: forwarded to the caller.
    unsafe { event::exit(ghcb, hv, IOIO_EXIT_CODE, access.exit_info1(Direction::In)) }?;
    let rax = event::result(ghcb, Field::Rax)?;
    Ok((rax & access.size.mask()) as u32)
}

/// Writes the low [`IoSize::bytes`] bytes of `value` to the port (only
/// those reach the shared page).
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]; the write's effect on the device must be
/// acceptable.
pub unsafe fn port_out<H: GhcbMsr + ?Sized>(
    ghcb: &mut GhcbPage,
    hv: &H,
    access: PortAccess,
    value: u32,
) -> Result<(), EventError> {
    ghcb.invalidate();
    ghcb.set_field(Field::Rax, value as u64 & access.size.mask());
    // SAFETY: forwarded to the caller.
    unsafe { event::exit(ghcb, hv, IOIO_EXIT_CODE, access.exit_info1(Direction::Out)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info1_is_laid_out_as_the_apm_says() {
        let com1 = PortAccess::new(0x3F8, IoSize::Byte);
        // PORT 0x3F8 << 16, A64 (bit 9), SZ8 (bit 4), TYPE IN (bit 0).
        assert_eq!(com1.exit_info1(Direction::In), 0x03F8_0000 | 1 << 9 | 1 << 4 | 1);
        assert_eq!(com1.exit_info1(Direction::Out), 0x03F8_0000 | 1 << 9 | 1 << 4);
        let word = PortAccess {
            port: 0xFFFF,
            size: IoSize::Word,
            address_size: AddressSize::Bits32,
        };
        assert_eq!(word.exit_info1(Direction::Out), 0xFFFF_0000 | 1 << 8 | 1 << 5);
        let dword = PortAccess {
            port: 0,
            size: IoSize::Dword,
            address_size: AddressSize::Bits16,
        };
        assert_eq!(dword.exit_info1(Direction::In), 1 << 7 | 1 << 6 | 1);
        // Never a string access.
        for access in [com1, word, dword] {
            for direction in [Direction::In, Direction::Out] {
                let info = access.exit_info1(direction);
                assert_eq!(info & (exit_info::STR | exit_info::REP | exit_info::SEG_MASK), 0);
                assert_eq!(info >> 32, 0);
            }
        }
    }

    #[test]
    fn sizes_and_masks_agree() {
        for (size, bytes) in [(IoSize::Byte, 1), (IoSize::Word, 2), (IoSize::Dword, 4)] {
            assert_eq!(size.bytes(), bytes);
            assert_eq!(size.mask(), (1u64 << (8 * bytes)) - 1);
        }
    }
}
