//! Per-page state, one byte per frame, claimed with atomic compare-and-swap
//! so disjoint conversions never wait for each other and overlapping ones
//! are refused.
//!
//! The byte also carries what a conversion in flight needs to remember
//! about each frame it owns, so that no transaction needs a heap:
//! - how far the frame has got (unmapped, sent to the host, restored),
//!   which lets a range that maps a frame twice convert it once, and a
//!   failure report say exactly which frames changed;
//! - whether the OS had left one of the frame's linear mappings (the
//!   direct map, a registered alias) not present: the engine restores only
//!   entries it made not present itself;
//! - whether the frame is a page-table page the engine took from the
//!   OS's frame source: only those go back to it, and none of them can be
//!   converted.

use crate::sync::{AtomicU32, AtomicU8};
use core::sync::atomic::Ordering;

use crate::pte::Visibility;
use crate::regions::{words_for, Regions};

/// The state of one 4 KiB frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PageState {
    /// Private: the guest's own (the initial state: zeroed storage).
    Private,
    /// Shared with the host.
    Shared,
    /// A conversion owns the frame.
    Converting,
    /// A conversion failed after the host was asked: the frame's state is
    /// unknown, its mappings stay not-present, and it is never used again.
    Poisoned,
    /// Private memory the engine holds as a page-table page (taken from
    /// the OS's frame source): never converted.
    PageTable,
    /// Handed over by the firmware unaccepted (or being accepted now):
    /// not usable, and never converted, until
    /// [`Engine::accept`](crate::Engine::accept) has accepted it.
    Unaccepted,
}

impl PageState {
    /// The state of a settled page on `side`.
    pub const fn of(side: Visibility) -> PageState {
        match side {
            Visibility::Private => PageState::Private,
            Visibility::Shared => PageState::Shared,
        }
    }
}

/// The low bits of a state byte: where the frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Code {
    Private = 0,
    Shared = 1,
    /// Claimed by a conversion; nothing changed yet.
    Claimed = 2,
    Poisoned = 3,
    /// Its mappings are not present; the host was not asked yet.
    Unmapped = 4,
    /// The host converted it.
    Sent = 5,
    /// Mapped again with the new attribute; settles to the new side.
    RestoredNew = 6,
    /// Mapped again with the old attribute (the host was never asked);
    /// settles to the old side.
    RestoredOld = 7,
    /// A page-table page of the engine's.
    Table = 8,
    /// In an acceptance unit the firmware handed over unaccepted.
    Unaccepted = 9,
    /// The first frame of a unit a CPU is accepting now: the unit's lock.
    Accepting = 10,
}

const CODE_MASK: u8 = 0x0F;

/// Which linear mapping of a frame the OS had left not present when a
/// conversion began (only while the conversion owns the frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Hole {
    DirectMap = 0x10,
    Registered = 0x20,
}

/// Set on the frames a conversion claims while it walks its range, and
/// cleared before it drops the table lock: claim walks run only under that
/// lock, so a set bit always means "claimed by this walk" (a frame the
/// range maps twice).
const MINE: u8 = 0x40;

impl Code {
    fn from_bits(v: u8) -> Option<Code> {
        Some(match v & CODE_MASK {
            0 => Code::Private,
            1 => Code::Shared,
            2 => Code::Claimed,
            3 => Code::Poisoned,
            4 => Code::Unmapped,
            5 => Code::Sent,
            6 => Code::RestoredNew,
            7 => Code::RestoredOld,
            8 => Code::Table,
            9 => Code::Unaccepted,
            10 => Code::Accepting,
            _ => return None,
        })
    }

    fn public(self) -> PageState {
        match self {
            Code::Private => PageState::Private,
            Code::Shared => PageState::Shared,
            Code::Poisoned => PageState::Poisoned,
            Code::Table => PageState::PageTable,
            Code::Unaccepted | Code::Accepting => PageState::Unaccepted,
            Code::Claimed | Code::Unmapped | Code::Sent | Code::RestoredNew | Code::RestoredOld => {
                PageState::Converting
            }
        }
    }

