//! Accepting memory the firmware handed over unaccepted: lazily, as the
//! OS's allocator reaches it, or eagerly at boot on every CPU the OS
//! offers.
//!
//! Each unit's state lives in the state bytes of its frames (every frame
//! of an unaccepted unit is `Unaccepted`) and its bit in the bitmap. The
//! unit's first frame is its lock: a CPU claims the unit by moving that
//! byte to `Accepting`, accepts, makes the other frames private, clears
//! the bit, and last releases the lock. A CPU that finds a unit being
//! accepted waits for it, but only after it has finished the units it
//! claimed itself, so no two CPUs ever wait for each other; and no lock is
//! held across the hypercalls.

use core::ops::Range;

use super::{ConvertError, Engine, PAGE};
use crate::counters::Counters;
use crate::platform::{AcceptFailure, Platform, PlatformError, PrivateMap};
use crate::policy::FailureAction;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::state::{Code, PageState};
use crate::tables::PhysMem;
use crate::unaccepted::{guarded_end, UnacceptedBitmap};
use crate::window::WindowMap;

/// What an acceptance did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptReport {
    /// Units this call accepted (units other CPUs accepted meanwhile, or
    /// that were accepted already, are not counted).
    pub units: u64,
}

/// Why memory was not accepted, or not all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcceptMemoryError {
    /// Empty, unaligned (recording needs 4 KiB alignment) or wrapping.
    InvalidRange {
        /// Start.
        pa: u64,
        /// Length.
        len: u64,
    },
    /// Recording needs a bitmap ([`Engine::adopt_unaccepted`]).
    NoBitmap,
    /// The engine has its bitmap already.
    BitmapInUse,
    /// The state table does not cover this frame of an unaccepted unit.
    Uncovered {
        /// The frame.
        pa: u64,
    },
    /// Recording: this frame is in use (not private), so it cannot be
    /// unaccepted memory.
    NotPrivate {
        /// The frame.
        pa: u64,
        /// Its state.
        state: Option<PageState>,
    },
    /// SEV-SNP validates through the private scratch window and the engine
    /// has none on this CPU. Nothing changed.
    NoScratchWindow,
    /// An earlier acceptance of the unit at `pa` failed: it is poisoned and
    /// never usable.
    Poisoned {
        /// The unit.
        pa: u64,
    },
    /// The firmware or host failed. The units of the failed call from the
    /// unit at `pa` on are poisoned (their frames are
    /// [`PageState::Poisoned`], their bits stay set) and, unless
    /// `left_mapped`, not present in the direct map or any registered
    /// alias, as a failed conversion leaves its frames; the units before it
    /// were accepted.
    Platform {
        /// What failed.
        error: PlatformError,
        /// The first poisoned unit, or frame for a range recorded with
        /// [`Engine::record_unaccepted`].
        pa: u64,
        /// Frames poisoned.
        poisoned: u64,
        /// Units this call accepted before and besides the failure.
        accepted: u64,
        /// The frame source had no table page for the split that would
        /// have made the poisoned frames not present: they are still
        /// mapped, so a load running off the end of the memory before them
        /// reaches memory the platform never accepted. An OS that cannot
        /// rule such loads out should stop.
        left_mapped: bool,
    },
}

impl core::fmt::Display for AcceptMemoryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            AcceptMemoryError::InvalidRange { pa, len } => write!(f, "invalid range {pa:#x}+{len:#x}"),
            AcceptMemoryError::NoBitmap => f.write_str("no unaccepted-memory bitmap was given"),
            AcceptMemoryError::BitmapInUse => f.write_str("the engine has its unaccepted-memory bitmap already"),
            AcceptMemoryError::Uncovered { pa } => {
                write!(f, "frame {pa:#x} of an unaccepted unit is outside the state table")
            }
            AcceptMemoryError::NotPrivate { pa, state } => {
                write!(f, "frame {pa:#x} is in use ({state:?}), not unaccepted memory")
            }
            AcceptMemoryError::NoScratchWindow => f.write_str("no private scratch window for PVALIDATE"),
            AcceptMemoryError::Poisoned { pa } => write!(f, "the unit at {pa:#x} failed to accept earlier"),
            AcceptMemoryError::Platform {
                error,
                pa,
                poisoned,
                accepted,
                left_mapped,
            } => write!(
                f,
                "accepting memory failed at {pa:#x} ({poisoned} frames poisoned{}, {accepted} units accepted): {error}",
                if left_mapped { " but left mapped" } else { "" }
            ),
        }
    }
}

