//! The conversion benchmark: workloads W1-W7 on TDX and SEV-SNP with
//! zero-cost counted hypercalls. W1-W4 and W6 convert memory: our engine
//! beside a Linux-strategy configuration of the same engine and the lower
//! bound the ABIs allow. W5 accepts 2 GiB handed over unaccepted, lazily
//! (an allocator's 10,000 random 4 KiB pages) or eagerly at boot (one CPU,
//! and two), against the lower bound computed from the page list. W6
//! converts W3's kind of scattered frames as one list
//! (`Engine::convert_frames`), there and back. W7 has two CPUs convert
//! their own random frames at once against one CPU alone, with free
//! hypercalls and with a modelled cost per hypercall, and times the table
//! lock (the engine's `lock-stats` feature).
//!
//! Run: `scripts/bench-convert` (`--quick`: smaller workloads, one run,
//! count targets only, for CI). Writes SVG pictures of the direct map to
//! `bench/` in cargo's target directory (`target/bench/`, or
//! `$CARGO_TARGET_DIR/bench/`), and prints their paths.
//!
//! Two kinds of target: count targets (hypercalls against the lower bound,
//! splits, the layout afterwards; for W5 also the units accepted, each
//! once, and per call the units it needed) are exact and fail the run when
//! missed; timing targets (engine time, full runs only) are reported as
//! met or not met with the figure, and never fail the run: they depend on
//! the machine and its load. A timed figure is shown as min/median/max
//! over the runs; targets hold the median.

use std::sync::atomic::AtomicU64;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use coco_convert::platform::snp::{GhcbSlot, PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::platform::{SnpOptions, TdxOptions};
use coco_convert::pool::{ChunkSlot, ChunkSource, SharedPool};
use coco_convert::{CounterSnapshot, Engine, Level, LockStats, Platform, Target, UnacceptedBitmap, Visibility};
use integration::null::{NullSnp, NullTdx};
use integration::sim::{current_cpu, set_cpu, SimFrames, SimPhys, SimTlb, DIRECT_MAP_VA};
use integration::world::Machine;
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plat {
    Tdx,
    Snp,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Strategy {
    /// Collapse deferred to `Engine::compact`, called (and timed) at the
    /// end of each workload.
    Ours,
    /// Collapse at the end of every conversion.
    Eager,
    /// Never collapse.
    Linux,
}

impl Strategy {
    fn collapse(self) -> coco_convert::Collapse {
        match self {
            Strategy::Ours => coco_convert::Collapse::OnCompact,
            Strategy::Eager => coco_convert::Collapse::AfterEachConversion,
            Strategy::Linux => coco_convert::Collapse::Never,
        }
    }
}

type SimEngine<'m, P> = Engine<'m, &'m SimPhys, &'m SimFrames, &'m SimTlb, P>;

/// What one conversion converts: a range, or a list of frames.
#[derive(Clone, Copy)]
enum What<'l> {
    Range(Target),
    Frames(&'l [u64]),
}

impl From<Target> for What<'_> {
    fn from(target: Target) -> Self {
        What::Range(target)
    }
}

/// One conversion: what, direction, scratch for a vmalloc-style range's
/// frames.
type Conv<'c> = dyn Fn(What<'_>, Visibility, &mut [u64]) + 'c;
/// A workload: runs its conversions through the given one, given what its
/// setup returned; returns the units (pages, conversions) it did.
type Workload<'w> = dyn Fn(&Conv<'_>, &[u64]) -> u64 + 'w;

/// Counts the lower bound allows.
#[derive(Default, Clone, Copy, Debug)]
struct Bound {
    map_gpa: u64,
    accept: u64,
    psc_exits: u64,
    psc_entries: u64,
    pvalidate: u64,
    shootdowns: u64,
}

impl Bound {
    fn hypercalls(&self, plat: Plat) -> u64 {
        match plat {
            Plat::Tdx => self.map_gpa + self.accept,
            Plat::Snp => self.psc_exits + self.pvalidate,
        }
    }

    /// One conversion of `runs` (sorted physical runs) in one transaction.
    fn add(&mut self, runs: &[(u64, u64)], to: Visibility) {
        self.shootdowns += 1;
        self.map_gpa += runs.len() as u64;
        let pieces_1g: u64 = runs
            .iter()
            .map(|&(pa, len)| pieces(pa, len, &[GIB, 2 * MIB, PAGE]))
            .sum();
        let pieces_2m: u64 = runs.iter().map(|&(pa, len)| pieces(pa, len, &[2 * MIB, PAGE])).sum();
        if to == Visibility::Private {
            self.accept += pieces_1g;
        }
        self.psc_entries += pieces_2m;
        self.psc_exits += pieces_2m.div_ceil(253);
        self.pvalidate += pieces_2m;
    }
}

/// Largest-aligned-first pieces of `[pa, pa + len)` with the given sizes.
fn pieces(mut pa: u64, len: u64, sizes: &[u64]) -> u64 {
    let end = pa + len;
    let mut n = 0;
    while pa < end {
        let size = sizes
            .iter()
            .copied()
            .find(|&s| pa % s == 0 && end - pa >= s)
            .unwrap_or(PAGE);
        pa += size;
        n += 1;
    }
    n
}

fn runs_of(frames: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = frames.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    // A 4 KiB frame is an extent of one page.
    coco_convert::Runs::Extents(&sorted).iter().collect()
}

/// `--strategy ours|eager|linux`: measure one strategy only (for profiling; the
/// other's rows are empty and its targets not met).
static ONLY_STRATEGY: std::sync::OnceLock<Strategy> = std::sync::OnceLock::new();

/// One measured workload.
struct Outcome {
    counters: CounterSnapshot,
    ns: f64,
    units: u64,
    layout_before: [u64; 3],
    layout_after: [u64; 3],
    svg_cells: Vec<Cell>,
    /// Shootdowns `Engine::compact` ran after the workload (ours).
    compaction_shootdowns: u64,
}

