//! The engine at work: a 16 MiB vmalloc-style buffer of scattered 4 KiB
//! frames (a hv_netvsc-like receive buffer) converted to shared and back
//! with the frames' direct-map aliases, on TDX and on SEV-SNP, against the
//! hypercall models, on real x86-64 page tables in simulated memory. Prints
//! the counters and the direct map's layout before, during and after.
//!
//! Run: `cargo run --release -p integration --example demo`

use coco_convert::{CounterSnapshot, Target, Visibility};
use hvmock::{SnpConfig, TdxConfig};
use integration::sim::DIRECT_MAP_VA;
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, MEMORY};
use integration::{GIB, MIB};

fn layout(m: &Machine) -> String {
    let tables = m.page_tables();
    let mut counts = [0u64; 3];
    let mut shared = 0;
    for map in tables.mappings(&m.mem) {
        if map.va >= DIRECT_MAP_VA && map.va < DIRECT_MAP_VA + MEMORY {
            counts[match map.size {
                s if s == GIB => 0,
                s if s == 2 * MIB => 1,
                _ => 2,
            }] += 1;
            shared += (map.enc_set == (m.enc.set_means() == Visibility::Shared)) as u64 * map.size / 4096;
        }
    }
    format!(
        "direct map: {} x 1G, {} x 2M, {} x 4K leaves; {} shared pages",
        counts[0], counts[1], counts[2], shared
    )
}

/// 4096 frames spread over the 1 GiB page and the 2 MiB-mapped GiB, with a
/// few contiguous runs, as a long-running guest's allocator returns them.
fn scattered_frames() -> Vec<u64> {
    let mut frames = Vec::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while frames.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = (x % ((MEMORY - 128 * MIB) / 4096)) * 4096;
        let run = 1 + (x >> 60) % 4;
        for i in 0..run {
            let pa = base + i * 4096;
            if frames.len() < 4096 && !frames.contains(&pa) {
                frames.push(pa);
            }
        }
    }
    frames
}

fn print(label: &str, c: &CounterSnapshot) {
    println!(
        "  {label}: MapGPA {} ACCEPT {} | PSC exits {} entries {} (MSR {}) PVALIDATE {} | shootdowns {} | splits 1G {} 2M {} | collapses 2M {} 1G {} | PTE writes {}",
        c.map_gpa, c.accept, c.psc_exits, c.psc_entries, c.psc_msr, c.pvalidate, c.shootdowns, c.splits_1g, c.splits_2m,
        c.collapses_2m, c.collapses_1g, c.pte_writes
    );
}

fn main() {
    // The models check at every hypercall that no alias of its frames is
    // present, by walking every mapping: with the direct map split into
    // ~400,000 4 KiB leaves that is most of the run time. `--fast` skips it.
    let check = !std::env::args().any(|a| a == "--fast");
    if check {
        println!(
            "(the models check every hypercall for present aliases: about 50 s in release; --fast skips the check)"
        );
    }
    let frames = scattered_frames();
    let mut sorted = frames.clone();
    sorted.sort_unstable();
    let runs = 1 + sorted.windows(2).filter(|w| w[1] != w[0] + 4096).count();
    println!(
        "16 MiB vmalloc-style buffer: {} frames in {runs} physical runs, scattered over 2 GiB",
        frames.len()
    );
    // Any buffer is one transaction and one shootdown; the scratch only
    // sets how many extents go to the host per call. With room for all
    // 4096 frames (32 KiB; a kernel would use a static or per-CPU buffer)
    // every PSC descriptor is full. `Engine::convert` uses 2 KiB of stack:
    // 256 extents per call.
    let mut scratch = vec![0u64; frames.len()];

    println!("\n== TDX (GPAW 48, shared bit 47) ==");
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    w.tdx.set_alias_check(check);
    let e = w.engine();
    run(&e, &w.m, &frames, &mut scratch, CounterSnapshot::default());
    println!(
        "  alias violations seen by the model: {}{}",
        w.tdx.violations().len(),
        skipped(check)
    );

    println!("\n== SEV-SNP (C-bit 51) ==");
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    w.snp.set_alias_check(check);
    let e = w.engine();
    w.boot_ghcb(&e, MEMORY - 100 * MIB);
    print("GHCB setup", &e.counters());
    run(&e, &w.m, &frames, &mut scratch, e.counters());
    println!(
        "  alias violations seen by the model: {}{}",
        w.snp.violations().len(),
        skipped(check)
    );
}

fn skipped(check: bool) -> &'static str {
    if check {
        ""
    } else {
        " (check skipped: --fast)"
    }
}

fn run<M, F, T, P>(
    e: &coco_convert::Engine<'_, M, F, T, P>,
    m: &Machine,
    frames: &[u64],
    scratch: &mut [u64],
    start: CounterSnapshot,
) where
    M: coco_convert::PhysMem,
    F: coco_convert::FrameSource,
    T: coco_convert::TlbShootdown,
    P: coco_convert::Platform,
{
    let va = m.vmalloc(frames);
    let len = frames.len() as u64 * 4096;
    println!("  before: {}", layout(m));
    e.convert_with_scratch(Target::Virtual { va, len }, Visibility::Shared, scratch)
        .expect("to shared");
    print("to shared ", &e.counters().since(&start));
    println!("  shared: {}", layout(m));
    let mid = e.counters();
    e.convert_with_scratch(Target::Virtual { va, len }, Visibility::Private, scratch)
        .expect("to private");
    e.release_deferred_tables();
    print("to private", &e.counters().since(&mid));
    println!("  after:  {}", layout(m));
    let c = e.counters();
    println!(
        "  table pages: {} taken, {} given back; {} tables the OS built at boot retired by collapses",
        c.table_pages_taken, c.table_pages_freed, c.os_tables_retired
    );
}
