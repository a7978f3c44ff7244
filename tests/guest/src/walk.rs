//! The guest's own reading of its page tables, for the scenarios' checks:
//! what the MMU would translate, read the way the MMU reads it, through
//! the identity map where every table frame lies. It shares none of the
//! engine's walking code (only its vocabulary: levels, paging depth, what
//! the encryption bit means) and none of the host models' (which a real
//! host does not have), so the same checks run on both paths.

use coco_convert::bits::{HUGE, PRESENT};
use coco_convert::{Level, Paging, Visibility};

use crate::memory::{Tables, TABLE_FRAMES};

/// A present leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The leaf's first virtual address (or the address asked for, from
    /// [`translate`]).
    pub va: u64,
    /// The physical address `va` maps to.
    pub pa: u64,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// The side the entry's encryption bit selects.
    pub side: Visibility,
}

/// Bits 51:12 of an entry: the address field, encryption bit included.
const ADDRESS_FIELD: u64 = 0x000F_FFFF_FFFF_F000;

fn entries(table: u64) -> &'static [u64; 512] {
    // The engine's tables come from the early frame source, the boot's
    // from the same frames: anything else is a bug the check must report,
    // not follow.
    crate::scenarios::check(
        table >= TABLE_FRAMES.0 && table < TABLE_FRAMES.1 && table & 0xFFF == 0,
        "page walk: a table outside the page-table frames",
    );
    // SAFETY: the table frames are identity-mapped for the guest's
    // lifetime and 4 KiB aligned (checked above); entries are read whole.
    unsafe { &*(table as *const [u64; 512]) }
}

fn sign_extend(va: u64, paging: Paging) -> u64 {
    let unused = 64 - paging.va_bits();
    (((va << unused) as i64) >> unused) as u64
}

fn is_leaf(entry: u64, level: Level) -> bool {
    level == Level::Pt || (entry & HUGE != 0 && level.can_be_leaf())
}

fn leaf(t: &Tables, entry: u64, level: Level, va: u64) -> Leaf {
    let span = level.span();
    let base = entry & ADDRESS_FIELD & !t.enc.mask() & !(span - 1);
    Leaf {
        va,
        pa: base + (va & (span - 1)),
        size: span,
        side: t.enc.side_of(entry),
    }
}

/// The table a non-leaf entry points to. A TD's MMU reads a table whose
/// pointer carries the shared bit from the host's shared memory, so the
/// walk reports it rather than read the private frame; SEV-SNP reads page
/// tables private whatever the C-bit says, so the C-bit is dropped.
fn next_table(t: &Tables, entry: u64) -> u64 {
    crate::scenarios::check(
        !(t.enc.set_means() == Visibility::Shared && entry & t.enc.mask() != 0),
        "page walk: a table pointer through the TD's shared alias",
    );
    entry & ADDRESS_FIELD & !t.enc.mask()
}

/// The leaf that maps `va`, if the MMU would find one.
pub fn translate(t: &Tables, va: u64) -> Option<Leaf> {
    if !t.paging.is_canonical(va) {
        return None;
    }
    let mut table = t.root;
    let mut level = t.paging.top();
    loop {
        let entry = entries(table)[level.index(va)];
        if entry & PRESENT == 0 {
            return None;
        }
        if is_leaf(entry, level) {
            return Some(leaf(t, entry, level, va));
        }
        table = next_table(t, entry);
        level = level.lower()?;
    }
}

/// Calls `f` with every present leaf, in address order.
pub fn for_each_leaf(t: &Tables, f: &mut dyn FnMut(Leaf)) {
    visit(t, t.root, t.paging.top(), 0, f);
}

fn visit(t: &Tables, table: u64, level: Level, va_base: u64, f: &mut dyn FnMut(Leaf)) {
    for (i, &entry) in entries(table).iter().enumerate() {
        if entry & PRESENT == 0 {
            continue;
        }
        let va = va_base + i as u64 * level.span();
        if is_leaf(entry, level) {
            f(leaf(t, entry, level, sign_extend(va, t.paging)));
        } else if let Some(lower) = level.lower() {
            visit(t, next_table(t, entry), lower, va, f);
        }
    }
}
