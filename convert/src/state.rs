//! Per-page conversion state, one byte per frame, claimed with atomic
//! compare-and-swap so disjoint conversions never wait for each other and
//! overlapping ones are refused.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::pte::Visibility;

/// The state of one 4 KiB frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Private: the guest's own (the initial state: zeroed storage).
    Private = 0,
    /// Shared with the host.
    Shared = 1,
    /// A conversion owns the frame.
    Converting = 2,
    /// A conversion failed after the host was asked: the frame's state is
    /// unknown, its mappings stay not-present, and it is never used again.
    Poisoned = 3,
}

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v {
            0 => PageState::Private,
            1 => PageState::Shared,
            2 => PageState::Converting,
            _ => PageState::Poisoned,
        }
    }

    /// The state of a settled page on `side`.
    pub const fn of(side: Visibility) -> PageState {
        match side {
            Visibility::Private => PageState::Private,
            Visibility::Shared => PageState::Shared,
        }
    }
}

/// The states of the frames `[base, base + 4096 * len)`, in storage the OS
/// provides (`&'static` zeroed memory in early boot works: all private).
#[derive(Debug)]
pub struct StateTable<'a> {
    base: u64,
    states: &'a [AtomicU8],
}

impl<'a> StateTable<'a> {
    /// States for the frames from physical address `base` (4 KiB aligned),
    /// one byte each.
    pub const fn new(base: u64, states: &'a [AtomicU8]) -> Self {
        StateTable { base, states }
    }

    fn slot(&self, pa: u64) -> Option<&AtomicU8> {
        let index = pa.checked_sub(self.base)? / 4096;
        self.states.get(usize::try_from(index).ok()?)
    }

    /// Whether `[pa, pa + len)` is covered.
    pub fn covers(&self, pa: u64, len: u64) -> bool {
        len > 0 && self.slot(pa).is_some() && pa.checked_add(len - 1).and_then(|last| self.slot(last)).is_some()
    }

    /// The state of the frame at `pa`, if covered.
    pub fn get(&self, pa: u64) -> Option<PageState> {
        self.slot(pa).map(|s| PageState::from_u8(s.load(Ordering::Acquire)))
    }

    /// Moves the frame from `from` to [`PageState::Converting`]; on failure
    /// returns the state found.
    pub(crate) fn claim(&self, pa: u64, from: PageState) -> Result<(), Option<PageState>> {
        let slot = self.slot(pa).ok_or(None)?;
        slot.compare_exchange(
            from as u8,
            PageState::Converting as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(|_| ())
        .map_err(|found| Some(PageState::from_u8(found)))
    }

    /// Sets the state of a frame this conversion owns.
    pub(crate) fn settle(&self, pa: u64, to: PageState) {
        if let Some(slot) = self.slot(pa) {
            slot.store(to as u8, Ordering::Release);
        }
    }

    /// Counts frames per state: [private, shared, converting, poisoned].
    pub fn census(&self) -> [u64; 4] {
        let mut counts = [0; 4];
        for s in self.states {
            counts[PageState::from_u8(s.load(Ordering::Relaxed)) as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_is_exclusive_and_checks_the_expected_state() {
        let storage: [AtomicU8; 4] = Default::default();
        let t = StateTable::new(0x10_0000, &storage);
        assert_eq!(t.claim(0x10_0000, PageState::Private), Ok(()));
        assert_eq!(t.claim(0x10_0000, PageState::Private), Err(Some(PageState::Converting)));
        assert_eq!(t.claim(0x10_1000, PageState::Shared), Err(Some(PageState::Private)));
        assert_eq!(t.claim(0x10_4000, PageState::Private), Err(None), "outside the table");
        assert_eq!(t.claim(0xF_F000, PageState::Private), Err(None));
        t.settle(0x10_0000, PageState::Poisoned);
        assert_eq!(t.get(0x10_0000), Some(PageState::Poisoned));
        assert_eq!(t.census(), [3, 0, 0, 1]);
        assert!(t.covers(0x10_0000, 0x4000) && !t.covers(0x10_0000, 0x5000) && !t.covers(0x10_0000, 0));
    }
}
