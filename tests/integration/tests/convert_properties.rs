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

use convert::{ConvertError, PageState, Target, Visibility};
use hvmock::{GuestPageTables, Mapping, TdxConfig, TdxPageState};
use integration::sim::DIRECT_MAP_VA;
use integration::world::{Shape, TdxWorld, CPUS};
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
fn reachable_tables(w: &TdxWorld) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![(w.m.root, 4u32)];
    seen.insert(w.m.root);
    while let Some((table, level)) = stack.pop() {
        for i in 0..512 {
            let e = w.m.mem.read_u64(table + i * 8);
            if e & 1 == 0 || level == 1 || (level < 4 && e & (1 << 7) != 0) {
                continue;
            }
            let next = e & 0x000F_FFFF_FFFF_F000 & !w.m.enc.mask();
            assert!(seen.insert(next), "table {next:#x} referenced twice");
            stack.push((next, level - 1));
        }
    }
    seen
}

fn check(w: &TdxWorld, e: &integration::world::TdxEngine<'_>, reference: &Reference) -> Result<(), TestCaseError> {
    let tables = GuestPageTables {
        cr3: w.m.root,
        enc_mask: w.m.enc.mask(),
    };
    for m in tables.mappings(&w.m.mem) {
        if m.va >= DIRECT_MAP_VA + 2 * GIB - 64 * MIB && m.va < DIRECT_MAP_VA + 2 * GIB {
            continue; // the page-table pages themselves
        }
        let side = if m.enc_set {
            Visibility::Shared
        } else {
            Visibility::Private
        };
        for pa in (m.pa..m.pa + m.size).step_by(4096) {
            let host = w.tdx.page(pa).state;
            let expected_host = match side {
                Visibility::Shared => TdxPageState::Shared,
                Visibility::Private => TdxPageState::Accepted,
            };
            prop_assert_eq!(
                host,
                expected_host,
                "mapping {:x?} of frame {:#x}: engine {:?}, reference {:?}, tdx {:?}",
                m,
                pa,
                e.state(pa),
                reference.side(pa),
                w.tdx.page(pa)
            );
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
    let reachable = reachable_tables(w);
    let in_use = w.m.frames.in_use_set();
    prop_assert_eq!(
        in_use.len(),
        reachable.len() + CPUS,
        "window PTs are the only unreachable tables in use"
    );
    prop_assert!(
        reachable.is_subset(&in_use),
        "a reachable table was never allocated (or was freed)"
    );
    prop_assert!(w.tdx.violations().is_empty(), "{:?}", w.tdx.violations());
    Ok(())
}

/// Every original leaf of at least 2 MiB maps the same memory with a leaf
/// at least as large, with the same attributes.
fn huge_layout_restored(original: &[Mapping], tables: GuestPageTables, w: &TdxWorld) -> Result<(), TestCaseError> {
    for m in original.iter().filter(|m| m.size >= 2 * MIB) {
        let now = tables.translate(&w.m.mem, m.va).unwrap();
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
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_conversions_keep_every_invariant(
        gib_page in any::<bool>(),
        small_mask in any::<u64>(),
        buffers in buffers(),
        ops in prop::collection::vec(op(3), 1..12),
    ) {
        let w = TdxWorld::new(TdxConfig { map_gpa_chunk_pages: Some(97), ..TdxConfig::default() }, Shape::Random(gib_page, small_mask));
        let vas: Vec<u64> = buffers.iter().map(|b| w.m.vmalloc(b)).collect();
        let tables = GuestPageTables { cr3: w.m.root, enc_mask: w.m.enc.mask() };
        let original = tables.mappings(&w.m.mem);
        let e = w.engine();
        let mut reference = Reference { shared: BTreeSet::new() };
        for op in ops {
            let (frames, target, to) = match op {
                Op::Physical { page, pages, to_shared } => {
                    let pa = page * 4096;
                    let frames: Vec<u64> = (pa..pa + pages * 4096).step_by(4096).collect();
                    (frames, Target::Physical { pa, len: pages * 4096 }, if to_shared { Visibility::Shared } else { Visibility::Private })
                }
                Op::Vmalloc { buffer, to_shared } => {
                    let Some(b) = buffers.get(buffer) else { continue };
                    (b.clone(), Target::Virtual { va: vas[buffer], len: b.len() as u64 * 4096 }, if to_shared { Visibility::Shared } else { Visibility::Private })
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
                prop_assert!(matches!(result, Err(ConvertError::Refused { converted: 0, .. })), "{:?} -> {:?}", target, result);
            }
            check(&w, &e, &reference)?;
        }
        // Everything back to private: the original huge layout returns.
        // Buffers go back through their vmalloc address: by physical
        // address the engine would not know their vmalloc mapping (an OS
        // must convert through it or register it as an alias).
        for (b, &va) in buffers.iter().zip(&vas) {
            if reference.shared.contains(&b[0]) {
                e.convert(Target::Virtual { va, len: b.len() as u64 * 4096 }, Visibility::Private).unwrap();
                for f in b {
                    reference.shared.remove(f);
                }
            }
        }
        let shared: Vec<u64> = reference.shared.iter().copied().collect();
        for pa in shared {
            e.convert(Target::Physical { pa, len: 4096 }, Visibility::Private).unwrap();
            reference.shared.remove(&pa);
        }
        check(&w, &e, &reference)?;
        huge_layout_restored(&original, tables, &w)?;
    }
}
