//! The test OS's instruments: what the engine does with the OS's services,
//! checked as it happens.
//!
//! - No call into the frame source or the shootdown with the engine's
//!   table lock held (a lock probe the test installs).
//! - No page-table page given back before a shootdown that covers it: at
//!   every shootdown the watch walks the live tables and notes, for each
//!   table page, the last shootdown at which it was reachable and the
//!   region it mapped. A page given back must have been named by a later
//!   shootdown (one that intersects its region, or flushes everything):
//!   until then a CPU's paging-structure cache may still point to it.
//!
//! Violations are recorded, not panicked on, so the engine under test is
//! never unwound half-way; tests assert the list is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use coco_convert::bits::{HUGE, PRESENT};
use coco_convert::{EncryptionBit, Level, Paging, VaRange};
use hvmock::GuestMemory;

type Probe = Box<dyn Fn() -> bool + Send + Sync>;

/// Where a table page was last seen.
#[derive(Clone, Copy, Debug)]
struct Seen {
    flush: usize,
    region: u64,
    span: u64,
}

#[derive(Default)]
struct Log {
    /// Every shootdown so far (`None`: everything).
    flushes: Vec<Option<Vec<VaRange>>>,
    last_seen: BTreeMap<u64, Seen>,
    violations: Vec<String>,
}

/// The instruments of one simulated machine.
pub struct Watch {
    mem: Arc<GuestMemory>,
    layout: Mutex<Option<(u64, Paging, EncryptionBit)>>,
    enabled: AtomicBool,
    probe: Mutex<Option<Probe>>,
    log: Mutex<Log>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// Sign-extends a 48-bit or 57-bit virtual address.
fn canonical(va: u64, paging: Paging) -> u64 {
    let unused = 64 - paging.va_bits();
    ((va << unused) as i64 >> unused) as u64
}

/// Every table page reachable from `root` (of depth `paging`), with the
/// region it maps.
pub fn tables_with_regions(
    mem: &GuestMemory,
    root: u64,
    paging: Paging,
    enc: EncryptionBit,
) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root, paging.top(), 0u64)];
    out.insert(root, (0, 1 << paging.va_bits()));
    while let Some((table, level, base)) = stack.pop() {
        let Some(lower) = level.lower() else { continue };
        for i in 0..512u64 {
            let e = mem.read_u64(table + 8 * i);
            if e & PRESENT == 0 || (level.can_be_leaf() && e & HUGE != 0) {
                continue;
            }
            let region = canonical(base + i * level.span(), paging);
            let child = enc.address(e, Level::Pt);
            out.insert(child, (region, level.span()));
            stack.push((child, lower, region));
        }
    }
    out
}

impl Watch {
    /// A watch over `mem`; it starts checking once [`attach`](Self::attach)
    /// names the tables.
    pub fn new(mem: Arc<GuestMemory>) -> Self {
        Watch {
            mem,
            layout: Mutex::new(None),
            enabled: AtomicBool::new(true),
            probe: Mutex::new(None),
            log: Mutex::new(Log::default()),
        }
    }

    /// The tables to watch.
    pub fn attach(&self, root: u64, paging: Paging, enc: EncryptionBit) {
        *self.layout.lock().unwrap() = Some((root, paging, enc));
    }

    /// Turns the checks off (benchmarks measure the engine, not this).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    fn on(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Installs the probe that says whether the engine's table lock is
    /// held (`Engine::table_lock_held`); `None` removes it. It cannot tell
    /// which CPU holds the lock: install it only while one CPU converts.
    pub fn set_lock_probe(&self, probe: Option<Probe>) {
        *self.probe.lock().unwrap() = probe;
    }

    fn violation(&self, what: String) {
        self.log.lock().unwrap().violations.push(what);
    }

    /// Called by the OS services at every entry from the engine.
    pub fn entered(&self, service: &str) {
        if !self.on() {
            return;
        }
        let held = self.probe.lock().unwrap().as_ref().is_some_and(|p| p());
        if held {
            self.violation(format!("{service} called with the table lock held"));
        }
    }

