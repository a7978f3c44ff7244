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
//! [`StateTable`]'s storage, and for SNP a [`ScratchWindow`] per CPU
//! ([`PerCpuWindows`] is ready-made) and a GHCB slot per CPU
//! ([`platform::snp::GhcbSlot`]). The engine never allocates from a heap;
//! only the optional `zeropad` feature needs one, once (see below).
//!
//! Also here: the SEV-SNP #VC handler ([`exception::vc::handle_vc`]), for
//! the CPUID, MSR and port accesses the hypervisor must carry out.
//!
//! # Features
//!
//! - `zeropad` (off by default): the `zeropad` module, the fault fix-up
//!   that makes `load_unaligned_zeropad` safe next to conversions, for
//!   kernels that read strings a word at a time across page ends. It
//!   brings the iced-x86 decoder: about 85 KB of code and 33 KB of
//!   read-only data in a release `x86_64-unknown-none` kernel, and about
//!   330 KB of heap that `zeropad::init` allocates once for the
//!   decoder's tables (the fault path never allocates). Off by default so
//!   that a kernel or firmware without a heap, or without such loads,
//!   pays nothing.
//! - `lock-stats` (off by default): `Engine::lock_stats`, the table
//!   lock's acquisitions and the time it is held, read with the TSC
//!   (`RDTSC`) as the lock is taken and released, while switched on with
//!   `Engine::record_lock_stats`. For measuring how much of a conversion
//!   is serialised across CPUs; switched on, it costs two TSC reads and
//!   two shared atomic additions per acquisition, and off, one relaxed
//!   load.
//! - `test-knobs` (off by default, never for production): batching other
//!   than the fewest calls (as Linux does, for comparison) and a PTE bit
//!   other than the real encryption bit, for emulated platforms whose MMU
//!   must ignore it.
//!
//! For drivers, [`pool`] converts memory in 2 MiB chunks and hands out
//! shared buffers: bare ranges, [`pool::OwnedShared`] handles that go back
//! when dropped (also made by converting the OS's own private memory,
//! [`pool::DirectShare`]), and DMA bounce mappings ([`pool::Bounce`]). The
//! OS adds the pool's slot storage, a [`pool::ChunkSource`], and a
//! [`pool::FrameAccess`] (the engine's [`DirectMap`] is one).
//!
//! # The contract
//!
//! The full text, each promise with the test that holds it, is the
//! repository's contract document. In short:
//!
//! - **The OS promises** not to change entries that map frames a
//!   conversion owns, nor split or merge their tables, until the call
//!   returns; to change other entries of the direct map and registered
//!   aliases only inside [`Engine::with_table_lock`]; to convert a vmalloc
//!   buffer's frames through the buffer (the engine knows no other
//!   mapping); to map a registered alias only while registered.
//! - **The engine changes** only present leaves of the ranges it
//!   converts, splitting only present huge leaves that straddle a
//!   boundary, and **restores exactly the entries it made not present**:
//!   an entry the OS left not present (a guard page with its frame kept,
//!   software bits only, zero, at any level) stays as it was, bit for bit.
//!   It never makes a poisoned frame's entry present.
//! - **Table pages**: only frames taken from the [`FrameSource`] go back to
//!   it (they are [`PageState::PageTable`] meanwhile and cannot be
//!   converted); tables the OS built that a collapse replaces go to
//!   [`FrameSource::retire_os_table`]; nothing goes back before a
//!   [`TlbShootdown`] that names its region.
//! - **Locks**: none is held across a hypercall, a shootdown, or a frame
//!   source call. [`Engine::unregister_alias`] waits for conversions in
//!   flight.
//! - **Results**: every [`ConvertError`] but `Platform` means nothing
//!   changed, literally ([`ConvertError::changed_nothing`]); `Platform`
//!   counts the frames poisoned and converted, and [`Engine::state`] tells
//!   which is which. [`Report::frames`] counts distinct frames.
//!
//! # Embedding
//!
//! What a TDX guest kernel implements and calls (compiled, not run: it needs
//! a TD). SEV-SNP differs in three lines: the backend from
//! [`platform::snp::Snp::negotiate`] (the C-bit from the GHCB MSR
//! protocol), a [`PerCpuWindows`] given to [`Engine::with_window`], and
//! [`setup_ghcb`] once on each CPU.
//!
//! ```no_run
//! use core::sync::atomic::AtomicU8;
//! use coco_convert::platform::tdx::Tdx;
//! use coco_convert::{Collapse, Config, DirectMap, Engine, Paging, StateTable, Target, VaRange, Visibility};
//!
//! const PHYS_OFFSET: u64 = 0xFFFF_8880_0000_0000; // where the kernel maps all RAM
//! const RAM: u64 = 1 << 30;
//!
//! /// Page-table pages by physical address, through the direct map.
//! struct DirectMapAccess;
//! // SAFETY: every table lies in RAM, which the direct map covers.
//! unsafe impl coco_convert::PhysMem for DirectMapAccess {
//!     fn page_ptr(&self, pa: u64) -> *mut u64 {
//!         (PHYS_OFFSET + pa) as *mut u64
//!     }
//! }
//!
//! /// Table pages: a bump allocator over a boot-time region works before any heap.
//! struct BootFrames;
//! impl coco_convert::FrameSource for BootFrames {
//!     fn allocate_frame(&self) -> Option<u64> { /* ... */ None }
//!     fn free_frame(&self, _pa: u64) { /* ... */ }
//! }
//!
//! /// TLB shootdown on every CPU (invlpg by IPI, or a full flush).
//! struct Ipi;
//! impl coco_convert::TlbShootdown for Ipi {
//!     fn shootdown(&self, _ranges: &[VaRange]) { /* ... */ }
//! }
//!
//! static STATES: [AtomicU8; (RAM / 4096) as usize] = [const { AtomicU8::new(0) }; (RAM / 4096) as usize]; // all private
//!
//! # fn cr3() -> u64 { 0 }
//! # fn cr4() -> u64 { 0 }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // SAFETY: we run in a TD at CPL 0.
//! let tdx = Tdx::from_vp_info(unsafe { tdcall::TdcallInstruction::new() })?;
//! let config = Config {
//!     root: cr3(),
//!     paging: Paging::from_cr4(cr4()), // four levels, or five with CR4.LA57
//!     direct_map: DirectMap { va: PHYS_OFFSET, pa: 0, len: RAM },
//!     collapse: Collapse::AfterEachConversion,
//!     collapse_1g: true,
//! };
//! let engine = Engine::new(config, DirectMapAccess, BootFrames, Ipi, tdx, StateTable::new(0, &STATES));
//!
//! // A direct-map or vmalloc-style range: every alias converts with it.
//! engine.convert(Target::Virtual { va: PHYS_OFFSET + (64 << 20), len: 16 << 20 }, Visibility::Shared)?;
//! engine.convert(Target::Physical { pa: 64 << 20, len: 16 << 20 }, Visibility::Private)?;
//! # Ok(())
//! # }
//! ```
#![no_std]
#![deny(missing_docs)]

