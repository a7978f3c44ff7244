//! The conversion engine: its configuration, its public calls, and what the
//! OS must provide. The transaction itself is in `transaction`, the
//! collapse and the deferred frees in `tidy`.
//!
//! Locking: per-frame state is claimed with atomic compare-and-swap, so
//! conversions of disjoint frames proceed in parallel and a conversion that
//! overlaps one in progress is refused before it changes anything. One
//! spin lock serialises page-table *changes* (splitting, not-present,
//! present again, collapse); it is never held across a hypercall, a
//! shootdown, or a call into the OS's frame source, so concurrent
//! conversions overlap their expensive parts.

mod accept;
mod caller_memory;
mod error;
mod frames;
mod quarantine;
mod retire;
mod table_lock;
mod tidy;
mod transaction;
mod unshare;

use crate::sync::AtomicU64;

use crate::aliases::{AliasRegistry, Linears};
use crate::counters::{CounterSnapshot, Counters};
use crate::deferred::Deferred;
use crate::platform::Platform;
use crate::policy::{FailurePolicy, ReportOnly};
use crate::pte::{EncryptionBit, Paging, Visibility};
use crate::reserve::FrameSource;
use crate::shootdown::{ShootdownSet, TlbShootdown};
use crate::state::{PageState, StateTable};
use crate::tables::{PhysMem, Tables};
use crate::window::ScratchWindow;
use crate::{Alias, AliasError, DirectMap};

pub use accept::{AcceptMemoryError, AcceptReport};
pub use error::{ConvertError, Report};
use frames::Frames;
#[cfg(feature = "lock-stats")]
pub use table_lock::LockStats;
use table_lock::TableLock;
pub use tidy::CompactReport;
pub use unshare::UnshareReport;

const PAGE: u64 = 4096;

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
    /// The frames mapped at `[va, va + len)`. Inside the direct map or a
    /// registered alias, the same as [`Target::Physical`] of the frames
    /// that mapping covers. Elsewhere a vmalloc-style range: its frames are
    /// found by walking its entries (they need not be contiguous, and one
    /// may appear twice: it is converted once), every page must be mapped,
    /// and the range, its frames' direct-map and registered aliases convert
    /// in one transaction.
    Virtual {
        /// Start.
        va: u64,
        /// Length.
        len: u64,
    },
}

/// Layout facts the engine needs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Physical address of the top-level table (CR3): a PML4, or a PML5
    /// with 5-level paging.
    pub root: u64,
    /// How many levels the tables at `root` have: [`Paging::Four`], or
    /// [`Paging::Five`] when the CPU runs with CR4.LA57 set
    /// ([`Paging::from_cr4`]). It decides where every walk starts and which
    /// virtual addresses are canonical (48 or 57 bits); a PML5 entry, like
    /// a PML4 entry, always points to a table.
    pub paging: Paging,
    /// The direct map. It must be canonical for `paging`, or every
    /// conversion is refused with [`ConvertError::InvalidRange`] naming it
    /// (a 5-level direct map with `paging` left at four levels would be
    /// walked with the wrong indices).
    pub direct_map: DirectMap,
    /// When tables go back into huge leaves: in the direct map any table,
    /// elsewhere only tables the engine's own splits made. See
    /// [`Collapse`].
    pub collapse: Collapse,
    /// Allow collapsing into 1 GiB leaves (the CPU supports them).
    pub collapse_1g: bool,
}

