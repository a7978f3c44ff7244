//! Tests from a fifth hostile review (unaccepted memory, the SEV-SNP cache
//! eviction, `unshare_all`; commits 2654f1a..bf89bf8). Each one fails
//! against the commit reviewed (bf89bf8) and names the promise it breaks
//! and where that promise is written.

#![allow(clippy::too_many_lines)]

use coco_convert::platform::snp::{GhcbProvider, GhcbSlot, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::platform::{AcceptFailure, PrivateMap, Runs};
use coco_convert::{
    AcceptMemoryError, Counters, EncryptionBit, PageState, Platform, PlatformError, Target, UnacceptedBitmap,
    Visibility,
};
use hvmock::{MockTdx, SnpConfig, TdxConfig, TdxPageState};
use integration::sim::{current_cpu, set_cpu};
use integration::world::{Shape, SnpWorld, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;
const UNIT: u64 = 2 * MIB;

// ---------------------------------------------------------------------
// Promise: `Engine::accept_all` (convert/src/engine/accept.rs): "A failed
// unit does not stop the others: the first failure is returned at the
// end", and "Everything is accepted once every CPU has returned".
//
// Why it fails: a run is sent to the platform when the next claimed unit
// cannot join it (`extend_run`). If that send fails, `extend_run` gives
// the unit it had just claimed back (Accepting -> Unaccepted) and returns
// the error; `accept_all` records the error and moves on to the unit
// after it. The unit given back is never visited again: it is left
// unaccepted (bit set, frames `Unaccepted`) although nothing went wrong
// with it, and the only CPU that could have accepted it has returned.
//
// Setup (TDX, one CPU): four 2 MiB units around the 1 GiB boundary, the
// second of them already accepted behind the guest's back. The run
// [1G-4M, 1G) is sent when the unit at 1 GiB starts a new 1 GiB call, and
// fails on its second unit; the unit at 1 GiB is skipped for good.
// ---------------------------------------------------------------------
#[test]
fn accept_all_accepts_every_unit_but_the_failed_ones() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let start = GIB - 2 * UNIT;
    w.hand_over_unaccepted(start, 4 * UNIT, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(start, 4 * UNIT).unwrap();
    // The firmware's lie: the second unit is accepted already.
    w.accepted_behind_the_guests_back(start + UNIT, UNIT, 1);
    let err = e.accept_all(0, 1).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, .. } if pa == start + UNIT),
        "{err:?}"
    );
    let bitmap = e.unaccepted().unwrap();
    assert_eq!(e.state(start + UNIT), Some(PageState::Poisoned), "the failed unit");
    assert_eq!(e.state(start), Some(PageState::Private), "the unit before it");
    assert_eq!(e.state(GIB + UNIT), Some(PageState::Private), "the last unit");
    // The unit at 1 GiB had nothing to do with the failure.
    assert_eq!(
        (e.state(GIB), bitmap.is_unaccepted(GIB / UNIT)),
        (Some(PageState::Private), false),
        "accept_all returned with an innocent unit still unaccepted"
    );
}

/// TDX over the model, with `accept` answering as a platform may by its
/// contract: the whole range accepted, and a failure reported anyway with
/// `accepted_below` at the range's end ("every byte from the range's start
/// up to here is accepted").
struct AcceptedThenFailed<'a>(Tdx<&'a MockTdx>);

impl Platform for AcceptedThenFailed<'_> {
    fn encryption(&self) -> EncryptionBit {
        self.0.encryption()
    }

    unsafe fn convert(
        &self,
        runs: Runs<'_>,
        to: Visibility,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), PlatformError> {
        // SAFETY: forwarded from the engine.
        unsafe { self.0.convert(runs, to, window, counters) }
    }

    fn accept_call_bytes(&self) -> u64 {
        self.0.accept_call_bytes()
    }

    unsafe fn accept(
        &self,
        pa: u64,
        len: u64,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), AcceptFailure> {
        // SAFETY: forwarded from the engine.
        unsafe { self.0.accept(pa, len, window, counters) }?;
        Err(AcceptFailure {
            error: PlatformError::NoScratchWindow,
            accepted_below: pa + len,
        })
    }

    fn terminate(&self, reason: u8) {
        self.0.terminate(reason);
    }
}

