//! The conversion transaction (DESIGN.md, "The conversion transaction").
//!
//! Locking: per-frame state is claimed with atomic compare-and-swap, so
//! conversions of disjoint frames proceed in parallel and a conversion that
//! overlaps one in progress is refused before it changes anything. One
//! spin lock serialises page-table *changes* (planning and splitting,
//! not-present, present again, collapse); it is never held across a
//! hypercall, a shootdown, or a call into the OS's frame source, so
//! concurrent conversions overlap their expensive parts.

use core::sync::atomic::Ordering;

use spin::Mutex;

use crate::collapse::try_collapse;
use crate::counters::{CounterSnapshot, Counters};
use crate::deferred::Deferred;
use crate::platform::{Platform, PlatformError, PrivateMap, Runs};
use crate::policy::{FailureAction, FailurePolicy, ReportOnly};
use crate::pte::{EncryptionBit, Level, Visibility, PRESENT};
use crate::reserve::{FrameSource, Reserve};
use crate::shootdown::{ShootdownSet, TlbShootdown};
use crate::split::{leaf_at, split_at, tables_needed};
use crate::state::{PageState, StateTable};
use crate::tables::{PhysMem, Tables};
use crate::window::{ScratchWindow, WindowMap};

const PAGE: u64 = 4096;

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

impl DirectMap {
    fn pa_of(&self, va: u64, len: u64) -> Option<u64> {
        let offset = va.checked_sub(self.va)?;
        (offset.checked_add(len)? <= self.len).then_some(self.pa + offset)
    }
}

/// Another mapping of physical memory the OS wants kept consistent (e.g. a
/// kernel-image mapping of the same frames): `[pa, pa + len)` at `va`.
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

/// What to convert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Physical frames `[pa, pa + len)`.
    Physical {
        /// Start.
        pa: u64,
        /// Length.
        len: u64,
    },
    /// The frames mapped at `[va, va + len)`: a direct-map range, or a
    /// vmalloc-style range whose frames are found by walking its PTEs (and
    /// need not be contiguous); their direct-map and registered aliases are
    /// converted in the same transaction.
    Virtual {
        /// Start.
        va: u64,
        /// Length.
        len: u64,
    },
}

/// Why a conversion did not happen, or did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvertError {
    /// Empty, unaligned or wrapping range. Nothing changed.
    InvalidRange {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A page of a virtual range is not mapped. Nothing changed.
    NotMapped {
        /// The page.
        va: u64,
    },
    /// A frame is outside the state table. Nothing changed.
    UnknownFrame {
        /// The frame.
        pa: u64,
    },
    /// A frame is not in the state the conversion starts from (already
    /// converted, converting now, or poisoned). Nothing changed in this
    /// batch.
    Refused {
        /// The frame.
        pa: u64,
        /// Its state.
        state: PageState,
        /// Bytes converted by earlier batches of the same call.
        converted: u64,
    },
    /// The frame source could not supply the table pages the splits need.
    /// Nothing changed in this batch.
    OutOfTableMemory {
        /// Pages needed.
        needed: usize,
        /// Bytes converted by earlier batches of the same call.
        converted: u64,
    },
    /// The firmware or host failed. The batch's frames are poisoned: their
    /// mappings stay not present and they are never handed back.
    Platform {
        /// What failed.
        error: PlatformError,
        /// First frame of the failed batch.
        pa: u64,
        /// Bytes poisoned.
        poisoned: u64,
        /// Bytes converted by earlier batches of the same call.
        converted: u64,
    },
}

/// A successful conversion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Bytes converted.
    pub bytes: u64,
    /// Transactions it took (each with one shootdown).
    pub batches: u64,
}

/// Layout facts the engine needs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Physical address of the top-level table (CR3).
    pub root: u64,
    /// The direct map.
    pub direct_map: DirectMap,
    /// Collapse direct-map tables back into huge leaves after a conversion.
    pub collapse: bool,
    /// Allow collapsing into 1 GiB leaves (the CPU supports them).
    pub collapse_1g: bool,
}

