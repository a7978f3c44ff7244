//! Tests from a sixth hostile review (5-level paging, what a failed
//! acceptance leaves, SNP exactness, `adopt_unaccepted`, unknown state
//! bytes, the single-page PVALIDATE eviction, the pool after
//! `unshare_all`; commits f05130e..199c2fb). Each test fails against the
//! commit reviewed (199c2fb) and names the promise it breaks and where
//! that promise is written.

#![allow(clippy::too_many_lines)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use coco_convert::platform::tdx::Tdx;
use coco_convert::pool::{Convert, PoolError, SharedPool};
use coco_convert::{
    AcceptMemoryError, Config, ConvertError, Engine, FrameSource, PageState, Paging, Report, StateTable, Target,
    UnacceptedBitmap, Visibility,
};
use hvmock::TdxConfig;
use integration::sim::{chunk_slots, ChunkStack, Layout};
use integration::world::{Machine, Shape, TdxWorld, TABLES};
use integration::MIB;

const PAGE: u64 = 4096;
const UNIT: u64 = 2 * MIB;

// ---------------------------------------------------------------------
// Finding 1: a failed acceptance calls the frame source (and shoots
// down) while it still holds the lock of the next unit it claimed.
//
// Promises broken:
// - `FrameSource` (convert/src/reserve.rs, trait doc): "The engine calls
//   these methods with none of its locks held."
// - `Engine::accept` module doc (convert/src/engine/accept.rs) and
//   docs/lifecycle.md, "Each unit once, no lock across a hypercall":
//   "The first frame is the unit's lock ... since no CPU waits while
//   holding a claim, two CPUs never wait for each other"; and
//   `Engine::accept`: "Call it from the page allocator before handing
//   out memory".
//
// Why it fails: in `accept` (and `accept_all`) a unit is claimed
// (Unaccepted -> Accepting: the unit's lock) *before* `extend_run`
// flushes the previous run. When that flush fails, `flush_run` calls
// `failed()` -> `unmap_poisoned()` -> `reserve_splits()`, which calls
// `FrameSource::allocate_frame` (and then the TLB shootdown) with the
// freshly claimed unit still locked. A frame source that is the OS's
// page allocator accepts memory before handing it out, exactly as
// `accept`'s doc asks; accepting the last page of an accepted unit also
// takes the guard unit after it, which is the one this CPU has locked:
// it spins on `Unit::Busy` forever. (On several CPUs the same window
// makes another CPU, spinning on that unit with interrupts off, miss the
// shootdown IPI the holder waits for.)
//
// Setup (TDX, 1 GiB direct-map leaf so the quarantine needs a table
// page): units U0..U3; U1 accepted; U0 accepted behind the guest's back
// (its ACCEPT fails). `accept(U0, 3 units)` claims U0, skips U1, claims
// U2, flushes {U0} -> fails -> frame source -> the allocator accepts the
// last page of U1 -> guard unit U2 is Busy (ours) -> deadlock. The test
// detects the hang after 10 s, then unblocks it by writing U2's lock
// byte (so the process does not spin forever) and fails.
//
// Fix: never hold a claim across the failure path. E.g. in `extend_run`
// flush the old run before claiming `u` (claim after the flush), or let
// `flush_run` only settle and return the poisoned ranges, and run
// `unmap_poisoned` at the end of `accept` / `accept_all` once every claim
// is released.
// ---------------------------------------------------------------------

/// A page allocator as the OS's frame source: it hands out frames from
/// `[floor, top)` top down and, as `Engine::accept`'s doc asks of a page
/// allocator, accepts each frame before handing it out.
/// The OS's acceptance, as the allocator calls it.
type AcceptHook = Box<dyn Fn(u64) -> Result<(), AcceptMemoryError> + Send + Sync>;

struct AcceptingAllocator {
    next: Mutex<u64>,
    floor: u64,
    accept: OnceLock<AcceptHook>,
    zero: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

impl FrameSource for AcceptingAllocator {
    fn allocate_frame(&self) -> Option<u64> {
        let pa = {
            let mut next = self.next.lock().unwrap();
            if *next <= self.floor {
                return None;
            }
            *next -= PAGE;
            *next
        };
        if let Some(accept) = self.accept.get() {
            accept(pa).ok()?;
        }
        if let Some(zero) = self.zero.get() {
            zero(pa);
        }
        Some(pa)
    }

