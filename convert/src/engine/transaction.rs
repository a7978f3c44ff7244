//! The conversion transaction: claim, plan and reserve, split and make not
//! present, one shootdown, the platform's calls, present again with the new
//! attribute, collapse, settle.
//!
//! Each frame's progress is kept in its state byte (claimed, unmapped,
//! sent, restored), so every pass over a vmalloc-style range can walk its
//! entries again, meet a frame mapped twice only once, and tell after a
//! host failure exactly which frames were converted, which are poisoned
//! and which never reached the host. A frame list, sent in several
//! requests, keeps its progress the same way.

use super::frames::{for_each_chunk, Chunk, Frames};
use core::sync::atomic::Ordering;

use super::table_lock::TableGuard;

use super::{ConvertError, Engine, Report, PAGE};
use crate::aliases::{virtual_of, Linear, Linears};
use crate::deferred::Deferred;
use crate::leaves::{self, pieces, Mapping};
use crate::platform::{decode, extent, Platform, PlatformError, PrivateMap, Runs, EXTENT_PAGES};
use crate::policy::FailureAction;
use crate::pte::{Level, Visibility, PRESENT};
use crate::reserve::{FrameSource, Reserve, ReserveError};
use crate::shootdown::{ShootdownSet, TlbShootdown};
use crate::split::{split_at, tables_needed, SplitCount};
use crate::state::{Code, Hole, PageState};
use crate::tables::{PhysMem, Tables};
use crate::window::WindowMap;
use crate::MAX_ALIASES;

/// One conversion.
pub(super) struct Tx<'s> {
    pub frames: Frames<'s>,
    pub to: Visibility,
    pub linears: Linears<'s>,
}

impl Tx<'_> {
    fn from(&self) -> Visibility {
        self.to.other()
    }

    /// Whether each frame keeps its progress in its state byte: a linear
    /// run goes to the host in one call and moves as one.
    fn per_frame(&self) -> bool {
        !matches!(self.frames, Frames::Linear { .. })
    }
}

