//! The conversion transaction: claim, plan and reserve, split and make not
//! present, one shootdown, the platform's calls, present again with the new
//! attribute, collapse, settle.
//!
//! Each frame's progress is kept in its state byte (claimed, unmapped,
//! sent, restored), so every pass over a vmalloc-style range can walk its
//! entries again, meet a frame mapped twice only once, and tell after a
//! host failure exactly which frames were converted, which are poisoned
//! and which never reached the host.

use super::frames::{decode, extent, for_each_chunk, Chunk, Frames};
use super::{ConvertError, Engine, Report, PAGE};
use crate::aliases::{virtual_of, Linear, Linears};
use crate::deferred::Deferred;
use crate::leaves::{self, pieces, Mapping};
use crate::platform::{Platform, PlatformError, PrivateMap, Runs};
use crate::policy::FailureAction;
use crate::pte::Visibility;
use crate::reserve::{FrameSource, Reserve, ReserveError};
use crate::shootdown::{ShootdownSet, TlbShootdown};
use crate::split::{split_at, tables_needed};
use crate::state::{Code, Hole, PageState};
use crate::tables::{PhysMem, Tables};
use crate::window::WindowMap;

/// One conversion.
pub(super) struct Tx<'s> {
    pub frames: Frames,
    pub to: Visibility,
    pub linears: Linears<'s>,
}

impl Tx<'_> {
    fn from(&self) -> Visibility {
        self.to.other()
    }

    fn mapped(&self) -> bool {
        matches!(self.frames, Frames::Mapped { .. })
    }
}

pub(super) fn hole_of(kind: Linear) -> Hole {
    match kind {
        Linear::DirectMap => Hole::DirectMap,
        Linear::Registered(_) => Hole::Registered,
    }
}

