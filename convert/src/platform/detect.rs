//! Which confidential platform the guest runs on, found at run time, and
//! where the encryption bit is on it.
//!
//! The order matters against a hostile host. On a TD, CPUID leaf 0x21 is
//! answered by the TDX module itself, never by the VMM, so its signature
//! is checked first and, once seen, no MSR is read (a TD's RDMSR of an MSR
//! the module does not own goes to the VMM). Elsewhere the SEV_STATUS MSR
//! decides: the hardware answers it, the hypervisor cannot intercept it.
//! A host can still hide a platform (by failing the guest), but cannot
//! make a confidential guest believe it runs unprotected without the
//! hardware's own answer agreeing.

/// What detection reads: CPUID and a fault-tolerant RDMSR. An OS supplies
/// its own (on SEV-SNP, CPUID may come from the SNP CPUID page or a #VC
/// handler); [`Hardware`] executes the instructions.
pub trait CpuProbe {
    /// CPUID with EAX = `leaf`, ECX = `subleaf`: `[eax, ebx, ecx, edx]`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// RDMSR of `msr`, or `None` where the CPU has no such MSR (the read
    /// would raise #GP: the OS's fault fix-up turns it into `None`).
    fn read_msr(&self, msr: u32) -> Option<u64>;
}

/// CPUID leaf 0x21, the TDX leaf (Intel TDX Module v1.5 Base Architecture
/// Specification, "CPUID Virtualization": leaf 0x21 sub-leaf 0 returns the
/// vendor string "IntelTDX    " in EBX, EDX, ECX).
pub const TDX_CPUID_LEAF: u32 = 0x21;
/// The TDX signature, as EBX, EDX, ECX spell it.
pub const TDX_SIGNATURE: [u8; 12] = *b"IntelTDX    ";
/// CPUID Fn8000_001F, "AMD Secure Encryption" (AMD APM vol. 3, appendix
/// E.4.17): EAX bit 1 SEV supported, EBX\[5:0\] the C-bit position.
pub const SEV_CPUID_LEAF: u32 = 0x8000_001F;
/// The SEV_STATUS MSR (AMD APM vol. 2, section 15.34.10): bit 0 SEV, bit
/// 1 SEV-ES, bit 2 SEV-SNP active in this guest.
pub const SEV_STATUS_MSR: u32 = 0xC001_0131;

/// SEV_STATUS bits (AMD APM vol. 2, section 15.34.10).
pub mod sev_status {
    /// SEV is active: memory is encrypted.
    pub const SEV: u64 = 1 << 0;
    /// SEV-ES is active: register state is encrypted.
    pub const SEV_ES: u64 = 1 << 1;
    /// SEV-SNP is active: the RMP protects memory integrity.
    pub const SNP: u64 = 1 << 2;
}

/// The platform found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An Intel TDX trust domain: the encryption bit comes from
    /// TDG.VP.INFO (`tdcall::vp_info`, the GPA width).
    Tdx,
    /// An AMD SEV-SNP guest, with the SEV_STATUS value read; the C-bit
    /// comes from [`snp_c_bit`].
    Snp {
        /// SEV_STATUS as read.
        sev_status: u64,
    },
    /// Neither: an ordinary VM or bare metal.
    Neither,
}

/// A platform this crate cannot serve, or answers that contradict each
/// other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DetectError {
    /// SEV or SEV-ES without SNP: memory is encrypted, but the guest has no
    /// RMP and no page state changes; this crate converts SNP memory only.
    SevWithoutSnp {
        /// SEV_STATUS as read.
        sev_status: u64,
    },
    /// SEV_STATUS sets bits that need others it leaves clear (SNP without
    /// SEV-ES and SEV): no hardware reports that.
    InconsistentSevStatus {
        /// SEV_STATUS as read.
        sev_status: u64,
    },
    /// CPUID says the CPU supports SEV, but SEV_STATUS cannot be read.
    SevStatusUnreadable,
    /// The C-bit position from CPUID Fn8000_001F and the one from the
    /// GHCB MSR protocol's SEV information differ: one of them lies.
    CBitMismatch {
        /// EBX\[5:0\] of CPUID Fn8000_001F.
        cpuid: u8,
        /// The SEV information response's C-bit.
        msr_protocol: u8,
    },
    /// A C-bit position outside 32..=51: below 32 it would hide usable
    /// address bits of any real guest, and 52 and up is not a physical
    /// address bit.
    CBitOutOfRange(u8),
    /// CPUID Fn8000_001F is missing, or says SEV is unsupported, on a
    /// guest SEV_STATUS calls SNP.
    NoSevLeaf,
}

impl core::fmt::Display for DetectError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            DetectError::SevWithoutSnp { sev_status } => {
                write!(
                    f,
                    "SEV or SEV-ES without SNP (SEV_STATUS {sev_status:#x}): not supported"
                )
            }
            DetectError::InconsistentSevStatus { sev_status } => {
                write!(f, "SEV_STATUS {sev_status:#x} sets SNP without SEV and SEV-ES")
            }
            DetectError::SevStatusUnreadable => f.write_str("CPUID reports SEV, but SEV_STATUS cannot be read"),
            DetectError::CBitMismatch { cpuid, msr_protocol } => {
                write!(f, "C-bit {cpuid} from CPUID, {msr_protocol} from the GHCB MSR protocol")
            }
            DetectError::CBitOutOfRange(bit) => write!(f, "C-bit position {bit} outside 32..=51"),
            DetectError::NoSevLeaf => f.write_str("SNP active, but CPUID Fn8000_001F is missing or denies SEV"),
        }
    }
}

