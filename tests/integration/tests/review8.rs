//! Tests from an eighth hostile review (the caller-memory check
//! `ConvertError::CallerMemoryNotPrivate`, `PhysMem::phys_of`, the
//! `lock-stats` runtime switch, `concurrent.rs` and the W7 benchmark;
//! commits 807829a..53e9bcc). Each test fails against the commit reviewed
//! (53e9bcc) and names the promise it breaks and where that promise is
//! written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use coco_convert::platform::tdx::Tdx;
use coco_convert::{Alias, ConvertError, Engine, Level, PageState, PhysMem, Target, Visibility};
use hvmock::TdxConfig;
use integration::lent::{spaced, store_list, PausingTdx, WalkedPhys};
use integration::sim::SimPhys;
use integration::world::{Machine, Shape, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

// ---------------------------------------------------------------------
// Finding 1: a frame list in memory shared with the host is "refused,
// nothing changed", but the refusal reads the list again from the shared
// page: a host that rewrites it in the meantime chooses which frames'
// state bytes the engine overwrites.
//
// Promise broken: docs/contract.md ("A frame list ... a list ... in
// memory shared with the host (which could rewrite it between passes) ...
// is refused with `CallerMemoryNotPrivate`, nothing changed"), the
// `CallerMemoryNotPrivate` row of its error table, "Every error but
// `Platform` means nothing changed", and the rustdoc of
// `Engine::convert_frames` (convert/src/engine/mod.rs: "Nothing changed
// ... with: ... CallerMemoryNotPrivate: the list lies ... in shared
// memory").
//
// Cause: the engine reads the list before it knows where it lies, and
// again after: convert/src/engine/transaction.rs:75 claims the frames the
// list names (read from the shared page), :76 finds the list shared, and
// :77 `release_claims` reads the list a second time (transaction.rs:290-293,
// `Frames::List`) and `settle`s every frame it now names to the old state
// with an unconditional store (state.rs:287-290). The host's frames are
// not the ones claimed: the listed frames stay `Converting` for ever, and
// whatever frames the host wrote in (a page it shares, one of the engine's
// page tables) read as private. (The same re-read is in `claim`'s own
// roll-back, transaction.rs:222-226.) Observed: the listed frames stay
// `Converting`, the host's shared frame reads `Private` (the host still
// has it shared), and the engine's live page table reads `Private`; a
// following `convert(Physical { pa: table }, Shared)` then succeeds,
// handing the host one of the engine's live page tables.
//
// Fix: decide where the list lies before reading it at all: under the
// table lock, find the list's frames (phys_of / walk) and refuse a page
// that is not private (shared, another conversion's, a table) before the
// validation loop and the claim; after the claim only the own-frames case
// remains (its frames are private, so the host cannot rewrite them), or
// test it before the claim by a binary search of the (sorted) list for
// each of the list's own frames.
// ---------------------------------------------------------------------

/// The guest's `PhysMem`, whose `phys_of` the engine calls between the
/// claim and the refusal: the hook stands for the instant at which the
/// host, running on another CPU, writes the shared page the list lies in
/// (it may write it at any time; this picks the worst one).
struct HostWritesDuringCheck<'a> {
    phys: &'a SimPhys,
    armed: AtomicBool,
    at: u64,
    forged: Vec<u64>,
}

// SAFETY: forwards `page_ptr` and `phys_of`, whose guarantees `SimPhys`
// keeps; the hook writes only the shared page holding the list.
unsafe impl PhysMem for HostWritesDuringCheck<'_> {
    fn page_ptr(&self, pa: u64) -> *mut u64 {
        self.phys.page_ptr(pa)
    }

    fn phys_of(&self, ptr: *const u8) -> Option<u64> {
        if self.armed.swap(false, Ordering::AcqRel) {
            for (i, &frame) in self.forged.iter().enumerate() {
                self.phys.0.write_u64(self.at + 8 * i as u64, frame);
            }
        }
        self.phys.phys_of(ptr)
    }
}

