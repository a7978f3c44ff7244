//! The Page State Change NAE event (GHCB spec #56421 v2, "SNP Page State
//! Change", SW_EXITCODE 0x8000_0010).
//!
//! The request lives in the GHCB shared buffer: a header {cur_entry: u16,
//! end_entry: u16 (inclusive), reserved: u32} and up to 253 entries
//! {cur_page: 12, gfn: 40, operation: 4, page_size: 1, reserved: 7}. The
//! hypervisor works through the entries, advancing cur_entry (and cur_page
//! inside a 2 MiB entry), and may return before it is done; the guest exits
//! again until cur_entry passes end_entry.
//!
//! The buffer is shared, so everything in it after an exit is a claim by
//! the hypervisor. The guest keeps its own copy of the request and, after
//! every exit, takes one snapshot of the header and rejects: an error in
//! SW_EXITINFO2, reserved bits set, end_entry changed (raised, it would make
//! the guest process entries it never wrote; lowered, it would end the loop
//! early), cur_entry or cur_page moved backwards or past the end, an entry
//! not yet processed that differs from what the guest wrote, and more than
//! [`MAX_EXITS_WITHOUT_PROGRESS`] exits in a row that advance nothing. The
//! loop is therefore bounded whatever the hypervisor does.

use core::mem::MaybeUninit;

use crate::hypervisor::GhcbMsr;
use crate::layout::Field;
use crate::msr_protocol::PscOp;
use crate::page::{GhcbPage, NaeError, SHARED_BUFFER_QWORDS};
use crate::pvalidate::PageSize;

/// SW_EXITCODE of the Page State Change NAE event.
pub const PSC_EXIT_CODE: u64 = 0x8000_0010;

/// Entries that fit in the shared buffer after the header.
pub const MAX_ENTRIES: usize = SHARED_BUFFER_QWORDS - 1;

/// Consecutive exits without progress tolerated before giving up.
pub const MAX_EXITS_WITHOUT_PROGRESS: u32 = 3;

const CUR_PAGE_MASK: u64 = 0xFFF;
const GFN_MASK: u64 = 0xFF_FFFF_FFFF << 12;
const PAGE_SIZE_BIT: u64 = 1 << 56;

/// One PSC entry, in its ABI encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PscEntry(pub u64);

impl PscEntry {
    /// An entry for the page at `gfn` (2 MiB aligned if `size` is 2 MiB).
    pub const fn new(gfn: u64, op: PscOp, size: PageSize) -> Self {
        let size_bit = match size {
            PageSize::Size4K => 0,
            PageSize::Size2M => PAGE_SIZE_BIT,
        };
        PscEntry(((gfn << 12) & GFN_MASK) | ((op as u64) << 52) | size_bit)
    }

    /// The page the entry starts at.
    pub const fn gfn(self) -> u64 {
        (self.0 & GFN_MASK) >> 12
    }

    /// The 4 KiB pages of the entry already processed (2 MiB entries).
    pub const fn cur_page(self) -> u64 {
        self.0 & CUR_PAGE_MASK
    }

    /// The operation field, raw.
    pub const fn op_bits(self) -> u64 {
        (self.0 >> 52) & 0xF
    }

    /// The page size.
    pub const fn size(self) -> PageSize {
        if self.0 & PAGE_SIZE_BIT != 0 {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        }
    }

    /// Bits 63:57, reserved.
    pub const fn reserved(self) -> u64 {
        self.0 >> 57
    }

    /// Number of 4 KiB pages the entry covers.
    pub const fn pages(self) -> u64 {
        self.size().bytes() / 4096
    }
}

/// The header, as one quadword.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PscHeader {
    /// Next entry to process.
    pub cur_entry: u16,
    /// Last entry (inclusive).
    pub end_entry: u16,
    /// Must be zero.
    pub reserved: u32,
}

impl PscHeader {
    /// Decodes the quadword at the start of the shared buffer.
    pub const fn from_qword(q: u64) -> Self {
        PscHeader {
            cur_entry: q as u16,
            end_entry: (q >> 16) as u16,
            reserved: (q >> 32) as u32,
        }
    }

    /// Encodes it.
    pub const fn to_qword(self) -> u64 {
        self.cur_entry as u64 | (self.end_entry as u64) << 16 | (self.reserved as u64) << 32
    }
}

