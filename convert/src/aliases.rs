//! The linear mappings of RAM the engine keeps consistent: the direct map
//! and the aliases the OS registers (a kernel-image mapping of the same
//! frames, say).
//!
//! A conversion copies the registered aliases once when it starts and
//! writes through that copy until it ends. Removing an alias must not let
//! a conversion in flight write into a range the OS has since reused, so
//! [`AliasRegistry::unregister`] waits until every conversion that started
//! before it has finished: a two-phase reader count, as sleepable RCU
//! does, so that conversions starting meanwhile never hold it up.
//!
//! Nor may a conversion that no longer knows the alias convert a frame the
//! alias still maps present with the old attribute. So an alias being
//! removed is first *retiring*: conversions stop making its entries present
//! again, and the engine makes every entry of it not present (with a
//! shootdown) before any conversion can start without it. Its slot is
//! reused only once every conversion that knew it has finished.

use crate::pte::Paging;
use crate::sync::{spin_loop, AtomicBool, AtomicUsize, Mutex};
use core::sync::atomic::Ordering;

/// The OS's direct map: `[pa, pa + len)` mapped at `va`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectMap {
    /// Virtual address of `pa`.
    pub va: u64,
    /// First physical address mapped.
    pub pa: u64,
    /// Bytes mapped.
    pub len: u64,
}

/// Another linear mapping of physical memory the OS wants kept consistent
/// (e.g. a kernel-image mapping of the same frames): `[pa, pa + len)` at
/// `va`. Entries the OS leaves not present inside it (freed init memory,
/// guard pages) stay not present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alias {
    /// Virtual address of `pa`.
    pub va: u64,
    /// First physical address.
    pub pa: u64,
    /// Bytes.
    pub len: u64,
}

/// How many extra aliases can be registered.
pub const MAX_ALIASES: usize = 16;

/// Why an alias was not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AliasError {
    /// Empty, not 4 KiB aligned, not canonical, or reaching the end of the
    /// virtual or physical address space.
    Invalid,
    /// Its virtual range overlaps the direct map.
    OverlapsDirectMap,
    /// Its virtual range overlaps, or its frames overlap, those of the
    /// alias registered as `id`: a frame has at most one registered alias.
    Overlaps {
        /// The alias in the way.
        id: usize,
    },
    /// All [`MAX_ALIASES`] slots are taken.
    Full,
}

impl core::fmt::Display for AliasError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AliasError::Invalid => f.write_str("alias range is empty, unaligned or wraps"),
            AliasError::OverlapsDirectMap => f.write_str("alias overlaps the direct map"),
            AliasError::Overlaps { id } => write!(f, "alias overlaps alias {id}"),
            AliasError::Full => f.write_str("no free alias slot"),
        }
    }
}

impl core::error::Error for AliasError {}

pub(crate) type Snapshot = [Option<Alias>; MAX_ALIASES];

pub(crate) struct AliasRegistry {
    slots: Mutex<Snapshot>,
    /// Held by an unregister across its wait: a second one flipping the
    /// phase meanwhile would wait on the wrong counter.
    unregistering: Mutex<()>,
    registered: AtomicUsize,
    phase: AtomicUsize,
    readers: [AtomicUsize; 2],
    /// Set from the start of an unregister until its slot may be reused.
    retiring: [AtomicBool; MAX_ALIASES],
}

/// A conversion's hold on the aliases it copied.
pub(crate) struct Readers<'r> {
    registry: &'r AliasRegistry,
    phase: usize,
}

impl Drop for Readers<'_> {
    fn drop(&mut self) {
        self.registry.readers[self.phase].fetch_sub(1, Ordering::Release);
    }
}