    pub(crate) const fn settled(side: Visibility) -> Code {
        match side {
            Visibility::Private => Code::Private,
            Visibility::Shared => Code::Shared,
        }
    }
}

/// The states of the frames `[base, base + 4096 * len)`, in storage the OS
/// provides (`&'static` zeroed memory in early boot works: all private).
#[derive(Debug)]
pub struct StateTable<'a> {
    base: u64,
    states: &'a [AtomicU8],
    regions: Option<Regions<'a>>,
}

impl<'a> StateTable<'a> {
    /// States for the frames from physical address `base` (4 KiB aligned),
    /// one byte each.
    pub const fn new(base: u64, states: &'a [AtomicU8]) -> Self {
        StateTable {
            base,
            states,
            regions: None,
        }
    }

    /// Words of storage [`with_region_counts`](Self::with_region_counts)
    /// needs for a table of `frames` frames from `base`: one per 2 MiB and
    /// one per 1 GiB region the frames touch (about 2 KiB per GiB).
    pub const fn region_words(base: u64, frames: usize) -> usize {
        let (per_2m, per_1g) = words_for(base, frames);
        per_2m + per_1g
    }

    /// Keeps a count of shared frames per 2 MiB and 1 GiB region in
    /// `words` (any contents: they are set from the states now), so that a
    /// collapse is tried only where a region's frames are all private or
    /// all shared. Without it every collapse attempt reads the table's 512
    /// entries; with it, the attempts that cannot succeed cost O(1).
    pub fn with_region_counts(mut self, words: &'a [AtomicU32]) -> Result<Self, TooFewWords> {
        let needed = Self::region_words(self.base, self.states.len());
        let shared = |i: usize| self.states[i].load(Ordering::Acquire) & CODE_MASK == Code::Shared as u8;
        match Regions::new(self.base, self.states.len(), words, shared) {
            Some(regions) => {
                self.regions = Some(regions);
                Ok(self)
            }
            None => Err(TooFewWords { needed }),
        }
    }

    /// Counts `[pa, pa + len)` as now on `side` (frames a conversion has
    /// just mapped with the new attribute).
    pub(crate) fn count_converted(&self, pa: u64, len: u64, side: Visibility) {
        if let Some(regions) = &self.regions {
            regions.add(pa, len, side == Visibility::Shared);
        }
    }

    /// Whether a table mapping the aligned `span`-sized region at `pa` may
    /// be uniform (all its frames on one side); `true` when not counted.
    #[inline]
    pub(crate) fn may_be_uniform(&self, pa: u64, span: u64) -> bool {
        self.regions.as_ref().is_none_or(|r| r.may_be_uniform(pa, span))
    }

    fn slot(&self, pa: u64) -> Option<&AtomicU8> {
        let index = pa.checked_sub(self.base)? / 4096;
        self.states.get(usize::try_from(index).ok()?)
    }

    /// The first frame of `[pa, pa + len)` the table does not cover, if any.
    pub fn first_uncovered(&self, pa: u64, len: u64) -> Option<u64> {
        if self.slot(pa).is_none() {
            return Some(pa & !0xFFF);
        }
        let covered_end = self.base + self.states.len() as u64 * 4096;
        let end = pa.saturating_add(len);
        (end > covered_end).then_some(covered_end)
    }

    /// The state of the frame at `pa`, if covered. A byte the engine does
    /// not know (written behind its back) reads as
    /// [`PageState::Poisoned`]: nothing can be said of the frame.
    pub fn get(&self, pa: u64) -> Option<PageState> {
        self.slot(pa).map(|s| public_state(s.load(Ordering::Acquire)))
    }

    pub(crate) fn code(&self, pa: u64) -> Option<Code> {
        self.slot(pa).and_then(|s| Code::from_bits(s.load(Ordering::Acquire)))
    }

    /// Moves the frame from the settled state `from` to claimed; on failure
    /// returns the state found.
    pub(crate) fn claim(&self, pa: u64, from: Code) -> Result<(), Option<PageState>> {
        self.claim_code(pa, from, Code::Claimed)
    }