impl core::error::Error for AcceptMemoryError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            AcceptMemoryError::Platform { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A unit as the state bytes tell it, while its bit is set.
enum Unit {
    /// Nobody is accepting it.
    Unaccepted,
    /// Another CPU is accepting it now.
    Busy,
    /// Accepted (its bit is about to clear).
    Accepted,
    Poisoned,
    Uncovered,
}

impl<'a, M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'a, M, F, T, P> {
    /// Gives the engine the bitmap of unaccepted memory, once, before any
    /// acceptance. Units already set in it (a bitmap the firmware or a
    /// previous kernel filled) become [`PageState::Unaccepted`] in the
    /// state table, which must cover them and hold their frames private;
    /// otherwise nothing changes, the engine keeps no bitmap, and the error
    /// names the first frame in the way.
    pub fn adopt_unaccepted(&mut self, bitmap: UnacceptedBitmap<'a>) -> Result<(), AcceptMemoryError> {
        if self.unaccepted.is_some() {
            return Err(AcceptMemoryError::BitmapInUse);
        }
        let set = (0..bitmap.units()).filter(|&u| bitmap.is_unaccepted(u));
        let unit = bitmap.unit_size();
        for (done, u) in set.clone().enumerate() {
            if let Err(e) = self.mark_unit_unaccepted(bitmap.unit_pa(u), unit) {
                for undo in set.take(done) {
                    self.unmark_unit(bitmap.unit_pa(undo), unit);
                }
                return Err(e);
            }
        }
        self.unaccepted = Some(bitmap);
        Ok(())
    }

    /// The unaccepted-memory bitmap, if the engine has one (to hand on to
    /// the next kernel).
    pub fn unaccepted(&self) -> Option<&UnacceptedBitmap<'a>> {
        self.unaccepted.as_ref()
    }

    /// Records `[pa, pa + len)` as unaccepted, from the firmware's memory
    /// map (UEFI type 15, `EfiUnacceptedMemoryType`; on TDX the TD HOB's
    /// unaccepted resources; on SEV-SNP the ranges not validated at launch).
    /// Whole units inside the range are marked in the bitmap and become
    /// [`PageState::Unaccepted`]; the parts at either end that do not fill
    /// a unit are accepted now, as the bitmap cannot describe them.
    ///
    /// The frames must be private (the state table's initial state) and
    /// untouched. On an error before the platform was called nothing
    /// changed.
    pub fn record_unaccepted(&self, pa: u64, len: u64) -> Result<(), AcceptMemoryError> {
        let end = pa
            .checked_add(len)
            .filter(|_| len > 0 && (pa | len) % PAGE == 0)
            .ok_or(AcceptMemoryError::InvalidRange { pa, len })?;
        let bitmap = self.unaccepted.as_ref().ok_or(AcceptMemoryError::NoBitmap)?;
        if let Some(pa) = self.states.first_uncovered(pa, len) {
            return Err(AcceptMemoryError::Uncovered { pa });
        }
        let whole = bitmap.units_inside(pa, end);
        let unit = bitmap.unit_size();
        let (head_end, tail_start) = if whole.is_empty() {
            (end, end)
        } else {
            (bitmap.unit_pa(whole.start), bitmap.unit_pa(whole.end))
        };
        let edges = [pa..head_end, tail_start..end];
        if edges.iter().any(|e| !e.is_empty()) {
            self.check_window()?;
        }
        // Claim the edges first: they are accepted below, and a conversion
        // must not take them meanwhile.
        for (i, edge) in edges.iter().enumerate() {
            if let Err(e) = self.claim_frames(edge.clone()) {
                edges[..i]
                    .iter()
                    .for_each(|done| self.settle_frames(done.clone(), Code::Private));
                return Err(e);
            }
        }
        for (done, u) in whole.clone().enumerate() {
            if let Err(e) = self.mark_unit_unaccepted(bitmap.unit_pa(u), unit) {
                whole
                    .clone()
                    .take(done)
                    .for_each(|undo| self.unmark_unit(bitmap.unit_pa(undo), unit));
                edges
                    .iter()
                    .for_each(|edge| self.settle_frames(edge.clone(), Code::Private));
                return Err(e);
            }
        }
        whole.for_each(|u| bitmap.set(u));
        // Both edges settle before a failure's clean-up runs, which must
        // hold no claim.
        let failures = edges.map(|edge| (!edge.is_empty()).then(|| self.accept_edge(edge)));
        let mut result = Ok(());
        for (error, poisoned) in failures.into_iter().flatten().filter_map(Result::err) {
            result = result.and(Err(self.failed(error, poisoned, 0)));
        }
        result
    }