/// The guest's own copy of a request: at most [`MAX_ENTRIES`] entries.
///
/// Entries past `len` are left uninitialised: building a one-entry request
/// should not cost a 2 KiB clear.
pub struct PscDescriptor {
    entries: [MaybeUninit<PscEntry>; MAX_ENTRIES],
    len: usize,
}

impl Default for PscDescriptor {
    fn default() -> Self {
        PscDescriptor {
            entries: [const { MaybeUninit::uninit() }; MAX_ENTRIES],
            len: 0,
        }
    }
}

impl Clone for PscDescriptor {
    fn clone(&self) -> Self {
        let mut copy = PscDescriptor::default();
        for &e in self.entries() {
            copy.push(e);
        }
        copy
    }
}

impl core::fmt::Debug for PscDescriptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.entries()).finish()
    }
}

impl PscDescriptor {
    /// The entries.
    pub fn entries(&self) -> &[PscEntry] {
        // SAFETY: `push` initialises entries in order; the first `len` are
        // initialised, and `MaybeUninit<T>` has `T`'s layout.
        unsafe { core::slice::from_raw_parts(self.entries.as_ptr().cast::<PscEntry>(), self.len) }
    }

    /// Appends an entry; `false` when full.
    pub fn push(&mut self, entry: PscEntry) -> bool {
        if self.len == MAX_ENTRIES {
            return false;
        }
        self.entries[self.len] = MaybeUninit::new(entry);
        self.len += 1;
        true
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether no more entries fit.
    pub fn is_full(&self) -> bool {
        self.len == MAX_ENTRIES
    }

    /// Forgets every entry.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// The entries for a GPA range: one 2 MiB entry wherever `allow_2m`, the
/// address is 2 MiB aligned and the range covers the whole 2 MiB, 4 KiB
/// entries elsewhere.
#[derive(Clone, Debug)]
pub struct PscEntries {
    next: u64,
    end: u64,
    op: PscOp,
    allow_2m: bool,
}

impl PscEntries {
    /// Entries for `[gpa, gpa + len)`, both 4 KiB aligned (`None` if not,
    /// or if the range wraps).
    pub fn new(gpa: u64, len: u64, op: PscOp, allow_2m: bool) -> Option<Self> {
        let end = gpa.checked_add(len)?;
        if (gpa | len) & 0xFFF != 0 {
            return None;
        }
        Some(PscEntries {
            next: gpa,
            end,
            op,
            allow_2m,
        })
    }
}

impl Iterator for PscEntries {
    type Item = PscEntry;

    fn next(&mut self) -> Option<PscEntry> {
        if self.next >= self.end {
            return None;
        }
        let huge = PageSize::Size2M.bytes();
        let size = if self.allow_2m && self.next % huge == 0 && self.end - self.next >= huge {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        let entry = PscEntry::new(self.next >> 12, self.op, size);
        self.next += size.bytes();
        Some(entry)
    }
}

/// Splits a GPA range into descriptors of at most [`MAX_ENTRIES`] entries
/// (see [`PscEntries`] for the entry sizes).
#[derive(Clone, Debug)]
pub struct PscBatches {
    entries: core::iter::Peekable<PscEntries>,
}

impl PscBatches {
    /// Batches for `[gpa, gpa + len)`, both 4 KiB aligned (`None` if not, or
    /// if the range wraps).
    pub fn new(gpa: u64, len: u64, op: PscOp, allow_2m: bool) -> Option<Self> {
        Some(PscBatches {
            entries: PscEntries::new(gpa, len, op, allow_2m)?.peekable(),
        })
    }
}

impl Iterator for PscBatches {
    type Item = PscDescriptor;

    fn next(&mut self) -> Option<PscDescriptor> {
        let mut desc = PscDescriptor::default();
        while desc.len < MAX_ENTRIES {
            match self.entries.next() {
                Some(e) => desc.push(e),
                None => break,
            };
        }
        (!desc.is_empty()).then_some(desc)
    }
}

/// A page state change the hypervisor did not complete honestly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PscError {
    /// The range given to [`change_page_state`] is unaligned or wraps.
    InvalidRange,
    /// The NAE event itself failed.
    Nae(NaeError),
    /// SW_EXITINFO2 is non-zero after the exit.
    HostError {
        /// Its value.
        info2: u64,
    },
    /// The header's reserved field is non-zero.
    ReservedSet {
        /// The header snapshot.
        header: u64,
    },
    /// end_entry is not the one the guest wrote.
    EndEntryChanged {
        /// What the guest wrote.
        expected: u16,
        /// What the hypervisor left.
        found: u16,
    },
    /// cur_entry (or cur_page within it) went backwards.
    Backwards {
        /// (cur_entry, cur_page) before the exit.
        was: (u16, u64),
        /// After.
        now: (u16, u64),
    },
    /// cur_entry is beyond end_entry + 1, or cur_page beyond its entry.
    OutOfRange {
        /// (cur_entry, cur_page) after the exit.
        now: (u16, u64),
    },
    /// An entry not yet processed differs from what the guest wrote.
    EntryTampered {
        /// Its index.
        index: u16,
        /// The guest's entry.
        expected: u64,
        /// What the buffer holds.
        found: u64,
    },
    /// Too many exits in a row made no progress.
    Stalled {
        /// Where it stuck.
        at: (u16, u64),
    },
}

impl core::fmt::Display for PscError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PscError::InvalidRange => f.write_str("page state change range is unaligned or wraps"),
            PscError::Nae(e) => write!(f, "page state change exit failed: {e}"),
            PscError::HostError { info2 } => write!(f, "page state change failed (SW_EXITINFO2 {info2:#x})"),
            PscError::ReservedSet { header } => {
                write!(f, "the hypervisor set the PSC header's reserved field ({header:#x})")
            }
            PscError::EndEntryChanged { expected, found } => {
                write!(f, "the hypervisor changed end_entry from {expected} to {found}")
            }
            PscError::Backwards { was, now } => write!(f, "PSC progress went backwards from {was:?} to {now:?}"),
            PscError::OutOfRange { now } => write!(f, "PSC progress {now:?} lies beyond the descriptor"),
            PscError::EntryTampered { index, expected, found } => {
                write!(
                    f,
                    "PSC entry {index} changed from {expected:#x} to {found:#x} before it was processed"
                )
            }
            PscError::Stalled { at } => write!(f, "page state change made no progress at {at:?}"),
        }
    }
}

