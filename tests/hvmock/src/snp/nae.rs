//! The NAE events a #VC handler forwards (IOIO_PROT 0x7B, CPUID 0x72,
//! MSR_PROT 0x7C), carried out on the VMM's emulated devices
//! ([`emulation`](crate::emulation): a port space, a CPUID table, MSRs),
//! the same ones the TDX model's VMM uses.
//!
//! Transcribed from the GHCB spec (#56421 rev 2.03, Table 7) and the APM
//! (vol. 2, section 15.10.2 for the IOIO information, section 15.20 for
//! EVENTINJ) independently of `snp-ghcb`. As KVM does, the model reads the
//! guest's inputs, clears the valid bitmap, and marks valid exactly the
//! registers it writes back; so a bit set afterwards is the hypervisor's.

use alloc::vec::Vec;

use crate::emulation::Emulated;
use crate::memory::GuestMemory;

use super::{SnpHostile, OFF_SW_EXIT_CODE, OFF_SW_EXIT_INFO_1, OFF_VALID_BITMAP};

/// SW_EXITCODE of the CPUID NAE event.
pub const CPUID_EXIT: u64 = 0x72;
/// SW_EXITCODE of the IOIO_PROT NAE event.
pub const IOIO_EXIT: u64 = 0x7B;
/// SW_EXITCODE of the MSR_PROT NAE event.
pub const MSR_EXIT: u64 = 0x7C;

/// SW_EXITINFO2 of a malformed request (SW_EXITINFO1 = 2): an input the
/// event needs is not marked valid.
pub const GHCB_ERR_MISSING_INPUT: u64 = 4;
/// SW_EXITINFO2 of a malformed request: an input is not valid for the
/// event (a string access, no size bit, a reserved bit).
pub const GHCB_ERR_INVALID_INPUT: u64 = 5;
/// SW_EXITINFO2 the model sends for an MSR it does not know: EVENTINJ of a
/// #GP (V, TYPE 3 exception, vector 13, no error code, as KVM sends it).
pub const INJECT_GP: u64 = 1 << 31 | 3 << 8 | 13;

const OFF_RAX: u64 = 0x1F8;
const OFF_RCX: u64 = 0x308;
const OFF_RDX: u64 = 0x310;
const OFF_RBX: u64 = 0x318;
const OFF_XCR0: u64 = 0x3E8;

// IOIO intercept information, SW_EXITINFO1 (APM vol. 2, section 15.10.2).
const IO_TYPE_IN: u64 = 1 << 0;
const IO_STR: u64 = 1 << 2;
const IO_REP: u64 = 1 << 3;
const IO_SIZE_SHIFT: u32 = 4; // SZ8, SZ16, SZ32: bits 4, 5, 6
const IO_ADDR_SHIFT: u32 = 7; // A16, A32, A64: bits 7, 8, 9
const IO_SEG: u64 = 0x7 << 10;
const IO_RESERVED: u64 = 1 << 1 | 0x7 << 13 | !0xFFFF_FFFF;

/// A register of the GHCB save area the model writes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GhcbReg {
    /// RAX.
    Rax,
    /// RBX.
    Rbx,
    /// RCX.
    Rcx,
    /// RDX.
    Rdx,
}

impl GhcbReg {
    fn offset(self) -> u64 {
        match self {
            GhcbReg::Rax => OFF_RAX,
            GhcbReg::Rbx => OFF_RBX,
            GhcbReg::Rcx => OFF_RCX,
            GhcbReg::Rdx => OFF_RDX,
        }
    }
}

/// What the guest sent with the last of these NAE events: each input
/// field's value if the guest marked it valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaeInputs {
    /// SW_EXITCODE.
    pub exit_code: u64,
    /// SW_EXITINFO1.
    pub info1: u64,
    /// RAX.
    pub rax: Option<u64>,
    /// RBX.
    pub rbx: Option<u64>,
    /// RCX.
    pub rcx: Option<u64>,
    /// RDX.
    pub rdx: Option<u64>,
    /// XCR0.
    pub xcr0: Option<u64>,
}

