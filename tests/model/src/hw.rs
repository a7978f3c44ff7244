//! The machine under the engine: one 2 MiB region of the direct map, a
//! 4 KiB alias of the same frames, the table pages a split may use, every
//! CPU's TLB and paging-structure cache, and the host's view of each frame.
//!
//! Three abstract 4 KiB frames stand for the region's 512: frame 0 is the
//! reader's own (never converted), frames 1 and 2 are converted. A table
//! page therefore holds one entry per abstract frame, and a collapse
//! happens when those three are present and alike.

/// Abstract frames in the region.
pub const FRAMES: usize = 3;
/// Every frame: the whole 2 MiB region (what a retired table's shootdown names).
pub const REGION: u8 = (1 << FRAMES) - 1;
/// The most CPUs a configuration may have.
pub const MAX_CPUS: usize = 3;

/// A frame set as a bit mask; iterate its members.
pub fn frames_of(mask: u8) -> impl Iterator<Item = usize> {
    (0..FRAMES).filter(move |f| mask & (1 << f) != 0)
}

/// The encryption attribute of a translation (TDX shared bit, SNP C-bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attr {
    Private,
    Shared,
}

/// A 4 KiB leaf. A leaf made not present keeps its attribute, as the
/// engine keeps everything but P.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pte {
    pub present: bool,
    pub attr: Attr,
}

impl Pte {
    pub const PRIVATE: Pte = Pte {
        present: true,
        attr: Attr::Private,
    };
}

/// The direct map's PD entry for the region. It is always present: the
/// region is never converted whole, so no 2 MiB leaf is made not present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pde {
    Huge(Attr),
    Table(u8),
}

/// Where a page of the table-page pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageUse {
    /// In the frame source.
    Free,
    /// In a conversion's reserve.
    Reserved,
    /// Pointed to by the live PDE.
    Table,
    /// Replaced by a collapse, waiting on the deferred list for a shootdown;
    /// its entries are kept, since a stale paging-structure cache entry may
    /// still lead a walk here.
    Retired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TablePage {
    pub usage: PageUse,
    /// Bumped at each free: a cached pointer of an older generation leads
    /// to a freed, or freed and reused, page.
    pub generation: u8,
    pub ptes: [Pte; FRAMES],
}

/// One CPU's translation caches for the region. Not-present entries are
/// never cached (x86 caches only present translations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tlb {
    /// A 2 MiB translation of the direct map (covers every frame).
    pub huge: Option<Attr>,
    /// 4 KiB translations of the direct map.
    pub direct: [Option<Attr>; FRAMES],
    /// 4 KiB translations of the alias.
    pub alias: [Option<Attr>; FRAMES],
    /// The paging-structure cache's PDE: (table page, its generation then).
    pub pde: Option<(u8, u8)>,
}

/// The host's view of a frame. One set of states serves both platforms:
/// TDX private-accepted / private-pending (mapped private in the secure
/// EPT, not accepted) / shared; SNP RMP assigned and validated / assigned
/// and not validated / not assigned (and not validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Private,
    Pending,
    Shared,
}

impl Host {
    /// The attribute a guest access must use, or `None` in transition
    /// (any access faults: TDX #VE on a pending page, SNP #VC/#NPF).
    pub fn usable(self) -> Option<Attr> {
        match self {
            Host::Private => Some(Attr::Private),
            Host::Shared => Some(Attr::Shared),
            Host::Pending => None,
        }
    }
}

/// Which linear mapping of the frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mapping {
    Direct,
    Alias,
}

/// How a CPU came by a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum How {
    /// A hit on the cached 2 MiB translation.
    HugeHit,
    /// A hit on a cached 4 KiB translation.
    Hit,
    /// A walk starting from the cached PDE pointer.
    WalkCachedPde,
    /// A walk from the live tables (after any cached entry was evicted).
    WalkLive,
}

/// What a translation yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Seen {
    Data(Attr),
    /// Not present: a #PF.
    Fault,
    /// The walk read a freed or reused table page.
    FreedTable,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hw {
    pub pde: Pde,
    pub pages: Vec<TablePage>,
    /// The alias's 4 KiB entries live in the OS's own table, which the
    /// engine never splits, collapses or frees.
    pub alias: [Pte; FRAMES],
    pub tlbs: Vec<Tlb>,
    pub host: [Host; FRAMES],
}