mod aliases;
pub mod arch;
mod collapse;
mod counters;
mod deferred;
mod engine;
pub mod exception;
mod ghcb_setup;
mod leaves;
pub mod platform;
mod policy;
pub mod pool;
mod pte;
mod regions;
mod reserve;
mod shootdown;
mod split;
mod state;
pub mod sync;
mod tables;
#[cfg(test)]
mod testmem;
mod unaccepted;
mod window;
#[cfg(feature = "zeropad")]
pub mod zeropad;

pub use aliases::{Alias, AliasError, DirectMap, MAX_ALIASES};
pub use counters::{CounterSnapshot, Counters};
#[cfg(feature = "lock-stats")]
pub use engine::LockStats;
pub use engine::{
    AcceptMemoryError, AcceptReport, Collapse, CompactReport, Config, ConvertError, Engine, Report, Target,
    UnshareReport,
};
pub use ghcb_setup::{setup_ghcb, GhcbSetupError};
pub use platform::{Platform, PlatformError, Runs};
pub use policy::{FailureAction, FailurePolicy, ReportOnly};
pub use pte::{EncryptionBit, Level, Paging, Visibility};
pub use reserve::FrameSource;
pub use shootdown::{TlbShootdown, VaRange};
pub use state::{Census, PageState, RecordError, StateTable, TooFewWords};
pub use tables::{EntryLoc, PhysMem, Walk};
pub use unaccepted::{BitmapError, UnacceptedBitmap};
pub use window::{PerCpuWindows, ScratchWindow, WindowSlot};

/// Leaf and table-pointer bits, for OSes and tests that build page tables.
pub mod bits {
    pub use crate::pte::{
        flags_4k_to_huge, huge_flags_to_4k, ACCESSED, ADDRESS_BITS, DIRTY, HUGE, NO_EXECUTE, PAT_4K, PAT_HUGE, PRESENT,
        TABLE_POINTER, USER, WRITABLE,
    };
}