    /// As [`claim`](Self::claim), marking the frame as claimed by the
    /// running claim walk. `Ok(false)` if that walk had claimed it already.
    pub(crate) fn claim_in_walk(&self, pa: u64, from: Code) -> Result<bool, Option<PageState>> {
        let slot = self.slot(pa).ok_or(None)?;
        match slot.compare_exchange(
            from as u8,
            Code::Claimed as u8 | MINE,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(true),
            Err(found) if found == Code::Claimed as u8 | MINE => Ok(false),
            Err(found) => Err(Some(public_state(found))),
        }
    }

    /// Ends the claim walk's mark on a frame.
    pub(crate) fn end_walk(&self, pa: u64) {
        if let Some(slot) = self.slot(pa) {
            slot.fetch_and(!MINE, Ordering::AcqRel);
        }
    }

    /// Moves a frame this conversion owns from `from` to `to`, keeping its
    /// hole marks; `false` if it was not in `from` (a frame met twice).
    pub(crate) fn advance(&self, pa: u64, from: Code, to: Code) -> bool {
        let Some(slot) = self.slot(pa) else { return false };
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & CODE_MASK == from as u8).then_some((v & !CODE_MASK) | to as u8)
        })
        .is_ok()
    }

    /// Records that the OS left `hole`'s mapping of the frame not present.
    pub(crate) fn mark_hole(&self, pa: u64, hole: Hole) {
        if let Some(slot) = self.slot(pa) {
            slot.fetch_or(hole as u8, Ordering::AcqRel);
        }
    }

    pub(crate) fn is_hole(&self, pa: u64, hole: Hole) -> bool {
        self.slot(pa)
            .is_some_and(|s| s.load(Ordering::Acquire) & hole as u8 != 0)
    }

    /// Poisons a frame this conversion owns, keeping its hole marks: until
    /// the conversion settles, they tell the OS's not-present leaves from
    /// the conversion's own.
    pub(crate) fn poison(&self, pa: u64) {
        if let Some(slot) = self.slot(pa) {
            let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & (Hole::DirectMap as u8 | Hole::Registered as u8)) | Code::Poisoned as u8)
            });
        }
    }

    /// Sets the settled state of a frame this conversion owns (clearing its
    /// marks).
    pub(crate) fn settle(&self, pa: u64, to: Code) {
        if let Some(slot) = self.slot(pa) {
            slot.store(to as u8, Ordering::Release);
        }
    }

    /// Takes a private frame as an engine page-table page; on failure
    /// returns the state found (`None`: not covered, or not a frame's
    /// address).
    pub(crate) fn take_table(&self, pa: u64) -> Result<(), Option<PageState>> {
        if pa % 4096 != 0 {
            return Err(None);
        }
        self.claim_code(pa, Code::Private, Code::Table)
    }

    /// Gives an engine page-table page back to private.
    pub(crate) fn release_table(&self, pa: u64) -> bool {
        self.claim_code(pa, Code::Table, Code::Private).is_ok()
    }

    pub(crate) fn is_table(&self, pa: u64) -> bool {
        self.code(pa) == Some(Code::Table)
    }

    /// Moves the frame from `from` to `to`; on failure returns the state
    /// found (`None`: not covered).
    pub(crate) fn claim_code(&self, pa: u64, from: Code, to: Code) -> Result<(), Option<PageState>> {
        let slot = self.slot(pa).ok_or(None)?;
        slot.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|found| Some(public_state(found)))
    }

    /// Records that the firmware or the loader left `[pa, pa + len)`
    /// shared before the engine ran (a GHCB or a shared buffer the
    /// firmware set up, a range a previous kernel shared), so conversions
    /// take these frames back to private instead of refusing them. The
    /// OS's page tables must already map them with the shared attribute.
    ///
    /// All or nothing: every frame must be covered and private, or nothing
    /// is recorded.
    pub fn record_shared(&self, pa: u64, len: u64) -> Result<(), RecordError> {
        let end = pa.checked_add(len).filter(|_| len > 0 && (pa | len) % 4096 == 0);
        let end = end.ok_or(RecordError::InvalidRange { pa, len })?;
        if let Some(uncovered) = self.first_uncovered(pa, len) {
            return Err(RecordError::Uncovered { pa: uncovered });
        }
        for frame in (pa..end).step_by(4096) {
            if let Err(found) = self.claim_code(frame, Code::Private, Code::Shared) {
                for undo in (pa..frame).step_by(4096) {
                    let _ = self.claim_code(undo, Code::Shared, Code::Private);
                }
                return Err(RecordError::NotPrivate {
                    pa: frame,
                    state: found,
                });
            }
        }
        self.count_converted(pa, len, Visibility::Shared);
        Ok(())
    }

    /// As [`next_run`](Self::next_run), by public state, as
    /// [`get`](Self::get) and [`census`](Self::census) read it.
    pub(crate) fn next_public_run(&self, from: u64, state: PageState) -> Option<(u64, u64)> {
        self.next_run(from, |code| code.map_or(PageState::Poisoned, Code::public) == state)
    }

    /// The first maximal run of frames at or after `from` whose code
    /// satisfies `wanted`, as `(pa, len)`.
    pub(crate) fn next_run(&self, from: u64, wanted: impl Fn(Option<Code>) -> bool) -> Option<(u64, u64)> {
        let skip = usize::try_from(from.saturating_sub(self.base) / 4096).ok()?;
        let code = |s: &AtomicU8| Code::from_bits(s.load(Ordering::Acquire));
        let rest = self.states.get(skip..)?;
        let start = rest.iter().position(|s| wanted(code(s)))?;
        let len = rest[start..].iter().take_while(|s| wanted(code(s))).count();
        Some((self.base + (skip + start) as u64 * 4096, len as u64 * 4096))
    }

    /// Counts the frames in each state.
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        for s in self.states {
            let count = match public_state(s.load(Ordering::Relaxed)) {
                PageState::Private => &mut census.private,
                PageState::PageTable => &mut census.page_tables,
                PageState::Shared => &mut census.shared,
                PageState::Converting => &mut census.converting,
                PageState::Unaccepted => &mut census.unaccepted,
                PageState::Poisoned => &mut census.poisoned,
            };
            *count += 1;
        }
        census
    }
}

