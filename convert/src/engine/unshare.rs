//! Everything private again, before a kexec or kdump kernel takes the
//! memory over (or an orderly shutdown): a next kernel knows nothing of
//! what this one shared, and its first private access to a shared page
//! fails.
//!
//! The order: stop new conversions and wait for those in flight; convert
//! the buffers the OS mapped itself through their mappings; convert every
//! other shared run the state table knows, by physical address (which
//! takes the direct map and registered aliases along); and last the
//! platform's own shared pages (SEV-SNP's GHCBs, after which only the MSR
//! protocol is left).

use core::sync::atomic::Ordering;

use super::{ConvertError, Engine, Target};
use crate::platform::Platform;
use crate::pte::Visibility;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::state::{Code, PageState};
use crate::tables::PhysMem;

/// Set in the gate once conversions are stopped; the low bits count the
/// conversions in flight.
pub(super) const STOPPED: u64 = 1 << 63;

/// What [`Engine::unshare_all`] did and found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnshareReport {
    /// Frames this call made private.
    pub made_private: u64,
    /// Frames this call could not make private: the host failed, and they
    /// are poisoned now.
    pub failed: u64,
    /// Frames still shared afterwards: ones a conversion could not claim
    /// (none, unless the OS wrote state bytes itself).
    pub still_shared: u64,
    /// Pages of the named buffers that could not be converted through the
    /// buffer (not mapped, say): their frames went private through the
    /// direct map, and the buffer may still map them shared.
    pub mapped_left: u64,
    /// Every poisoned frame (this call's and earlier ones): not to be used
    /// by the next kernel ([`Engine::runs`] lists them).
    pub poisoned: u64,
    /// Shared frames by the engine's running count when conversions
    /// stopped.
    pub expected_shared: u64,
    /// Shared frames the state table held when conversions stopped.
    pub found_shared: u64,
}

impl UnshareReport {
    /// Whether the running count of shared frames agreed with the state
    /// table: a difference means something shared or unshared memory
    /// behind the engine's back.
    pub fn accounting_matches(&self) -> bool {
        self.expected_shared == self.found_shared
    }

