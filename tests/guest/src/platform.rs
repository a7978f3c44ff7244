//! Which platform the guest runs on, asked at boot: TDX and SEV-SNP are
//! recognised by what their hardware and firmware answer; neither means
//! the emulated mode, where the scenarios run against the in-guest models.

use coco_convert::platform::detect::{detect, CpuProbe, Detected};

use crate::trap::Frame;
use crate::{fail, println};

// RDMSR that survives a #GP: the handler sees RIP at `guest_rdmsr_insn`,
// clears the success flag (ESI) and resumes after the instruction.
core::arch::global_asm!(
    ".global guest_rdmsr_safe",
    ".global guest_rdmsr_insn",
    "guest_rdmsr_safe:",
    "mov ecx, edi",
    "mov r8, rsi",
    "mov esi, 1",
    "guest_rdmsr_insn:",
    "rdmsr",
    "mov [r8], eax",
    "mov [r8 + 4], edx",
    "mov eax, esi",
    "ret",
);

extern "sysv64" {
    fn guest_rdmsr_safe(msr: u32, out: *mut u64) -> u32;
    static guest_rdmsr_insn: u8;
}

/// Completes a faulting safe RDMSR; `false` if the #GP came from elsewhere.
pub fn rdmsr_fault(frame: &mut Frame) -> bool {
    if frame.vector != 13 || frame.rip != core::ptr::addr_of!(guest_rdmsr_insn) as u64 {
        return false;
    }
    (frame.rax, frame.rdx, frame.rsi) = (0, 0, 0);
    frame.rip += 2;
    true
}

/// CPUID as executed (in an SNP guest, through the #VC handler), RDMSR
/// through the #GP fix-up.
pub struct GuestProbe;

/// The probe the guest detects with.
#[cfg(not(feature = "emulator"))]
pub fn probe() -> GuestProbe {
    GuestProbe
}

impl CpuProbe for GuestProbe {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn read_msr(&self, msr: u32) -> Option<u64> {
        let mut value = 0;
        // SAFETY: CPL 0; a #GP is caught by `rdmsr_fault`; `value` is ours.
        let ok = unsafe { guest_rdmsr_safe(msr, &mut value) };
        (ok != 0).then_some(value)
    }
}

/// The platform, reported on the console.
pub fn detect_platform() -> Detected {
    match detect(&GuestProbe) {
        Ok(Detected::Neither) => {
            println!("guest: platform: neither TDX (CPUID leaf 0x21) nor SEV-SNP (SEV_STATUS)");
            Detected::Neither
        }
        Ok(found) => {
            println!("guest: platform: {found:?}");
            found
        }
        Err(why) => {
            println!("guest: platform: {why}");
            fail("platform detection")
        }
    }
}
