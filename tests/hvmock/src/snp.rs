//! A model of an SEV-SNP hypervisor and of the RMP.
//!
//! As for the TDX model, the ABI constants and GHCB offsets are transcribed
//! from the GHCB spec (#56421 v2) and the APM independently of the `snp-ghcb`
//! crate, so the two check each other.
//!
//! Besides page state changes, the model answers the NAE events a #VC
//! handler forwards (port I/O, CPUID, RDMSR/WRMSR) on the VMM's emulated
//! devices ([`emulation`](crate::emulation)): see [`nae`].

use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use snp_ghcb::{GhcbMsr, PageSize, Pvalidate, RawPvalidate};
use spin::Mutex;

use crate::emulation::Emulated;
use crate::memory::GuestMemory;
use crate::pagewalk::{AliasCheck, GuestPageTables, Violation};
use crate::{PAGE_SIZE, SCRIBBLE};

pub mod nae;

pub use nae::{GhcbReg, NaeInputs};

// GHCB MSR protocol function codes, GHCBData[11:0].
const SEV_INFO_REQ: u64 = 0x002;
const SEV_INFO_RESP: u64 = 0x001;
const CPUID_REQ: u64 = 0x004;
const CPUID_RESP: u64 = 0x005;
const REGISTER_REQ: u64 = 0x012;
const REGISTER_RESP: u64 = 0x013;
const PSC_REQ: u64 = 0x014;
const PSC_RESP: u64 = 0x015;
const FEATURES_REQ: u64 = 0x080;
const FEATURES_RESP: u64 = 0x081;
const TERMINATE_REQ: u64 = 0x100;

// GHCB layout.
pub(crate) const OFF_SW_EXIT_CODE: u64 = 0x390;
pub(crate) const OFF_SW_EXIT_INFO_1: u64 = 0x398;
const OFF_SW_EXIT_INFO_2: u64 = 0x3A0;
const OFF_SW_SCRATCH: u64 = 0x3A8;
pub(crate) const OFF_VALID_BITMAP: u64 = 0x3F0;
const OFF_SHARED_BUFFER: u64 = 0x800;
const SHARED_BUFFER_END: u64 = 0xFF0;
const OFF_VERSION_USAGE: u64 = 0xFF8; // protocol_version at 0xFFA, usage at 0xFFC
const PSC_EXIT: u64 = 0x8000_0010;
const PSC_MAX_ENTRIES: u64 = 253;

// SW_EXITINFO2 error values (as Linux/KVM define them for PSC).
/// The PSC header is malformed.
pub const PSC_INVALID_HDR: u64 = 0x1_0000_0001;
/// A PSC entry is malformed.
pub const PSC_INVALID_ENTRY: u64 = 0x1_0000_0002;
/// A generic PSC error.
pub const PSC_ERROR_GENERIC: u64 = 0x100 << 32;
/// The GHCB request itself is malformed (our choice of code).
pub const GHCB_MALFORMED: u64 = 0x1;

// PVALIDATE return codes (APM vol. 3).
const FAIL_INPUT: u32 = 1;
const FAIL_SIZEMISMATCH: u32 = 6;

/// One RMP entry, per 4 KiB page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RmpEntry {
    /// Assigned to the guest (private).
    pub assigned: bool,
    /// The guest has validated it.
    pub validated: bool,
    /// Part of a 2 MiB RMP entry.
    pub huge: bool,
}

