//! Frames a failed acceptance poisoned are taken out of reach, as a failed
//! conversion leaves its own: every linear alias of them (the direct map,
//! the registered aliases) is split to fit and made not present, under one
//! shootdown.
//!
//! Memory the platform never accepted must not be touched: on TDX an
//! access to a pending page ends the guest, on SEV-SNP an access to a page
//! not validated raises a #VC the guest must treat as fatal. The OS never
//! hands a poisoned frame out, but a word-at-a-time load
//! (`load_unaligned_zeropad`) that runs off the end of the accepted memory
//! before it reads into the next unit anyway. With the unit not present it
//! takes an ordinary #PF instead, which the fix-up handles.

use core::ops::Range;

use super::frames::Frames;
use super::transaction::Tx;
use super::{ConvertError, Engine, PAGE};
use crate::aliases::Linears;
use crate::platform::Platform;
use crate::pte::Visibility;
use crate::reserve::FrameSource;
use crate::shootdown::TlbShootdown;
use crate::state::Code;
use crate::tables::PhysMem;

impl<M: PhysMem, F: FrameSource, T: TlbShootdown, P: Platform> Engine<'_, M, F, T, P> {
    /// Makes every linear alias of the poisoned `frames` not present. On an
    /// error (no table page for a split) nothing changed: the frames stay
    /// poisoned, and mapped.
    pub(super) fn unmap_poisoned(&self, frames: Range<u64>) -> Result<(), ConvertError> {
        if frames.is_empty() {
            return Ok(());
        }
        self.check_direct_map()?;
        let (hold, snapshot) = self.aliases.enter();
        let tx = Tx {
            frames: Frames::Linear {
                pa: frames.start,
                len: frames.end - frames.start,
            },
            // Unused: nothing is sent and nothing made present again.
            to: Visibility::Private,
            linears: Linears {
                direct_map: self.config.direct_map,
                registered: snapshot.as_ref(),
            },
        };
        // A linear range is one run: no extents to gather.
        let mut scratch = [0u64; 1];
        let lock = self.tables_lock.lock();
        let (lock, reserved) = self.reserve_splits(&tx, &mut scratch, lock);
        let result = match reserved {
            Ok(reserve) => {
                self.unmap_and_shoot(&tx, &mut scratch, reserve, lock);
                Ok(())
            }
            Err((error, mut reserve)) => {
                drop(lock);
                reserve.release(&self.mem, &self.frames, &self.states);
                Err(error)
            }
        };
        drop(hold);
        // The holes unmapping recorded are moot: a poisoned frame is never
        // mapped again. (Only poisoned frames: this changes no state.)
        for frame in frames.step_by(PAGE as usize) {
            if self.states.code(frame) == Some(Code::Poisoned) {
                self.states.settle(frame, Code::Poisoned);
            }
        }
        result
    }
}