    /// Makes sure every unit `[pa, pa + len)` touches is accepted, and the
    /// unit after it when the range ends on a unit boundary (a
    /// word-at-a-time load past the range's end reaches into it, and a
    /// load from unaccepted memory cannot be fixed up: it ends the guest).
    /// Each unit is accepted exactly once, whatever the number of CPUs
    /// asking at once: one accepts it, the others wait until it is done.
    /// Call it from the page allocator before handing out memory. Units
    /// outside the bitmap, or with no bitmap at all, count as accepted.
    /// After a failure it takes the poisoned frames out of reach as a
    /// conversion would, so it may call the frame source (holding no lock
    /// and no unit, so the frame source may accept memory itself) and shoot
    /// down TLBs: call it where a conversion may be called.
    ///
    /// On an error, units accepted before it stay accepted.
    pub fn accept(&self, pa: u64, len: u64) -> Result<AcceptReport, AcceptMemoryError> {
        let end = pa
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(AcceptMemoryError::InvalidRange { pa, len })?;
        let Some(bitmap) = self.unaccepted.as_ref() else {
            return Ok(AcceptReport::default());
        };
        let units = bitmap.units_touching(pa, guarded_end(end, bitmap.unit_size()));
        if !units.clone().any(|u| bitmap.is_unaccepted(u)) {
            return Ok(AcceptReport::default());
        }
        self.check_window()?;
        let mut report = AcceptReport::default();
        let mut run: Option<Range<u64>> = None;
        for u in units {
            loop {
                match self.unit_state(bitmap, u) {
                    None | Some(Unit::Accepted) => break,
                    Some(Unit::Unaccepted) => {
                        if run.as_ref().is_some_and(|r| !self.joins(bitmap, r, u)) {
                            // Sent before `u` is claimed: a failure's clean-up
                            // calls the frame source and shoots down TLBs, so
                            // it must run holding no unit.
                            self.flush_run(bitmap, run.take(), &mut report)?;
                            continue;
                        }
                        if self
                            .states
                            .claim_code(bitmap.unit_pa(u), Code::Unaccepted, Code::Accepting)
                            .is_ok()
                        {
                            run = Some(run.map_or(u..u + 1, |r| r.start..u + 1));
                            break;
                        }
                    }
                    Some(Unit::Busy) => {
                        // Wait holding no claim of our own.
                        self.flush_run(bitmap, run.take(), &mut report)?;
                        crate::sync::spin_loop();
                    }
                    Some(Unit::Poisoned) => {
                        self.flush_run(bitmap, run.take(), &mut report)?;
                        return Err(AcceptMemoryError::Poisoned { pa: bitmap.unit_pa(u) });
                    }
                    Some(Unit::Uncovered) => {
                        self.flush_run(bitmap, run.take(), &mut report)?;
                        return Err(AcceptMemoryError::Uncovered { pa: bitmap.unit_pa(u) });
                    }
                }
            }
        }
        self.flush_run(bitmap, run, &mut report)?;
        Ok(report)
    }

