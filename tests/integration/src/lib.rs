//! Fixtures shared by the integration tests and demos: a guest memory with
//! a TDX or SNP model attached, and, for SNP, a GHCB page set up the way a
//! guest does at boot.
#![deny(missing_docs)]

pub mod fake_cpu;
pub mod invariants;
pub mod lent;
pub mod null;
pub mod signals;
pub mod sim;
pub mod watch;
pub mod world;

use std::ptr::NonNull;
use std::sync::Arc;

use hvmock::{GuestMemory, MockSnp, MockTdx, SnpConfig, TdxConfig};
use snp_ghcb::msr_protocol::PscOp;
use snp_ghcb::{Ghcb, GhcbPage};

/// MiB.
pub const MIB: u64 = 1 << 20;
/// GiB.
pub const GIB: u64 = 1 << 30;

/// Zeroed storage for an unaccepted-memory bitmap: 4096 units, 8 GiB of
/// 2 MiB units.
pub fn bitmap_storage() -> Vec<coco_convert::sync::AtomicU64> {
    (0..64).map(|_| coco_convert::sync::AtomicU64::new(0)).collect()
}

/// A TD of `size` bytes with the given model configuration.
pub fn tdx(size: u64, config: TdxConfig) -> MockTdx {
    MockTdx::new(Arc::new(GuestMemory::new(size)), config)
}

/// An SNP guest of `size` bytes with the given model configuration.
pub fn snp(size: u64, config: SnpConfig) -> MockSnp {
    MockSnp::new(Arc::new(GuestMemory::new(size)), config)
}

/// Where the fixtures put the GHCB: the last page of guest memory.
pub fn ghcb_gpa(snp: &MockSnp) -> u64 {
    snp.memory().size() - 4096
}

/// Does what a guest does at boot to get a GHCB: makes the page shared
/// through the MSR protocol (no GHCB exists yet), registers it, and wraps
/// it.
///
/// # Panics
///
/// If the (honest) model refuses: a fixture error.
pub fn boot_ghcb(snp: &MockSnp) -> GhcbPage {
    let gpa = ghcb_gpa(snp);
    // SAFETY: the model's memory is not used by Rust code; the page becomes
    // the shared GHCB.
    unsafe {
        snp_ghcb::protocol::negotiate(snp).expect("negotiate");
        snp_ghcb::protocol::page_state_change(snp, gpa >> 12, PscOp::Shared).expect("GHCB page to shared");
        snp_ghcb::protocol::register_ghcb(snp, gpa).expect("register GHCB");
        wrap_ghcb(snp, gpa)
    }
}

/// Wraps the page at `gpa` of the model's memory as a GHCB.
///
/// # Safety
///
/// Nothing else may use that page.
pub unsafe fn wrap_ghcb(snp: &MockSnp, gpa: u64) -> GhcbPage {
    let ptr = NonNull::new(snp.memory().ptr(gpa).cast::<Ghcb>()).expect("non-null");
    // SAFETY: the page lies in the model's memory, which outlives the test,
    // and the caller keeps everything else off it.
    unsafe { GhcbPage::new(ptr, gpa) }
}

/// Host virtual address of `gpa` in the model's memory: what PVALIDATE
/// takes (the fixtures' "private mapping").
pub fn va(snp: &MockSnp, gpa: u64) -> u64 {
    snp.memory().ptr(gpa) as u64
}