impl core::error::Error for PscError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PscError::Nae(e) => Some(e),
            _ => None,
        }
    }
}

/// Exits spent by a successful page state change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PscExits {
    /// VMGEXITs.
    pub exits: u64,
    /// Entries sent (each 4 KiB or 2 MiB).
    pub entries: u64,
}

/// Sends one descriptor and follows it to completion under the checks in
/// the module docs.
///
/// # Safety
///
/// As for [`GhcbMsr::vmgexit`]: the pages change state (contents lost to
/// the guest; pages made private must be validated before use).
pub unsafe fn submit<H: GhcbMsr + ?Sized>(
    ghcb: &mut GhcbPage,
    hv: &H,
    desc: &PscDescriptor,
) -> Result<PscExits, PscError> {
    let entries = desc.entries();
    if entries.is_empty() {
        return Ok(PscExits::default());
    }
    let end_entry = (entries.len() - 1) as u16;
    ghcb.set_shared_qword(
        0,
        PscHeader {
            cur_entry: 0,
            end_entry,
            reserved: 0,
        }
        .to_qword(),
    );
    for (i, e) in entries.iter().enumerate() {
        ghcb.set_shared_qword(1 + i, e.0);
    }
    let mut stats = PscExits {
        exits: 0,
        entries: entries.len() as u64,
    };
    let mut position = (0u16, 0u64);
    let mut exits_without_progress = 0;
    while position.0 <= end_entry {
        ghcb.invalidate();
        ghcb.set_field(Field::SwScratch, ghcb.shared_buffer_gpa());
        stats.exits += 1;
        // SAFETY: forwarded to the caller.
        unsafe { ghcb.nae_call(hv, PSC_EXIT_CODE, 0, 0) }.map_err(PscError::Nae)?;
        let info2 = ghcb.field(Field::SwExitInfo2);
        if info2 != 0 {
            return Err(PscError::HostError { info2 });
        }
        let now = check_progress(ghcb, entries, end_entry, position)?;
        if now == position {
            exits_without_progress += 1;
            if exits_without_progress > MAX_EXITS_WITHOUT_PROGRESS {
                return Err(PscError::Stalled { at: now });
            }
        } else {
            exits_without_progress = 0;
            position = now;
        }
    }
    Ok(stats)
}

