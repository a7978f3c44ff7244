//! Which TDX #VE EPT violations are fatal, which are MMIO, and which
//! belong to the zeropad fix-up.

use tdcall::VeInfo;

/// What an OS's #VE handler should do with an EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VeClass {
    /// Not an EPT violation: some other #VE (CPUID, HLT, ...).
    NotEptViolation,
    /// An EPT violation on a *private* GPA. The host removed, or never
    /// added, a page the guest owns; there is nothing to emulate, and going
    /// on could expose the guest to a replayed or injected page. Report it
    /// and stop (TDG.VP.VMCALL\<ReportFatalError\>).
    Fatal,
    /// A shared GPA, and the access runs across a page boundary. MMIO never
    /// does: this is a load like `load_unaligned_zeropad` running off its
    /// page into one being converted. Call `zeropad::handle_fault` (feature
    /// `zeropad`) with the GLA; if it declines, treat the #VE as fatal.
    Zeropad,
    /// A shared GPA, access within one page: emulate it as MMIO.
    Mmio,
}

/// Classifies an EPT-violation #VE. `access` is the faulting instruction's
/// memory access as the OS's MMIO decoder sees it: start address and size.
pub fn classify_ve(ve: &VeInfo, shared_mask: u64, access: (u64, u64)) -> VeClass {
    if ve.exit_reason != VeInfo::EXIT_REASON_EPT_VIOLATION {
        return VeClass::NotEptViolation;
    }
    if ve.gpa & shared_mask == 0 {
        return VeClass::Fatal;
    }
    let (start, size) = access;
    let last = start.wrapping_add(size.max(1) - 1);
    if start / 4096 != last / 4096 {
        VeClass::Zeropad
    } else {
        VeClass::Mmio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ept(gpa: u64) -> VeInfo {
        VeInfo {
            exit_reason: VeInfo::EXIT_REASON_EPT_VIOLATION,
            exit_qualification: 0,
            gla: 0x7000,
            gpa,
            instruction_length: 3,
            instruction_info: 0,
        }
    }

    #[test]
    fn classification() {
        let shared = 1 << 47;
        assert_eq!(
            classify_ve(&ept(0x7000), shared, (0x6FFC, 8)),
            VeClass::Fatal,
            "private GPA"
        );
        assert_eq!(
            classify_ve(&ept(shared | 0x7000), shared, (0x6FFC, 8)),
            VeClass::Zeropad
        );
        assert_eq!(classify_ve(&ept(shared | 0x7000), shared, (0x7000, 8)), VeClass::Mmio);
        assert_eq!(
            classify_ve(&ept(shared | 0x7000), shared, (0x7FF8, 8)),
            VeClass::Mmio,
            "ends at the page end"
        );
        let cpuid = VeInfo {
            exit_reason: 10,
            ..ept(0)
        };
        assert_eq!(classify_ve(&cpuid, shared, (0, 0)), VeClass::NotEptViolation);
    }
}
