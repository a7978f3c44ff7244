//! The engine's real code under shuttle: conversions of overlapping and
//! adjacent ranges, of a vmalloc-style buffer against its frames' direct
//! map, racing alias registration and removal, racing
//! `release_deferred_tables`, a shared pool whose chunks go back to
//! private, and DMA bounce mappings over it. Every schedule ends with the engine contract's invariants.

#[cfg(not(shuttle))]
#[test]
#[ignore = "needs the explorer's primitives: run scripts/schedules (RUSTFLAGS=--cfg shuttle)"]
fn schedules_need_cfg_shuttle() {}

#[cfg(shuttle)]
mod explored {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use coco_convert::bits::PRESENT;
    use coco_convert::pool::{Bounce, DmaDirection, SharedPool, CHUNK};
    use coco_convert::{Alias, ConvertError, Level, PageState, Report, Target, Visibility};
    use hvmock::{SnpConfig, TdxConfig};
    use integration::invariants::assert_consistent_over;
    use integration::sim::{chunk_slots, set_cpu, ChunkStack, SimAccess, ALIAS_VA};
    use integration::world::{Machine, Shape, SnpEngine, SnpWorld, TdxEngine, TdxWorld, DIRECT_MAP_FLAGS};
    use integration::{GIB, MIB};
    use schedules::{explore, schedules};
    use shuttle::thread;

    const PAGE: u64 = 4096;
    /// A 2 MiB region mapped by one 2 MiB leaf of the direct map.
    const REGION: u64 = GIB + 20 * MIB;
    const SCHEDULES: usize = 200;

    fn frame(i: u64) -> u64 {
        REGION + i * PAGE
    }

    fn frames(first: u64, count: u64) -> Target {
        Target::Physical {
            pa: frame(first),
            len: count * PAGE,
        }
    }

    /// Frames each successful conversion changed; a frame's final side is
    /// private exactly when an even number of conversions changed it, in
    /// whatever order they ran.
    #[derive(Default)]
    struct Ledger(Mutex<BTreeMap<u64, u32>>);

    impl Ledger {
        /// Records `result`: a success toggles `frames`; an error must
        /// have changed nothing.
        fn record(&self, result: Result<Report, ConvertError>, frames: &[u64]) {
            match result {
                Ok(report) => {
                    assert_eq!(report.frames, frames.len() as u64, "report counts the frames changed");
                    let mut toggles = self.0.lock().unwrap();
                    for &pa in frames {
                        *toggles.entry(pa).or_default() += 1;
                    }
                }
                Err(err) => assert!(err.changed_nothing(), "{err:?} after a change"),
            }
        }

        fn expected(&self, pa: u64) -> PageState {
            match self.0.lock().unwrap().get(&pa).copied().unwrap_or(0) % 2 {
                0 => PageState::Private,
                _ => PageState::Shared,
            }
        }

        /// Every frame the scenario touched is where the ledger says.
        fn check(&self, state: impl Fn(u64) -> Option<PageState>, touched: impl Iterator<Item = u64>) {
            for pa in touched {
                assert_eq!(state(pa), Some(self.expected(pa)), "frame {pa:#x}");
            }
        }
    }

    fn range(first: u64, count: u64) -> Vec<u64> {
        (first..first + count).map(frame).collect()
    }

    /// Converts `frames(first, count)` to shared and back, recording both.
    fn there_and_back(
        convert: impl Fn(Target, Visibility) -> Result<Report, ConvertError>,
        ledger: &Ledger,
        first: u64,
        count: u64,
    ) {
        for to in [Visibility::Shared, Visibility::Private] {
            ledger.record(convert(frames(first, count), to), &range(first, count));
        }
    }

    /// The direct map's leaf over `REGION` is one 2 MiB leaf again when all
    /// its frames are on one side (collapse left no split behind).
    fn region_whole(m: &Machine, ledger: &Ledger) {
        let uniform = (0..512).all(|i| ledger.expected(frame(i)) == PageState::Private);
        let leaf = m.page_tables().translate(&m.mem, Machine::direct(REGION)).unwrap();
        if uniform {
            assert!(
                leaf.size >= 2 * MIB,
                "the region is mapped by one leaf of at least 2 MiB again: {leaf:x?}"
            );
        }
    }