/// When the engine gives the direct map (and registered aliases) their huge
/// leaves back after conversions split them.
///
/// A table can collapse once all its 512 entries map one aligned region
/// with one attribute again. Collapsing at once keeps the direct map whole
/// at every moment, but a region that is converted over and over (buffers
/// of a driver allocated and freed in the same few megabytes) then pays a
/// split and a collapse each time it changes between uniform and mixed;
/// deferring the collapse to [`Engine::compact`], called when the churn
/// stops (an idle CPU, a periodic worker, after a burst of I/O), splits
/// such a region once, as an engine that never collapses would, and still
/// ends with the direct map whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collapse {
    /// Never: the direct map stays split where conversions split it (what
    /// Linux does).
    Never,
    /// At the end of every conversion, in the regions it touched.
    AfterEachConversion,
    /// Only when [`Engine::compact`] is called, except the engine's own
    /// splits inside a vmalloc-style range, which collapse with the
    /// conversion that makes them uniform (nothing else can find them).
    OnCompact,
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
    unaccepted: Option<crate::unaccepted::UnacceptedBitmap<'a>>,
    window: Option<&'a (dyn ScratchWindow + Sync)>,
    policy: &'a (dyn FailurePolicy + Sync),
    aliases: AliasRegistry,
    tables_lock: TableLock,
    /// Bumped under the table lock by every change that can merge leaves
    /// (a collapse, an OS change through `with_table_lock`): a conversion
    /// planned before a bump plans again.
    merges: AtomicU64,
    /// Conversions in flight, and [`unshare::STOPPED`] once
    /// [`unshare_all`](Engine::unshare_all) has begun.
    gate: AtomicU64,
    /// Frames shared now, by the engine's own count: every conversion adds
    /// or takes away what it converted, to be checked against the state
    /// table when everything is made private again.
    shared_frames: AtomicU64,
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
            shared_frames: AtomicU64::new(states.census().shared),
            gate: AtomicU64::new(0),
            enc: platform.encryption(),
            mem,
            frames,
            tlb,
            platform,
            config,
            states,
            unaccepted: None,
            window: None,
            policy: &ReportOnly,
            aliases: AliasRegistry::new(),
            tables_lock: TableLock::new(),
            merges: AtomicU64::new(0),
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

    /// The table lock's acquisitions and hold time, counted while
    /// [`Engine::record_lock_stats`] was on: how much of a conversion runs
    /// serialised against other CPUs' conversions. Only with the
    /// `lock-stats` feature.
    #[cfg(feature = "lock-stats")]
    pub fn lock_stats(&self) -> LockStats {
        self.tables_lock.stats()
    }

    /// Starts (`true`) or stops counting and timing the table lock's
    /// acquisitions for [`Engine::lock_stats`]. Off when the engine is
    /// created: each acquisition then costs one relaxed load more than
    /// without the feature; on, two TSC reads and two shared atomic
    /// additions. A hold that began before the switch is not counted.
    #[cfg(feature = "lock-stats")]
    pub fn record_lock_stats(&self, on: bool) {
        self.tables_lock.record_stats(on);
    }

    /// The state of the frame at `pa`.
    pub fn state(&self, pa: u64) -> Option<PageState> {
        self.states.get(pa)
    }

    /// How many frames are in each state.
    pub fn census(&self) -> crate::state::Census {
        self.states.census()
    }

    /// The physical address `va` maps to, if present. Walks under the table
    /// lock, so it never follows a table a collapse is freeing.
    pub fn translate(&self, va: u64) -> Option<u64> {
        let _lock = self.tables_lock.lock();
        self.tables().translate(va)
    }

    /// Registers an extra linear alias of RAM. It takes part in the
    /// conversions that start after this returns; the OS must not map it
    /// while a conversion of its frames is in flight.
    pub fn register_alias(&self, alias: Alias) -> Result<usize, AliasError> {
        self.aliases.register(alias, self.config.direct_map, self.config.paging)
    }

    /// Takes the alias registered as `id` out of service: makes every
    /// entry of it not present (one shootdown), waits until no conversion
    /// that may write through it is in flight, and unlinks and frees the
    /// page tables the engine's own splits left in it. When this returns the
    /// alias maps nothing and holds none of the engine's tables: the OS may
    /// free its own tables of the range and reuse it. Until then no
    /// conversion converts a frame the alias still maps present.
    ///
    /// It waits for conversions on other CPUs, so the caller must not hold
    /// anything those wait for (interrupts off while a conversion's
    /// shootdown needs this CPU, say).
    pub fn unregister_alias(&self, id: usize) -> Option<Alias> {
        self.aliases.unregister(
            id,
            |alias| self.unmap_retiring(alias),
            |alias| self.detach_tables(alias),
        )
    }

    /// Runs `f` with the table lock held: the only way an OS may change
    /// entries of the direct map or of registered aliases (for frames no
    /// conversion owns) while conversions can run. `f` must not call into
    /// the engine, and must not split or merge the tables of frames a
    /// conversion owns.
    pub fn with_table_lock<R>(&self, f: impl FnOnce() -> R) -> R {
        let _lock = self.tables_lock.lock();
        let r = f();
        self.merges.fetch_add(1, core::sync::atomic::Ordering::AcqRel);
        r
    }

    /// Whether some CPU holds the table lock now. For an OS's own
    /// instrumentation: the engine never calls the frame source or the
    /// shootdown with it held.
    #[doc(hidden)]
    pub fn table_lock_held(&self) -> bool {
        self.tables_lock.is_locked()
    }

    /// Frees tables left by collapses after one shootdown that covers their
    /// regions. Conversions do this on their own; call it to return the
    /// memory sooner.
    pub fn release_deferred_tables(&self) {
        let pending = core::mem::replace(&mut *self.tables_lock.lock(), Deferred::new());
        if !pending.is_empty() {
            let mut set = ShootdownSet::new();
            pending.add_regions(&self.mem, &mut set);
            self.shootdown(set.ranges());
            self.free_tables(pending);
        }
    }

    /// Converts `target` to `to`, with a 2 KiB on-stack scratch for the
    /// frames of vmalloc-style ranges (256 extents per host call).
    pub fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        let mut scratch = [0u64; 256];
        self.convert_with_scratch(target, to, &mut scratch)
    }

    /// As [`convert`](Self::convert), with caller-provided scratch: the
    /// frames of a vmalloc-style range go to the host `scratch.len()`
    /// extents at a time (an extent is a contiguous run of up to 16 MiB).
    /// The scratch size sets the number of host calls; the conversion is
    /// the same one transaction (a small scratch may only split, and later
    /// collapse, a direct-map leaf between physically adjacent frames the
    /// range maps far apart). The engine writes and reads the scratch after
    /// the frames are unmapped, so a vmalloc-style range's scratch must lie
    /// in private memory outside the range's frames, or the conversion is
    /// refused with [`ConvertError::CallerMemoryNotPrivate`] (a linear
    /// range does not use it); the OS must not convert the scratch's frame
    /// while the call runs.
    pub fn convert_with_scratch(
        &self,
        target: Target,
        to: Visibility,
        scratch: &mut [u64],
    ) -> Result<Report, ConvertError> {
        if !self.enter_conversion() {
            return Err(ConvertError::Stopped);
        }
        let result = self.convert_ungated(target, to, scratch);
        self.leave_conversion();
        result
    }

    /// Converts a list of frames to `to` in one transaction: a kernel's
    /// scatterlist or page array, frames anywhere in RAM that no virtual
    /// range of their own maps.
    ///
    /// `frames` holds the physical address of each 4 KiB frame, strictly
    /// ascending: sorted, no frame twice. (An unordered list can be put
    /// right in place, without a heap: `frames.sort_unstable()`, then
    /// `dedup` if a frame may repeat.) Frames adjacent in memory form one
    /// run, which the host is told about as one.
    ///
    /// The list is one transaction, as a range is with
    /// [`convert`](Self::convert): every frame is claimed or none; every
    /// linear alias of every frame (the direct map, the registered
    /// aliases) is split to fit and made not present, under one TLB
    /// shootdown for the whole list; the host is asked in requests as
    /// large as its ABI allows (on SEV-SNP up to 253 page state entries an
    /// exit, on TDX one MapGPA per run), however long the list; then every
    /// alias is made present with the new attribute and what can be
    /// collapsed is. The list is read where it is: no scratch, no heap.
    ///
    /// The OS promises what it promises for every conversion: it changes
    /// no entry that maps a listed frame until the call returns, and maps
    /// the frames nowhere but in the direct map and registered aliases (a
    /// vmalloc buffer converts through its own address, with
    /// [`Target::Virtual`], or its mapping keeps the old attribute).
    ///
    /// The list itself must lie in private memory outside its own frames:
    /// the engine reads it on every pass, after the frames are unmapped and
    /// while the host holds them, and memory shared with the host could be
    /// rewritten between passes. The engine refuses a list that does not
    /// (it finds the list's frames with [`PhysMem::phys_of`], or else by
    /// walking its tables), before it reads a word of it where the frame is
    /// not private; the OS must not start converting the list's frames
    /// while the call runs.
    ///
    /// # Errors
    ///
    /// Nothing changed (every entry and every frame's state is as before
    /// the call) with:
    /// - [`ConvertError::Stopped`]: conversions are stopped for good;
    /// - [`ConvertError::InvalidRange`] with `len` 0: `frames` is empty
    ///   (with the direct map's `va` and `len`: the configured paging does
    ///   not translate the direct map);
    /// - [`ConvertError::InvalidFrame`]: a frame is not 4 KiB aligned, not
    ///   above the one before it, or the last page of the address space;
    /// - [`ConvertError::UnknownFrame`]: the first frame the state table
    ///   does not cover;
    /// - [`ConvertError::Refused`]: the first frame not settled on the
    ///   other side of `to` (converted already, converting now, poisoned,
    ///   a page-table page, unaccepted);
    /// - [`ConvertError::CallerMemoryNotPrivate`]: the list lies in one of
    ///   its own frames, in shared memory, or in a frame another conversion
    ///   has in flight;
    /// - [`ConvertError::OutOfTableMemory`],
    ///   [`ConvertError::UnusableTableFrame`],
    ///   [`ConvertError::NoScratchWindow`], as for a range.
    ///
    /// [`ConvertError::Platform`] means the host or firmware failed a
    /// request. Its frames are poisoned: not present in any alias, never
    /// handed back. Frames of the requests before it are converted and
    /// mapped with the new attribute; frames after it never reached the
    /// host and are mapped as they were. A huge leaf of an alias whose
    /// frames ended up on both sides can be mapped neither way: its frames
    /// are poisoned too. The error names the failed request's first frame
    /// and counts the frames poisoned and converted; [`state`](Self::state)
    /// tells each frame's fate.
    pub fn convert_frames(&self, frames: &[u64], to: Visibility) -> Result<Report, ConvertError> {
        if !self.enter_conversion() {
            return Err(ConvertError::Stopped);
        }
        let result = self.convert_list(frames, to);
        self.leave_conversion();
        result
    }

    fn convert_list(&self, frames: &[u64], to: Visibility) -> Result<Report, ConvertError> {
        self.check_direct_map()?;
        if frames.is_empty() {
            return Err(ConvertError::InvalidRange { addr: 0, len: 0 });
        }
        self.check_list_before_reading(frames)?;
        let mut floor = 0;
        for (index, &pa) in frames.iter().enumerate() {
            let next = pa.checked_add(PAGE).filter(|_| pa % PAGE == 0 && pa >= floor);
            floor = next.ok_or(ConvertError::InvalidFrame { index, pa })?;
        }
        let (hold, snapshot) = self.aliases.enter();
        let linears = Linears {
            direct_map: self.config.direct_map,
            registered: snapshot.as_ref(),
        };
        // A list needs no scratch: its passes read it in place.
        let report = self.transaction(Frames::List(frames), to, linears, &mut []);
        drop(hold);
        if report.is_ok() {
            Counters::add(&self.counters.conversions, 1);
        }
        report
    }

    /// A conversion, whether or not conversions are stopped.
    fn convert_ungated(&self, target: Target, to: Visibility, scratch: &mut [u64]) -> Result<Report, ConvertError> {
        let (addr, len) = match target {
            Target::Physical { pa, len } => (pa, len),
            Target::Virtual { va, len } => (va, len),
        };
        self.check_direct_map()?;
        let invalid = ConvertError::InvalidRange { addr, len };
        if len == 0 || (addr | len) % PAGE != 0 || addr.checked_add(len).is_none() || scratch.is_empty() {
            return Err(invalid);
        }
        if matches!(target, Target::Virtual { .. }) && !crate::aliases::canonical_range(addr, len, self.config.paging) {
            return Err(invalid);
        }
        let (hold, snapshot) = self.aliases.enter();
        let linears = Linears {
            direct_map: self.config.direct_map,
            registered: snapshot.as_ref(),
        };
        let frames = match target {
            Target::Physical { pa, len } => Frames::Linear { pa, len },
            Target::Virtual { va, len } => match linears.physical(va, len) {
                Ok(Some(pa)) => Frames::Linear { pa, len },
                Ok(None) => Frames::Mapped { va, len },
                Err(()) => return Err(invalid),
            },
        };
        let report = self.transaction(frames, to, linears, scratch);
        drop(hold);
        if report.is_ok() {
            Counters::add(&self.counters.conversions, 1);
        }
        report
    }

    /// Refuses a direct map the configured paging does not translate.
    pub(super) fn check_direct_map(&self) -> Result<(), ConvertError> {
        let DirectMap { va, len, .. } = self.config.direct_map;
        if len == 0
            || va
                .checked_add(len)
                .is_some_and(|_| crate::aliases::canonical_range(va, len, self.config.paging))
        {
            return Ok(());
        }
        Err(ConvertError::InvalidRange { addr: va, len })
    }

    fn tables(&self) -> Tables<'_, M> {
        Tables {
            mem: &self.mem,
            root: self.config.root,
            paging: self.config.paging,
            enc: self.enc,
        }
    }

    fn shootdown(&self, ranges: &[crate::VaRange]) {
        Counters::add(&self.counters.shootdowns, 1);
        self.tlb.shootdown(ranges);
    }

    fn free_tables(&self, deferred: Deferred) {
        deferred.free_all(&self.mem, &self.frames, &self.states, |engines| {
            if engines {
                self.counters.record_table_freed()
            } else {
                self.counters.record_os_table_retired()
            }
        });
    }
}