// ---------------------------------------------------------------------
// Promise: `AcceptMemoryError::Platform` (convert/src/engine/accept.rs):
// "The units of the failed call from the unit at `pa` on are poisoned
// ... the units before it were accepted"; the module docs: each unit is
// claimed by one CPU, which alone settles it. `AcceptFailure::accepted_below`
// (platform/mod.rs): "Every byte from the range's start up to here is
// accepted" — the range's end is a value the contract allows (and the TDX
// backend itself clamps to it).
//
// Why it fails: `flush_run` rounds `accepted_below` to a unit and then
// poisons "from there on" with `self.states.settle(accepted_below,
// Code::Poisoned)` without checking that it is still inside the run. With
// `accepted_below == end` the run's units are all accepted, `poisoned: 0`
// is reported, and the first frame of the *next* unit, one the call never
// claimed, is overwritten with `Poisoned`. That unit is then refused for
// good (`Poisoned`), and had another CPU been accepting it (its lock is
// that very byte), its claim would have been stomped on.
// ---------------------------------------------------------------------
#[test]
fn a_failed_accept_changes_nothing_outside_its_own_run() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let base = GIB;
    w.hand_over_unaccepted(base, 4 * UNIT, 1);
    let storage = integration::bitmap_storage();
    let platform = AcceptedThenFailed(Tdx::new(&w.tdx, w.tdx.shared_mask()).unwrap());
    let mut e = w.m.engine(platform);
    e.adopt_unaccepted(UnacceptedBitmap::new(0, UNIT, &storage).unwrap())
        .unwrap();
    e.record_unaccepted(base, 4 * UNIT).unwrap();
    // One page inside the first unit: a run of that unit alone.
    let err = e.accept(base + PAGE, PAGE).unwrap_err();
    let AcceptMemoryError::Platform { poisoned, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(poisoned, 0, "the platform said everything was accepted");
    assert_eq!(
        e.state(base + UNIT),
        Some(PageState::Unaccepted),
        "the next unit, never claimed nor sent, was changed"
    );
    assert_eq!(e.census().poisoned, 0, "{:?}", e.census());
}

/// A GHCB provider of the OS's own. (Found by review: with `slots()` a
/// provided method that listed only the calling CPU's slot, a provider
/// implementing `slot()` alone compiled and kept the other CPUs' GHCBs in
/// service; now the calling CPU's slot is derived from `slots()`.)
struct OneMethodProvider(&'static [GhcbSlot]);

impl GhcbProvider for OneMethodProvider {
    fn slots(&self) -> &[GhcbSlot] {
        self.0
    }

    fn cpu(&self) -> usize {
        current_cpu()
    }
}

const GHCB_PA: u64 = 1536 * MIB;

// ---------------------------------------------------------------------
// Promise: `Engine::unshare_all` (engine/unshare.rs): "4. Last, the
// platform's own shared pages: on SEV-SNP every CPU's GHCB, after which
// page state changes use the MSR protocol"; the module docs: "last the
// platform's own shared pages (SEV-SNP's GHCBs, after which only the MSR
// protocol is left)". `GhcbProvider` (platform/snp.rs) has one required
// method, `slot()` (commit f05130e made it "one method").
//
// Why it fails: the backend learns of the GHCBs through
// `GhcbProvider::slots()`, a new *provided* method whose default returns
// the calling CPU's slot only. A provider that implements just `slot()`
// (every provider written against the previous release, and any written
// from the trait's required surface) compiles unchanged, and
// `unshare_all` then: does not hold back the other CPUs' GHCBs, so the
// physical-address scan converts them private in the middle, through the
// GHCB protocol, while they are still registered and installed; and
// leaves their slots filled, so those CPUs keep doing page state changes
// through a GHCB that is now a private page (acceptance "may go on").
// ---------------------------------------------------------------------
#[test]
fn snp_unshare_all_takes_every_cpus_ghcb_out_of_service_last() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let platform = Snp::new(&w.snp, &w.snp, OneMethodProvider(w.ghcbs), 51).unwrap();
    let e = w.m.engine(platform).with_window(&w.m.windows);
    // SAFETY: negotiation has no memory effect.
    unsafe { snp_ghcb::protocol::negotiate(&w.snp) }.unwrap();
    for (cpu, pa) in [(0, GHCB_PA), (1, GHCB_PA + 3 * PAGE)] {
        set_cpu(cpu);
        let ptr = std::ptr::NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
        // SAFETY: the page at `pa` of the simulated memory, used by nothing
        // else.
        unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.unwrap();
    }
    set_cpu(0);
    e.convert(
        Target::Physical {
            pa: 64 * MIB,
            len: PAGE,
        },
        Visibility::Shared,
    )
    .unwrap();
    let psc_msr = e.counters().psc_msr;
    let report = e.unshare_all(&[]);
    assert!(report.complete(), "{report:?}");
    let cpu1_ghcb = GHCB_PA + 3 * PAGE;
    assert_eq!(e.state(cpu1_ghcb), Some(PageState::Private));
    assert!(
        !w.ghcbs[1].is_filled(),
        "CPU 1's slot still holds its GHCB, which is a private page now (RMP assigned: {})",
        w.snp.rmp(cpu1_ghcb).assigned
    );
    assert_eq!(
        e.counters().psc_msr - psc_msr,
        2,
        "both GHCBs go last, through the MSR protocol"
    );
}

