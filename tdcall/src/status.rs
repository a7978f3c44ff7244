//! TDCALL completion status (RAX on return), decoded.
//!
//! TDX Module v1.5 ABI Specification, "Function Completion Status Codes":
//! bit 63 = error, bit 62 = non-recoverable, bits 47:32 = class and details,
//! bits 31:0 = details (often the index of the offending operand). A status
//! with bit 63 clear and a non-zero class is a *warning* such as
//! `TDX_PAGE_ALREADY_ACCEPTED`: it must not be mistaken for success.

/// Mask of the part of a status that names the condition.
const CODE_MASK: u64 = 0xFFFF_FFFF_0000_0000;

/// `TDX_SUCCESS`.
pub const SUCCESS: u64 = 0;
/// `TDX_OPERAND_INVALID`: an operand is malformed (reserved bits, alignment,
/// a GPA outside the TD's range, a shared GPA where a private one is needed).
pub const OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;
/// `TDX_OPERAND_BUSY`: a resource the leaf needs is locked by another flow;
/// the call may be retried.
pub const OPERAND_BUSY: u64 = 0x8000_0200_0000_0000;
/// `TDX_EPT_WALK_FAILED`: the Secure EPT has no private mapping at the GPA.
pub const EPT_WALK_FAILED: u64 = 0xC000_0B00_0000_0000;
/// `TDX_PAGE_ALREADY_ACCEPTED`: a warning, not an error (bit 63 clear).
pub const PAGE_ALREADY_ACCEPTED: u64 = 0x0000_0B0A_0000_0000;
/// `TDX_PAGE_SIZE_MISMATCH`: the Secure EPT maps the GPA with a different
/// page size than the one requested.
pub const PAGE_SIZE_MISMATCH: u64 = 0xC000_0B0B_0000_0000;
/// `TDX_NO_VALID_VE_INFO`: TDG.VP.VEINFO.GET called with no #VE pending.
pub const NO_VALID_VE_INFO: u64 = 0xC000_0704_0000_0000;

/// A raw completion status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdxStatus(pub u64);

impl TdxStatus {
    /// `Ok` only for `TDX_SUCCESS`; everything else, warnings included, is
    /// decoded into a [`TdxError`].
    pub fn into_result(self) -> Result<(), TdxError> {
        let operand = self.0 as u32;
        match self.0 & CODE_MASK {
            _ if self.0 == SUCCESS => Ok(()),
            OPERAND_INVALID => Err(TdxError::OperandInvalid { operand }),
            OPERAND_BUSY => Err(TdxError::OperandBusy { operand }),
            EPT_WALK_FAILED => Err(TdxError::EptWalkFailed),
            PAGE_ALREADY_ACCEPTED => Err(TdxError::PageAlreadyAccepted),
            PAGE_SIZE_MISMATCH => Err(TdxError::PageSizeMismatch),
            NO_VALID_VE_INFO => Err(TdxError::NoValidVeInfo),
            _ => Err(TdxError::Other(self.0)),
        }
    }
}

/// A TDCALL that did not complete with `TDX_SUCCESS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TdxError {
    /// `TDX_OPERAND_INVALID`, with the operand id from bits 31:0.
    OperandInvalid {
        /// The operand id the module reported.
        operand: u32,
    },
    /// `TDX_OPERAND_BUSY`, with the operand id from bits 31:0.
    OperandBusy {
        /// The operand id the module reported.
        operand: u32,
    },
    /// `TDX_EPT_WALK_FAILED`: no private mapping at the GPA.
    EptWalkFailed,
    /// `TDX_PAGE_ALREADY_ACCEPTED`.
    PageAlreadyAccepted,
    /// `TDX_PAGE_SIZE_MISMATCH`.
    PageSizeMismatch,
    /// `TDX_NO_VALID_VE_INFO`.
    NoValidVeInfo,
    /// Any other status, kept whole.
    Other(u64),
}

impl core::fmt::Display for TdxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            TdxError::OperandInvalid { operand } => write!(f, "TDX_OPERAND_INVALID (operand {operand:#x})"),
            TdxError::OperandBusy { operand } => write!(f, "TDX_OPERAND_BUSY (operand {operand:#x})"),
            TdxError::EptWalkFailed => f.write_str("TDX_EPT_WALK_FAILED: no private mapping at the GPA"),
            TdxError::PageAlreadyAccepted => f.write_str("TDX_PAGE_ALREADY_ACCEPTED: the page was accepted before"),
            TdxError::PageSizeMismatch => {
                f.write_str("TDX_PAGE_SIZE_MISMATCH: the Secure EPT maps the page at another size")
            }
            TdxError::NoValidVeInfo => f.write_str("TDX_NO_VALID_VE_INFO: no #VE information to read"),
            TdxError::Other(status) => write!(f, "TDX module status {status:#018x}"),
        }
    }
}

impl core::error::Error for TdxError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_zero_is_success() {
        assert_eq!(TdxStatus(0).into_result(), Ok(()));
        // A warning class with bit 63 clear is still not success.
        assert_eq!(
            TdxStatus(PAGE_ALREADY_ACCEPTED | 1).into_result(),
            Err(TdxError::PageAlreadyAccepted)
        );
        assert_eq!(TdxStatus(0x0000_0000_0000_0001).into_result(), Err(TdxError::Other(1)));
    }

    #[test]
    fn operand_id_is_kept() {
        assert_eq!(
            TdxStatus(OPERAND_INVALID | 1).into_result(),
            Err(TdxError::OperandInvalid { operand: 1 })
        );
        assert_eq!(
            TdxStatus(OPERAND_BUSY | 0x92).into_result(),
            Err(TdxError::OperandBusy { operand: 0x92 })
        );
        assert_eq!(
            TdxStatus(PAGE_SIZE_MISMATCH | 1).into_result(),
            Err(TdxError::PageSizeMismatch)
        );
        assert_eq!(TdxStatus(NO_VALID_VE_INFO).into_result(), Err(TdxError::NoValidVeInfo));
        assert_eq!(TdxStatus(u64::MAX).into_result(), Err(TdxError::Other(u64::MAX)));
    }
}