#[test]
fn a_refused_list_in_shared_memory_changes_no_state_whatever_the_host_writes() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let store = GIB + 40 * MIB;
    let shared_by_driver = GIB + 50 * MIB;
    let listed = spaced(GIB + 60 * MIB, 2);
    let e_setup = w.engine();
    e_setup
        .convert(Target::Physical { pa: store, len: PAGE }, Visibility::Shared)
        .expect("the page the list will be in, shared (a buggy or hostile driver's list)");
    e_setup
        .convert(
            Target::Physical {
                pa: shared_by_driver,
                len: PAGE,
            },
            Visibility::Shared,
        )
        .expect("a page a driver shares with the host");
    let table =
        *w.m.frames
            .in_use_set()
            .iter()
            .find(|&&t| w.m.state_table().get(t) == Some(PageState::PageTable))
            .expect("a split left one of the engine's tables");
    // What the host writes into the list while the engine checks it: a
    // page it shares, and one of the engine's live page tables (a split
    // above left it).
    let phys = HostWritesDuringCheck {
        phys: &w.m.phys,
        armed: AtomicBool::new(true),
        at: store,
        forged: vec![shared_by_driver, table],
    };
    let e = Engine::new(
        w.m.config(),
        &phys,
        &w.m.frames,
        &w.m.tlb,
        Tdx::new(&w.tdx, 1 << 47).unwrap(),
        w.m.state_table(),
    );
    let in_place = store_list(&w.m.mem, store, &listed);
    let watched = [listed[0], listed[1], shared_by_driver, table];
    let before: Vec<_> = watched.iter().map(|&pa| e.state(pa)).collect();
    let result = e.convert_frames(in_place, Visibility::Shared);
    assert_eq!(
        result,
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store,
            state: PageState::Shared
        }),
        "the list lies in shared memory"
    );
    let after: Vec<_> = watched.iter().map(|&pa| e.state(pa)).collect();
    assert_eq!(
        after,
        before,
        "states of [listed, listed, a frame the host shares (host's view now {:?}), an engine page table] \
         after a refusal that promised nothing changed",
        w.host_side(shared_by_driver)
    );
}

// ---------------------------------------------------------------------
// Finding 2: "a list in a frame another conversion has in flight is
// refused" holds only in the simulation. On real page tables the other
// CPU has made that frame not present in every linear alias (and shot it
// down), and the engine reads the list before it checks where it lies:
// the guest takes a #PF in the engine instead of a refusal.
//
// Promise broken: rustdoc of `Engine::convert_frames`
// (convert/src/engine/mod.rs: "CallerMemoryNotPrivate: the list lies ...
// in a frame another conversion has in flight"), docs/contract.md ("a
// list ... in a frame another conversion has in flight is refused with
// `CallerMemoryNotPrivate`, nothing changed"; error table), and
// convert/src/engine/caller_memory.rs:1-5 (the list must lie "in a frame
// that stays private and mapped").
//
// Cause: convert/src/engine/mod.rs:420-423 (`convert_list`'s validation
// loop) and transaction.rs:219-226 (`claim`) read every word of the list
// before transaction.rs:76 `check_caller_memory` looks at where it lies;
// the test `a_list_in_a_frame_another_cpu_is_converting_is_refused`
// (caller_memory.rs) passes only because simulated memory never faults.
// Here the list's page is made inaccessible (PROT_NONE) exactly while the
// guest's tables have it not present, as the MMU would, and every access
// the engine makes to it is counted (then allowed, so the test goes on).
//
// Fix: check where the list lies before the first read of it (see
// finding 1), and with the default walk treat a not-present page of the
// list as refused (finding 3).
// ---------------------------------------------------------------------

static NOT_PRESENT_PAGE: AtomicU64 = AtomicU64::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let fault = unsafe { (*info).si_addr() } as u64;
    let page = NOT_PRESENT_PAGE.load(Ordering::Acquire);
    if page != 0 && (page..page + PAGE).contains(&fault) {
        FAULTS.fetch_add(1, Ordering::AcqRel);
        // The #PF recorded; let the access through so the test can go on.
        // SAFETY: the page is the test's own simulated guest memory.
        unsafe {
            libc::mprotect(
                page as *mut libc::c_void,
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        return;
    }
    // Not ours: die of it, as without a handler.
    // SAFETY: restoring the default action; the access faults again.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
}

/// Makes `page` (host address of a simulated frame) fault on every access,
/// as a not-present page does, counting the accesses.
fn make_not_present(page: u64) {
    // SAFETY: a plain sigaction installation; the page is the test's own.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_segv as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut()), 0);
        NOT_PRESENT_PAGE.store(page, Ordering::Release);
        assert_eq!(
            libc::mprotect(page as *mut libc::c_void, PAGE as usize, libc::PROT_NONE),
            0
        );
    }
}

fn present_again(page: u64) {
    NOT_PRESENT_PAGE.store(0, Ordering::Release);
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: the test's own simulated guest memory.
    let done = unsafe { libc::mprotect(page as *mut libc::c_void, PAGE as usize, prot) };
    assert_eq!(done, 0);
}

