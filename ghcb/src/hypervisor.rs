//! The traits through which the crate reaches the CPU and the hypervisor.

use crate::pvalidate::PageSize;

/// Writes the GHCB MSR (0xC001_0130), exits to the hypervisor with VMGEXIT,
/// and returns the MSR's value afterwards.
///
/// Both protocols the crate speaks go through this one operation: the MSR
/// protocol puts a request in the MSR itself; the GHCB protocol puts the
/// GHCB's GPA there and the request in the GHCB page.
///
/// # Safety
///
/// Implementors must act as the hardware does: the only memory the exit may
/// change is memory the guest has made shared with the hypervisor (the
/// GHCB) and, through page state changes, the RMP.
pub unsafe trait GhcbMsr {
    /// One MSR write, VMGEXIT, MSR read.
    ///
    /// # Safety
    ///
    /// The request may change the state of guest pages (page state change)
    /// or end the guest; the caller must ensure that is acceptable, and
    /// that the CPU runs as an SEV-SNP guest at CPL 0.
    unsafe fn vmgexit(&self, msr_value: u64) -> u64;
}

// SAFETY: forwarding keeps the implementation's guarantees.
unsafe impl<T: GhcbMsr + ?Sized> GhcbMsr for &T {
    unsafe fn vmgexit(&self, msr_value: u64) -> u64 {
        // SAFETY: the caller upholds the contract.
        unsafe { (**self).vmgexit(msr_value) }
    }
}

/// What PVALIDATE left in RAX and in the carry flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawPvalidate {
    /// The return code in EAX.
    pub eax: u32,
    /// CF: set when the RMP entry's Validated bit already had the requested
    /// value, so nothing changed.
    pub carry: bool,
}

/// Executes PVALIDATE (AMD APM vol. 3: RAX = virtual address, ECX = page
/// size, EDX = 1 to validate / 0 to rescind).
///
/// # Safety
///
/// Implementors must act as the hardware does: change only the Validated
/// bit of the RMP entries of the page `va` maps.
pub unsafe trait Pvalidate {
    /// One PVALIDATE.
    ///
    /// # Safety
    ///
    /// `va` must map, with the C-bit set, the page to (in)validate, aligned
    /// to `size`. Validating a page makes its current contents usable as
    /// private memory; rescinding makes every private access to it fault.
    /// The caller must ensure both are acceptable to the code using it.
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> RawPvalidate;

    /// Whether the CPU guarantees cache coherency across a page's change
    /// to private, so no eviction is needed after validating: CPUID
    /// Fn8000_001F EBX\[31\], COHERENCY_SFW_NO
    /// ([`coherency_sfw_no`](crate::pvalidate::coherency_sfw_no)). `false`
    /// unless the implementation knows better: evicting is always safe.
    fn coherency_sfw_no(&self) -> bool {
        false
    }

    /// Evicts the cache lines of the `pages` 4 KiB pages at `va`, just
    /// validated: a read of the first and the last byte of each page through
    /// the private mapping flushes every line the page has, on CPUs without
    /// COHERENCY_SFW_NO.
    ///
    /// # Safety
    ///
    /// `va` maps the pages private, readable, for `pages * 4096` bytes.
    unsafe fn evict_cache_lines(&self, va: u64, pages: u64) {
        for page in 0..pages {
            let first = (va + page * 4096) as *const u8;
            // SAFETY: the caller guarantees a readable private mapping; the
            // reads are volatile so they happen, and nothing uses the values.
            unsafe {
                core::ptr::read_volatile(first);
                core::ptr::read_volatile(first.add(4095));
            }
        }
    }
}

// SAFETY: forwarding keeps the implementation's guarantees.
unsafe impl<T: Pvalidate + ?Sized> Pvalidate for &T {
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> RawPvalidate {
        // SAFETY: the caller upholds the contract.
        unsafe { (**self).pvalidate(va, size, validate) }
    }

    fn coherency_sfw_no(&self) -> bool {
        (**self).coherency_sfw_no()
    }

    unsafe fn evict_cache_lines(&self, va: u64, pages: u64) {
        // SAFETY: the caller upholds the contract.
        unsafe { (**self).evict_cache_lines(va, pages) }
    }
}