/// A state byte as the OS sees it; one the engine does not know is
/// poisoned.
fn public_state(byte: u8) -> PageState {
    Code::from_bits(byte).map_or(PageState::Poisoned, Code::public)
}

/// How many frames a [`StateTable`] holds in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Census {
    /// Private and free for the OS's use.
    pub private: u64,
    /// Shared with the host.
    pub shared: u64,
    /// Owned by a conversion in flight.
    pub converting: u64,
    /// Lost to a failed conversion: never to be used again (a state byte
    /// the engine does not know counts here too).
    pub poisoned: u64,
    /// Private, held by the engine as page-table pages.
    pub page_tables: u64,
    /// Not accepted yet (or being accepted now).
    pub unaccepted: u64,
}

/// [`StateTable::with_region_counts`] was given fewer words than
/// [`StateTable::region_words`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooFewWords {
    /// The words it needs.
    pub needed: usize,
}

impl core::fmt::Display for TooFewWords {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "region counts need {} words", self.needed)
    }
}

impl core::error::Error for TooFewWords {}

/// Why [`StateTable::record_shared`] recorded nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// Empty, not 4 KiB aligned, or wrapping.
    InvalidRange {
        /// Start of the range.
        pa: u64,
        /// Its length.
        len: u64,
    },
    /// The table does not cover this frame.
    Uncovered {
        /// The first frame not covered.
        pa: u64,
    },
    /// This frame is not private (already shared, converting, poisoned, a
    /// page-table page, or a state byte the engine does not know, which
    /// reads as poisoned).
    NotPrivate {
        /// The frame.
        pa: u64,
        /// Its state.
        state: Option<PageState>,
    },
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            RecordError::InvalidRange { pa, len } => write!(f, "invalid range {pa:#x}+{len:#x}"),
            RecordError::Uncovered { pa } => write!(f, "frame {pa:#x} is outside the state table"),
            RecordError::NotPrivate { pa, state } => write!(f, "frame {pa:#x} is not private ({state:?})"),
        }
    }
}

