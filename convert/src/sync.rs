//! Every primitive the engine synchronises CPUs with: the per-frame state
//! bytes, the table lock (which also guards the deferred table frees), the
//! alias registry's locks and reader counts, the pool's lock, and the
//! counter that tells a conversion to plan again.
//!
//! In a normal build these are `core`'s atomics and `spin`'s mutex, so the
//! types in the public API ([`StateTable::new`](crate::StateTable::new)
//! takes `&[AtomicU8]`) are `core`'s own. Built with `--cfg shuttle`, they
//! are the [shuttle](https://docs.rs/shuttle) schedule explorer's, so every
//! claim, lock and counter update is a point where the explorer may switch
//! CPUs, and the engine's own code runs under random and PCT schedules.
//! Page-table entries stay `core` atomics in both builds: the engine writes
//! them only under the table lock, and the hardware walkers that race with
//! those writes are modelled by the protocol model, not here.

#[cfg(not(shuttle))]
mod imp {
    pub use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};

    /// A spinning mutex for `#![no_std]` kernels.
    pub type Mutex<T> = spin::Mutex<T>;
    /// Its guard.
    pub type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;

    /// Waiting for another CPU.
    #[inline]
    pub fn spin_loop() {
        core::hint::spin_loop();
    }
}

#[cfg(shuttle)]
mod imp {
    extern crate std;

    pub use shuttle::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};

    /// The explorer's mutex with `spin`'s interface: a poisoned lock means
    /// a panic on another thread, which already fails the schedule.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    /// Its guard.
    pub type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A mutex holding `value`.
        pub const fn new(value: T) -> Self {
            Mutex(shuttle::sync::Mutex::new(value))
        }

        /// Waits for the lock.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        /// Whether some thread holds it.
        pub fn is_locked(&self) -> bool {
            self.0.try_lock().is_err()
        }

        /// The lock if free now.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
    }

    /// Waiting for another CPU: a point where the explorer must switch.
    pub fn spin_loop() {
        shuttle::hint::spin_loop();
    }
}

pub use imp::*;
