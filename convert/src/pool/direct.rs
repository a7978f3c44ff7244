//! Owned shared buffers made by converting the OS's own private memory,
//! for buffers too large or too long-lived for the pool (a ring the host
//! reads for the life of a device).

use core::sync::atomic::Ordering;

use super::owned::Home;
use super::{Convert, FrameAccess, OwnedShared, ReleaseError, ShareError, SharedRange};
use crate::engine::{ConvertError, Target};
use crate::pte::Visibility;
use crate::sync::AtomicU64;

/// Where the frames of a [`DirectShare`] buffer go when it is given back.
/// Called on the CPU that drops or releases the buffer, with no lock of
/// the engine's or this crate's held.
pub trait Reclaim {
    /// The frames are private again: the OS's to reuse.
    fn reclaimed(&self, pa: u64, len: u64);
    /// The frames could not be made private and are withheld: the OS must
    /// never reuse them as private memory. If `error`
    /// [changed nothing](ConvertError::changed_nothing) they are still
    /// shared and whole, and the OS may try
    /// [`Engine::convert`](crate::Engine::convert) to private again later;
    /// otherwise the engine poisoned them.
    fn lost(&self, pa: u64, len: u64, error: ConvertError);
}

impl<R: Reclaim + ?Sized> Reclaim for &R {
    fn reclaimed(&self, pa: u64, len: u64) {
        (**self).reclaimed(pa, len)
    }
    fn lost(&self, pa: u64, len: u64, error: ConvertError) {
        (**self).lost(pa, len, error)
    }
}

/// What a [`DirectShare`] has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectStats {
    /// Buffers made.
    pub shared: u64,
    /// Buffers made private again and reclaimed.
    pub returned: u64,
    /// Buffers whose frames could not be made private (withheld).
    pub lost: u64,
}

/// Makes owned shared buffers of the OS's private memory: converted to
/// shared by [`share`](Self::share), back to private when the buffer is
/// dropped or released, then handed to the OS's [`Reclaim`].
pub struct DirectShare<C: Convert, A: FrameAccess, R: Reclaim> {
    converter: C,
    access: A,
    reclaim: R,
    shared: AtomicU64,
    returned: AtomicU64,
    lost: AtomicU64,
}

impl<C: Convert, A: FrameAccess, R: Reclaim> core::fmt::Debug for DirectShare<C, A, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DirectShare")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<C: Convert, A: FrameAccess, R: Reclaim> DirectShare<C, A, R> {
    /// Converting through `converter`, reaching bytes through `access`,
    /// giving frames back to `reclaim`.
    pub fn new(converter: C, access: A, reclaim: R) -> Self {
        DirectShare {
            converter,
            access,
            reclaim,
            shared: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// What it has done.
    pub fn stats(&self) -> DirectStats {
        DirectStats {
            shared: self.shared.load(Ordering::Relaxed),
            returned: self.returned.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    /// Converts the private frames `[pa, pa + len)` (4 KiB aligned) to
    /// shared and hands them out as one buffer. On an error the frames are
    /// the caller's again, except those [`ShareError::Convert`] says were
    /// poisoned.
    ///
    /// # Safety
    ///
    /// The frames are the caller's to give, used by nothing else (no
    /// reference, no device) from now until [`Reclaim::reclaimed`] hands
    /// them back: the buffer gives safe code their bytes.
    pub unsafe fn share(&self, pa: u64, len: u64) -> Result<OwnedShared<'_>, ShareError>
    where
        Self: Sync,
    {
        let ptr = self.access.bytes(pa, len).ok_or(ShareError::Unreachable { pa, len })?;
        self.converter
            .convert(Target::Physical { pa, len }, Visibility::Shared)
            .map_err(ShareError::Convert)?;
        self.shared.fetch_add(1, Ordering::Relaxed);
        // SAFETY: shared now; the caller gives the frames up to the
        // buffer; `access` reaches them (its contract).
        Ok(unsafe { OwnedShared::new(SharedRange { pa, len }, ptr, self) })
    }
}

impl<C: Convert, A: FrameAccess, R: Reclaim> Home for DirectShare<C, A, R>
where
    Self: Sync,
{
    fn take_back(&self, range: SharedRange) -> Result<(), ReleaseError> {
        let SharedRange { pa, len } = range;
        match self
            .converter
            .convert(Target::Physical { pa, len }, Visibility::Private)
        {
            Ok(_) => {
                self.returned.fetch_add(1, Ordering::Relaxed);
                self.reclaim.reclaimed(pa, len);
                Ok(())
            }
            Err(error) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                self.reclaim.lost(pa, len, error);
                Err(ReleaseError { pa, len, error })
            }
        }
    }
}
