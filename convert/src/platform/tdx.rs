//! The TDX backend: MapGPA per contiguous physical run; to private, then
//! ACCEPT largest aligned size first.

use tdcall::{accept_range, map_gpa, report_fatal_error, Tdcall};

use super::{PlatformError, PrivateMap, Runs};
use crate::counters::Counters;
use crate::pte::{EncryptionBit, Visibility};
use crate::Platform;

/// TDX over any [`Tdcall`] (the instruction, or a model).
#[derive(Debug)]
pub struct Tdx<T: Tdcall> {
    tdcall: T,
    shared_mask: u64,
}

impl<T: Tdcall> Tdx<T> {
    /// A backend using `shared_mask` (from TDG.VP.INFO) as the shared bit.
    pub fn new(tdcall: T, shared_mask: u64) -> Option<Self> {
        EncryptionBit::tdx(shared_mask)?;
        Some(Tdx { tdcall, shared_mask })
    }

    /// A backend configured from TDG.VP.INFO.
    pub fn from_vp_info(tdcall: T) -> Result<Self, tdcall::InfoError> {
        let info = tdcall::vp_info(&tdcall)?;
        Ok(Tdx {
            shared_mask: info.shared_mask(),
            tdcall,
        })
    }

    /// The TDCALL implementation.
    pub fn tdcall(&self) -> &T {
        &self.tdcall
    }
}

impl<T: Tdcall> Platform for Tdx<T> {
    fn encryption(&self) -> EncryptionBit {
        EncryptionBit::tdx(self.shared_mask).unwrap_or_else(|| unreachable!("checked in new"))
    }

    unsafe fn convert(
        &self,
        runs: Runs<'_>,
        to: Visibility,
        _window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), PlatformError> {
        let visibility = match to {
            Visibility::Private => tdcall::Visibility::Private,
            Visibility::Shared => tdcall::Visibility::Shared,
        };
        for (pa, len) in runs.iter() {
            // SAFETY: the engine guarantees no alias of the run is present
            // and nothing relies on its contents.
            let calls = unsafe { map_gpa(&self.tdcall, pa, len, visibility, self.shared_mask) };
            match calls {
                Ok(c) => Counters::add(&counters.map_gpa, c.calls),
                Err(e) => {
                    Counters::add(&counters.map_gpa, 1);
                    return Err(PlatformError::MapGpa(e));
                }
            }
        }
        if to == Visibility::Private {
            for (pa, len) in runs.iter() {
                // SAFETY: as above; ACCEPT zeroes pages nobody relies on.
                let accepted = unsafe { accept_range(&self.tdcall, pa, len) };
                match accepted {
                    Ok(c) => Counters::add(&counters.accept, c.calls),
                    Err(e) => {
                        Counters::add(&counters.accept, 1);
                        return Err(PlatformError::Accept(e));
                    }
                }
            }
        }
        Ok(())
    }

    fn terminate(&self, reason: u8) {
        let _ = report_fatal_error(&self.tdcall, reason as u32);
    }
}
