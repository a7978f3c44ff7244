//! The engine embedded in a `#![no_std]` kernel, for TDX and for SEV-SNP,
//! as a kernel developer writes it: what the OS implements
//! ([`os`]), then the boot path of each platform ([`tdx`], [`snp`]). The
//! repository's README shows these files; CI builds them for
//! `x86_64-unknown-none`. They are never run: that needs a TD or an SNP
//! guest.
#![no_std]

pub mod os;
pub mod snp;
pub mod tdx;

/// Why a boot path stopped.
#[derive(Debug)]
pub enum BootError {
    /// The platform backend could not be built.
    Setup(coco_convert::platform::SetupError),
    /// This CPU's GHCB could not be set up.
    Ghcb(coco_convert::GhcbSetupError),
    /// A conversion failed.
    Convert(coco_convert::ConvertError),
}

impl From<coco_convert::platform::SetupError> for BootError {
    fn from(e: coco_convert::platform::SetupError) -> Self {
        BootError::Setup(e)
    }
}

impl From<coco_convert::GhcbSetupError> for BootError {
    fn from(e: coco_convert::GhcbSetupError) -> Self {
        BootError::Ghcb(e)
    }
}

impl From<coco_convert::ConvertError> for BootError {
    fn from(e: coco_convert::ConvertError) -> Self {
        BootError::Convert(e)
    }
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::Setup(e) => write!(f, "platform setup: {e}"),
            BootError::Ghcb(e) => write!(f, "GHCB setup: {e}"),
            BootError::Convert(e) => write!(f, "conversion: {e}"),
        }
    }
}

impl core::error::Error for BootError {}
