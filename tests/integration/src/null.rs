//! Platforms whose hypercalls cost nothing: they answer as honest firmware
//! would, at once, so a benchmark measures the engine's own work while the
//! engine's counters count the calls. Each can also be given a modelled
//! cost: every call then spins that long before it answers, as a CPU does
//! while the host works, so a benchmark shows whether CPUs converting at
//! once overlap their calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hvmock::GuestMemory;
use snp_ghcb::{GhcbMsr, PageSize, Pvalidate, RawPvalidate};
use tdcall::{Registers, Tdcall};

/// Spins for `cost` (no sleep: the calling CPU is busy for the call).
fn spend(cost: Duration) {
    if cost.is_zero() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < cost {
        std::hint::spin_loop();
    }
}

/// TDX: every TDCALL and TDG.VP.VMCALL succeeds.
#[derive(Debug, Default)]
pub struct NullTdx {
    cost: Duration,
}

impl NullTdx {
    /// Every call takes `cost` before it answers.
    pub fn costing(cost: Duration) -> Self {
        NullTdx { cost }
    }
}

// SAFETY: changes no memory.
unsafe impl Tdcall for NullTdx {
    unsafe fn tdcall(&self, regs: &mut Registers) {
        spend(self.cost);
        regs.rax = 0;
        regs.r10 = 0;
        regs.r11 = 0;
    }
}

/// SNP: the MSR protocol answers well-formed successes; a Page State Change
/// through the GHCB is done in one exit (the header marked complete).
#[derive(Debug)]
pub struct NullSnp {
    memory: Arc<GuestMemory>,
    cost: Duration,
}

impl NullSnp {
    /// Over the guest memory holding the GHCBs.
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        NullSnp {
            memory,
            cost: Duration::ZERO,
        }
    }

    /// The same, every exit to the host and every PVALIDATE taking `cost`
    /// before it answers.
    pub fn costing(self, cost: Duration) -> Self {
        NullSnp { cost, ..self }
    }
}

// SAFETY: writes only the GHCB page it is given.
unsafe impl GhcbMsr for NullSnp {
    unsafe fn vmgexit(&self, value: u64) -> u64 {
        spend(self.cost);
        match value & 0xFFF {
            0 => {
                let (buffer, header) = (value + 0x800, self.memory.read_u64(value + 0x800));
                let end = (header >> 16) & 0xFFFF;
                self.memory.write_u64(buffer, (end << 16) | (end + 1));
                self.memory.write_u64(value + 0x398, 0);
                self.memory.write_u64(value + 0x3A0, 0);
                value
            }
            0x002 => (2 << 48) | (1 << 32) | (51 << 24) | 0x001,
            0x012 => (value & !0xFFF) | 0x013,
            0x014 => 0x015,
            0x080 => (1 << 12) | 0x081,
            other => other,
        }
    }
}

// SAFETY: changes nothing.
unsafe impl Pvalidate for NullSnp {
    unsafe fn pvalidate(&self, _va: u64, _size: PageSize, _validate: bool) -> RawPvalidate {
        spend(self.cost);
        RawPvalidate { eax: 0, carry: false }
    }

    /// The reads cost the CPU, not the engine, and the window's addresses
    /// are simulated: nothing to read here.
    unsafe fn evict_cache_lines(&self, _va: u64, _pages: u64) {}
}