/// The legacy XSAVE area and its header, in bytes.
const XSAVE_LEGACY: u32 = 576;
/// The AVX state (XCR0 bit 2), in bytes.
const XSAVE_AVX: u32 = 256;

/// The honest answer, before any lie.
enum Answer {
    /// Done: these registers written back, each with the bits the
    /// instruction writes (the rest is where a lie puts garbage).
    Done(Vec<(GhcbReg, u64, u64)>),
    /// SW_EXITINFO1 = 1, SW_EXITINFO2 this EVENTINJ.
    Inject(u64),
    /// SW_EXITINFO1 = 2, SW_EXITINFO2 this error.
    Malformed(u64),
}

struct Ghcb<'a> {
    memory: &'a GuestMemory,
    gpa: u64,
}

impl Ghcb<'_> {
    fn read(&self, offset: u64) -> u64 {
        self.memory.read_u64(self.gpa + offset)
    }

    fn write(&self, offset: u64, value: u64) {
        self.memory.write_u64(self.gpa + offset, value)
    }

    fn is_valid(&self, offset: u64) -> bool {
        let bit = offset / 8;
        self.read(OFF_VALID_BITMAP + bit / 64 * 8) & 1 << (bit % 64) != 0
    }

    fn set_valid(&self, offset: u64) {
        let bit = offset / 8;
        let word = OFF_VALID_BITMAP + bit / 64 * 8;
        self.write(word, self.read(word) | 1 << (bit % 64));
    }

    fn input(&self, offset: u64) -> Option<u64> {
        self.is_valid(offset).then(|| self.read(offset))
    }
}

/// Answers one IOIO_PROT, CPUID or MSR_PROT exit through the GHCB at
/// `gpa`; returns (SW_EXITINFO1, SW_EXITINFO2). Counts a malformed request
/// in `violations`.
pub(super) fn answer(
    emulated: &mut Emulated,
    last: &mut Option<NaeInputs>,
    hostile: Option<SnpHostile>,
    memory: &GuestMemory,
    gpa: u64,
    violations: &mut u64,
) -> (u64, u64) {
    let ghcb = Ghcb { memory, gpa };
    let inputs = NaeInputs {
        exit_code: ghcb.read(OFF_SW_EXIT_CODE),
        info1: ghcb.read(OFF_SW_EXIT_INFO_1),
        rax: ghcb.input(OFF_RAX),
        rbx: ghcb.input(OFF_RBX),
        rcx: ghcb.input(OFF_RCX),
        rdx: ghcb.input(OFF_RDX),
        xcr0: ghcb.input(OFF_XCR0),
    };
    *last = Some(inputs);
    let answer = match inputs.exit_code {
        IOIO_EXIT => ioio(emulated, &inputs),
        CPUID_EXIT => cpuid(emulated, &inputs),
        MSR_EXIT => msr(emulated, &inputs),
        _ => Answer::Malformed(GHCB_ERR_INVALID_INPUT),
    };
    if matches!(answer, Answer::Malformed(_)) {
        *violations += 1;
    }
    ghcb.write(OFF_VALID_BITMAP, 0);
    ghcb.write(OFF_VALID_BITMAP + 8, 0);
    let (info1, info2) = match answer {
        Answer::Done(written) => {
            for (reg, value, width) in written {
                let value = match hostile {
                    Some(SnpHostile::NaeGarbageAbove(garbage)) => value | garbage & !width,
                    _ => value,
                };
                ghcb.write(reg.offset(), value);
                let withheld = match hostile {
                    Some(SnpHostile::NaeNothingValid) => true,
                    Some(SnpHostile::NaeNotValid(r)) => r == reg,
                    _ => false,
                };
                if !withheld {
                    ghcb.set_valid(reg.offset());
                }
            }
            (0, 0)
        }
        Answer::Inject(info2) => (1, info2),
        Answer::Malformed(error) => (2, error),
    };
    match hostile {
        Some(SnpHostile::NaeExitInfo1(info1)) => (info1, 0),
        Some(SnpHostile::NaeInject(info2)) => (1, info2),
        _ => (info1, info2),
    }
}

