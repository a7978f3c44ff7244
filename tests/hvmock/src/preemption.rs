//! A guest instruction that exits to the host (or, as PVALIDATE, takes as
//! long without exiting) gives other CPUs time to run. Under the shuttle
//! schedule explorer (`--cfg shuttle`) each call into a model is therefore
//! a point where the explorer may switch CPUs: before the model acts, and
//! after it too for an exit; otherwise nothing.

/// Each model's own, so that explorations on several test threads share
/// nothing.
#[derive(Debug, Default)]
pub(crate) struct ExitPoints {
    #[cfg(shuttle)]
    count: shuttle::sync::atomic::AtomicUsize,
}

impl ExitPoints {
    /// A point where another CPU may run.
    #[inline]
    pub(crate) fn here(&self) {
        #[cfg(shuttle)]
        self.count.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    }
}
