//! Random layouts and random sequences of conversions both ways, checked
//! after every operation against a plain reference model:
//! - every frame's engine state is what the reference says;
//! - every present mapping of every frame carries the attribute that
//!   matches the host's state of the frame;
//! - the table pages reachable from the root are exactly the ones taken
//!   from the frame source (no leak, no double use);
//! - no hypercall ever saw a present alias of its frames;
//! - converting everything back restores every original huge page.

use std::collections::BTreeSet;

use convert::{ConvertError, Engine, PageState, Platform, Target, Visibility};
use hvmock::{GuestPageTables, Mapping, RmpEntry, SnpConfig, TdxConfig, TdxPageState};
use integration::sim::{SimFrames, SimPhys, SimTlb, DIRECT_MAP_VA};
use integration::world::{Machine, Shape, SnpWorld, TdxWorld, CPUS, MEMORY};

/// What the property needs of a guest: its machine, and the host's view
/// of a frame (`None`: a state no mapping may show, like SNP
/// assigned-but-not-validated).
trait Guest {
    fn machine(&self) -> &Machine;
    fn host_side(&self, pa: u64) -> Option<Visibility>;
    fn violations(&self) -> usize;
}

impl Guest for TdxWorld {
    fn machine(&self) -> &Machine {
        &self.m
    }
    fn host_side(&self, pa: u64) -> Option<Visibility> {
        match self.tdx.page(pa).state {
            TdxPageState::Accepted => Some(Visibility::Private),
            TdxPageState::Shared => Some(Visibility::Shared),
            TdxPageState::Pending => None,
        }
    }
    fn violations(&self) -> usize {
        self.tdx.violations().len()
    }
}

impl Guest for SnpWorld {
    fn machine(&self) -> &Machine {
        &self.m
    }
    fn host_side(&self, pa: u64) -> Option<Visibility> {
        match self.snp.rmp(pa) {
            RmpEntry {
                assigned: true,
                validated: true,
                ..
            } => Some(Visibility::Private),
            RmpEntry {
                assigned: false,
                validated: false,
                ..
            } => Some(Visibility::Shared),
            _ => None,
        }
    }
    fn violations(&self) -> usize {
        self.snp.violations().len()
    }
}
use integration::{GIB, MIB};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Physical { page: u64, pages: u64, to_shared: bool },
    Vmalloc { buffer: usize, to_shared: bool },
}

fn op(buffers: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        // Pages around the 1 GiB boundary and inside both halves.
        (
            prop_oneof![
                0u64..4096,
                (GIB / 4096 - 600)..(GIB / 4096 + 600),
                (GIB / 4096)..(GIB / 4096 + 64 * 512)
            ],
            1u64..700,
            any::<bool>()
        )
            .prop_map(|(page, pages, to_shared)| Op::Physical { page, pages, to_shared }),
        (0..buffers, any::<bool>()).prop_map(|(buffer, to_shared)| Op::Vmalloc { buffer, to_shared }),
    ]
}

/// Frames for vmalloc buffers come from [1.5 GiB, 1.75 GiB), distinct.
fn buffers() -> impl Strategy<Value = Vec<Vec<u64>>> {
    prop::collection::vec(prop::collection::btree_set(0u64..65536, 1..150), 1..4).prop_map(|sets| {
        let mut used = BTreeSet::new();
        sets.into_iter()
            .map(|set| {
                set.into_iter()
                    .filter(|p| used.insert(*p))
                    .map(|p| 1536 * MIB + p * 4096)
                    .collect::<Vec<_>>()
            })
            .filter(|v| !v.is_empty())
            .collect()
    })
}

struct Reference {
    shared: BTreeSet<u64>,
}

impl Reference {
    fn side(&self, pa: u64) -> Visibility {
        if self.shared.contains(&pa) {
            Visibility::Shared
        } else {
            Visibility::Private
        }
    }
}

/// Table pages reachable from the root (pointer entries only), each once.
fn reachable_tables(w: &Machine) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![(w.root, 4u32)];
    seen.insert(w.root);
    while let Some((table, level)) = stack.pop() {
        for i in 0..512 {
            let e = w.mem.read_u64(table + i * 8);
            if e & 1 == 0 || level == 1 || (level < 4 && e & (1 << 7) != 0) {
                continue;
            }
            let next = e & 0x000F_FFFF_FFFF_F000 & !w.enc.mask();
            assert!(seen.insert(next), "table {next:#x} referenced twice");
            stack.push((next, level - 1));
        }
    }
    seen
}

type SimEngine<'w, P> = Engine<'w, &'w SimPhys, &'w SimFrames, &'w SimTlb, P>;

