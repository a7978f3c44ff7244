//! TDG.VP.INFO: the TD's execution environment.

use bitflags::bitflags;

use crate::regs::{leaf, Registers, Tdcall};
use crate::status::{TdxError, TdxStatus};

bitflags! {
    /// TD ATTRIBUTES (TDX Module v1.5 ABI Specification, "ATTRIBUTES").
    /// Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TdAttributes: u64 {
        /// The TD is debuggable: the host can read its private memory.
        const DEBUG = 1 << 0;
        /// Hardware-enforced information leak protection is relaxed.
        const ICSSD = 1 << 16;
        /// Linear Address Space Separation is allowed.
        const LASS = 1 << 27;
        /// EPT violations on pending pages cause a TD exit, not a #VE: with
        /// this set, touching an unaccepted page cannot be turned into a
        /// guest-visible fault by the host.
        const SEPT_VE_DISABLE = 1 << 28;
        /// Migratable TD.
        const MIGRATABLE = 1 << 29;
        /// Supervisor protection keys are allowed.
        const PKS = 1 << 30;
        /// Key Locker is allowed.
        const KL = 1 << 31;
        /// Perfmon is allowed.
        const PERFMON = 1 << 63;
        const _ = !0;
    }
}

/// What TDG.VP.INFO reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdInfo {
    /// Guest physical address width: 48 or 52.
    pub gpaw: u8,
    /// The TD's attributes.
    pub attributes: TdAttributes,
    /// vCPUs initialised so far.
    pub num_vcpus: u32,
    /// vCPUs the TD may have.
    pub max_vcpus: u32,
    /// This vCPU's index.
    pub vcpu_index: u32,
}

impl TdInfo {
    /// The shared bit: GPA bit GPAW-1 (GHCI v1.5, "TD Guest Physical
    /// Address Space"). Set in a GPA or PTE, it selects the shared alias.
    pub const fn shared_mask(&self) -> u64 {
        1 << (self.gpaw - 1)
    }
}

/// Why TDG.VP.INFO could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InfoError {
    /// The call failed.
    Tdcall(TdxError),
    /// GPAW is neither 48 nor 52, the only widths TDX defines; a shared-bit
    /// mask derived from it would be wrong.
    UnsupportedGpaw(u8),
}

impl core::fmt::Display for InfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            InfoError::Tdcall(e) => write!(f, "TDG.VP.INFO failed: {e}"),
            InfoError::UnsupportedGpaw(w) => write!(f, "GPA width {w} is neither 48 nor 52"),
        }
    }
}

impl core::error::Error for InfoError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            InfoError::Tdcall(e) => Some(e),
            _ => None,
        }
    }
}

/// Calls TDG.VP.INFO.
pub fn vp_info<T: Tdcall + ?Sized>(tdcall: &T) -> Result<TdInfo, InfoError> {
    let mut regs = Registers {
        rax: leaf::VP_INFO,
        ..Registers::default()
    };
    // SAFETY: TDG.VP.INFO only reports; the `Tdcall` contract says it leaves
    // memory alone.
    unsafe { tdcall.tdcall(&mut regs) };
    TdxStatus(regs.rax).into_result().map_err(InfoError::Tdcall)?;
    let gpaw = (regs.rcx & 0x3F) as u8;
    if gpaw != 48 && gpaw != 52 {
        return Err(InfoError::UnsupportedGpaw(gpaw));
    }
    Ok(TdInfo {
        gpaw,
        attributes: TdAttributes::from_bits_retain(regs.rdx),
        num_vcpus: regs.r8 as u32,
        max_vcpus: (regs.r8 >> 32) as u32,
        vcpu_index: regs.r9 as u32,
    })
}
