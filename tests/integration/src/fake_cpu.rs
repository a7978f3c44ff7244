//! A CPU as detection sees it: a table of CPUID answers and MSRs, for
//! tests that play a TD, an SNP guest, an ordinary VM, or a host that lies
//! in its CPUID answers.

use std::cell::RefCell;
use std::collections::HashMap;

use coco_convert::platform::detect::CpuProbe;

/// CPUID answers by (leaf, subleaf), zeros elsewhere; MSRs that read, the
/// others fault. Every MSR read is recorded, in order.
#[derive(Debug, Default)]
pub struct FakeCpu {
    /// CPUID's answers.
    pub cpuid: HashMap<(u32, u32), [u32; 4]>,
    /// The MSRs that can be read.
    pub msrs: HashMap<u32, u64>,
    /// Every MSR read, faulting or not.
    pub msr_reads: RefCell<Vec<u32>>,
}

impl CpuProbe for FakeCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid.get(&(leaf, subleaf)).copied().unwrap_or([0; 4])
    }
    fn read_msr(&self, msr: u32) -> Option<u64> {
        self.msr_reads.borrow_mut().push(msr);
        self.msrs.get(&msr).copied()
    }
}
