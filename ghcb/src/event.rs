//! What the register-carrying NAE events ([`ioio`](crate::ioio),
//! [`cpuid`](crate::cpuid), [`msr`](crate::msr)) share: how the
//! hypervisor's answer is judged before a value of it is used.
//!
//! After the exit, SW_EXITINFO1\[31:0\] says how the event ended (GHCB spec
//! #56421 rev 2.03, the NAE event return values): 0, done; 1, the
//! instruction raises an exception instead, described in SW_EXITINFO2 in
//! the EVENTINJ format (AMD APM vol. 2, section 15.20, "Event Injection");
//! anything else (2 is the hypervisor's "malformed input"), the event
//! failed. A result register is used only if the hypervisor marked it
//! valid in the valid bitmap (spec section 2.6): the page is shared, so a
//! register it did not write still holds whatever was there before.

use crate::hypervisor::GhcbMsr;
use crate::layout::Field;
use crate::page::{GhcbPage, NaeError};

/// Vector of #UD.
pub const VECTOR_UD: u8 = 6;
/// Vector of #GP.
pub const VECTOR_GP: u8 = 13;

// EVENTINJ (APM vol. 2, section 15.20): VECTOR bits 7:0, TYPE bits 10:8,
// EV (error code valid) bit 11, reserved bits 30:12, V (valid) bit 31,
// ERRORCODE bits 63:32.
const EVENTINJ_VECTOR: u64 = 0xFF;
const EVENTINJ_TYPE_SHIFT: u32 = 8;
const EVENTINJ_TYPE_MASK: u64 = 0x7;
/// EVENTINJ TYPE 3: an exception (fault or trap).
pub const EVENTINJ_TYPE_EXCEPTION: u64 = 3;
/// EVENTINJ EV: ERRORCODE holds the error code to push.
pub const EVENTINJ_EV: u64 = 1 << 11;
/// EVENTINJ V: the field describes an event.
pub const EVENTINJ_VALID: u64 = 1 << 31;
const EVENTINJ_RESERVED: u64 = 0x7FFF_F000;

/// An exception the hypervisor asks the guest to raise in place of the
/// instruction (its RIP unchanged, as a fault).
///
/// Only the two an intercepted CPUID, port access or MSR access can
/// raise once the hypervisor has it: #GP (an MSR or port the hypervisor
/// refuses) and #UD (an instruction it does not emulate). Anything else
/// (a #PF, a #VC, an NMI) would run the guest's own handlers on the
/// hypervisor's word, so it is refused as
/// [`EventError::BadException`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exception {
    /// #GP with this error code (0 when the hypervisor gave none, as KVM
    /// does for a refused MSR).
    GeneralProtection(u32),
    /// #UD.
    InvalidOpcode,
}

impl Exception {
    /// The exception's vector.
    pub const fn vector(self) -> u8 {
        match self {
            Exception::GeneralProtection(_) => VECTOR_GP,
            Exception::InvalidOpcode => VECTOR_UD,
        }
    }

    /// Decodes SW_EXITINFO2 as the EVENTINJ of an exception this crate's
    /// events can raise; `None` for anything else (not valid, not an
    /// exception, reserved bits set, another vector, #UD with an error
    /// code).
    pub const fn from_eventinj(info2: u64) -> Option<Exception> {
        let kind = (info2 >> EVENTINJ_TYPE_SHIFT) & EVENTINJ_TYPE_MASK;
        if info2 & EVENTINJ_VALID == 0 || kind != EVENTINJ_TYPE_EXCEPTION || info2 & EVENTINJ_RESERVED != 0 {
            return None;
        }
        let has_code = info2 & EVENTINJ_EV != 0;
        match ((info2 & EVENTINJ_VECTOR) as u8, has_code) {
            (VECTOR_GP, true) => Some(Exception::GeneralProtection((info2 >> 32) as u32)),
            (VECTOR_GP, false) => Some(Exception::GeneralProtection(0)),
            (VECTOR_UD, false) => Some(Exception::InvalidOpcode),
            _ => None,
        }
    }
}

/// An NAE event whose answer cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventError {
    /// The hypervisor asks for this exception instead of a result: the
    /// guest raises it at the instruction (SW_EXITINFO1\[31:0\] = 1).
    Exception(Exception),
    /// SW_EXITINFO1\[31:0\] = 1, but SW_EXITINFO2 is not an exception the
    /// instruction can raise (see [`Exception`]).
    BadException {
        /// SW_EXITINFO2 as the hypervisor left it.
        info2: u64,
    },
    /// SW_EXITINFO1\[31:0\] is neither 0 nor 1: the event failed (2: the
    /// hypervisor found the request malformed; other values are not
    /// defined).
    Failed {
        /// SW_EXITINFO1 as the hypervisor left it.
        info1: u64,
    },
    /// A register the result is read from is not marked valid: the
    /// hypervisor did not answer.
    NotValid(Field),
}

