//! The only inline assembly of this crate.

/// Invalidates the TLB entry for `va` on this CPU (`invlpg`), for an OS's
/// [`ScratchWindow::invalidate_local`](crate::ScratchWindow::invalidate_local).
///
/// # Safety
///
/// Must run at CPL 0.
#[cfg(target_arch = "x86_64")]
pub unsafe fn invlpg(va: u64) {
    // SAFETY: `invlpg` only drops cached translations; CPL 0 is the
    // caller's obligation.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}
