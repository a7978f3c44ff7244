//! TDG.VP.VMCALL\<MapGPA\>: asking the VMM to move a GPA range between the
//! private and the shared space, with the GHCI's retry protocol.
//!
//! GHCI v1.5, "TDG.VP.VMCALL\<MapGPA\>": R12 = start GPA (the shared bit set
//! to request shared), R13 = size. The VMM may process part of the range
//! and answer `TDG.VP.VMCALL_RETRY` with R11 = the GPA to resume from. That
//! GPA is host-controlled, so before it is used it must:
//!
//! - carry the shared bit exactly as the request did (R11 is a GPA in the
//!   request's form; a guest that compares it against addresses stripped of
//!   the shared bit rejects an honest VMM or accepts a lying one);
//! - be page-aligned;
//! - lie in `[current, end)`: inside the request, and not behind the point
//!   already resumed from. Allowing it anywhere in `[start, end)` would let
//!   a VMM alternate between two addresses, "progress" every time, and keep
//!   the guest in the loop forever.
//!
//! A retry that resumes from the current GPA is progress-free; at most
//! [`MAX_RETRIES_WITHOUT_PROGRESS`] in a row are tolerated, and the count
//! restarts whenever the resume GPA advances. Every iteration either
//! advances by at least a page or spends one of those retries, so the loop
//! ends after at most `(pages + 1) * (MAX_RETRIES_WITHOUT_PROGRESS + 1)`
//! calls whatever the VMM does.

use crate::page::PAGE_SIZE;
use crate::regs::Tdcall;
use crate::status::TdxError;
use crate::vmcall::{subfunction, tdvmcall, VmcallStatus};

/// Consecutive RETRY answers without progress tolerated before giving up.
pub const MAX_RETRIES_WITHOUT_PROGRESS: u32 = 3;

/// Which side of memory a page is on: private (encrypted, integrity
/// protected, the guest's own) or shared with the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Encrypted, integrity-protected, the guest's own.
    Private,
    /// Visible to the host.
    Shared,
}

impl Visibility {
    /// The other side.
    pub const fn other(self) -> Visibility {
        match self {
            Visibility::Private => Visibility::Shared,
            Visibility::Shared => Visibility::Private,
        }
    }
}

/// A MapGPA that did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapGpaError {
    /// The request itself is malformed: empty, unaligned, overflowing, or
    /// reaching into the shared half of the GPA space. Nothing was sent.
    InvalidRange {
        /// Start of the requested range (without the shared bit).
        start: u64,
        /// Its length.
        len: u64,
    },
    /// `shared_mask` is not a single bit.
    InvalidSharedMask(u64),
    /// The TDCALL itself failed.
    Tdcall(TdxError),
    /// The VMM refused the request.
    Refused {
        /// What it answered.
        status: VmcallStatus,
        /// The GPA (in request form) the failed call started at.
        gpa: u64,
    },
    /// The resume GPA does not carry the shared bit as the request does.
    ResumeWrongForm {
        /// The VMM's R11.
        resume: u64,
    },
    /// The resume GPA is not page-aligned.
    ResumeUnaligned {
        /// The VMM's R11.
        resume: u64,
    },
    /// The resume GPA lies outside `[current, end)`.
    ResumeOutOfRange {
        /// The VMM's R11.
        resume: u64,
        /// Where the call started (request form).
        current: u64,
        /// End of the request (request form).
        end: u64,
    },
    /// The VMM answered RETRY without progress too many times in a row.
    NoProgress {
        /// The GPA it kept asking to resume from (request form).
        gpa: u64,
    },
}

