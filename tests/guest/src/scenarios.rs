//! The scenarios, for one platform: each prints a line with its figures and
//! fails the run on any error.

use core::sync::atomic::{AtomicU8, Ordering};

use coco_convert::{ConvertError, CounterSnapshot, Engine, PageState, Platform, Target, Visibility};

use crate::heap::{NO_HEAP, REFUSED};
use crate::memory::{direct_map, direct_map_layout, EarlyFrames, Identity, Shootdown, Tables};
use crate::{fail, println};

pub type GuestEngine<P> = Engine<'static, Identity, &'static EarlyFrames, Shootdown, P>;

pub static STATES: [AtomicU8; (crate::memory::RAM / 4096) as usize] =
    [const { AtomicU8::new(0) }; (crate::memory::RAM / 4096) as usize];

const MIB: u64 = 1 << 20;

/// Every frame any scenario converts, accepts or hands to the host lies
/// in `[SPAN.0, SPAN.1)`: the boot checks the firmware left it free.
pub const SPAN: (u64, u64) = (64 * MIB, (1 << 30) + 902 * MIB);

pub fn check(ok: bool, what: &str) {
    if !ok {
        fail(what);
    }
}

pub fn show(name: &str, c: &CounterSnapshot, extra: core::fmt::Arguments<'_>) {
    println!(
        "  {name}: MapGPA {} ACCEPT {} PSC exits {} (MSR {}) PVALIDATE {} | shootdowns {} | splits 1G {} 2M {} | collapses 2M {} 1G {} | {extra}",
        c.map_gpa, c.accept, c.psc_exits, c.psc_msr, c.pvalidate, c.shootdowns, c.splits_1g, c.splits_2m, c.collapses_2m, c.collapses_1g
    );
}

/// Whether the direct map maps `pa` present and on `side`.
fn mapped(t: &Tables, pa: u64, side: Visibility) -> bool {
    crate::walk::translate(t, direct_map() + pa).is_some_and(|m| m.pa == pa && m.side == side)
}

/// Scenario 1: a conversion that needs a 1 GiB and a 2 MiB split, with
/// the heap off (the engine never allocates; its table pages come from the
/// frame source).
pub fn split_without_heap<P: Platform>(e: &GuestEngine<P>, t: &Tables) {
    let before = e.counters();
    let pa = 700 * MIB + 3 * 4096;
    NO_HEAP.store(true, Ordering::Release);
    let r = e.convert(Target::Physical { pa, len: 4096 }, Visibility::Shared);
    NO_HEAP.store(false, Ordering::Release);
    check(r.is_ok(), "split without heap: conversion failed");
    check(
        REFUSED.load(Ordering::Relaxed) == 0,
        "split without heap: the engine asked for heap memory",
    );
    let c = e.counters().since(&before);
    check(
        c.splits_1g == 1 && c.splits_2m == 1,
        "split without heap: expected a 1 GiB and a 2 MiB split",
    );
    check(
        mapped(t, pa, Visibility::Shared) && mapped(t, pa + 4096, Visibility::Private),
        "split without heap: attributes",
    );
    show(
        "1 split without heap (1 GiB + 2 MiB)",
        &c,
        format_args!("heap allocations refused: 0"),
    );
}

/// Scenario 2: a 64 MiB swiotlb-like range to shared, then used.
pub fn boot<P: Platform>(e: &GuestEngine<P>, t: &Tables, before: CounterSnapshot) {
    let (pa, len) = (256 * MIB, 64 * MIB);
    check(
        e.convert(Target::Physical { pa, len }, Visibility::Shared).is_ok(),
        "boot: swiotlb to shared failed",
    );
    check(
        mapped(t, pa, Visibility::Shared) && mapped(t, pa + len - 4096, Visibility::Shared),
        "boot: not mapped shared",
    );
    check(
        mapped(t, pa - 4096, Visibility::Private) && mapped(t, pa + len, Visibility::Private),
        "boot: neighbours changed",
    );
    // Use it through the direct map: real loads and stores.
    let p = (direct_map() + pa) as *mut u64;
    for i in 0..1024 {
        // SAFETY: the range is mapped (shared) and ours.
        unsafe { p.add(i * 512).write_volatile(i as u64 * 0x9E37) };
    }
    // SAFETY: as above.
    check(
        (0..1024).all(|i| unsafe { p.add(i * 512).read_volatile() } == i as u64 * 0x9E37),
        "boot: shared memory does not hold data",
    );
    show(
        "2 boot",
        &e.counters().since(&before),
        format_args!("64 MiB shared, {} frames shared", e.census().shared),
    );
}