#[test]
fn a_list_in_a_frame_another_cpu_has_unmapped_is_refused_without_being_read() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let tdx = PausingTdx::new();
    let e = m.engine(Tdx::new(&tdx, 1 << 47).unwrap());
    let store = GIB + 40 * MIB;
    let list = spaced(store + PAGE, 8);
    let in_place = store_list(&m.mem, store, &list);
    let host_page = m.mem.ptr(store) as u64;
    let (refused, was_present) = std::thread::scope(|s| {
        let other = s.spawn(|| e.convert(Target::Physical { pa: store, len: PAGE }, Visibility::Shared));
        tdx.in_call.wait();
        // The other CPU's MapGPA is in flight: the list's frame is not
        // present in the direct map, and shot down.
        let was_present = e.translate(Machine::direct(store)).is_some();
        make_not_present(host_page);
        let refused = e.convert_frames(in_place, Visibility::Shared);
        present_again(host_page);
        tdx.resume.wait();
        other.join().unwrap().expect("the other CPU's conversion");
        (refused, was_present)
    });
    assert!(!was_present, "precondition: the other CPU had the list's page unmapped");
    assert_eq!(
        refused,
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store,
            state: PageState::Converting
        })
    );
    assert_eq!(
        FAULTS.load(Ordering::Acquire),
        0,
        "the engine read the list while its page was not present: a #PF in the engine on a real guest, \
         not the promised refusal"
    );
}

// ---------------------------------------------------------------------
// Finding 3: with the default `PhysMem::phys_of` (the engine walks its
// own tables, what a kernel gets unless it overrides it), a list whose
// page another conversion has made not present is taken for memory "the
// OS cannot place" and accepted.
//
// Promise broken: rustdoc of `Engine::convert_frames` and
// `PhysMem::phys_of` (convert/src/tables.rs: "The default, None, has the
// engine walk its own page tables for ptr ... which is right whenever the
// engine was given the tables the caller runs on"), docs/contract.md ("a
// list ... in a frame another conversion has in flight is refused ...
// The engine finds the list's frames with PhysMem::phys_of, or by walking
// its own tables").
//
// Cause: convert/src/engine/caller_memory.rs:42 — `Tables::translate`
// returns `None` for a not-present entry and `filter_map` drops the page,
// as if it lay outside RAM. The entry another conversion made not present
// keeps its frame (tables.rs: `Walk::Absent` "may be a leaf the engine
// made not-present (the rest of the entry is kept)"), so the engine could
// read the frame from it and find it `Converting`.
//
// Fix: on `Walk::Absent` with a non-zero entry, take the frame from the
// kept address and check its state; a page of the list with no entry at
// all is not readable either and should be refused, not skipped.
// ---------------------------------------------------------------------

#[test]
fn without_the_oss_translation_a_list_in_another_cpus_frame_is_refused() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let tdx = PausingTdx::new();
    let phys = WalkedPhys(&m.phys);
    let e = Engine::new(
        m.config(),
        &phys,
        &m.frames,
        &m.tlb,
        Tdx::new(&tdx, 1 << 47).unwrap(),
        m.state_table(),
    );
    let store = GIB + 40 * MIB;
    let list = spaced(store + PAGE, 8);
    let in_place = store_list(&m.mem, store, &list);
    // The address the list is reached at (this process's, standing in for
    // a kernel virtual address) is a registered linear alias of its frame,
    // so a conversion of that frame unmaps it there too, as it does in the
    // direct map.
    let va = in_place.as_ptr() as u64;
    assert_eq!(va % PAGE, 0);
    m.map_pieces(va, &[(store, Level::Pt)]);
    e.register_alias(Alias {
        va,
        pa: store,
        len: PAGE,
    })
    .expect("alias");
    let (result, was_present) = std::thread::scope(|s| {
        let other = s.spawn(|| e.convert(Target::Physical { pa: store, len: PAGE }, Visibility::Shared));
        tdx.in_call.wait();
        let was_present = e.translate(va).is_some();
        let result = e.convert_frames(in_place, Visibility::Shared);
        tdx.resume.wait();
        other.join().unwrap().expect("the other CPU's conversion");
        (result, was_present)
    });
    assert!(!was_present, "precondition: the other CPU had the list's page unmapped");
    assert_eq!(
        result,
        Err(ConvertError::CallerMemoryNotPrivate {
            pa: store,
            state: PageState::Converting
        }),
        "the list lay in a frame another CPU had in flight"
    );
}
