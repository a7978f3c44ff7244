//! The zeropad fix-up's cost: decode + fix-up per fault (what an OS's #PF
//! handler adds), the site lookup, and for context the whole user-space
//! round trip of a real fault (kernel entry, SIGSEGV delivery, the fix-up,
//! sigreturn) and a load that does not fault.
//!
//! Run: `scripts/bench-zeropad` (or `cargo bench -p integration --bench
//! zeropad`; `-- --quick` for a short run). Medians over samples, each the
//! mean of a batch.

use std::hint::black_box;
use std::time::Instant;

use coco_convert::zeropad::{self, FaultFrame, Gpr};
use integration::signals::{setup, Pages};

fn median_ns(samples: usize, batch: u64, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (samples, batch) = if quick { (11, 1_000) } else { (101, 20_000) };
    setup();

    let code = [0x48u8, 0x8B, 0x01]; // mov rax, [rcx]
    let fixup = median_ns(samples, batch, || {
        let mut f = FaultFrame {
            gprs: [0; 16],
            rip: 0x40_0000,
        };
        f.gprs[Gpr::Rcx as usize] = black_box(0x1000_0FFD);
        let r = zeropad::fixup_with(&mut f, black_box(&code), black_box(0x1000_1000), |a| a ^ 0x5A5A);
        assert!(r.is_ok(), "the benchmark must time the fix-up, not a refusal");
        black_box(f);
    });
    let sib = [0x4Au8, 0x8B, 0x84, 0xF9, 0x00, 0x10, 0x00, 0x00]; // mov rax, [rcx + r15*8 + 0x1000]
    let fixup_sib = median_ns(samples, batch, || {
        let mut f = FaultFrame {
            gprs: [0; 16],
            rip: 0x40_0000,
        };
        f.gprs[Gpr::Rcx as usize] = black_box(0x0FFD - 0x40);
        f.gprs[Gpr::R15 as usize] = 8;
        let r = zeropad::fixup_with(&mut f, black_box(&sib), black_box(0x2000), |a| a ^ 0x5A5A);
        assert!(r.is_ok(), "the benchmark must time the fix-up, not a refusal");
        black_box(f);
    });
    let site = coco_convert::zeropad::site::sites()
        .iter()
        .rfind(|s| !s.is_empty())
        .map_or(0, |s| s.address());
    let lookup = median_ns(samples, batch, || {
        black_box(zeropad::is_zeropad_site(black_box(site)));
    });

    let pages = Pages::new();
    let p = (pages.boundary() - 3) as *const u8;
    let round_trip = median_ns(samples, batch / 20, || {
        // SAFETY: the first byte is readable; the handler is installed.
        black_box(unsafe { zeropad::load_unaligned_zeropad(black_box(p)) });
    });
    pages.protect_second(libc::PROT_READ);
    let no_fault = median_ns(samples, batch, || {
        // SAFETY: both pages are readable.
        black_box(unsafe { zeropad::load_unaligned_zeropad(black_box(p)) });
    });
    let sites = coco_convert::zeropad::site::sites()
        .iter()
        .filter(|s| !s.is_empty())
        .count();

    println!(
        "zeropad fix-up, median ns per operation ({samples} samples{})",
        if quick { ", quick" } else { "" }
    );
    println!("  {:<58} {:>9.1}", "decode + fix-up, mov rax, [rcx]", fixup);
    println!(
        "  {:<58} {:>9.1}",
        "decode + fix-up, mov rax, [rcx + r15*8 + disp32]", fixup_sib
    );
    println!(
        "  {:<58} {:>9.1}",
        format!("site lookup ({sites} sites in this binary)"),
        lookup
    );
    println!(
        "  {:<58} {:>9.1}",
        "real fault: SIGSEGV delivery + fix-up + sigreturn", round_trip
    );
    println!("  {:<58} {:>9.1}", "load_unaligned_zeropad, no fault", no_fault);
}
