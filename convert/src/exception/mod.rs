//! Exception handlers a confidential guest cannot do without: the TDX #VE
//! handler ([`ve`]) and the SEV-SNP #VC handler ([`vc`]), for the
//! instructions the host must carry out for the guest (CPUID, RDMSR/WRMSR,
//! port I/O), and the saved registers they work on ([`RegisterAccess`]).
//!
//! Every value the host returns is checked before it reaches a register:
//! a handler either completes the instruction (registers written, RIP past
//! it) or changes nothing and says why.

mod registers;
pub mod vc;
pub mod ve;

pub use registers::{FaultFrame, Gpr, RegisterAccess};