impl Outcome {
    fn skipped() -> Outcome {
        Outcome {
            counters: CounterSnapshot::default(),
            ns: f64::NAN,
            units: 1,
            layout_before: [0; 3],
            layout_after: [0; 3],
            svg_cells: Vec::new(),
            compaction_shootdowns: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Cell {
    Gib { shared: bool },
    Mib2 { shared: bool },
    Split { shared: u32 },
}

/// Direct-map leaves by size [1G, 2M, 4K], and one cell per 2 MiB.
fn layout(m: &Machine) -> ([u64; 3], Vec<Cell>) {
    let tables = m.page_tables();
    let mut counts = [0; 3];
    let mut cells = vec![Cell::Split { shared: 0 }; (m.size() / (2 * MIB)) as usize];
    let shared_bit_set_means_shared = m.enc.set_means() == Visibility::Shared;
    tables.for_each_mapping(&m.mem, &mut |map| {
        if map.va < DIRECT_MAP_VA || map.va >= DIRECT_MAP_VA + m.size() {
            return;
        }
        let shared = map.enc_set == shared_bit_set_means_shared;
        let region = ((map.va - DIRECT_MAP_VA) / (2 * MIB)) as usize;
        match map.size {
            s if s == GIB => {
                counts[0] += 1;
                for c in &mut cells[region..region + 512] {
                    *c = Cell::Gib { shared };
                }
            }
            s if s == 2 * MIB => {
                counts[1] += 1;
                cells[region] = Cell::Mib2 { shared };
            }
            _ => {
                counts[2] += 1;
                if let Cell::Split { shared: n } = &mut cells[region] {
                    *n += shared as u32;
                }
            }
        }
    });
    (counts, cells)
}

/// The TDX engine, its every call taking `cost` (zero: free).
fn tdx_engine(m: &Machine, strategy: Strategy, cost: Duration) -> SimEngine<'_, Tdx<NullTdx>> {
    let options = if strategy == Strategy::Linux {
        TdxOptions::LINUX
    } else {
        TdxOptions::MINIMAL
    };
    let platform = Tdx::new(NullTdx::costing(cost), 1 << 47).unwrap().with_options(options);
    let config = coco_convert::Config {
        collapse: strategy.collapse(),
        ..m.config()
    };
    Engine::new(config, &m.phys, &m.frames, &m.tlb, platform, m.state_table())
}

type SnpEngine<'m> = SimEngine<'m, Snp<&'m NullSnp, &'m NullSnp, PerCpuGhcbs<'static>>>;

/// The SNP engine with a GHCB for each of `cpus` simulated CPUs (a thread
/// is CPU `i` after `set_cpu(i)`; the main thread is CPU 0).
fn snp_engine<'m>(m: &'m Machine, hv: &'m NullSnp, strategy: Strategy, cpus: usize) -> SnpEngine<'m> {
    let options = if strategy == Strategy::Linux {
        SnpOptions::LINUX
    } else {
        SnpOptions::MINIMAL
    };
    let slots = Box::leak((0..cpus).map(|_| GhcbSlot::new()).collect::<Box<[_]>>());
    let platform = Snp::new(hv, hv, PerCpuGhcbs::new(slots, current_cpu), 51)
        .unwrap()
        .with_options(options);
    let config = coco_convert::Config {
        collapse: strategy.collapse(),
        ..m.config()
    };
    let e = Engine::new(config, &m.phys, &m.frames, &m.tlb, platform, m.state_table()).with_window(&m.windows);
    // The GHCBs, shared from the start, just below the table-page region,
    // each set up on its CPU.
    for cpu in (0..cpus).rev() {
        set_cpu(cpu);
        let pa = m.size() - 64 * MIB - (cpu as u64 + 1) * PAGE;
        let ptr = std::ptr::NonNull::new(m.mem.ptr(pa).cast()).unwrap();
        // SAFETY: the page is in simulated memory and used by nothing else.
        unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.expect("GHCB");
    }
    e
}

/// A machine of `levels.len()` GiB for `plat`, its table frames resident.
fn machine(plat: Plat, levels: &[Level]) -> Machine {
    let enc = match plat {
        Plat::Tdx => coco_convert::EncryptionBit::tdx(1 << 47).unwrap(),
        Plat::Snp => coco_convert::EncryptionBit::snp(51).unwrap(),
    };
    let m = Machine::with_gib_levels(enc, levels);
    m.frames.set_checked(false);
    // A guest's RAM is resident; the simulation's is not until touched.
    // Touch the table-frame region so host page faults stay out of the
    // engine's time.
    // Writing each page's first word back to itself allocates it without
    // touching the tables already built there.
    for page in (m.size() - 64 * MIB..m.size()).step_by(PAGE as usize) {
        m.mem.write_u64(page, m.mem.read_u64(page));
    }
    m
}

/// Builds a machine, runs `work` with the engine of `plat`/`strategy`,
/// timing only the conversions.
fn measure(
    plat: Plat,
    strategy: Strategy,
    levels: &[Level],
    setup: &dyn Fn(&Machine) -> Vec<u64>,
    work: &Workload<'_>,
) -> Outcome {
    if ONLY_STRATEGY.get().is_some_and(|&only| only != strategy) {
        return Outcome::skipped();
    }
    let m = machine(plat, levels);
    let data = setup(&m);
    let compact = strategy == Strategy::Ours;
    fn go<P: Platform>(e: &SimEngine<'_, P>, m: &Machine, data: &[u64], work: &Workload, compact: bool) -> Outcome {
        let (layout_before, _) = layout(m);
        let before = e.counters();
        let elapsed = std::cell::Cell::new(0u128);
        let convert = |what: What<'_>, to: Visibility, scratch: &mut [u64]| {
            let start = Instant::now();
            match what {
                What::Range(t) => e.convert_with_scratch(t, to, scratch),
                What::Frames(list) => e.convert_frames(list, to),
            }
            .expect("conversion");
            elapsed.set(elapsed.get() + start.elapsed().as_nanos());
        };
        let units = work(&convert, data);
        let mut compaction_shootdowns = 0;
        if compact {
            // The churn has stopped: the deferred collapses, timed.
            let shootdowns = e.counters().shootdowns;
            let start = Instant::now();
            e.compact();
            elapsed.set(elapsed.get() + start.elapsed().as_nanos());
            compaction_shootdowns = e.counters().shootdowns - shootdowns;
        }
        let (layout_after, svg_cells) = layout(m);
        Outcome {
            counters: e.counters().since(&before),
            ns: elapsed.get() as f64,
            units,
            layout_before,
            layout_after,
            svg_cells,
            compaction_shootdowns,
        }
    }
    match plat {
        Plat::Tdx => go(&tdx_engine(&m, strategy, Duration::ZERO), &m, &data, work, compact),
        Plat::Snp => {
            let hv = NullSnp::new(m.mem.clone());
            go(&snp_engine(&m, &hv, strategy, 1), &m, &data, work, compact)
        }
    }
}

/// Runs `work` `runs` times with each strategy, prints a row for each, and
/// returns (ns per unit over the runs, last outcome) for [ours, eager, Linux].
fn compare(
    plat: Plat,
    runs: usize,
    levels: &[Level],
    setup: &dyn Fn(&Machine) -> Vec<u64>,
    work: &Workload<'_>,
) -> [(Spread, Outcome); 3] {
    [Strategy::Ours, Strategy::Eager, Strategy::Linux].map(|strategy| {
        let mut outcomes: Vec<Outcome> = (0..runs)
            .map(|_| measure(plat, strategy, levels, setup, work))
            .collect();
        let ns = Spread::of(outcomes.iter().map(|o| o.ns / o.units as f64));
        let o = outcomes.pop().expect("at least one run");
        print_row(&Row {
            label: format!("{plat:?} {strategy:?}"),
            c: o.counters,
            ns_per_unit: ns,
            layout: (o.layout_before, o.layout_after),
        });
        (ns, o)
    })
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Distinct random frames below `limit`, `n` of them, with some runs.
fn scattered(n: usize, limit: u64, runs: bool, seed: u64) -> Vec<u64> {
    let mut x = seed;
    let mut seen = std::collections::HashSet::new();
    let mut frames = Vec::new();
    while frames.len() < n {
        let base = (xorshift(&mut x) % (limit / PAGE)) * PAGE;
        let len = if runs { 1 + (x >> 60) % 4 } else { 1 };
        for i in 0..len {
            if frames.len() < n && base + i * PAGE < limit && seen.insert(base + i * PAGE) {
                frames.push(base + i * PAGE);
            }
        }
    }
    frames
}

/// A timed figure over the runs: the median is the figure (what timing
/// targets are held to), min and max show the spread the machine's load
/// gave it.
#[derive(Clone, Copy, Debug)]
struct Spread {
    min: f64,
    med: f64,
    max: f64,
    runs: usize,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(|a, b| a.total_cmp(b));
        Spread {
            min: v[0],
            med: v[v.len() / 2],
            max: v[v.len() - 1],
            runs: v.len(),
        }
    }

    /// `min/med/max` with `precision` decimals; one figure after one run.
    fn show(&self, precision: usize) -> String {
        if self.runs == 1 {
            return format!("{:.precision$}", self.med);
        }
        format!(
            "{:.precision$}/{:.precision$}/{:.precision$}",
            self.min, self.med, self.max
        )
    }
}

/// The timing target of W2, W3 and W4: the median engine CPU of ours at
/// most 1.10 times the Linux strategy's; the verdict and its line.
fn ratio_target(what: &str, ours: &Spread, linux: &Spread) -> (bool, String) {
    let ratio = ours.med / linux.med;
    (
        ratio <= 1.10,
        format!(
            "{what}: engine CPU ours / Linux strategy, medians, {:.0} / {:.0} ns = {ratio:.2} <= 1.10 (min/med/max ours {}, Linux strategy {})",
            ours.med,
            linux.med,
            ours.show(0),
            linux.show(0)
        ),
    )
}

/// The heading of a timed column: `ns/page min/med/max`, or the unit alone
/// after one run.
fn timed(unit: &str, runs: usize) -> String {
    if runs == 1 {
        unit.to_string()
    } else {
        format!("{unit} min/med/max")
    }
}

struct Row {
    label: String,
    c: CounterSnapshot,
    ns_per_unit: Spread,
    layout: ([u64; 3], [u64; 3]),
}

fn print_header(title: &str, unit: &str) {
    println!("\n{title}");
    println!(
        "  {:<26} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>5} {:>5} {:>5} {:>5} {:>6} {:>22} {:>23}",
        "",
        "MapGPA",
        "ACCEPT",
        "PSCexit",
        "PSCentry",
        "PVALID",
        "shootd",
        "sp1G",
        "sp2M",
        "co2M",
        "co1G",
        "tables",
        "direct map 1G/2M/4K",
        unit
    );
}

fn print_row(r: &Row) {
    let c = &r.c;
    println!(
        "  {:<26} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>5} {:>5} {:>5} {:>5} {:>6} {:>22} {:>23}",
        r.label,
        c.map_gpa,
        c.accept,
        c.psc_exits,
        c.psc_entries,
        c.pvalidate,
        c.shootdowns,
        c.splits_1g,
        c.splits_2m,
        c.collapses_2m,
        c.collapses_1g,
        c.table_pages_taken,
        format!(
            "{}/{}/{} (was {}/{}/{})",
            r.layout.1[0], r.layout.1[1], r.layout.1[2], r.layout.0[0], r.layout.0[1], r.layout.0[2]
        ),
        r.ns_per_unit.show(1)
    );
}

fn print_bound(plat: Plat, b: &Bound) {
    let (mg, ac, pe, pn, pv) = match plat {
        Plat::Tdx => (
            b.map_gpa.to_string(),
            b.accept.to_string(),
            "-".into(),
            "-".into(),
            "-".into(),
        ),
        Plat::Snp => (
            "-".into(),
            "-".into(),
            b.psc_exits.to_string(),
            b.psc_entries.to_string(),
            b.pvalidate.to_string(),
        ),
    };
    println!(
        "  {:<26} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6}",
        "  lower bound", mg, ac, pe, pn, pv, b.shootdowns
    );
}

/// Writes `<name>.svg` to [`bench_dir`] and returns its path.
fn write_svg(name: &str, panels: &[(&str, &[Cell])], gib: u64) -> std::path::PathBuf {
    let cols = 64usize;
    let rows = panels[0].1.len().div_ceil(cols);
    let cell = 8usize;
    let panel_w = cols * cell + 20;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='monospace' font-size='11'>\n",
        panel_w * panels.len(),
        rows * cell + 60
    );
    for (p, (title, cells)) in panels.iter().enumerate() {
        let x0 = p * panel_w + 10;
        svg += &format!("<text x='{x0}' y='14'>{title}: direct map, {gib} GiB, one cell per 2 MiB</text>\n");
        for (i, c) in cells.iter().enumerate() {
            let (x, y) = (x0 + (i % cols) * cell, 22 + (i / cols) * cell);
            let (fill, shared) = match *c {
                Cell::Gib { shared } => ("#1b5e20", if shared { 512 } else { 0 }),
                Cell::Mib2 { shared } => ("#66bb6a", if shared { 512 } else { 0 }),
                Cell::Split { shared } => ("#fb8c00", shared),
            };
            svg += &format!(
                "<rect x='{x}' y='{y}' width='{cell}' height='{cell}' fill='{fill}' stroke='#fff' stroke-width='0.5'/>"
            );
            if shared > 0 {
                let h = (cell as u32 * shared).div_ceil(512).max(2);
                svg += &format!(
                    "<rect x='{}' y='{}' width='{}' height='{h}' fill='#1565c0'/>",
                    x + 1,
                    y + cell - h as usize,
                    cell - 2
                );
            }
            svg += "\n";
        }
    }
    let y = rows * cell + 40;
    svg += &format!(
        "<text x='10' y='{y}'><tspan fill='#1b5e20'>&#9632; 1 GiB leaf</tspan>  <tspan fill='#66bb6a'>&#9632; 2 MiB leaf</tspan>  <tspan fill='#fb8c00'>&#9632; split to 4 KiB</tspan>  <tspan fill='#1565c0'>&#9632; shared pages (bar height)</tspan></text>\n</svg>\n"
    );
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.svg"));
    std::fs::write(&path, svg).unwrap();
    path
}