fn check<P: Platform>(w: &impl Guest, e: &SimEngine<'_, P>, reference: &Reference) -> Result<(), TestCaseError> {
    let m = w.machine();
    let tables = m.page_tables();
    for map in tables.mappings(&m.mem) {
        if map.va >= DIRECT_MAP_VA + MEMORY - 64 * MIB && map.va < DIRECT_MAP_VA + MEMORY {
            continue; // the page-table pages themselves
        }
        let side = m.enc.side_of(if map.enc_set { m.enc.mask() } else { 0 });
        for pa in (map.pa..map.pa + map.size).step_by(4096) {
            prop_assert_eq!(w.host_side(pa), Some(side), "mapping {:x?} of frame {:#x}", map, pa);
            prop_assert_eq!(reference.side(pa), side, "frame {:#x}", pa);
        }
    }
    for &pa in &reference.shared {
        prop_assert_eq!(e.state(pa), Some(PageState::Shared));
    }
    let census = e.census();
    prop_assert_eq!(census[1], reference.shared.len() as u64);
    prop_assert_eq!(census[2] + census[3], 0);
    e.release_deferred_tables();
    let reachable = reachable_tables(m);
    let in_use = m.frames.in_use_set();
    prop_assert_eq!(
        in_use.len(),
        reachable.len() + CPUS,
        "window PTs are the only unreachable tables in use"
    );
    prop_assert!(
        reachable.is_subset(&in_use),
        "a reachable table was never allocated (or was freed)"
    );
    prop_assert_eq!(w.violations(), 0);
    Ok(())
}

/// Every original leaf of at least 2 MiB maps the same memory with a leaf
/// at least as large, with the same attributes.
fn huge_layout_restored(original: &[Mapping], tables: GuestPageTables, w: &Machine) -> Result<(), TestCaseError> {
    for m in original.iter().filter(|m| m.size >= 2 * MIB) {
        let now = tables.translate(&w.mem, m.va).unwrap();
        prop_assert!(
            now.size >= m.size && now.pa == m.pa && now.enc_set == m.enc_set,
            "{:x?} is now {:x?}",
            m,
            now
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_conversions_keep_every_invariant_tdx(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..12),
    ) {
        let w = TdxWorld::new(TdxConfig { map_gpa_chunk_pages: Some(97), ..TdxConfig::default() }, Shape::Random(gib_page, small_mask));
        let e = w.engine();
        run(&w, &e, &buffers, ops)?;
    }

    #[test]
    fn random_conversions_keep_every_invariant_snp(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..10),
        per_exit in prop::option::of(1u64..700),
    ) {
        let w = SnpWorld::new(SnpConfig { psc_pages_per_exit: per_exit, ..SnpConfig::default() }, Shape::Random(gib_page, small_mask));
        let e = w.engine();
        run(&w, &e, &buffers, ops)?;
    }
}

fn run<P: Platform>(
    w: &impl Guest,
    e: &SimEngine<'_, P>,
    buffers: &[Vec<u64>],
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let m = w.machine();
    let vas: Vec<u64> = buffers.iter().map(|b| m.vmalloc(b)).collect();
    let tables = m.page_tables();
    let original = tables.mappings(&m.mem);
    let mut reference = Reference {
        shared: BTreeSet::new(),
    };
    for op in ops {
        let (frames, target, to) = match op {
            Op::Physical { page, pages, to_shared } => {
                let pa = page * 4096;
                let frames: Vec<u64> = (pa..pa + pages * 4096).step_by(4096).collect();
                (
                    frames,
                    Target::Physical { pa, len: pages * 4096 },
                    if to_shared {
                        Visibility::Shared
                    } else {
                        Visibility::Private
                    },
                )
            }
            Op::Vmalloc { buffer, to_shared } => {
                let Some(b) = buffers.get(buffer) else { continue };
                (
                    b.clone(),
                    Target::Virtual {
                        va: vas[buffer],
                        len: b.len() as u64 * 4096,
                    },
                    if to_shared {
                        Visibility::Shared
                    } else {
                        Visibility::Private
                    },
                )
            }
        };
        let result = e.convert(target, to);
        let all_from = frames.iter().all(|&f| reference.side(f) == to.other());
        if all_from {
            prop_assert!(result.is_ok(), "{:?} -> {:?}", target, result);
            for f in frames {
                match to {
                    Visibility::Shared => reference.shared.insert(f),
                    Visibility::Private => reference.shared.remove(&f),
                };
            }
        } else {
            prop_assert!(
                matches!(result, Err(ConvertError::Refused { converted: 0, .. })),
                "{:?} -> {:?}",
                target,
                result
            );
        }
        check(w, e, &reference)?;
    }
    // Everything back to private: the original huge layout returns.
    // Buffers go back through their vmalloc address: by physical address
    // the engine would not know their vmalloc mapping (an OS must convert
    // through it or register it as an alias).
    for (b, &va) in buffers.iter().zip(&vas) {
        if reference.shared.contains(&b[0]) {
            e.convert(
                Target::Virtual {
                    va,
                    len: b.len() as u64 * 4096,
                },
                Visibility::Private,
            )
            .unwrap();
            for f in b {
                reference.shared.remove(f);
            }
        }
    }
    let shared: Vec<u64> = reference.shared.iter().copied().collect();
    for pa in shared {
        e.convert(Target::Physical { pa, len: 4096 }, Visibility::Private)
            .unwrap();
        reference.shared.remove(&pa);
    }
    check(w, e, &reference)?;
    huge_layout_restored(&original, tables, m)
}
