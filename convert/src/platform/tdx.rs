//! The TDX backend: MapGPA per contiguous physical run; to private, then
//! ACCEPT largest aligned size first.

use tdcall::{accept_range, map_gpa, report_fatal_error, AcceptError, Tdcall};

use super::knobs::TdxOptions;
use super::{AcceptFailure, PlatformError, PrivateMap, Runs, SetupError};
use crate::counters::Counters;
use crate::pte::{EncryptionBit, Visibility};
use crate::Platform;

/// TDX over any [`Tdcall`] (the instruction, or a model).
#[derive(Debug)]
pub struct Tdx<T: Tdcall> {
    tdcall: T,
    shared_mask: u64,
    options: TdxOptions,
    pte_bit: Option<EncryptionBit>,
}

impl<T: Tdcall> Tdx<T> {
    /// A backend whose shared bit is `shared_mask` (TDG.VP.INFO's GPA width
    /// less one: [`TdInfo::shared_mask`](tdcall::TdInfo::shared_mask)).
    /// The mask is one physical-address bit a page-table entry holds, 32 to
    /// 51 (TDX itself reports 47 or 51).
    pub fn new(tdcall: T, shared_mask: u64) -> Result<Self, SetupError> {
        EncryptionBit::tdx(shared_mask)
            .filter(|_| (1 << 32..=1 << 51).contains(&shared_mask))
            .ok_or(SetupError::InvalidSharedMask(shared_mask))?;
        Ok(Tdx {
            tdcall,
            shared_mask,
            options: TdxOptions::MINIMAL,
            pte_bit: None,
        })
    }

    /// A backend configured from TDG.VP.INFO.
    pub fn from_vp_info(tdcall: T) -> Result<Self, SetupError> {
        let info = tdcall::vp_info(&tdcall).map_err(SetupError::VpInfo)?;
        Self::new(tdcall, info.shared_mask())
    }

    /// The same backend marking pages in PTEs with another bit than the
    /// GPA's shared bit: for an emulated platform, a bit the MMU ignores
    /// (MapGPA still uses the real shared bit).
    #[cfg(feature = "test-knobs")]
    pub fn with_pte_bit(self, bit: EncryptionBit) -> Self {
        Tdx {
            pte_bit: Some(bit),
            ..self
        }
    }

    /// The same backend with other batching.
    #[cfg(feature = "test-knobs")]
    pub fn with_options(self, options: TdxOptions) -> Self {
        Tdx { options, ..self }
    }

    /// The TDCALL implementation.
    pub fn tdcall(&self) -> &T {
        &self.tdcall
    }

    /// Calls `f` per contiguous run, or per 4 KiB frame of a scattered batch
    /// when runs are not coalesced.
    fn for_each_piece(
        &self,
        runs: Runs<'_>,
        mut f: impl FnMut(u64, u64) -> Result<(), PlatformError>,
    ) -> Result<(), PlatformError> {
        match runs {
            Runs::Extents(_) if !self.options.coalesce_runs => runs.frames().try_for_each(|pa| f(pa, 4096)),
            _ => runs.iter().try_for_each(|(pa, len)| f(pa, len)),
        }
    }
}

impl<T: Tdcall> Platform for Tdx<T> {
    fn encryption(&self) -> EncryptionBit {
        self.pte_bit
            .or(EncryptionBit::tdx(self.shared_mask))
            .unwrap_or_else(|| unreachable!("checked in new"))
    }

    /// The first run (one MapGPA, and its ACCEPTs); one frame when runs
    /// are not coalesced.
    fn request_frames(&self, runs: Runs<'_>) -> usize {
        match runs.iter().next() {
            Some((_, len)) if self.options.coalesce_runs || !runs.is_scattered() => {
                usize::try_from(len / 4096).unwrap_or(usize::MAX)
            }
            _ => 1,
        }
    }

    unsafe fn convert(
        &self,
        runs: Runs<'_>,
        to: Visibility,
        _window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), PlatformError> {
        self.for_each_piece(runs, |pa, len| {
            // SAFETY: the engine guarantees no alias of the run is present
            // and nothing relies on its contents.
            let calls = unsafe { map_gpa(&self.tdcall, pa, len, to, self.shared_mask) };
            calls.map(|c| Counters::add(&counters.map_gpa, c.calls)).map_err(|e| {
                Counters::add(&counters.map_gpa, 1);
                PlatformError::MapGpa(e)
            })
        })?;
        if to == Visibility::Private {
            self.for_each_piece(runs, |pa, len| {
                // SAFETY: as above; ACCEPT zeroes pages nobody relies on.
                let accepted = unsafe { accept_range(&self.tdcall, pa, len) };
                accepted.map(|c| Counters::add(&counters.accept, c.calls)).map_err(|e| {
                    Counters::add(&counters.accept, 1);
                    PlatformError::Accept(e)
                })
            })?;
        }
        Ok(())
    }

    unsafe fn accept(
        &self,
        pa: u64,
        len: u64,
        _window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), AcceptFailure> {
        // SAFETY: forwarded from the caller: nothing uses the frames.
        match unsafe { accept_range(&self.tdcall, pa, len) } {
            Ok(calls) => {
                Counters::add(&counters.accept, calls.calls);
                Ok(())
            }
            Err(error) => {
                Counters::add(&counters.accept, 1);
                // ACCEPT goes up from the start, so everything below the
                // page it failed on was accepted.
                let failed_at = match error {
                    AcceptError::AlreadyAccepted { gpa, .. }
                    | AcceptError::Busy { gpa }
                    | AcceptError::Tdx { gpa, .. } => gpa,
                    _ => pa,
                };
                Err(AcceptFailure {
                    error: PlatformError::Accept(error),
                    accepted_below: failed_at.clamp(pa, pa + len),
                })
            }
        }
    }

    fn terminate(&self, reason: u8) {
        let _ = report_fatal_error(&self.tdcall, reason as u32);
    }
}
