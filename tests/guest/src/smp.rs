//! CPUs: this one for now; the second CPU's bring-up lands with the race
//! scenario.

pub const CPUS: usize = 2;

/// The calling CPU.
pub fn cpu() -> usize {
    0
}

/// Asks every other online CPU to flush its TLB and waits for it.
pub fn shootdown_others() {}
