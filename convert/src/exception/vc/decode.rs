//! Just enough of the x86-64 instruction encoding to complete the
//! instructions a #VC hands over: the port-I/O instructions, whose operands
//! the exception does not report, and the length of CPUID, RDMSR and
//! WRMSR, all in 64-bit mode.
//!
//! The prefixes these instructions can meaningfully carry are accepted:
//! operand size (0x66), address size (0x67), the segment overrides (which
//! they ignore), and one REX immediately before the opcode. LOCK (0xF0)
//! and REP/REPNE (0xF3/0xF2) are refused: LOCK makes them #UD, and a REP
//! on a single access is reserved by the architecture. Anything the
//! decoder does not recognise is refused, never guessed at.

use snp_ghcb::ioio::{AddressSize, Direction};
use snp_ghcb::IoSize;

/// The longest instruction the CPU executes; a longer one raises #GP.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// Why the bytes at RIP are not the instruction the #VC is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes given end before the instruction does.
    Truncated,
    /// The prefixes run past [`MAX_INSTRUCTION_LEN`].
    TooLong,
    /// A prefix the instruction does not take (LOCK, REP, REPNE).
    Prefix(u8),
    /// INS or OUTS (opcode 0x6C-0x6F, with or without REP): a string
    /// access, which the handler does not complete.
    StringIo(u8),
    /// Not an instruction the #VC error code can be for; the opcode byte
    /// that does not fit (the one after 0x0F for a two-byte opcode).
    Unexpected(u8),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            DecodeError::Truncated => f.write_str("the instruction bytes end before the instruction"),
            DecodeError::TooLong => write!(f, "the instruction is longer than {MAX_INSTRUCTION_LEN} bytes"),
            DecodeError::Prefix(p) => write!(f, "prefix {p:#04x} is not taken by this instruction"),
            DecodeError::StringIo(op) => write!(f, "string port I/O (opcode {op:#04x}) is not completed"),
            DecodeError::Unexpected(op) => write!(f, "opcode {op:#04x} is not the instruction the #VC is for"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Where a port instruction takes its port from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortOperand {
    /// An 8-bit immediate (opcodes 0xE4-0xE7).
    Imm8(u8),
    /// DX (opcodes 0xEC-0xEF).
    Dx,
}

/// A decoded IN or OUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortIo {
    /// IN or OUT.
    pub direction: Direction,
    /// AL, AX or EAX.
    pub size: IoSize,
    /// The port's source.
    pub port: PortOperand,
    /// 64, or 32 with an 0x67 prefix.
    pub address_size: AddressSize,
    /// The instruction's length in bytes.
    pub len: usize,
}

/// The two-byte-opcode instructions a #VC hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemInstruction {
    /// CPUID (0F A2).
    Cpuid,
    /// RDMSR (0F 32).
    Rdmsr,
    /// WRMSR (0F 30).
    Wrmsr,
}

#[derive(Default)]
struct Prefixes {
    operand16: bool,
    address32: bool,
    rex_w: bool,
    /// Bytes taken, REX included.
    len: usize,
}

fn byte_at(code: &[u8], at: usize) -> Result<u8, DecodeError> {
    if at >= MAX_INSTRUCTION_LEN {
        return Err(DecodeError::TooLong);
    }
    code.get(at).copied().ok_or(DecodeError::Truncated)
}

fn prefixes(code: &[u8]) -> Result<Prefixes, DecodeError> {
    let mut p = Prefixes::default();
    loop {
        match byte_at(code, p.len)? {
            0x66 => p.operand16 = true,
            0x67 => p.address32 = true,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 => {}
            // REP before a string opcode is reported as the string access
            // it is, not as a prefix.
            rep @ (0xF2 | 0xF3) => match string_opcode_after(code, p.len + 1) {
                Some(op) => return Err(DecodeError::StringIo(op)),
                None => return Err(DecodeError::Prefix(rep)),
            },
            0xF0 => return Err(DecodeError::Prefix(0xF0)),
            _ => break,
        }
        p.len += 1;
    }
    // A REX counts only right before the opcode; one followed by a legacy
    // prefix is ignored by the CPU, and refused here as an opcode.
    let byte = byte_at(code, p.len)?;
    if byte & 0xF0 == 0x40 {
        p.rex_w = byte & 0x08 != 0;
        p.len += 1;
    }
    Ok(p)
}

/// The string port opcode a REP at `at - 1` applies to, if any.
fn string_opcode_after(code: &[u8], at: usize) -> Option<u8> {
    let mut at = at;
    while let Ok(byte) = byte_at(code, at) {
        match byte {
            0x66 | 0x67 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0xF2 | 0xF3 | 0x40..=0x4F => at += 1,
            0x6C..=0x6F => return Some(byte),
            _ => return None,
        }
    }
    None
}

/// Decodes the IN or OUT at the start of `code`.
pub fn decode_port_io(code: &[u8]) -> Result<PortIo, DecodeError> {
    let p = prefixes(code)?;
    let opcode = byte_at(code, p.len)?;
    let (direction, port, len) = match opcode {
        0xE4 | 0xE5 => (Direction::In, PortOperand::Imm8(byte_at(code, p.len + 1)?), p.len + 2),
        0xE6 | 0xE7 => (Direction::Out, PortOperand::Imm8(byte_at(code, p.len + 1)?), p.len + 2),
        0xEC | 0xED => (Direction::In, PortOperand::Dx, p.len + 1),
        0xEE | 0xEF => (Direction::Out, PortOperand::Dx, p.len + 1),
        0x6C..=0x6F => return Err(DecodeError::StringIo(opcode)),
        _ => return Err(DecodeError::Unexpected(opcode)),
    };
    // Even opcodes move AL. The others move eAX: REX.W overrides 0x66 (and,
    // there being no 64-bit port access, leaves it 32 bits).
    let size = if opcode & 1 == 0 {
        IoSize::Byte
    } else if p.operand16 && !p.rex_w {
        IoSize::Word
    } else {
        IoSize::Dword
    };
    let address_size = if p.address32 {
        AddressSize::Bits32
    } else {
        AddressSize::Bits64
    };
    Ok(PortIo {
        direction,
        size,
        port,
        address_size,
        len,
    })
}

/// Decodes the CPUID, RDMSR or WRMSR at the start of `code`, with its
/// length.
pub fn decode_system(code: &[u8]) -> Result<(SystemInstruction, usize), DecodeError> {
    let p = prefixes(code)?;
    let escape = byte_at(code, p.len)?;
    if escape != 0x0F {
        return Err(DecodeError::Unexpected(escape));
    }
    let instruction = match byte_at(code, p.len + 1)? {
        0xA2 => SystemInstruction::Cpuid,
        0x32 => SystemInstruction::Rdmsr,
        0x30 => SystemInstruction::Wrmsr,
        other => return Err(DecodeError::Unexpected(other)),
    };
    Ok((instruction, p.len + 2))
}