impl core::error::Error for RecordError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_is_exclusive_and_checks_the_expected_state() {
        let storage: [AtomicU8; 4] = Default::default();
        let t = StateTable::new(0x10_0000, &storage);
        assert_eq!(t.claim(0x10_0000, Code::Private), Ok(()));
        assert_eq!(t.claim(0x10_0000, Code::Private), Err(Some(PageState::Converting)));
        assert_eq!(t.claim(0x10_1000, Code::Shared), Err(Some(PageState::Private)));
        assert_eq!(t.claim(0x10_4000, Code::Private), Err(None), "outside the table");
        assert_eq!(t.claim(0xF_F000, Code::Private), Err(None));
        t.settle(0x10_0000, Code::Poisoned);
        assert_eq!(t.get(0x10_0000), Some(PageState::Poisoned));
        assert_eq!(
            t.census(),
            Census {
                private: 3,
                poisoned: 1,
                ..Census::default()
            }
        );
        assert_eq!(t.first_uncovered(0x10_0000, 0x4000), None);
        assert_eq!(t.first_uncovered(0x10_1000, 0x4000), Some(0x10_4000));
        assert_eq!(t.first_uncovered(0xF_F000, 0x2000), Some(0xF_F000));
    }

    #[test]
    fn progress_keeps_hole_marks_and_settling_clears_them() {
        let storage: [AtomicU8; 2] = Default::default();
        let t = StateTable::new(0, &storage);
        t.claim(0, Code::Private).unwrap();
        t.mark_hole(0, Hole::DirectMap);
        assert!(t.advance(0, Code::Claimed, Code::Unmapped));
        assert!(!t.advance(0, Code::Claimed, Code::Unmapped), "met twice");
        assert!(t.is_hole(0, Hole::DirectMap) && !t.is_hole(0, Hole::Registered));
        assert_eq!(t.get(0), Some(PageState::Converting));
        t.settle(0, Code::Shared);
        assert!(!t.is_hole(0, Hole::DirectMap));
        assert_eq!(t.get(0), Some(PageState::Shared));
    }

    #[test]
    fn table_pages_cannot_be_claimed() {
        let storage: [AtomicU8; 2] = Default::default();
        let t = StateTable::new(0, &storage);
        t.take_table(0x1000).unwrap();
        assert_eq!(t.claim(0x1000, Code::Private), Err(Some(PageState::PageTable)));
        assert_eq!(
            t.census(),
            Census {
                private: 1,
                page_tables: 1,
                ..Census::default()
            }
        );
        assert!(t.release_table(0x1000) && !t.release_table(0x1000));
        assert_eq!(t.take_table(0x2000), Err(None));
    }

    #[test]
    fn record_shared_marks_every_frame_or_none() {
        let storage: [AtomicU8; 4] = Default::default();
        let t = StateTable::new(0x10_0000, &storage);
        assert_eq!(t.record_shared(0x10_1000, 0x2000), Ok(()));
        assert_eq!(t.get(0x10_1000), Some(PageState::Shared));
        assert_eq!(t.get(0x10_2000), Some(PageState::Shared));
        assert_eq!(t.get(0x10_0000), Some(PageState::Private));
        // The second frame is shared already: the first must stay private.
        assert_eq!(
            t.record_shared(0x10_0000, 0x2000),
            Err(RecordError::NotPrivate {
                pa: 0x10_1000,
                state: Some(PageState::Shared)
            })
        );
        assert_eq!(t.get(0x10_0000), Some(PageState::Private));
        assert_eq!(
            t.record_shared(0x10_3000, 0x2000),
            Err(RecordError::Uncovered { pa: 0x10_4000 })
        );
        assert_eq!(t.get(0x10_3000), Some(PageState::Private));
        for (pa, len) in [(0x10_0800, 0x1000), (0x10_0000, 0), (!0xFFF, 0x2000)] {
            assert_eq!(t.record_shared(pa, len), Err(RecordError::InvalidRange { pa, len }));
        }
        assert_eq!(
            t.census(),
            Census {
                private: 2,
                shared: 2,
                ..Census::default()
            }
        );
    }
}
