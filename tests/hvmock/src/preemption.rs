//! A guest instruction that exits to the host takes a long time, and other
//! CPUs run meanwhile. Under the shuttle schedule explorer (`--cfg
//! shuttle`) each exit into a model is therefore a point where the explorer
//! may switch CPUs, before and after the model acts; otherwise nothing.

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