/// Whether `[va, va + len)` (non-empty, not wrapping) lies in one half of
/// the canonical address space `paging` translates (48 or 57 bits): both
/// ends canonical and in the same half, so nothing between them is not.
pub(crate) fn canonical_range(va: u64, len: u64, paging: Paging) -> bool {
    let last = va + (len - 1);
    paging.is_canonical(va) && paging.is_canonical(last) && (va ^ last) >> 63 == 0
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl AliasRegistry {
    pub const fn new() -> Self {
        AliasRegistry {
            slots: Mutex::new([None; MAX_ALIASES]),
            unregistering: Mutex::new(()),
            registered: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            retiring: [const { AtomicBool::new(false) }; MAX_ALIASES],
        }
    }

    pub fn register(&self, alias: Alias, direct_map: DirectMap, paging: Paging) -> Result<usize, AliasError> {
        let wraps = alias.va.checked_add(alias.len).is_none() || alias.pa.checked_add(alias.len).is_none();
        if alias.len == 0
            || (alias.va | alias.pa | alias.len) & 0xFFF != 0
            || wraps
            || !canonical_range(alias.va, alias.len, paging)
        {
            return Err(AliasError::Invalid);
        }
        if overlaps(alias.va, alias.len, direct_map.va, direct_map.len) {
            return Err(AliasError::OverlapsDirectMap);
        }
        let mut slots = self.slots.lock();
        for (id, other) in slots.iter().enumerate() {
            if let Some(o) = other {
                if overlaps(alias.va, alias.len, o.va, o.len) || overlaps(alias.pa, alias.len, o.pa, o.len) {
                    return Err(AliasError::Overlaps { id });
                }
            }
        }
        let id = (0..MAX_ALIASES)
            .find(|&i| slots[i].is_none() && !self.retiring[i].load(Ordering::Acquire))
            .ok_or(AliasError::Full)?;
        slots[id] = Some(alias);
        self.registered.fetch_add(1, Ordering::AcqRel);
        Ok(id)
    }

    /// Removes alias `id`: marks it retiring, runs `unmap` (which must
    /// leave no entry of it present, nor cached), removes it so that
    /// conversions from now on do not see it, waits until no conversion
    /// that saw it is in flight, runs `detach`, and frees the slot.
    /// Returns the alias removed.
    pub fn unregister(&self, id: usize, unmap: impl FnOnce(Alias), detach: impl FnOnce(Alias)) -> Option<Alias> {
        let _one_at_a_time = self.unregistering.lock();
        let alias = (*self.slots.lock().get(id)?)?;
        // Before the unmap: a conversion restoring afterwards must not
        // make an entry present again.
        self.retiring[id].store(true, Ordering::Release);
        unmap(alias);
        let old = {
            let mut slots = self.slots.lock();
            slots[id] = None;
            self.registered.fetch_sub(1, Ordering::AcqRel);
            // Conversions from now on read the other phase's counter.
            self.phase.fetch_add(1, Ordering::AcqRel) & 1
        };
        while self.readers[old].load(Ordering::Acquire) != 0 {
            spin_loop();
        }
        detach(alias);
        self.retiring[id].store(false, Ordering::Release);
        Some(alias)
    }

    /// Whether alias `id` is being removed: its entries must stay not
    /// present.
    pub fn retiring(&self, id: usize) -> bool {
        self.retiring[id].load(Ordering::Acquire)
    }

    /// Enters a conversion: the aliases registered now, and a hold that
    /// keeps [`unregister`](Self::unregister) waiting until it is dropped.
    /// `None` for the snapshot when no alias is registered (the usual case:
    /// nothing copied).
    pub fn enter(&self) -> (Readers<'_>, Option<Snapshot>) {
        let readers = loop {
            let phase = self.phase.load(Ordering::Acquire) & 1;
            self.readers[phase].fetch_add(1, Ordering::AcqRel);
            // A flip between the load and the increment would let an
            // unregister miss us: count ourselves in the current phase.
            if self.phase.load(Ordering::Acquire) & 1 == phase {
                break Readers { registry: self, phase };
            }
            self.readers[phase].fetch_sub(1, Ordering::AcqRel);
        };
        let snapshot = (self.registered.load(Ordering::Acquire) > 0).then(|| *self.slots.lock());
        (readers, snapshot)
    }
}

/// A linear mapping as the transaction sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Linear {
    DirectMap,
    Registered(usize),
}

/// The linear mappings of one conversion: the direct map, then the
/// registered aliases copied when it started.
#[derive(Clone, Copy)]
pub(crate) struct Linears<'s> {
    pub direct_map: DirectMap,
    pub registered: Option<&'s Snapshot>,
}

impl Linears<'_> {
    pub fn iter(&self) -> impl Iterator<Item = (Linear, Alias)> + '_ {
        let dm = self.direct_map;
        let registered = self.registered.into_iter().flat_map(|all| {
            all.iter()
                .enumerate()
                .filter_map(|(i, a)| a.map(|a| (Linear::Registered(i), a)))
        });
        core::iter::once((
            Linear::DirectMap,
            Alias {
                va: dm.va,
                pa: dm.pa,
                len: dm.len,
            },
        ))
        .chain(registered)
    }

    /// The physical range `[va, va + len)` lies in, if it lies wholly in
    /// one linear mapping; `Err(())` if it overlaps one only in part.
    pub fn physical(&self, va: u64, len: u64) -> Result<Option<u64>, ()> {
        for (_, a) in self.iter() {
            if !overlaps(va, len, a.va, a.len) {
                continue;
            }
            let offset = va.checked_sub(a.va).ok_or(())?;
            return match offset.checked_add(len) {
                Some(end) if end <= a.len => Ok(Some(a.pa + offset)),
                _ => Err(()),
            };
        }
        Ok(None)
    }
}