/// Scenario 3: a vmalloc buffer of scattered frames to shared and back,
/// its frames' direct-map aliases with it.
pub fn vmalloc<P: Platform>(e: &GuestEngine<P>, t: &mut Tables) {
    let before = e.counters();
    let mut frames = [0u64; 300];
    for (i, f) in frames.iter_mut().enumerate() {
        *f = (1 << 30) + 100 * MIB + i as u64 * 7 * 4096 + (i as u64 % 3) * 4096;
    }
    let va = t.vmalloc(&frames);
    let len = frames.len() as u64 * 4096;
    let side_at = |va: u64| crate::walk::translate(t, va).map(|m| m.side);
    check(
        e.convert(Target::Virtual { va, len }, Visibility::Shared).is_ok(),
        "vmalloc: to shared failed",
    );
    for (i, &f) in frames.iter().enumerate() {
        check(
            side_at(va + i as u64 * 4096) == Some(Visibility::Shared),
            "vmalloc: alias not shared",
        );
        check(mapped(t, f, Visibility::Shared), "vmalloc: direct-map alias not shared");
    }
    check(
        e.convert(Target::Virtual { va, len }, Visibility::Private).is_ok(),
        "vmalloc: back failed",
    );
    for (i, &f) in frames.iter().enumerate() {
        check(
            side_at(va + i as u64 * 4096) == Some(Visibility::Private) && mapped(t, f, Visibility::Private),
            "vmalloc: not private again",
        );
    }
    frame_list(e, t);
    show(
        "3 vmalloc (scattered frames, their direct-map aliases; a frame list)",
        &e.counters().since(&before),
        format_args!("{} scattered frames there and back", frames.len()),
    );
}

/// A frame list is read where it lies, on every pass: stored in one of its
/// own frames it would be unmapped under the engine (a real #PF here), so
/// the engine, walking these tables for the list's address, refuses it;
/// stored elsewhere it converts there and back.
fn frame_list<P: Platform>(e: &GuestEngine<P>, t: &Tables) {
    let list: [u64; 8] = core::array::from_fn(|i| (1 << 30) + 400 * MIB + i as u64 * 3 * 4096);
    let own = (direct_map() + list[0]) as *mut u64;
    for (i, &f) in list.iter().enumerate() {
        // SAFETY: the first listed frame is private RAM, mapped in the
        // direct map and used by nothing else.
        unsafe { own.add(i).write_volatile(f) };
    }
    // SAFETY: as above; nothing writes it while the slice lives.
    let in_own_frame = unsafe { core::slice::from_raw_parts(own, list.len()) };
    check(
        matches!(
            e.convert_frames(in_own_frame, Visibility::Shared),
            Err(ConvertError::CallerMemoryNotPrivate {
                state: PageState::Converting,
                ..
            })
        ),
        "frame list: one stored in its own frame was not refused",
    );
    check(
        list.iter()
            .all(|&f| e.state(f) == Some(PageState::Private) && mapped(t, f, Visibility::Private)),
        "frame list: a refused list changed something",
    );
    check(
        e.convert_frames(&list, Visibility::Shared).is_ok(),
        "frame list: to shared failed",
    );
    check(
        list.iter().all(|&f| mapped(t, f, Visibility::Shared)),
        "frame list: not shared",
    );
    check(
        e.convert_frames(&list, Visibility::Private).is_ok(),
        "frame list: back failed",
    );
}

/// Scenario 4: everything back to private; the direct map has its huge
/// pages again. `expected` is the layout with only the platform's
/// permanently shared pages (the GHCB) split.
pub fn collapse<P: Platform>(e: &GuestEngine<P>, t: &Tables, expected: [u64; 3]) {
    let before = e.counters();
    check(
        e.convert(
            Target::Physical {
                pa: 256 * MIB,
                len: 64 * MIB,
            },
            Visibility::Private,
        )
        .is_ok(),
        "collapse: swiotlb back failed",
    );
    check(
        e.convert(
            Target::Physical {
                pa: 700 * MIB + 3 * 4096,
                len: 4096,
            },
            Visibility::Private,
        )
        .is_ok(),
        "collapse: scenario 1's page back failed",
    );
    e.release_deferred_tables();
    let layout = direct_map_layout(t);
    check(
        layout == expected,
        "collapse: the direct map did not regain its huge pages",
    );
    show(
        "4 collapse",
        &e.counters().since(&before),
        format_args!("direct map 1G/2M/4K leaves: {}/{}/{}", layout[0], layout[1], layout[2]),
    );
}

