//! The GHCB MSR protocol: requests and responses carried in the GHCB MSR
//! itself (GHCB spec #56421 v2, section 2.3.1, "GHCB MSR Protocol").
//! GHCBData\[11:0\] is the function code; the rest is its payload. Usable
//! before any GHCB page exists, one request per VMGEXIT.
//!
//! This module only encodes and decodes; [`crate::protocol`] sends.

/// Mask of the function code, GHCBData\[11:0\].
pub const CODE_MASK: u64 = 0xFFF;

/// Function codes (GHCB spec table "GHCB MSR Protocol").
pub mod code {
    /// SEV information response.
    pub const SEV_INFO_RESPONSE: u64 = 0x001;
    /// SEV information request.
    pub const SEV_INFO_REQUEST: u64 = 0x002;
    /// CPUID request (edk2's `GHCB_INFO_CPUID_REQUEST`, Linux's
    /// `GHCB_MSR_CPUID_REQ`).
    pub const CPUID_REQUEST: u64 = 0x004;
    /// CPUID response.
    pub const CPUID_RESPONSE: u64 = 0x005;
    /// Register GHCB GPA request.
    pub const REGISTER_GHCB_REQUEST: u64 = 0x012;
    /// Register GHCB GPA response.
    pub const REGISTER_GHCB_RESPONSE: u64 = 0x013;
    /// SNP page state change request.
    pub const PSC_REQUEST: u64 = 0x014;
    /// SNP page state change response.
    pub const PSC_RESPONSE: u64 = 0x015;
    /// Hypervisor feature support request.
    pub const HV_FEATURES_REQUEST: u64 = 0x080;
    /// Hypervisor feature support response.
    pub const HV_FEATURES_RESPONSE: u64 = 0x081;
    /// Termination request.
    pub const TERMINATE_REQUEST: u64 = 0x100;
}

/// A response that does not answer the request it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MsrProtocolError {
    /// GHCBData\[11:0\] is not the response code for the request.
    WrongCode {
        /// The code expected.
        expected: u64,
        /// The whole MSR value returned.
        response: u64,
    },
    /// Bits the spec reserves (must be zero) are set.
    ReservedBits {
        /// The whole MSR value returned.
        response: u64,
    },
    /// A CPUID response names another register than the one asked for.
    WrongRegister {
        /// The register asked for.
        expected: CpuidRegister,
        /// The whole MSR value returned.
        response: u64,
    },
}

impl core::fmt::Display for MsrProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            MsrProtocolError::WrongCode { expected, response } => {
                write!(
                    f,
                    "GHCB MSR response {response:#x} does not carry response code {expected:#x}"
                )
            }
            MsrProtocolError::ReservedBits { response } => {
                write!(f, "GHCB MSR response {response:#x} sets reserved bits")
            }
            MsrProtocolError::WrongRegister { expected, response } => {
                write!(f, "GHCB MSR CPUID response {response:#x} is not for {expected:?}")
            }
        }
    }
}

impl core::error::Error for MsrProtocolError {}

fn expect_code(response: u64, expected: u64, reserved: u64) -> Result<u64, MsrProtocolError> {
    if response & CODE_MASK != expected {
        return Err(MsrProtocolError::WrongCode { expected, response });
    }
    if response & reserved != 0 {
        return Err(MsrProtocolError::ReservedBits { response });
    }
    Ok(response)
}

/// SEV information: GHCBData\[63:48\] = max protocol version, \[47:32\] = min,
/// \[31:24\] = C-bit position, \[23:12\] reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SevInfo {
    /// Highest GHCB protocol version the hypervisor supports.
    pub max_version: u16,
    /// Lowest GHCB protocol version the hypervisor supports.
    pub min_version: u16,
    /// Position of the encryption bit (C-bit) in a PTE / GPA.
    pub c_bit: u8,
}

/// Encodes the SEV information request.
pub const fn sev_info_request() -> u64 {
    code::SEV_INFO_REQUEST
}

/// Decodes the SEV information response.
pub fn sev_info_response(response: u64) -> Result<SevInfo, MsrProtocolError> {
    let r = expect_code(response, code::SEV_INFO_RESPONSE, 0x00FF_F000)?;
    Ok(SevInfo {
        max_version: (r >> 48) as u16,
        min_version: (r >> 32) as u16,
        c_bit: (r >> 24) as u8,
    })
}

/// One of the four registers CPUID writes, as the MSR protocol's CPUID
/// request names it in GHCBData\[31:30\].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuidRegister {
    /// EAX.
    Eax = 0,
    /// EBX.
    Ebx = 1,
    /// ECX.
    Ecx = 2,
    /// EDX.
    Edx = 3,
}

impl CpuidRegister {
    /// In the order CPUID's result lists them.
    pub const ALL: [CpuidRegister; 4] = [Self::Eax, Self::Ebx, Self::Ecx, Self::Edx];
}

/// Encodes a CPUID request for one register of `leaf` (subleaf 0: the
/// protocol carries no ECX): GHCBData\[63:32\] = the leaf, \[31:30\] = the
/// register, \[29:12\] zero.
pub const fn cpuid_request(leaf: u32, register: CpuidRegister) -> u64 {
    (leaf as u64) << 32 | (register as u64) << 30 | code::CPUID_REQUEST
}

