//! Failures through the engine: every hostile mode of both models gives a
//! typed error, poisons exactly the batch's frames (left not present, never
//! handed back), leaves every other frame as it was, and the guest goes on;
//! the policy hook can terminate. Running out of table memory changes
//! nothing.

use coco_convert::{ConvertError, FailureAction, FailurePolicy, PageState, PlatformError, Target, Visibility};
use hvmock::{SnpConfig, SnpHostile, TdxConfig, TdxHostile};
use integration::world::{Machine, Shape, SnpWorld, TdxWorld};
use integration::{GIB, MIB};

const PA: u64 = 10 * MIB + 5 * 4096;
const LEN: u64 = 8 * 4096;
const FRAMES: u64 = LEN / 4096;

fn assert_poisoned_and_contained(
    translate: impl Fn(u64) -> Option<hvmock::Mapping>,
    state: impl Fn(u64) -> Option<PageState>,
    pa: u64,
    len: u64,
) {
    for f in (pa..pa + len).step_by(4096) {
        assert_eq!(state(f), Some(PageState::Poisoned), "{f:#x}");
        assert!(
            translate(Machine::direct(f)).is_none(),
            "poisoned frame {f:#x} must stay not present"
        );
    }
    for f in [pa - 4096, pa + len] {
        assert_eq!(state(f), Some(PageState::Private), "neighbour {f:#x} untouched");
        let m = translate(Machine::direct(f)).expect("neighbour still mapped");
        assert_eq!(m.pa, f);
    }
}

#[test]
fn every_tdx_hostile_mode_poisons_only_its_batch() {
    let modes = [
        TdxHostile::ResumeBelowStart,
        TdxHostile::ResumeAtEnd,
        TdxHostile::ResumeUnaligned,
        TdxHostile::ResumeWithoutSharedBit,
        TdxHostile::ResumeRewind,
        TdxHostile::NoProgressForever,
        TdxHostile::GarbageStatus(0x8000_0000_0000_0001),
    ];
    for mode in modes {
        let w = TdxWorld::new(
            TdxConfig {
                map_gpa_chunk_pages: Some(2),
                ..TdxConfig::default()
            },
            Shape::Mixed,
        );
        let e = w.engine();
        w.tdx.set_hostile(Some(mode));
        let err = e
            .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::Platform {
                    error: PlatformError::MapGpa(_),
                    pa: PA,
                    poisoned: FRAMES,
                    converted: 0
                }
            ),
            "{mode:?}: {err:?}"
        );
        let tables = w.m.page_tables();
        assert_poisoned_and_contained(|va| tables.translate(&w.m.mem, va), |pa| e.state(pa), PA, LEN);
        // Poisoned frames are refused; the guest goes on with others.
        assert!(matches!(
            e.convert(Target::Physical { pa: PA, len: 4096 }, Visibility::Private),
            Err(ConvertError::Refused {
                state: PageState::Poisoned,
                ..
            })
        ));
        w.tdx.set_hostile(None);
        e.convert(
            Target::Physical {
                pa: 2 * GIB - 128 * MIB,
                len: 4096,
            },
            Visibility::Shared,
        )
        .unwrap();
        assert_eq!(e.census().poisoned, LEN / 4096);
        assert_eq!(e.counters().failures, 1);
        assert!(w.tdx.violations().is_empty(), "{mode:?}: {:?}", w.tdx.violations());
    }
}

/// A VMM that claims success without converting is caught when the frames
/// come back: ACCEPT finds them still accepted (stale contents).
#[test]
fn tdx_success_without_converting_is_caught_on_the_way_back() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.tdx.set_hostile(Some(TdxHostile::SuccessWithoutConverting));
    e.convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
        .unwrap();
    let err = e
        .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Private)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Platform {
                error: PlatformError::Accept(tdcall::AcceptError::AlreadyAccepted { .. }),
                ..
            }
        ),
        "{err:?}"
    );
    let tables = w.m.page_tables();
    assert_poisoned_and_contained(|va| tables.translate(&w.m.mem, va), |pa| e.state(pa), PA, LEN);
}

#[test]
fn every_snp_hostile_mode_poisons_only_its_batch() {
    let modes = [
        SnpHostile::PscCurEntryBackwards,
        SnpHostile::PscEndEntryRaised,
        SnpHostile::PscEndEntryLowered,
        SnpHostile::PscReservedSet,
        SnpHostile::PscExitInfo2Error,
        SnpHostile::PscExitInfo1Error,
        SnpHostile::PscStall,
        SnpHostile::PscRewriteDescriptor,
    ];
    for mode in modes {
        let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
        let e = w.engine();
        w.boot_ghcb(&e, 1536 * MIB);
        w.snp.set_hostile(Some(mode));
        let err = e
            .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::Platform {
                    error: PlatformError::Psc(_),
                    ..
                }
            ),
            "{mode:?}: {err:?}"
        );
        let tables = w.m.page_tables();
        assert_poisoned_and_contained(|va| tables.translate(&w.m.mem, va), |pa| e.state(pa), PA, LEN);
        assert!(w.snp.violations().is_empty(), "{mode:?}: {:?}", w.snp.violations());
    }
}