/// Scenario 5: the host lies mid-conversion; the frames end poisoned and
/// not present, a load running into them is zero-padded by the fault
/// handler on a real #PF, and the guest goes on.
pub fn failure<P: Platform>(e: &GuestEngine<P>, t: &Tables, lie: &dyn Fn(bool)) {
    let before = e.counters();
    let (pa, len) = ((1 << 30) + 600 * MIB + 4 * 4096, 8 * 4096);
    lie(true);
    let r = e.convert(Target::Physical { pa, len }, Visibility::Shared);
    lie(false);
    check(
        matches!(r, Err(ConvertError::Platform { .. })),
        "failure: no typed error",
    );
    check(
        (pa..pa + len)
            .step_by(4096)
            .all(|f| e.state(f) == Some(PageState::Poisoned)),
        "failure: frames not poisoned",
    );
    check(
        e.translate(direct_map() + pa).is_none(),
        "failure: poisoned frame still mapped",
    );
    check(mapped(t, pa - 4096, Visibility::Private), "failure: neighbour changed");
    // A load_unaligned_zeropad from the page before runs into the poisoned
    // page: a real #PF, fixed up with zero padding.
    let p = (direct_map() + pa - 3) as *mut u8;
    // SAFETY: the three bytes before the poisoned page are ours.
    unsafe { p.cast::<[u8; 3]>().write_volatile([0xA1, 0xB2, 0xC3]) };
    let fixups = crate::ZEROPAD_FIXUPS.load(Ordering::Relaxed);
    // SAFETY: the first byte is readable; the fault handler is wired.
    let v = unsafe { coco_convert::zeropad::load_unaligned_zeropad(p) };
    check(v == 0xC3B2A1, "failure: zeropad load gave the wrong value");
    check(
        crate::ZEROPAD_FIXUPS.load(Ordering::Relaxed) == fixups + 1,
        "failure: no #PF was fixed up",
    );
    check(
        e.convert(
            Target::Physical {
                pa: pa + 64 * 4096,
                len: 4096,
            },
            Visibility::Shared,
        )
        .is_ok(),
        "failure: the guest cannot go on",
    );
    show(
        "5 failure",
        &e.counters().since(&before),
        format_args!(
            "{:?}; {} frames poisoned, not present; zeropad across: {v:#x}",
            short(&r),
            len / 4096
        ),
    );
}

fn short(r: &Result<coco_convert::Report, ConvertError>) -> &'static str {
    match r {
        Err(ConvertError::Platform {
            error: coco_convert::PlatformError::MapGpa(_),
            ..
        }) => "MapGPA refused",
        Err(ConvertError::Platform {
            error: coco_convert::PlatformError::Psc(_),
            ..
        }) => "PSC refused",
        Err(ConvertError::Platform { .. }) => "platform error",
        _ => "other",
    }
}

/// What differs between platforms in the scenario sequence.
pub struct Hooks<'a> {
    pub name: &'a str,
    /// Fails the run if the emulators saw a present alias; `None` where
    /// no model sees the hypercalls (a real host).
    pub clean: Option<&'a dyn Fn()>,
    /// Makes the host lie (or stop lying); `None` where the host cannot
    /// be told to (a real one), and the failure scenario is skipped.
    pub lie: Option<&'a dyn Fn(bool)>,
    /// The direct map's 1G/2M/4K leaves once everything is private again.
    pub expected_layout: [u64; 3],
    /// Runs after scenario 1 (SNP: the GHCB setup); returns the counters
    /// scenario 2 reports from.
    pub before_boot: &'a dyn Fn() -> CounterSnapshot,
}

/// Scenarios 1 to 6, in that order (the split without heap first, while
/// GiB 0 is still one 1 GiB leaf), with the emulators' verdict after each.
pub fn run_all<P: Platform>(e: &GuestEngine<P>, tables: &mut Tables, hooks: &Hooks<'_>) {
    let clean = || {
        if let Some(clean) = hooks.clean {
            clean();
        }
    };
    split_without_heap(e, tables);
    clean();
    let before = (hooks.before_boot)();
    clean();
    boot(e, tables, before);
    clean();
    vmalloc(e, tables);
    clean();
    collapse(e, tables, hooks.expected_layout);
    clean();
    match hooks.lie {
        Some(lie) => failure(e, tables, lie),
        None => println!("  5 failure: SKIPPED (a real host cannot be told to lie)"),
    }
    clean();
    if crate::smp::ap_is_online() {
        crate::race::run(e, 100);
    } else {
        println!("  6 race: SKIPPED (no second CPU: this build starts one by INIT-SIPI-SIPI only)");
    }
    clean();
    match hooks.clean {
        Some(_) => println!(
            "  {}: every scenario passed; hypercalls made while an alias was present: 0",
            hooks.name
        ),
        None => println!(
            "  {}: every scenario passed (no model watches the hypercalls for aliases here)",
            hooks.name
        ),
    }
}