/// A physical range and the virtual ranges of one batch.
#[derive(Clone, Copy)]
struct Batch<'s> {
    runs: Runs<'s>,
    vmalloc: Option<(u64, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AliasKind {
    DirectMap,
    Registered(usize),
    Vmalloc,
}

/// The conversion engine. `Sync`: conversions may run on several CPUs at
/// once (see the module docs for the locking).
pub struct Engine<'a, M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> {
    mem: M,
    frames: F,
    tlb: T,
    platform: P,
    config: Config,
    enc: EncryptionBit,
    states: StateTable<'a>,
    window: Option<&'a (dyn ScratchWindow + Sync)>,
    policy: &'a (dyn FailurePolicy + Sync),
    aliases: Mutex<[Option<Alias>; MAX_ALIASES]>,
    /// Aliases registered now: with none (the usual case) a transaction
    /// copies no snapshot.
    registered: core::sync::atomic::AtomicUsize,
    tables_lock: Mutex<Deferred>,
    counters: Counters,
}

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> core::fmt::Debug for Engine<'_, M, F, T, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("encryption", &self.enc)
            .finish_non_exhaustive()
    }
}

impl<'a, M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'a, M, F, T, P> {
    /// An engine over the page tables at `config.root`.
    pub fn new(config: Config, mem: M, frames: F, tlb: T, platform: P, states: StateTable<'a>) -> Self {
        Engine {
            enc: platform.encryption(),
            mem,
            frames,
            tlb,
            platform,
            config,
            states,
            window: None,
            policy: &ReportOnly,
            aliases: Mutex::new([None; MAX_ALIASES]),
            registered: core::sync::atomic::AtomicUsize::new(0),
            tables_lock: Mutex::new(Deferred::new()),
            counters: Counters::default(),
        }
    }

    /// Gives the engine the per-CPU private scratch window (needed by SNP).
    pub fn with_window(mut self, window: &'a (dyn ScratchWindow + Sync)) -> Self {
        self.window = Some(window);
        self
    }

    /// Sets the failure policy (default: [`ReportOnly`]).
    pub fn with_policy(mut self, policy: &'a (dyn FailurePolicy + Sync)) -> Self {
        self.policy = policy;
        self
    }

    /// The platform backend.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// The PTE encryption bit in use.
    pub fn encryption(&self) -> EncryptionBit {
        self.enc
    }

    /// Counters so far.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// The state of the frame at `pa`.
    pub fn state(&self, pa: u64) -> Option<PageState> {
        self.states.get(pa)
    }

    /// Frames per state: [private, shared, converting, poisoned].
    pub fn census(&self) -> [u64; 4] {
        self.states.census()
    }

    /// The physical address `va` maps to, if present.
    pub fn translate(&self, va: u64) -> Option<u64> {
        self.tables().translate(va)
    }

    /// Registers an extra alias; `None` if all slots are taken.
    pub fn register_alias(&self, alias: Alias) -> Option<usize> {
        let mut aliases = self.aliases.lock();
        let slot = aliases.iter().position(Option::is_none)?;
        aliases[slot] = Some(alias);
        self.registered.fetch_add(1, Ordering::AcqRel);
        Some(slot)
    }

