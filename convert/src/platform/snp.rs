//! The SEV-SNP backend. To shared: PVALIDATE rescind, then Page State
//! Change to shared. To private: Page State Change to private, then
//! PVALIDATE validate. PVALIDATE goes through the private scratch window
//! (the only mapping of the frame while its public aliases are not
//! present); PSC through the calling CPU's GHCB, or the MSR protocol, one
//! page per request, before a GHCB exists and after
//! [`Engine::unshare_all`](crate::Engine::unshare_all) retired them.

use snp_ghcb::msr_protocol::PscOp;
use snp_ghcb::psc::{submit, PscDescriptor, PscEntries};
use snp_ghcb::pvalidate::{pvalidate_range, PvalidateRangeError};
use snp_ghcb::{GhcbMsr, GhcbPage, Pvalidate};

use super::knobs::SnpOptions;
use super::{AcceptFailure, PlatformError, PrivateMap, Runs, SetupError};
use crate::counters::Counters;
use crate::pte::{EncryptionBit, Visibility};
use crate::sync::Mutex;
use crate::Platform;

/// Gives the backend the GHCB slots, one per CPU.
pub trait GhcbProvider {
    /// Every CPU's slot: the calling CPU's is `slots()[cpu()]`, which
    /// [`setup_ghcb`](crate::setup_ghcb) fills and the backend's page state
    /// changes use; all of them are taken out of service when everything
    /// is made private again
    /// ([`Engine::unshare_all`](crate::Engine::unshare_all)). Empty if this
    /// provider keeps no GHCBs. Without a filled slot the backend uses the
    /// MSR protocol.
    fn slots(&self) -> &[GhcbSlot];

    /// The calling CPU's index into [`slots`](Self::slots) (one past the
    /// end: this CPU has no slot).
    fn cpu(&self) -> usize;
}

/// The calling CPU's slot: derived from the list, so the GHCB a CPU uses
/// is always one `unshare_all` retires.
pub(crate) fn own_slot<G: GhcbProvider + ?Sized>(ghcbs: &G) -> Option<&GhcbSlot> {
    ghcbs.slots().get(ghcbs.cpu())
}

/// No GHCB (early boot): every page state change goes through the MSR
/// protocol.
#[derive(Debug, Default)]
pub struct NoGhcb;

impl GhcbProvider for NoGhcb {
    fn slots(&self) -> &[GhcbSlot] {
        &[]
    }

    fn cpu(&self) -> usize {
        0
    }
}

/// One CPU's GHCB, once [`setup_ghcb`](crate::setup_ghcb) has made it.
/// `GhcbSlot::new()` is `const`, so the slots can be a `static` array.
///
/// Only the owning CPU's page state changes, its GHCB setup and
/// [`Engine::unshare_all`](crate::Engine::unshare_all) lock the page;
/// anyone asking whether the slot is filled, or for its GPA, reads a copy
/// of the GPA instead, so a look from another CPU never makes the owner's
/// #VC handler find the page taken.
#[derive(Debug)]
pub struct GhcbSlot {
    page: Mutex<Option<GhcbPage>>,
    /// The page's GPA, or [`EMPTY`](Self::EMPTY): written under the lock.
    gpa: core::sync::atomic::AtomicU64,
}

impl Default for GhcbSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl GhcbSlot {
    /// An empty slot: the CPU uses the MSR protocol until it is filled.
    pub const fn new() -> Self {
        GhcbSlot {
            page: Mutex::new(None),
            gpa: core::sync::atomic::AtomicU64::new(Self::EMPTY),
        }
    }

    /// No GHCB: not a GPA, since a GHCB's is page-aligned.
    const EMPTY: u64 = u64::MAX;

    /// Makes `page` the slot's GHCB.
    pub(crate) fn fill(&self, page: GhcbPage) {
        let mut slot = self.page.lock();
        self.gpa.store(page.gpa(), core::sync::atomic::Ordering::Release);
        *slot = Some(page);
    }

    /// Whether the slot holds a GHCB.
    pub fn is_filled(&self) -> bool {
        self.gpa().is_some()
    }

    /// The GPA of the slot's GHCB.
    pub fn gpa(&self) -> Option<u64> {
        match self.gpa.load(core::sync::atomic::Ordering::Acquire) {
            Self::EMPTY => None,
            gpa => Some(gpa),
        }
    }