/// Ways the hypervisor lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnpHostile {
    /// Does one page on the first PSC exit of a request, then resets
    /// cur_entry to 0 on the next.
    PscCurEntryBackwards,
    /// Raises end_entry by one.
    PscEndEntryRaised,
    /// Does one page on the first exit, then lowers end_entry to
    /// cur_entry - 1 so the guest loop would end early.
    PscEndEntryLowered,
    /// Sets the header's reserved field.
    PscReservedSet,
    /// Writes a PSC error into SW_EXITINFO2.
    PscExitInfo2Error,
    /// Reports a hypervisor error in SW_EXITINFO1.
    PscExitInfo1Error,
    /// Returns without doing anything, forever.
    PscStall,
    /// Does one page on the first exit, then rewrites the GFN of the last
    /// (unprocessed) entry.
    PscRewriteDescriptor,
    /// Claims every entry done without changing the RMP.
    PscSuccessWithoutRmpChange,
    /// MSR responses carry the wrong function code.
    MsrWrongCode,
    /// GHCB registration echoes another GFN.
    MsrWrongGfn,
    /// MSR responses have reserved bits set.
    MsrReservedBits,
    /// MSR page state changes answer with error code 1.
    MsrPscError,
    /// MSR page state changes answer success without changing the RMP.
    MsrPscWithoutRmpChange,
    /// Port I/O, CPUID, MSR events: the answer is written, but no register
    /// of it is marked valid.
    NaeNothingValid,
    /// Port I/O, CPUID, MSR events: this register of the answer is written
    /// but not marked valid.
    NaeNotValid(GhcbReg),
    /// Port I/O, CPUID, MSR events: bits of each answer register the
    /// instruction does not write (above an IN's size, above bit 31 for
    /// CPUID and RDMSR) are set where this value has them.
    NaeGarbageAbove(u64),
    /// Port I/O, CPUID, MSR events: SW_EXITINFO1 is this value (and
    /// SW_EXITINFO2 0), registers answered as usual.
    NaeExitInfo1(u64),
    /// Port I/O, CPUID, MSR events: SW_EXITINFO1 is 1 (inject an exception)
    /// and SW_EXITINFO2 this value.
    NaeInject(u64),
}

/// Configuration of the model.
#[derive(Clone, Copy, Debug)]
pub struct SnpConfig {
    /// C-bit position reported by SEV info.
    pub c_bit: u8,
    /// Lowest GHCB protocol version supported.
    pub min_version: u16,
    /// Highest GHCB protocol version supported.
    pub max_version: u16,
    /// Hypervisor feature bits (bit 0: SEV-SNP).
    pub features: u64,
    /// 4 KiB pages processed per PSC exit before returning with the work
    /// half done (`None`: all).
    pub psc_pages_per_exit: Option<u64>,
    /// The hypervisor backs every page with 4 KiB RMP entries, even for a
    /// 2 MiB page state change (as after a live migration): a 2 MiB
    /// PVALIDATE then fails with FAIL_SIZEMISMATCH.
    pub rmp_4k_only: bool,
    /// The CPU reports COHERENCY_SFW_NO (CPUID Fn8000_001F EBX\[31\]):
    /// pages just validated need no cache eviction.
    pub coherency_sfw_no: bool,
}

impl Default for SnpConfig {
    fn default() -> Self {
        SnpConfig {
            c_bit: 51,
            min_version: 1,
            max_version: 2,
            features: 1,
            psc_pages_per_exit: None,
            rmp_4k_only: false,
            coherency_sfw_no: false,
        }
    }
}

/// Counters of what the model was asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnpStats {
    /// MSR-protocol requests (not GHCB exits).
    pub msr_requests: u64,
    /// GHCB NAE exits.
    pub nae_exits: u64,
    /// PSC entries completed through the GHCB.
    pub psc_entries: u64,
    /// PVALIDATE executions.
    pub pvalidates: u64,
    /// 4 KiB pages whose cache lines the guest evicted.
    pub evictions: u64,
    /// Requests that broke the protocol (unregistered GHCB, bad valid
    /// bitmap, wrong version): an honest guest makes none.
    pub protocol_violations: u64,
}

struct Model {
    config: SnpConfig,
    rmp: Vec<RmpEntry>,
    hostile: Option<SnpHostile>,
    /// Page state changes still answered honestly before `hostile_later`
    /// starts.
    hostile_later: Option<(u32, SnpHostile)>,
    /// One GHCB per vCPU: every page registered so far.
    ghcb_gpas: Vec<u64>,
    terminated: Option<(u8, u8)>,
    /// See [`MockSnp::set_npt_4k`].
    npt_4k: bool,
    stats: SnpStats,
    aliases: AliasCheck,
    /// Pages validated private whose cache lines were not evicted since.
    unevicted: BTreeSet<u64>,
    /// Ports, CPUID table, MSRs.
    emulated: Emulated,
    /// What the guest sent with the last port I/O, CPUID or MSR event.
    last_nae: Option<NaeInputs>,
}

