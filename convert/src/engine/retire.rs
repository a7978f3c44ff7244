//! Taking a registered alias out of service, so that the OS may reuse its
//! range the moment [`Engine::unregister_alias`] returns and no conversion
//! ever meets it mapping a frame with a stale attribute.

use core::sync::atomic::Ordering;

use super::tidy::NeedRoom;
use super::Engine;
use crate::collapse::pointer_at;
use crate::deferred::{Deferred, Retired};
use crate::leaves::{for_each_entry, is_leaf};
use crate::platform::Platform;
use crate::pte::{Level, PRESENT};
use crate::reserve::FrameSource;
use crate::shootdown::{TlbShootdown, VaRange};
use crate::tables::PhysMem;
use crate::Alias;

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Makes every leaf of the retiring `alias` not present, then shoots
    /// its range down: conversions that start once it is removed do not
    /// know it, so it must map nothing by then. A leaf that reaches past
    /// either end of the alias also maps the OS's memory there, and is left
    /// alone.
    pub(super) fn unmap_retiring(&self, alias: Alias) {
        let mut writes = 0;
        let end = alias.va + alias.len;
        {
            let _lock = self.tables_lock.lock();
            for_each_entry(&self.tables(), alias.va, alias.len, |level, slot, cursor, _| {
                let entry = slot.load(Ordering::Acquire);
                let start = cursor - cursor % level.span();
                let inside = start >= alias.va && start.checked_add(level.span()).is_some_and(|e| e <= end);
                if inside && entry & PRESENT != 0 && is_leaf(level, entry) {
                    slot.store(entry & !PRESENT, Ordering::Release);
                    writes += 1;
                }
            });
        }
        crate::Counters::add(&self.counters.pte_writes, writes);
        self.shootdown(&[VaRange {
            va: alias.va,
            len: alias.len,
        }]);
    }

    /// Once no conversion knows `alias`: unlinks the engine's own tables
    /// its splits left inside it (the OS frees only its own), and frees
    /// them after a shootdown.
    pub(super) fn detach_tables(&self, alias: Alias) {
        drop(self.with_room(self.tables_lock.lock(), |deferred| self.detach_pass(alias, deferred)));
        self.release_deferred_tables();
    }

    /// 2 MiB regions first: an engine page directory under a 1 GiB region
    /// may point to engine page tables.
    fn detach_pass(&self, alias: Alias, deferred: &mut Deferred) -> Result<(), NeedRoom> {
        let tables = self.tables();
        for level in [Level::Pd, Level::Pdpt] {
            let span = level.span();
            let end = alias.va + alias.len;
            let mut next = alias.va.checked_next_multiple_of(span);
            while let Some(region) = next.filter(|&r| r.checked_add(span).is_some_and(|stop| stop <= end)) {
                if let Some(loc) = pointer_at(&tables, region, level) {
                    let pointer = tables.load(loc);
                    let table = tables.enc.address(pointer, Level::Pt);
                    if self.states.is_table(table) {
                        if !deferred.has_room(&self.mem) {
                            return Err(NeedRoom);
                        }
                        tables.slot(loc).store(pointer & !PRESENT, Ordering::Release);
                        let pushed = deferred.push(Retired { table, region, level }, &self.mem);
                        debug_assert!(pushed, "room was checked first");
                    }
                }
                next = region.checked_add(span);
            }
        }
        Ok(())
    }
}