pub(super) fn hole_of(kind: Linear) -> Hole {
    match kind {
        Linear::DirectMap => Hole::DirectMap,
        Linear::Registered(_) => Hole::Registered,
    }
}

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    pub(super) fn transaction(
        &self,
        frames: Frames<'_>,
        to: Visibility,
        linears: Linears<'_>,
        scratch: &mut [u64],
    ) -> Result<Report, ConvertError> {
        let tx = Tx { frames, to, linears };
        let tables = self.tables();
        if self.platform.needs_private_map() && self.window.and_then(|w| WindowMap::new(&tables, w)).is_none() {
            return Err(ConvertError::NoScratchWindow);
        }
        // Every walk of live tables runs under the table lock: another CPU's
        // collapse may free a table page once a shootdown has run, and a
        // shootdown protects the hardware's walkers, not this code's.
        let lock = self.tables_lock.lock();
        self.claim(&tx)?;
        if let Err(error) = self.check_caller_memory(&tables, &tx, scratch) {
            self.release_claims(&tx);
            return Err(error);
        }
        let (lock, reserved) = self.reserve_splits(&tx, scratch, lock);
        let reserve = match reserved {
            Ok(reserve) => reserve,
            Err((error, mut reserve)) => {
                self.release_claims(&tx);
                drop(lock);
                reserve.release(&self.mem, &self.frames, &self.states);
                return Err(error);
            }
        };
        self.unmap_and_shoot(&tx, scratch, reserve, lock);

        // From here on no alias of the frames is present: a stray access
        // takes an ordinary #PF.
        let sent = self.send(&tx, scratch);
        let mut lock = self.tables_lock.lock();
        let extra_poisoned = match sent {
            Err(_) if tx.per_frame() => self.poison_mixed_leaves(&tx, scratch),
            _ => 0,
        };
        let converted = self.restore_all(&tx, scratch, sent.is_ok());
        lock = self.collapse_all(&tx, scratch, lock);
        self.settle_all(&tx, sent.is_ok());
        drop(lock);
        let poisoned = match &sent {
            Ok(()) => 0,
            Err(failure) => failure.frames + extra_poisoned,
        };
        self.count_shared(to, converted, poisoned);
        match sent {
            Ok(()) => Ok(Report { frames: converted }),
            Err(failure) => {
                let err = ConvertError::Platform {
                    error: failure.error,
                    pa: failure.pa,
                    poisoned: failure.frames + extra_poisoned,
                    converted,
                };
                crate::counters::Counters::add(&self.counters.failures, 1);
                log::error!("conversion failed, frames poisoned: {err:?}");
                if let FailureAction::Terminate { reason } = self.policy.on_failure(&err) {
                    self.platform.terminate(reason);
                }
                Err(err)
            }
        }
    }

    /// Fills a reserve with the table pages the splits of `tx` need,
    /// calling the frame source without the table lock (taken and given
    /// back held). On an error the reserve is handed back for release once
    /// the lock is dropped.
    pub(super) fn reserve_splits<'l>(
        &'l self,
        tx: &Tx<'_>,
        scratch: &mut [u64],
        mut lock: TableGuard<'l>,
    ) -> (TableGuard<'l>, Reserved) {
        let mut reserve = Reserve::new();
        loop {
            let needed = self.plan(tx, scratch);
            if reserve.len() >= needed {
                return (lock, Ok(reserve));
            }
            // The plan is made again if leaves were merged meanwhile
            // (splits by others only lower it).
            let merges = self.merges.load(Ordering::Acquire);
            drop(lock);
            let filled = reserve.fill_to(needed, &self.mem, &self.frames, &self.states);
            lock = self.tables_lock.lock();
            if let Err(e) = filled {
                // Another CPU may have made the splits meanwhile: out of
                // pages only if they are still needed.
                if matches!(e, ReserveError::Exhausted) && reserve.len() >= self.plan(tx, scratch) {
                    return (lock, Ok(reserve));
                }
                let error = match e {
                    ReserveError::Exhausted => ConvertError::OutOfTableMemory { needed },
                    ReserveError::Unusable { pa, .. } => ConvertError::UnusableTableFrame { pa },
                };
                return (lock, Err((error, reserve)));
            }
            if self.merges.load(Ordering::Acquire) == merges {
                return (lock, Ok(reserve));
            }
        }
    }

    /// Splits and makes every alias of `tx`'s frames not present under the
    /// table lock, then drops it and runs one shootdown, which also covers
    /// the table pages earlier collapses left; frees those and gives back
    /// what the reserve did not use.
    pub(super) fn unmap_and_shoot(
        &self,
        tx: &Tx<'_>,
        scratch: &mut [u64],
        mut reserve: Reserve,
        mut lock: TableGuard<'_>,
    ) {
        let mut shootdown = ShootdownSet::new();
        self.unmap_all(tx, scratch, &mut reserve, &mut shootdown);
        let pending = (!lock.is_empty()).then(|| core::mem::replace(&mut *lock, Deferred::new()));
        if let Some(p) = &pending {
            p.add_regions(&self.mem, &mut shootdown);
        }
        drop(lock);
        reserve.release(&self.mem, &self.frames, &self.states);
        if !shootdown.is_empty() {
            self.shootdown(shootdown.ranges());
        }
        if let Some(p) = pending {
            self.free_tables(p);
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
            Frames::List(list) => {
                // As for a linear run: an uncovered frame is named before
                // a refused one.
                if let Some(&pa) = list.iter().find(|&&f| self.states.get(f).is_none()) {
                    return Err(ConvertError::UnknownFrame { pa });
                }
                for (i, &frame) in list.iter().enumerate() {
                    if let Err(found) = self.states.claim(frame, from) {
                        for &claimed in &list[..i] {
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
                        match self.states.claim_in_walk(frame, from) {
                            // `Ok(false)`: mapped earlier in this range.
                            Ok(_) => {}
                            Err(None) => return Err((at, ConvertError::UnknownFrame { pa: frame })),
                            Err(Some(state)) => return Err((at, ConvertError::Refused { pa: frame, state })),
                        }
                    }
                    Ok(())
                });
                let (stop, err) = match walked {
                    Ok(Ok(())) => {
                        self.end_claim_walk(&tables, va, len);
                        return Ok(());
                    }
                    Ok(Err(hole)) => (hole, ConvertError::NotMapped { va: hole }),
                    Err(failed) => failed,
                };
                self.release_mapped(&tables, va, stop - va, from);
                Err(err)
            }
        }
    }

    /// Clears the claim walk's marks (settling clears them too).
    fn end_claim_walk(&self, tables: &Tables<'_, M>, va: u64, len: u64) {
        let _ = pieces(tables, va, len, true, |p| -> Result<(), ()> {
            for frame in (p.pa..p.pa + p.len).step_by(PAGE as usize) {
                self.states.end_walk(frame);
            }
            Ok(())
        });
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
            Frames::List(list) => {
                for &frame in list {
                    self.states.settle(frame, from);
                }
            }
            Frames::Mapped { va, len } => self.release_mapped(&self.tables(), va, len, from),
        }
    }

    /// An upper bound on the table pages the splits need: each linear
    /// alias's boundaries, run after run (runs come in address order, so
    /// neighbours share leaves), and a mapped range's ends.
    fn plan(&self, tx: &Tx<'_>, scratch: &mut [u64]) -> usize {
        let tables = self.tables();
        let mut counts = [SplitCount::NONE; 1 + MAX_ALIASES];
        let mut count = |pa: u64, len: u64| {
            for (kind, alias) in tx.linears.iter() {
                let slot = match kind {
                    Linear::DirectMap => 0,
                    Linear::Registered(i) => 1 + i,
                };
                if let Some((va, vlen)) = virtual_of(alias, pa, len) {
                    counts[slot].add(&tables, va);
                    counts[slot].add(&tables, va + vlen);
                }
            }
        };
        self.for_each_run(tx, scratch, |_| true, &mut count);
        let mut needed: usize = counts.iter().map(|c| c.pages).sum();
        if let Frames::Mapped { va, len } = tx.frames {
            needed += tables_needed(&tables, [va, va + len].into_iter());
        }
        needed
    }

    /// Calls `f` with each maximal physical run of the frames `accept`
    /// takes, joined across the chunks of a mapped range in the order it
    /// maps them (a chunk's edge is no run's edge: a range of contiguous
    /// frames splits the direct map only at its ends, whatever the scratch).
    fn for_each_run(
        &self,
        tx: &Tx<'_>,
        scratch: &mut [u64],
        mut accept: impl FnMut(u64) -> bool,
        f: &mut impl FnMut(u64, u64),
    ) {
        let mut open: Option<(u64, u64)> = None;
        let _ = for_each_chunk(
            &self.tables(),
            tx.frames,
            scratch,
            |chunk: Chunk<'_>| -> Result<(), ()> {
                if let Chunk::One { pa, len } = chunk {
                    // A linear conversion: one run, every frame taken.
                    f(pa, len);
                    return Ok(());
                }
                for frame in chunk.runs().frames() {
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
                Ok(())
            },
        );
        if let Some((pa, len)) = open {
            f(pa, len);
        }
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
        let per_frame = tx.per_frame();
        let fresh = |frame| !per_frame || self.states.advance(frame, Code::Claimed, Code::Unmapped);
        self.for_each_run(tx, scratch, fresh, &mut |pa, len| {
            for (kind, alias) in tx.linears.iter() {
                if let Some((va, vlen)) = virtual_of(alias, pa, len) {
                    self.split_range(&tables, va, vlen, reserve);
                    let mapping = Mapping::Linear(alias, hole_of(kind));
                    leaves::unmap(&tables, &self.states, mapping, va, vlen, &self.counters);
                    shootdown.add(va, vlen);
                }
            }
        });
        if let Frames::Mapped { va, len } = tx.frames {
            self.split_range(&tables, va, len, reserve);
            leaves::unmap(&tables, &self.states, Mapping::Entries, va, len, &self.counters);
            shootdown.add(va, len);
        }
    }

    /// The platform's calls, with no lock held (the walks here read only
    /// this conversion's own not-present entries, which nobody else may
    /// change or collapse). On failure the frames of the failed call are
    /// poisoned; frames of a mapped range or a list not yet sent stay
    /// unmapped, to be restored as they were.
    fn send(&self, tx: &Tx<'_>, scratch: &mut [u64]) -> Result<(), Failure> {
        let tables = self.tables();
        let mut window = self.window.and_then(|w| WindowMap::new(&tables, w));
        let mut call = |runs: Runs<'_>| -> Result<(), Failure> {
            let window = window.as_mut().map(|w| w as &mut dyn PrivateMap);
            // SAFETY: every alias of every frame in `runs` is not present,
            // the shootdown has completed, and the frames are claimed by
            // this transaction: nothing can rely on their contents.
            let result = unsafe { self.platform.convert(runs, tx.to, window, &self.counters) };
            result.map_err(|error| {
                for frame in runs.frames() {
                    self.states.poison(frame);
                }
                Failure {
                    error,
                    pa: runs.iter().next().map_or(0, |(pa, _)| pa),
                    frames: runs.bytes() / PAGE,
                }
            })
        };
        for_each_chunk(&tables, tx.frames, scratch, |chunk| match chunk {
            Chunk::One { pa, len } => call(Runs::One { pa, len }),
            Chunk::Extents(extents) => send_fresh(
                extents,
                |f| self.states.code(f) == Some(Code::Unmapped),
                |f| {
                    self.states.advance(f, Code::Unmapped, Code::Sent);
                },
                &mut call,
            ),
            Chunk::List(mut rest) => {
                while !rest.is_empty() {
                    // One request's worth a call: a failure poisons no
                    // frame another request would have carried.
                    let take = self.platform.request_frames(Runs::Extents(rest));
                    let (batch, after) = rest.split_at(take.clamp(1, rest.len()));
                    for &frame in batch {
                        self.states.advance(frame, Code::Unmapped, Code::Sent);
                    }
                    call(Runs::Extents(batch))?;
                    rest = after;
                }
                Ok(())
            }
        })
    }

    /// After a failure: a huge leaf the conversion made not present (in
    /// the mapped range, the direct map or a registered alias) whose frames
    /// did not all reach the same state (a list's request may end inside
    /// one) can be mapped neither way, so all its frames are poisoned (and
    /// never mapped again). Poisoning one leaf can mix another that
    /// overlaps it, so this runs until nothing changes. Returns how many
    /// more frames it poisoned.
    fn poison_mixed_leaves(&self, tx: &Tx<'_>, scratch: &mut [u64]) -> u64 {
        let tables = self.tables();
        let mut total = 0;
        loop {
            let mut poisoned = 0;
            let mut settle_leaf = |first: u64, bytes: u64| {
                let frames = (first..first + bytes).step_by(PAGE as usize);
                let code = self.states.code(first);
                if frames.clone().any(|f| self.states.code(f) != code) {
                    for f in frames {
                        if self.states.code(f) != Some(Code::Poisoned) {
                            // Keeping its hole marks: this loop reads them
                            // for the frames it meets later.
                            self.states.poison(f);
                            poisoned += 1;
                        }
                    }
                }
            };
            let mut huge_leaves = |range_va: u64, range_len: u64, linear: Option<(crate::aliases::Alias, Hole)>| {
                leaves::for_each_entry(&tables, range_va, range_len, |level, slot, cursor, _| {
                    let entry = slot.load(Ordering::Acquire);
                    if level == Level::Pt || entry & PRESENT != 0 || !leaves::is_leaf(level, entry) {
                        return;
                    }
                    let span = level.span();
                    let first = match linear {
                        // The OS's own not-present leaf is no leaf of ours.
                        Some((alias, hole)) if self.states.is_hole(alias.pa + (cursor - alias.va), hole) => return,
                        Some((alias, _)) => alias.pa + (cursor / span * span - alias.va),
                        None => tables.enc.address(entry, level),
                    };
                    settle_leaf(first, span);
                });
            };
            if let Frames::Mapped { va, len } = tx.frames {
                huge_leaves(va, len, None);
            }
            self.for_each_run(tx, scratch, |_| true, &mut |pa, plen| {
                for (kind, alias) in tx.linears.iter() {
                    if let Some((lva, llen)) = virtual_of(alias, pa, plen) {
                        huge_leaves(lva, llen, Some((alias, hole_of(kind))));
                    }
                }
            });
            total += poisoned;
            if poisoned == 0 {
                return total;
            }
        }
    }

    /// Under the table lock: every alias present again, with the new
    /// attribute for converted frames and the old one for frames the host
    /// never saw; poisoned frames and the OS's holes stay not present.
    /// Returns the frames converted (each counted once).
    fn restore_all(&self, tx: &Tx<'_>, scratch: &mut [u64], sent_all: bool) -> u64 {
        let tables = self.tables();
        let restore_linears = |pa: u64, len: u64, side: Visibility| {
            for (kind, alias) in tx.linears.iter() {
                // Being removed: it stays not present.
                if matches!(kind, Linear::Registered(id) if self.aliases.retiring(id)) {
                    continue;
                }
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
                if !sent_all {
                    return 0;
                }
                restore_linears(pa, len, tx.to);
                self.states.count_converted(pa, len, tx.to);
                len / PAGE
            }
            Frames::Mapped { .. } | Frames::List(_) => {
                let mut converted = 0;
                // With every frame sent, none is left to restore as it was.
                let sides: &[Visibility] = if sent_all { &[tx.to] } else { &[tx.to, tx.from()] };
                for &side in sides {
                    let (before, after) = if side == tx.to {
                        (Code::Sent, Code::RestoredNew)
                    } else {
                        (Code::Unmapped, Code::RestoredOld)
                    };
                    let mut moved = 0;
                    let accept = |frame| {
                        let ok = self.states.advance(frame, before, after);
                        moved += u64::from(ok);
                        ok
                    };
                    self.for_each_run(tx, scratch, accept, &mut |pa, len| {
                        restore_linears(pa, len, side);
                        if side == tx.to {
                            self.states.count_converted(pa, len, side);
                        }
                    });
                    if side == tx.to {
                        converted = moved;
                    }
                }
                if let Frames::Mapped { va, len } = tx.frames {
                    let side = |pa: u64, bytes: u64| self.uniform_side(tx, pa, bytes);
                    leaves::restore(&tables, &self.states, Mapping::Entries, va, len, side, &self.counters);
                }
                converted
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
    fn settle_all(&self, tx: &Tx<'_>, sent_all: bool) {
        let to = Code::settled(tx.to);
        let from = Code::settled(tx.from());
        match tx.frames {
            Frames::Linear { pa, len } => {
                for frame in (pa..pa + len).step_by(PAGE as usize) {
                    if sent_all {
                        self.states.settle(frame, to);
                    } else if self.states.code(frame) == Some(Code::Poisoned) {
                        // Its hole marks are no longer needed.
                        self.states.settle(frame, Code::Poisoned);
                    }
                }
            }
            Frames::List(list) => {
                for &frame in list {
                    self.settle_progress(frame, to, from);
                }
            }
            Frames::Mapped { va, len } => {
                // Each frame once: the first visit settles it, a second finds
                // it settled. No sorting needed.
                let _ = pieces(&self.tables(), va, len, false, |p| -> Result<(), ()> {
                    for frame in (p.pa..p.pa + p.len).step_by(PAGE as usize) {
                        self.settle_progress(frame, to, from);
                    }
                    Ok(())
                });
            }
        }
    }

    /// A frame's final state from its progress: the side it was restored
    /// to, or poisoned; a frame settled already is left alone.
    fn settle_progress(&self, frame: u64, to: Code, from: Code) {
        match self.states.code(frame) {
            Some(Code::RestoredNew) => self.states.settle(frame, to),
            Some(Code::RestoredOld) => self.states.settle(frame, from),
            Some(Code::Poisoned) => self.states.settle(frame, Code::Poisoned),
            _ => {}
        }
    }
}

/// A filled reserve, or why it could not be filled and the pages it holds.
pub(super) type Reserved = Result<Reserve, (ConvertError, Reserve)>;

/// What a failed platform call leaves.
pub(super) struct Failure {
    error: PlatformError,
    /// The first frame of the failed call.
    pa: u64,
    /// Frames in the failed call (now poisoned).
    frames: u64,
}

/// Rewrites `extents` in place into the frames `fresh` accepts, each sent
/// once however often the range maps it, and calls `call` with them, as
/// often as the rewritten list outgrows what was read. A frame is `mark`ed
/// only once it is in the list the next call sends.
fn send_fresh<E>(
    extents: &mut [u64],
    fresh: impl Fn(u64) -> bool,
    mut mark: impl FnMut(u64),
    call: &mut impl FnMut(Runs<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut w: usize = 0;
    for r in 0..extents.len() {
        let (pa, len) = decode(extents[r]);
        for frame in (pa..pa + len).step_by(PAGE as usize) {
            if !fresh(frame) {
                continue;
            }
            let extends = w.checked_sub(1).is_some_and(|i| {
                let (lpa, llen) = decode(extents[i]);
                lpa + llen == frame && llen < EXTENT_PAGES * PAGE
            });
            if extends {
                let (lpa, llen) = decode(extents[w - 1]);
                extents[w - 1] = extent(lpa, llen / PAGE + 1);
            } else {
                // Slots up to `r` are read; a new extent past them would
                // overwrite unread ones: send what is ready first.
                if w > r {
                    call(Runs::Extents(&extents[..w]))?;
                    w = 0;
                }
                extents[w] = extent(frame, 1);
                w += 1;
            }
            mark(frame);
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
        let seen = std::cell::RefCell::new(seen);
        send_fresh(
            &mut extents,
            |f| !seen.borrow().contains(&f),
            |f| {
                seen.borrow_mut().insert(f);
            },
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
