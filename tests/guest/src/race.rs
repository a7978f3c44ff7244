//! Scenario 6: CPU 1 loads across a page boundary in a loop while CPU 0
//! converts the next page back and forth; every TLB shootdown reaches CPU 1
//! by IPI. Every result must be the zero-padded word (the next page not
//! present: a real #PF fixed up) or the full word (present, with whatever
//! the conversion left in it: the emulators' scribble, or zeros).
//!
//! The image for real hosts starts no second CPU (a TD's vCPUs wake
//! through the ACPI multiprocessor wakeup mailbox, an SNP guest's through
//! the AP-creation event, and neither is built), so there it is compiled
//! but never entered.
#![cfg_attr(not(feature = "emulator"), allow(dead_code))]

use core::sync::atomic::{AtomicU64, Ordering};

use coco_convert::{Platform, Target, Visibility};

use crate::memory::direct_map;
use crate::scenarios::{check, GuestEngine};
use crate::{println, smp, ZEROPAD_FIXUPS};

const IDLE: u64 = 0;
const RACE: u64 = 1;
const SWITCH: u64 = 2;

static COMMAND: AtomicU64 = AtomicU64::new(IDLE);
static ARG: AtomicU64 = AtomicU64::new(0);
static EXPECT: AtomicU64 = AtomicU64::new(0);
static LOADS: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);
static LAST_WRONG: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

/// CPU 1's loop.
pub fn ap_loop() -> ! {
    loop {
        match COMMAND.load(Ordering::Acquire) {
            RACE => {
                let p = ARG.load(Ordering::Relaxed) as *const u8;
                // SAFETY: the first three bytes are on a page that stays
                // private and mapped; the rest may fault, and the fault
                // handler is wired.
                let v = unsafe { coco_convert::zeropad::load_unaligned_zeropad(p) };
                let high = v >> 24;
                if v & 0xFF_FFFF != EXPECT.load(Ordering::Relaxed) || (high != 0 && high != 0xA5_A5A5_A5A5) {
                    WRONG.fetch_add(1, Ordering::Relaxed);
                    LAST_WRONG.store(v, Ordering::Relaxed);
                }
                LOADS.fetch_add(1, Ordering::Relaxed);
            }
            SWITCH => {
                // SAFETY: the new hierarchy maps this kernel as the old one.
                unsafe { core::arch::asm!("mov cr3, {0}", in(reg) ARG.load(Ordering::Acquire), options(nostack)) };
                COMMAND.store(IDLE, Ordering::Release);
            }
            _ => core::hint::spin_loop(),
        }
        DONE.fetch_add(1, Ordering::Relaxed);
    }
}

/// Moves CPU 1 to the page tables at `root`.
pub fn switch_ap(root: u64) {
    ARG.store(root, Ordering::Release);
    COMMAND.store(SWITCH, Ordering::Release);
    while COMMAND.load(Ordering::Acquire) != IDLE {
        core::hint::spin_loop();
    }
}

/// Runs the race on CPU 0 for `rounds` round trips.
pub fn run<P: Platform>(e: &GuestEngine<P>, rounds: u64) {
    let before = e.counters();
    let a = (1 << 30) + (900 << 20);
    let b = a + 4096;
    let p = (direct_map() + b - 3) as *mut u8;
    // SAFETY: the last three bytes of page `a`, private and ours.
    unsafe { p.cast::<[u8; 3]>().write_volatile([0x5A, 0x6B, 0x7C]) };
    EXPECT.store(0x7C6B5A, Ordering::Relaxed);
    ARG.store(p as u64, Ordering::Relaxed);
    LOADS.store(0, Ordering::Relaxed);
    WRONG.store(0, Ordering::Relaxed);
    let (fixups, ipis) = (
        ZEROPAD_FIXUPS.load(Ordering::Relaxed),
        smp::IPIS.load(Ordering::Relaxed),
    );
    COMMAND.store(RACE, Ordering::Release);
    while LOADS.load(Ordering::Relaxed) < 1000 {
        core::hint::spin_loop();
    }
    for _ in 0..rounds {
        check(
            e.convert(Target::Physical { pa: b, len: 4096 }, Visibility::Shared)
                .is_ok(),
            "race: to shared failed",
        );
        check(
            e.convert(Target::Physical { pa: b, len: 4096 }, Visibility::Private)
                .is_ok(),
            "race: back failed",
        );
    }
    // Let CPU 1 load a while longer, then stop it.
    let loads = LOADS.load(Ordering::Relaxed);
    while LOADS.load(Ordering::Relaxed) < loads + 1000 {
        core::hint::spin_loop();
    }
    COMMAND.store(IDLE, Ordering::Release);
    let (loads, wrong) = (LOADS.load(Ordering::Relaxed), WRONG.load(Ordering::Relaxed));
    let fixed = ZEROPAD_FIXUPS.load(Ordering::Relaxed) - fixups;
    let ipis = smp::IPIS.load(Ordering::Relaxed) - ipis;
    let c = e.counters().since(&before);
    println!(
        "  6 race: {rounds} round trips on CPU 0, {loads} loads on CPU 1: {fixed} zeropad fix-ups on real #PF, {wrong} wrong values; {} shootdowns, {ipis} by IPI",
        c.shootdowns
    );
    if wrong != 0 {
        println!("  last wrong value: {:#x}", LAST_WRONG.load(Ordering::Relaxed));
    }
    check(wrong == 0, "race: a load returned a wrong value");
    check(fixed > 0, "race: CPU 1 never ran into the converting page");
    check(ipis >= c.shootdowns, "race: a shootdown did not reach CPU 1");
}
