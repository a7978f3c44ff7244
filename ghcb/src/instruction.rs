//! The only inline assembly of this crate: the GHCB MSR with VMGEXIT, and
//! PVALIDATE.

use crate::hypervisor::{GhcbMsr, Pvalidate, RawPvalidate};
use crate::pvalidate::PageSize;

/// The GHCB MSR, AMD GHCB spec #56421 section 2.3.1 ("GHCB MSR").
pub const MSR_GHCB: u32 = 0xC001_0130;

/// The real `wrmsr` / VMGEXIT (`rep vmmcall`, `F3 0F 01 D9`) / `rdmsr`.
#[derive(Debug)]
pub struct GhcbMsrInstruction {
    _private: (),
}

impl GhcbMsrInstruction {
    /// Returns a handle to the instructions.
    ///
    /// # Safety
    ///
    /// The code must run as an SEV-ES or SEV-SNP guest at CPL 0; elsewhere
    /// the MSR access raises #GP and VMGEXIT is a plain VMMCALL.
    pub const unsafe fn new() -> Self {
        Self { _private: () }
    }
}

// SAFETY: the hardware changes only shared memory and the RMP on VMGEXIT.
unsafe impl GhcbMsr for GhcbMsrInstruction {
    #[cfg(target_arch = "x86_64")]
    unsafe fn vmgexit(&self, msr_value: u64) -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: `new` required an SEV guest at CPL 0; the caller accepts
        // the effect of the request. The hypervisor may read and write any
        // shared memory during the exit, hence no `nomem`.
        unsafe {
            core::arch::asm!(
                "wrmsr",
                ".byte 0xf3, 0x0f, 0x01, 0xd9",
                "rdmsr",
                in("ecx") MSR_GHCB,
                inout("eax") msr_value as u32 => lo,
                inout("edx") (msr_value >> 32) as u32 => hi,
                options(nostack),
            );
        }
        ((hi as u64) << 32) | lo as u64
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn vmgexit(&self, _msr_value: u64) -> u64 {
        unreachable!("GhcbMsrInstruction::new requires an x86-64 SEV guest")
    }
}

/// The real PVALIDATE instruction (`F2 0F 01 FF`).
#[derive(Debug)]
pub struct PvalidateInstruction {
    coherency_sfw_no: bool,
}

impl PvalidateInstruction {
    /// Returns a handle to the instruction.
    ///
    /// # Safety
    ///
    /// The code must run as an SEV-SNP guest at CPL 0 (at VMPL 0 to change
    /// the Validated bit).
    pub const unsafe fn new() -> Self {
        Self {
            coherency_sfw_no: false,
        }
    }

    /// The same instruction on a CPU whose CPUID Fn8000_001F EBX is `ebx`:
    /// when it reports COHERENCY_SFW_NO, pages just validated need no cache
    /// eviction. (Inside an SEV-SNP guest CPUID is the OS's to answer, from
    /// the SNP CPUID table or its #VC handler, so the OS passes the value.)
    pub const fn with_cpuid_8000_001f_ebx(self, ebx: u32) -> Self {
        Self {
            coherency_sfw_no: crate::pvalidate::coherency_sfw_no(ebx),
        }
    }
}

// SAFETY: PVALIDATE changes only the Validated bit of the RMP entry.
unsafe impl Pvalidate for PvalidateInstruction {
    #[cfg(target_arch = "x86_64")]
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> RawPvalidate {
        let eax: u64;
        let carry: u8;
        // SAFETY: `new` required an SNP guest at CPL 0; the caller
        // guarantees `va` maps the page private and that (in)validating it
        // is acceptable.
        unsafe {
            core::arch::asm!(
                ".byte 0xf2, 0x0f, 0x01, 0xff",
                "setc {carry}",
                carry = out(reg_byte) carry,
                inout("rax") va => eax,
                in("rcx") size as u64,
                in("rdx") validate as u64,
                options(nostack),
            );
        }
        RawPvalidate {
            eax: eax as u32,
            carry: carry != 0,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn pvalidate(&self, _va: u64, _size: PageSize, _validate: bool) -> RawPvalidate {
        unreachable!("PvalidateInstruction::new requires an x86-64 SNP guest")
    }

    fn coherency_sfw_no(&self) -> bool {
        self.coherency_sfw_no
    }
}
