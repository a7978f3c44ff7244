//! A model of the parties a confidential guest talks to, for tests:
//!
//! - [`MockTdx`]: the TDX module and the VMM behind TDG.VP.VMCALL. Keeps the
//!   state of every 4 KiB page (private-accepted, private-pending, shared)
//!   and the Secure-EPT mapping size of pending/accepted pages; implements
//!   [`tdcall::Tdcall`].
//! - [`MockSnp`]: an SEV-SNP hypervisor and the RMP. Keeps one RMP entry
//!   per 4 KiB page (assigned, validated, part of a 2 MiB entry); answers
//!   the GHCB MSR protocol, the Page State Change NAE event and the events
//!   a #VC handler forwards (port I/O, CPUID, MSRs on [`emulation`]'s
//!   devices: [`snp::nae`]) by reading the GHCB out of guest memory;
//!   implements [`snp_ghcb::GhcbMsr`] and [`snp_ghcb::Pvalidate`].
//! - [`GuestMemory`]: the guest's physical memory both of them read and
//!   write (contents are scribbled on every conversion, zeroed on ACCEPT).
//! - [`emulation`]: what the VMM emulates when the guest has it carry out
//!   an instruction: a port space (a serial console, isa-debug-exit), a
//!   CPUID table, MSRs. [`MockTdx`] answers TDG.VP.VMCALL\<Instruction.*\>
//!   from it, [`MockSnp`] the GHCB's port I/O, CPUID and MSR events.
//!
//! Each has hostile modes ([`TdxHostile`], [`TdxEmulationHostile`],
//! [`SnpHostile`]) that make the host lie in the ways the guest crates must
//! survive.
//!
//! Where real hardware answers a bad request with an exit to the host that
//! the host may decline to resolve (TDX: ACCEPT of a GPA with no private
//! mapping raises an EPT-violation TD exit; SNP: PVALIDATE of a page not
//! assigned to the guest raises a #NPF), the guest would spin or be
//! stopped. The model answers with an error code instead
//! (`TDX_EPT_WALK_FAILED`, `PVALIDATE_FAIL_INPUT`) so that a test can see
//! the lie was caught rather than hang.
//!
//! `no_std` with `alloc`, so the same model can run inside a test guest.
//! No cargo features.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod emulation;
mod memory;
pub mod pagewalk;
mod preemption;
pub mod snp;
pub mod tdx;

pub use memory::GuestMemory;
pub use pagewalk::{GuestPageTables, Mapping};
pub use snp::{GhcbReg, MockSnp, NaeInputs, RmpEntry, SnpConfig, SnpHostile};
pub use tdx::{MockTdx, TdxConfig, TdxEmulationHostile, TdxEvent, TdxHostile, TdxPage, TdxPageState};

/// 4 KiB.
pub const PAGE_SIZE: u64 = 4096;

/// The byte written over a page whose private contents the host can no
/// longer see in clear (or the guest can no longer trust).
pub const SCRIBBLE: u8 = 0xA5;