/// `bench/` in cargo's target directory: `BENCH_DIR` when set (by
/// `scripts/bench-convert`, from the target directory cargo reports now),
/// else beside the `tmp/` cargo named in `CARGO_TARGET_TMPDIR` when it
/// built the bench. Either follows `CARGO_TARGET_DIR` and
/// `build.target-dir` wherever the bench is run from; the first also
/// survives a target directory moved or reached through another path.
fn bench_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("BENCH_DIR") {
        return dir.into();
    }
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("bench")
}

/// W5's machine: 4 GiB of 1 GiB pages. Its unaccepted memory is the 2 GiB
/// from 1 GiB, 1 GiB aligned and clear of everything the engine uses:
/// the table frames (the top 64 MiB), the GHCBs (just below them) and the
/// scratch windows (outside RAM).
const W5_LEVELS: [Level; 4] = [Level::Pdpt; 4];
const W5_BASE: u64 = GIB;
const W5_LEN: u64 = 2 * GIB;
const UNIT: u64 = UnacceptedBitmap::UNIT_2M;
const W5_UNITS: u64 = W5_LEN / UNIT;

/// How W5 accepts: an allocator's pages one by one, or everything at boot
/// on `cpus` CPUs.
#[derive(Clone, Copy)]
enum Acceptance<'p> {
    Lazy(&'p [u64]),
    Eager { cpus: usize },
}

/// One measured acceptance.
struct Accepted {
    counters: CounterSnapshot,
    /// Engine time: lazy, all the calls; eager, from the first CPU's start
    /// to the last CPU's return (wall time).
    ns: f64,
    /// Units each call reported: lazy, one entry per page; eager, per CPU.
    reported: Vec<u64>,
    /// Units the bitmap holds unaccepted afterwards.
    left: u64,
    /// Frames the state table holds unaccepted afterwards.
    left_frames: u64,
    layout_before: [u64; 3],
    layout_after: [u64; 3],
}