/// Validates one snapshot of the header and the unprocessed entries;
/// returns the new (cur_entry, cur_page).
fn check_progress(
    ghcb: &GhcbPage,
    entries: &[PscEntry],
    end_entry: u16,
    was: (u16, u64),
) -> Result<(u16, u64), PscError> {
    let raw = ghcb.shared_qword(0);
    let header = PscHeader::from_qword(raw);
    if header.reserved != 0 {
        return Err(PscError::ReservedSet { header: raw });
    }
    if header.end_entry != end_entry {
        return Err(PscError::EndEntryChanged {
            expected: end_entry,
            found: header.end_entry,
        });
    }
    let cur = header.cur_entry;
    if cur > end_entry + 1 {
        return Err(PscError::OutOfRange { now: (cur, 0) });
    }
    let mut now = (cur, 0);
    for index in cur..=end_entry {
        let found = PscEntry(ghcb.shared_qword(1 + index as usize));
        let expected = entries[index as usize];
        let cur_page = found.cur_page();
        if PscEntry(found.0 & !CUR_PAGE_MASK) != expected || (index != cur && cur_page != 0) {
            return Err(PscError::EntryTampered {
                index,
                expected: expected.0,
                found: found.0,
            });
        }
        if index == cur {
            if cur_page >= expected.pages() {
                return Err(PscError::OutOfRange { now: (cur, cur_page) });
            }
            now.1 = cur_page;
        }
    }
    if now < was {
        return Err(PscError::Backwards { was, now });
    }
    Ok(now)
}

/// Changes the state of `[gpa, gpa + len)` through the GHCB: descriptors of
/// up to 253 entries, 2 MiB entries where `allow_2m` and aligned.
///
/// # Safety
///
/// As for [`submit`], for every page of the range.
pub unsafe fn change_page_state<H: GhcbMsr + ?Sized>(
    ghcb: &mut GhcbPage,
    hv: &H,
    gpa: u64,
    len: u64,
    op: PscOp,
    allow_2m: bool,
) -> Result<PscExits, PscError> {
    let mut total = PscExits::default();
    for desc in PscBatches::new(gpa, len, op, allow_2m).ok_or(PscError::InvalidRange)? {
        // SAFETY: forwarded to the caller.
        let done = unsafe { submit(ghcb, hv, &desc)? };
        total.exits += done.exits;
        total.entries += done.entries;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_fields_round_trip() {
        let e = PscEntry::new(0x12_3456_789A, PscOp::Shared, PageSize::Size2M);
        assert_eq!(e.0, (1 << 56) | (2 << 52) | (0x12_3456_789A << 12));
        assert_eq!(
            (e.gfn(), e.op_bits(), e.size(), e.cur_page(), e.reserved(), e.pages()),
            (0x12_3456_789A, 2, PageSize::Size2M, 0, 0, 512)
        );
        let small = PscEntry::new(7, PscOp::Private, PageSize::Size4K);
        assert_eq!((small.size(), small.pages(), small.op_bits()), (PageSize::Size4K, 1, 1));
    }

    #[test]
    fn header_round_trip() {
        let h = PscHeader {
            cur_entry: 3,
            end_entry: 252,
            reserved: 0,
        };
        assert_eq!(h.to_qword(), (252 << 16) | 3);
        assert_eq!(PscHeader::from_qword(h.to_qword()), h);
        assert_eq!(PscHeader::from_qword(1 << 32).reserved, 1);
    }

    #[test]
    fn descriptor_fills_the_shared_buffer_exactly() {
        assert_eq!(8 + MAX_ENTRIES * 8, crate::layout::SHARED_BUFFER_SIZE);
        let mut d = PscDescriptor::default();
        for i in 0..MAX_ENTRIES as u64 {
            assert!(d.push(PscEntry::new(i, PscOp::Private, PageSize::Size4K)));
        }
        assert!(!d.push(PscEntry::new(0, PscOp::Private, PageSize::Size4K)));
    }
}
