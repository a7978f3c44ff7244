//! The zeropad fix-up on real CPU faults: loads that run into a PROT_NONE
//! page take a real SIGSEGV, whose handler maps the signal frame's
//! registers onto the fix-up and resumes.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use coco_convert::zeropad;
use integration::signals::{setup, Pages, FIXUPS};

// ---- the harness ---------------------------------------------------------

/// Counts heap allocations made by the current thread, to show the fault
/// path never allocates.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

// ---- the loads -------------------------------------------------------------

/// `mov <dest>, [p]`, dest named explicitly.
macro_rules! load_into {
    ($name:ident, $reg:tt) => {
        fn $name(p: *const u8) -> u64 {
            let v: u64;
            // SAFETY: the first byte is readable; the handler is installed.
            unsafe { coco_convert::zeropad_asm!(; concat!("mov ", $reg, ", qword ptr [{p}]") ; ; p = in(reg) p, lateout($reg) v, options(nostack)) };
            v
        }
    };
}

/// `mov <dest>, [p]` into a register LLVM will not hand out (rbx, rbp,
/// rsp): swapped out around the load.
macro_rules! load_into_reserved {
    ($name:ident, $reg:tt) => {
        fn $name(p: *const u8) -> u64 {
            let v: u64;
            // SAFETY: as above; the register is restored before the asm
            // ends, and the signal runs on the alternate stack.
            unsafe {
                coco_convert::zeropad_asm!(concat!("xchg {t}, ", $reg) ; concat!("mov ", $reg, ", qword ptr [{p}]") ; concat!("xchg {t}, ", $reg) ; t = inout(reg) 0u64 => v, p = in(reg) p, options(nostack))
            };
            v
        }
    };
}

load_into!(into_rax, "rax");
load_into!(into_rcx, "rcx");
load_into!(into_rdx, "rdx");
load_into!(into_rsi, "rsi");
load_into!(into_rdi, "rdi");
load_into!(into_r8, "r8");
load_into!(into_r9, "r9");
load_into!(into_r10, "r10");
load_into!(into_r11, "r11");
load_into!(into_r12, "r12");
load_into!(into_r13, "r13");
load_into!(into_r14, "r14");
load_into!(into_r15, "r15");
load_into_reserved!(into_rbx, "rbx");
load_into_reserved!(into_rbp, "rbp");
load_into_reserved!(into_rsp, "rsp");

/// Addressing forms, each loading `p` into rax.
fn form_base_disp8(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above.
    unsafe {
        coco_convert::zeropad_asm!(; "mov rax, qword ptr [{b} + 16]" ; ; b = in(reg) p.wrapping_sub(16), out("rax") v, options(nostack))
    };
    v
}

fn form_base_disp32(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above.
    unsafe {
        coco_convert::zeropad_asm!(; "mov rax, qword ptr [{b} + 0x12345]" ; ; b = in(reg) p.wrapping_sub(0x12345), out("rax") v, options(nostack))
    };
    v
}

fn form_base_index_scale(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above.
    unsafe {
        coco_convert::zeropad_asm!(; "mov rax, qword ptr [{b} + {i} * 8 - 8]" ; ; b = in(reg) p.wrapping_sub(3 * 8 - 8), i = in(reg) 3u64, out("rax") v, options(nostack))
    };
    v
}

/// `[index*2 + disp32]`, no base: an odd address needs an odd
/// displacement.
fn form_index_only(p: *const u8) -> u64 {
    let v: u64;
    if p as u64 % 2 == 0 {
        // SAFETY: as above.
        unsafe {
            coco_convert::zeropad_asm!(; "mov rax, qword ptr [{i} * 2 + 0x100]" ; ; i = in(reg) (p as u64 - 0x100) / 2, out("rax") v, options(nostack))
        };
    } else {
        // SAFETY: as above.
        unsafe {
            coco_convert::zeropad_asm!(; "mov rax, qword ptr [{i} * 2 + 0x101]" ; ; i = in(reg) (p as u64 - 0x101) / 2, out("rax") v, options(nostack))
        };
    }
    v
}

fn form_r12(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above.
    unsafe { coco_convert::zeropad_asm!(; "mov rax, qword ptr [r12]" ; ; in("r12") p, out("rax") v, options(nostack)) };
    v
}

fn form_r13(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above.
    unsafe { coco_convert::zeropad_asm!(; "mov rax, qword ptr [r13]" ; ; in("r13") p, out("rax") v, options(nostack)) };
    v
}

fn form_rsp(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above; RSP is swapped out and back around the load.
    unsafe {
        coco_convert::zeropad_asm!("xchg {t}, rsp" ; "mov rax, qword ptr [rsp + 8]" ; "xchg {t}, rsp" ; t = inout(reg) p.wrapping_sub(8) => _, out("rax") v, options(nostack))
    };
    v
}

fn form_rbp(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as above; RBP is swapped out and back around the load.
    unsafe {
        coco_convert::zeropad_asm!("xchg {t}, rbp" ; "mov rax, qword ptr [rbp]" ; "xchg {t}, rbp" ; t = inout(reg) p => _, out("rax") v, options(nostack))
    };
    v
}

/// A load through one encoding.
type Load = fn(*const u8) -> u64;

/// Each load, at every offset 1..7 before the boundary: zero-padded.
fn every_offset(pages: &Pages, loads: &[(&str, Load)]) {
    for &(name, load) in loads {
        for k in 1..=7u64 {
            assert_eq!(
                load((pages.boundary() - k) as *const u8),
                pages.padded(k),
                "{name}, offset {k}"
            );
        }
    }
}

// ---- the tests ---------------------------------------------------------------

