//! Scenarios 7 and 8, the rest of a page's life: memory the firmware
//! hands over unaccepted, and everything private again before a kexec.
//!
//! Scenario 7 needs memory handed over unaccepted on demand, and a host
//! that lies when told to: only the models do either, so it runs in the
//! emulated mode alone (on a real platform the firmware's own unaccepted
//! ranges go through the engine at boot). Scenario 8 asks the platform.

use core::sync::atomic::{AtomicU64, Ordering};

use coco_convert::{ConvertError, Platform, Target, UnacceptedBitmap, Visibility};

use crate::memory::{direct_map, layout, Tables, HOST_VIEW, RAM};
use crate::scenarios::{check, show, GuestEngine};
use crate::{fail, println};

const MIB: u64 = 1 << 20;
const UNIT: u64 = 2 * MIB;

/// One bit per 2 MiB unit of the guest's RAM.
static BITS: [AtomicU64; (RAM / UNIT / 64) as usize] = [const { AtomicU64::new(0) }; (RAM / UNIT / 64) as usize];

#[cfg(feature = "emulator")]
pub use model::{model_agrees, unaccepted, Model};

/// The bitmap of unaccepted memory, empty (everything accepted).
pub fn bitmap() -> UnacceptedBitmap<'static> {
    for word in &BITS {
        word.store(0, Ordering::Relaxed);
    }
    UnacceptedBitmap::new(0, UNIT, &BITS).unwrap_or_else(|_| fail("bitmap"))
}

/// Scenario 8's direct range, `(pa, len)`.
const DIRECT_RANGE: (u64, u64) = (1400 * MIB + 4096, 40960);

/// Scenario 8 (last: conversions stop for good): a mix shared (the
/// swiotlb-like range of scenario 2 if still shared, a vmalloc-style
/// buffer, a direct range, and on SNP the GHCB), then everything made
/// private again; the platform holds every frame it shared private and
/// accepted again (`usable`, asked of the model or of the platform
/// itself), and every mapping of RAM is private. `after` adds the checks
/// only a model can make.
pub fn unshare_all<P: Platform>(e: &GuestEngine<P>, t: &mut Tables, usable: &dyn Fn(u64) -> bool, after: &dyn Fn()) {
    let before = e.counters();
    let mut frames = [0u64; 24];
    for (i, f) in frames.iter_mut().enumerate() {
        *f = (1 << 30) + 200 * MIB + i as u64 * 5 * 4096;
    }
    let va = t.vmalloc(&frames);
    let buffer = Target::Virtual {
        va,
        len: frames.len() as u64 * 4096,
    };
    check(e.convert(buffer, Visibility::Shared).is_ok(), "unshare: buffer");
    check(
        e.convert(
            Target::Physical {
                pa: DIRECT_RANGE.0,
                len: DIRECT_RANGE.1,
            },
            Visibility::Shared,
        )
        .is_ok(),
        "unshare: direct range",
    );
    let shared = e.census().shared;
    let report = e.unshare_all(&[buffer]);
    if !report.complete() || !report.accounting_matches() {
        println!("  {report:?}");
        fail("unshare: not everything made private, or the count is off");
    }
    check(
        report.made_private == shared && e.census().shared == 0,
        "unshare: frames left shared",
    );
    check(
        frames
            .iter()
            .copied()
            .chain((DIRECT_RANGE.0..DIRECT_RANGE.0 + DIRECT_RANGE.1).step_by(4096))
            .all(usable),
        "unshare: a frame it shared is not private and accepted again",
    );
    let windows = layout().windows;
    let (mut shared_mappings, mut direct_bytes) = (0, 0);
    crate::walk::for_each_leaf(t, &mut |m| {
        let own_view = m.va >= HOST_VIEW && m.va < HOST_VIEW + RAM || m.va >= windows && m.va < windows + (64 << 20);
        if m.pa < RAM && !own_view && m.va >= direct_map() && m.side != Visibility::Private {
            shared_mappings += 1;
        }
        if m.va >= direct_map() && m.va < direct_map() + RAM {
            direct_bytes += m.size;
        }
    });
    // The walk saw the whole direct map, but for the poisoned frames (not
    // present): a walk that saw none of it would find nothing shared.
    check(
        direct_bytes + report.poisoned * 4096 == RAM,
        "unshare: the page walk did not see the whole direct map",
    );
    check(shared_mappings == 0, "unshare: a mapping of RAM is still shared");
    check(
        e.convert(
            Target::Physical {
                pa: 64 * MIB,
                len: 4096,
            },
            Visibility::Shared,
        ) == Err(ConvertError::Stopped),
        "unshare: a conversion after unshare_all was not stopped",
    );
    after();
    show(
        "8 unshare all",
        &e.counters().since(&before),
        format_args!(
            "{} frames private again, count {} = state table {}, poisoned {}",
            report.made_private, report.expected_shared, report.found_shared, report.poisoned
        ),
    );
}