impl core::fmt::Display for EventError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            EventError::Exception(e) => write!(f, "the hypervisor asks for {e:?} (vector {})", e.vector()),
            EventError::BadException { info2 } => {
                write!(
                    f,
                    "SW_EXITINFO2 {info2:#x} is not an exception the instruction can raise"
                )
            }
            EventError::Failed { info1 } => write!(f, "the NAE event failed (SW_EXITINFO1 {info1:#x})"),
            EventError::NotValid(field) => write!(f, "the hypervisor did not mark {field:?} valid"),
        }
    }
}

impl core::error::Error for EventError {}

impl From<NaeError> for EventError {
    fn from(e: NaeError) -> Self {
        match e {
            NaeError::Hypervisor { info2 } => match Exception::from_eventinj(info2) {
                Some(exception) => EventError::Exception(exception),
                None => EventError::BadException { info2 },
            },
            NaeError::Unexpected { info1 } => EventError::Failed { info1 },
        }
    }
}

/// Sends the event (its input fields set after
/// [`GhcbPage::invalidate`]) and judges SW_EXITINFO1.
///
/// # Safety
///
/// As for [`GhcbPage::nae_call`].
pub(crate) unsafe fn exit<H: GhcbMsr + ?Sized>(
    ghcb: &mut GhcbPage,
    hv: &H,
    exit_code: u64,
    info1: u64,
) -> Result<(), EventError> {
    // SAFETY: forwarded to the caller.
    unsafe { ghcb.nae_call(hv, exit_code, info1, 0) }.map_err(EventError::from)
}

/// One result register, read once, if the hypervisor marked it valid.
pub(crate) fn result(ghcb: &GhcbPage, field: Field) -> Result<u64, EventError> {
    if !ghcb.is_valid(field) {
        return Err(EventError::NotValid(field));
    }
    Ok(ghcb.field(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GP: u64 = EVENTINJ_VALID | (EVENTINJ_TYPE_EXCEPTION << 8) | VECTOR_GP as u64;
    const UD: u64 = EVENTINJ_VALID | (EVENTINJ_TYPE_EXCEPTION << 8) | VECTOR_UD as u64;

    #[test]
    fn gp_and_ud_decode_with_and_without_an_error_code() {
        // KVM's refused MSR: #GP without EV.
        assert_eq!(Exception::from_eventinj(GP), Some(Exception::GeneralProtection(0)));
        assert_eq!(
            Exception::from_eventinj(GP | EVENTINJ_EV | 0x18 << 32),
            Some(Exception::GeneralProtection(0x18))
        );
        // Without EV the ERRORCODE field means nothing.
        assert_eq!(
            Exception::from_eventinj(GP | 0x18 << 32),
            Some(Exception::GeneralProtection(0))
        );
        assert_eq!(Exception::from_eventinj(UD), Some(Exception::InvalidOpcode));
        assert_eq!(Exception::GeneralProtection(3).vector(), 13);
        assert_eq!(Exception::InvalidOpcode.vector(), 6);
    }

    #[test]
    fn everything_else_is_refused() {
        for info2 in [
            0,
            GP & !EVENTINJ_VALID,
            UD | EVENTINJ_EV,
            // #PF, #VC, #DB: exceptions, but not ones these events raise.
            EVENTINJ_VALID | (3 << 8) | 14 | EVENTINJ_EV,
            EVENTINJ_VALID | (3 << 8) | 29 | EVENTINJ_EV,
            EVENTINJ_VALID | (3 << 8) | 1,
            // An external interrupt, an NMI, a software interrupt.
            EVENTINJ_VALID | 13,
            EVENTINJ_VALID | (2 << 8) | 2,
            EVENTINJ_VALID | (4 << 8) | 13,
            // A reserved bit.
            GP | 1 << 12,
            GP | 1 << 30,
        ] {
            assert_eq!(Exception::from_eventinj(info2), None, "{info2:#x}");
            assert_eq!(
                EventError::from(NaeError::Hypervisor { info2 }),
                EventError::BadException { info2 }
            );
        }
        assert_eq!(
            EventError::from(NaeError::Unexpected { info1: 2 }),
            EventError::Failed { info1: 2 }
        );
    }
}