/// The hypervisor + RMP model. Implements [`GhcbMsr`] and [`Pvalidate`]
/// (PVALIDATE takes host addresses inside the [`GuestMemory`]).
pub struct MockSnp {
    memory: Arc<GuestMemory>,
    model: Mutex<Model>,
    exits: crate::preemption::ExitPoints,
}

impl core::fmt::Debug for MockSnp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MockSnp")
            .field("config", &self.model.lock().config)
            .finish_non_exhaustive()
    }
}

impl MockSnp {
    /// A guest whose memory is all private and validated with 4 KiB RMP
    /// entries (as after launch and boot-time validation).
    pub fn new(memory: Arc<GuestMemory>, config: SnpConfig) -> Self {
        let rmp = vec![
            RmpEntry {
                assigned: true,
                validated: true,
                huge: false
            };
            memory.pages() as usize
        ];
        MockSnp {
            memory,
            exits: Default::default(),
            model: Mutex::new(Model {
                config,
                rmp,
                hostile: None,
                hostile_later: None,
                ghcb_gpas: Vec::new(),
                terminated: None,
                npt_4k: false,
                stats: SnpStats::default(),
                aliases: AliasCheck::default(),
                unevicted: BTreeSet::new(),
                emulated: Emulated::default(),
                last_nae: None,
            }),
        }
    }

    /// Sets the RMP entries of `[gpa, gpa + len)` as launch left them. An
    /// entry that is not validated is memory the guest receives unaccepted
    /// (assigned: made private for the guest but not validated; not
    /// assigned: never given to the guest at all). A validated one the
    /// guest never validated itself is a lie a hostile launch can tell;
    /// told about unvalidated pages, the lie leaves them what the guest's
    /// memory map calls them, unaccepted, so validating them with their
    /// mappings present is still no alias violation.
    pub fn set_rmp(&self, gpa: u64, len: u64, entry: RmpEntry) {
        let mut m = self.model.lock();
        for gfn in gpa / PAGE_SIZE..(gpa + len).div_ceil(PAGE_SIZE) {
            m.rmp[gfn as usize] = entry;
        }
        if !entry.validated {
            m.aliases.set_unaccepted(gpa, len, true);
        }
    }

    /// Pages validated private whose cache lines the guest has not evicted
    /// (on a CPU without COHERENCY_SFW_NO), by GPA.
    pub fn unevicted(&self) -> Vec<u64> {
        self.model.lock().unevicted.iter().map(|gfn| gfn * PAGE_SIZE).collect()
    }

    /// The guest memory the model works on.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Makes the hypervisor lie (or stop, with `None`).
    pub fn set_hostile(&self, hostile: Option<SnpHostile>) {
        self.model.lock().hostile = hostile;
    }

    /// Answers the next `requests` page state changes (exits through a
    /// GHCB, requests through the MSR protocol) honestly, then lies as
    /// `hostile` from then on.
    pub fn set_hostile_after(&self, requests: u32, hostile: SnpHostile) {
        let mut model = self.model.lock();
        model.hostile = None;
        model.hostile_later = Some((requests, hostile));
    }

    /// The RMP entry of the page containing `gpa`.
    pub fn rmp(&self, gpa: u64) -> RmpEntry {
        self.model.lock().rmp[(gpa / PAGE_SIZE) as usize]
    }

    /// Counters.
    pub fn stats(&self) -> SnpStats {
        self.model.lock().stats
    }

    /// The GHCB GPA registered last, if any.
    pub fn registered_ghcb(&self) -> Option<u64> {
        self.model.lock().ghcb_gpas.last().copied()
    }

    /// From now on, PVALIDATE translates its address through these page
    /// tables (as the hardware does) instead of taking a host address, and
    /// every page state change and PVALIDATE checks that no other mapping
    /// of its frames is present.
    pub fn attach_page_tables(&self, tables: GuestPageTables) {
        self.model.lock().aliases.tables = Some(tables);
    }

    /// The host's nested page tables map guest memory at 4 KiB (`true`) or
    /// not: a 2 MiB PVALIDATE of a page the RMP holds in a 2 MiB entry then
    /// takes a nested page fault for the size, on which the hypervisor
    /// splits the RMP entry (PSMASH, validated bits kept) and resumes the
    /// guest, whose PVALIDATE fails with FAIL_SIZEMISMATCH.
    pub fn set_npt_4k(&self, on: bool) {
        self.model.lock().npt_4k = on;
    }