    /// Accepts every unaccepted unit, for an OS that accepts all memory at
    /// boot. Call it on each of `cpus` CPUs at once, with `cpu` from 0 to
    /// `cpus - 1`: each starts at its own share of the bitmap and goes on
    /// to whatever is left, skipping units another CPU holds, so the work
    /// spreads over the CPUs without any unit accepted twice. Everything is
    /// accepted once every CPU has returned.
    ///
    /// A failed unit does not stop the others: the first failure is
    /// returned at the end, with `accepted` counting every unit this CPU
    /// accepted.
    pub fn accept_all(&self, cpu: usize, cpus: usize) -> Result<AcceptReport, AcceptMemoryError> {
        let Some(bitmap) = self.unaccepted.as_ref() else {
            return Ok(AcceptReport::default());
        };
        if bitmap.count() == 0 {
            return Ok(AcceptReport::default());
        }
        self.check_window()?;
        let n = bitmap.units();
        let (lo, hi) = bitmap.unaccepted_span();
        let share = (hi - lo) / cpus.max(1) as u64;
        let mut start = lo + share * cpu.min(cpus) as u64;
        // Shares at least a call long start on call boundaries, so 1 GiB
        // pieces stay whole.
        let call = self.platform.accept_call_bytes().max(bitmap.unit_size());
        if call.is_power_of_two() && share >= call / bitmap.unit_size() {
            while start > lo && bitmap.unit_pa(start) % call != 0 {
                start -= 1;
            }
        }
        let mut report = AcceptReport::default();
        let mut first_error = None;
        let mut send = |run: &mut Option<Range<u64>>, report: &mut AcceptReport| {
            if let Err(e) = self.flush_run(bitmap, run.take(), report) {
                first_error.get_or_insert(e);
            }
        };
        let mut run: Option<Range<u64>> = None;
        for u in (start..n).chain(0..start) {
            let unaccepted = matches!(self.unit_state(bitmap, u), Some(Unit::Unaccepted));
            // The run goes when `u` cannot join it (across the wrap too),
            // and before `u` is claimed, as in `accept`.
            if !unaccepted || run.as_ref().is_some_and(|r| !self.joins(bitmap, r, u)) {
                send(&mut run, &mut report);
            }
            let claimed = unaccepted
                && self
                    .states
                    .claim_code(bitmap.unit_pa(u), Code::Unaccepted, Code::Accepting)
                    .is_ok();
            if claimed {
                run = Some(run.map_or(u..u + 1, |r| r.start..u + 1));
            }
        }
        send(&mut run, &mut report);
        match first_error {
            Some(AcceptMemoryError::Platform {
                error,
                pa,
                poisoned,
                left_mapped,
                ..
            }) => Err(AcceptMemoryError::Platform {
                error,
                pa,
                poisoned,
                accepted: report.units,
                left_mapped,
            }),
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Whether unit `u` may join `run`: runs are contiguous and stay within
    /// one of the platform's calls ([`Platform::accept_call_bytes`]).
    fn joins(&self, bitmap: &UnacceptedBitmap<'_>, run: &Range<u64>, u: u64) -> bool {
        let call = self.platform.accept_call_bytes().max(bitmap.unit_size());
        // A power-of-two call size is the platform's largest page (1 GiB on
        // TDX): runs break where one begins, so it stays whole. Otherwise
        // only the length counts (SEV-SNP: entries per exit).
        let boundary = call.is_power_of_two() && bitmap.unit_pa(u) % call == 0;
        run.end == u && bitmap.unit_pa(u) - bitmap.unit_pa(run.start) < call && !boundary
    }

    /// Accepts the claimed units of `run` in one platform call and settles
    /// them: accepted, or poisoned from the point of failure on. The caller
    /// holds no other unit: after a failure this takes the poisoned frames
    /// out of reach, which may call the frame source and shoot down TLBs.
    fn flush_run(
        &self,
        bitmap: &UnacceptedBitmap<'_>,
        run: Option<Range<u64>>,
        report: &mut AcceptReport,
    ) -> Result<(), AcceptMemoryError> {
        let Some(run) = run.filter(|r| !r.is_empty()) else {
            return Ok(());
        };
        let (start, end) = (bitmap.unit_pa(run.start), bitmap.unit_pa(run.end));
        // SAFETY: the units are claimed: nothing else accepts or converts
        // their frames, and the OS does not touch unaccepted memory.
        let result = unsafe { self.platform_accept(start, end - start) };
        let accepted_below = match result {
            Ok(()) => end,
            // Never beyond this run's own units.
            Err(AcceptFailure { accepted_below, .. }) => bitmap.unit_pa(
                bitmap
                    .units_touching(accepted_below, accepted_below)
                    .start
                    .clamp(run.start, run.end),
            ),
        };
        let unit = bitmap.unit_size();
        let accepted = bitmap.units_touching(start, accepted_below);
        for u in accepted.clone() {
            let first = bitmap.unit_pa(u);
            self.settle_frames(first + PAGE..first + unit, Code::Private);
            // The bit before the lock: a CPU waiting on the lock finds the
            // bit clear once it may go on.
            bitmap.clear(u);
            self.states.settle(first, Code::Private);
        }
        let units = accepted.end - accepted.start;
        report.units += units;
        Counters::add(&self.counters.units_accepted, units);
        let Err(failure) = result else { return Ok(()) };
        // The bits stay set: the units are not accepted, and a next kernel
        // must not take them for usable memory.
        if accepted_below < end {
            self.settle_frames(accepted_below + PAGE..end, Code::Poisoned);
            self.states.settle(accepted_below, Code::Poisoned);
        }
        Err(self.failed(failure.error, accepted_below..end, report.units))
    }

    /// Accepts an edge of a recorded range that fills no unit: claimed
    /// private frames, settled. On a failure, returns what failed and the
    /// frames now poisoned.
    fn accept_edge(&self, edge: Range<u64>) -> Result<(), (PlatformError, Range<u64>)> {
        // SAFETY: the frames are claimed, and the OS does not touch memory
        // it is recording as unaccepted.
        match unsafe { self.platform_accept(edge.start, edge.end - edge.start) } {
            Ok(()) => {
                self.settle_frames(edge, Code::Private);
                Ok(())
            }
            Err(failure) => {
                let bad = failure.accepted_below.clamp(edge.start, edge.end) & !(PAGE - 1);
                self.settle_frames(edge.start..bad, Code::Private);
                self.settle_frames(bad..edge.end, Code::Poisoned);
                Err((failure.error, bad..edge.end))
            }
        }
    }

    /// After a failure whose `poisoned` frames are marked so already: takes
    /// them out of reach, counts the failure, applies the failure policy
    /// (which knows conversions' errors: it sees one), and returns the
    /// error for the caller.
    fn failed(&self, error: PlatformError, poisoned: Range<u64>, accepted: u64) -> AcceptMemoryError {
        let left_mapped = match self.unmap_poisoned(poisoned.clone()) {
            Ok(()) => false,
            Err(why) => {
                log::error!("poisoned frames {poisoned:#x?} left mapped: {why}");
                true
            }
        };
        Counters::add(&self.counters.failures, 1);
        let (pa, frames) = (poisoned.start, (poisoned.end - poisoned.start) / PAGE);
        let as_conversion = ConvertError::Platform {
            error,
            pa,
            poisoned: frames,
            converted: 0,
        };
        log::error!("accepting memory failed, frames poisoned: {as_conversion:?}");
        if let FailureAction::Terminate { reason } = self.policy.on_failure(&as_conversion) {
            self.platform.terminate(reason);
        }
        AcceptMemoryError::Platform {
            error,
            pa,
            poisoned: frames,
            accepted,
            left_mapped,
        }
    }

    fn unit_state(&self, bitmap: &UnacceptedBitmap<'_>, u: u64) -> Option<Unit> {
        if !bitmap.is_unaccepted(u) {
            return None;
        }
        let first = bitmap.unit_pa(u);
        if self.states.first_uncovered(first, bitmap.unit_size()).is_some() {
            return Some(Unit::Uncovered);
        }
        Some(match self.states.code(first) {
            Some(Code::Unaccepted) => Unit::Unaccepted,
            Some(Code::Accepting) => Unit::Busy,
            Some(Code::Poisoned) | None => Unit::Poisoned,
            Some(_) => Unit::Accepted,
        })
    }

    fn check_window(&self) -> Result<(), AcceptMemoryError> {
        let tables = self.tables();
        if self.platform.needs_private_map() && self.window.and_then(|w| WindowMap::new(&tables, w)).is_none() {
            return Err(AcceptMemoryError::NoScratchWindow);
        }
        Ok(())
    }

    /// [`Platform::accept`] with this CPU's scratch window.
    ///
    /// # Safety
    ///
    /// As for [`Platform::accept`].
    unsafe fn platform_accept(&self, pa: u64, len: u64) -> Result<(), AcceptFailure> {
        let tables = self.tables();
        let mut window = self.window.and_then(|w| WindowMap::new(&tables, w));
        let window = window.as_mut().map(|w| w as &mut dyn PrivateMap);
        // SAFETY: forwarded to the caller.
        unsafe { self.platform.accept(pa, len, window, &self.counters) }
    }

    /// Marks every frame of the unit at `pa` unaccepted: all private, or
    /// none changes.
    fn mark_unit_unaccepted(&self, pa: u64, unit: u64) -> Result<(), AcceptMemoryError> {
        if let Some(pa) = self.states.first_uncovered(pa, unit) {
            return Err(AcceptMemoryError::Uncovered { pa });
        }
        for frame in (pa..pa + unit).step_by(PAGE as usize) {
            if let Err(state) = self.states.claim_code(frame, Code::Private, Code::Unaccepted) {
                self.settle_frames(pa..frame, Code::Private);
                return Err(AcceptMemoryError::NotPrivate { pa: frame, state });
            }
        }
        Ok(())
    }

    fn unmark_unit(&self, pa: u64, unit: u64) {
        self.settle_frames(pa..pa + unit, Code::Private);
    }

    /// Claims private frames for an edge acceptance: all, or none.
    fn claim_frames(&self, frames: Range<u64>) -> Result<(), AcceptMemoryError> {
        for frame in frames.clone().step_by(PAGE as usize) {
            if let Err(state) = self.states.claim_code(frame, Code::Private, Code::Claimed) {
                self.settle_frames(frames.start..frame, Code::Private);
                return Err(AcceptMemoryError::NotPrivate { pa: frame, state });
            }
        }
        Ok(())
    }

    fn settle_frames(&self, frames: Range<u64>, to: Code) {
        for frame in frames.step_by(PAGE as usize) {
            self.states.settle(frame, to);
        }
    }
}