#[test]
fn compiler_load_at_every_offset() {
    setup();
    let pages = Pages::new();
    let before = FIXUPS.load(Ordering::Relaxed);
    for k in 1..=7u64 {
        let p = (pages.boundary() - k) as *const u8;
        // SAFETY: the first byte is readable; the handler is installed.
        let v = unsafe { zeropad::load_unaligned_zeropad(p) };
        assert_eq!(v, pages.padded(k), "offset {k}");
    }
    assert!(FIXUPS.load(Ordering::Relaxed) - before >= 7);
    pages.protect_second(libc::PROT_READ);
    for k in 1..=7u64 {
        let p = (pages.boundary() - k) as *const u8;
        // SAFETY: both pages are readable now.
        let v = unsafe { zeropad::load_unaligned_zeropad(p) };
        assert_eq!(v, pages.full(k), "offset {k}, readable");
    }
}

#[test]
fn every_destination_register() {
    setup();
    let pages = Pages::new();
    let loads: [(&str, Load); 16] = [
        ("rax", into_rax),
        ("rcx", into_rcx),
        ("rdx", into_rdx),
        ("rbx", into_rbx),
        ("rsp", into_rsp),
        ("rbp", into_rbp),
        ("rsi", into_rsi),
        ("rdi", into_rdi),
        ("r8", into_r8),
        ("r9", into_r9),
        ("r10", into_r10),
        ("r11", into_r11),
        ("r12", into_r12),
        ("r13", into_r13),
        ("r14", into_r14),
        ("r15", into_r15),
    ];
    every_offset(&pages, &loads);
}

#[test]
fn every_addressing_form() {
    setup();
    let pages = Pages::new();
    let loads: [(&str, Load); 8] = [
        ("[base + disp8]", form_base_disp8),
        ("[base + disp32]", form_base_disp32),
        ("[base + index*8 + disp8]", form_base_index_scale),
        ("[index*2 + disp32]", form_index_only),
        ("[r12]", form_r12),
        ("[r13]", form_r13),
        ("[rsp + 8]", form_rsp),
        ("[rbp]", form_rbp),
    ];
    every_offset(&pages, &loads);
}

#[test]
fn the_fault_path_never_allocates() {
    setup();
    let pages = Pages::new();
    let p = (pages.boundary() - 5) as *const u8;
    let before = ALLOCATIONS.with(|c| c.get());
    let mut sum = 0u64;
    for _ in 0..1000 {
        // SAFETY: as above.
        sum = sum.wrapping_add(unsafe { zeropad::load_unaligned_zeropad(p) });
    }
    assert_eq!(ALLOCATIONS.with(|c| c.get()), before, "allocations on the fault path");
    assert_eq!(sum, pages.padded(5).wrapping_mul(1000));
}

/// Several threads load across the boundary while another flips the next
/// page between PROT_NONE and readable, as a conversion's not-present
/// window does: every result is the full word or the zero-padded one.
#[test]
fn race_with_the_next_page_coming_and_going() {
    setup();
    let pages = Pages::new();
    let stop = AtomicBool::new(false);
    let loads_per_thread = 700_000u64;
    let fixups_before = FIXUPS.load(Ordering::Relaxed);
    let (full, padded) = std::thread::scope(|s| {
        let flipper = s.spawn(|| {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pages.protect_second(if flips % 2 == 0 {
                    libc::PROT_READ
                } else {
                    libc::PROT_NONE
                });
                flips += 1;
            }
            pages.protect_second(libc::PROT_NONE);
            flips
        });
        let loaders: Vec<_> = (0..3u64)
            .map(|t| {
                let pages = &pages;
                s.spawn(move || {
                    setup();
                    let k = 1 + t * 3;
                    let p = (pages.boundary() - k) as *const u8;
                    let (mut full, mut padded) = (0u64, 0u64);
                    for _ in 0..loads_per_thread {
                        // SAFETY: as above.
                        let v = unsafe { zeropad::load_unaligned_zeropad(p) };
                        if v == pages.full(k) {
                            full += 1;
                        } else {
                            assert_eq!(v, pages.padded(k), "a torn or wrong value");
                            padded += 1;
                        }
                    }
                    (full, padded)
                })
            })
            .collect();
        let counts: Vec<(u64, u64)> = loaders.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.join().unwrap();
        assert!(flips > 10, "the page must actually have flipped ({flips})");
        counts.iter().fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1))
    });
    assert_eq!(full + padded, 3 * loads_per_thread);
    assert!(padded > 0, "some loads must have faulted");
    assert!(FIXUPS.load(Ordering::Relaxed) - fixups_before >= padded);
    println!(
        "race: {} loads, {full} full, {padded} zero-padded by the fix-up",
        full + padded
    );
}

/// A crossing load that is not a recorded site still faults fatally: the
/// handler declines it. Shown in a child process, which must die of
/// SIGSEGV.
#[test]
fn a_load_that_is_not_a_site_is_not_fixed() {
    setup();
    let pages = Pages::new();
    let p = (pages.boundary() - 3) as *const u64;
    // SAFETY: the child only loads and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: deliberately faulting read in the child.
        let v = unsafe { std::ptr::read_unaligned(std::hint::black_box(p)) };
        // SAFETY: plain exit.
        unsafe { libc::_exit((v & 0x7F) as i32 + 1) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
        "status {status:#x}"
    );
}

#[test]
fn sites_are_recorded_with_their_length() {
    let sites: Vec<_> = coco_convert::zeropad::site::sites()
        .iter()
        .filter(|s| !s.is_empty())
        .collect();
    assert!(sites.len() >= 25, "{} sites", sites.len());
    for s in &sites {
        assert!(zeropad::is_zeropad_site(s.address()));
        assert!((3..=8).contains(&s.len()), "length {}", s.len());
    }
    assert!(!zeropad::is_zeropad_site(sites[0].address() + 1));
}