/// The virtual range of `alias` that maps `[pa, pa + len)`, if any.
pub(crate) fn virtual_of(alias: Alias, pa: u64, len: u64) -> Option<(u64, u64)> {
    let start = pa.max(alias.pa);
    let end = (pa + len).min(alias.pa.saturating_add(alias.len));
    (start < end).then(|| (alias.va + (start - alias.pa), end - start))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::atomic::AtomicBool;

    const DM: DirectMap = DirectMap {
        va: 0xFFFF_8880_0000_0000,
        pa: 0,
        len: 1 << 30,
    };

    #[test]
    fn registration_refuses_what_it_could_not_keep_consistent() {
        let r = AliasRegistry::new();
        let a = Alias {
            va: 0xFFFF_FFFF_8000_0000,
            pa: 0x100_0000,
            len: 0x20_0000,
        };
        assert_eq!(r.register(a, DM, Paging::Four), Ok(0));
        let cases = [
            (Alias { len: 0, ..a }, AliasError::Invalid),
            (Alias { va: a.va + 1, ..a }, AliasError::Invalid),
            (
                Alias {
                    va: 0xFFFF_FFFF_FFFF_F000,
                    len: 0x2000,
                    ..a
                },
                AliasError::Invalid,
            ),
            (
                Alias {
                    va: DM.va + 0x1000,
                    ..a
                },
                AliasError::OverlapsDirectMap,
            ),
            (
                Alias {
                    va: a.va + 0x10_0000,
                    pa: 0x800_0000,
                    ..a
                },
                AliasError::Overlaps { id: 0 },
            ),
            (
                Alias {
                    va: 0xFFFF_C000_0000_0000,
                    pa: a.pa + 0x1000,
                    ..a
                },
                AliasError::Overlaps { id: 0 },
            ),
        ];
        for (alias, err) in cases {
            assert_eq!(r.register(alias, DM, Paging::Four), Err(err), "{alias:x?}");
        }
        for i in 1..MAX_ALIASES as u64 {
            r.register(
                Alias {
                    va: 0xFFFF_C000_0000_0000 + i * 0x100_0000,
                    pa: 0x1000_0000 + i * 0x100_0000,
                    len: 0x1000,
                },
                DM,
                Paging::Four,
            )
            .unwrap();
        }
        let spare = Alias {
            va: 0xFFFF_D000_0000_0000,
            pa: 0x4000_0000,
            len: 0x1000,
        };
        assert_eq!(r.register(spare, DM, Paging::Four), Err(AliasError::Full));
        assert_eq!(r.unregister(0, |_| {}, |_| {}), Some(a));
        assert_eq!(r.unregister(0, |_| {}, |_| {}), None);
        assert_eq!(r.register(spare, DM, Paging::Four), Ok(0));
    }

    #[test]
    fn canonical_ranges_at_each_depth() {
        use Paging::{Five, Four};
        let cases = [
            // (va, len, canonical with four levels, with five)
            (0xFFFF_8000_0000_0000, 0x1000, true, true),
            (0x7FFF_FFFF_F000, 0x1000, true, true),
            (0x7FFF_FFFF_F000, 0x2000, false, true),
            (0xFFFF_7FFF_FFFF_F000, 0x2000, false, true),
            (0xFF11_0000_0000_0000, 1 << 30, false, true),
            (0x00FF_FFFF_FFFF_F000, 0x1000, false, true),
            (0x00FF_FFFF_FFFF_F000, 0x2000, false, false),
            (0xFEFF_FFFF_FFFF_F000, 0x2000, false, false),
            (0xFF00_0000_0000_0000, 0x1000, false, true),
            (0x0100_0000_0000_0000, 0x1000, false, false),
        ];
        for (va, len, four, five) in cases {
            assert_eq!(canonical_range(va, len, Four), four, "{va:#x}+{len:#x}, 4 levels");
            assert_eq!(canonical_range(va, len, Five), five, "{va:#x}+{len:#x}, 5 levels");
        }
    }

    #[test]
    fn registration_follows_the_paging_depth() {
        let r = AliasRegistry::new();
        let la57_only = Alias {
            va: 0xFF80_0000_0000_0000,
            pa: 0x100_0000,
            len: 0x20_0000,
        };
        assert_eq!(r.register(la57_only, DM, Paging::Four), Err(AliasError::Invalid));
        assert_eq!(r.register(la57_only, DM, Paging::Five), Ok(0));
        let beyond = Alias {
            va: 0xFE00_0000_0000_0000,
            pa: 0x800_0000,
            ..la57_only
        };
        assert_eq!(r.register(beyond, DM, Paging::Five), Err(AliasError::Invalid));
    }

    #[test]
    fn unregister_waits_for_conversions_that_copied_the_alias() {
        let r = AliasRegistry::new();
        let a = Alias {
            va: 0xFFFF_FFFF_8000_0000,
            pa: 0,
            len: 0x1000,
        };
        r.register(a, DM, Paging::Four).unwrap();
        let (hold, snapshot) = r.enter();
        assert_eq!(snapshot.unwrap()[0], Some(a));
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                r.unregister(0, |_| {}, |_| {});
                done.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            // A conversion starting now neither sees the alias nor holds
            // the unregister up.
            let (later, snap) = r.enter();
            assert!(snap.is_none_or(|s| s[0].is_none()));
            assert!(
                !done.load(Ordering::SeqCst),
                "returned while a conversion holds the alias"
            );
            drop(hold);
            while !done.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            drop(later);
        });
    }
}
