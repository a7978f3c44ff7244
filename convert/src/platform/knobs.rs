//! Knobs for tests and benchmarks, not for production guests (feature
//! `test-knobs`): batching other than the fewest calls, for comparing with
//! Linux's strategy. A production guest always gets the fewest calls.

use snp_ghcb::psc::MAX_ENTRIES;

/// How the backend batches its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdxOptions {
    /// One MapGPA (and one largest-first ACCEPT sweep) per contiguous
    /// physical run. Off: one per 4 KiB frame of a scattered batch, as
    /// Linux does for vmalloc buffers.
    pub coalesce_runs: bool,
}

impl TdxOptions {
    /// The fewest calls.
    pub const MINIMAL: TdxOptions = TdxOptions { coalesce_runs: true };
    /// Linux's strategy, for comparison.
    #[cfg(feature = "test-knobs")]
    pub const LINUX: TdxOptions = TdxOptions { coalesce_runs: false };
}

/// How the backend batches its calls. The defaults are the fewest calls
/// the ABIs allow; [`SnpOptions::LINUX`] reproduces what Linux does today,
/// for comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnpOptions {
    /// Entries per PSC descriptor (at most 253).
    pub psc_entries_per_exit: usize,
    /// Use 2 MiB PSC entries where aligned.
    pub psc_2m: bool,
    /// Use 2 MiB PVALIDATE where aligned.
    pub pvalidate_2m: bool,
    /// Allow 2 MiB entries and PVALIDATE for the frames of a scattered
    /// (vmalloc-style) batch too, where they happen to form an aligned 2 MiB.
    pub huge_for_scattered: bool,
}

impl SnpOptions {
    /// The fewest calls: full descriptors, 2 MiB wherever aligned.
    pub const MINIMAL: SnpOptions = SnpOptions {
        psc_entries_per_exit: MAX_ENTRIES,
        psc_2m: true,
        pvalidate_2m: true,
        huge_for_scattered: true,
    };
    /// Linux's strategy: 64-entry descriptors, 4 KiB PSC and PVALIDATE for
    /// vmalloc frames (2 MiB for aligned contiguous ranges).
    #[cfg(feature = "test-knobs")]
    pub const LINUX: SnpOptions = SnpOptions {
        psc_entries_per_exit: 64,
        psc_2m: true,
        pvalidate_2m: true,
        huge_for_scattered: false,
    };
}

impl Default for SnpOptions {
    fn default() -> Self {
        Self::MINIMAL
    }
}
