//! What a VMM emulates when a guest has it carry out an instruction: a port
//! space (a serial console on COM1, QEMU's isa-debug-exit, nothing
//! elsewhere), a CPUID table, and MSRs. Platform-neutral: the TDX model
//! reaches it through TDG.VP.VMCALL\<Instruction.*\>, the SNP model
//! through the GHCB's IOIO, CPUID and MSR events.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// COM1's first register: the transmit holding register when written, the
/// receive buffer when read.
pub const COM1: u16 = 0x3F8;
/// COM1's line status register.
const COM1_LSR: u16 = COM1 + 5;
/// What the line status register reads: transmitter holding register
/// empty, transmitter empty (bits 5 and 6), so a driver that polls before
/// each byte goes on; no byte received.
const LSR_IDLE: u8 = 0x60;
/// QEMU's isa-debug-exit port, as the test guest configures it.
pub const DEBUG_EXIT: u16 = 0xF4;

/// The VMM's CPUID answers for leaves 0x4000_0000 and 0x4000_0001: KVM's
/// signature and a feature word, as a KVM host answers; and leaf 1, which
/// a VMM would happily answer too if asked (the TDX module answers it
/// itself): a guest that asks gets the host's choice of features.
const DEFAULT_CPUID: [((u32, u32), [u32; 4]); 3] = [
    // "KVMKVMKVM\0\0\0" in EBX, ECX, EDX; EAX = the highest leaf.
    ((0x4000_0000, 0), [0x4000_0001, 0x4B4D_564B, 0x564B_4D56, 0x0000_004D]),
    ((0x4000_0001, 0), [0x0100_00FB, 0, 0, 0]),
    ((0x0000_0001, 0), [0x0008_06F8, 0x0010_0800, 0xFFFA_3203, 0x1F8B_FBFF]),
];

/// KVM's paravirtual wall-clock and system-time MSRs: emulated by the
/// VMM, not the TDX module.
const DEFAULT_MSRS: [(u32, u64); 2] = [(0x4B56_4D00, 0), (0x4B56_4D01, 0)];

/// The emulated devices and registers.
#[derive(Debug)]
pub(crate) struct Emulated {
    console: Vec<u8>,
    debug_exit: Option<u32>,
    /// COM1's registers other than the data and line status registers
    /// (interrupt enable, line control, scratch, ...): stored, read back.
    com1: [u8; 8],
    cpuid: BTreeMap<(u32, u32), [u32; 4]>,
    msrs: BTreeMap<u32, u64>,
}

impl Default for Emulated {
    fn default() -> Self {
        Emulated {
            console: Vec::new(),
            debug_exit: None,
            com1: [0; 8],
            cpuid: DEFAULT_CPUID.into_iter().collect(),
            msrs: DEFAULT_MSRS.into_iter().collect(),
        }
    }
}

impl Emulated {
    /// `IN` of `bytes` (1, 2 or 4) bytes from `port`. A device register
    /// wider than a byte does not exist here: a wide access reads the byte
    /// ports one after another, as an ISA bus does; where nothing answers,
    /// the bus floats and reads all ones.
    pub(crate) fn port_read(&mut self, port: u16, bytes: u8) -> u32 {
        if port == DEBUG_EXIT {
            return u32::MAX >> (32 - 8 * bytes as u32);
        }
        (0..bytes).fold(0, |value, i| {
            value | (self.byte_read(port.wrapping_add(i as u16)) as u32) << (8 * i)
        })
    }

    /// `OUT` of the low `bytes` (1, 2 or 4) bytes of `value` to `port`.
    pub(crate) fn port_write(&mut self, port: u16, bytes: u8, value: u32) {
        let value = value & (u32::MAX >> (32 - 8 * bytes as u32));
        if port == DEBUG_EXIT {
            self.debug_exit = Some(value);
            return;
        }
        for i in 0..bytes {
            self.byte_write(port.wrapping_add(i as u16), (value >> (8 * i)) as u8);
        }
    }

    fn byte_read(&self, port: u16) -> u8 {
        match port {
            COM1 => 0,
            COM1_LSR => LSR_IDLE,
            p if (COM1..COM1 + 8).contains(&p) => self.com1[(p - COM1) as usize],
            _ => 0xFF,
        }
    }

    fn byte_write(&mut self, port: u16, byte: u8) {
        match port {
            COM1 => self.console.push(byte),
            COM1_LSR => {}
            p if (COM1..COM1 + 8).contains(&p) => self.com1[(p - COM1) as usize] = byte,
            _ => {}
        }
    }

    /// The VMM's answer to CPUID `leaf`, `subleaf`: from its table, zeros
    /// for a leaf it does not know.
    pub(crate) fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid.get(&(leaf, subleaf)).copied().unwrap_or_default()
    }

    /// Sets the answer for `leaf`, `subleaf`.
    pub(crate) fn set_cpuid(&mut self, leaf: u32, subleaf: u32, answer: [u32; 4]) {
        self.cpuid.insert((leaf, subleaf), answer);
    }

    /// An emulated MSR's value, if the VMM emulates it.
    pub(crate) fn rdmsr(&self, index: u32) -> Option<u64> {
        self.msrs.get(&index).copied()
    }

    /// Writes an emulated MSR; `false` if the VMM does not emulate it.
    pub(crate) fn wrmsr(&mut self, index: u32, value: u64) -> bool {
        self.msrs.get_mut(&index).map(|v| *v = value).is_some()
    }

    /// Emulates MSR `index` from now on, with `value`.
    pub(crate) fn set_msr(&mut self, index: u32, value: u64) {
        self.msrs.insert(index, value);
    }

    /// Every byte written to COM1's data register.
    pub(crate) fn console(&self) -> &[u8] {
        &self.console
    }

    /// Copies COM1's output from byte `from` on into `into`; how many
    /// bytes it copied. A reader that keeps its place never copies the
    /// whole log again, nor allocates.
    pub(crate) fn read_console(&self, from: usize, into: &mut [u8]) -> usize {
        let rest = self.console.get(from..).unwrap_or_default();
        let n = rest.len().min(into.len());
        into[..n].copy_from_slice(&rest[..n]);
        n
    }

    /// The last value written to the isa-debug-exit port.
    pub(crate) fn debug_exit(&self) -> Option<u32> {
        self.debug_exit
    }
}
