//! Page-table pages: where they come from, and the reserve a conversion
//! fills before it changes anything.

use crate::state::{PageState, StateTable};
use crate::tables::PhysMem;

/// Where new page-table pages come from, and where freed ones go.
///
/// Must work in early boot, before any heap exists: a bump allocator over a
/// boot-time region is enough. Frames must be private, accepted/validated
/// guest memory that the engine's [`StateTable`] covers. The engine calls
/// these methods with none of its locks held.
pub trait FrameSource {
    /// A free 4 KiB frame, or `None` when out of memory.
    fn allocate_frame(&self) -> Option<u64>;
    /// Gives back a frame from [`allocate_frame`](Self::allocate_frame).
    /// The engine gives back only frames it took from here.
    fn free_frame(&self, pa: u64);
    /// A page-table page the engine did not take from this source (one the
    /// OS built, at boot or later) that a collapse has made unreachable,
    /// called after the shootdown that removed every cached pointer to it.
    /// The page is the OS's again. The default keeps it out of use.
    fn retire_os_table(&self, pa: u64) {
        let _ = pa;
    }
}

impl<T: FrameSource + ?Sized> FrameSource for &T {
    fn allocate_frame(&self) -> Option<u64> {
        (**self).allocate_frame()
    }
    fn free_frame(&self, pa: u64) {
        (**self).free_frame(pa)
    }
    fn retire_os_table(&self, pa: u64) {
        (**self).retire_os_table(pa)
    }
}

const END: u64 = u64::MAX;

/// Why frames could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReserveError {
    /// The source ran out.
    Exhausted,
    /// The source handed out a frame that is not private, not in the state
    /// table, or not 4 KiB aligned (given back at once).
    Unusable { pa: u64, state: Option<PageState> },
}

/// Frames taken from a [`FrameSource`] before a conversion changes
/// anything, so no split can fail half-way. Kept as a list threaded through
/// the frames themselves: no heap, no size limit. Each is marked in the
/// state table as the engine's from the moment it is taken until it goes
/// back, so it cannot be converted and is told apart from the OS's tables.
pub(crate) struct Reserve {
    head: u64,
    len: usize,
}

impl Reserve {
    pub const fn new() -> Self {
        Reserve { head: END, len: 0 }
    }

    /// Tops the reserve up to `n` frames. On failure the reserve keeps what
    /// it had.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn fill_to<M: PhysMem, F: FrameSource>(
        &mut self,
        n: usize,
        mem: &M,
        source: &F,
        states: &StateTable<'_>,
    ) -> Result<(), ReserveError> {
        let mut added = Reserve::new();
        while self.len + added.len < n {
            let Some(pa) = source.allocate_frame() else {
                added.release(mem, source, states);
                return Err(ReserveError::Exhausted);
            };
            if let Err(state) = states.take_table(pa) {
                // One the engine already holds as a table (the source gave
                // it out twice) stays where it is: giving it back would free
                // a table in use.
                if state != Some(PageState::PageTable) {
                    source.free_frame(pa);
                }
                added.release(mem, source, states);
                return Err(ReserveError::Unusable { pa, state });
            }
            added.push(pa, mem);
        }
        while let Some(pa) = added.take(mem) {
            self.push(pa, mem);
        }
        Ok(())
    }

    fn push<M: PhysMem>(&mut self, pa: u64, mem: &M) {
        // SAFETY: the frame is ours until freed; `PhysMem` maps it.
        unsafe { mem.page_ptr(pa).write_volatile(self.head) };
        self.head = pa;
        self.len += 1;
    }

    /// A reserved frame (still marked as the engine's).
    pub fn take<M: PhysMem>(&mut self, mem: &M) -> Option<u64> {
        if self.head == END {
            return None;
        }
        let pa = self.head;
        // SAFETY: `pa` is a reserved frame whose first word is the link.
        self.head = unsafe { mem.page_ptr(pa).read_volatile() };
        self.len -= 1;
        Some(pa)
    }

    /// Gives every frame back to the source.
    pub fn release<M: PhysMem, F: FrameSource>(&mut self, mem: &M, source: &F, states: &StateTable<'_>) {
        while let Some(pa) = self.take(mem) {
            states.release_table(pa);
            source.free_frame(pa);
        }
    }
}
