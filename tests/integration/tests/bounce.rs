//! DMA bounce buffers over the pool, the test playing the device (and the
//! host behind it): it reads and writes bounce slots through simulated
//! memory at the device address it was given, whenever it likes.

use coco_convert::pool::{Bounce, BounceError, DmaDirection, PoolError, SharedPool, CHUNK};
use coco_convert::PageState;
use hvmock::{GuestMemory, SnpConfig, TdxConfig, TdxPageState};
use integration::sim::{chunk_slots, ChunkStack, SimAccess};
use integration::world::{Shape, SnpWorld, TdxWorld};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

fn chunks(n: u64) -> ChunkStack {
    ChunkStack::new((0..n).rev().map(|i| GIB + 256 * MIB + i * CHUNK).collect())
}

/// The device reading `len` bytes at a bus address `pa`.
fn device_read(mem: &GuestMemory, pa: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    // SAFETY: the test is the device; the slot lies in simulated memory.
    unsafe { std::ptr::copy_nonoverlapping(mem.ptr(pa), out.as_mut_ptr(), len) };
    out
}

/// The device writing `bytes` at `pa`.
fn device_write(mem: &GuestMemory, pa: u64, bytes: &[u8]) {
    assert!(mem.contains(pa, bytes.len() as u64));
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.ptr(pa), bytes.len()) };
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn tdx_device_addresses_carry_the_shared_bit_and_name_shared_frames() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(2), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let shared_bit = w.tdx.shared_mask();
    let data = pattern(1, 3 * PAGE as usize + 17);
    let mut buf = data.clone();
    let m = bounce.map(&mut buf, DmaDirection::ToDevice).unwrap();
    let dev = m.device_address();
    assert_ne!(dev & shared_bit, 0, "{dev:#x}: no shared bit");
    assert_eq!(dev & !shared_bit, m.slot_pa());
    for pa in (m.slot_pa()..m.slot_pa() + 4 * PAGE).step_by(PAGE as usize) {
        assert_eq!(w.tdx.page(pa).state, TdxPageState::Shared, "{pa:#x}");
        assert_eq!(e.state(pa), Some(PageState::Shared));
    }
    assert_eq!(device_read(&w.m.mem, dev & !shared_bit, data.len()), data);
    m.unmap();
    assert!(w.tdx.violations().is_empty());
}

#[test]
fn snp_device_addresses_are_plain_gpas_of_shared_frames() {
    let w = SnpWorld::new(SnpConfig::default(), Shape::Mixed);
    let e = w.engine();
    w.boot_ghcb(&e, 1536 * MIB);
    let pool = SharedPool::new(&e, chunks(2), chunk_slots(2), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let data = pattern(2, 5000);
    let mut buf = data.clone();
    let m = bounce.map(&mut buf, DmaDirection::Bidirectional).unwrap();
    assert_eq!(m.device_address(), m.slot_pa(), "no C-bit, no other bit");
    assert_eq!(m.device_address() & (1 << 51), 0);
    for pa in [m.slot_pa(), m.slot_pa() + PAGE] {
        let rmp = w.snp.rmp(pa);
        assert!(!rmp.assigned && !rmp.validated, "{pa:#x} shared in the RMP: {rmp:?}");
    }
    assert_eq!(device_read(&w.m.mem, m.device_address(), data.len()), data);
    m.unmap();
    assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
}

/// The device scribbles the slot before, between and after the CPU's
/// syncs: the CPU sees exactly the snapshot of its last sync, never the
/// live slot.
#[test]
fn a_device_scribbling_the_slot_reaches_the_cpu_only_at_a_sync() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(1), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let len = 777;
    let mut buf = vec![0x42; len];
    let mut m = bounce.map(&mut buf, DmaDirection::FromDevice).unwrap();
    let slot = m.slot_pa();
    device_write(&w.m.mem, slot, &pattern(10, len));
    assert_eq!(m.buffer(), &vec![0x42; len][..], "no sync yet: the CPU's bytes");
    m.sync_for_cpu();
    assert_eq!(m.buffer(), &pattern(10, len)[..]);
    device_write(&w.m.mem, slot, &pattern(20, len));
    assert_eq!(m.buffer(), &pattern(10, len)[..], "a later scribble is not seen");
    m.buffer_mut()[0] = 0xFF;
    m.sync_for_cpu();
    assert_eq!(m.buffer(), &pattern(20, len)[..]);
    device_write(&w.m.mem, slot, &pattern(30, len));
    m.unmap();
    assert_eq!(buf, pattern(30, len), "unmap syncs for the CPU");
}

/// A `ToDevice` mapping never copies back: whatever the device writes, the
/// CPU's buffer is as it was.
#[test]
fn a_to_device_mapping_never_copies_the_device_bytes_back() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(1), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let data = pattern(3, 100);
    let mut buf = data.clone();
    let mut m = bounce.map(&mut buf, DmaDirection::ToDevice).unwrap();
    device_write(&w.m.mem, m.slot_pa(), &[0xEE; 100]);
    m.sync_for_cpu();
    assert_eq!(m.buffer(), &data[..]);
    m.unmap();
    assert_eq!(buf, data);
}

