//! The memory a caller lends a conversion: a frame list, or the scratch
//! a vmalloc-style range is gathered in. The engine reads it (and writes
//! the scratch) on every pass, after the frames are unmapped and while the
//! host holds them, so it must lie in a frame that stays private and
//! mapped throughout.

use super::frames::Frames;
use super::transaction::Tx;
use super::{ConvertError, Engine, PAGE};
use crate::platform::Platform;
use crate::pte::{Level, HUGE};
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::state::PageState;
use crate::tables::{PhysMem, Tables, Walk};

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Refuses a frame list that lies in a frame that is not private,
    /// before a word of it is read: memory the host shares could change
    /// under the reads, and a frame another CPU is converting is unmapped.
    pub(super) fn check_list_before_reading(&self, list: &[u64]) -> Result<(), ConvertError> {
        let _lock = self.tables_lock.lock();
        self.check_lent(&self.tables(), list)
    }

    /// The same check once the frames are claimed: this conversion's own
    /// frames now read as `Converting`, so a list stored in one of them
    /// (private, so the host could not rewrite it meanwhile) is refused
    /// too, as is a vmalloc-style range's scratch in one of its frames.
    /// Called with the table lock held.
    pub(super) fn check_caller_memory(
        &self,
        tables: &Tables<'_, M>,
        tx: &Tx<'_>,
        scratch: &[u64],
    ) -> Result<(), ConvertError> {
        match tx.frames {
            // A linear run's passes use neither.
            Frames::Linear { .. } => Ok(()),
            Frames::Mapped { .. } => self.check_lent(tables, scratch),
            Frames::List(list) => self.check_lent(tables, list),
        }
    }

    /// Every page of `lent` must lie in a private frame (or one outside
    /// the state table, which the engine never converts). Reads where it
    /// lies, never what it holds.
    fn check_lent(&self, tables: &Tables<'_, M>, lent: &[u64]) -> Result<(), ConvertError> {
        let start = lent.as_ptr() as u64;
        let end = start + core::mem::size_of_val(lent) as u64;
        for page in (start / PAGE * PAGE..end).step_by(PAGE as usize) {
            let at = page.max(start);
            let Some(pa) = self.mem.phys_of(at as *const u8).or_else(|| frame_behind(tables, at)) else {
                continue;
            };
            let pa = pa / PAGE * PAGE;
            match self.states.get(pa) {
                None | Some(PageState::Private) => {}
                Some(state) => return Err(ConvertError::CallerMemoryNotPrivate { pa, state }),
            }
        }
        Ok(())
    }
}

/// The frame behind `va` in these tables: through a present leaf, or
/// through a leaf made not present that kept its address (as a conversion
/// in flight leaves it). `None` where nothing maps `va`: memory the engine
/// cannot place, which a kernel could not read either.
fn frame_behind<M: PhysMem>(tables: &Tables<'_, M>, va: u64) -> Option<u64> {
    let (level, entry) = match tables.walk(va) {
        Walk::Leaf { level, entry, .. } => (level, entry),
        Walk::Absent { level, entry, .. } if entry != 0 && (level == Level::Pt || entry & HUGE != 0) => (level, entry),
        Walk::Absent { .. } => return None,
    };
    Some(tables.enc.address(entry, level) + (va & (level.span() - 1)))
}