/// A fresh engine of `plat` on W5's machine, with W5's 2 GiB recorded
/// unaccepted; accepts as `how` says, timing only the acceptance.
fn measure_accept(plat: Plat, how: Acceptance<'_>) -> Accepted {
    let m = machine(plat, &W5_LEVELS);
    // The bitmap covers all of memory, as the OS's does; only W5's units
    // are set.
    let bits: Vec<AtomicU64> = (0..m.size() / UNIT / 64).map(|_| AtomicU64::new(0)).collect();
    fn go<'m, P: Platform + Sync>(
        mut e: SimEngine<'m, P>,
        bits: &'m [AtomicU64],
        m: &Machine,
        how: Acceptance,
    ) -> Accepted {
        let bitmap = UnacceptedBitmap::new(0, UNIT, bits).expect("bitmap");
        e.adopt_unaccepted(bitmap).expect("nothing set yet");
        e.record_unaccepted(W5_BASE, W5_LEN)
            .expect("whole units of private memory");
        let (layout_before, _) = layout(m);
        let before = e.counters();
        let (ns, reported) = match how {
            Acceptance::Lazy(pages) => {
                let mut reports = Vec::with_capacity(pages.len());
                let start = Instant::now();
                for &page in pages {
                    reports.push(e.accept(page, PAGE));
                }
                let ns = start.elapsed().as_nanos() as f64;
                let units = reports.into_iter().map(|r| r.expect("accepted").units);
                (ns, units.collect())
            }
            Acceptance::Eager { cpus } => {
                let ready = Barrier::new(cpus);
                let spans: Vec<(Instant, Instant, u64)> = std::thread::scope(|s| {
                    let workers: Vec<_> = (0..cpus)
                        .map(|cpu| {
                            let (e, ready) = (&e, &ready);
                            s.spawn(move || {
                                set_cpu(cpu);
                                ready.wait();
                                let start = Instant::now();
                                let units = e.accept_all(cpu, cpus).expect("accepted").units;
                                (start, Instant::now(), units)
                            })
                        })
                        .collect();
                    workers.into_iter().map(|w| w.join().unwrap()).collect()
                });
                let first = spans.iter().map(|s| s.0).min().expect("a CPU");
                let last = spans.iter().map(|s| s.1).max().expect("a CPU");
                ((last - first).as_nanos() as f64, spans.iter().map(|s| s.2).collect())
            }
        };
        let counters = e.counters().since(&before);
        let (layout_after, _) = layout(m);
        Accepted {
            counters,
            ns,
            reported,
            left: e.unaccepted().expect("given").count(),
            left_frames: e.census().unaccepted,
            layout_before,
            layout_after,
        }
    }
    match plat {
        Plat::Tdx => go(tdx_engine(&m, Strategy::Ours, Duration::ZERO), &bits, &m, how),
        Plat::Snp => {
            let hv = NullSnp::new(m.mem.clone());
            let cpus = match how {
                Acceptance::Lazy(_) => 1,
                Acceptance::Eager { cpus } => cpus,
            };
            go(snp_engine(&m, &hv, Strategy::Ours, cpus), &bits, &m, how)
        }
    }
}

/// W5 lazy's lower bound, from the page list alone, and the units each
/// call must accept. `accept(page, 4 KiB)` needs the page's unit, and,
/// when the page is its unit's last (the request ends on a unit boundary),
/// the next unit too (the guard) if that is unaccepted memory; a unit an
/// earlier call accepted needs nothing.
///
/// Each call can batch only its own units: at most two, contiguous. On
/// TDX each unit needs an ACCEPT of its own (one ACCEPT takes one page,
/// and two 2 MiB units are never an aligned 1 GiB page). On SNP a call
/// with any unit to accept needs one PSC exit (two 2 MiB entries fit one
/// exit of 253; no exit serves two calls) and one 2 MiB PVALIDATE per
/// unit (PVALIDATE's largest page). So the minimum is: TDX, the units
/// accepted; SNP, the calls that accept anything plus the units.
fn lazy_bound(pages: &[u64]) -> (Bound, Vec<u64>) {
    let region = W5_BASE / UNIT..(W5_BASE + W5_LEN) / UNIT;
    let mut accepted = std::collections::HashSet::new();
    let mut bound = Bound::default();
    let mut per_call = Vec::with_capacity(pages.len());
    for &page in pages {
        let unit = page / UNIT;
        let guard = (page + PAGE) % UNIT == 0;
        let mut new = 0;
        for u in [Some(unit), guard.then_some(unit + 1)].into_iter().flatten() {
            if region.contains(&u) && accepted.insert(u) {
                new += 1;
            }
        }
        per_call.push(new);
        if new > 0 {
            bound.accept += new;
            bound.psc_exits += 1;
            bound.psc_entries += new;
            bound.pvalidate += new;
        }
    }
    (bound, per_call)
}

/// W5 eager's lower bound: the largest aligned ACCEPTs (TDX: two 1 GiB for
/// 2 GiB 1 GiB-aligned); 2 MiB PSC entries, 253 an exit, and a 2 MiB
/// PVALIDATE each (SNP).
fn eager_bound() -> Bound {
    Bound {
        accept: pieces(W5_BASE, W5_LEN, &[GIB, 2 * MIB, PAGE]),
        psc_exits: W5_UNITS.div_ceil(253),
        psc_entries: W5_UNITS,
        pvalidate: W5_UNITS,
        ..Bound::default()
    }
}

/// W7's machine: as W3's, 4 GiB of 1 GiB pages.
const W7_LEVELS: [Level; 4] = [Level::Pdpt; 4];

/// One W7 run: CPU `i` converts `sets[i]`.
struct Parallel {
    counters: CounterSnapshot,
    lock: LockStats,
    /// From the first CPU's start to the last CPU's return.
    wall_ns: f64,
    /// Each CPU's time from its start to its return, summed: the time
    /// spent in conversions.
    busy_ns: f64,
    conversions: u64,
    layout_before: [u64; 3],
    layout_after: [u64; 3],
}

