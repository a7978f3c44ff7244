//! After a conversion: collapsing tables back into huge leaves, and the
//! tables that frees.
//!
//! A replaced table waits in the deferred list until a shootdown covers its
//! region. When the list is full, the collapse stops, drops the table lock,
//! and makes room with none held: a chain page from the frame source, or,
//! if none can be had, a shootdown and the frees now. Then it goes on.

use core::sync::atomic::Ordering;

use super::table_lock::TableGuard;

use super::frames::{for_each_chunk, Chunk, Frames};
use super::transaction::Tx;
use super::Engine;
use crate::aliases::{virtual_of, Linear, Linears};
use crate::collapse::{pointer_at, try_collapse};
use crate::deferred::{Deferred, Retired};
use crate::platform::Platform;
use crate::pte::Level;
use crate::reserve::FrameSource;
use crate::shootdown::{ShootdownSet, TlbShootdown};
use crate::tables::{PhysMem, Tables};
use crate::{Collapse, MAX_ALIASES};

const GIB: u64 = 1 << 30;

/// What [`Engine::compact`] collapsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompactReport {
    /// Tables replaced by 2 MiB leaves.
    pub collapses_2m: u64,
    /// Tables replaced by 1 GiB leaves.
    pub collapses_1g: u64,
}

/// The deferred list has no room for one more table.
pub(super) struct NeedRoom;

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Collapses what the conversion's frames and ranges touch: 2 MiB over
    /// all of it first, since a 1 GiB region qualifies only once its 2 MiB
    /// regions have collapsed. Called and returns with the table lock held;
    /// drops it only to make room for deferred frees.
    pub(super) fn collapse_all<'l>(&'l self, tx: &Tx<'_>, scratch: &mut [u64], lock: TableGuard<'l>) -> TableGuard<'l> {
        let linears = match self.config.collapse {
            Collapse::Never => return lock,
            Collapse::AfterEachConversion => true,
            // The linear mappings wait for `compact`; a mapped range's own
            // tables cannot be found later.
            Collapse::OnCompact if matches!(tx.frames, Frames::Mapped { .. }) => false,
            Collapse::OnCompact => return lock,
        };
        let levels = self.collapse_levels();
        if linears && self.nothing_to_collapse(tx, levels) {
            return lock;
        }
        self.with_room(lock, |deferred| {
            self.collapse_pass(tx, scratch, levels, linears, deferred)
        })
    }

    fn collapse_levels(&self) -> &'static [Level] {
        if self.config.collapse_1g {
            &[Level::Pd, Level::Pdpt]
        } else {
            &[Level::Pd]
        }
    }

    /// Collapses every table of the direct map and of the registered
    /// aliases that maps a uniform region (whatever made it uniform: the
    /// conversions since the last call, or the OS), then frees the tables
    /// it replaced after one shootdown. With [`Collapse::OnCompact`] this
    /// is what gives the direct map its huge leaves back; with any policy
    /// it tidies what the OS left collapsible. The report counts the
    /// collapses made while it ran (a conversion's on another CPU too).
    ///
    /// It holds the table lock for one 1 GiB region at a time; the cost is
    /// one read per 1 GiB region, one per 2 MiB region of a 1 GiB region
    /// that has a table, and a read of each table that may collapse (with
    /// [`StateTable::with_region_counts`](crate::StateTable::with_region_counts), only of tables whose frames are
    /// all private or all shared).
    pub fn compact(&self) -> CompactReport {
        let before = self.counters.snapshot();
        let (hold, snapshot) = self.aliases.enter();
        let linears = Linears {
            direct_map: self.config.direct_map,
            registered: snapshot.as_ref(),
        };
        let levels = self.collapse_levels();
        for (kind, alias) in linears.iter() {
            let any_table = matches!(kind, Linear::DirectMap);
            let offset = alias.va.wrapping_sub(alias.pa);
            // The last byte, not the end: a kernel-image alias may end at
            // the top of the address space.
            let Some(last) = alias
                .va
                .checked_add(alias.len)
                .map_or(Some(u64::MAX), |e| e.checked_sub(1))
            else {
                continue;
            };
            let mut gib = alias.va / GIB * GIB;
            while gib <= last {
                let lock = self.tables_lock.lock();
                let lock = self.with_room(lock, |deferred| {
                    let tables = self.tables();
                    for &level in levels {
                        // A 1 GiB region mapped by a leaf, or by nothing,
                        // has no table to collapse at 2 MiB.
                        if level == Level::Pd && pointer_at(&tables, gib, Level::Pdpt).is_none() {
                            continue;
                        }
                        // Every region the mapping touches, those its ends
                        // fall in too (a conversion there splits them).
                        let start = gib.max(alias.va);
                        let len = gib.saturating_add(GIB - 1).min(last) - start + 1;
                        self.collapse_regions(
                            &tables,
                            start,
                            len,
                            level,
                            any_table,
                            Some(offset),
                            deferred,
                            &mut None,
                        )?;
                    }
                    Ok(())
                });
                drop(lock);
                let Some(next) = gib.checked_add(GIB) else { break };
                gib = next;
            }
        }
        drop(hold);
        self.release_deferred_tables();
        let done = self.counters.snapshot().since(&before);
        CompactReport {
            collapses_2m: done.collapses_2m,
            collapses_1g: done.collapses_1g,
        }
    }

    /// Whether the region counts alone show that no region a linear
    /// conversion touches can collapse: then not one table is walked (the
    /// common case: most conversions leave their regions mixed).
    fn nothing_to_collapse(&self, tx: &Tx<'_>, levels: &[Level]) -> bool {
        let Frames::Linear { pa, len } = tx.frames else {
            return false;
        };
        levels.iter().all(|level| {
            let span = level.span();
            let mut region = pa / span * span;
            while region < pa + len {
                if self.states.may_be_uniform(region, span) {
                    return false;
                }
                region += span;
            }
            true
        })
    }

    /// Runs `pass` under the table lock until it finds room in the
    /// deferred list for every table it replaces: each time it runs out,
    /// the lock is dropped and room made with none held. Returns with the
    /// lock held.
    pub(super) fn with_room<'l>(
        &'l self,
        mut lock: TableGuard<'l>,
        mut pass: impl FnMut(&mut Deferred) -> Result<(), NeedRoom>,
    ) -> TableGuard<'l> {
        loop {
            if pass(&mut lock).is_ok() {
                return lock;
            }
            drop(lock);
            self.make_room();
            lock = self.tables_lock.lock();
        }
    }

    fn collapse_pass(
        &self,
        tx: &Tx<'_>,
        scratch: &mut [u64],
        levels: &[Level],
        linears: bool,
        deferred: &mut Deferred,
    ) -> Result<(), NeedRoom> {
        let tables = self.tables();
        for &level in levels {
            // The last region tried, per linear mapping: ranges come in
            // address order, so neighbours share regions.
            let mut last = [None; 1 + MAX_ALIASES];
            if linears {
                for_each_chunk(&tables, tx.frames, scratch, |chunk: Chunk<'_>| {
                    for (pa, len) in chunk.runs().iter() {
                        for (kind, alias) in tx.linears.iter() {
                            let (any_table, slot) = match kind {
                                Linear::DirectMap => (true, 0),
                                Linear::Registered(i) => (false, 1 + i),
                            };
                            if let Some((va, vlen)) = virtual_of(alias, pa, len) {
                                let linear = Some(alias.va.wrapping_sub(alias.pa));
                                let last = &mut last[slot];
                                self.collapse_regions(&tables, va, vlen, level, any_table, linear, deferred, last)?;
                            }
                        }
                    }
                    Ok(())
                })?;
            }
            if let Frames::Mapped { va, len } = tx.frames {
                self.collapse_regions(&tables, va, len, level, false, None, deferred, &mut None)?;
            }
        }
        Ok(())
    }

    /// Tries each `level`-sized region `[va, va + len)` touches. Outside the
    /// direct map (`any_table` false) only tables the engine's own splits
    /// made are replaced: the OS's layout there is the OS's. In a linear
    /// mapping (`linear`: its virtual minus physical offset) a region is
    /// tried only if its frames may all be on one side, which the state
    /// table's region counts tell without a walk; a mapping whose offset is
    /// not a multiple of the region size can never hold a huge leaf there.
    #[allow(clippy::too_many_arguments)]
    fn collapse_regions(
        &self,
        tables: &Tables<'_, M>,
        va: u64,
        len: u64,
        level: Level,
        any_table: bool,
        linear: Option<u64>,
        deferred: &mut Deferred,
        last: &mut Option<u64>,
    ) -> Result<(), NeedRoom> {
        let span = level.span();
        if linear.is_some_and(|offset| offset % span != 0) {
            return Ok(());
        }
        let mut region = va / span * span;
        while region < va.saturating_add(len) {
            let hopeless = linear.is_some_and(|offset| !self.states.may_be_uniform(region.wrapping_sub(offset), span));
            if *last != Some(region) && !hopeless {
                if !deferred.has_room(&self.mem) {
                    return Err(NeedRoom);
                }
                let replaceable = |table| any_table || self.states.is_table(table);
                // The counts follow the frames' states, which only a linear
                // mapping's attributes must agree with: a vmalloc-style
                // range may map a frame with the attribute it had.
                let uniform = |pa, span| linear.is_none() || self.states.may_be_uniform(pa, span);
                if let Some(table) = try_collapse(tables, region, level, replaceable, uniform) {
                    self.merges.fetch_add(1, Ordering::AcqRel);
                    self.counters.record_collapse(level);
                    let recorded = deferred.push(Retired { table, region, level }, &self.mem);
                    debug_assert!(recorded, "room was checked first");
                }
                *last = Some(region);
            }
            let Some(next) = region.checked_add(span) else { break };
            region = next;
        }
        Ok(())
    }

    /// With no lock held: a chain page for the deferred list, or, if none
    /// can be had, the pending frees done now.
    pub(super) fn make_room(&self) {
        let page = self
            .frames
            .allocate_frame()
            .and_then(|pa| match self.states.take_table(pa) {
                Ok(()) => Some(pa),
                Err(_) => {
                    self.frames.free_frame(pa);
                    None
                }
            });
        let mut deferred = self.tables_lock.lock();
        if let Some(pa) = page {
            deferred.add_chain_page(pa, &self.mem);
            return;
        }
        let pending = core::mem::replace(&mut *deferred, Deferred::new());
        drop(deferred);
        if !pending.is_empty() {
            let mut set = ShootdownSet::new();
            pending.add_regions(&self.mem, &mut set);
            self.shootdown(set.ranges());
            self.free_tables(pending);
        }
    }
}