    /// The engine contract's invariants over the frames the scenarios
    /// use (the region, the pool's chunks after it), none converting.
    fn checked(m: &Machine, state: impl Fn(u64) -> Option<PageState>, host: impl Fn(u64) -> Option<Visibility>) {
        let frames = REGION..REGION + 8 * MIB;
        for pa in frames.clone().step_by(PAGE as usize) {
            assert_ne!(state(pa), Some(PageState::Converting), "frame {pa:#x} left converting");
            // The scenarios leave no guard page: every entry the engine
            // made not present it must have made present again.
            assert!(
                m.page_tables().translate(&m.mem, Machine::direct(pa)).is_some(),
                "frame {pa:#x} lost its direct-map entry"
            );
        }
        assert_consistent_over(m, frames, state, host);
    }

    fn tdx_world() -> TdxWorld {
        TdxWorld::new(TdxConfig::default(), Shape::Mixed)
    }

    fn snp_world() -> SnpWorld {
        SnpWorld::new(SnpConfig::default(), Shape::Mixed)
    }

    /// Two CPUs, each converting its range to shared and back.
    fn race(
        ranges: [(u64, u64); 2],
        convert: impl Fn(Target, Visibility) -> Result<Report, ConvertError> + Sync,
    ) -> Ledger {
        let ledger = Ledger::default();
        thread::scope(|s| {
            for (cpu, (start, count)) in ranges.into_iter().enumerate() {
                let (convert, ledger) = (&convert, &ledger);
                s.spawn(move || {
                    set_cpu(cpu);
                    there_and_back(convert, ledger, start, count);
                });
            }
        });
        ledger
    }

    /// Each of the two CPUs gets its GHCB, as at boot.
    fn boot_ghcbs(w: &SnpWorld, e: &SnpEngine<'_>) {
        for cpu in 0..2 {
            set_cpu(cpu);
            w.boot_ghcb(e, 1536 * MIB + cpu as u64 * PAGE);
        }
    }

    fn two_cpus_tdx(ranges: [(u64, u64); 2]) {
        let w = tdx_world();
        let e = w.engine();
        let ledger = race(ranges, |t, to| e.convert(t, to));
        e.release_deferred_tables();
        ledger.check(|pa| e.state(pa), (0..8).map(frame));
        region_whole(&w.m, &ledger);
        checked(&w.m, |pa| e.state(pa), |pa| w.host_side(pa));
        assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
    }

    fn two_cpus_snp(ranges: [(u64, u64); 2]) {
        let w = snp_world();
        let e = w.engine();
        boot_ghcbs(&w, &e);
        let ledger = race(ranges, |t, to| e.convert(t, to));
        e.release_deferred_tables();
        ledger.check(|pa| e.state(pa), (0..8).map(frame));
        region_whole(&w.m, &ledger);
        checked(&w.m, |pa| e.state(pa), |pa| w.host_side(pa));
        assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
    }

    #[test]
    fn overlapping_ranges_tdx() {
        explore(schedules(SCHEDULES), || two_cpus_tdx([(0, 3), (2, 3)]));
    }

    #[test]
    fn adjacent_ranges_tdx() {
        explore(schedules(SCHEDULES), || two_cpus_tdx([(0, 2), (2, 2)]));
    }

    #[test]
    fn overlapping_ranges_snp() {
        explore(schedules(SCHEDULES), || two_cpus_snp([(0, 3), (2, 3)]));
    }

    #[test]
    fn adjacent_ranges_snp() {
        explore(schedules(SCHEDULES), || two_cpus_snp([(0, 2), (2, 2)]));
    }