    /// Turns the alias check off (`false`) or on. It walks every present
    /// mapping at every call: runs that measure something else over large
    /// page tables may skip it.
    pub fn set_alias_check(&self, enabled: bool) {
        self.model.lock().aliases.disabled = !enabled;
    }

    /// Mappings in `[va, va + len)` are not aliases (an emulator's own view
    /// of guest memory).
    pub fn set_alias_check_ignore(&self, va: u64, len: u64) {
        self.model.lock().aliases.ignore = Some((va, len));
    }

    /// Calls made while a mapping of their frames was present.
    pub fn violations(&self) -> Vec<Violation> {
        self.model.lock().aliases.violations.clone()
    }

    /// (reason set, reason) of a termination request, if one came.
    pub fn terminated(&self) -> Option<(u8, u8)> {
        self.model.lock().terminated
    }

    /// Every byte written to COM1's data register
    /// ([`emulation::COM1`](crate::emulation::COM1)), in order.
    pub fn console(&self) -> Vec<u8> {
        self.model.lock().emulated.console().to_vec()
    }

    /// Copies COM1's output from byte `from` on into `into` and says how
    /// many bytes it copied: for a guest that forwards the console as it
    /// grows, without allocating.
    pub fn read_console(&self, from: usize, into: &mut [u8]) -> usize {
        self.model.lock().emulated.read_console(from, into)
    }

    /// The last value written to the isa-debug-exit port
    /// ([`emulation::DEBUG_EXIT`](crate::emulation::DEBUG_EXIT)).
    pub fn debug_exit(&self) -> Option<u32> {
        self.model.lock().emulated.debug_exit()
    }

    /// Sets the hypervisor's CPUID answer (EAX, EBX, ECX, EDX) for `leaf`,
    /// `subleaf`. Leaves never set answer zeros; leaf 0xD subleaf 0's EBX
    /// is computed from the XCR0 the guest sends.
    pub fn set_cpuid(&self, leaf: u32, subleaf: u32, answer: [u32; 4]) {
        self.model.lock().emulated.set_cpuid(leaf, subleaf, answer);
    }

    /// Makes the hypervisor emulate MSR `index`, holding `value`. Reads
    /// and writes of an MSR it does not emulate are answered with a #GP to
    /// inject.
    pub fn set_msr(&self, index: u32, value: u64) {
        self.model.lock().emulated.set_msr(index, value);
    }

    /// The value of emulated MSR `index`, if the hypervisor emulates it.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.model.lock().emulated.rdmsr(index)
    }

    /// What the guest sent with the last port I/O, CPUID or MSR event.
    pub fn last_nae_inputs(&self) -> Option<NaeInputs> {
        self.model.lock().last_nae
    }
}

impl Model {
    /// One more page state change: the lie set for later may start.
    fn count_page_state_change(&mut self) {
        if let Some((requests, hostile)) = self.hostile_later {
            self.hostile_later = requests.checked_sub(1).map(|r| (r, hostile));
            if requests == 0 {
                self.hostile = Some(hostile);
            }
        }
    }

