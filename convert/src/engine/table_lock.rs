//! The table lock: the spin mutex that serialises page-table changes and
//! guards the deferred table frees. With the `lock-stats` feature it can
//! also count its acquisitions and the time it is held, while switched on.

use core::ops::{Deref, DerefMut};

use crate::deferred::Deferred;
use crate::sync::{Mutex, MutexGuard};

pub(crate) struct TableLock {
    mutex: Mutex<Deferred>,
    #[cfg(feature = "lock-stats")]
    stats: stats::Stats,
}

/// The table lock held. Released when dropped.
pub(crate) struct TableGuard<'a> {
    // Declared first so that it drops first: the hold ends where the
    // release begins, not after it.
    #[cfg(feature = "lock-stats")]
    _held: Option<stats::Held<'a>>,
    guard: MutexGuard<'a, Deferred>,
}

impl TableLock {
    pub(crate) fn new() -> Self {
        TableLock {
            mutex: Mutex::new(Deferred::new()),
            #[cfg(feature = "lock-stats")]
            stats: stats::Stats::new(),
        }
    }

    pub(crate) fn lock(&self) -> TableGuard<'_> {
        let guard = self.mutex.lock();
        TableGuard {
            #[cfg(feature = "lock-stats")]
            _held: self.stats.acquired(),
            guard,
        }
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.mutex.is_locked()
    }

    #[cfg(feature = "lock-stats")]
    pub(crate) fn stats(&self) -> LockStats {
        self.stats.snapshot()
    }

    #[cfg(feature = "lock-stats")]
    pub(crate) fn record_stats(&self, on: bool) {
        self.stats.record(on);
    }
}

impl Deref for TableGuard<'_> {
    type Target = Deferred;

    fn deref(&self) -> &Deferred {
        &self.guard
    }
}

impl DerefMut for TableGuard<'_> {
    fn deref_mut(&mut self) -> &mut Deferred {
        &mut self.guard
    }
}

#[cfg(feature = "lock-stats")]
pub use stats::LockStats;

#[cfg(feature = "lock-stats")]
mod stats {
    // Plain atomics even under the schedule explorer: these are
    // measurements, not synchronisation.
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// How often the engine's table lock was taken and how long it was
    /// held, since the engine was created. Read with
    /// [`Engine::lock_stats`](crate::Engine::lock_stats); only with the
    /// `lock-stats` feature, and counted only while switched on with
    /// [`Engine::record_lock_stats`](crate::Engine::record_lock_stats).
    ///
    /// Hold times are in ticks of the time-stamp counter (`RDTSC`) on
    /// x86_64, read as the lock is taken and as it is released; the caller
    /// converts them to time at its TSC's rate. On other architectures
    /// `held_ticks` stays zero and only acquisitions are counted.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LockStats {
        /// Times the lock was taken: by conversions, acceptances, collapses,
        /// [`Engine::translate`](crate::Engine::translate),
        /// [`Engine::with_table_lock`](crate::Engine::with_table_lock) and
        /// the other calls that read or change the tables.
        pub acquisitions: u64,
        /// Ticks it was held, summed over every acquisition.
        pub held_ticks: u64,
    }

    impl LockStats {
        /// The counts from `earlier` to `self`.
        pub fn since(&self, earlier: &LockStats) -> LockStats {
            LockStats {
                acquisitions: self.acquisitions - earlier.acquisitions,
                held_ticks: self.held_ticks - earlier.held_ticks,
            }
        }
    }

    #[derive(Default)]
    pub(super) struct Stats {
        // Off by default: a kernel may build the feature in and pay one
        // relaxed load per acquisition until someone wants the figures.
        recording: AtomicBool,
        acquisitions: AtomicU64,
        held_ticks: AtomicU64,
    }

    /// One hold: recorded when dropped.
    pub(super) struct Held<'a> {
        stats: &'a Stats,
        since: u64,
    }

    impl Stats {
        pub(super) fn new() -> Self {
            Stats::default()
        }

        pub(super) fn acquired(&self) -> Option<Held<'_>> {
            self.recording.load(Ordering::Relaxed).then(|| Held {
                stats: self,
                since: now(),
            })
        }

        pub(super) fn record(&self, on: bool) {
            self.recording.store(on, Ordering::Relaxed);
        }

        pub(super) fn snapshot(&self) -> LockStats {
            LockStats {
                acquisitions: self.acquisitions.load(Ordering::Relaxed),
                held_ticks: self.held_ticks.load(Ordering::Relaxed),
            }
        }
    }

    impl Drop for Held<'_> {
        fn drop(&mut self) {
            // A TSC read on another CPU than the first may lag it a little:
            // a hold never counts as negative.
            let held = now().saturating_sub(self.since);
            self.stats.acquisitions.fetch_add(1, Ordering::Relaxed);
            self.stats.held_ticks.fetch_add(held, Ordering::Relaxed);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn now() -> u64 {
        // SAFETY: RDTSC reads a counter and changes nothing; every x86_64
        // CPU has it. Not serialising: a reading may move by a few cycles
        // against the lock operation beside it, small beside a hold.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn now() -> u64 {
        0
    }
}