#[cfg(feature = "emulator")]
mod model {
    use core::sync::atomic::Ordering;

    use coco_convert::{AcceptMemoryError, ConvertError, PageState, Platform, Target, Visibility};

    use super::{MIB, UNIT};
    use crate::fail;
    use crate::memory::{direct_map, HOST_VIEW, RAM};
    use crate::scenarios::{check, show, GuestEngine};

    /// Handed over unaccepted, then accepted lazily and eagerly.
    const ACCEPTED_LATER: (u64, u64) = (1280 * MIB, 32 * MIB);
    /// Handed over unaccepted and left so, for the next kernel.
    const LEFT_FOR_NEXT_KERNEL: (u64, u64) = (1344 * MIB, 4 * MIB);
    /// Two units handed over unaccepted, the second of which the firmware or
    /// host lies about, so that it fails as a guard unit.
    const GUARD_FAILS: (u64, u64) = (1352 * MIB, 2 * UNIT);

    /// An 8-byte load from `va`, whatever its alignment: the word a kernel's
    /// `load_unaligned_zeropad` reads at the end of a string.
    ///
    /// # Safety
    ///
    /// `va..va + 8` is mapped and readable.
    unsafe fn load_word(va: u64) -> u64 {
        let word: u64;
        // SAFETY: the caller guarantees the eight bytes are mapped.
        unsafe { core::arch::asm!("mov {0}, qword ptr [{1}]", out(reg) word, in(reg) va, options(nostack, readonly)) };
        word
    }