    /// Whether every shared frame is private now.
    pub fn complete(&self) -> bool {
        self.failed == 0 && self.still_shared == 0 && self.mapped_left == 0
    }
}

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Makes every shared frame private again, for a kexec or kdump kernel
    /// or an orderly shutdown.
    ///
    /// 1. Stops conversions for good: from now on [`convert`](Self::convert)
    ///    returns [`ConvertError::Stopped`]. Waits for those in flight.
    /// 2. Converts each of `mapped`, the vmalloc-style buffers the OS mapped
    ///    itself and still has shared, through its own mapping, so that
    ///    mapping turns private too. (A shared frame the OS mapped
    ///    elsewhere and does not list here is made private through the
    ///    direct map only; its other mapping keeps the shared attribute and
    ///    must not be used again.)
    /// 3. Converts every other shared run the state table knows, pool
    ///    chunks included, by physical address: one transaction per
    ///    contiguous run, in the platform's largest pages.
    /// 4. Last, the platform's own shared pages: on SEV-SNP every CPU's
    ///    GHCB, after which page state changes use the MSR protocol.
    ///
    /// A failure does not stop it: failed frames are poisoned and counted.
    /// Call it once, on one CPU, with the others stopped or kept from
    /// touching shared memory; memory acceptance may go on.
    pub fn unshare_all(&self, mapped: &[Target]) -> UnshareReport {
        self.gate.fetch_or(STOPPED, Ordering::AcqRel);
        while self.gate.load(Ordering::Acquire) & !STOPPED != 0 {
            crate::sync::spin_loop();
        }
        let mut report = UnshareReport {
            expected_shared: self.shared_frames.load(Ordering::Acquire),
            found_shared: self.states.census().shared,
            ..UnshareReport::default()
        };
        if !report.accounting_matches() {
            log::error!(
                "shared-frame accounting is off: {} counted, {} in the state table",
                report.expected_shared,
                report.found_shared
            );
        }
        for &target in mapped {
            if let Err(refused) = self.unshare(target, &mut report) {
                self.unshare_page_by_page(target, refused, &mut report);
            }
        }
        // The platform's own pages are held back from the scan: claimed,
        // they are no longer "shared" to it.
        let mut held = |pa: u64| {
            self.states.claim(pa, Code::Shared).ok();
        };
        self.platform.for_each_own_shared(&mut held);
        self.unshare_shared_runs(&mut report);
        let mut release = |pa: u64| {
            if self.states.code(pa) == Some(Code::Claimed) {
                self.states.settle(pa, Code::Shared);
            }
        };
        self.platform.for_each_own_shared(&mut release);
        self.platform.retire_own_shared();
        // Only the platform's own pages are left, and they go through the
        // MSR protocol now.
        self.unshare_shared_runs(&mut report);
        let census = self.states.census();
        report.still_shared = census.shared;
        report.poisoned = census.poisoned;
        report
    }

    /// The maximal runs of frames in `state`, ascending: for an OS handing
    /// memory to a next kernel, which must exclude
    /// [`PageState::Poisoned`] frames.
    pub fn runs(&self, state: PageState) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut next = 0;
        core::iter::from_fn(move || {
            let (pa, len) = self.states.next_public_run(next, state)?;
            next = pa + len;
            Some((pa, len))
        })
    }

    /// Converts every run of shared frames, one transaction each. A
    /// refusal is logged; its frames stay shared and are counted.
    fn unshare_shared_runs(&self, report: &mut UnshareReport) {
        let mut next = 0;
        while let Some((pa, len)) = self.next_run(next, Code::Shared) {
            let _ = self.unshare(Target::Physical { pa, len }, report);
            next = pa + len;
        }
    }

    /// Converts `target` to private; an error that changed nothing is
    /// handed back.
    fn unshare(&self, target: Target, report: &mut UnshareReport) -> Result<(), ConvertError> {
        let mut scratch = [0u64; 256];
        match self.convert_ungated(target, Visibility::Private, &mut scratch) {
            Ok(done) => report.made_private += done.frames,
            Err(ConvertError::Platform {
                poisoned, converted, ..
            }) => {
                report.made_private += converted;
                report.failed += poisoned;
            }
            Err(e) => {
                log::warn!("unshare_all: {target:?} not converted: {e}");
                return Err(e);
            }
        }
        Ok(())
    }

    /// A named buffer refused as a whole (some of its pages were given back
    /// already, say): each page that is still shared goes through the
    /// buffer on its own; those that cannot are counted.
    fn unshare_page_by_page(&self, target: Target, refused: ConvertError, report: &mut UnshareReport) {
        let Target::Virtual { va, len } = target else {
            report.mapped_left += 1;
            return;
        };
        if matches!(refused, ConvertError::InvalidRange { .. }) {
            report.mapped_left += len.div_ceil(4096);
            return;
        }
        for page in (va..va.saturating_add(len)).step_by(4096) {
            let one = Target::Virtual { va: page, len: 4096 };
            match self.unshare(one, report) {
                Ok(())
                | Err(ConvertError::Refused {
                    state: PageState::Private,
                    ..
                }) => {}
                Err(_) => report.mapped_left += 1,
            }
        }
    }

    fn next_run(&self, from: u64, code: Code) -> Option<(u64, u64)> {
        self.states.next_run(from, |c| c == Some(code))
    }

    /// Counts the frames a conversion moved: `converted` to `to`, and on a
    /// failure to private `poisoned` frames that were shared and are lost.
    /// Wrapping: a count that went below zero (memory shared behind the
    /// engine's back, then converted) still compares exactly.
    pub(super) fn count_shared(&self, to: Visibility, converted: u64, poisoned: u64) {
        match to {
            Visibility::Shared => self.shared_frames.fetch_add(converted, Ordering::AcqRel),
            Visibility::Private => self.shared_frames.fetch_sub(converted + poisoned, Ordering::AcqRel),
        };
    }

    /// Whether [`unshare_all`](Self::unshare_all) has stopped conversions:
    /// shared memory handed out before is private now, or soon will be.
    pub fn stopped(&self) -> bool {
        self.gate.load(Ordering::Acquire) & STOPPED != 0
    }

    /// Counts a conversion in, unless conversions are stopped.
    pub(super) fn enter_conversion(&self) -> bool {
        if self.gate.fetch_add(1, Ordering::AcqRel) & STOPPED != 0 {
            self.gate.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub(super) fn leave_conversion(&self) {
        self.gate.fetch_sub(1, Ordering::AcqRel);
    }
}
