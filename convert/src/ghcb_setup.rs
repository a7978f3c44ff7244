//! Per-CPU GHCB pages, shared from the start: the page is converted
//! before the CPU has a GHCB, so the conversion goes through the MSR
//! protocol, then registered.

use core::ptr::NonNull;

use snp_ghcb::{Ghcb, GhcbMsr, GhcbPage, Pvalidate};

use crate::engine::{ConvertError, Engine, Target};
use crate::platform::snp::{GhcbProvider, Snp};
use crate::pte::Visibility;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::tables::PhysMem;

/// Why a GHCB could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GhcbSetupError {
    /// Making the page shared failed.
    Convert(ConvertError),
    /// The hypervisor did not register it.
    Register(snp_ghcb::protocol::ProtocolError),
}

/// Makes the page at `pa` shared (every alias, through the engine) and
/// registers it as the calling CPU's GHCB. Install the result in the
/// backend's [`GhcbProvider`] (e.g. [`PerCpuGhcbs::install`](crate::platform::snp::PerCpuGhcbs::install)).
///
/// # Safety
///
/// `ptr` must point to the page at `pa` through a mapping the engine
/// converts (the direct map), valid as long as the GHCB is used; nothing
/// else may use the page.
pub unsafe fn setup_ghcb<M, F, T, H, P, G>(
    engine: &Engine<'_, M, F, T, Snp<H, P, G>>,
    pa: u64,
    ptr: NonNull<Ghcb>,
) -> Result<GhcbPage, GhcbSetupError>
where
    M: PhysMem,
    F: FrameSource,
    T: TlbShootdown,
    H: GhcbMsr,
    P: Pvalidate,
    G: GhcbProvider,
{
    engine
        .convert(Target::Physical { pa, len: 4096 }, Visibility::Shared)
        .map_err(GhcbSetupError::Convert)?;
    // SAFETY: registration changes no memory.
    unsafe { snp_ghcb::protocol::register_ghcb(engine.platform().hypervisor(), pa) }
        .map_err(GhcbSetupError::Register)?;
    // SAFETY: the caller guarantees `ptr` maps the (now shared) page.
    Ok(unsafe { GhcbPage::new(ptr, pa) })
}