/// Calls `f` with each maximal run of frames of `runs` that `advance`
/// accepts (all of them without a filter).
fn for_runs_where(runs: Runs<'_>, mut accept: impl FnMut(u64) -> bool, mut f: impl FnMut(u64, u64)) {
    let mut open: Option<(u64, u64)> = None;
    for frame in runs.frames() {
        if !accept(frame) {
            if let Some((pa, len)) = open.take() {
                f(pa, len);
            }
            continue;
        }
        open = match open {
            Some((pa, len)) if pa + len == frame => Some((pa, len + PAGE)),
            Some((pa, len)) => {
                f(pa, len);
                Some((frame, PAGE))
            }
            None => Some((frame, PAGE)),
        };
    }
    if let Some((pa, len)) = open {
        f(pa, len);
    }
}

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    pub(super) fn transaction(
        &self,
        frames: Frames,
        to: Visibility,
        linears: Linears<'_>,
        scratch: &mut [u64],
    ) -> Result<Report, ConvertError> {
        let tx = Tx { frames, to, linears };
        let tables = self.tables();
        if self.platform.needs_private_map() && self.window.and_then(|w| WindowMap::new(&tables, w)).is_none() {
            return Err(ConvertError::NoScratchWindow);
        }
        self.claim(&tx)?;
        let (mut reserve, mut deferred) = match self.prepare(&tx, scratch) {
            Ok(ready) => ready,
            Err(e) => {
                self.release_claims(&tx);
                return Err(e);
            }
        };
        let mut shootdown = ShootdownSet::new();
        self.unmap_all(&tx, scratch, &mut reserve, &mut shootdown);
        // Tables earlier collapses left go in the same shootdown.
        let pending = (!deferred.is_empty()).then(|| core::mem::replace(&mut *deferred, Deferred::new()));
        if let Some(p) = &pending {
            p.add_regions(&self.mem, &mut shootdown);
        }
        drop(deferred);
        reserve.release(&self.mem, &self.frames, &self.states);
        if !shootdown.is_empty() {
            self.shootdown(shootdown.ranges());
        }
        if let Some(p) = pending {
            self.free_tables(p);
        }

        // From here on no alias of the frames is present: a stray access
        // takes an ordinary #PF.
        let sent = self.send(&tx, scratch);
        {
            let _lock = self.tables_lock.lock();
            self.restore_all(&tx, scratch, sent.is_ok());
        }
        self.collapse_all(&tx, scratch);
        self.settle_all(&tx, scratch, sent.is_ok());
        match sent {
            Ok(frames) => Ok(Report { frames }),
            Err(err) => {
                crate::counters::Counters::add(&self.counters.failures, 1);
                log::error!("conversion failed, frames poisoned: {err:?}");
                if let FailureAction::Terminate { reason } = self.policy.on_failure(&err) {
                    self.platform.terminate(reason);
                }
                Err(err)
            }
        }
    }

    /// Claims every frame, or none.
    fn claim(&self, tx: &Tx<'_>) -> Result<(), ConvertError> {
        let from = Code::settled(tx.from());
        match tx.frames {
            Frames::Linear { pa, len } => {
                if let Some(pa) = self.states.first_uncovered(pa, len) {
                    return Err(ConvertError::UnknownFrame { pa });
                }
                for frame in (pa..pa + len).step_by(PAGE as usize) {
                    if let Err(found) = self.states.claim(frame, from) {
                        for claimed in (pa..frame).step_by(PAGE as usize) {
                            self.states.settle(claimed, from);
                        }
                        return Err(ConvertError::Refused {
                            pa: frame,
                            state: found.unwrap_or(PageState::Poisoned),
                        });
                    }
                }
                Ok(())
            }
            Frames::Mapped { va, len } => {
                let tables = self.tables();
                let walked = pieces(&tables, va, len, true, |p| {
                    for (i, frame) in (p.pa..p.pa + p.len).step_by(PAGE as usize).enumerate() {
                        let at = p.va + i as u64 * PAGE;
                        match self.states.claim(frame, from) {
                            Ok(()) => {}
                            // Mapped earlier in this range: claimed by us.
                            Err(Some(PageState::Converting)) if self.maps_before(&tables, va, at, frame) => {}
                            Err(None) => return Err((at, ConvertError::UnknownFrame { pa: frame })),
                            Err(Some(state)) => return Err((at, ConvertError::Refused { pa: frame, state })),
                        }
                    }
                    Ok(())
                });
                let (stop, err) = match walked {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(hole)) => (hole, ConvertError::NotMapped { va: hole }),
                    Err(failed) => failed,
                };
                self.release_mapped(&tables, va, stop - va, from);
                Err(err)
            }
        }
    }

    /// Whether a present leaf of `[va, upto)` maps `frame`.
    fn maps_before(&self, tables: &Tables<'_, M>, va: u64, upto: u64, frame: u64) -> bool {
        let found = pieces(tables, va, upto - va, true, |p| {
            if (p.pa..p.pa + p.len).contains(&frame) {
                Err(())
            } else {
                Ok(())
            }
        });
        found.is_err()
    }

    fn release_mapped(&self, tables: &Tables<'_, M>, va: u64, len: u64, from: Code) {
        let _ = pieces(tables, va, len, true, |p| -> Result<(), ()> {
            for frame in (p.pa..p.pa + p.len).step_by(PAGE as usize) {
                self.states.settle(frame, from);
            }
            Ok(())
        });
    }

    fn release_claims(&self, tx: &Tx<'_>) {
        let from = Code::settled(tx.from());
        match tx.frames {
            Frames::Linear { pa, len } => {
                for frame in (pa..pa + len).step_by(PAGE as usize) {
                    self.states.settle(frame, from);
                }
            }
            Frames::Mapped { va, len } => self.release_mapped(&self.tables(), va, len, from),
        }
    }

    /// Reserves the table pages the splits need and takes the table lock.
    /// The frame source is called without the lock; the plan is made again
    /// if leaves were merged meanwhile (splits by others only lower it).
    fn prepare(
        &self,
        tx: &Tx<'_>,
        scratch: &mut [u64],
    ) -> Result<(Reserve, spin::MutexGuard<'_, Deferred>), ConvertError> {
        let mut reserve = Reserve::new();
        loop {
            let merges = self.merges.load(core::sync::atomic::Ordering::Acquire);
            let needed = self.plan(tx, scratch);
            if let Err(e) = reserve.fill_to(needed, &self.mem, &self.frames, &self.states) {
                reserve.release(&self.mem, &self.frames, &self.states);
                return Err(match e {
                    ReserveError::Exhausted => ConvertError::OutOfTableMemory { needed },
                    ReserveError::Unusable { pa, .. } => ConvertError::UnusableTableFrame { pa },
                });
            }
            let lock = self.tables_lock.lock();
            if self.merges.load(core::sync::atomic::Ordering::Acquire) == merges {
                return Ok((reserve, lock));
            }
            // Every round means another CPU finished a merge: the system
            // progresses even if this conversion plans again.
        }
    }

    /// An upper bound on the table pages the splits need: each linear
    /// alias's boundaries, chunk by chunk, and a mapped range's ends.
    fn plan(&self, tx: &Tx<'_>, scratch: &mut [u64]) -> usize {
        let tables = self.tables();
        let mut needed = 0;
        let _ = for_each_chunk(&tables, tx.frames, scratch, |chunk: Chunk<'_>| -> Result<(), ()> {
            let runs = chunk.runs();
            for (_, alias) in tx.linears.iter() {
                let boundaries = runs
                    .iter()
                    .filter_map(|(pa, len)| virtual_of(alias, pa, len))
                    .flat_map(|(va, len)| [va, va + len]);
                needed += tables_needed(&tables, boundaries);
            }
            Ok(())
        });
        if let Frames::Mapped { va, len } = tx.frames {
            needed += tables_needed(&tables, [va, va + len].into_iter());
        }
        needed
    }

    fn split_range(&self, tables: &Tables<'_, M>, va: u64, len: u64, reserve: &mut Reserve) {
        let split =
            split_at(tables, va, reserve, &self.counters) && split_at(tables, va + len, reserve, &self.counters);
        debug_assert!(split, "the plan reserved every table a split needs");
    }

    /// Under the table lock: splits, then makes every alias of every frame
    /// not present.
    fn unmap_all(&self, tx: &Tx<'_>, scratch: &mut [u64], reserve: &mut Reserve, shootdown: &mut ShootdownSet) {
        let tables = self.tables();
        let mapped = tx.mapped();
        let _ = for_each_chunk(&tables, tx.frames, scratch, |chunk: Chunk<'_>| -> Result<(), ()> {
            let fresh = |frame| !mapped || self.states.advance(frame, Code::Claimed, Code::Unmapped);
            for_runs_where(chunk.runs(), fresh, |pa, len| {
                for (kind, alias) in tx.linears.iter() {
                    if let Some((va, vlen)) = virtual_of(alias, pa, len) {
                        self.split_range(&tables, va, vlen, reserve);
                        let mapping = Mapping::Linear(alias, hole_of(kind));
                        leaves::unmap(&tables, &self.states, mapping, va, vlen, &self.counters);
                        shootdown.add(va, vlen);
                    }
                }
            });
            Ok(())
        });
        if let Frames::Mapped { va, len } = tx.frames {
            self.split_range(&tables, va, len, reserve);
            leaves::unmap(&tables, &self.states, Mapping::Entries, va, len, &self.counters);
            shootdown.add(va, len);
        }
    }

    /// The platform's calls. Returns the frames converted; on failure the
    /// frames of the failed call are poisoned, and frames of a mapped range
    /// not yet sent stay unmapped (to be restored as they were).
    fn send(&self, tx: &Tx<'_>, scratch: &mut [u64]) -> Result<u64, ConvertError> {
        let tables = self.tables();
        let mut window = self.window.and_then(|w| WindowMap::new(&tables, w));
        let mut converted = 0;
        let mut call = |runs: Runs<'_>| -> Result<(), (PlatformError, u64, u64)> {
            let window = window.as_mut().map(|w| w as &mut dyn PrivateMap);
            // SAFETY: every alias of every frame in `runs` is not present,
            // the shootdown has completed, and the frames are claimed by
            // this transaction: nothing can rely on their contents.
            let result = unsafe { self.platform.convert(runs, tx.to, window, &self.counters) };
            match result {
                Ok(()) => {
                    converted += runs.bytes() / PAGE;
                    Ok(())
                }
                Err(error) => {
                    for frame in runs.frames() {
                        self.states.settle(frame, Code::Poisoned);
                    }
                    let first = runs.iter().next().map_or(0, |(pa, _)| pa);
                    Err((error, first, runs.bytes() / PAGE))
                }
            }
        };
        let result = for_each_chunk(&tables, tx.frames, scratch, |chunk| match chunk {
            Chunk::One { pa, len } => call(Runs::One { pa, len }),
            Chunk::Extents(extents) => send_fresh(
                extents,
                |f| self.states.advance(f, Code::Unmapped, Code::Sent),
                &mut call,
            ),
        });
        result
            .map(|()| converted)
            .map_err(|(error, pa, poisoned)| ConvertError::Platform {
                error,
                pa,
                poisoned,
                converted,
            })
    }

    /// Under the table lock: every alias present again, with the new
    /// attribute for converted frames and the old one for frames the host
    /// never saw; poisoned frames and the OS's holes stay not present.
    fn restore_all(&self, tx: &Tx<'_>, scratch: &mut [u64], sent_all: bool) {
        let tables = self.tables();
        let restore_linears = |pa: u64, len: u64, side: Visibility| {
            for (kind, alias) in tx.linears.iter() {
                if let Some((va, vlen)) = virtual_of(alias, pa, len) {
                    let mapping = Mapping::Linear(alias, hole_of(kind));
                    leaves::restore(
                        &tables,
                        &self.states,
                        mapping,
                        va,
                        vlen,
                        |_, _| Some(side),
                        &self.counters,
                    );
                }
            }
        };
        match tx.frames {
            Frames::Linear { pa, len } => {
                if sent_all {
                    restore_linears(pa, len, tx.to);
                }
            }
            Frames::Mapped { va, len } => {
                for side in [tx.to, tx.from()] {
                    let (before, after) = if side == tx.to {
                        (Code::Sent, Code::RestoredNew)
                    } else {
                        (Code::Unmapped, Code::RestoredOld)
                    };
                    let _ = for_each_chunk(&tables, tx.frames, scratch, |chunk: Chunk<'_>| -> Result<(), ()> {
                        let moved = |frame| self.states.advance(frame, before, after);
                        for_runs_where(chunk.runs(), moved, |pa, len| restore_linears(pa, len, side));
                        Ok(())
                    });
                }
                let side = |pa: u64, bytes: u64| self.uniform_side(tx, pa, bytes);
                leaves::restore(&tables, &self.states, Mapping::Entries, va, len, side, &self.counters);
            }
        }
    }

    /// The side to map a leaf of a mapped range with: all its frames
    /// restored the same way, else none (a poisoned frame keeps the leaf
    /// not present).
    fn uniform_side(&self, tx: &Tx<'_>, pa: u64, bytes: u64) -> Option<Visibility> {
        let side_of = |frame| match self.states.code(frame) {
            Some(Code::RestoredNew) => Some(tx.to),
            Some(Code::RestoredOld) => Some(tx.from()),
            _ => None,
        };
        let first = side_of(pa)?;
        (pa..pa + bytes)
            .step_by(PAGE as usize)
            .all(|f| side_of(f) == Some(first))
            .then_some(first)
    }

    /// Every frame's final state (clearing its in-flight marks).
    fn settle_all(&self, tx: &Tx<'_>, scratch: &mut [u64], sent_all: bool) {
        let to = Code::settled(tx.to);
        let from = Code::settled(tx.from());
        match tx.frames {
            Frames::Linear { pa, len } => {
                if sent_all {
                    for frame in (pa..pa + len).step_by(PAGE as usize) {
                        self.states.settle(frame, to);
                    }
                }
            }
            Frames::Mapped { .. } => {
                let _ = for_each_chunk(
                    &self.tables(),
                    tx.frames,
                    scratch,
                    |chunk: Chunk<'_>| -> Result<(), ()> {
                        for frame in chunk.runs().frames() {
                            match self.states.code(frame) {
                                Some(Code::RestoredNew) => self.states.settle(frame, to),
                                Some(Code::RestoredOld) => self.states.settle(frame, from),
                                _ => {}
                            }
                        }
                        Ok(())
                    },
                );
            }
        }
    }
}

