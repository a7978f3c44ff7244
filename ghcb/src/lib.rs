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
//! Standardization", publication #56421 (the GHCB spec), version 2; AMD64
//! Architecture Programmer's Manual vol. 3 (PVALIDATE).
#![no_std]
#![deny(missing_docs)]

mod hypervisor;
mod instruction;
pub mod layout;
pub mod msr_protocol;
mod page;
pub mod protocol;
pub mod psc;
pub mod pvalidate;

pub use hypervisor::{GhcbMsr, Pvalidate, RawPvalidate};
pub use instruction::{GhcbMsrInstruction, PvalidateInstruction};
pub use layout::{Field, Ghcb, GHCB_PROTOCOL_VERSION};
pub use page::{GhcbPage, NaeError};
pub use pvalidate::PageSize;