    fn msr_protocol(&mut self, memory: &GuestMemory, value: u64) -> u64 {
        self.stats.msr_requests += 1;
        let hostile = self.hostile;
        let (code, payload) = match value & 0xFFF {
            SEV_INFO_REQ => {
                let c = &self.config;
                (
                    SEV_INFO_RESP,
                    (c.max_version as u64) << 48 | (c.min_version as u64) << 32 | (c.c_bit as u64) << 24,
                )
            }
            FEATURES_REQ => (FEATURES_RESP, self.config.features << 12),
            // KVM answers for subleaf 0 and keeps the request's register
            // field, GHCBData[31:30], in the response.
            CPUID_REQ if value & 0x3FFF_F000 == 0 => {
                let register = (value >> 30) & 3;
                let answer = self.emulated.cpuid((value >> 32) as u32, 0)[register as usize];
                (CPUID_RESP, (answer as u64) << 32 | register << 30)
            }
            REGISTER_REQ => {
                let gfn = value >> 12;
                let echoed = if hostile == Some(SnpHostile::MsrWrongGfn) {
                    gfn + 1
                } else {
                    gfn
                };
                if memory.contains(gfn * PAGE_SIZE, PAGE_SIZE) && !self.rmp[gfn as usize].assigned {
                    self.ghcb_gpas.push(gfn * PAGE_SIZE);
                    (REGISTER_RESP, echoed << 12)
                } else {
                    // Only a shared page can be a GHCB: refuse with all ones.
                    (REGISTER_RESP, !0xFFF)
                }
            }
            PSC_REQ => {
                self.count_page_state_change();
                let hostile = self.hostile;
                let gfn = (value >> 12) & 0xFF_FFFF_FFFF;
                let op = (value >> 52) & 0xF;
                if memory.contains(gfn * PAGE_SIZE, PAGE_SIZE) {
                    self.aliases
                        .check(memory, "PSC (MSR protocol)", gfn * PAGE_SIZE, PAGE_SIZE, None);
                }
                let malformed =
                    value >> 56 != 0 || !(1..=2).contains(&op) || !memory.contains(gfn * PAGE_SIZE, PAGE_SIZE);
                let error = if malformed || hostile == Some(SnpHostile::MsrPscError) {
                    1
                } else {
                    if hostile != Some(SnpHostile::MsrPscWithoutRmpChange) {
                        self.set_state(memory, gfn, 1, op == 1, false);
                    }
                    0
                };
                (PSC_RESP, error << 32)
            }
            TERMINATE_REQ => {
                self.terminated = Some((((value >> 12) & 0xF) as u8, (value >> 16) as u8));
                (0, 0)
            }
            _ => {
                self.stats.protocol_violations += 1;
                (0, 0)
            }
        };
        match hostile {
            Some(SnpHostile::MsrWrongCode) => payload | ((code + 1) & 0xFFF),
            Some(SnpHostile::MsrReservedBits) => payload | code | 0x1000,
            _ => payload | code,
        }
    }

    /// Sets `count` pages from `gfn` to private (assigned, not validated) or
    /// shared, and scribbles them: their old contents are gone for the
    /// guest. A 4 KiB change inside a 2 MiB RMP entry first smashes it.
    fn set_state(&mut self, memory: &GuestMemory, gfn: u64, count: u64, private: bool, huge: bool) {
        for g in gfn..gfn + count {
            if self.rmp[g as usize].huge && !huge {
                let base = g & !511;
                for e in &mut self.rmp[base as usize..(base + 512) as usize] {
                    e.huge = false;
                }
            }
            let e = &mut self.rmp[g as usize];
            if e.assigned != private || e.validated {
                memory.fill(g * PAGE_SIZE, PAGE_SIZE, SCRIBBLE);
            }
            *e = RmpEntry {
                assigned: private,
                validated: false,
                huge: huge && private && !self.config.rmp_4k_only,
            };
            self.unevicted.remove(&g);
            if !private {
                self.aliases.set_unaccepted(g * PAGE_SIZE, PAGE_SIZE, false);
            }
        }
    }

    fn nae(&mut self, memory: &GuestMemory, gpa: u64) {
        self.stats.nae_exits += 1;
        let valid = |field: u64| memory.read_u8(gpa + OFF_VALID_BITMAP + field / 64) & (1 << ((field / 8) % 8)) != 0;
        let version_usage = memory.read_u64(gpa + OFF_VERSION_USAGE);
        let (version, usage) = ((version_usage >> 16) as u16, (version_usage >> 32) as u32);
        let fields_valid = [OFF_SW_EXIT_CODE, OFF_SW_EXIT_INFO_1, OFF_SW_EXIT_INFO_2]
            .iter()
            .all(|&f| valid(f));
        let scratch = memory.read_u64(gpa + OFF_SW_SCRATCH);
        let exit_code = memory.read_u64(gpa + OFF_SW_EXIT_CODE);
        let header_ok = fields_valid && version == 2 && usage == 0;
        let (info1, info2) = match exit_code {
            PSC_EXIT if header_ok && valid(OFF_SW_SCRATCH) && scratch == gpa + OFF_SHARED_BUFFER => {
                self.psc(memory, scratch)
            }
            nae::IOIO_EXIT | nae::CPUID_EXIT | nae::MSR_EXIT if header_ok => nae::answer(
                &mut self.emulated,
                &mut self.last_nae,
                self.hostile,
                memory,
                gpa,
                &mut self.stats.protocol_violations,
            ),
            _ => {
                self.stats.protocol_violations += 1;
                (1, GHCB_MALFORMED)
            }
        };
        memory.write_u64(gpa + OFF_SW_EXIT_INFO_1, info1);
        memory.write_u64(gpa + OFF_SW_EXIT_INFO_2, info2);
    }

