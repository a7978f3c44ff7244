//! What a conversion reports.

use crate::platform::PlatformError;
use crate::state::PageState;

/// A successful conversion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Distinct 4 KiB frames converted (a frame mapped twice counts once).
    pub frames: u64,
}

/// Why a conversion did not happen, or did not complete.
///
/// Every variant but [`Platform`](Self::Platform) means nothing changed:
/// every page-table entry and every frame's state is as before the call
/// ([`changed_nothing`](Self::changed_nothing)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConvertError {
    /// Empty, unaligned or wrapping range (an empty frame list is one of
    /// length 0 at 0); a virtual range that is not
    /// canonical (bits 63..47 all equal with 4-level paging, bits 63..56
    /// with 5-level paging) from its first byte to its last, or that
    /// overlaps the direct map or a registered alias without lying inside
    /// it.
    InvalidRange {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The frame at `index` of a frame list is not 4 KiB aligned, not
    /// above the frame before it (a list is strictly ascending: sorted, no
    /// frame twice), or the last page of the address space.
    InvalidFrame {
        /// Its position in the list.
        index: usize,
        /// The address found there.
        pa: u64,
    },
    /// A page of a vmalloc-style range is not mapped (or is being converted
    /// through another mapping of its frame right now).
    NotMapped {
        /// The page.
        va: u64,
    },
    /// A frame is outside the state table.
    UnknownFrame {
        /// The first such frame.
        pa: u64,
    },
    /// A frame is not in the state the conversion starts from: already
    /// converted, converting now, poisoned, or one of the engine's
    /// page-table pages.
    Refused {
        /// The frame.
        pa: u64,
        /// Its state.
        state: PageState,
    },
    /// The frame list, or the scratch of a vmalloc-style range, lies in a
    /// frame that is not private: one this conversion converts (it would be
    /// unmapped while the engine still reads it), one shared with the host
    /// (which could rewrite it between the engine's passes), or one another
    /// conversion has in flight. Nothing was changed.
    CallerMemoryNotPrivate {
        /// The frame the list or scratch lies in.
        pa: u64,
        /// Its state (`Converting` for one of this conversion's frames).
        state: PageState,
    },
    /// The frame source could not supply the table pages the splits need.
    OutOfTableMemory {
        /// Pages needed.
        needed: usize,
    },
    /// The frame source handed out a frame that is not private or that the
    /// state table does not cover; it was given back.
    UnusableTableFrame {
        /// The frame.
        pa: u64,
    },
    /// The platform must map frames privately while they convert (SNP
    /// PVALIDATE) and the engine has no usable scratch window on this CPU.
    NoScratchWindow,
    /// Conversions are stopped for good:
    /// [`Engine::unshare_all`](crate::Engine::unshare_all) has begun.
    Stopped,
    /// The firmware or host failed. The frames it was asked about are
    /// poisoned: their mappings stay not present and they are never handed
    /// back. Frames converted before the failure are converted and mapped
    /// with the new attribute; the rest are as before. [`Engine::state`]
    /// tells which frame is which.
    ///
    /// [`Engine::state`]: crate::Engine::state
    Platform {
        /// What failed.
        error: PlatformError,
        /// The first poisoned frame.
        pa: u64,
        /// Frames poisoned.
        poisoned: u64,
        /// Frames converted before the failure.
        converted: u64,
    },
}

impl ConvertError {
    /// Whether the error guarantees that nothing changed: every page-table
    /// entry and every frame's state is as before the call.
    pub fn changed_nothing(&self) -> bool {
        !matches!(self, ConvertError::Platform { .. })
    }
}

impl core::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ConvertError::InvalidRange { addr, len } => write!(f, "invalid range {addr:#x}+{len:#x}"),
            ConvertError::InvalidFrame { index, pa } => {
                write!(f, "frame {index} of the list, {pa:#x}, is unaligned or out of order")
            }
            ConvertError::NotMapped { va } => write!(f, "{va:#x} is not mapped"),
            ConvertError::UnknownFrame { pa } => write!(f, "frame {pa:#x} is outside the state table"),
            ConvertError::Refused { pa, state } => write!(f, "frame {pa:#x} is {state:?}"),
            ConvertError::CallerMemoryNotPrivate { pa, state } => {
                write!(
                    f,
                    "the frame list or scratch lies in frame {pa:#x}, which is {state:?}, not private"
                )
            }
            ConvertError::OutOfTableMemory { needed } => write!(f, "{needed} page-table pages could not be had"),
            ConvertError::UnusableTableFrame { pa } => {
                write!(f, "the frame source handed out {pa:#x}, which is not private")
            }
            ConvertError::NoScratchWindow => f.write_str("no usable scratch window on this CPU"),
            ConvertError::Stopped => f.write_str("conversions are stopped: everything is being made private"),
            ConvertError::Platform {
                error,
                pa,
                poisoned,
                converted,
            } => write!(
                f,
                "{error} at frame {pa:#x}: {poisoned} frames poisoned, {converted} converted"
            ),
        }
    }
}

impl core::error::Error for ConvertError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ConvertError::Platform { error, .. } => Some(error),
            _ => None,
        }
    }
}