    /// Forgets the alias registered as `id`.
    pub fn unregister_alias(&self, id: usize) {
        if let Some(slot) = self.aliases.lock().get_mut(id) {
            if slot.take().is_some() {
                self.registered.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Frees tables left by collapses after one shootdown. Conversions do
    /// this on their own; call it to return the memory sooner.
    pub fn release_deferred_tables(&self) {
        let pending = core::mem::replace(&mut *self.tables_lock.lock(), Deferred::new());
        if !pending.is_empty() {
            self.shootdown(&[]);
            self.free_tables(pending);
        }
    }

    fn tables(&self) -> Tables<'_, M> {
        Tables {
            mem: &self.mem,
            root: self.config.root,
            enc: self.enc,
        }
    }

    /// Converts `target` to `to`, with a 2 KiB on-stack scratch for the
    /// frames of vmalloc-style ranges (256 frames per transaction).
    pub fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        let mut scratch = [0u64; 256];
        self.convert_with_scratch(target, to, &mut scratch)
    }

    /// As [`convert`](Self::convert), with caller-provided scratch: a
    /// vmalloc-style range is converted in transactions of up to
    /// `scratch.len()` frames.
    pub fn convert_with_scratch(
        &self,
        target: Target,
        to: Visibility,
        scratch: &mut [u64],
    ) -> Result<Report, ConvertError> {
        let (addr, len) = match target {
            Target::Physical { pa, len } => (pa, len),
            Target::Virtual { va, len } => (va, len),
        };
        if len == 0 || (addr | len) % PAGE != 0 || addr.checked_add(len).is_none() || scratch.is_empty() {
            return Err(ConvertError::InvalidRange { addr, len });
        }
        let physical = match target {
            Target::Physical { pa, .. } => Some(pa),
            Target::Virtual { va, len } => self.config.direct_map.pa_of(va, len),
        };
        let report = match physical {
            Some(pa) => {
                if !self.states.covers(pa, len) {
                    return Err(ConvertError::UnknownFrame { pa });
                }
                self.transaction(
                    Batch {
                        runs: Runs::One { pa, len },
                        vmalloc: None,
                    },
                    to,
                    0,
                )?;
                Report { bytes: len, batches: 1 }
            }
            None => self.convert_vmalloc(addr, len, to, scratch)?,
        };
        Counters::add(&self.counters.conversions, 1);
        Ok(report)
    }

    fn convert_vmalloc(&self, va: u64, len: u64, to: Visibility, scratch: &mut [u64]) -> Result<Report, ConvertError> {
        // Check every page before changing any: a hole or an unknown frame
        // anywhere refuses the whole range.
        let tables = self.tables();
        for page in (va..va + len).step_by(PAGE as usize) {
            let pa = tables.translate(page).ok_or(ConvertError::NotMapped { va: page })?;
            if self.states.get(pa).is_none() {
                return Err(ConvertError::UnknownFrame { pa });
            }
        }
        let mut report = Report::default();
        let chunk = scratch.len() as u64 * PAGE;
        let mut start = va;
        while start < va + len {
            let end = (start + chunk).min(va + len);
            let mut n = 0;
            for page in (start..end).step_by(PAGE as usize) {
                scratch[n] = tables.translate(page).ok_or(ConvertError::NotMapped { va: page })?;
                n += 1;
            }
            let frames = &mut scratch[..n];
            frames.sort_unstable();
            let n = dedup_sorted(frames);
            let batch = Batch {
                runs: Runs::Frames(&scratch[..n]),
                vmalloc: Some((start, end - start)),
            };
            self.transaction(batch, to, report.bytes)?;
            report.bytes += end - start;
            report.batches += 1;
            start = end;
        }
        Ok(report)
    }

    /// One transaction: claim, plan and reserve, split, not-present,
    /// shootdown, host calls, present with the new attribute, collapse.
    fn transaction(&self, batch: Batch<'_>, to: Visibility, converted: u64) -> Result<(), ConvertError> {
        let from = PageState::of(to.other());
        self.claim(batch.runs, from)
            .map_err(|(pa, state)| ConvertError::Refused { pa, state, converted })?;
        let registered = (self.registered.load(Ordering::Acquire) > 0).then(|| *self.aliases.lock());
        let aliases = Aliases {
            direct_map: self.config.direct_map,
            registered: registered.as_ref(),
        };
        let tables = self.tables();
        let mut shootdown = ShootdownSet::new();

        // Plan, reserve, split and unmap under the table lock; the frame
        // source is called with it held only for the reservation, which
        // must stay consistent with the plan.
        let pending_frees = {
            let mut deferred = self.tables_lock.lock();
            let needed = self.plan(&tables, batch, &aliases);
            let mut reserve = Reserve::new();
            if !reserve.fill(needed, &self.mem, &self.frames) {
                drop(deferred);
                self.release_claims(batch.runs, from);
                return Err(ConvertError::OutOfTableMemory { needed, converted });
            }
            self.for_each_alias(batch, &aliases, |_, va, len| {
                let split = split_at(&tables, va, &mut reserve, &self.counters)
                    && split_at(&tables, va + len, &mut reserve, &self.counters);
                debug_assert!(split, "the plan reserved every table a split needs");
                self.set_leaves(&tables, va, len, None);
                shootdown.add(va, len);
            });
            reserve.release(&self.mem, &self.frames);
            (!deferred.is_empty()).then(|| core::mem::replace(&mut *deferred, Deferred::new()))
        };
        if !shootdown.is_empty() || pending_frees.is_some() {
            self.shootdown(shootdown.ranges());
        }
        if let Some(pending) = pending_frees {
            self.free_tables(pending);
        }

        // From here on no alias of the batch is present: a stray access
        // takes an ordinary #PF.
        let result = {
            let mut window = self.window.and_then(|w| WindowMap::new(&tables, w));
            let window = window.as_mut().map(|w| w as &mut dyn PrivateMap);
            // SAFETY: every alias of every frame is not present, the
            // shootdown has completed, and the frames are claimed by this
            // transaction: nothing can rely on their contents.
            unsafe { self.platform.convert(batch.runs, to, window, &self.counters) }
        };
        if let Err(error) = result {
            return Err(self.poison(batch, error, converted));
        }

        {
            let mut deferred = self.tables_lock.lock();
            self.for_each_alias(batch, &aliases, |_, va, len| {
                self.set_leaves(&tables, va, len, Some(to))
            });
            // Only once every alias is present again can a table qualify.
            // 2 MiB over the whole batch first: a 1 GiB region qualifies only
            // once its 2 MiB regions have collapsed.
            let levels: &[Level] = match (self.config.collapse, self.config.collapse_1g) {
                (false, _) => &[],
                (true, false) => &[Level::Pd],
                (true, true) => &[Level::Pd, Level::Pdpt],
            };
            for &level in levels {
                let mut last = None;
                self.for_each_alias(batch, &aliases, |kind, va, len| {
                    if kind == AliasKind::DirectMap {
                        self.collapse(&tables, va, len, level, &mut deferred, &mut last);
                    }
                });
            }
        }
        for pa in batch.runs.frames() {
            self.states.settle(pa, PageState::of(to));
        }
        Ok(())
    }

    fn claim(&self, runs: Runs<'_>, from: PageState) -> Result<(), (u64, PageState)> {
        for pa in runs.frames() {
            if let Err(found) = self.states.claim(pa, from) {
                for claimed in runs.frames().take_while(|&f| f != pa) {
                    self.states.settle(claimed, from);
                }
                return Err((pa, found.unwrap_or(PageState::Poisoned)));
            }
        }
        Ok(())
    }

    fn release_claims(&self, runs: Runs<'_>, from: PageState) {
        for pa in runs.frames() {
            self.states.settle(pa, from);
        }
    }

    /// Table pages the splits of this batch need (see `split::tables_needed`):
    /// each alias's boundaries in ascending order, counted alias by alias.
    fn plan(&self, tables: &Tables<'_, M>, batch: Batch<'_>, aliases: &Aliases<'_>) -> usize {
        let from_linear: usize = aliases
            .linear()
            .map(|(_, alias)| tables_needed(tables, overlaps(batch.runs, alias).flat_map(|(va, len)| [va, va + len])))
            .sum();
        let from_vmalloc = batch
            .vmalloc
            .map_or(0, |(va, len)| tables_needed(tables, [va, va + len].into_iter()));
        from_linear + from_vmalloc
    }

    /// Calls `f` with every virtual range that maps frames of the batch.
    fn for_each_alias(&self, batch: Batch<'_>, aliases: &Aliases<'_>, mut f: impl FnMut(AliasKind, u64, u64)) {
        for (kind, alias) in aliases.linear() {
            for (va, len) in overlaps(batch.runs, alias) {
                f(kind, va, len);
            }
        }
        if let Some((va, len)) = batch.vmalloc {
            f(AliasKind::Vmalloc, va, len);
        }
    }

    /// Walks the leaves of `[va, va + len)` (already split to fit) and makes
    /// each not present (`to == None`) or present with `to`'s encryption
    /// bits.
    fn set_leaves(&self, tables: &Tables<'_, M>, va: u64, len: u64, to: Option<Visibility>) {
        let end = va + len;
        let mut cursor = va;
        let mut writes = 0;
        while cursor < end {
            let Some((level, loc, _)) = leaf_at(tables, cursor) else {
                cursor = (cursor / PAGE + 1) * PAGE;
                continue;
            };
            // One walk per table: run along its entries while they are
            // leaves of the same level inside the range.
            for slot in &tables.entries(loc.table)[loc.index..] {
                if cursor >= end {
                    break;
                }
                let entry = slot.load(Ordering::Acquire);
                let leaf_shaped = entry != 0 && (level == Level::Pt || entry & crate::pte::HUGE != 0);
                if !leaf_shaped {
                    break;
                }
                debug_assert!(
                    cursor % level.span() == 0 && cursor + level.span() <= end,
                    "split to fit"
                );
                match to {
                    // A plain store, not a locked and: the table lock keeps
                    // other CPUs' software out, and an accessed/dirty bit
                    // the hardware sets meanwhile is moot for a page whose
                    // contents the conversion destroys.
                    None => slot.store(entry & !PRESENT, Ordering::Release),
                    Some(side) => {
                        slot.store(
                            (entry & !self.enc.mask()) | self.enc.bits_for(side) | PRESENT,
                            Ordering::Release,
                        );
                    }
                }
                writes += 1;
                cursor += level.span();
            }
        }
        Counters::add(&self.counters.pte_writes, writes);
    }

    /// Collapses the tables of the `level`-sized regions `[va, va + len)`
    /// touches. `last` remembers the last region tried in this pass: ranges
    /// come in address order, so neighbours share regions and each is
    /// looked at once.
    fn collapse(
        &self,
        tables: &Tables<'_, M>,
        va: u64,
        len: u64,
        level: Level,
        deferred: &mut Deferred,
        last: &mut Option<u64>,
    ) {
        let span = level.span();
        let mut region = va / span * span;
        while region < va + len {
            if *last != Some(region) {
                *last = Some(region);
                if let Some(table) = try_collapse(tables, region, level) {
                    self.counters.record_collapse(level);
                    if !deferred.push(table, &self.mem, &self.frames) {
                        // No room to wait: make the pending frees safe now.
                        self.shootdown(&[]);
                        self.free_tables(core::mem::replace(deferred, Deferred::new()));
                        let _ = deferred.push(table, &self.mem, &self.frames);
                    }
                }
            }
            region += span;
        }
    }

    fn poison(&self, batch: Batch<'_>, error: PlatformError, converted: u64) -> ConvertError {
        for pa in batch.runs.frames() {
            self.states.settle(pa, PageState::Poisoned);
        }
        Counters::add(&self.counters.failures, 1);
        let first = batch.runs.iter().next().map_or(0, |(pa, _)| pa);
        let err = ConvertError::Platform {
            error,
            pa: first,
            poisoned: batch.runs.bytes(),
            converted,
        };
        log::error!("conversion failed, frames poisoned: {err:?}");
        if let FailureAction::Terminate { reason } = self.policy.on_failure(&err) {
            self.platform.terminate(reason);
        }
        err
    }

    fn shootdown(&self, ranges: &[crate::VaRange]) {
        Counters::add(&self.counters.shootdowns, 1);
        self.tlb.shootdown(ranges);
    }

    fn free_tables(&self, deferred: Deferred) {
        deferred.free_all(&self.mem, &self.frames, || self.counters.record_table_freed());
    }
}

/// The linear mappings of RAM a transaction keeps consistent: the direct map
/// and a snapshot of the registered aliases (none taken when none exist).
struct Aliases<'s> {
    direct_map: DirectMap,
    registered: Option<&'s [Option<Alias>; MAX_ALIASES]>,
}

