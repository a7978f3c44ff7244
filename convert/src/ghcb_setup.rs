//! Per-CPU GHCB pages, shared from the start: the page is converted before
//! the CPU has a GHCB, so the conversion goes through the MSR protocol;
//! then it is registered and installed.

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
#[non_exhaustive]
pub enum GhcbSetupError {
    /// The platform's GHCB provider has no slot for this CPU. Nothing
    /// changed.
    NoSlot,
    /// Making the page shared failed.
    Convert(ConvertError),
    /// The hypervisor did not register it. The page stays shared: convert
    /// it back before using it as private memory.
    Register(snp_ghcb::protocol::ProtocolError),
}

impl core::fmt::Display for GhcbSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GhcbSetupError::NoSlot => f.write_str("no GHCB slot for this CPU"),
            GhcbSetupError::Convert(e) => write!(f, "making the GHCB shared failed: {e}"),
            GhcbSetupError::Register(e) => write!(f, "registering the GHCB failed, the page stays shared: {e}"),
        }
    }
}

impl core::error::Error for GhcbSetupError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            GhcbSetupError::Convert(e) => Some(e),
            GhcbSetupError::Register(e) => Some(e),
            GhcbSetupError::NoSlot => None,
        }
    }
}

/// Sets up the calling CPU's GHCB: makes the page at `pa` shared (every
/// alias, through the engine, by the MSR protocol since this CPU has no
/// GHCB yet), registers it with the hypervisor, and installs it in the
/// backend's [`GhcbProvider`] (a [`PerCpuGhcbs`](crate::platform::snp::PerCpuGhcbs)
/// slot), so this CPU's later conversions use it. Call once on each CPU.
///
/// If registration fails the page stays shared: the error says so, and the
/// caller must not reuse the page as private memory without converting it
/// back.
///
/// # Safety
///
/// `ptr` must point to the page at `pa` through a mapping the engine
/// converts (the direct map), valid as long as the GHCB is used; nothing
/// else may use the page. The caller stays on one CPU for the whole call
/// (registration is per CPU).
pub unsafe fn setup_ghcb<M, F, T, H, P, G>(
    engine: &Engine<'_, M, F, T, Snp<H, P, G>>,
    pa: u64,
    ptr: NonNull<Ghcb>,
) -> Result<(), GhcbSetupError>
where
    M: PhysMem,
    F: FrameSource,
    T: TlbShootdown,
    H: GhcbMsr,
    P: Pvalidate,
    G: GhcbProvider,
{
    // The slot is chosen once, before anything changes.
    let slot = crate::platform::snp::own_slot(engine.platform().ghcbs()).ok_or(GhcbSetupError::NoSlot)?;
    engine
        .convert(Target::Physical { pa, len: 4096 }, Visibility::Shared)
        .map_err(GhcbSetupError::Convert)?;
    // SAFETY: registration changes no memory.
    unsafe { snp_ghcb::protocol::register_ghcb(engine.platform().hypervisor(), pa) }
        .map_err(GhcbSetupError::Register)?;
    // SAFETY: the caller guarantees `ptr` maps the (now shared) page.
    slot.fill(unsafe { GhcbPage::new(ptr, pa) });
    Ok(())
}