    /// What the platform model tells about a frame.
    pub struct Model<'a> {
        /// Makes `[pa, pa + len)` memory launch left unaccepted.
        pub hand_over_unaccepted: &'a dyn Fn(u64, u64),
        /// The frame is private and accepted (TDX) or validated (SNP).
        pub usable: &'a dyn Fn(u64) -> bool,
        /// The frame is still as launch left unaccepted memory.
        pub unaccepted: &'a dyn Fn(u64) -> bool,
        /// From now on the firmware or host lies about `[pa, pa + len)`: it
        /// says it is accepted or validated already, so accepting it fails.
        pub lie_accepted: &'a dyn Fn(u64, u64),
        /// Stops lying.
        pub honest: &'a dyn Fn(),
    }

    /// Scenario 7: unaccepted memory, recorded from the memory map, accepted
    /// lazily unit by unit (with the guard unit a word load past the range's
    /// end reaches), refused for conversion until accepted, then eagerly.
    pub fn unaccepted<P: Platform>(e: &GuestEngine<P>, model: &Model<'_>) {
        let before = e.counters();
        let (base, len) = ACCEPTED_LATER;
        (model.hand_over_unaccepted)(base, len);
        check(e.record_unaccepted(base, len).is_ok(), "unaccepted: recording failed");
        let bitmap = e.unaccepted().unwrap_or_else(|| fail("no bitmap"));
        check(bitmap.count() == len / UNIT, "unaccepted: units recorded");

        let lazy = e.accept(base + 5 * MIB, 4096);
        check(
            matches!(lazy, Ok(r) if r.units == 1),
            "unaccepted: a page inside a unit accepts one unit",
        );
        check(
            (model.usable)(base + 4 * MIB) && (model.unaccepted)(base + 6 * MIB),
            "unaccepted: the unit, and only it",
        );

        // A range ending on a unit boundary, and a real 8-byte load that runs
        // 5 bytes past its end into the next unit: accepted with it.
        let (pa, end) = (base + 8 * MIB, base + 10 * MIB);
        check(
            matches!(e.accept(pa, end - pa), Ok(r) if r.units == 2),
            "unaccepted: the guard unit was not accepted",
        );
        check(
            (model.usable)(end),
            "unaccepted: the page after the range is not accepted",
        );
        check(
            (model.unaccepted)(end + UNIT),
            "unaccepted: more than the guard was accepted",
        );
        let (last_word, guard_word) = (0x1122_3344_5566_7788u64, 0x99AA_BBCC_DDEE_FF00u64);
        let (last, guard) = ((direct_map() + end - 8) as *mut u64, (direct_map() + end) as *mut u64);
        // SAFETY: both words lie in accepted memory the direct map maps, which
        // no one else uses.
        unsafe {
            last.write_volatile(last_word);
            guard.write_volatile(guard_word);
        }
        // SAFETY: the word straddles the two pages just written.
        let crossing = unsafe { load_word(direct_map() + end - 3) };
        check(
            crossing == last_word >> 40 | guard_word << 24,
            "unaccepted: the crossing load did not read the guard unit",
        );

        let refused = e.convert(
            Target::Physical {
                pa: base + 20 * MIB,
                len: 4096,
            },
            Visibility::Shared,
        );
        check(
            matches!(
                refused,
                Err(ConvertError::Refused {
                    state: PageState::Unaccepted,
                    ..
                })
            ),
            "unaccepted: converting unaccepted memory was not refused",
        );

        // The rest eagerly, as at boot; then one more range is handed over and
        // left for the next kernel.
        let eager = e.accept_all(0, 1);
        check(eager.is_ok(), "unaccepted: eager acceptance failed");
        check(bitmap.count() == 0, "unaccepted: units left after eager acceptance");
        check(
            (base..base + len).step_by(4096).all(|pa| (model.usable)(pa)),
            "unaccepted: a page the model does not hold accepted",
        );
        let (kept, kept_len) = LEFT_FOR_NEXT_KERNEL;
        (model.hand_over_unaccepted)(kept, kept_len);
        check(
            e.record_unaccepted(kept, kept_len).is_ok(),
            "unaccepted: recording failed",
        );
        check(
            e.accept(kept + kept_len + 4096, 4096).is_ok() && bitmap.count() == kept_len / UNIT,
            "unaccepted: memory outside the units was affected",
        );
        check(
            matches!(
                e.record_unaccepted(kept, kept_len),
                Err(AcceptMemoryError::NotPrivate { .. })
            ),
            "unaccepted: recorded twice",
        );
        guard_unit_fails(e, model);
        show(
            "7 unaccepted memory",
            &e.counters().since(&before),
            format_args!(
                "units accepted {} (lazy 1, guard 1+1, guard failing 1+0, eager {}), {} left unaccepted for the next kernel (1 of them poisoned)",
                e.counters().since(&before).units_accepted,
                eager.map_or(0, |r| r.units),
                bitmap.count()
            ),
        );
    }

    /// A range ending on a unit boundary whose guard unit fails: the guard is
    /// poisoned and not present, so the word load that runs past the range's
    /// end takes a real #PF the zeropad fix-up handles, and reads zeros where
    /// the mapped unit's bytes would have been.
    fn guard_unit_fails<P: Platform>(e: &GuestEngine<P>, model: &Model<'_>) {
        let (base, len) = GUARD_FAILS;
        let end = base + UNIT;
        (model.hand_over_unaccepted)(base, len);
        check(
            e.record_unaccepted(base, len).is_ok(),
            "guard failing: recording failed",
        );
        // What a stray read of the guard unit would find: the host's bytes.
        // SAFETY: the host view maps all RAM; nothing else uses this page.
        unsafe { ((HOST_VIEW + end) as *mut u64).write_volatile(0x5A5A_5A5A_5A5A_5A5A) };
        (model.lie_accepted)(end, UNIT);
        let failed = e.accept(base, UNIT);
        (model.honest)();
        check(
            matches!(
                failed,
                Err(AcceptMemoryError::Platform { pa, poisoned: 512, accepted: 1, left_mapped: false, .. }) if pa == end
            ),
            "guard failing: the guard unit's failure was not reported as poisoned and unmapped",
        );
        check(
            (model.usable)(end - 4096) && e.state(end) == Some(PageState::Poisoned),
            "guard failing: the range is not accepted, or the guard not poisoned",
        );
        check(
            e.translate(direct_map() + end).is_none() && e.translate(direct_map() + end - 4096).is_some(),
            "guard failing: the poisoned guard unit is still mapped",
        );
        let last_word = 0x1122_3344_5566_7788u64;
        // SAFETY: the last word of the accepted unit, mapped, used by no one.
        unsafe { ((direct_map() + end - 8) as *mut u64).write_volatile(last_word) };
        let fixups = crate::ZEROPAD_FIXUPS.load(Ordering::Relaxed);
        // SAFETY: the first byte is mapped; the fix-up handles the fault on
        // the rest.
        let crossing = unsafe { coco_convert::zeropad::load_unaligned_zeropad((direct_map() + end - 3) as *const u8) };
        check(
            crate::ZEROPAD_FIXUPS.load(Ordering::Relaxed) == fixups + 1,
            "guard failing: the crossing load took no #PF",
        );
        check(
            crossing == last_word >> 40,
            "guard failing: the crossing load read past the accepted memory",
        );
    }

    /// After scenario 8, through the model: every frame of RAM is private
    /// and accepted, or unaccepted as handed over; the units left for the
    /// next kernel are still so.
    pub fn model_agrees<P: Platform>(e: &GuestEngine<P>, model: &Model<'_>) {
        check(
            (0..RAM)
                .step_by(4096)
                .all(|pa| (model.usable)(pa) || (model.unaccepted)(pa)),
            "unshare: a frame the model holds neither private nor unaccepted",
        );
        let bitmap = e.unaccepted().unwrap_or_else(|| fail("no bitmap"));
        check(
            (LEFT_FOR_NEXT_KERNEL.0..LEFT_FOR_NEXT_KERNEL.0 + LEFT_FOR_NEXT_KERNEL.1)
                .step_by(UNIT as usize)
                .all(|pa| bitmap.is_unaccepted(pa / UNIT) && (model.unaccepted)(pa)),
            "unshare: the units left for the next kernel",
        );
    }
}