    /// A shootdown of `ranges` (empty: everything) completed.
    pub fn shootdown(&self, ranges: &[VaRange]) {
        self.entered("shootdown");
        if !self.on() {
            return;
        }
        let Some((root, paging, enc)) = *self.layout.lock().unwrap() else {
            return;
        };
        let tables = tables_with_regions(&self.mem, root, paging, enc);
        let mut log = self.log.lock().unwrap();
        let flush = log.flushes.len();
        log.flushes.push((!ranges.is_empty()).then(|| ranges.to_vec()));
        for (table, (region, span)) in tables {
            log.last_seen.insert(table, Seen { flush, region, span });
        }
    }

    /// `pa` is given back (to the frame source, or to the OS as a retired
    /// table): if it was ever a reachable table, a shootdown after the last
    /// time it was must have named its region.
    pub fn released(&self, pa: u64, how: &str) {
        self.entered(how);
        if !self.on() {
            return;
        }
        let mut log = self.log.lock().unwrap();
        let Some(seen) = log.last_seen.remove(&pa) else { return };
        let covered = log.flushes[seen.flush + 1..].iter().any(|f| match f {
            None => true,
            Some(ranges) => ranges.iter().any(|r| {
                r.va <= seen.region.saturating_add(seen.span - 1) && seen.region <= r.va.saturating_add(r.len - 1)
            }),
        });
        if !covered {
            log.violations.push(format!(
                "table {pa:#x} ({how}) mapped [{:#x}, +{:#x}) and no shootdown since it was last reachable covered it",
                seen.region, seen.span
            ));
        }
    }

    /// Violations so far.
    pub fn violations(&self) -> Vec<String> {
        self.log.lock().unwrap().violations.clone()
    }
}

/// Every table page reachable from `root` and its 512 entries, and every
/// frame's state byte: "nothing changed" compares two of these.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Table page -> entries.
    pub tables: BTreeMap<u64, Vec<u64>>,
    /// Public state of every frame.
    pub states: Vec<Option<coco_convert::PageState>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snapshot({} tables)", self.tables.len())
    }
}

impl Snapshot {
    /// The first difference from `other`, for a readable failure.
    pub fn first_difference(&self, other: &Snapshot) -> Option<String> {
        let keys: BTreeSet<u64> = self.tables.keys().chain(other.tables.keys()).copied().collect();
        for table in keys {
            match (self.tables.get(&table), other.tables.get(&table)) {
                (Some(a), Some(b)) => {
                    if let Some(i) = (0..512).find(|&i| a[i] != b[i]) {
                        return Some(format!("table {table:#x}[{i}]: {:#x} -> {:#x}", a[i], b[i]));
                    }
                }
                (a, b) => {
                    return Some(format!(
                        "table {table:#x}: reachable {} -> {}",
                        a.is_some(),
                        b.is_some()
                    ))
                }
            }
        }
        let frame = (0..self.states.len()).find(|&i| self.states[i] != other.states[i])?;
        Some(format!(
            "frame {:#x}: {:?} -> {:?}",
            frame as u64 * 4096,
            self.states[frame],
            other.states[frame]
        ))
    }
}

/// Not-present entries of every reachable table, by (table, index): the
/// OS's (guard pages, holes) and poisoned frames'. None may change.
pub fn not_present_entries(
    mem: &GuestMemory,
    root: u64,
    paging: Paging,
    enc: EncryptionBit,
) -> BTreeMap<(u64, u64), u64> {
    let mut out = BTreeMap::new();
    for table in tables_with_regions(mem, root, paging, enc).keys() {
        for i in 0..512u64 {
            let e = mem.read_u64(table + 8 * i);
            if e & PRESENT == 0 {
                out.insert((*table, i), e);
            }
        }
    }
    out
}
