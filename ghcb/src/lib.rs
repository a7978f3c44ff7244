//! AMD SEV-SNP guest ABI for confidential-memory conversion.
//!
//! - [`layout::Ghcb`]: the 4 KiB Guest-Hypervisor Communication Block, with
//!   every field offset checked at compile time, and [`GhcbPage`], the only
//!   way to touch one: volatile accesses, the valid bitmap kept in step,
//!   host-written values copied out once.
//! - [`msr_protocol`]: the GHCB MSR protocol (usable before any GHCB exists)
//!   as typed requests and checked responses, and [`protocol`]: SEV
//!   information and version negotiation, hypervisor features, GHCB
//!   registration, single-page Page State Change, termination.
//! - [`psc`]: the Page State Change NAE event with its descriptor builder
//!   and a resume loop that checks every header the hypervisor writes.
//! - [`pvalidate`]: PVALIDATE, typed, with a 2 MiB-then-4 KiB range helper.
//! - The NAE events a #VC handler forwards: [`ioio`] (port IN/OUT, with a
//!   typed access size), [`cpuid`], [`msr`] (RDMSR/WRMSR). Each checks the
//!   answer as [`event`] describes: SW_EXITINFO1\[31:0\] must be 0, an
//!   exception the hypervisor asks for comes back typed
//!   ([`EventError::Exception`]), every register read back must be marked
//!   valid, and only the bits the instruction writes are kept. CPUID
//!   answers are the hypervisor's word (see [`cpuid`] on the SNP CPUID
//!   page).
//!
//! Hardware access goes through two traits, [`GhcbMsr`] (write the GHCB MSR,
//! VMGEXIT, read it back) and [`Pvalidate`], so a model of the hypervisor
//! and of the RMP can stand in for the CPU in tests. The real instructions
//! live in one small module ([`GhcbMsrInstruction`], [`PvalidateInstruction`]).
//!
//! # Features
//!
//! None. The crate never allocates and needs no heap.
//!
//! Reference: AMD "SEV-ES Guest-Hypervisor Communication Block
//! Standardization", publication #56421 (the GHCB spec), revision 2.03
//! (protocol version 2); AMD64 Architecture Programmer's Manual vol. 2
//! (section 15.10.2, the IOIO intercept information; section 15.20, the
//! EVENTINJ format) and vol. 3 (PVALIDATE).
#![no_std]
#![deny(missing_docs)]

pub mod cpuid;
pub mod event;
mod hypervisor;
mod instruction;
pub mod ioio;
pub mod layout;
pub mod msr;
pub mod msr_protocol;
mod page;
pub mod protocol;
pub mod psc;
pub mod pvalidate;

pub use event::{EventError, Exception};
pub use hypervisor::{GhcbMsr, Pvalidate, RawPvalidate};
pub use instruction::{GhcbMsrInstruction, PvalidateInstruction};
pub use ioio::{IoSize, PortAccess};
pub use layout::{Field, Ghcb, GHCB_PROTOCOL_VERSION};
pub use page::{GhcbPage, NaeError};
pub use pvalidate::PageSize;
