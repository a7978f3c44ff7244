//! DMA bounce buffers over the pool, as Linux's swiotlb: a device that
//! cannot reach private memory gets a shared copy of the buffer, and the
//! CPU copies in and out around each transfer.
//!
//! The copies are the only way data crosses: the device address names the
//! bounce slot, never the private buffer, and the CPU sees the device's
//! bytes only as a snapshot taken by [`BounceMapping::sync_for_cpu`] (or
//! [`unmap`](BounceMapping::unmap)), so a host rewriting the slot after
//! the CPU checked it changes nothing the CPU uses.

use super::{ChunkSource, Convert, FrameAccess, OwnedShared, PoolError, SharedPool, CHUNK};
use crate::pte::{EncryptionBit, Visibility};

/// Which way the data of a mapping goes, as Linux's `dma_data_direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaDirection {
    /// The device reads the buffer: copied into the slot at map and at
    /// [`sync_for_device`](BounceMapping::sync_for_device).
    ToDevice,
    /// The device writes the buffer: copied out of the slot at
    /// [`sync_for_cpu`](BounceMapping::sync_for_cpu) and at unmap.
    FromDevice,
    /// Both.
    Bidirectional,
}

impl DmaDirection {
    fn copies_to_device(self) -> bool {
        matches!(self, DmaDirection::ToDevice | DmaDirection::Bidirectional)
    }

    fn copies_to_cpu(self) -> bool {
        matches!(self, DmaDirection::FromDevice | DmaDirection::Bidirectional)
    }
}

/// Why a buffer could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BounceError {
    /// A buffer of no bytes.
    Empty,
    /// A buffer larger than a bounce slot can be.
    TooLarge {
        /// Its bytes.
        len: usize,
        /// The most a slot holds ([`CHUNK`]).
        max: u64,
    },
    /// The pool has no room: no free pages, and no chunk or no slot to add
    /// one. Unmapping others makes room.
    NoRoom(PoolError),
    /// The pool failed otherwise (a new chunk's conversion, a frame access
    /// that does not reach the slot).
    Pool(PoolError),
}

impl From<PoolError> for BounceError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Exhausted | PoolError::AtCapacity { .. } => BounceError::NoRoom(e),
            _ => BounceError::Pool(e),
        }
    }
}

impl core::fmt::Display for BounceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BounceError::Empty => f.write_str("a DMA buffer of 0 bytes"),
            BounceError::TooLarge { len, max } => write!(f, "a DMA buffer of {len} bytes, more than {max}"),
            BounceError::NoRoom(e) => write!(f, "no room for a bounce slot: {e}"),
            BounceError::Pool(e) => write!(f, "no bounce slot: {e}"),
        }
    }
}

impl core::error::Error for BounceError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            BounceError::NoRoom(e) | BounceError::Pool(e) => Some(e),
            _ => None,
        }
    }
}

/// A pool seen by the bounce layer: whatever its converter and source.
pub(crate) trait Lender: Sync {
    fn lend(&self, bytes: u64, access: &dyn FrameAccess) -> Result<OwnedShared<'_>, PoolError>;
}

impl<C: Convert, S: ChunkSource> Lender for SharedPool<'_, C, S>
where
    Self: Sync,
{
    fn lend(&self, bytes: u64, access: &dyn FrameAccess) -> Result<OwnedShared<'_>, PoolError> {
        self.alloc_owned(bytes, access)
    }
}

/// Bounce buffers from a pool. `Sync`: any number of CPUs map and unmap at
/// once (the pool's lock serialises only the slot bookkeeping).
pub struct Bounce<'p, A: FrameAccess> {
    pool: &'p dyn Lender,
    access: A,
    shared_bits: u64,
}

impl<A: FrameAccess> core::fmt::Debug for Bounce<'_, A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Bounce")
            .field("shared_bits", &self.shared_bits)
            .finish_non_exhaustive()
    }
}