    fn free_frame(&self, _pa: u64) {}
}

#[test]
fn a_failed_acceptance_never_calls_the_frame_source_holding_a_unit_lock() {
    let w: &'static TdxWorld = Box::leak(Box::new(TdxWorld::new(TdxConfig::default(), Shape::Mixed)));
    let base = 256 * MIB;
    w.hand_over_unaccepted(base, 4 * UNIT, 0);
    let storage: &'static [AtomicU64] = Box::leak(integration::bitmap_storage().into_boxed_slice());
    // The allocator serves from U1 (accepted below before it is used).
    let alloc: &'static AcceptingAllocator = Box::leak(Box::new(AcceptingAllocator {
        next: Mutex::new(base + 2 * UNIT),
        floor: base + UNIT,
        accept: OnceLock::new(),
        zero: OnceLock::new(),
    }));
    let mem = w.m.mem.clone();
    let _ = alloc.zero.set(Box::new(move |pa| mem.fill(pa, PAGE, 0)));
    let mut e =
        w.m.engine_with_frames(alloc, Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap());
    e.adopt_unaccepted(UnacceptedBitmap::new(0, UNIT, storage).unwrap())
        .unwrap();
    e.record_unaccepted(base, 4 * UNIT).unwrap();
    // U1 accepted now (the range ends inside it: no guard unit).
    e.accept(base + UNIT, PAGE).unwrap();
    assert!(!e.unaccepted().unwrap().is_unaccepted((base + UNIT) / UNIT));
    // U0's ACCEPT will fail.
    w.accepted_behind_the_guests_back(base, UNIT, 0);
    let e: &'static _ = Box::leak(Box::new(e));
    let _ = alloc.accept.set(Box::new(move |pa| e.accept(pa, PAGE).map(|_| ())));

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(e.accept(base, 3 * UNIT));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(result) => {
            assert!(
                matches!(result, Err(AcceptMemoryError::Platform { pa, left_mapped: false, .. }) if pa == base),
                "{result:?}"
            );
        }
        Err(_) => {
            // Unblock the spinning thread: U2's lock byte made "poisoned"
            // (code 3), so the nested accept returns.
            let u2 = ((base + 2 * UNIT) / PAGE) as usize;
            let held = w.m.states[u2].load(Ordering::SeqCst);
            w.m.states[u2].store(3, Ordering::SeqCst);
            let unwound = rx.recv_timeout(Duration::from_secs(10));
            panic!(
                "deadlock: the failed acceptance called the frame source while holding the lock of the \
                 unit after it (state byte {held}, 10 = Accepting); the allocator's own accept of the \
                 guard unit spun on it for 10 s (after unblocking: {unwound:?})"
            );
        }
    }
}

// ---------------------------------------------------------------------
// Finding 2: the direct map of `Config` is never checked against
// `Config::paging`; a physical conversion goes through a direct map that
// is not canonical at that depth, walking entries that translate
// something else.
//
// Promises broken:
// - docs/contract.md, "Addresses": "a virtual range must be canonical
//   from its first byte to its last (for the depth `Config::paging`
//   names ...) ...; so must a registered alias". The direct map is the
//   first linear alias; `register_alias` refuses the 5-level direct-map
//   address under four levels (la57.rs,
//   `the_canonical_hole_follows_the_paging_depth`), and so does
//   `Target::Virtual`, but the same addresses reached through
//   `Config::direct_map` are taken.
// - `Config::paging` rustdoc (convert/src/engine/mod.rs): "It decides
//   ... which virtual addresses are canonical (48 or 57 bits)";
//   `ConvertError::InvalidRange`: "a virtual range that is not canonical";
//   "Every error but `Platform` means nothing changed".
//
// Why it fails: `canonical_range` is applied to `Target::Virtual` ranges
// and to `register_alias`, never to `Config::direct_map` (neither in
// `Engine::new` nor for `Target::Physical`). An LA57 kernel whose Config
// says `Paging::Four` (the `Default`) has its 57-bit direct map
// (0xFF11_...) walked with 48-bit indices: PML4 index 0 of the PML5 root,
// which in this layout maps nothing. The engine records the "absent"
// direct-map entries as OS holes and asks the host to share the frame
// while the real direct-map leaf (PML5 slot 0x111) still maps it present
// and private: the conversion reports success and the frame is shared
// under a live private mapping.
//
// Fix: refuse a direct map (and, for physical targets, a derived range)
// that is not canonical for `config.paging`: `InvalidRange` (or a
// checked constructor), changing nothing.
// ---------------------------------------------------------------------
#[test]
fn a_direct_map_not_canonical_at_the_configured_depth_is_refused() {
    let config = TdxConfig {
        gpaw: 52,
        ..TdxConfig::default()
    };
    let w = TdxWorld::with_machine(config, |enc| Machine::new_in(Layout::FIVE, enc, Shape::Mixed, TABLES));
    let m = &w.m;
    // The OS forgot CR4.LA57: four levels, over tables rooted at a PML5.
    let config = Config {
        paging: Paging::Four,
        ..m.config()
    };
    assert_eq!(config.direct_map.va, Layout::FIVE.direct_map);
    assert!(!Paging::Four.is_canonical(config.direct_map.va));
    let e = Engine::new(
        config,
        &m.phys,
        &m.frames,
        &m.tlb,
        Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap(),
        StateTable::new(0, &m.states),
    );
    // The same range, named by its (non-canonical at 4 levels) address:
    // refused.
    let pa = 300 * MIB;
    assert!(matches!(
        e.convert(
            Target::Virtual {
                va: config.direct_map.va + pa,
                len: PAGE
            },
            Visibility::Shared
        ),
        Err(ConvertError::InvalidRange { .. })
    ));
    // By physical address it goes through the same direct map.
    let before = m.snapshot();
    let result = e.convert(Target::Physical { pa, len: PAGE }, Visibility::Shared);
    let host = w.host_side(pa);
    let still_private = m.page_tables().translate(&m.mem, m.direct_va(pa)).map(|t| t.enc_set);
    assert!(
        matches!(result, Err(ConvertError::InvalidRange { .. })) && m.snapshot() == before,
        "a physical conversion through a direct map not canonical at the configured depth was taken: \
         {result:?}; the host now holds the frame {host:?}; the real direct-map leaf still maps it \
         present (shared bit set: {still_private:?}); TDX model violations: {:?}",
        w.tdx.violations()
    );
}

