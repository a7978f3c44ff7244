//! EPT violations: fatal, MMIO, or a zeropad load.

use tdcall::VeInfo;

use super::classify::{classify_ve, VeClass};
use super::{MmioAccess, VeError, VeOutcome};
use crate::exception::RegisterAccess;

/// Classifies the EPT violation `ve` and, for a zeropad load across a
/// page, finishes it.
///
/// The handler decodes no instruction but a recorded zeropad load (feature
/// `zeropad`): for any other, the access is taken to be the byte at the
/// GLA, which never crosses a page, so a shared GPA is MMIO and the OS's
/// MMIO decoder has the last word.
pub(super) fn ept_violation<R: RegisterAccess + ?Sized>(
    ve: &VeInfo,
    regs: &mut R,
    shared_mask: u64,
) -> Result<VeOutcome, VeError> {
    let load = recorded_load_address(regs);
    let access = match load {
        Ok(Some(address)) => (address, 8),
        _ => (ve.gla, 1),
    };
    let mmio = VeOutcome::Mmio(MmioAccess {
        gpa: ve.gpa,
        gla: ve.gla,
    });
    match classify_ve(ve, shared_mask, access) {
        VeClass::Fatal => Err(VeError::PrivateEptViolation {
            gpa: ve.gpa,
            gla: ve.gla,
        }),
        #[cfg(all(feature = "zeropad", target_arch = "x86_64"))]
        VeClass::Zeropad => {
            crate::zeropad::handle_fault(regs, ve.gla, crate::zeropad::FaultKind::VirtualizationException)
                .map(|()| VeOutcome::Emulated)
                .map_err(VeError::Zeropad)
        }
        // Without a recorded load the access is one byte: it never crosses.
        #[cfg(not(all(feature = "zeropad", target_arch = "x86_64")))]
        VeClass::Zeropad => Ok(mmio),
        // A recorded load that does not decode is not MMIO either.
        VeClass::Mmio => load.map(|_| mmio),
        VeClass::NotEptViolation => Err(VeError::UnsupportedExitReason(ve.exit_reason)),
    }
}

/// The address the recorded zeropad load at RIP reads from; `Ok(None)` if
/// RIP is not one.
#[cfg(all(feature = "zeropad", target_arch = "x86_64"))]
fn recorded_load_address<R: RegisterAccess + ?Sized>(regs: &R) -> Result<Option<u64>, VeError> {
    crate::zeropad::site_load_address(regs).map_err(VeError::Zeropad)
}

#[cfg(not(all(feature = "zeropad", target_arch = "x86_64")))]
fn recorded_load_address<R: RegisterAccess + ?Sized>(_regs: &R) -> Result<Option<u64>, VeError> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use tdcall::{Registers, Tdcall};

    use super::super::{MmioAccess, VeError, VeHandler, VeOutcome};
    use crate::exception::FaultFrame;

    /// An EPT violation asks nothing of the VMM.
    struct NoVmm;

    // SAFETY: it changes no memory: it never returns.
    unsafe impl Tdcall for NoVmm {
        unsafe fn tdcall(&self, regs: &mut Registers) {
            panic!("an EPT violation made a TDCALL: {regs:x?}")
        }
    }

    /// Not at a recorded load (with or without feature `zeropad`): a
    /// private GPA is fatal, a shared one MMIO, and nothing changes.
    #[test]
    fn private_is_fatal_and_shared_is_mmio() {
        let handler = VeHandler::new(1 << 51).unwrap();
        let before = FaultFrame {
            gprs: core::array::from_fn(|i| i as u64 * 0x0101_0101_0101_0101),
            rip: 0x1000,
        };
        let ept = |gpa| tdcall::VeInfo {
            exit_reason: tdcall::VeInfo::EXIT_REASON_EPT_VIOLATION,
            exit_qualification: 0,
            gla: 0x7FF8,
            gpa,
            instruction_length: 0,
            instruction_info: 0,
        };
        let mut f = before;
        assert_eq!(
            handler.handle(&NoVmm, &ept(0x7000), &mut f),
            Err(VeError::PrivateEptViolation {
                gpa: 0x7000,
                gla: 0x7FF8
            })
        );
        assert_eq!(f, before);
        // Bit 47 is not the shared bit of this TD: still private.
        assert!(handler.handle(&NoVmm, &ept(1 << 47 | 0x7000), &mut f).is_err());
        let shared = 1 << 51 | 0x7000;
        assert_eq!(
            handler.handle(&NoVmm, &ept(shared), &mut f),
            Ok(VeOutcome::Mmio(MmioAccess {
                gpa: shared,
                gla: 0x7FF8
            }))
        );
        assert_eq!(f, before);
    }
}