impl<'p, A: FrameAccess> Bounce<'p, A> {
    /// Bounce slots from `pool`, their bytes reached through `access`,
    /// device addresses in the form the platform of `encryption` (the
    /// engine's [`Engine::encryption`](crate::Engine::encryption)) needs:
    /// on TDX the GPA with the shared bit set, the address a device's DMA
    /// to shared memory goes to; on SEV-SNP the plain GPA (the C-bit is a
    /// bit of the guest's page tables, not of a bus address).
    pub fn new<'a, C: Convert, S: ChunkSource>(
        pool: &'p SharedPool<'a, C, S>,
        access: A,
        encryption: EncryptionBit,
    ) -> Self
    where
        SharedPool<'a, C, S>: Sync,
    {
        Bounce {
            pool,
            access,
            shared_bits: encryption.bits_for(Visibility::Shared),
        }
    }

    /// The device address of the shared frame at `pa`.
    pub fn device_address(&self, pa: u64) -> u64 {
        pa | self.shared_bits
    }

    /// Maps `buffer` for a device: takes a bounce slot of its length
    /// (rounded up to 4 KiB inside the slot; the buffer may start and end
    /// anywhere) and fills it. `ToDevice` and `Bidirectional` copy the
    /// buffer in. `FromDevice` zeroes the slot's first `buffer.len()`
    /// bytes instead: a device that writes only part of the buffer then
    /// leaves zeroes, not what the slot's last user left there, and no
    /// private byte is shown to the host for nothing.
    ///
    /// The buffer is borrowed until the mapping is unmapped: the CPU sees
    /// it only through the mapping, between syncs.
    pub fn map<'b>(&self, buffer: &'b mut [u8], direction: DmaDirection) -> Result<BounceMapping<'p, 'b>, BounceError> {
        if buffer.is_empty() {
            return Err(BounceError::Empty);
        }
        if buffer.len() as u64 > CHUNK {
            return Err(BounceError::TooLarge {
                len: buffer.len(),
                max: CHUNK,
            });
        }
        let mut slot = self.pool.lend(buffer.len() as u64, &self.access)?;
        let copied = if direction.copies_to_device() {
            slot.write(0, buffer)
        } else {
            slot.fill(0, buffer.len(), 0)
        };
        debug_assert!(copied.is_ok(), "a slot is at least as long as its buffer");
        let device = self.device_address(slot.pa());
        Ok(BounceMapping {
            slot,
            buffer,
            direction,
            device,
        })
    }
}

/// A buffer mapped for a device: its bounce slot and the private buffer
/// it stands for. Unmap it with [`unmap`](Self::unmap), which consumes
/// it, so it cannot be unmapped twice; dropping it unmaps it the same way.
pub struct BounceMapping<'p, 'b> {
    slot: OwnedShared<'p>,
    buffer: &'b mut [u8],
    direction: DmaDirection,
    device: u64,
}

impl core::fmt::Debug for BounceMapping<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BounceMapping")
            .field("device", &self.device)
            .field("len", &self.buffer.len())
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl BounceMapping<'_, '_> {
    /// The address to give the device: the slot's GPA in the platform's
    /// form (see [`Bounce::new`]).
    pub fn device_address(&self) -> u64 {
        self.device
    }

    /// The slot's physical address (no shared bit).
    pub fn slot_pa(&self) -> u64 {
        self.slot.pa()
    }

    /// Bytes mapped: the buffer's length (the slot may be longer; the
    /// device must not use more).
    #[allow(clippy::len_without_is_empty)] // a mapping is never empty
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// The direction it was mapped for.
    pub fn direction(&self) -> DmaDirection {
        self.direction
    }

    /// The private buffer, as the CPU last left or synced it.
    pub fn buffer(&self) -> &[u8] {
        self.buffer
    }

    /// The private buffer, to change before a
    /// [`sync_for_device`](Self::sync_for_device).
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        self.buffer
    }

    /// Hands the buffer to the device again after the CPU changed it:
    /// `ToDevice` and `Bidirectional` copy it into the slot.
    pub fn sync_for_device(&mut self) {
        if self.direction.copies_to_device() {
            let copied = self.slot.write(0, self.buffer);
            debug_assert!(copied.is_ok());
        }
    }

    /// Takes the device's bytes for the CPU: `FromDevice` and
    /// `Bidirectional` copy the slot's first [`len`](Self::len) bytes into
    /// the buffer, each read once. What the device writes afterwards
    /// reaches the buffer only at the next sync or the unmap.
    pub fn sync_for_cpu(&mut self) {
        if self.direction.copies_to_cpu() {
            let copied = self.slot.read(0, self.buffer);
            debug_assert!(copied.is_ok());
        }
    }

    /// Ends the mapping: syncs for the CPU (as
    /// [`sync_for_cpu`](Self::sync_for_cpu)) and gives the slot back to the
    /// pool. The device must be done with it.
    pub fn unmap(self) {
        drop(self);
    }
}

impl Drop for BounceMapping<'_, '_> {
    fn drop(&mut self) {
        self.sync_for_cpu();
        // The slot goes back to the pool when its handle drops, after this.
    }
}