    /// One PSC exit: returns (SW_EXITINFO1, SW_EXITINFO2).
    fn psc(&mut self, memory: &GuestMemory, buf: u64) -> (u64, u64) {
        let header = memory.read_u64(buf);
        let (mut cur, mut end) = (header & 0xFFFF, (header >> 16) & 0xFFFF);
        if header >> 32 != 0 || end >= PSC_MAX_ENTRIES || cur > end + 1 {
            return (0, PSC_INVALID_HDR);
        }
        self.count_page_state_change();
        let first_exit = cur == 0;
        match self.hostile {
            Some(SnpHostile::PscStall) => return (0, 0),
            Some(SnpHostile::PscExitInfo2Error) => return (0, PSC_ERROR_GENERIC),
            Some(SnpHostile::PscExitInfo1Error) => return (1, PSC_ERROR_GENERIC),
            Some(SnpHostile::PscSuccessWithoutRmpChange) => {
                memory.write_u64(buf, (end << 16) | (end + 1));
                return (0, 0);
            }
            _ => {}
        }
        let mut budget = self.config.psc_pages_per_exit.unwrap_or(u64::MAX);
        let lie_needs_unfinished_work = matches!(
            self.hostile,
            Some(SnpHostile::PscCurEntryBackwards | SnpHostile::PscRewriteDescriptor | SnpHostile::PscEndEntryLowered)
        );
        if first_exit && lie_needs_unfinished_work {
            // Leave work undone, so the lie has entries to be told about.
            budget = 1;
        }
        while cur <= end && budget > 0 {
            let at = buf + 8 + cur * 8;
            let entry = memory.read_u64(at);
            let (done, gfn, op, huge) = (
                entry & 0xFFF,
                (entry >> 12) & 0xFF_FFFF_FFFF,
                (entry >> 52) & 0xF,
                entry >> 56 & 1 == 1,
            );
            let pages = if huge { 512 } else { 1 };
            if entry >> 57 != 0
                || !(1..=2).contains(&op)
                || (huge && gfn % 512 != 0)
                || done >= pages
                || at + 8 > buf - OFF_SHARED_BUFFER + SHARED_BUFFER_END
                || !memory.contains(gfn * PAGE_SIZE, pages * PAGE_SIZE)
            {
                memory.write_u64(buf, (end << 16) | cur);
                return (0, PSC_INVALID_ENTRY);
            }
            let n = (pages - done).min(budget);
            self.aliases
                .check(memory, "PSC", (gfn + done) * PAGE_SIZE, n * PAGE_SIZE, None);
            let whole = done == 0 && n == pages;
            self.set_state(memory, gfn + done, n, op == 1, whole && huge);
            budget -= n;
            if done + n == pages {
                memory.write_u64(at, entry & !0xFFF);
                cur += 1;
                self.stats.psc_entries += 1;
            } else {
                memory.write_u64(at, (entry & !0xFFF) | (done + n));
            }
        }
        match self.hostile {
            Some(SnpHostile::PscCurEntryBackwards) if !first_exit => cur = 0,
            Some(SnpHostile::PscEndEntryRaised) => end += 1,
            Some(SnpHostile::PscEndEntryLowered) if cur > 0 && cur <= end => end = cur - 1,
            Some(SnpHostile::PscRewriteDescriptor) if cur <= end => {
                let last = buf + 8 + end * 8;
                memory.write_u64(last, memory.read_u64(last) + (1 << 12));
            }
            _ => {}
        }
        let reserved = if self.hostile == Some(SnpHostile::PscReservedSet) {
            1u64 << 32
        } else {
            0
        };
        memory.write_u64(buf, reserved | (end << 16) | cur);
        (0, 0)
    }

