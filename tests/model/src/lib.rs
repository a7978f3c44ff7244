//! An exhaustive model of the conversion transaction (`coco_convert`'s
//! `Engine::transaction`), checked with `stateright`: the page tables and
//! every CPU's TLB and paging-structure cache, the host's view of each
//! frame (TDX or SEV-SNP), a `load_unaligned_zeropad` reader, two threads
//! converting at once, and a host that may fail any call.
//!
//! See `README.md` beside this crate for how each step maps to the engine,
//! the bounds, and what is not modelled.

pub mod engine;
pub mod hw;
pub mod invariants;
pub mod mutants;
pub mod reader;
pub mod trace;

use stateright::{Model, Property};

pub use engine::{Byte, Conv, HostCall, Op, Outcome, Phase, Step};
use hw::{frames_of, Attr, How, Hw, Mapping, Seen, Tlb, FRAMES};
pub use mutants::Mutant;
use reader::{Half, Reader};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    Tdx,
    Snp,
}

/// What is checked: the platform, an optional mutant, and the bounds.
#[derive(Clone, Debug)]
pub struct Config {
    pub platform: Platform,
    pub mutant: Option<Mutant>,
    /// Thread `k` runs on CPU `k`; the reader runs on the last CPU.
    pub cpus: usize,
    pub programs: Vec<Vec<Op>>,
    /// Pages in the frame source, for splits.
    pub table_pages: usize,
    /// The host may fail any call (besides the failures the calls' own
    /// rules give).
    pub host_failures: bool,
    /// CPUs (a mask) whose hardware may walk and fill its caches at any
    /// time, as prefetching and speculation do.
    pub speculate: u8,
    /// The reader's load starts in this frame and runs into the next.
    pub reader_frame: usize,
}

impl Config {
    /// Thread A converts frame 1 to shared and back, then releases the
    /// deferred tables; thread B converts frame 2 to shared. Disjoint
    /// frames, so both run at once; one table page, so a collapse's page is
    /// reused by B's split once released.
    pub fn adjacent(platform: Platform) -> Config {
        Config {
            platform,
            mutant: None,
            cpus: 3,
            programs: vec![
                vec![
                    Op::Convert {
                        frames: 0b010,
                        to: Attr::Shared,
                    },
                    Op::Convert {
                        frames: 0b010,
                        to: Attr::Private,
                    },
                    Op::ReleaseDeferred,
                ],
                vec![Op::Convert {
                    frames: 0b100,
                    to: Attr::Shared,
                }],
            ],
            table_pages: 1,
            host_failures: true,
            speculate: 0b100,
            reader_frame: 0,
        }
    }

    /// Thread A converts frame 1 to shared and back; thread B converts
    /// frames 1 and 2 (one run) to shared: the two race for frame 1's claim.
    pub fn overlapping(platform: Platform) -> Config {
        Config {
            programs: vec![
                vec![
                    Op::Convert {
                        frames: 0b010,
                        to: Attr::Shared,
                    },
                    Op::Convert {
                        frames: 0b010,
                        to: Attr::Private,
                    },
                ],
                vec![Op::Convert {
                    frames: 0b110,
                    to: Attr::Shared,
                }],
            ],
            table_pages: 2,
            ..Config::adjacent(platform)
        }
    }

    pub fn with_mutant(self, mutant: Mutant) -> Config {
        Config {
            mutant: Some(mutant),
            ..self
        }
    }

    /// `cpus` CPUs, the reader's (the last) the one that speculates.
    pub fn with_cpus(self, cpus: usize) -> Config {
        Config {
            cpus,
            speculate: 1 << (cpus - 1),
            ..self
        }
    }

    pub fn reader_cpu(&self) -> usize {
        self.cpus - 1
    }
}

/// Bad events, recorded in the state when they happen so the invariants
/// see them in every later state.
#[derive(Clone, Copy, Debug)]
pub struct Violation;

impl Violation {
    /// An access through a translation whose attribute disagrees with the
    /// host, or to a frame in transition or poisoned.
    pub const ACCESS: u8 = 1;
    /// PVALIDATE through a translation that is not private.
    pub const PVALIDATE_PUBLIC: u8 = 2;
    /// A walk (hardware or the engine's) through a freed or reused table.
    pub const WALK_FREED: u8 = 4;
    /// A translation of a poisoned frame cached.
    pub const POISON_FILL: u8 = 8;
    /// A split with no page reserved for it.
    pub const SPLIT_UNRESERVED: u8 = 16;
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub hw: Hw,
    pub bytes: [Byte; FRAMES],
    /// The table lock's holder.
    pub lock: Option<u8>,
    /// Pages on the deferred list (the table lock's contents).
    pub deferred: u8,
    pub convs: Vec<Conv>,
    pub reader: Reader,
    pub violations: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A step of thread `thread` (on CPU `thread`).
    Step { thread: u8, step: Step },
    /// CPU `cpu` acknowledges thread `thread`'s shootdown.
    Ack { thread: u8, cpu: u8 },
    /// The reader translates and reads one half of its load.
    Read { half: Half, via: Mapping, how: How },
    /// A CPU's hardware walks and fills its caches on its own.
    Speculate { cpu: u8, via: Mapping, frame: u8, how: How },
}

