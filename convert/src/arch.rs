//! TLB invalidation on the calling CPU, for an OS's
//! [`ScratchWindow::invalidate_local`](crate::ScratchWindow::invalidate_local)
//! and its shootdown handler.

/// Invalidates the TLB entry for `va` on this CPU (`invlpg`), and with it
/// every paging-structure cache entry of the current PCID.
///
/// # Safety
///
/// Must run at CPL 0.
#[cfg(target_arch = "x86_64")]
pub unsafe fn invlpg(va: u64) {
    // SAFETY: `invlpg` only drops cached translations; CPL 0 is the
    // caller's obligation.
    unsafe { x86::tlb::flush(va as usize) };
}

/// Invalidates every non-global TLB entry on this CPU (CR3 reloaded).
///
/// # Safety
///
/// Must run at CPL 0.
#[cfg(target_arch = "x86_64")]
pub unsafe fn flush_all() {
    // SAFETY: rewriting CR3 with its own value changes no mapping; CPL 0
    // is the caller's obligation.
    unsafe { x86::tlb::flush_all() };
}

/// Invalidates `[va, va + len)` on this CPU: page by page up to 64 pages,
/// beyond that by reloading CR3, which costs less than hundreds of
/// `invlpg`.
///
/// # Safety
///
/// Must run at CPL 0.
#[cfg(target_arch = "x86_64")]
pub unsafe fn invalidate_range(va: u64, len: u64) {
    const MOST_BY_PAGE: u64 = 64;
    if len.div_ceil(4096) > MOST_BY_PAGE {
        // SAFETY: forwarded to the caller.
        unsafe { flush_all() };
    } else {
        for page in (va & !0xFFF..va.saturating_add(len)).step_by(4096) {
            // SAFETY: forwarded to the caller.
            unsafe { invlpg(page) };
        }
    }
}