    fn pvalidate(&mut self, memory: &GuestMemory, va: u64, size: PageSize, validate: bool) -> RawPvalidate {
        self.stats.pvalidates += 1;
        let fail = |eax| RawPvalidate { eax, carry: false };
        let pages = size.bytes() / PAGE_SIZE;
        let gpa = match self.aliases.tables {
            Some(tables) => match tables.translate(memory, va) {
                // PVALIDATE needs a private mapping: the C-bit set.
                Some(m) if m.enc_set => m.pa,
                _ => return fail(FAIL_INPUT),
            },
            None => match memory.gpa_of(va) {
                Some(gpa) => gpa,
                None => return fail(FAIL_INPUT),
            },
        };
        if memory.contains(gpa, size.bytes()) {
            self.aliases.check(memory, "PVALIDATE", gpa, size.bytes(), Some(va));
        }
        if gpa % size.bytes() != 0 || !memory.contains(gpa, size.bytes()) {
            return fail(FAIL_INPUT);
        }
        let range = (gpa / PAGE_SIZE) as usize..(gpa / PAGE_SIZE + pages) as usize;
        let entries = &mut self.rmp[range];
        if entries.iter().any(|e| !e.assigned) {
            // Stand-in for the #NPF (see the crate docs).
            return fail(FAIL_INPUT);
        }
        let huge_entry = entries.iter().all(|e| e.huge);
        if size == PageSize::Size2M && huge_entry && self.npt_4k {
            entries.iter_mut().for_each(|e| e.huge = false);
            return fail(FAIL_SIZEMISMATCH);
        }
        if (size == PageSize::Size2M) != huge_entry || (size == PageSize::Size4K && entries[0].huge) {
            return fail(FAIL_SIZEMISMATCH);
        }
        if entries.iter().all(|e| e.validated == validate) {
            return RawPvalidate { eax: 0, carry: true };
        }
        for e in entries.iter_mut() {
            e.validated = validate;
        }
        let gfns = gpa / PAGE_SIZE..gpa / PAGE_SIZE + pages;
        if validate {
            self.aliases.set_unaccepted(gpa, size.bytes(), false);
            if !self.config.coherency_sfw_no {
                self.unevicted.extend(gfns);
            }
        } else {
            gfns.for_each(|g| {
                self.unevicted.remove(&g);
            });
        }
        RawPvalidate { eax: 0, carry: false }
    }
}

// SAFETY: the model writes only the GHCB (for NAE exits) and scribbles
// pages whose state changes, as a hypervisor could.
unsafe impl GhcbMsr for MockSnp {
    unsafe fn vmgexit(&self, msr_value: u64) -> u64 {
        self.exits.here();
        let answer = self.exit(msr_value);
        self.exits.here();
        answer
    }
}

impl MockSnp {
    fn exit(&self, msr_value: u64) -> u64 {
        let mut m = self.model.lock();
        if msr_value & 0xFFF != 0 {
            return m.msr_protocol(&self.memory, msr_value);
        }
        if !m.ghcb_gpas.contains(&msr_value) {
            // A real hypervisor would terminate the guest; the model
            // records it and leaves the GHCB untouched.
            m.stats.protocol_violations += 1;
            return msr_value;
        }
        m.nae(&self.memory, msr_value);
        msr_value
    }
}

// SAFETY: the model changes only its RMP.
unsafe impl Pvalidate for MockSnp {
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> RawPvalidate {
        self.exits.here();
        self.model.lock().pvalidate(&self.memory, va, size, validate)
    }

    fn coherency_sfw_no(&self) -> bool {
        self.model.lock().config.coherency_sfw_no
    }

    unsafe fn evict_cache_lines(&self, va: u64, pages: u64) {
        let mut m = self.model.lock();
        for page in 0..pages {
            let at = va + page * PAGE_SIZE;
            let gpa = match m.aliases.tables {
                Some(tables) => tables.translate(&self.memory, at).map(|t| t.pa),
                None => self.memory.gpa_of(at),
            };
            if let Some(gpa) = gpa {
                m.unevicted.remove(&(gpa / PAGE_SIZE));
                m.stats.evictions += 1;
            }
        }
    }
}
