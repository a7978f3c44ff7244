//! The `lock-stats` instrumentation: every acquisition of the table lock
//! counted, and the whole hold timed.

use coco_convert::platform::tdx::Tdx;
use coco_convert::{Target, Visibility};
use integration::null::NullTdx;
use integration::world::{Machine, Shape};
use integration::MIB;

#[cfg(target_arch = "x86_64")]
fn tsc() -> u64 {
    // SAFETY: RDTSC reads a counter and changes nothing.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[test]
fn every_acquisition_is_counted() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let e = m.engine(Tdx::new(NullTdx::default(), 1 << 47).unwrap());
    e.record_lock_stats(true);
    let before = e.lock_stats();
    e.translate(Machine::direct(0));
    e.with_table_lock(|| {});
    assert_eq!(e.lock_stats().since(&before).acquisitions, 2);
    // A conversion takes it at least twice: before its host calls (to
    // claim and unmap) and after them (to map again).
    let before = e.lock_stats();
    e.convert(
        Target::Physical {
            pa: 64 * MIB,
            len: 4096,
        },
        Visibility::Shared,
    )
    .unwrap();
    assert!(e.lock_stats().since(&before).acquisitions >= 2);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_whole_hold_is_timed() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let e = m.engine(Tdx::new(NullTdx::default(), 1 << 47).unwrap());
    e.record_lock_stats(true);
    let before = e.lock_stats();
    let outer = tsc();
    let inside = e.with_table_lock(|| {
        let start = tsc();
        std::thread::sleep(std::time::Duration::from_millis(2));
        tsc() - start
    });
    let outer = tsc() - outer;
    let held = e.lock_stats().since(&before).held_ticks;
    assert!(
        (inside..=outer).contains(&held),
        "held {held} ticks: {inside} passed inside the lock, {outer} around the call"
    );
}

#[test]
fn nothing_is_counted_while_switched_off() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let e = m.engine(Tdx::new(NullTdx::default(), 1 << 47).unwrap());
    e.translate(Machine::direct(0));
    assert_eq!(e.lock_stats(), Default::default(), "off when created");
    e.record_lock_stats(true);
    e.translate(Machine::direct(0));
    e.record_lock_stats(false);
    e.translate(Machine::direct(0));
    e.with_table_lock(|| {});
    assert_eq!(e.lock_stats().acquisitions, 1, "only the one taken while on");
}
