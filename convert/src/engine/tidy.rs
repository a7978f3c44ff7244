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
use crate::aliases::{virtual_of, Linear};
use crate::collapse::try_collapse;
use crate::deferred::{Deferred, Retired};
use crate::platform::Platform;
use crate::pte::Level;
use crate::reserve::FrameSource;
use crate::shootdown::{ShootdownSet, TlbShootdown};
use crate::tables::{PhysMem, Tables};
use crate::MAX_ALIASES;

/// The deferred list has no room for one more table.
pub(super) struct NeedRoom;

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Collapses what the conversion's frames and ranges touch: 2 MiB over
    /// all of it first, since a 1 GiB region qualifies only once its 2 MiB
    /// regions have collapsed. Called and returns with the table lock held;
    /// drops it only to make room for deferred frees.
    pub(super) fn collapse_all<'l>(&'l self, tx: &Tx<'_>, scratch: &mut [u64], lock: TableGuard<'l>) -> TableGuard<'l> {
        let levels: &[Level] = match (self.config.collapse, self.config.collapse_1g) {
            (false, _) => return lock,
            (true, false) => &[Level::Pd],
            (true, true) => &[Level::Pd, Level::Pdpt],
        };
        self.with_room(lock, |deferred| self.collapse_pass(tx, scratch, levels, deferred))
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
        deferred: &mut Deferred,
    ) -> Result<(), NeedRoom> {
        let tables = self.tables();
        for &level in levels {
            // The last region tried, per linear mapping: ranges come in
            // address order, so neighbours share regions.
            let mut last = [None; 1 + MAX_ALIASES];
            for_each_chunk(&tables, tx.frames, scratch, |chunk: Chunk<'_>| {
                for (pa, len) in chunk.runs().iter() {
                    for (kind, alias) in tx.linears.iter() {
                        let (any_table, slot) = match kind {
                            Linear::DirectMap => (true, 0),
                            Linear::Registered(i) => (false, 1 + i),
                        };
                        if let Some((va, vlen)) = virtual_of(alias, pa, len) {
                            self.collapse_regions(&tables, va, vlen, level, any_table, deferred, &mut last[slot])?;
                        }
                    }
                }
                Ok(())
            })?;
            if let Frames::Mapped { va, len } = tx.frames {
                self.collapse_regions(&tables, va, len, level, false, deferred, &mut None)?;
            }
        }
        Ok(())
    }

    /// Tries each `level`-sized region `[va, va + len)` touches. Outside the
    /// direct map (`any_table` false) only tables the engine's own splits
    /// made are replaced: the OS's layout there is the OS's.
    #[allow(clippy::too_many_arguments)]
    fn collapse_regions(
        &self,
        tables: &Tables<'_, M>,
        va: u64,
        len: u64,
        level: Level,
        any_table: bool,
        deferred: &mut Deferred,
        last: &mut Option<u64>,
    ) -> Result<(), NeedRoom> {
        let span = level.span();
        let mut region = va / span * span;
        while region < va + len {
            if *last != Some(region) {
                if !deferred.has_room(&self.mem) {
                    return Err(NeedRoom);
                }
                let replaceable = |table| any_table || self.states.is_table(table);
                if let Some(table) = try_collapse(tables, region, level, replaceable) {
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
