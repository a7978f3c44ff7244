//! What happens after a conversion fails past the point of no return.

use crate::engine::ConvertError;

/// The OS's choice after a failed conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Return the error: the frames stay poisoned, the guest runs on.
    Continue,
    /// Ask the host to end the guest (TDX ReportFatalError, SNP termination
    /// request), then return the error; the OS must stop if the host
    /// ignores the request.
    Terminate {
        /// Reason code passed to the host.
        reason: u8,
    },
}

/// Decides what a failed conversion leads to.
pub trait FailurePolicy {
    /// Called once per conversion that failed after the host was asked,
    /// with the frames already poisoned.
    fn on_failure(&self, error: &ConvertError) -> FailureAction;
}

/// Never terminates: every failure is returned to the caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportOnly;

impl FailurePolicy for ReportOnly {
    fn on_failure(&self, _error: &ConvertError) -> FailureAction {
        FailureAction::Continue
    }
}
