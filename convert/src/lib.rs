//! The conversion engine: turns guest memory private <-> shared for Intel
//! TDX and AMD SEV-SNP guests, keeping three things consistent at every
//! instant: the firmware/host's view of each page, every virtual mapping of
//! it (the direct map, huge pages split only where needed and collapsed
//! again afterwards, vmalloc-style ranges, registered aliases), and code
//! that may touch the page without owning it.
//!
//! The transaction ([`Engine::convert`]): claim the frames; reserve every
//! table page the splits need (from the OS's [`FrameSource`], usable in
//! early boot); split only huge leaves that straddle a boundary; make every
//! alias not present; one TLB shootdown; the platform's calls
//! ([`platform::tdx::Tdx`], [`platform::snp::Snp`]); every alias present
//! with the new encryption bit; collapse what can be collapsed. A failure
//! of the firmware or host poisons the frames: they stay not present and
//! are never handed back.
//!
//! What the embedding OS provides: [`PhysMem`] (reach page-table pages by
//! physical address), [`FrameSource`] (table pages), [`TlbShootdown`], a
//! [`StateTable`]'s storage, and for SNP a [`ScratchWindow`] per CPU.
//! Nothing here allocates from a heap.
#![no_std]
#![deny(missing_docs)]

pub mod arch;
mod collapse;
mod counters;
mod deferred;
mod engine;
mod ghcb_setup;
pub mod platform;
mod policy;
pub mod pool;
mod pte;
mod reserve;
mod shootdown;
mod split;
mod state;
mod tables;
#[cfg(test)]
mod testmem;
mod window;
#[cfg(feature = "zeropad")]
pub mod zeropad;

pub use counters::{CounterSnapshot, Counters};
pub use engine::{Alias, Config, ConvertError, DirectMap, Engine, Report, Target, MAX_ALIASES};
pub use ghcb_setup::{setup_ghcb, GhcbSetupError};
pub use platform::{Platform, PlatformError, PrivateMap, Runs};
pub use policy::{FailureAction, FailurePolicy, ReportOnly};
pub use pte::{EncryptionBit, Level, Visibility};
pub use reserve::FrameSource;
pub use shootdown::{TlbShootdown, VaRange};
pub use state::{PageState, StateTable};
pub use tables::{EntryLoc, PhysMem, Walk};
pub use window::{ScratchWindow, WindowSlot};

/// Leaf and table-pointer bits, for OSes and tests that build page tables.
pub mod bits {
    pub use crate::pte::{
        flags_4k_to_huge, huge_flags_to_4k, ACCESSED, ADDRESS_BITS, DIRTY, HUGE, NO_EXECUTE, PAT_4K, PAT_HUGE, PRESENT,
        TABLE_POINTER, USER, WRITABLE,
    };
}