impl core::error::Error for DetectError {}

fn has_leaf(probe: &(impl CpuProbe + ?Sized), leaf: u32) -> bool {
    let base = leaf & 0x8000_0000;
    probe.cpuid(base, 0)[0] >= leaf
}

/// Whether CPUID leaf 0x21 carries the TDX signature.
fn is_td(probe: &(impl CpuProbe + ?Sized)) -> bool {
    if !has_leaf(probe, TDX_CPUID_LEAF) {
        return false;
    }
    let [_, ebx, ecx, edx] = probe.cpuid(TDX_CPUID_LEAF, 0);
    let mut signature = [0; 12];
    signature[..4].copy_from_slice(&ebx.to_le_bytes());
    signature[4..8].copy_from_slice(&edx.to_le_bytes());
    signature[8..].copy_from_slice(&ecx.to_le_bytes());
    signature == TDX_SIGNATURE
}

/// Finds the platform: TDX by its CPUID signature, else SEV-SNP by
/// SEV_STATUS, else neither.
///
/// SEV_STATUS is read whatever CPUID says: in an SNP guest CPUID is the
/// hypervisor's answer (through the #VC handler), so CPUID denying SEV
/// must not spare the MSR the hardware answers. The probe's fault-tolerant
/// RDMSR turns a CPU without the MSR into `None`, which is neither, unless
/// CPUID Fn8000_001F reported SEV, where it is an error.
pub fn detect(probe: &(impl CpuProbe + ?Sized)) -> Result<Detected, DetectError> {
    if is_td(probe) {
        return Ok(Detected::Tdx);
    }
    let sev_cpu = cpuid_reports_sev(probe);
    let sev_status = match probe.read_msr(SEV_STATUS_MSR) {
        Some(status) => status,
        None if sev_cpu => return Err(DetectError::SevStatusUnreadable),
        None => return Ok(Detected::Neither),
    };
    let all = sev_status::SEV | sev_status::SEV_ES | sev_status::SNP;
    match sev_status & all {
        0 => Ok(Detected::Neither),
        s if s == all => Ok(Detected::Snp { sev_status }),
        s if s & sev_status::SNP != 0 => Err(DetectError::InconsistentSevStatus { sev_status }),
        _ => Err(DetectError::SevWithoutSnp { sev_status }),
    }
}

/// CPUID Fn8000_001F exists and its EAX\[1\] reports SEV.
fn cpuid_reports_sev(probe: &(impl CpuProbe + ?Sized)) -> bool {
    has_leaf(probe, SEV_CPUID_LEAF) && probe.cpuid(SEV_CPUID_LEAF, 0)[0] & (1 << 1) != 0
}

/// The C-bit position of an SEV-SNP guest: CPUID Fn8000_001F EBX\[5:0\],
/// which must agree with the GHCB MSR protocol's SEV information
/// (`snp_ghcb::protocol::negotiate`, its `c_bit`) and lie in 32..=51.
/// Neither source alone is trusted: the hypervisor answers the MSR
/// protocol, and CPUID unless the OS reads the SNP CPUID page.
pub fn snp_c_bit(probe: &(impl CpuProbe + ?Sized), msr_protocol_c_bit: u8) -> Result<u8, DetectError> {
    if !cpuid_reports_sev(probe) {
        return Err(DetectError::NoSevLeaf);
    }
    let cpuid = (probe.cpuid(SEV_CPUID_LEAF, 0)[1] & 0x3F) as u8;
    if cpuid != msr_protocol_c_bit {
        return Err(DetectError::CBitMismatch {
            cpuid,
            msr_protocol: msr_protocol_c_bit,
        });
    }
    if !(32..=51).contains(&cpuid) {
        return Err(DetectError::CBitOutOfRange(cpuid));
    }
    Ok(cpuid)
}

/// The probe that executes CPUID and RDMSR on this CPU.
#[derive(Debug)]
pub struct Hardware {
    _private: (),
}

impl Hardware {
    /// # Safety
    ///
    /// CPUID must be answerable here (on SEV-SNP, a #VC handler is in
    /// place) and the caller runs at CPL 0. This probe has no fault
    /// fix-up, so it reads an MSR only where CPUID Fn8000_001F reports SEV
    /// (the MSR exists) and answers `None` elsewhere: a hypervisor that
    /// hides SEV from CPUID then makes an SNP guest look unprotected. An
    /// OS with a #GP fix-up supplies its own probe that always reads.
    pub unsafe fn new() -> Self {
        Hardware { _private: () }
    }
}

#[cfg(target_arch = "x86_64")]
impl CpuProbe for Hardware {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn read_msr(&self, msr: u32) -> Option<u64> {
        if !cpuid_reports_sev(self) {
            return None;
        }
        let (low, high): (u32, u32);
        // SAFETY: the constructor's promise: CPL 0; CPUID reports SEV, so
        // the MSR exists.
        unsafe {
            core::arch::asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
        };
        Some((high as u64) << 32 | low as u64)
    }
}