/// Decodes the CPUID response to a request for `register`:
/// GHCBData\[63:32\] = the register's value, \[31:30\] = the register it
/// is (GHCB specification 56421, section 2.3.1), \[29:12\] reserved. A
/// response for another register is refused: a host that answers EBX's
/// request with ECX's value, labelled as such, must not have it taken as
/// EBX. (Linux does not check the label; KVM sets it.)
pub fn cpuid_response(response: u64, register: CpuidRegister) -> Result<u32, MsrProtocolError> {
    let response = expect_code(response, code::CPUID_RESPONSE, 0x3FFF_F000)?;
    if (response >> 30) & 3 != register as u64 {
        return Err(MsrProtocolError::WrongRegister {
            expected: register,
            response,
        });
    }
    Ok((response >> 32) as u32)
}

/// Encodes a register-GHCB request for the page at `gpa`: GHCBData\[63:12\] =
/// GFN.
pub const fn register_ghcb_request(gpa: u64) -> u64 {
    (gpa & !CODE_MASK) | code::REGISTER_GHCB_REQUEST
}

/// Decodes the register-GHCB response: the GFN the hypervisor registered
/// (all ones when it refused).
pub fn register_ghcb_response(response: u64) -> Result<u64, MsrProtocolError> {
    expect_code(response, code::REGISTER_GHCB_RESPONSE, 0).map(|r| r >> 12)
}

/// Page state change operation (GHCB spec, "SNP Page State Change").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PscOp {
    /// Assign the page to the guest as private.
    Private = 1,
    /// Make the page shared (hypervisor-owned).
    Shared = 2,
}

impl PscOp {
    /// Decodes the 4-bit operation field.
    pub const fn from_bits(bits: u64) -> Option<PscOp> {
        match bits {
            1 => Some(PscOp::Private),
            2 => Some(PscOp::Shared),
            _ => None,
        }
    }
}

/// Encodes a single-page PSC request: GHCBData\[51:12\] = GFN, \[55:52\] =
/// operation, \[63:56\] reserved.
pub const fn psc_request(gfn: u64, op: PscOp) -> u64 {
    ((gfn & 0xFF_FFFF_FFFF) << 12) | ((op as u64) << 52) | code::PSC_REQUEST
}

/// Decodes the PSC response: GHCBData\[63:32\] = error code (0 = success),
/// \[31:12\] reserved. Returns the error code.
pub fn psc_response(response: u64) -> Result<u32, MsrProtocolError> {
    expect_code(response, code::PSC_RESPONSE, 0xFFFF_F000).map(|r| (r >> 32) as u32)
}

/// Encodes the hypervisor feature request.
pub const fn hv_features_request() -> u64 {
    code::HV_FEATURES_REQUEST
}

/// Decodes the hypervisor feature response: GHCBData\[63:12\] = feature bits.
pub fn hv_features_response(response: u64) -> Result<u64, MsrProtocolError> {
    expect_code(response, code::HV_FEATURES_RESPONSE, 0).map(|r| r >> 12)
}

/// Encodes a termination request: GHCBData\[15:12\] = reason code set,
/// \[23:16\] = reason code.
pub const fn terminate_request(reason_set: u8, reason: u8) -> u64 {
    (((reason_set & 0xF) as u64) << 12) | ((reason as u64) << 16) | code::TERMINATE_REQUEST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_as_the_spec_lays_out() {
        assert_eq!(sev_info_request(), 0x002);
        assert_eq!(hv_features_request(), 0x080);
        assert_eq!(register_ghcb_request(0x1234_5000), 0x1234_5012);
        assert_eq!(psc_request(0xABCDE, PscOp::Shared), (2 << 52) | (0xABCDE << 12) | 0x014);
        assert_eq!(psc_request(1, PscOp::Private), (1 << 52) | (1 << 12) | 0x014);
        assert_eq!(terminate_request(1, 3), 0x0003_1100);
    }

    #[test]
    fn responses_are_checked() {
        let info = sev_info_response((2 << 48) | (1 << 32) | (51 << 24) | 0x001).unwrap();
        assert_eq!(
            info,
            SevInfo {
                max_version: 2,
                min_version: 1,
                c_bit: 51
            }
        );
        assert!(matches!(
            sev_info_response(0x1001),
            Err(MsrProtocolError::ReservedBits { .. })
        ));
        assert!(matches!(
            sev_info_response(0x002),
            Err(MsrProtocolError::WrongCode { expected: 1, .. })
        ));
        assert_eq!(register_ghcb_response(0x1234_5013), Ok(0x12345));
        assert_eq!(psc_response(0x015), Ok(0));
        assert_eq!(psc_response((7 << 32) | 0x015), Ok(7));
        assert!(matches!(
            psc_response(0x1015),
            Err(MsrProtocolError::ReservedBits { .. })
        ));
        assert_eq!(hv_features_response((0b101 << 12) | 0x081), Ok(0b101));
    }

    #[test]
    fn psc_op_decodes() {
        assert_eq!(PscOp::from_bits(1), Some(PscOp::Private));
        assert_eq!(PscOp::from_bits(2), Some(PscOp::Shared));
        assert_eq!(PscOp::from_bits(3), None);
    }
}
