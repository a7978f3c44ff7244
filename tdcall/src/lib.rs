//! Intel TDX guest ABI for confidential-memory conversion.
//!
//! Every call goes through the [`Tdcall`] trait, at register level: the real
//! implementation ([`TdcallInstruction`]) executes `TDCALL`; a test harness
//! implements the same trait with a model of the TDX module and the VMM. On
//! top of it sit typed wrappers for the leaves a guest needs to convert
//! memory and to handle the #VEs of a TD:
//!
//! - [`vp_info`], TDG.VP.INFO (GPA width, the shared-bit mask, TD attributes);
//! - [`ve_info`], TDG.VP.VEINFO.GET (what caused a #VE);
//! - [`accept_page`] / [`accept_range`], TDG.MEM.PAGE.ACCEPT, largest aligned
//!   size first;
//! - [`map_gpa`], TDG.VP.VMCALL\<MapGPA\> with a checked, bounded retry loop;
//! - [`report_fatal_error`], TDG.VP.VMCALL\<ReportFatalError\>;
//! - the instructions a #VE handler has the VMM carry out:
//!   [`io_read`] / [`io_write`] (TDG.VP.VMCALL\<Instruction.IO\>, port I/O
//!   of an [`IoSize`]), [`cpuid`] (\<Instruction.CPUID\>, for the
//!   [`VMM_CPUID_LEAVES`]), [`rdmsr`] / [`wrmsr`]
//!   (\<Instruction.RDMSR\>, \<Instruction.WRMSR\>). Data the VMM returns
//!   is cut to what the instruction could have produced.
//!
//! Every value the TDX module or the VMM returns is decoded into a typed
//! result; nothing the host controls can make these functions panic or loop
//! forever.
//!
//! # Features
//!
//! None. The crate never allocates and needs no heap.
//!
//! References: Intel TDX Module v1.5 ABI Specification (TDCALL leaves and
//! completion status codes), Intel TDX Guest-Hypervisor Communication
//! Interface (GHCI) v1.5 (TDG.VP.VMCALL sub-functions) and the Intel SDM
//! (VMX basic exit reasons, CPUID).
#![no_std]
#![deny(missing_docs)]

mod accept;
mod cpuid;
mod fatal;
mod info;
mod instruction;
mod map_gpa;
mod msr;
mod page;
mod port_io;
mod regs;
mod status;
mod veinfo;
mod vmcall;

pub use accept::{accept_page, accept_range, AcceptCalls, AcceptError, BUSY_RETRY_LIMIT};
pub use cpuid::{cpuid, CpuidResult, VMM_CPUID_LEAVES};
pub use fatal::report_fatal_error;
pub use info::{vp_info, InfoError, TdAttributes, TdInfo};
pub use instruction::TdcallInstruction;
pub use map_gpa::{map_gpa, MapGpaCalls, MapGpaError, Visibility, MAX_RETRIES_WITHOUT_PROGRESS};
pub use msr::{rdmsr, wrmsr};
pub use page::{PageLevel, PAGE_SIZE};
pub use port_io::{io_read, io_write, IoSize};
pub use regs::{leaf, Registers, Tdcall};
pub use status::{TdxError, TdxStatus};
pub use veinfo::{ve_info, VeInfo};
pub use vmcall::{subfunction, tdvmcall, VmcallError, VmcallStatus, VMCALL_EXPOSED_REGS};