/// Every present mapping of `[va, va + len)` whose encryption bit says
/// shared (SNP: C-bit clear; TDX: shared bit set).
fn shared_mappings_in(w: &TdxWorld, va: u64, len: u64) -> Vec<hvmock::Mapping> {
    let mut found = Vec::new();
    w.m.page_tables().for_each_mapping(&w.m.mem, &mut |m| {
        if m.va < va + len && va < m.va + m.size && m.enc_set {
            found.push(m);
        }
    });
    found
}

// ---------------------------------------------------------------------
// Promise: `Engine::unshare_all` (engine/unshare.rs), step 2: "Converts
// each of `mapped`, the vmalloc-style buffers the OS mapped itself and
// still has shared, through its own mapping, so that mapping turns
// private too"; `UnshareReport::complete`: "Whether every shared frame is
// private now"; the contract's "bad input gets a typed error".
//
// Why it fails: `unshare` turns every error but `Platform` into a
// `log::warn!` and nothing else. A listed buffer the engine refuses
// (here: the driver had already given one of its pages back, through the
// buffer, as the contract allows) is silently skipped; step 3 then makes
// its still-shared frames private through the direct map only, and the
// buffer's own mapping keeps mapping them with the shared attribute. The
// report says `complete()` and `accounting_matches()`: the OS has no way
// to learn that a mapping it listed was left shared over private frames
// (on TDX a stray access through it is a shared-GPA access to a page the
// VMM no longer backs as shared).
// ---------------------------------------------------------------------
#[test]
fn unshare_all_reports_a_listed_buffer_it_could_not_convert() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let frames = [1100 * MIB, 1100 * MIB + 3 * PAGE, 700 * MIB, 1300 * MIB + 2 * PAGE];
    let va = w.m.vmalloc(&frames);
    let len = frames.len() as u64 * PAGE;
    let buffer = Target::Virtual { va, len };
    e.convert(buffer, Visibility::Shared).unwrap();
    // The driver gives the second page back through the buffer.
    e.convert(
        Target::Virtual {
            va: va + PAGE,
            len: PAGE,
        },
        Visibility::Private,
    )
    .unwrap();
    let report = e.unshare_all(&[buffer]);
    assert_eq!(e.census().shared, 0);
    let left = shared_mappings_in(&w, va, len);
    assert!(
        left.is_empty() || !report.complete(),
        "the listed buffer still maps {} frames shared, and the report says complete: {report:?}, {left:x?}",
        left.len()
    );
}

// ---------------------------------------------------------------------
// Promise: `PageState::Poisoned` (convert/src/state.rs): "the frame's
// state is unknown, its mappings stay not-present, and it is never used
// again"; `AcceptMemoryError::Platform`: the failed units "are poisoned
// (their frames are `PageState::Poisoned` ...)"; the contract as the
// change states it: a page whose conversion *or acceptance* failed is
// never handed back as usable, never present.
//
// Why it fails: unaccepted memory is mapped present in the direct map
// (as the OS maps all RAM, and as the tests' machine does), and
// `flush_run` / `accept_edge` only rewrite the state bytes of a failed
// unit: its direct-map leaf stays present. A poisoned unit's pages may
// still be pending (TDX) or unvalidated (SNP), so any access through that
// leaf — a `load_unaligned_zeropad` from the last word of the accepted
// unit before it, a kdump or hibernation walk of the direct map — is an
// access to unaccepted memory, which the guest cannot recover from (TDX:
// the VMM can only end the TD; SNP: a #VC the guest must treat as fatal).
// A not-present leaf would have turned it into an ordinary #PF, which the
// zeropad fix-up handles, exactly as for a frame a failed conversion
// poisoned.
// ---------------------------------------------------------------------
#[test]

fn a_unit_whose_acceptance_failed_is_not_left_mapped() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let base = GIB;
    w.hand_over_unaccepted(base, 4 * UNIT, 1);
    let storage = integration::bitmap_storage();
    let e = w.engine_accepting(&storage);
    e.record_unaccepted(base, 4 * UNIT).unwrap();
    // The TD module stays busy: the unit is never accepted (still pending).
    w.tdx.set_busy_answers(u32::MAX);
    let err = e.accept(base + UNIT, PAGE).unwrap_err();
    assert!(
        matches!(err, AcceptMemoryError::Platform { pa, poisoned: 512, .. } if pa == base + UNIT),
        "{err:?}"
    );
    w.tdx.set_busy_answers(0);
    assert_eq!(e.state(base + UNIT), Some(PageState::Poisoned));
    assert_eq!(w.tdx.page(base + UNIT).state, TdxPageState::Pending, "never accepted");
    let va = integration::sim::DIRECT_MAP_VA + base + UNIT;
    assert_eq!(
        e.translate(va),
        None,
        "a poisoned, still pending page is mapped present in the direct map"
    );
}
