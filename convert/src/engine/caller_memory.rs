//! The memory a caller lends a conversion: a frame list, or the scratch
//! a vmalloc-style range is gathered in. The engine reads (and the scratch
//! it writes) on every pass, after the frames are unmapped and while the
//! host holds them, so it must lie in a frame that stays private and
//! mapped throughout.

use super::frames::Frames;
use super::transaction::Tx;
use super::{ConvertError, Engine, PAGE};
use crate::platform::Platform;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::state::PageState;
use crate::tables::{PhysMem, Tables};

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Refuses the caller's memory where it lies in a frame that is not
    /// private: after the claim, this conversion's own frames read as
    /// `Converting`, so one check covers a list stored in its own frames,
    /// a list the host could rewrite, and one another CPU is converting.
    /// Called with the table lock held and the frames claimed.
    pub(super) fn check_caller_memory(
        &self,
        tables: &Tables<'_, M>,
        tx: &Tx<'_>,
        scratch: &[u64],
    ) -> Result<(), ConvertError> {
        let lent: &[u64] = match tx.frames {
            // A linear run's passes use neither.
            Frames::Linear { .. } => return Ok(()),
            Frames::Mapped { .. } => scratch,
            Frames::List(list) => list,
        };
        let start = lent.as_ptr() as u64;
        let end = start + core::mem::size_of_val(lent) as u64;
        let first_page = start / PAGE * PAGE;
        // Memory the OS cannot place, or outside the state table, is none
        // of the engine's frames.
        let frames = (first_page..end)
            .step_by(PAGE as usize)
            .map(|page| page.max(start))
            .filter_map(|at| self.mem.phys_of(at as *const u8).or_else(|| tables.translate(at)))
            .map(|pa| pa / PAGE * PAGE);
        for pa in frames {
            match self.states.get(pa) {
                None | Some(PageState::Private) => {}
                Some(state) => return Err(ConvertError::CallerMemoryNotPrivate { pa, state }),
            }
        }
        Ok(())
    }
}