/// A fresh engine of `plat`/`strategy` on W7's machine, every hypercall
/// taking `cost`; simulated CPU `i` converts the frames of `sets[i]` one by
/// one to shared, then one by one back, all CPUs starting together.
fn measure_parallel(plat: Plat, strategy: Strategy, sets: &[&[u64]], cost: Duration) -> Option<Parallel> {
    if ONLY_STRATEGY.get().is_some_and(|&only| only != strategy) {
        return None;
    }
    let m = machine(plat, &W7_LEVELS);
    let compact = strategy == Strategy::Ours;
    fn go<P: Platform + Sync>(e: &SimEngine<'_, P>, m: &Machine, sets: &[&[u64]], compact: bool) -> Parallel {
        let (layout_before, _) = layout(m);
        e.record_lock_stats(true);
        let (before, lock_before) = (e.counters(), e.lock_stats());
        // Each thread on a CPU of its own, and a spinning start: left to
        // the scheduler, two new threads may share a CPU until it moves one
        // (2 ms late in a run measured, longer than a quick run lasts).
        let arrived = std::sync::atomic::AtomicUsize::new(0);
        let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
            let workers: Vec<_> = sets
                .iter()
                .enumerate()
                .map(|(cpu, &frames)| {
                    let arrived = &arrived;
                    s.spawn(move || {
                        set_cpu(cpu);
                        pin_to_cpu(cpu);
                        arrived.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        while arrived.load(std::sync::atomic::Ordering::Acquire) < sets.len() {
                            std::hint::spin_loop();
                        }
                        let start = Instant::now();
                        for to in [Visibility::Shared, Visibility::Private] {
                            for &pa in frames {
                                let target = Target::Physical { pa, len: PAGE };
                                e.convert_with_scratch(target, to, &mut [0; 1]).expect("conversion");
                            }
                        }
                        (start, Instant::now())
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let first = spans.iter().map(|s| s.0).min().expect("a CPU");
        let last = spans.iter().map(|s| s.1).max().expect("a CPU");
        let lock = e.lock_stats().since(&lock_before);
        if compact {
            // After the clock stopped: W7 times the conversions, and W3
            // times compaction after the same kind of work.
            e.compact();
        }
        let (layout_after, _) = layout(m);
        Parallel {
            counters: e.counters().since(&before),
            lock,
            wall_ns: (last - first).as_nanos() as f64,
            busy_ns: spans.iter().map(|s| (s.1 - s.0).as_nanos() as f64).sum(),
            conversions: 2 * sets.iter().map(|s| s.len() as u64).sum::<u64>(),
            layout_before,
            layout_after,
        }
    }
    Some(match plat {
        Plat::Tdx => go(&tdx_engine(&m, strategy, cost), &m, sets, compact),
        Plat::Snp => {
            let hv = NullSnp::new(m.mem.clone()).costing(cost);
            go(&snp_engine(&m, &hv, strategy, sets.len()), &m, sets, compact)
        }
    })
}

/// Runs the calling thread on host CPU `cpu` only (if it has one).
fn pin_to_cpu(cpu: usize) {
    if std::thread::available_parallelism().is_ok_and(|n| cpu >= n.get()) {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls read and write
    // only the set given, and change only this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The TSC's rate, from a stretch of it against the OS clock: what turns
/// the engine's lock-hold ticks into time.
#[cfg(target_arch = "x86_64")]
fn ns_per_tsc_tick() -> f64 {
    // SAFETY: RDTSC reads a counter and changes nothing.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, start) = (tsc(), Instant::now());
    while start.elapsed() < Duration::from_millis(100) {
        std::hint::spin_loop();
    }
    let (t1, elapsed) = (tsc(), start.elapsed());
    elapsed.as_nanos() as f64 / (t1 - t0) as f64
}

/// No TSC: the engine counts acquisitions only, and holds read as zero.
#[cfg(not(target_arch = "x86_64"))]
fn ns_per_tsc_tick() -> f64 {
    0.0
}

struct Chunks(std::sync::Mutex<Vec<u64>>);
// SAFETY: the chunks are simulated memory the benchmark uses for nothing
// else, each handed out once until it comes back.
unsafe impl ChunkSource for Chunks {
    fn allocate_chunk(&self) -> Option<u64> {
        self.0.lock().unwrap().pop()
    }
    fn free_chunk(&self, pa: u64) {
        self.0.lock().unwrap().push(pa);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only w3` runs one workload (for profiling).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |w: &str| only.as_deref().is_none_or(|o| o == w);
    // `--platform snp` runs one platform (for profiling).
    let platform = args
        .iter()
        .position(|a| a == "--platform")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let platforms: Vec<Plat> = [Plat::Tdx, Plat::Snp]
        .into_iter()
        .filter(|p| {
            platform
                .as_deref()
                .is_none_or(|w| format!("{p:?}").eq_ignore_ascii_case(w))
        })
        .collect();
    if let Some(i) = args.iter().position(|a| a == "--strategy") {
        let strategy = match args.get(i + 1).map(String::as_str) {
            Some("ours") => Strategy::Ours,
            Some("eager") => Strategy::Eager,
            Some("linux") => Strategy::Linux,
            other => panic!("--strategy ours|eager|linux, not {other:?}"),
        };
        ONLY_STRATEGY.set(strategy).expect("set once");
    }
    let runs = if quick { 1 } else { 5 };
    // Count targets: exact, a miss fails the run.
    let failures = std::cell::RefCell::new(Vec::new());
    let check = |ok: bool, what: String| {
        // One strategy alone (profiling) has nothing to compare against.
        if ONLY_STRATEGY.get().is_some() {
            println!("  target: {what}: not checked with --strategy");
            return;
        }
        println!("  target: {what}: {}", if ok { "met" } else { "NOT MET" });
        if !ok {
            failures.borrow_mut().push(what);
        }
    };
    // Timing targets: reported with the figure, never a failure.
    let slow = std::cell::RefCell::new(Vec::new());
    let check_time = |ok: bool, what: String| {
        println!(
            "  timing target: {what}: {}",
            if ok {
                "met"
            } else {
                "not met (timing: reported, not a failure)"
            }
        );
        if !ok {
            slow.borrow_mut().push(what);
        }
    };
    let mut svgs = Vec::new();
    if runs == 1 {
        println!(
            "Conversion benchmark: zero-cost counted hypercalls (W7 also at a modelled cost); engine time of one run."
        );
    } else {
        println!(
            "Conversion benchmark: zero-cost counted hypercalls (W7 also at a modelled cost); engine time over {runs} runs as min/med/max, targets on the median."
        );
    }

    // ---- W1 boot ----------------------------------------------------------
    let w1_levels = [Level::Pdpt, Level::Pt, Level::Pdpt];
    let w1 = [
        ("W1a boot: 64 MiB swiotlb to shared", (256 * MIB, 64 * MIB)),
        ("W1b boot: 1 GiB of 4 KiB pages to shared", (GIB, GIB)),
    ];
    for (name, (pa, len)) in w1.into_iter().filter(|_| wanted("w1")) {
        print_header(name, &timed("ns/page", runs));
        for &plat in &platforms {
            let mut bound = Bound::default();
            bound.add(&[(pa, len)], Visibility::Shared);
            let [(ns, ours), _, _] = compare(plat, runs, &w1_levels, &|_| vec![], &|conv, _| {
                conv(Target::Physical { pa, len }.into(), Visibility::Shared, &mut [0; 1]);
                len / PAGE
            });
            print_bound(plat, &bound);
            let calls = ours.counters.hypercalls();
            check(
                calls == bound.hypercalls(plat),
                format!(
                    "{name}, {plat:?}: hypercalls {calls} = lower bound {}",
                    bound.hypercalls(plat)
                ),
            );
            if len == GIB && !quick {
                check_time(
                    ns.med <= 10.0,
                    format!(
                        "{name}, {plat:?}: {:.1} ns per 4 KiB page <= 10 (min/med/max {})",
                        ns.med,
                        ns.show(1)
                    ),
                );
            }
        }
    }

    // ---- W2 driver buffer ---------------------------------------------------
    let w2_levels = [Level::Pdpt, Level::Pd];
    let w2_frames = scattered(4096, 2 * GIB - 128 * MIB, true, 0x9E37_79B9_7F4A_7C15);
    if wanted("w2") {
        print_header(
            "W2 driver buffer: 16 MiB vmalloc of scattered frames, to shared and back",
            &timed("ns/page", runs),
        );
    }
    let w2_runs = runs_of(&w2_frames);
    for plat in platforms.clone().into_iter().filter(|_| wanted("w2")) {
        let mut bound = Bound::default();
        bound.add(&w2_runs, Visibility::Shared);
        bound.add(&w2_runs, Visibility::Private);
        let [(ns, ours), _, (linux_ns, linux)] = compare(
            plat,
            runs,
            &w2_levels,
            &|m| vec![m.vmalloc(&w2_frames)],
            &|conv, data| {
                let (va, len) = (data[0], w2_frames.len() as u64 * PAGE);
                let mut scratch = vec![0; w2_frames.len()];
                conv(Target::Virtual { va, len }.into(), Visibility::Shared, &mut scratch);
                conv(Target::Virtual { va, len }.into(), Visibility::Private, &mut scratch);
                2 * len / PAGE
            },
        );
        print_bound(plat, &bound);
        let calls = ours.counters.hypercalls();
        check(
            calls == bound.hypercalls(plat),
            format!(
                "W2 {plat:?}: hypercalls {calls} = lower bound {}",
                bound.hypercalls(plat)
            ),
        );
        let (before, after) = (ours.layout_before, ours.layout_after);
        check(
            after[2] == before[2] && after[1] <= before[1],
            format!(
                "W2 {plat:?}: no residual split (4K leaves {} -> {})",
                before[2], after[2]
            ),
        );
        if !quick {
            let (ok, what) = ratio_target(&format!("W2 {plat:?}"), &ns, &linux_ns);
            check_time(ok, what);
        }
        if plat == Plat::Tdx {
            svgs.push(write_svg(
                "w2",
                &[("ours", &ours.svg_cells), ("Linux strategy", &linux.svg_cells)],
                2,
            ));
        }
    }

    // ---- W3 scattered -------------------------------------------------------
    let w3_levels = [Level::Pdpt; 4];
    let w3_count = if quick { 1000 } else { 10_000 };
    let w3_frames = scattered(w3_count, 4 * GIB - 128 * MIB, false, 0x2545_F491_4F6C_DD1D);
    if wanted("w3") {
        print_header(
            &format!(
                "W3 scattered: {w3_count} random frames of a 4 GiB direct map of 1 GiB pages, one by one, there and back"
            ),
            &timed("ns/conv", runs),
        );
    }
    for plat in platforms.clone().into_iter().filter(|_| wanted("w3")) {
        let mut bound = Bound::default();
        for to in [Visibility::Shared, Visibility::Private] {
            for &f in &w3_frames {
                bound.add(&[(f, PAGE)], to);
            }
        }
        let [(ns, ours), _, (linux_ns, linux)] = compare(plat, runs, &w3_levels, &|_| vec![], &|conv, _| {
            for to in [Visibility::Shared, Visibility::Private] {
                for &f in &w3_frames {
                    conv(Target::Physical { pa: f, len: PAGE }.into(), to, &mut [0; 1]);
                }
            }
            2 * w3_frames.len() as u64
        });
        print_bound(plat, &bound);
        let calls = ours.counters.hypercalls();
        check(
            calls == bound.hypercalls(plat),
            format!(
                "W3 {plat:?}: hypercalls {calls} = lower bound {}",
                bound.hypercalls(plat)
            ),
        );
        let (before, after) = (ours.layout_before, ours.layout_after);
        check(
            after == before,
            format!("W3 {plat:?}: original layout back ({before:?} -> {after:?})"),
        );
        if !quick {
            let (ok, what) = ratio_target(&format!("W3 {plat:?}"), &ns, &linux_ns);
            check_time(ok, what);
        }
        if plat == Plat::Tdx {
            svgs.push(write_svg(
                "w3",
                &[("ours", &ours.svg_cells), ("Linux strategy", &linux.svg_cells)],
                4,
            ));
        }
    }

    // ---- W4 churn -----------------------------------------------------------
    let allocations = if quick { 10_000u64 } else { 100_000 };
    let w4_levels = [Level::Pd, Level::Pd];
    if wanted("w4") {
        print_header(
            &format!("W4 churn: {allocations} allocations of 4-64 KiB shared buffers"),
            &timed("ns/alloc", runs),
        );
    }
    for plat in platforms.clone().into_iter().filter(|_| wanted("w4")) {
        let mut direct = Vec::new();
        for (label, strategy, pooled) in [
            ("direct", Strategy::Ours, false),
            ("direct", Strategy::Eager, false),
            ("direct", Strategy::Linux, false),
            ("pool", Strategy::Ours, true),
        ] {
            let churn = |conv: &Conv<'_>, _: &[u64]| {
                let mut x = 0xDEAD_BEEFu64;
                let mut live: Vec<(u64, u64)> = Vec::new();
                let mut done = 0;
                if pooled {
                    struct ByClosure<'c>(&'c Conv<'c>);
                    impl coco_convert::pool::Convert for ByClosure<'_> {
                        fn convert(
                            &self,
                            t: Target,
                            to: Visibility,
                        ) -> Result<coco_convert::Report, coco_convert::ConvertError> {
                            (self.0)(t.into(), to, &mut [0; 1]);
                            Ok(coco_convert::Report::default())
                        }

                        fn stopped(&self) -> bool {
                            false
                        }
                    }
                    let chunks = Chunks(std::sync::Mutex::new(
                        (0..48).map(|i| 512 * MIB + i * 2 * MIB).collect(),
                    ));
                    let mut slots = [ChunkSlot::new(); 48];
                    let pool = SharedPool::new(ByClosure(conv), chunks, &mut slots, 1);
                    let mut bufs = Vec::new();
                    while done < allocations {
                        if bufs.len() < 64 && (xorshift(&mut x) % 3 != 0 || bufs.is_empty()) {
                            bufs.push(pool.alloc(PAGE * (1 + (x >> 40) % 16)).unwrap());
                            done += 1;
                        } else {
                            let i = (xorshift(&mut x) % bufs.len() as u64) as usize;
                            pool.free(bufs.swap_remove(i)).unwrap();
                        }
                    }
                    for b in bufs {
                        pool.free(b).unwrap();
                    }
                    return allocations;
                }
                let mut free_slots: Vec<u64> = (0..256).map(|i| 256 * MIB + i * 64 * 1024).collect();
                while done < allocations {
                    if live.len() < 64 && (xorshift(&mut x) % 3 != 0 || live.is_empty()) {
                        let slot = free_slots.swap_remove((x >> 20) as usize % free_slots.len());
                        let len = PAGE * (1 + (x >> 40) % 16);
                        conv(
                            Target::Physical { pa: slot, len }.into(),
                            Visibility::Shared,
                            &mut [0; 1],
                        );
                        live.push((slot, len));
                        done += 1;
                    } else {
                        let (slot, len) = live.swap_remove((xorshift(&mut x) % live.len() as u64) as usize);
                        conv(
                            Target::Physical { pa: slot, len }.into(),
                            Visibility::Private,
                            &mut [0; 1],
                        );
                        free_slots.push(slot);
                    }
                }
                for (slot, len) in live {
                    conv(
                        Target::Physical { pa: slot, len }.into(),
                        Visibility::Private,
                        &mut [0; 1],
                    );
                }
                allocations
            };
            let mut outcomes: Vec<Outcome> = (0..runs)
                .map(|_| measure(plat, strategy, &w4_levels, &|_| vec![], &churn))
                .collect();
            let ns = Spread::of(outcomes.iter().map(|o| o.ns / o.units as f64));
            let o = outcomes.pop().expect("at least one run");
            print_row(&Row {
                label: format!("{plat:?} {label} {strategy:?}"),
                c: o.counters,
                ns_per_unit: ns,
                layout: (o.layout_before, o.layout_after),
            });
            if !pooled {
                let splits = o.counters.splits_1g + o.counters.splits_2m;
                direct.push((strategy, splits, ns, o.layout_before, o.layout_after));
            }
            if pooled {
                let per_100 = o.counters.hypercalls() as f64 * 100.0 / allocations as f64;
                check(
                    o.counters.splits_1g + o.counters.splits_2m == 0,
                    format!("W4 {plat:?} pool: no split"),
                );
                check(
                    per_100 < 1.0,
                    format!("W4 {plat:?} pool: {per_100:.3} hypercalls per 100 allocations < 1 (warm-up included)"),
                );
            }
        }
        if let [(Strategy::Ours, ours_splits, ours_ns, before, after), _, (Strategy::Linux, linux_splits, linux_ns, ..)] =
            direct[..]
        {
            check(
                ours_splits <= linux_splits,
                format!("W4 {plat:?} direct: splits ours {ours_splits} <= Linux strategy {linux_splits}"),
            );
            check(
                after[2] <= before[2] && after[1] + 512 * after[0] >= before[1] + 512 * before[0],
                format!("W4 {plat:?} direct: the direct map ends whole ({before:?} -> {after:?})"),
            );
            if !quick {
                let (ok, what) = ratio_target(&format!("W4 {plat:?} direct"), &ours_ns, &linux_ns);
                check_time(ok, what);
            }
        }
    }

    // ---- W5 unaccepted memory ----------------------------------------------
    let w5_count = if quick { 2000 } else { 10_000 };
    let w5_pages: Vec<u64> = scattered(w5_count, W5_LEN, false, 0x6A09_E667_F3BC_C908)
        .into_iter()
        .map(|p| W5_BASE + p)
        .collect();
    let (lazy, lazy_calls) = lazy_bound(&w5_pages);
    let lazy_units = lazy.pvalidate;
    if wanted("w5") {
        print_header(
            &format!(
                "W5 unaccepted memory: 2 GiB handed over unaccepted; {w5_count} random 4 KiB pages accepted as an allocator hands them out (lazy) vs all at boot (eager)"
            ),
            &timed("ns/unit", runs),
        );
    }
    for plat in platforms.clone().into_iter().filter(|_| wanted("w5")) {
        let mut totals = Vec::new();
        for (label, how, bound, units) in [
            ("lazy", Acceptance::Lazy(&w5_pages), lazy, lazy_units),
            ("eager", Acceptance::Eager { cpus: 1 }, eager_bound(), W5_UNITS),
            ("eager 2 CPUs", Acceptance::Eager { cpus: 2 }, eager_bound(), W5_UNITS),
        ] {
            let outcomes: Vec<Accepted> = (0..runs).map(|_| measure_accept(plat, how)).collect();
            let ns = Spread::of(outcomes.iter().map(|o| o.ns / units as f64));
            let total = Spread::of(outcomes.iter().map(|o| o.ns / 1e6));
            let o = outcomes.last().expect("at least one run");
            let name = format!("W5 {plat:?} {label}");
            let wall = matches!(how, Acceptance::Eager { cpus: 2.. });
            print_row(&Row {
                label: format!("{plat:?} {label}"),
                c: o.counters,
                ns_per_unit: ns,
                layout: (o.layout_before, o.layout_after),
            });
            print_bound(plat, &bound);
            let reported: u64 = o.reported.iter().sum();
            println!(
                "  {:<26} {reported} (expected {units}), {} still unaccepted; {} ms {}",
                "  units accepted",
                o.left,
                total.show(3),
                if wall { "wall" } else { "engine" }
            );
            totals.push((label, total.med));
            let calls = o.counters.hypercalls();
            if wall {
                // Where one CPU runs into the other's share depends on
                // timing: the count is reported, not a target.
                println!(
                    "  {name}: hypercalls {calls} against lower bound {} (depends on the CPUs' timing, not a target)",
                    bound.hypercalls(plat)
                );
            } else {
                check(
                    calls == bound.hypercalls(plat),
                    format!("{name}: hypercalls {calls} = lower bound {}", bound.hypercalls(plat)),
                );
            }
            // Each unit once: in every run, what the calls reported and
            // the engine counted is the expected number of distinct units,
            // and the bitmap and the state table hold exactly the rest.
            let once = outcomes.iter().all(|o| {
                o.reported.iter().sum::<u64>() == units
                    && o.counters.units_accepted == units
                    && o.left == W5_UNITS - units
                    && o.left_frames == o.left * (UNIT / PAGE)
            });
            check(
                once,
                format!(
                    "{name}: {units} units accepted, each once, {} left unaccepted (bitmap and state table)",
                    W5_UNITS - units
                ),
            );
            if let Acceptance::Lazy(_) = how {
                // Per call: the page's unit and, after a unit's last page,
                // the guard unit, each the first time it is needed.
                let differ = o.reported.iter().zip(&lazy_calls).filter(|(a, b)| a != b).count();
                check(
                    differ == 0,
                    format!("{name}: every call accepted the units it needed, guard included ({differ} calls differ)"),
                );
            }
        }
        if let [(_, lazy_ms), (_, eager_ms), (_, wall_ms)] = totals[..] {
            println!(
                "  W5 {plat:?} (medians): lazy {lazy_ms:.3} ms for {lazy_units} units in {w5_count} calls, eager {eager_ms:.3} ms for {W5_UNITS} units ({wall_ms:.3} ms wall on 2 CPUs)",
            );
        }
    }

    // ---- W6 frame list -------------------------------------------------------
    let w6_levels = [Level::Pdpt; 4];
    let w6_count = if quick { 1000 } else { 10_000 };
    let mut w6_frames = scattered(w6_count, 4 * GIB - 128 * MIB, false, 0x3C6E_F372_FE94_F82B);
    // A list goes in ascending order.
    w6_frames.sort_unstable();
    if wanted("w6") {
        print_header(
            &format!(
                "W6 frame list: {w6_count} random frames of a 4 GiB direct map of 1 GiB pages, as one list, there and back"
            ),
            &timed("ns/page", runs),
        );
    }
    let w6_runs = runs_of(&w6_frames);
    for plat in platforms.clone().into_iter().filter(|_| wanted("w6")) {
        let mut bound = Bound::default();
        bound.add(&w6_runs, Visibility::Shared);
        bound.add(&w6_runs, Visibility::Private);
        let [(_, ours), _, (_, linux)] = compare(plat, runs, &w6_levels, &|_| vec![], &|conv, _| {
            conv(What::Frames(&w6_frames), Visibility::Shared, &mut []);
            conv(What::Frames(&w6_frames), Visibility::Private, &mut []);
            2 * w6_frames.len() as u64
        });
        print_bound(plat, &bound);
        let calls = ours.counters.hypercalls();
        check(
            calls == bound.hypercalls(plat),
            format!(
                "W6 {plat:?}: hypercalls {calls} = lower bound {}",
                bound.hypercalls(plat)
            ),
        );
        // Compaction's own shootdown, after the workload, aside.
        let shootdowns = ours.counters.shootdowns - ours.compaction_shootdowns;
        check(
            shootdowns == bound.shootdowns,
            format!(
                "W6 {plat:?}: shootdowns {shootdowns} = {}, one per transaction",
                bound.shootdowns
            ),
        );
        let (before, after) = (ours.layout_before, ours.layout_after);
        check(
            after == before,
            format!("W6 {plat:?}: original layout back ({before:?} -> {after:?})"),
        );
        if plat == Plat::Tdx {
            svgs.push(write_svg(
                "w6",
                &[("ours", &ours.svg_cells), ("Linux strategy", &linux.svg_cells)],
                4,
            ));
        }
    }

    // ---- W7 two CPUs -------------------------------------------------------
    let w7_count = if quick { 500 } else { 5000 };
    let w7_frames = scattered(2 * w7_count, 4 * GIB - 128 * MIB, false, 0xB504_F333_F9DE_6484);
    let w7_sets: [&[u64]; 2] = [&w7_frames[..w7_count], &w7_frames[w7_count..]];
    let w7_cost = Duration::from_micros(2);
    let ns_per_tick = if wanted("w7") { ns_per_tsc_tick() } else { 0.0 };
    if wanted("w7") && ns_per_tick > 0.0 {
        println!(
            "\nW7: the table lock's hold time is read with the TSC, {:.3} GHz against the OS clock",
            1.0 / ns_per_tick
        );
    }
    for cost in [Duration::ZERO, w7_cost].into_iter().filter(|_| wanted("w7")) {
        print_header(
            &format!(
                "W7 two CPUs: each converts its own {w7_count} random frames (4 GiB of 1 GiB pages) one by one, there and back, {}; against one CPU doing the same",
                if cost.is_zero() {
                    "zero-cost hypercalls".to_string()
                } else {
                    format!("every hypercall (MapGPA, ACCEPT, PSC exit, PVALIDATE) spinning {} ns", cost.as_nanos())
                }
            ),
            &timed("wall ns/conv", runs),
        );
        for &plat in &platforms {
            for strategy in [Strategy::Ours, Strategy::Linux] {
                // Per run, one CPU then two, so a run's ratio compares
                // neighbours in time.
                let outcomes: Vec<[Parallel; 2]> = (0..runs)
                    .filter_map(|_| {
                        let one = measure_parallel(plat, strategy, &w7_sets[..1], cost)?;
                        let two = measure_parallel(plat, strategy, &w7_sets, cost)?;
                        Some([one, two])
                    })
                    .collect();
                let Some(last) = outcomes.last() else { continue };
                let name = format!(
                    "W7 {plat:?} {strategy:?}{}",
                    if cost.is_zero() { "" } else { " costed" }
                );
                for (cpus, o) in [1, 2].into_iter().zip(last) {
                    print_row(&Row {
                        label: format!("{plat:?} {strategy:?} {cpus} CPU{}", if cpus == 1 { "" } else { "s" }),
                        c: o.counters,
                        ns_per_unit: Spread::of(
                            outcomes
                                .iter()
                                .map(|r| r[cpus - 1].wall_ns / r[cpus - 1].conversions as f64),
                        ),
                        layout: (o.layout_before, o.layout_after),
                    });
                    let mut bound = Bound::default();
                    for to in [Visibility::Shared, Visibility::Private] {
                        for &f in w7_sets[..cpus].iter().copied().flatten() {
                            bound.add(&[(f, PAGE)], to);
                        }
                    }
                    print_bound(plat, &bound);
                    // Every run, not only the last: two CPUs interleave
                    // differently each time.
                    let calls: Vec<u64> = outcomes.iter().map(|r| r[cpus - 1].counters.hypercalls()).collect();
                    check(
                        calls.iter().all(|&c| c == bound.hypercalls(plat)),
                        format!(
                            "{name}, {cpus} CPU(s): hypercalls {calls:?} = lower bound {} in every run",
                            bound.hypercalls(plat)
                        ),
                    );
                    if strategy == Strategy::Ours {
                        let changed = outcomes
                            .iter()
                            .map(|r| &r[cpus - 1])
                            .find(|o| o.layout_after != o.layout_before);
                        check(
                            changed.is_none(),
                            format!(
                                "{name}, {cpus} CPU(s): original layout back in every run{}",
                                changed.map_or(String::new(), |o| format!(
                                    " ({:?} -> {:?})",
                                    o.layout_before, o.layout_after
                                ))
                            ),
                        );
                    }
                }
                let throughput = |r: &Parallel| r.conversions as f64 / r.wall_ns * 1e3;
                let one = Spread::of(outcomes.iter().map(|r| throughput(&r[0])));
                let two = Spread::of(outcomes.iter().map(|r| throughput(&r[1])));
                let efficiency = Spread::of(outcomes.iter().map(|r| throughput(&r[1]) / (2.0 * throughput(&r[0]))));
                println!(
                    "  {:<26} 1 CPU {} M conv/s, 2 CPUs {} M conv/s; scaling efficiency {}",
                    "  throughput",
                    one.show(3),
                    two.show(3),
                    efficiency.show(2)
                );
                for cpus in [1, 2] {
                    let over = |f: &dyn Fn(&Parallel) -> f64| Spread::of(outcomes.iter().map(|r| f(&r[cpus - 1])));
                    let held = |r: &Parallel| r.lock.held_ticks as f64 * ns_per_tick;
                    // The same in every run but for the odd extra
                    // collapse: one figure.
                    let acquisitions = over(&|r| r.lock.acquisitions as f64 / r.conversions as f64).med;
                    let per_acq = over(&|r| held(r) / r.lock.acquisitions as f64);
                    let per_conv = over(&|r| held(r) / r.conversions as f64);
                    let share = over(&|r| 100.0 * held(r) / r.busy_ns);
                    println!(
                        "  {:<26} {cpus} CPU{}: {acquisitions:.2} acquisitions/conv, held {} ns each, {} ns per conversion, {} % of conversion time",
                        "  table lock",
                        if cpus == 1 { " " } else { "s" },
                        per_acq.show(0),
                        per_conv.show(0),
                        share.show(1)
                    );
                    // Twice per conversion (before and after its host
                    // calls) and once more per reserve filled for a split;
                    // a lock taken per frame or per pass fails this.
                    let over_bound: Vec<(u64, u64)> = outcomes
                        .iter()
                        .map(|r| &r[cpus - 1])
                        .map(|r| {
                            let bound = 2 * r.conversions + r.counters.splits_1g + r.counters.splits_2m;
                            (r.lock.acquisitions, bound)
                        })
                        .filter(|&(taken, bound)| taken > bound)
                        .collect();
                    check(
                        over_bound.is_empty(),
                        format!(
                            "{name}, {cpus} CPU(s): table lock taken at most twice per conversion and once per split, in every run{}",
                            if over_bound.is_empty() {
                                String::new()
                            } else {
                                format!(" (taken, bound: {over_bound:?})")
                            }
                        ),
                    );
                }
                // With 2 us per call, a conversion spends most of its time
                // in host calls, outside the lock (held for about a
                // quarter of it in the runs measured): two CPUs can overlap
                // those, so near 1 is possible, and 0.8 leaves room for
                // the waits where their locked phases meet.
                if !quick && !cost.is_zero() {
                    check_time(
                        efficiency.med >= 0.8,
                        format!(
                            "{name}: 2-CPU scaling efficiency {:.2} >= 0.8 with {} ns per hypercall (min/med/max {})",
                            efficiency.med,
                            cost.as_nanos(),
                            efficiency.show(2)
                        ),
                    );
                }
            }
        }
    }

    if !svgs.is_empty() {
        let paths: Vec<String> = svgs.iter().map(|p| p.display().to_string()).collect();
        println!(
            "\nSVGs of the direct map (ours beside the Linux strategy): {}",
            paths.join(", ")
        );
    }
    let (failures, slow) = (failures.into_inner(), slow.into_inner());
    if !slow.is_empty() {
        println!("{} timing target(s) not met (not a failure):", slow.len());
        for what in &slow {
            println!("  {what}");
        }
    }
    if !failures.is_empty() {
        eprintln!("{} count target(s) not met:", failures.len());
        for what in &failures {
            eprintln!("  {what}");
        }
        std::process::exit(1);
    }
}