/// Whether reading `frame` through a translation with `attr` is sound.
pub fn access_ok(s: &State, frame: usize, attr: Attr) -> bool {
    s.bytes[frame] != Byte::Poisoned && s.hw.host[frame].usable() == Some(attr)
}

/// Installs a CPU's TLB after a walk, noting any translation of a poisoned
/// frame it newly caches.
pub fn fill(s: &mut State, cpu: usize, tlb: Tlb) {
    let old = s.hw.tlbs[cpu];
    let poisoned = |f: usize| s.bytes[f] == Byte::Poisoned;
    let new_huge = tlb.huge.is_some() && old.huge != tlb.huge && (0..FRAMES).any(poisoned);
    let new_4k = (0..FRAMES).any(|f| {
        poisoned(f)
            && ((tlb.direct[f].is_some() && tlb.direct[f] != old.direct[f])
                || (tlb.alias[f].is_some() && tlb.alias[f] != old.alias[f]))
    });
    if new_huge || new_4k {
        s.violations |= Violation::POISON_FILL;
    }
    s.hw.tlbs[cpu] = tlb;
}

/// The model: a [`Config`] to check.
#[derive(Clone, Debug)]
pub struct ConversionModel {
    pub cfg: Config,
}

impl ConversionModel {
    pub fn new(cfg: Config) -> Self {
        assert!(cfg.cpus >= 2 && cfg.cpus <= hw::MAX_CPUS && cfg.programs.len() <= cfg.cpus);
        assert!(cfg.reader_frame + 1 < FRAMES);
        for ops in &cfg.programs {
            for op in ops {
                if let Op::Convert { frames, .. } = op {
                    // A conversion of the whole region would keep its huge
                    // leaf: not modelled.
                    assert!(frames & (1 << cfg.reader_frame) == 0 && *frames != hw::REGION);
                }
            }
        }
        ConversionModel { cfg }
    }

    fn speculations(&self, s: &State, out: &mut Vec<Action>) {
        for cpu in 0..self.cfg.cpus {
            if self.cfg.speculate & (1 << cpu) == 0 {
                continue;
            }
            for via in [Mapping::Direct, Mapping::Alias] {
                for frame in 0..FRAMES {
                    for (how, seen, tlb) in s.hw.translations(cpu, via, frame) {
                        let walk = matches!(how, How::WalkLive | How::WalkCachedPde);
                        if walk && (seen == Seen::FreedTable || tlb != s.hw.tlbs[cpu]) {
                            out.push(Action::Speculate {
                                cpu: cpu as u8,
                                via,
                                frame: frame as u8,
                                how,
                            });
                        }
                    }
                }
            }
        }
    }
}

impl Model for ConversionModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            hw: Hw::new(self.cfg.cpus, self.cfg.table_pages),
            bytes: [Byte::Private; FRAMES],
            lock: None,
            deferred: 0,
            convs: self
                .cfg
                .programs
                .iter()
                .map(|ops| Conv {
                    phase: if ops.is_empty() { Phase::Finished } else { Phase::Idle },
                    ..Conv::new()
                })
                .collect(),
            reader: Reader::Idle,
            violations: 0,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        let mut steps = Vec::new();
        for k in 0..s.convs.len() {
            steps.clear();
            engine::steps(&self.cfg, s, k, &mut steps);
            out.extend(steps.iter().map(|&step| Action::Step { thread: k as u8, step }));
            if s.convs[k].phase == Phase::Shootdown {
                for cpu in 0..self.cfg.cpus {
                    if s.convs[k].acks & (1 << cpu) != 0 {
                        out.push(Action::Ack {
                            thread: k as u8,
                            cpu: cpu as u8,
                        });
                    }
                }
            }
        }
        let mut reads = Vec::new();
        reader::reads(&self.cfg, s, &mut reads);
        out.extend(
            reads
                .into_iter()
                .map(|(half, via, how)| Action::Read { half, via, how }),
        );
        self.speculations(s, out);
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Step { thread, step } => engine::apply(&self.cfg, &mut s, thread as usize, step),
            Action::Ack { thread, cpu } => engine::ack(&self.cfg, &mut s, thread as usize, cpu as usize),
            Action::Read { half, via, how } => reader::read(&self.cfg, &mut s, half, via, how),
            Action::Speculate { cpu, via, frame, how } => {
                let (_, seen, tlb) =
                    s.hw.translations(cpu as usize, via, frame as usize)
                        .into_iter()
                        .find(|(h, _, _)| *h == how)
                        .expect("an enabled walk");
                if seen == Seen::FreedTable {
                    s.violations |= Violation::WALK_FREED;
                } else {
                    fill(&mut s, cpu as usize, tlb);
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        invariants::properties()
    }
}

/// Frames some thread has claimed.
pub fn claimed(s: &State) -> u8 {
    frames_of(hw::REGION)
        .filter(|&f| matches!(s.bytes[f], Byte::Claimed(_)))
        .fold(0, |m, f| m | 1 << f)
}