    /// Lends the slot's GHCB to `f`, for this CPU's #VC handler
    /// ([`handle_vc`](crate::exception::vc::handle_vc)), which must use the
    /// page registered for the CPU. `None` if the slot is empty, or if a
    /// page state change of this CPU holds the page: the #VC interrupted
    /// it (an interrupt handler's port I/O in the middle of a conversion),
    /// and the page holds that request; or while the slot is being filled
    /// or emptied ([`setup_ghcb`](crate::setup_ghcb),
    /// [`Engine::unshare_all`](crate::Engine::unshare_all)). Never waits,
    /// so a #VC cannot deadlock on its own CPU's conversion. Another CPU
    /// asking [`is_filled`](Self::is_filled) or [`gpa`](Self::gpa) takes
    /// no lock, so it never causes a `None`.
    ///
    /// The engine itself executes no instruction that raises #VC while it
    /// holds the page. An OS whose interrupt handlers may take a #VC during
    /// a conversion either keeps them off the CPU meanwhile, or, on `None`,
    /// does as Linux's backup GHCB: copies the page it registered to
    /// private memory, handles the #VC through it, and copies it back.
    pub fn try_with<T>(&self, f: impl FnOnce(&mut GhcbPage) -> T) -> Option<T> {
        self.page.try_lock()?.as_mut().map(f)
    }

    /// Empties the slot: the CPU uses the MSR protocol from now on.
    pub(crate) fn take(&self) -> Option<GhcbPage> {
        let mut slot = self.page.lock();
        self.gpa.store(Self::EMPTY, core::sync::atomic::Ordering::Release);
        slot.take()
    }
}

/// One GHCB slot per CPU, filled as each CPU sets its GHCB up (see
/// [`setup_ghcb`](crate::setup_ghcb)). `cpu` returns the calling CPU's
/// index.
#[derive(Debug)]
pub struct PerCpuGhcbs<'a> {
    slots: &'a [GhcbSlot],
    cpu: fn() -> usize,
}

impl<'a> PerCpuGhcbs<'a> {
    /// Slots in `slots`, indexed by `cpu()`.
    pub const fn new(slots: &'a [GhcbSlot], cpu: fn() -> usize) -> Self {
        PerCpuGhcbs { slots, cpu }
    }
}

impl GhcbProvider for PerCpuGhcbs<'_> {
    fn slots(&self) -> &[GhcbSlot] {
        self.slots
    }

    fn cpu(&self) -> usize {
        (self.cpu)()
    }
}

/// SEV-SNP over a [`GhcbMsr`] and a [`Pvalidate`] (the instructions, or a
/// model), with GHCBs from `G`.
#[derive(Debug)]
pub struct Snp<H: GhcbMsr, P: Pvalidate, G: GhcbProvider> {
    hv: H,
    pvalidate: P,
    ghcbs: G,
    encryption: EncryptionBit,
    options: SnpOptions,
}

impl<H: GhcbMsr, P: Pvalidate, G: GhcbProvider> Snp<H, P, G> {
    /// A backend for C-bit position `c_bit` (CPUID 0x8000001F EBX\[5:0\],
    /// or what [`negotiate`](Self::negotiate) finds): 32 to 51, a bit of
    /// the physical address a page-table entry holds.
    pub fn new(hv: H, pvalidate: P, ghcbs: G, c_bit: u8) -> Result<Self, SetupError> {
        let encryption = EncryptionBit::snp(c_bit)
            .filter(|_| (32..=51).contains(&c_bit))
            .ok_or(SetupError::InvalidCBit(c_bit))?;
        Ok(Snp {
            hv,
            pvalidate,
            ghcbs,
            encryption,
            options: SnpOptions::MINIMAL,
        })
    }

    /// A backend configured through the GHCB MSR protocol: SEV information
    /// (the protocol version we speak and the C-bit position) and the
    /// hypervisor's features (SEV-SNP required). Usable before any GHCB
    /// exists.
    ///
    /// # Safety
    ///
    /// As for [`GhcbMsr::vmgexit`] (the requests change no memory).
    pub unsafe fn negotiate(hv: H, pvalidate: P, ghcbs: G) -> Result<Self, SetupError> {
        // SAFETY: forwarded to the caller.
        let info = unsafe { snp_ghcb::protocol::negotiate(&hv) }.map_err(SetupError::Negotiation)?;
        // SAFETY: as above.
        unsafe { snp_ghcb::protocol::hv_features(&hv) }.map_err(SetupError::Negotiation)?;
        Self::new(hv, pvalidate, ghcbs, info.c_bit)
    }

