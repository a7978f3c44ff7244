//! What can go wrong getting, using and giving back shared memory.

use core::fmt;

use super::SharedRange;
use crate::engine::ConvertError;

/// Why the pool could not serve or take back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// Zero bytes, or more than a chunk.
    BadSize(u64),
    /// No room in the chunks held, and the chunk source had no chunk.
    Exhausted,
    /// No room in the chunks held, and every slot holds a chunk (or one
    /// is converting into it): the pool is at the capacity the OS gave it.
    AtCapacity {
        /// The pool's slots.
        slots: usize,
    },
    /// Converting a new chunk failed. If the error changed nothing the
    /// chunk went back to the source; otherwise it is lost (poisoned).
    Convert(ConvertError),
    /// `free` of a range the pool did not hand out, or not exactly as it
    /// did, or already freed.
    NotAllocated(SharedRange),
    /// `free` of the range an [`OwnedShared`](super::OwnedShared) holds:
    /// it goes back when the handle does.
    Owned(SharedRange),
    /// The [`FrameAccess`](super::FrameAccess) given does not reach the
    /// range; it went back to the pool.
    Unreachable {
        /// Start.
        pa: u64,
        /// Bytes.
        len: u64,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PoolError::BadSize(bytes) => write!(f, "{bytes} bytes: a buffer is 1 byte to 2 MiB"),
            PoolError::Exhausted => f.write_str("no room in the pool and no chunk to be had"),
            PoolError::AtCapacity { slots } => write!(f, "no room in the pool, whose {slots} chunk slots are taken"),
            PoolError::Convert(e) => write!(f, "converting a new chunk: {e}"),
            PoolError::NotAllocated(r) => write!(f, "{:#x}+{:#x} is not a live allocation", r.pa, r.len),
            PoolError::Owned(r) => write!(f, "{:#x}+{:#x} is held by an owning handle", r.pa, r.len),
            PoolError::Unreachable { pa, len } => write!(f, "{pa:#x}+{len:#x} is not reached by the frame access"),
        }
    }
}

impl core::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PoolError::Convert(e) => Some(e),
            _ => None,
        }
    }
}

/// Why [`DirectShare::share`](super::DirectShare::share) did not make a
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShareError {
    /// The [`FrameAccess`](super::FrameAccess) does not reach the range:
    /// nothing was converted, the frames are still the caller's.
    Unreachable {
        /// Start.
        pa: u64,
        /// Bytes.
        len: u64,
    },
    /// The conversion to shared failed. If
    /// [`changed_nothing`](ConvertError::changed_nothing), the frames are
    /// still private and the caller's; otherwise some are poisoned and the
    /// caller must never use or free them ([`Engine::state`] tells which).
    ///
    /// [`Engine::state`]: crate::Engine::state
    Convert(ConvertError),
}

impl fmt::Display for ShareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ShareError::Unreachable { pa, len } => write!(f, "{pa:#x}+{len:#x} is not reached by the frame access"),
            ShareError::Convert(e) => write!(f, "converting to shared: {e}"),
        }
    }
}

impl core::error::Error for ShareError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ShareError::Convert(e) => Some(e),
            ShareError::Unreachable { .. } => None,
        }
    }
}

/// A buffer's frames could not be made private again. They are withheld:
/// never handed back as private memory. If
/// [`changed_nothing`](ConvertError::changed_nothing) they are still
/// shared and whole (the OS may convert them itself later); otherwise the
/// engine poisoned them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReleaseError {
    /// Start of the buffer.
    pub pa: u64,
    /// Bytes.
    pub len: u64,
    /// What the conversion said.
    pub error: ConvertError,
}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}+{:#x} could not be made private and is withheld: {}",
            self.pa, self.len, self.error
        )
    }
}

impl core::error::Error for ReleaseError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A byte access outside a shared buffer.
// Not `non_exhaustive`: an access is fully described by these three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBounds {
    /// Offset asked for.
    pub offset: usize,
    /// Bytes asked for.
    pub len: usize,
    /// The buffer's size.
    pub size: usize,
}

impl fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes at offset {} of a {}-byte buffer",
            self.len, self.offset, self.size
        )
    }
}

impl core::error::Error for OutOfBounds {}