impl Aliases<'_> {
    fn linear(&self) -> impl Iterator<Item = (AliasKind, Alias)> + '_ {
        let dm = self.direct_map;
        let registered = self.registered.into_iter().flat_map(|all| {
            all.iter()
                .enumerate()
                .filter_map(|(i, a)| a.map(|a| (AliasKind::Registered(i), a)))
        });
        core::iter::once((
            AliasKind::DirectMap,
            Alias {
                va: dm.va,
                pa: dm.pa,
                len: dm.len,
            },
        ))
        .chain(registered)
    }
}

/// The virtual ranges of `alias` that map frames of `runs`, ascending.
fn overlaps(runs: Runs<'_>, alias: Alias) -> impl Iterator<Item = (u64, u64)> + '_ {
    runs.iter().filter_map(move |(pa, len)| {
        let start = pa.max(alias.pa);
        let end = (pa + len).min(alias.pa.saturating_add(alias.len));
        (start < end).then(|| (alias.va + (start - alias.pa), end - start))
    })
}

fn dedup_sorted(frames: &mut [u64]) -> usize {
    let mut n = 0;
    for i in 0..frames.len() {
        if n == 0 || frames[i] != frames[n - 1] {
            frames[n] = frames[i];
            n += 1;
        }
    }
    n
}