    /// A vmalloc-style buffer over frames 5, 3, 1 of the region, converted
    /// through the buffer, against its neighbours 0, 2, 6 and 7 converted
    /// through the direct map: the same direct-map leaf and table. (An OS
    /// converts a buffer's frames only through the buffer: the engine knows
    /// no other mapping of them.)
    #[test]
    fn a_vmalloc_buffer_against_its_frames_direct_map_tdx() {
        explore(schedules(SCHEDULES), || {
            let w = tdx_world();
            let e = w.engine();
            let buffer_frames = [frame(5), frame(3), frame(1)];
            let va = w.m.vmalloc(&buffer_frames);
            let ledger = Ledger::default();
            thread::scope(|s| {
                s.spawn(|| {
                    set_cpu(0);
                    for to in [Visibility::Shared, Visibility::Private] {
                        let target = Target::Virtual { va, len: 3 * PAGE };
                        ledger.record(e.convert(target, to), &buffer_frames);
                    }
                });
                s.spawn(|| {
                    set_cpu(1);
                    for (first, count) in [(0, 1), (2, 1), (6, 2)] {
                        there_and_back(|t, to| e.convert(t, to), &ledger, first, count);
                    }
                });
            });
            e.release_deferred_tables();
            ledger.check(|pa| e.state(pa), (0..8).map(frame));
            region_whole(&w.m, &ledger);
            checked(&w.m, |pa| e.state(pa), |pa| w.host_side(pa));
            assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
        });
    }

    /// The region mapped by one 2 MiB leaf at `ALIAS_VA` and registered as
    /// an alias: its id, the alias, and the physical address of its entry.
    fn region_alias(w: &TdxWorld, e: &TdxEngine<'_>) -> (usize, Alias, u64) {
        let builder = || w.m.builder();
        builder().map(
            ALIAS_VA,
            REGION,
            2 * MIB,
            Level::Pd,
            DIRECT_MAP_FLAGS,
            Visibility::Private,
        );
        let alias = Alias {
            va: ALIAS_VA,
            pa: REGION,
            len: 2 * MIB,
        };
        let id = e.register_alias(alias).unwrap();
        let entry = builder().table_at(ALIAS_VA, Level::Pd) + 8 * Level::Pd.index(ALIAS_VA) as u64;
        (id, alias, entry)
    }

    /// An alias of the region (one 2 MiB leaf) is removed while a
    /// conversion of two of its frames runs, and the OS reuses its entry as
    /// soon as the removal returns; meanwhile another alias comes and goes.
    /// No conversion may meet the alias mapping a converting frame (the
    /// TDX model checks every MapGPA and ACCEPT), the engine must never
    /// write the reused entry, and the table its split left in the alias
    /// must come back to the frame source.
    #[test]
    fn a_conversion_racing_alias_registration_and_removal_tdx() {
        explore(schedules(SCHEDULES), || {
            let w = tdx_world();
            let e = w.engine();
            let m = &w.m;
            let second = ALIAS_VA + 2 * MIB;
            m.builder().map(
                second,
                REGION + 2 * MIB,
                8 * PAGE,
                Level::Pt,
                DIRECT_MAP_FLAGS,
                Visibility::Private,
            );
            let (id, alias, entry) = region_alias(&w, &e);
            // What the OS writes once the alias is gone: not present, its
            // own software bits.
            const REUSED: u64 = 0x0BAD_0000_0000_0E00 & !PRESENT;
            let ledger = Ledger::default();
            thread::scope(|s| {
                s.spawn(|| {
                    set_cpu(0);
                    there_and_back(|t, to| e.convert(t, to), &ledger, 0, 2);
                });
                s.spawn(|| {
                    set_cpu(1);
                    let other = e
                        .register_alias(Alias {
                            va: second,
                            pa: REGION + 2 * MIB,
                            len: 8 * PAGE,
                        })
                        .unwrap();
                    assert_eq!(e.unregister_alias(id), Some(alias));
                    m.mem.write_u64(entry, REUSED);
                    e.unregister_alias(other).unwrap();
                });
            });
            e.release_deferred_tables();
            assert_eq!(
                m.mem.read_u64(entry),
                REUSED,
                "the engine wrote the alias entry after its removal"
            );
            ledger.check(|pa| e.state(pa), (0..8).map(frame));
            checked(m, |pa| e.state(pa), |pa| w.host_side(pa));
            assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
        });
    }