impl core::fmt::Display for MapGpaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            MapGpaError::InvalidRange { start, len } => write!(
                f,
                "cannot map {start:#x}+{len:#x}: empty, unaligned, overflowing or in the shared half"
            ),
            MapGpaError::InvalidSharedMask(mask) => write!(f, "shared mask {mask:#x} is not a single bit"),
            MapGpaError::Tdcall(e) => write!(f, "MapGPA: {e}"),
            MapGpaError::Refused { status, gpa } => write!(f, "the VMM refused MapGPA at {gpa:#x}: {status}"),
            MapGpaError::ResumeWrongForm { resume } => {
                write!(f, "the VMM's resume address {resume:#x} lacks the request's shared bit")
            }
            MapGpaError::ResumeUnaligned { resume } => {
                write!(f, "the VMM's resume address {resume:#x} is not page-aligned")
            }
            MapGpaError::ResumeOutOfRange { resume, current, end } => {
                write!(
                    f,
                    "the VMM's resume address {resume:#x} lies outside [{current:#x}, {end:#x})"
                )
            }
            MapGpaError::NoProgress { gpa } => write!(f, "the VMM kept answering RETRY at {gpa:#x} without progress"),
        }
    }
}

impl core::error::Error for MapGpaError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            MapGpaError::Tdcall(e) => Some(e),
            _ => None,
        }
    }
}

/// Calls issued by a successful [`map_gpa`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapGpaCalls {
    /// TDG.VP.VMCALL\<MapGPA\> calls made.
    pub calls: u64,
}

/// Maps `[start, start + len)` (private-form GPAs) as `to`, following the
/// VMM's RETRY answers under the checks described in the module docs.
///
/// `shared_mask` is the shared bit, [`TdInfo::shared_mask`](crate::TdInfo::shared_mask).
///
/// `Ok` only means the VMM *said* it mapped the range. For `Private` the
/// guest must still ACCEPT every page, which fails if the VMM lied.
///
/// # Safety
///
/// Mapping to shared destroys the private contents of the range and makes
/// every private access to it fault; mapping to private makes every shared
/// access fault until the pages are accepted. No Rust code may use the
/// range in a way these changes break.
pub unsafe fn map_gpa<T: Tdcall + ?Sized>(
    tdcall: &T,
    start: u64,
    len: u64,
    to: Visibility,
    shared_mask: u64,
) -> Result<MapGpaCalls, MapGpaError> {
    if !shared_mask.is_power_of_two() {
        return Err(MapGpaError::InvalidSharedMask(shared_mask));
    }
    let invalid = MapGpaError::InvalidRange { start, len };
    let end = start.checked_add(len).ok_or(invalid)?;
    if len == 0 || (start | len) & (PAGE_SIZE - 1) != 0 || end > shared_mask {
        return Err(invalid);
    }
    let form = match to {
        Visibility::Shared => shared_mask,
        Visibility::Private => 0,
    };
    let mut current = start | form;
    // Not `end | form`: a range that ends exactly at the shared bit has
    // `end == shared_mask`, which the OR leaves below the shared-form start.
    // Only a shared bit at 63 can overflow here; its top range has no
    // request-form end to check resume GPAs against.
    let end = current.checked_add(len).ok_or(invalid)?;
    let mut retries_without_progress = 0;
    let mut calls = MapGpaCalls::default();
    loop {
        calls.calls += 1;
        // SAFETY: forwarded to the caller.
        let (status, regs) = unsafe { tdvmcall(tdcall, subfunction::MAP_GPA, [current, end - current, 0, 0]) }
            .map_err(MapGpaError::Tdcall)?;
        match status {
            VmcallStatus::Success => return Ok(calls),
            VmcallStatus::Retry => {}
            status => return Err(MapGpaError::Refused { status, gpa: current }),
        }
        let resume = regs.r11;
        if resume & shared_mask != form {
            return Err(MapGpaError::ResumeWrongForm { resume });
        }
        if resume & (PAGE_SIZE - 1) != 0 {
            return Err(MapGpaError::ResumeUnaligned { resume });
        }
        if resume < current || resume >= end {
            return Err(MapGpaError::ResumeOutOfRange { resume, current, end });
        }
        if resume == current {
            retries_without_progress += 1;
            if retries_without_progress > MAX_RETRIES_WITHOUT_PROGRESS {
                return Err(MapGpaError::NoProgress { gpa: current });
            }
        } else {
            log::trace!("MapGPA: VMM resumes at {resume:#x}");
            retries_without_progress = 0;
            current = resume;
        }
    }
}
