//! Conversations with the hypervisor over the GHCB MSR protocol.

use bitflags::bitflags;

use crate::hypervisor::GhcbMsr;
use crate::layout::GHCB_PROTOCOL_VERSION;
use crate::msr_protocol::{self as msr, MsrProtocolError, PscOp, SevInfo};

/// A failed MSR-protocol conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The response was malformed.
    Msr(MsrProtocolError),
    /// The hypervisor's version range excludes the version we speak.
    UnsupportedVersion {
        /// Its minimum.
        min: u16,
        /// Its maximum.
        max: u16,
    },
    /// The C-bit position is outside 32..=51, so no PTE could hold it
    /// alongside a physical address.
    BadCBit(u8),
    /// The hypervisor registered a different GFN than the one asked for
    /// (all ones: it refused).
    RegistrationMismatch {
        /// GFN requested.
        requested: u64,
        /// GFN echoed.
        echoed: u64,
    },
    /// The hypervisor lacks SEV-SNP support.
    NoSnp(HvFeatures),
    /// A page state change failed with this error code.
    PageStateChange {
        /// The page's GFN.
        gfn: u64,
        /// GHCBData\[63:32\] of the response.
        error: u32,
    },
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ProtocolError::Msr(e) => e.fmt(f),
            ProtocolError::UnsupportedVersion { min, max } => {
                write!(
                    f,
                    "the hypervisor speaks GHCB versions {min}..={max}, not {GHCB_PROTOCOL_VERSION}"
                )
            }
            ProtocolError::BadCBit(bit) => write!(f, "C-bit position {bit} is outside 32..=51"),
            ProtocolError::RegistrationMismatch { requested, echoed } => {
                write!(
                    f,
                    "GHCB registration of GFN {requested:#x} answered with GFN {echoed:#x}"
                )
            }
            ProtocolError::NoSnp(features) => write!(
                f,
                "the hypervisor lacks SEV-SNP support (features {:#x})",
                features.bits()
            ),
            ProtocolError::PageStateChange { gfn, error } => {
                write!(f, "page state change of GFN {gfn:#x} failed with {error:#x}")
            }
        }
    }
}

impl core::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ProtocolError::Msr(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MsrProtocolError> for ProtocolError {
    fn from(e: MsrProtocolError) -> Self {
        ProtocolError::Msr(e)
    }
}

/// Asks for the SEV information and checks that the hypervisor speaks our
/// protocol version ([`GHCB_PROTOCOL_VERSION`]) and reports a usable C-bit.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`] (the request has no effect on memory).
pub unsafe fn negotiate<H: GhcbMsr + ?Sized>(hv: &H) -> Result<SevInfo, ProtocolError> {
    // SAFETY: the request changes no memory; the CPU precondition is the
    // caller's.
    let info = msr::sev_info_response(unsafe { hv.vmgexit(msr::sev_info_request()) })?;
    if info.min_version > GHCB_PROTOCOL_VERSION || info.max_version < GHCB_PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            min: info.min_version,
            max: info.max_version,
        });
    }
    if !(32..=51).contains(&info.c_bit) {
        return Err(ProtocolError::BadCBit(info.c_bit));
    }
    Ok(info)
}

bitflags! {
    /// Hypervisor features (GHCB spec v2, "Hypervisor Feature Support").
    /// Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HvFeatures: u64 {
        /// SEV-SNP: page state change, the SNP NAE events.
        const SNP = 1 << 0;
        /// AP creation NAE event.
        const SNP_AP_CREATION = 1 << 1;
        /// Restricted injection.
        const SNP_RESTRICTED_INJECTION = 1 << 2;
        /// Restricted injection timer.
        const SNP_RESTRICTED_INJECTION_TIMER = 1 << 3;
        /// APIC ID list.
        const APIC_ID_LIST = 1 << 4;
        /// Multiple VMPLs.
        const MULTI_VMPL = 1 << 5;
        const _ = !0;
    }
}

/// Asks which features the hypervisor supports, and requires SEV-SNP.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`] (the request has no effect on memory).
pub unsafe fn hv_features<H: GhcbMsr + ?Sized>(hv: &H) -> Result<HvFeatures, ProtocolError> {
    // SAFETY: as in `negotiate`.
    let features = HvFeatures::from_bits_retain(msr::hv_features_response(unsafe {
        hv.vmgexit(msr::hv_features_request())
    })?);
    if !features.contains(HvFeatures::SNP) {
        return Err(ProtocolError::NoSnp(features));
    }
    Ok(features)
}

/// Registers the GHCB page at `gpa` for this vCPU; the hypervisor must
/// echo the same GFN.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]; the page at `gpa` must already be shared.
pub unsafe fn register_ghcb<H: GhcbMsr + ?Sized>(hv: &H, gpa: u64) -> Result<(), ProtocolError> {
    // SAFETY: forwarded to the caller.
    let echoed = msr::register_ghcb_response(unsafe { hv.vmgexit(msr::register_ghcb_request(gpa)) })?;
    let requested = gpa >> 12;
    if echoed != requested {
        return Err(ProtocolError::RegistrationMismatch { requested, echoed });
    }
    Ok(())
}

/// Changes the state of one 4 KiB page through the MSR protocol: the only
/// way before a GHCB exists.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]: the page's contents are lost to the guest
/// (to shared: the host sees them encrypted; to private: the guest must
/// PVALIDATE before use).
pub unsafe fn page_state_change<H: GhcbMsr + ?Sized>(hv: &H, gfn: u64, op: PscOp) -> Result<(), ProtocolError> {
    // SAFETY: forwarded to the caller.
    let error = msr::psc_response(unsafe { hv.vmgexit(msr::psc_request(gfn, op)) })?;
    if error != 0 {
        return Err(ProtocolError::PageStateChange { gfn, error });
    }
    Ok(())
}

/// CPUID of `leaf`, subleaf 0, asked of the hypervisor one register per
/// request: the only way for an SEV-ES or SNP guest's #VC handler to
/// complete a CPUID before it has a GHCB. The answer is the hypervisor's
/// word, as through the GHCB; a leaf with subleaves is answered for
/// subleaf 0 only, so the caller refuses any other ECX.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`] (the requests have no effect on memory).
pub unsafe fn cpuid<H: GhcbMsr + ?Sized>(hv: &H, leaf: u32) -> Result<[u32; 4], ProtocolError> {
    let mut out = [0; 4];
    for (slot, register) in out.iter_mut().zip(msr::CpuidRegister::ALL) {
        // SAFETY: as in `negotiate`.
        *slot = msr::cpuid_response(unsafe { hv.vmgexit(msr::cpuid_request(leaf, register)) }, register)?;
    }
    Ok(out)
}

/// Reason code set 0 (GHCB spec, "Termination Request").
pub mod reason {
    /// Set 0: general.
    pub const SET_GENERAL: u8 = 0;
    /// General termination request.
    pub const GENERAL: u8 = 0;
    /// GHCB protocol version range not supported.
    pub const PROTOCOL_UNSUPPORTED: u8 = 1;
    /// SEV-SNP features not supported.
    pub const SNP_UNSUPPORTED: u8 = 2;
}

/// Asks the hypervisor to terminate the guest. It should not return; if it
/// does, the caller must stop on its own (halt forever).
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`].
pub unsafe fn terminate<H: GhcbMsr + ?Sized>(hv: &H, reason_set: u8, reason: u8) {
    // SAFETY: forwarded to the caller.
    unsafe { hv.vmgexit(msr::terminate_request(reason_set, reason)) };
}