    /// The same backend with other batching.
    #[cfg(feature = "test-knobs")]
    pub fn with_options(self, options: SnpOptions) -> Self {
        Snp {
            options: SnpOptions {
                psc_entries_per_exit: options.psc_entries_per_exit.clamp(1, snp_ghcb::psc::MAX_ENTRIES),
                ..options
            },
            ..self
        }
    }

    /// The same backend marking private pages in PTEs with another bit than
    /// the C-bit: for an emulated platform, a bit the MMU ignores.
    #[cfg(feature = "test-knobs")]
    pub fn with_pte_bit(self, bit: EncryptionBit) -> Self {
        Snp {
            encryption: bit,
            ..self
        }
    }

    /// The hypervisor interface.
    pub fn hypervisor(&self) -> &H {
        &self.hv
    }

    /// The GHCB provider.
    pub fn ghcbs(&self) -> &G {
        &self.ghcbs
    }

    /// Whether 2 MiB pieces may be used for `runs`, given the option.
    fn huge(&self, runs: Runs<'_>, option: bool) -> bool {
        option && (self.options.huge_for_scattered || matches!(runs, Runs::One { .. }))
    }

    /// Page state change of every frame of `runs`: through this CPU's GHCB,
    /// or the MSR protocol before it has one.
    ///
    /// # Safety
    ///
    /// As for [`Platform::convert`].
    unsafe fn page_state_change(&self, runs: Runs<'_>, op: PscOp, counters: &Counters) -> Result<(), PlatformError> {
        // Held across the exits: the GHCB is this CPU's alone.
        let mut slot = own_slot(&self.ghcbs).map(|slot| slot.page.lock());
        match slot.as_mut().and_then(|page| (**page).as_mut()) {
            Some(ghcb) => {
                let mut desc = PscDescriptor::default();
                let entries = runs.iter().flat_map(|(pa, len)| {
                    PscEntries::new(pa, len, op, self.huge(runs, self.options.psc_2m))
                        .into_iter()
                        .flatten()
                });
                for entry in entries {
                    desc.push(entry);
                    if desc.entries().len() == self.options.psc_entries_per_exit {
                        // SAFETY: the engine guarantees no alias is present.
                        unsafe { self.submit(ghcb, &desc, counters)? };
                        desc.clear();
                    }
                }
                // SAFETY: as above.
                unsafe { self.submit(ghcb, &desc, counters) }
            }
            None => {
                for frame in runs.frames() {
                    Counters::add(&counters.psc_msr, 1);
                    // SAFETY: as above.
                    unsafe { snp_ghcb::protocol::page_state_change(&self.hv, frame >> 12, op) }
                        .map_err(PlatformError::PscMsr)?;
                }
                Ok(())
            }
        }
    }

    /// # Safety
    ///
    /// As for [`Platform::convert`], for the descriptor's frames.
    unsafe fn submit(
        &self,
        ghcb: &mut GhcbPage,
        desc: &PscDescriptor,
        counters: &Counters,
    ) -> Result<(), PlatformError> {
        if desc.is_empty() {
            return Ok(());
        }
        // SAFETY: forwarded from `page_state_change`.
        let done = unsafe { submit(ghcb, &self.hv, desc) };
        match done {
            Ok(d) => {
                Counters::add(&counters.psc_exits, d.exits);
                Counters::add(&counters.psc_entries, d.entries);
                Ok(())
            }
            Err(e) => {
                Counters::add(&counters.psc_exits, 1);
                Err(PlatformError::Psc(e))
            }
        }
    }

    /// PVALIDATE of every frame of `runs` through the scratch window.
    ///
    /// # Safety
    ///
    /// As for [`Platform::convert`].
    unsafe fn pvalidate(
        &self,
        runs: Runs<'_>,
        validate: bool,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), PvalidateFailure> {
        let Some(window) = window else {
            return Err(PvalidateFailure {
                error: PlatformError::NoScratchWindow,
                failed_at: runs.iter().next().map_or(0, |(pa, _)| pa),
            });
        };
        let huge = 2 << 20;
        let result = runs.iter().try_for_each(|(pa, len)| {
            let end = pa + len;
            let mut cursor = pa;
            while cursor < end {
                let whole_2m = self.huge(runs, self.options.pvalidate_2m) && cursor % huge == 0 && end - cursor >= huge;
                let (va, bytes) = if whole_2m {
                    (window.map_2m(cursor), huge)
                } else {
                    let bytes = (end.min((cursor / huge + 1) * huge)) - cursor;
                    (window.map_4k(cursor, bytes / 4096), bytes)
                };
                // SAFETY: `va` is the window's private mapping of the
                // frames, the only mapping present.
                let calls = unsafe { pvalidate_range(&self.pvalidate, va, bytes, validate, whole_2m) };
                match calls {
                    Ok(c) => Counters::add(&counters.pvalidate, c.calls),
                    Err(e) => {
                        Counters::add(&counters.pvalidate, 1);
                        // The pages before the failing one were changed.
                        let failed_at = match e {
                            PvalidateRangeError::Page { va: at, .. } => cursor + (at - va),
                            _ => cursor,
                        };
                        return Err(PvalidateFailure {
                            error: PlatformError::Pvalidate(e),
                            failed_at,
                        });
                    }
                }
                cursor += bytes;
            }
            Ok(())
        });
        window.unmap();
        result
    }
}

