//! Counters the OS and benchmarks can read.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::pte::Level;

/// Running totals since the engine was created. Read with
/// [`Engine::counters`](crate::Engine::counters).
#[derive(Default, Debug)]
pub struct Counters {
    pub(crate) map_gpa: AtomicU64,
    pub(crate) accept: AtomicU64,
    pub(crate) psc_exits: AtomicU64,
    pub(crate) psc_entries: AtomicU64,
    pub(crate) psc_msr: AtomicU64,
    pub(crate) pvalidate: AtomicU64,
    pub(crate) shootdowns: AtomicU64,
    pub(crate) splits_1g: AtomicU64,
    pub(crate) splits_2m: AtomicU64,
    pub(crate) collapses_2m: AtomicU64,
    pub(crate) collapses_1g: AtomicU64,
    pub(crate) table_pages_taken: AtomicU64,
    pub(crate) table_pages_freed: AtomicU64,
    pub(crate) os_tables_retired: AtomicU64,
    pub(crate) pte_writes: AtomicU64,
    pub(crate) conversions: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) units_accepted: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// TDG.VP.VMCALL\<MapGPA\> calls.
    pub map_gpa: u64,
    /// TDG.MEM.PAGE.ACCEPT calls.
    pub accept: u64,
    /// Page State Change NAE exits (GHCB).
    pub psc_exits: u64,
    /// Page State Change entries sent through the GHCB.
    pub psc_entries: u64,
    /// Page State Change requests through the GHCB MSR protocol.
    pub psc_msr: u64,
    /// PVALIDATE executions.
    pub pvalidate: u64,
    /// TLB shootdowns requested.
    pub shootdowns: u64,
    /// 1 GiB leaves split into 2 MiB.
    pub splits_1g: u64,
    /// 2 MiB leaves split into 4 KiB.
    pub splits_2m: u64,
    /// Page tables collapsed into 2 MiB leaves.
    pub collapses_2m: u64,
    /// Page directories collapsed into 1 GiB leaves.
    pub collapses_1g: u64,
    /// Table pages taken from the frame source for splits.
    pub table_pages_taken: u64,
    /// Table pages given back to the frame source after collapses: only
    /// pages taken from it.
    pub table_pages_freed: u64,
    /// Tables the OS built (at boot) that collapses made unused, handed to
    /// [`FrameSource::retire_os_table`](crate::FrameSource::retire_os_table).
    pub os_tables_retired: u64,
    /// Leaf entries written (not-present and present again).
    pub pte_writes: u64,
    /// Conversions completed.
    pub conversions: u64,
    /// Conversions and acceptances that failed after the point of no
    /// return.
    pub failures: u64,
    /// Units of unaccepted memory accepted.
    pub units_accepted: u64,
}

impl CounterSnapshot {
    /// Table pages the engine holds now: taken for splits minus given back.
    pub fn table_pages_net(&self) -> i64 {
        self.table_pages_taken as i64 - self.table_pages_freed as i64
    }

    /// Every hypercall and hypervisor-visible instruction, summed.
    pub fn hypercalls(&self) -> u64 {
        self.map_gpa + self.accept + self.psc_exits + self.psc_msr + self.pvalidate
    }

    /// The counts from `earlier` to `self`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot {
            map_gpa: self.map_gpa - earlier.map_gpa,
            accept: self.accept - earlier.accept,
            psc_exits: self.psc_exits - earlier.psc_exits,
            psc_entries: self.psc_entries - earlier.psc_entries,
            psc_msr: self.psc_msr - earlier.psc_msr,
            pvalidate: self.pvalidate - earlier.pvalidate,
            shootdowns: self.shootdowns - earlier.shootdowns,
            splits_1g: self.splits_1g - earlier.splits_1g,
            splits_2m: self.splits_2m - earlier.splits_2m,
            collapses_2m: self.collapses_2m - earlier.collapses_2m,
            collapses_1g: self.collapses_1g - earlier.collapses_1g,
            table_pages_taken: self.table_pages_taken - earlier.table_pages_taken,
            table_pages_freed: self.table_pages_freed - earlier.table_pages_freed,
            os_tables_retired: self.os_tables_retired - earlier.os_tables_retired,
            pte_writes: self.pte_writes - earlier.pte_writes,
            conversions: self.conversions - earlier.conversions,
            failures: self.failures - earlier.failures,
            units_accepted: self.units_accepted - earlier.units_accepted,
        }
    }
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_split(&self, level: Level) {
        match level {
            Level::Pdpt => Self::add(&self.splits_1g, 1),
            _ => Self::add(&self.splits_2m, 1),
        }
        Self::add(&self.table_pages_taken, 1);
    }

    pub(crate) fn record_collapse(&self, level: Level) {
        match level {
            Level::Pdpt => Self::add(&self.collapses_1g, 1),
            _ => Self::add(&self.collapses_2m, 1),
        }
    }

    pub(crate) fn record_table_freed(&self) {
        Self::add(&self.table_pages_freed, 1);
    }

    pub(crate) fn record_os_table_retired(&self) {
        Self::add(&self.os_tables_retired, 1);
    }

    /// A consistent-enough snapshot (each counter read once).
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            map_gpa: r(&self.map_gpa),
            accept: r(&self.accept),
            psc_exits: r(&self.psc_exits),
            psc_entries: r(&self.psc_entries),
            psc_msr: r(&self.psc_msr),
            pvalidate: r(&self.pvalidate),
            shootdowns: r(&self.shootdowns),
            splits_1g: r(&self.splits_1g),
            splits_2m: r(&self.splits_2m),
            collapses_2m: r(&self.collapses_2m),
            collapses_1g: r(&self.collapses_1g),
            table_pages_taken: r(&self.table_pages_taken),
            table_pages_freed: r(&self.table_pages_freed),
            os_tables_retired: r(&self.os_tables_retired),
            pte_writes: r(&self.pte_writes),
            conversions: r(&self.conversions),
            failures: r(&self.failures),
            units_accepted: r(&self.units_accepted),
        }
    }
}