impl Hw {
    pub fn new(cpus: usize, table_pages: usize) -> Self {
        Hw {
            pde: Pde::Huge(Attr::Private),
            pages: vec![
                TablePage {
                    usage: PageUse::Free,
                    generation: 0,
                    ptes: [Pte::PRIVATE; FRAMES],
                };
                table_pages
            ],
            alias: [Pte::PRIVATE; FRAMES],
            tlbs: vec![Tlb::default(); cpus],
            host: [Host::Private; FRAMES],
        }
    }

    /// The live direct-map entry of `frame`: the huge leaf, or the entry in
    /// the table the PDE points to.
    pub fn direct_pte(&self, frame: usize) -> Pte {
        match self.pde {
            Pde::Huge(attr) => Pte { present: true, attr },
            Pde::Table(p) => self.pages[p as usize].ptes[frame],
        }
    }

    /// Every way CPU `cpu` may translate `frame` through `mapping` now,
    /// with its TLB afterwards. A cached translation may be used, or may
    /// have been evicted and the tables walked again; a cached PDE pointer
    /// likewise.
    pub fn translations(&self, cpu: usize, mapping: Mapping, frame: usize) -> Vec<(How, Seen, Tlb)> {
        let tlb = self.tlbs[cpu];
        let mut out = Vec::with_capacity(4);
        match mapping {
            Mapping::Direct => {
                if let Some(attr) = tlb.huge {
                    out.push((How::HugeHit, Seen::Data(attr), tlb));
                }
                if let Some(attr) = tlb.direct[frame] {
                    out.push((How::Hit, Seen::Data(attr), tlb));
                }
                if let Some((page, generation)) = tlb.pde {
                    let p = &self.pages[page as usize];
                    let live = p.generation == generation && matches!(p.usage, PageUse::Table | PageUse::Retired);
                    if !live {
                        out.push((How::WalkCachedPde, Seen::FreedTable, tlb));
                    } else {
                        out.push(leaf_walk(tlb, How::WalkCachedPde, frame, p.ptes[frame]));
                    }
                }
                match self.pde {
                    Pde::Huge(attr) => {
                        let mut t = tlb;
                        t.huge = Some(attr);
                        out.push((How::WalkLive, Seen::Data(attr), t));
                    }
                    Pde::Table(page) => {
                        let p = &self.pages[page as usize];
                        let mut t = tlb;
                        t.pde = Some((page, p.generation));
                        out.push(leaf_walk(t, How::WalkLive, frame, p.ptes[frame]));
                    }
                }
            }
            Mapping::Alias => {
                if let Some(attr) = tlb.alias[frame] {
                    out.push((How::Hit, Seen::Data(attr), tlb));
                }
                let pte = self.alias[frame];
                let mut t = tlb;
                if pte.present {
                    t.alias[frame] = Some(pte.attr);
                    out.push((How::WalkLive, Seen::Data(pte.attr), t));
                } else {
                    out.push((How::WalkLive, Seen::Fault, t));
                }
            }
        }
        out
    }

    /// What a shootdown's IPI does on one CPU: drop the translations of the
    /// named frames, and the cached PDE on the path to any of them.
    pub fn flush(&mut self, cpu: usize, direct: u8, alias: u8) {
        let tlb = &mut self.tlbs[cpu];
        if direct != 0 {
            tlb.huge = None;
            tlb.pde = None;
        }
        for f in frames_of(direct) {
            tlb.direct[f] = None;
        }
        for f in frames_of(alias) {
            tlb.alias[f] = None;
        }
    }
}

fn leaf_walk(mut tlb: Tlb, how: How, frame: usize, pte: Pte) -> (How, Seen, Tlb) {
    if pte.present {
        tlb.direct[frame] = Some(pte.attr);
        (how, Seen::Data(pte.attr), tlb)
    } else {
        (how, Seen::Fault, tlb)
    }
}
