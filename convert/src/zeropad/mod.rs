//! A `load_unaligned_zeropad`-safe fault handler.
//!
//! [`load_unaligned_zeropad`] reads 8 bytes that may run into the next page
//! (string and hash routines do this to read whole words). When that next
//! page is not present, the conversion window of this crate's transaction,
//! or mapped with the other encryption attribute, the load faults. The
//! OS's #PF handler (fault address = CR2) and TDX #VE handler (fault
//! address = the GLA from TDG.VP.VEINFO.GET; [`VeHandler`] makes the call
//! itself) call [`handle_fault`], which finishes the load with zero padding
//! and resumes after it, instead of crashing the guest:
//!
//! 1. RIP must be a recorded site (the [`site`] table, filled by the linker);
//! 2. the instruction there must decode as `MOV r64, m64` (8B /r with
//!    REX.W), no prefixes that change its meaning, of the recorded length;
//! 3. its effective address, computed from the saved registers, must fault
//!    exactly at the next 8-byte boundary: `fault == align_down(addr, 8) + 8`;
//! 4. then the aligned word (wholly inside the owned page) is loaded,
//!    shifted right by `(addr & 7) * 8`, written to the destination
//!    register, and RIP moves past the instruction.
//!
//! Anything else is not handled, and nothing is changed. Linux's
//! `ex_handler_zeropad` makes the same checks.
//!
//! [`VeHandler`]: crate::exception::ve::VeHandler
//!
//! [`init`] must run once before the first fault: iced-x86 builds its
//! decoder tables on the heap on first use, and the fault path must never
//! allocate. After `init`, the fault path takes no lock and allocates
//! nothing.

mod fixup;
pub mod site;

pub use crate::exception::ve::{classify_ve, VeClass};
pub use crate::exception::{FaultFrame, Gpr, RegisterAccess};
#[cfg(target_arch = "x86_64")]
pub(crate) use fixup::site_load_address;
pub use fixup::{fixup_with, handle_fault, init, is_initialised, FaultKind, NotHandled};
pub use site::{is_zeropad_site, load_unaligned_zeropad};