/// A failed PVALIDATE pass: why, and the first page it did not change.
struct PvalidateFailure {
    error: PlatformError,
    failed_at: u64,
}

impl<H: GhcbMsr, P: Pvalidate, G: GhcbProvider> Platform for Snp<H, P, G> {
    fn encryption(&self) -> EncryptionBit {
        self.encryption
    }

    fn needs_private_map(&self) -> bool {
        true
    }

    /// One page state change exit's worth of 2 MiB entries.
    fn accept_call_bytes(&self) -> u64 {
        self.options.psc_entries_per_exit as u64 * (2 << 20)
    }

    /// One page state change exit's worth of entries through the GHCB;
    /// one frame through the MSR protocol, which takes a page a request.
    fn request_frames(&self, runs: Runs<'_>) -> usize {
        if !own_slot(&self.ghcbs).is_some_and(GhcbSlot::is_filled) {
            return 1;
        }
        // Entries the same as `page_state_change` makes (the direction
        // does not change their sizes).
        let huge = self.huge(runs, self.options.psc_2m);
        let entries = runs
            .iter()
            .flat_map(|(pa, len)| PscEntries::new(pa, len, PscOp::Private, huge).into_iter().flatten());
        let pages: u64 = entries.take(self.options.psc_entries_per_exit).map(|e| e.pages()).sum();
        usize::try_from(pages).unwrap_or(usize::MAX)
    }

    fn for_each_own_shared(&self, f: &mut dyn FnMut(u64)) {
        self.ghcbs.slots().iter().filter_map(GhcbSlot::gpa).for_each(f);
    }

    fn retire_own_shared(&self) {
        for slot in self.ghcbs.slots() {
            slot.take();
        }
    }

    unsafe fn convert(
        &self,
        runs: Runs<'_>,
        to: Visibility,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), PlatformError> {
        match to {
            Visibility::Shared => {
                // SAFETY: the engine guarantees that no alias of the frames
                // is present except the scratch window, and that nothing
                // relies on their contents.
                unsafe { self.pvalidate(runs, false, window, counters) }.map_err(|f| f.error)?;
                // SAFETY: as above.
                unsafe { self.page_state_change(runs, PscOp::Shared, counters) }
            }
            Visibility::Private => {
                // SAFETY: as above.
                unsafe { self.page_state_change(runs, PscOp::Private, counters)? };
                // SAFETY: as above.
                unsafe { self.pvalidate(runs, true, window, counters) }.map_err(|f| f.error)
            }
        }
    }

    unsafe fn accept(
        &self,
        pa: u64,
        len: u64,
        window: Option<&mut dyn PrivateMap>,
        counters: &Counters,
    ) -> Result<(), AcceptFailure> {
        let runs = Runs::One { pa, len };
        // Which entries a failed page state change reached is not reported:
        // the whole range is in doubt.
        // SAFETY: forwarded from the caller: nothing uses the frames.
        unsafe { self.page_state_change(runs, PscOp::Private, counters) }.map_err(|error| AcceptFailure {
            error,
            accepted_below: pa,
        })?;
        // PVALIDATE goes in address order: the pages before the failing
        // one are private and validated.
        // SAFETY: as above.
        unsafe { self.pvalidate(runs, true, window, counters) }.map_err(|f| AcceptFailure {
            error: f.error,
            accepted_below: f.failed_at,
        })
    }

    fn terminate(&self, reason: u8) {
        // SAFETY: a termination request changes no memory.
        unsafe { snp_ghcb::protocol::terminate(&self.hv, snp_ghcb::protocol::reason::SET_GENERAL, reason) };
    }
}
