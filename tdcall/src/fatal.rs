//! TDG.VP.VMCALL\<ReportFatalError\>: the TD's last word to the VMM.

use crate::regs::Tdcall;
use crate::vmcall::{subfunction, tdvmcall, VmcallError, VmcallStatus};

/// Tells the VMM that the TD hit an unrecoverable error (GHCI v1.5,
/// "TDG.VP.VMCALL\<ReportFatalError\>": R12 bits 31:0 = TD-specific error
/// code, bit 63 = R13 holds the GPA of a shared page with details; we send
/// no details page).
///
/// The VMM is expected to terminate the TD and not return. If it returns
/// anyway, the result says how it answered, and the caller must stop on its
/// own (e.g. halt this vCPU forever): the TD must not go on as if nothing
/// happened.
pub fn report_fatal_error<T: Tdcall + ?Sized>(tdcall: &T, error_code: u32) -> Result<(), VmcallError> {
    // SAFETY: ReportFatalError changes no guest memory.
    let (status, _) = unsafe { tdvmcall(tdcall, subfunction::REPORT_FATAL_ERROR, [error_code as u64, 0, 0, 0]) }
        .map_err(VmcallError::Tdcall)?;
    match status {
        VmcallStatus::Success => Ok(()),
        other => Err(VmcallError::Status(other)),
    }
}