/// A page state change "success" without an RMP change, on the way back
/// to private: the PVALIDATE through the window finds the pages
/// unassigned. Through the GHCB, and before one exists, through the MSR
/// protocol.
#[test]
fn snp_psc_without_rmp_change_is_caught_by_pvalidate() {
    for (with_ghcb, lie) in [
        (true, SnpHostile::PscSuccessWithoutRmpChange),
        (false, SnpHostile::MsrPscWithoutRmpChange),
    ] {
        let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
        let e = w.engine();
        if with_ghcb {
            w.boot_ghcb(&e, 1536 * MIB);
        }
        e.convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
            .unwrap();
        let expected_msr = if with_ghcb { 1 } else { LEN / 4096 };
        assert_eq!(
            e.counters().psc_msr,
            expected_msr,
            "the GHCB, or the MSR protocol without one"
        );
        w.snp.set_hostile(Some(lie));
        let err = e
            .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Private)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::Platform {
                    error: PlatformError::Pvalidate(_),
                    ..
                }
            ),
            "{lie:?}: {err:?}"
        );
        assert_eq!(e.state(PA), Some(PageState::Poisoned));
        assert!(w.m.page_tables().translate(&w.m.mem, Machine::direct(PA)).is_none());
    }
}

/// Before a GHCB exists the MSR protocol carries the PSC: its lies too.
#[test]
fn snp_msr_protocol_lies_poison_the_batch() {
    for mode in [
        SnpHostile::MsrWrongCode,
        SnpHostile::MsrReservedBits,
        SnpHostile::MsrPscError,
    ] {
        let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
        let e = w.engine();
        w.snp.set_hostile(Some(mode));
        let err = e
            .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::Platform {
                    error: PlatformError::PscMsr(_),
                    ..
                }
            ),
            "{mode:?}: {err:?}"
        );
        assert_eq!(e.state(PA + LEN - 4096), Some(PageState::Poisoned));
    }
}

struct Terminate;
impl FailurePolicy for Terminate {
    fn on_failure(&self, _: &ConvertError) -> FailureAction {
        FailureAction::Terminate { reason: 7 }
    }
}

#[test]
fn policy_can_terminate_through_the_platform() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine().with_policy(&Terminate);
    w.tdx.set_hostile(Some(TdxHostile::NoProgressForever));
    assert!(e
        .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
        .is_err());
    assert_eq!(w.tdx.fatal_error(), Some(7));

    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine().with_policy(&Terminate);
    w.snp.set_hostile(Some(SnpHostile::MsrPscError));
    assert!(e
        .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
        .is_err());
    assert_eq!(w.snp.terminated(), Some((0, 7)));
}

/// A conversion that needs a 1 GiB and a 2 MiB split, with only an
/// early-boot frame source (a bump allocator, no heap: the engine never
/// allocates from one) holding exactly the two table pages it needs.
#[test]
fn early_boot_split_with_exactly_the_frames_needed() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.m.frames.set_allowance(Some(1));
    let err = e
        .convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
        .unwrap_err();
    assert_eq!(err, ConvertError::OutOfTableMemory { needed: 2 });
    assert_eq!(e.state(PA), Some(PageState::Private), "nothing changed");
    assert_eq!(e.counters().hypercalls(), 0);
    assert_eq!(e.counters().splits_1g, 0);
    assert_eq!(w.m.frames.in_use(), 0, "the partial reservation was given back");
    assert_eq!(
        w.m.page_tables().translate(&w.m.mem, Machine::direct(PA)).unwrap().size,
        GIB
    );

    w.m.frames.set_allowance(Some(2));
    e.convert(Target::Physical { pa: PA, len: LEN }, Visibility::Shared)
        .unwrap();
    assert_eq!((e.counters().splits_1g, e.counters().splits_2m), (1, 1));
}

#[test]
fn concurrent_disjoint_conversions_and_overlap_refusal() {
    let w = SnpWorld::new(
        SnpConfig {
            psc_pages_per_exit: Some(3),
            ..SnpConfig::default()
        },
        Shape::Mixed,
    );
    let e = w.engine();
    std::thread::scope(|s| {
        for cpu in 0..integration::world::CPUS {
            let (e, w) = (&e, &w);
            s.spawn(move || {
                integration::sim::set_cpu(cpu);
                w.boot_ghcb(e, 1536 * MIB + cpu as u64 * 4096);
                let base = GIB + cpu as u64 * 64 * MIB;
                for round in 0..20u64 {
                    let pa = base + (round % 5) * 3 * MIB + round * 4096;
                    e.convert(Target::Physical { pa, len: 16 * 4096 }, Visibility::Shared)
                        .unwrap();
                    e.convert(Target::Physical { pa, len: 16 * 4096 }, Visibility::Private)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!((e.census().converting, e.census().poisoned), (0, 0));
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
    e.release_deferred_tables();
    assert_eq!(w.m.frames.in_use(), 1, "only the PT around the GHCBs remains");

    // The same frames from two CPUs at once: exactly one conversion wins,
    // the other is refused (never both, never a corrupted state).
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|cpu| {
                let e = &e;
                s.spawn(move || {
                    integration::sim::set_cpu(cpu);
                    e.convert(
                        Target::Physical {
                            pa: 100 * MIB,
                            len: 64 * 4096,
                        },
                        Visibility::Shared,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = outcomes.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{outcomes:?}");
    assert!(outcomes.iter().any(|r| matches!(r, Err(ConvertError::Refused { .. }))));
    assert_eq!(e.state(100 * MIB), Some(PageState::Shared));
}

/// A hypervisor that registers another GFN than the GHCB's is refused by
/// the setup, which goes no further.
#[test]
fn ghcb_registration_lie_is_refused_by_setup() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.snp.set_hostile(Some(SnpHostile::MsrWrongGfn));
    let pa = 1536 * MIB;
    let ptr = std::ptr::NonNull::new(w.m.mem.ptr(pa).cast()).unwrap();
    // SAFETY: the page is used by nothing else.
    let err = unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.unwrap_err();
    assert_eq!(
        err,
        coco_convert::GhcbSetupError::Register(snp_ghcb::protocol::ProtocolError::RegistrationMismatch {
            requested: pa >> 12,
            echoed: (pa >> 12) + 1
        })
    );
}