fn ioio(emulated: &mut Emulated, inputs: &NaeInputs) -> Answer {
    let info = inputs.info1;
    let one_of = |shift: u32| match (info >> shift) & 0x7 {
        1 => Some(0),
        2 => Some(1),
        4 => Some(2),
        _ => None,
    };
    let (Some(size), Some(_address)) = (one_of(IO_SIZE_SHIFT), one_of(IO_ADDR_SHIFT)) else {
        return Answer::Malformed(GHCB_ERR_INVALID_INPUT);
    };
    // The model offers no string I/O (it would need SW_SCRATCH).
    if info & (IO_STR | IO_REP | IO_SEG | IO_RESERVED) != 0 {
        return Answer::Malformed(GHCB_ERR_INVALID_INPUT);
    }
    let port = (info >> 16) as u16;
    let bytes = 1u8 << size;
    let mask = (1u64 << (8 * bytes)) - 1;
    if info & IO_TYPE_IN != 0 {
        let value = emulated.port_read(port, bytes) as u64 & mask;
        Answer::Done(alloc::vec![(GhcbReg::Rax, value, mask)])
    } else {
        let Some(rax) = inputs.rax else {
            return Answer::Malformed(GHCB_ERR_MISSING_INPUT);
        };
        emulated.port_write(port, bytes, (rax & mask) as u32);
        Answer::Done(Vec::new())
    }
}

fn cpuid(emulated: &Emulated, inputs: &NaeInputs) -> Answer {
    let (Some(rax), Some(rcx)) = (inputs.rax, inputs.rcx) else {
        return Answer::Malformed(GHCB_ERR_MISSING_INPUT);
    };
    let (leaf, subleaf) = (rax as u32, rcx as u32);
    let mut regs = emulated.cpuid(leaf, subleaf);
    // Leaf 0xD describes the XSAVE area, which depends on what XCR0
    // enables: the GHCB carries the guest's XCR0 for it, and the model's
    // EBX (the area for that XCR0) follows it.
    if leaf == 0xD {
        let Some(xcr0) = inputs.xcr0 else {
            return Answer::Malformed(GHCB_ERR_MISSING_INPUT);
        };
        if subleaf == 0 {
            regs[1] = XSAVE_LEGACY + if xcr0 & 1 << 2 != 0 { XSAVE_AVX } else { 0 };
        }
    }
    let word = 0xFFFF_FFFF;
    Answer::Done(alloc::vec![
        (GhcbReg::Rax, regs[0] as u64, word),
        (GhcbReg::Rbx, regs[1] as u64, word),
        (GhcbReg::Rcx, regs[2] as u64, word),
        (GhcbReg::Rdx, regs[3] as u64, word),
    ])
}

fn msr(emulated: &mut Emulated, inputs: &NaeInputs) -> Answer {
    let Some(rcx) = inputs.rcx else {
        return Answer::Malformed(GHCB_ERR_MISSING_INPUT);
    };
    let index = rcx as u32;
    let word = 0xFFFF_FFFF;
    match inputs.info1 {
        0 => match emulated.rdmsr(index) {
            Some(value) => Answer::Done(alloc::vec![
                (GhcbReg::Rax, value & word, word),
                (GhcbReg::Rdx, value >> 32, word),
            ]),
            None => Answer::Inject(INJECT_GP),
        },
        1 => {
            let (Some(rax), Some(rdx)) = (inputs.rax, inputs.rdx) else {
                return Answer::Malformed(GHCB_ERR_MISSING_INPUT);
            };
            if emulated.wrmsr(index, (rdx & word) << 32 | rax & word) {
                Answer::Done(Vec::new())
            } else {
                Answer::Inject(INJECT_GP)
            }
        }
        _ => Answer::Malformed(GHCB_ERR_INVALID_INPUT),
    }
}
