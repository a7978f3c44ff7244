//! Page-table pages: where they come from, and the reserve a conversion
//! fills before it changes anything.

use crate::tables::PhysMem;

/// Where new page-table pages come from, and where freed ones go.
///
/// Must work in early boot, before any heap exists (seed 000): a bump
/// allocator over a boot-time region is enough. Frames must be private,
/// validated/accepted guest memory.
pub trait FrameSource {
    /// A free 4 KiB frame, or `None` when out of memory.
    fn allocate_frame(&self) -> Option<u64>;
    /// Gives back a frame from [`allocate_frame`](Self::allocate_frame).
    fn free_frame(&self, pa: u64);
}

impl<T: FrameSource + ?Sized> FrameSource for &T {
    fn allocate_frame(&self) -> Option<u64> {
        (**self).allocate_frame()
    }
    fn free_frame(&self, pa: u64) {
        (**self).free_frame(pa)
    }
}

const END: u64 = u64::MAX;

/// Frames taken from a [`FrameSource`] before a conversion changes
/// anything, so no split can fail half-way. Kept as a list threaded through
/// the frames themselves: no heap, no size limit. Frames not used go back
/// to the source.
pub(crate) struct Reserve {
    head: u64,
}

impl Reserve {
    pub const fn new() -> Self {
        Reserve { head: END }
    }

    /// Takes `n` frames, or none (all given back) if the source runs out.
    pub fn fill<M: PhysMem, F: FrameSource>(&mut self, n: usize, mem: &M, source: &F) -> bool {
        for _ in 0..n {
            match source.allocate_frame() {
                Some(pa) => {
                    // SAFETY: the frame is ours until freed; `PhysMem` maps it.
                    unsafe { mem.table(pa).write_volatile(self.head) };
                    self.head = pa;
                }
                None => {
                    self.release(mem, source);
                    return false;
                }
            }
        }
        true
    }

    pub fn take<M: PhysMem>(&mut self, mem: &M) -> Option<u64> {
        if self.head == END {
            return None;
        }
        let pa = self.head;
        // SAFETY: `pa` is a reserved frame whose first word is the link.
        self.head = unsafe { mem.table(pa).read_volatile() };
        Some(pa)
    }

    pub fn release<M: PhysMem, F: FrameSource>(&mut self, mem: &M, source: &F) {
        while let Some(pa) = self.take(mem) {
            source.free_frame(pa);
        }
    }
}