    /// Review 3: the alias scenario above has the OS reuse the removed
    /// alias's entry with a NOT PRESENT value, which the engine leaves alone
    /// whether or not `unregister_alias` waited for the conversions that
    /// copied the alias (they meet a hole and skip it): an unregister that
    /// does not wait survives it. Here the OS reuses the range at once as
    /// an OS would, with a present 2 MiB mapping of other memory; a
    /// conversion still writing through its copy of the alias splits or
    /// changes that mapping.
    #[test]
    fn a_removed_alias_reused_at_once_with_a_present_mapping_is_never_touched_tdx() {
        explore(schedules(SCHEDULES), || {
            let w = tdx_world();
            let e = w.engine();
            let m = &w.m;
            let (id, alias, entry) = region_alias(&w, &e);
            let ledger = Ledger::default();
            let reused = std::sync::OnceLock::new();
            thread::scope(|s| {
                s.spawn(|| {
                    set_cpu(0);
                    there_and_back(|t, to| e.convert(t, to), &ledger, 0, 2);
                });
                s.spawn(|| {
                    set_cpu(1);
                    assert_eq!(e.unregister_alias(id), Some(alias));
                    // The OS maps other memory there at once.
                    m.builder().map(
                        ALIAS_VA,
                        GIB + 200 * MIB,
                        2 * MIB,
                        Level::Pd,
                        DIRECT_MAP_FLAGS,
                        Visibility::Private,
                    );
                    reused.set(m.mem.read_u64(entry)).unwrap();
                });
            });
            e.release_deferred_tables();
            assert_eq!(
                m.mem.read_u64(entry),
                *reused.get().unwrap(),
                "the engine changed the OS's new mapping of the removed alias's range"
            );
            ledger.check(|pa| e.state(pa), (0..8).map(frame));
            checked(m, |pa| e.state(pa), |pa| w.host_side(pa));
            assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
        });
    }

    /// A collapse defers its table; another CPU releases deferred tables
    /// while conversions run.
    #[test]
    fn release_deferred_tables_racing_a_conversion_tdx() {
        explore(schedules(SCHEDULES), || {
            let w = tdx_world();
            let e = w.engine();
            let ledger = Ledger::default();
            thread::scope(|s| {
                s.spawn(|| {
                    set_cpu(0);
                    there_and_back(|t, to| e.convert(t, to), &ledger, 0, 1);
                    there_and_back(|t, to| e.convert(t, to), &ledger, 1, 1);
                });
                s.spawn(|| {
                    set_cpu(1);
                    for _ in 0..3 {
                        e.release_deferred_tables();
                    }
                });
            });
            e.release_deferred_tables();
            ledger.check(|pa| e.state(pa), (0..8).map(frame));
            region_whole(&w.m, &ledger);
            checked(&w.m, |pa| e.state(pa), |pa| w.host_side(pa));
        });
    }