/// Rewrites `extents` in place into the frames `fresh` accepts (each
/// moved to sent once, however often the range maps it) and calls `call`
/// with them, as often as the rewritten list outgrows what was read.
fn send_fresh<E>(
    extents: &mut [u64],
    mut fresh: impl FnMut(u64) -> bool,
    call: &mut impl FnMut(Runs<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut w: usize = 0;
    for r in 0..extents.len() {
        let (pa, len) = decode(extents[r]);
        for frame in (pa..pa + len).step_by(PAGE as usize) {
            if !fresh(frame) {
                continue;
            }
            if let Some(last) = w.checked_sub(1).map(|i| extents[i]) {
                let (lpa, llen) = decode(last);
                if lpa + llen == frame && llen < 4096 * PAGE {
                    extents[w - 1] = extent(lpa, llen / PAGE + 1);
                    continue;
                }
            }
            // Slots up to `r` are read; a new extent past them would
            // overwrite unread ones: send what is ready first.
            if w > r {
                call(Runs::Extents(&extents[..w]))?;
                w = 0;
            }
            extents[w] = extent(frame, 1);
            w += 1;
        }
    }
    if w > 0 {
        call(Runs::Extents(&extents[..w]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn send_fresh_sends_each_frame_once_in_order() {
        // 0x1000..0x4000, a duplicate of 0x2000 seen already, 0x10000.
        let mut extents = [extent(0x1000, 3), extent(0x10000, 1)];
        let mut seen = std::collections::BTreeSet::new();
        seen.insert(0x2000u64);
        let mut calls: Vec<Vec<(u64, u64)>> = Vec::new();
        send_fresh(
            &mut extents,
            |f| seen.insert(f),
            &mut |runs: Runs<'_>| -> Result<(), ()> {
                calls.push(runs.iter().collect());
                Ok(())
            },
        )
        .unwrap();
        let all: Vec<(u64, u64)> = calls.concat();
        assert_eq!(all, [(0x1000, 0x1000), (0x3000, 0x1000), (0x10000, 0x1000)]);
    }
}