/// A buffer at an odd address, not a whole number of pages: unmap copies
/// the device's bytes for exactly the mapped length, from the start of the
/// slot, and not a byte beyond; the slot's pages past the length are the
/// device's to scribble.
#[test]
fn unmap_copies_out_exactly_the_mapped_length() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(1), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    for (offset, len) in [(1usize, 5000usize), (3, 1), (4095, 4097), (7, 8191), (0, 8192)] {
        let mut backing = vec![0x5A; offset + len + 64];
        let buf = &mut backing[offset..offset + len];
        let m = bounce.map(buf, DmaDirection::FromDevice).unwrap();
        assert_eq!(m.len(), len);
        let slot = m.slot_pa();
        let slot_len = (len as u64).div_ceil(PAGE) * PAGE;
        assert!(
            w.m.mem.is_filled(slot, len as u64, 0),
            "a FromDevice slot starts zeroed"
        );
        device_write(&w.m.mem, slot, &pattern(7, slot_len as usize));
        m.unmap();
        assert_eq!(
            &backing[offset..offset + len],
            &pattern(7, len)[..],
            "offset {offset} len {len}"
        );
        assert!(backing[..offset].iter().all(|&b| b == 0x5A), "before the buffer");
        assert!(
            backing[offset + len..].iter().all(|&b| b == 0x5A),
            "after the buffer (offset {offset} len {len})"
        );
    }
}

/// A `FromDevice` slot shows the host neither the private buffer's bytes
/// nor what the slot's previous mapping left there.
#[test]
fn a_from_device_slot_holds_zeroes_not_private_or_stale_bytes() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(1), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let mut first = vec![0xA1; 3000];
    let m = bounce.map(&mut first, DmaDirection::ToDevice).unwrap();
    let slot = m.slot_pa();
    m.unmap();
    let mut secret = vec![0xB2; 3000];
    let m = bounce.map(&mut secret, DmaDirection::FromDevice).unwrap();
    assert_eq!(m.slot_pa(), slot, "the same slot again");
    assert!(w.m.mem.is_filled(slot, 3000, 0));
    m.unmap();
    assert_eq!(secret, vec![0; 3000], "the device wrote nothing: zeroes come back");
}

#[test]
fn bidirectional_syncs_carry_both_ways() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(1), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let mut buf = pattern(4, 600);
    let mut m = bounce.map(&mut buf, DmaDirection::Bidirectional).unwrap();
    let slot = m.slot_pa();
    assert_eq!(device_read(&w.m.mem, slot, 600), pattern(4, 600));
    m.buffer_mut().copy_from_slice(&pattern(5, 600));
    assert_eq!(device_read(&w.m.mem, slot, 600), pattern(4, 600), "not before the sync");
    m.sync_for_device();
    assert_eq!(device_read(&w.m.mem, slot, 600), pattern(5, 600));
    device_write(&w.m.mem, slot, &pattern(6, 600));
    drop(m);
    assert_eq!(buf, pattern(6, 600), "a dropped mapping unmaps the same way");
}

#[test]
fn mapping_errors_are_typed() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(1), chunk_slots(2), 0);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    assert_eq!(
        bounce.map(&mut [], DmaDirection::ToDevice).unwrap_err(),
        BounceError::Empty
    );
    let mut huge = vec![0; CHUNK as usize + 1];
    assert_eq!(
        bounce.map(&mut huge, DmaDirection::FromDevice).unwrap_err(),
        BounceError::TooLarge {
            len: CHUNK as usize + 1,
            max: CHUNK
        }
    );
    let whole = bounce
        .map(&mut huge[..CHUNK as usize], DmaDirection::FromDevice)
        .unwrap();
    let mut one = [0u8];
    let err = bounce.map(&mut one, DmaDirection::ToDevice).unwrap_err();
    assert_eq!(err, BounceError::NoRoom(PoolError::Exhausted));
    assert!(err.to_string().contains("no room"), "{err}");
    assert!(core::error::Error::source(&err).is_some());
    whole.unmap();
    bounce.map(&mut one, DmaDirection::ToDevice).unwrap().unmap();
    let empty_pool = SharedPool::new(&e, chunks(0), chunk_slots(0), 0);
    let none = Bounce::new(&empty_pool, SimAccess(w.m.mem.clone()), e.encryption());
    assert_eq!(
        none.map(&mut one, DmaDirection::ToDevice).unwrap_err(),
        BounceError::NoRoom(PoolError::AtCapacity { slots: 0 })
    );
}

/// Four CPUs map, play device, and unmap at once: every slot holds its own
/// buffer's bytes (two live slots never overlap), and every unmap brings
/// back its own device's answer.
#[test]
fn concurrent_maps_and_unmaps_never_mix_buffers() {
    let w = TdxWorld::new(TdxConfig::default(), Shape::Mixed);
    let e = w.engine();
    let pool = SharedPool::new(&e, chunks(8), chunk_slots(8), 1);
    let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
    let shared_bit = w.tdx.shared_mask();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let (bounce, mem) = (&bounce, &w.m.mem);
            s.spawn(move || {
                let mut x = 0x9E37_79B9u64 * (t as u64 + 1);
                for i in 0..300u32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 1 + (x % 20_000) as usize;
                    let seed = t.wrapping_mul(61).wrapping_add(i as u8);
                    let mut buf = pattern(seed, len);
                    let m = bounce.map(&mut buf, DmaDirection::Bidirectional).unwrap();
                    let slot = m.device_address() & !shared_bit;
                    assert_eq!(device_read(mem, slot, len), pattern(seed, len), "cpu {t} map {i}");
                    std::thread::yield_now();
                    device_write(mem, slot, &pattern(seed ^ 0xFF, len));
                    std::thread::yield_now();
                    m.unmap();
                    assert_eq!(buf, pattern(seed ^ 0xFF, len), "cpu {t} unmap {i}");
                }
            });
        }
    });
    let stats = pool.stats();
    assert_eq!(stats.allocations, stats.frees);
    assert_eq!(stats.chunks_lost, 0);
    assert!(w.tdx.violations().is_empty());
}