    /// Two CPUs allocate shared buffers, all live at once, then free them;
    /// the pool keeps no empty chunk, so every emptied chunk goes back to
    /// private at once, racing the other CPU's allocations and frees.
    #[test]
    fn pool_allocations_and_frees_with_chunks_going_back_to_private_snp() {
        explore(schedules(SCHEDULES), || {
            let w = snp_world();
            let e = w.engine();
            boot_ghcbs(&w, &e);
            let chunks: Vec<u64> = (0..3).map(|i| REGION + 2 * MIB + i * CHUNK).collect();
            let pool = SharedPool::new(&e, ChunkStack::new(chunks.clone()), chunk_slots(3), 0);
            let live = Mutex::new(Vec::<(u64, u64)>::new());
            // Every buffer is live at once before any is freed.
            let allocated = shuttle::sync::Barrier::new(2);
            thread::scope(|s| {
                for cpu in 0..2u64 {
                    let (pool, live, e, allocated) = (&pool, &live, &e, &allocated);
                    s.spawn(move || {
                        set_cpu(cpu as usize);
                        let a = pool.alloc(PAGE * (1 + cpu)).unwrap();
                        let b = pool.alloc(PAGE).unwrap();
                        for buf in [a, b] {
                            assert_eq!(e.state(buf.pa), Some(PageState::Shared), "a buffer handed out shared");
                            let mut live = live.lock().unwrap();
                            assert!(
                                live.iter()
                                    .all(|&(pa, len)| buf.pa + buf.len <= pa || pa + len <= buf.pa),
                                "overlapping buffers"
                            );
                            live.push((buf.pa, buf.len));
                        }
                        allocated.wait();
                        for buf in [a, b] {
                            live.lock().unwrap().retain(|&(pa, _)| pa != buf.pa);
                            pool.free(buf).unwrap();
                        }
                    });
                }
            });
            let stats = pool.stats();
            assert_eq!((stats.chunks_held, stats.chunks_lost), (0, 0), "{stats:?}");
            assert_eq!(stats.chunks_shared, stats.chunks_returned, "{stats:?}");
            for &chunk in &chunks {
                assert_eq!(
                    e.state(chunk),
                    Some(PageState::Private),
                    "chunk {chunk:#x} back to private"
                );
            }
            e.release_deferred_tables();
            checked(&w.m, |pa| e.state(pa), |pa| w.host_side(pa));
            assert!(w.snp.violations().is_empty(), "{:?}", w.snp.violations());
        });
    }

    /// Two CPUs map buffers for a device, play the device (read the slot
    /// at the device address, answer into it) and unmap, twice each, over
    /// a pool of two slots that keeps no empty chunk: slots are handed out,
    /// chunks converted and returned while the other CPU maps. No two live
    /// slots overlap (each device reads its own buffer's bytes), every
    /// unmap brings back its own device's answer, and every chunk ends
    /// private.
    #[test]
    fn bounce_maps_and_unmaps_on_two_cpus_tdx() {
        explore(schedules(SCHEDULES), || {
            let w = tdx_world();
            let e = w.engine();
            let chunks: Vec<u64> = (0..2).map(|i| REGION + 2 * MIB + i * CHUNK).collect();
            let pool = SharedPool::new(&e, ChunkStack::new(chunks.clone()), chunk_slots(2), 0);
            let bounce = Bounce::new(&pool, SimAccess(w.m.mem.clone()), e.encryption());
            let shared_bit = w.tdx.shared_mask();
            thread::scope(|s| {
                for cpu in 0..2u8 {
                    let (bounce, mem) = (&bounce, &w.m.mem);
                    s.spawn(move || {
                        set_cpu(cpu as usize);
                        for round in 0..2u8 {
                            let len = (cpu as usize + 1) * PAGE as usize + 100;
                            let mark = cpu * 16 + round;
                            let mut buf = vec![mark; len];
                            let m = bounce.map(&mut buf, DmaDirection::Bidirectional).unwrap();
                            let slot = m.device_address() & !shared_bit;
                            assert_eq!(m.device_address() & shared_bit, shared_bit);
                            assert!(mem.is_filled(slot, len as u64, mark), "cpu {cpu}: another's bytes");
                            thread::yield_now();
                            mem.fill(slot, len as u64, !mark);
                            m.unmap();
                            assert!(buf.iter().all(|&b| b == !mark), "cpu {cpu}: another's answer");
                        }
                    });
                }
            });
            let stats = pool.stats();
            assert_eq!((stats.chunks_held, stats.chunks_lost), (0, 0), "{stats:?}");
            assert_eq!(stats.allocations, stats.frees, "{stats:?}");
            for &chunk in &chunks {
                assert_eq!(e.state(chunk), Some(PageState::Private), "chunk {chunk:#x}");
            }
            e.release_deferred_tables();
            checked(&w.m, |pa| e.state(pa), |pa| w.host_side(pa));
            assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
        });
    }
}
