//! What the firmware and host must be told to convert memory, per platform.
//!
//! The engine calls [`Platform::convert`] only while every alias of every
//! frame is not present, with the frames as sorted physical runs.

pub mod detect;
mod knobs;
mod runs;
pub mod snp;
pub mod tdx;

#[cfg(feature = "test-knobs")]
pub use knobs::{SnpOptions, TdxOptions};
pub(crate) use runs::{decode, extent, EXTENT_PAGES};
pub use runs::{Runs, RunsIter};

use crate::counters::Counters;
use crate::pte::{EncryptionBit, Visibility};

/// A failed firmware/host step. The frames it concerned are in an unknown
/// state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlatformError {
    /// TDX MapGPA failed.
    MapGpa(tdcall::MapGpaError),
    /// TDX ACCEPT failed.
    Accept(tdcall::AcceptError),
    /// SNP Page State Change through the GHCB failed.
    Psc(snp_ghcb::psc::PscError),
    /// SNP Page State Change through the MSR protocol failed.
    PscMsr(snp_ghcb::protocol::ProtocolError),
    /// SNP PVALIDATE failed.
    Pvalidate(snp_ghcb::pvalidate::PvalidateRangeError),
    /// SNP needs the private scratch window and the engine has none.
    NoScratchWindow,
}

impl core::fmt::Display for PlatformError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlatformError::MapGpa(e) => e.fmt(f),
            PlatformError::Accept(e) => e.fmt(f),
            PlatformError::Psc(e) => e.fmt(f),
            PlatformError::PscMsr(e) => e.fmt(f),
            PlatformError::Pvalidate(e) => e.fmt(f),
            PlatformError::NoScratchWindow => f.write_str("no private scratch window for PVALIDATE"),
        }
    }
}

impl core::error::Error for PlatformError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PlatformError::MapGpa(e) => Some(e),
            PlatformError::Accept(e) => Some(e),
            PlatformError::Psc(e) => Some(e),
            PlatformError::PscMsr(e) => Some(e),
            PlatformError::Pvalidate(e) => Some(e),
            PlatformError::NoScratchWindow => None,
        }
    }
}

/// A failed [`Platform::accept`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptFailure {
    /// What failed.
    pub error: PlatformError,
    /// Every byte from the range's start up to here is accepted; from here
    /// on the state of the memory is unknown.
    pub accepted_below: u64,
}

/// Why a platform backend could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetupError {
    /// TDX: the shared-bit mask is not a single physical-address bit a
    /// page-table entry holds (32 to 51).
    InvalidSharedMask(u64),
    /// TDX: TDG.VP.INFO failed or reported a GPA width TDX does not define.
    VpInfo(tdcall::InfoError),
    /// SNP: the C-bit position is not a physical-address bit a page-table
    /// entry holds (32 to 51).
    InvalidCBit(u8),
    /// SNP: the GHCB MSR protocol negotiation failed or the hypervisor
    /// lacks SEV-SNP support.
    Negotiation(snp_ghcb::protocol::ProtocolError),
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::InvalidSharedMask(mask) => {
                write!(f, "shared-bit mask {mask:#x} is not a single bit from 32 to 51")
            }
            SetupError::VpInfo(e) => e.fmt(f),
            SetupError::InvalidCBit(bit) => write!(f, "C-bit position {bit} is outside 32..=51"),
            SetupError::Negotiation(e) => write!(f, "GHCB MSR protocol negotiation failed: {e}"),
        }
    }
}

impl core::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            SetupError::VpInfo(e) => Some(e),
            SetupError::Negotiation(e) => Some(e),
            _ => None,
        }
    }
}

/// Maps frames private at a virtual address only the calling CPU uses, for
/// platforms that must touch the pages themselves (SNP PVALIDATE) while
/// every public alias is not present.
pub trait PrivateMap {
    /// Maps the 2 MiB frame at `pa` (2 MiB aligned); returns its address.
    fn map_2m(&mut self, pa: u64) -> u64;
    /// Maps `count` (at most 512) contiguous 4 KiB frames from `pa`;
    /// returns the address of the first.
    fn map_4k(&mut self, pa: u64, count: u64) -> u64;
    /// Removes the mapping.
    fn unmap(&mut self);
}

/// A confidential-computing platform's side of a conversion.
pub trait Platform {
    /// The PTE encryption bit and what it means on this platform.
    fn encryption(&self) -> EncryptionBit;

    /// Whether [`convert`](Self::convert) needs a [`PrivateMap`] (SNP
    /// PVALIDATE does). The engine then checks its scratch window before it
    /// changes anything.
    fn needs_private_map(&self) -> bool {
        false
    }

    /// Tells the firmware/host that `runs` become `to`, and does the
    /// guest-side steps that go with it (ACCEPT, PVALIDATE).
    ///
    /// # Safety
    ///
    /// No mapping of any frame in `runs` may be present anywhere but in
    /// `window`, and nothing may rely on the frames' contents.
    unsafe fn convert(
        &self,
        runs: Runs<'_>,
        to: Visibility,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), PlatformError>;

    /// How many of the leading frames of `runs` (at least one) one host
    /// request takes with this backend's batching. The engine sends a
    /// frame list to [`convert`](Self::convert) that many frames a call,
    /// so the list costs no more requests than its runs need however long
    /// it is, and a failed request poisons no frame another request would
    /// have carried. By default every frame: one call for the whole list.
    fn request_frames(&self, runs: Runs<'_>) -> usize {
        usize::try_from(runs.bytes() / 4096).unwrap_or(usize::MAX)
    }

    /// The most one [`accept`](Self::accept) call should take, in bytes (a
    /// multiple of 2 MiB): as much as the platform's biggest single request
    /// covers. A power of two is taken for the largest page size, and calls
    /// then start on multiples of it. It also bounds what one failure can
    /// poison.
    fn accept_call_bytes(&self) -> u64 {
        1 << 30
    }

    /// Calls `f` with each frame the backend itself keeps shared (SEV-SNP:
    /// every CPU's GHCB), which
    /// [`Engine::unshare_all`](crate::Engine::unshare_all) makes private
    /// last.
    fn for_each_own_shared(&self, f: &mut dyn FnMut(u64)) {
        let _ = f;
    }

    /// Stops using the frames [`for_each_own_shared`](Self::for_each_own_shared)
    /// names (SEV-SNP: every GHCB slot is emptied, so page state changes go
    /// through the MSR protocol from then on).
    fn retire_own_shared(&self) {}

    /// Accepts `[pa, pa + len)`, memory the firmware handed over unaccepted,
    /// and does what must follow before the guest may use it: TDX ACCEPT,
    /// largest pages first; SEV-SNP page state change to private, then
    /// PVALIDATE. The range is 4 KiB aligned.
    ///
    /// # Safety
    ///
    /// Nothing may access the frames until this returns (an access to
    /// unaccepted memory is fatal for the guest). Their mappings may be
    /// present: nothing the guest relies on is in them.
    unsafe fn accept(
        &self,
        pa: u64,
        len: u64,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), AcceptFailure>;

    /// Asks the host to end the guest (failure policy). May return if the
    /// host ignores it; the caller must then stop on its own.
    fn terminate(&self, reason: u8);
}