// ---------------------------------------------------------------------
// Finding 3: a pool over any converter but the engine itself (or a
// reference to it) keeps handing out buffers after `unshare_all`, from
// chunks that are private again.
//
// Promise broken: `SharedPool::alloc` rustdoc (convert/src/pool/mod.rs):
// "Once the engine has stopped conversions ([`Engine::unshare_all`]),
// refused with `PoolError::Convert(ConvertError::Stopped)`"; docs/
// lifecycle.md step 3 ("pool chunks included") and the commit's own
// claim "After unshare_all the shared pool refuses allocations (its
// chunks are private again)".
//
// Why it fails: the pool learns of the stop only through
// `Convert::stopped`, a provided method whose default is `false`. Only
// `Engine` and `&C` override it. Any wrapper an OS puts between the pool
// and the engine (logging, accounting, fault injection: this repository's
// own `Flaky` in pool.rs and `RefusesPrivate` in owned.rs are such
// wrappers) forwards `convert` and silently inherits "never stopped". The
// chunk kept by hysteresis went private in `unshare_all`, and the pool
// hands a buffer of it out as shared: a driver gives its device address
// to the host, which no longer reaches it; on TDX the device address
// carries the shared bit for a page that is private.
//
// Fix: make `Convert::stopped` a required method (as review 5 made
// `GhcbProvider::slots` required for the same reason), or have the pool
// treat a chunk whose frames are no longer shared as unusable (e.g. the
// engine's `Stopped` reported by a gated no-op call).
//
// Fixed by making `stopped` required: the wrapper below no longer compiles
// without saying how it answers, and forwarding is the obvious answer.
// ---------------------------------------------------------------------
struct Logged<C>(C, AtomicU64);

impl<C: Convert> Convert for Logged<C> {
    fn convert(&self, target: Target, to: Visibility) -> Result<Report, ConvertError> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.convert(target, to)
    }

    fn stopped(&self) -> bool {
        self.0.stopped()
    }
}

#[test]
fn a_pool_over_a_forwarding_converter_serves_nothing_after_unshare_all() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let logged = Logged(&e, AtomicU64::new(0));
    let chunks = ChunkStack::new(vec![1000 * MIB]);
    let pool = SharedPool::new(&logged, &chunks, chunk_slots(4), 1);
    let a = pool.alloc(PAGE).unwrap();
    pool.free(a).unwrap();
    assert_eq!(pool.stats().chunks_held, 1, "the empty chunk is kept shared");
    let report = e.unshare_all(&[]);
    assert!(report.complete(), "{report:?}");
    assert!(e.stopped());
    assert_eq!(
        e.state(1000 * MIB),
        Some(PageState::Private),
        "the chunk is private again"
    );
    let served = pool.alloc(PAGE);
    let state = served.as_ref().ok().map(|b| (e.state(b.pa), w.host_side(b.pa)));
    assert_eq!(
        served,
        Err(PoolError::Convert(ConvertError::Stopped)),
        "after unshare_all the pool handed out a buffer; its frame is (engine, host) {state:?}"
    );
}
