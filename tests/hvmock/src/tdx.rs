//! A model of the TDX module and of the VMM behind TDG.VP.VMCALL.
//!
//! The ABI constants here are transcribed from the specs independently of
//! the `tdcall` crate, so that a wrong constant on either side shows up as a
//! failing test rather than agreeing with itself.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use spin::Mutex;
use tdcall::{Registers, Tdcall};

use crate::emulation::Emulated;
use crate::memory::GuestMemory;
use crate::pagewalk::{AliasCheck, GuestPageTables, Violation};
use crate::{PAGE_SIZE, SCRIBBLE};

// TDX Module v1.5 ABI Specification: leaves and completion status codes.
const LEAF_VP_VMCALL: u64 = 0;
const LEAF_VP_INFO: u64 = 1;
const LEAF_VP_VEINFO_GET: u64 = 3;
const LEAF_MEM_PAGE_ACCEPT: u64 = 6;
const TDX_SUCCESS: u64 = 0;
const TDX_OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;
const TDX_OPERAND_BUSY: u64 = 0x8000_0200_0000_0000;
const TDX_EPT_WALK_FAILED: u64 = 0xC000_0B00_0000_0000;
const TDX_PAGE_ALREADY_ACCEPTED: u64 = 0x0000_0B0A_0000_0000;
const TDX_PAGE_SIZE_MISMATCH: u64 = 0xC000_0B0B_0000_0000;
const TDX_NO_VALID_VE_INFO: u64 = 0xC000_0704_0000_0000;
/// Operand id of RCX in status bits 31:0.
const OPERAND_RCX: u64 = 1;

// GHCI v1.5: TDG.VP.VMCALL sub-functions and status codes. The
// Instruction.* sub-functions are VMX basic exit reasons (Intel SDM vol. 3C,
// appendix C).
const INSTRUCTION_CPUID: u64 = 10;
const INSTRUCTION_IO: u64 = 30;
const INSTRUCTION_RDMSR: u64 = 31;
const INSTRUCTION_WRMSR: u64 = 32;
const MAP_GPA: u64 = 0x10001;
const REPORT_FATAL_ERROR: u64 = 0x10003;
const VMCALL_SUCCESS: u64 = 0;
const VMCALL_RETRY: u64 = 1;
const VMCALL_INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
const VMCALL_ALIGN_ERROR: u64 = 0x8000_0000_0000_0002;
const VMCALL_SUBFUNC_UNSUPPORTED: u64 = 0x8000_0000_0000_0003;

/// What the VMM writes into exposed registers it does not return values in,
/// so a guest that expects them preserved is caught.
pub const CLOBBER: u64 = 0xDEAD_BEEF_0BAD_F00D;

/// Page levels as the ACCEPT ABI encodes them: 0 = 4K, 1 = 2M, 2 = 1G.
fn level_pages(level: u8) -> u64 {
    1 << (9 * level as u32)
}

/// The state of one 4 KiB page of the TD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdxPageState {
    /// Private and accepted: usable by the guest.
    Accepted,
    /// Private, added by the VMM, not yet accepted by the guest.
    Pending,
    /// Shared with the VMM: no private mapping.
    Shared,
}

/// One page: its state and, when private, the size (ACCEPT level) of the
/// Secure-EPT mapping that covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdxPage {
    /// State.
    pub state: TdxPageState,
    /// Mapping level (0 = 4K, 1 = 2M, 2 = 1G) when private.
    pub level: u8,
}

/// Ways the VMM lies about MapGPA. Each applies to every MapGPA call while
/// set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdxHostile {
    /// Answers RETRY with a resume GPA one page below the call's start.
    ResumeBelowStart,
    /// Answers RETRY with the end of the request as resume GPA.
    ResumeAtEnd,
    /// Answers RETRY with a resume GPA that is not page-aligned.
    ResumeUnaligned,
    /// Converts part of the range honestly, then answers RETRY with the
    /// resume GPA stripped of the shared bit.
    ResumeWithoutSharedBit,
    /// Alternates between claiming one page of progress and rewinding one
    /// page, never converting anything: loops forever a guest that accepts
    /// any resume GPA inside the original request.
    ResumeRewind,
    /// Answers RETRY at the same GPA forever.
    NoProgressForever,
    /// Answers success without converting anything.
    SuccessWithoutConverting,
    /// Answers with this status, not defined by the GHCI.
    GarbageStatus(u64),
}

/// Ways the VMM lies when it carries out an instruction for the guest
/// (TDG.VP.VMCALL\<Instruction.IO\>, \<Instruction.CPUID\>,
/// \<Instruction.RDMSR\>, \<Instruction.WRMSR\>). Each applies to every
/// such call while set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdxEmulationHostile {
    /// The honest answer, with every bit above the access set: an `IN`'s
    /// R11 above its 1, 2 or 4 bytes, CPUID's R12-R15 above 32 bits. (An
    /// MSR has 64 bits: RDMSR is answered honestly.)
    GarbageAboveAccess,
    /// Every read is answered with this raw value, whatever was asked: an
    /// `IN`'s R11, RDMSR's R11 (even for an MSR the VMM does not emulate),
    /// and each of CPUID's R12-R15.
    Answer(u64),
    /// Every call is answered with this status in R10 and not carried out.
    Status(u64),
    /// The TDCALL itself fails with this status in RAX: the TDX module
    /// turned the call down and the VMM never saw it.
    TdcallFails(u64),
}

/// Configuration of the model.
#[derive(Clone, Copy, Debug)]
pub struct TdxConfig {
    /// Guest physical address width: 48 or 52 (the shared bit is GPAW-1).
    pub gpaw: u8,
    /// TD ATTRIBUTES reported by TDG.VP.INFO.
    pub attributes: u64,
    /// Largest Secure-EPT mapping level the VMM uses when it adds pending
    /// pages (0 = 4K, 1 = 2M, 2 = 1G).
    pub max_aug_level: u8,
    /// Pages the VMM converts per MapGPA call before answering RETRY
    /// (`None`: all of them).
    pub map_gpa_chunk_pages: Option<u64>,
    /// An honest VMM may answer RETRY without progress: this many times
    /// before each chunk it converts.
    pub map_gpa_stalls_per_chunk: u32,
}

impl Default for TdxConfig {
    fn default() -> Self {
        TdxConfig {
            gpaw: 48,
            attributes: 0,
            max_aug_level: 2,
            map_gpa_chunk_pages: None,
            map_gpa_stalls_per_chunk: 0,
        }
    }
}

/// A call the model answered, for tests and demos to inspect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdxEvent {
    /// TDG.VP.INFO.
    VpInfo,
    /// TDG.VP.VEINFO.GET.
    VeInfoGet {
        /// Status returned.
        status: u64,
    },
    /// TDG.MEM.PAGE.ACCEPT.
    Accept {
        /// GPA.
        gpa: u64,
        /// Level requested.
        level: u8,
        /// Status returned.
        status: u64,
    },
    /// TDG.VP.VMCALL\<MapGPA\>.
    MapGpa {
        /// R12.
        gpa: u64,
        /// R13.
        size: u64,
        /// R10 returned.
        status: u64,
        /// R11 returned.
        resume: u64,
    },
    /// TDG.VP.VMCALL\<ReportFatalError\>.
    ReportFatalError {
        /// R12.
        code: u64,
    },
    /// TDG.VP.VMCALL\<Instruction.IO\>.
    Io {
        /// R12: the access size in bytes.
        size: u64,
        /// R13: 0 read, 1 write.
        direction: u64,
        /// R14: the port.
        port: u64,
        /// R15 as sent for a write; R11 as returned for a read.
        data: u64,
        /// R10 returned.
        status: u64,
    },
    /// TDG.VP.VMCALL\<Instruction.CPUID\>.
    Cpuid {
        /// R12: the leaf.
        leaf: u64,
        /// R13: the sub-leaf.
        subleaf: u64,
        /// R10 returned.
        status: u64,
    },
    /// TDG.VP.VMCALL\<Instruction.RDMSR\>.
    Rdmsr {
        /// R12: the MSR.
        index: u64,
        /// R10 returned.
        status: u64,
    },
    /// TDG.VP.VMCALL\<Instruction.WRMSR\>.
    Wrmsr {
        /// R12: the MSR.
        index: u64,
        /// R13: the value.
        value: u64,
        /// R10 returned.
        status: u64,
    },
    /// A call the model rejected before dispatch.
    Rejected {
        /// RAX (leaf) of the call.
        leaf: u64,
        /// RAX returned.
        status: u64,
    },
}

struct Model {
    config: TdxConfig,
    pages: Vec<TdxPage>,
    hostile: Option<TdxHostile>,
    /// MapGPA calls still answered honestly before `hostile_later` starts.
    hostile_later: Option<(u32, TdxHostile)>,
    busy_answers: u32,
    stalls_left: u32,
    rewind_flip: bool,
    pending_ve: Option<[u64; 5]>,
    events: Vec<TdxEvent>,
    fatal: Option<u64>,
    aliases: AliasCheck,
    emulated: Emulated,
    emulation_hostile: Option<TdxEmulationHostile>,
}

/// The TDX module + VMM model. Implements [`Tdcall`].
pub struct MockTdx {
    memory: Arc<GuestMemory>,
    model: Mutex<Model>,
    exits: crate::preemption::ExitPoints,
}

impl core::fmt::Debug for MockTdx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MockTdx")
            .field("config", &self.model.lock().config)
            .finish_non_exhaustive()
    }
}

impl MockTdx {
    /// A TD whose memory is all private and accepted (as after the
    /// firmware accepted it at boot), mapped with 4 KiB Secure-EPT entries.
    pub fn new(memory: Arc<GuestMemory>, config: TdxConfig) -> Self {
        let pages = vec![
            TdxPage {
                state: TdxPageState::Accepted,
                level: 0
            };
            memory.pages() as usize
        ];
        MockTdx {
            memory,
            exits: Default::default(),
            model: Mutex::new(Model {
                config,
                pages,
                hostile: None,
                hostile_later: None,
                busy_answers: 0,
                stalls_left: config.map_gpa_stalls_per_chunk,
                rewind_flip: false,
                pending_ve: None,
                events: Vec::new(),
                fatal: None,
                aliases: AliasCheck::default(),
                emulated: Emulated::default(),
                emulation_hostile: None,
            }),
        }
    }

    /// The guest memory the model works on.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Sets the pages of `[gpa, gpa + len)` as the TD starts with them.
    /// Pending pages are memory the firmware hands over unaccepted, mapped
    /// in the Secure EPT at `page.level` (4 KiB entries under a 2 MiB
    /// request, as after a live migration, make a 2 MiB ACCEPT fail with a
    /// size mismatch; a 4 KiB request under a pending 2 MiB entry makes the
    /// VMM split it and accepts the one page; under an accepted one, it is
    /// "already accepted"). Accepted pages the guest's memory map calls
    /// unaccepted are a lie a hostile firmware or loader can tell; told
    /// about pending pages, the lie leaves them what the guest's memory map
    /// calls them, unaccepted, so accepting them with their mappings present
    /// is still no alias violation.
    pub fn set_pages(&self, gpa: u64, len: u64, page: TdxPage) {
        let mut m = self.model.lock();
        for gfn in gpa / PAGE_SIZE..(gpa + len).div_ceil(PAGE_SIZE) {
            m.pages[gfn as usize] = page;
        }
        if page.state == TdxPageState::Pending {
            m.aliases.set_unaccepted(gpa, len, true);
        }
    }

    /// The shared bit of this TD.
    pub fn shared_mask(&self) -> u64 {
        1 << (self.model.lock().config.gpaw - 1)
    }

    /// Makes the VMM lie (or stop lying, with `None`).
    pub fn set_hostile(&self, hostile: Option<TdxHostile>) {
        self.model.lock().hostile = hostile;
    }

    /// Answers the next `calls` MapGPA calls honestly, then lies as
    /// `hostile` from then on.
    pub fn set_hostile_after(&self, calls: u32, hostile: TdxHostile) {
        let mut model = self.model.lock();
        model.hostile = None;
        model.hostile_later = Some((calls, hostile));
    }

    /// The next `n` ACCEPTs are answered `TDX_OPERAND_BUSY`.
    pub fn set_busy_answers(&self, n: u32) {
        self.model.lock().busy_answers = n;
    }

    /// Queues #VE information for the next TDG.VP.VEINFO.GET: exit reason,
    /// qualification, GLA, GPA, R10 (length | info << 32).
    pub fn inject_ve(&self, info: [u64; 5]) {
        self.model.lock().pending_ve = Some(info);
    }

    /// The state of the page containing `gpa`.
    pub fn page(&self, gpa: u64) -> TdxPage {
        self.model.lock().pages[(gpa / PAGE_SIZE) as usize]
    }

    /// Every call answered so far.
    pub fn events(&self) -> Vec<TdxEvent> {
        self.model.lock().events.clone()
    }

    /// Forgets recorded events.
    pub fn clear_events(&self) {
        self.model.lock().events.clear();
    }

    /// From now on, checks at every MapGPA and ACCEPT that no mapping of
    /// the frames concerned is present in these page tables.
    pub fn attach_page_tables(&self, tables: GuestPageTables) {
        self.model.lock().aliases.tables = Some(tables);
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

    /// The error code of ReportFatalError, if the TD reported one.
    pub fn fatal_error(&self) -> Option<u64> {
        self.model.lock().fatal
    }

    /// Makes the VMM lie when it carries out instructions (or stop lying,
    /// with `None`).
    pub fn set_emulation_hostile(&self, hostile: Option<TdxEmulationHostile>) {
        self.model.lock().emulation_hostile = hostile;
    }

    /// Every byte the guest wrote to COM1's data register
    /// ([`emulation::COM1`](crate::emulation::COM1)).
    pub fn console(&self) -> Vec<u8> {
        self.model.lock().emulated.console().to_vec()
    }

    /// Copies COM1's output from byte `from` on into `into` and says how
    /// many bytes it copied: for a guest that forwards the console as it
    /// grows, without allocating.
    pub fn read_console(&self, from: usize, into: &mut [u8]) -> usize {
        self.model.lock().emulated.read_console(from, into)
    }

    /// The last value the guest wrote to the isa-debug-exit port
    /// ([`emulation::DEBUG_EXIT`](crate::emulation::DEBUG_EXIT)).
    pub fn debug_exit(&self) -> Option<u32> {
        self.model.lock().emulated.debug_exit()
    }

    /// Makes the VMM answer CPUID `leaf`, `subleaf` with EAX, EBX, ECX,
    /// EDX = `answer`. Leaves it has no answer for read as zeros.
    pub fn set_cpuid(&self, leaf: u32, subleaf: u32, answer: [u32; 4]) {
        self.model.lock().emulated.set_cpuid(leaf, subleaf, answer);
    }

    /// Makes the VMM emulate MSR `index`, holding `value`. Unknown MSRs are
    /// answered `TDG.VP.VMCALL_INVALID_OPERAND`.
    pub fn set_msr(&self, index: u32, value: u64) {
        self.model.lock().emulated.set_msr(index, value);
    }

    /// The value of emulated MSR `index`, if the VMM emulates it.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.model.lock().emulated.rdmsr(index)
    }

    fn handle(&self, regs: &mut Registers) {
        let mut m = self.model.lock();
        let leaf = regs.rax;
        match leaf {
            LEAF_VP_INFO => {
                regs.rax = TDX_SUCCESS;
                regs.rcx = m.config.gpaw as u64;
                regs.rdx = m.config.attributes;
                regs.r8 = 1 | (1 << 32);
                regs.r9 = 0;
                regs.r10 = 0;
                regs.r11 = 0;
                m.events.push(TdxEvent::VpInfo);
            }
            LEAF_VP_VEINFO_GET => {
                let status = match m.pending_ve.take() {
                    Some([reason, qual, gla, gpa, r10]) => {
                        (regs.rcx, regs.rdx, regs.r8, regs.r9, regs.r10) = (reason, qual, gla, gpa, r10);
                        TDX_SUCCESS
                    }
                    None => {
                        (regs.rcx, regs.rdx, regs.r8, regs.r9, regs.r10) = (0, 0, 0, 0, 0);
                        TDX_NO_VALID_VE_INFO
                    }
                };
                regs.rax = status;
                m.events.push(TdxEvent::VeInfoGet { status });
            }
            LEAF_MEM_PAGE_ACCEPT => {
                let status = m.accept(&self.memory, regs.rcx);
                m.events.push(TdxEvent::Accept {
                    gpa: regs.rcx & !0xFFF,
                    level: (regs.rcx & 7) as u8,
                    status,
                });
                regs.rax = status;
            }
            LEAF_VP_VMCALL => m.vmcall(&self.memory, regs),
            _ => {
                regs.rax = TDX_OPERAND_INVALID;
                m.events.push(TdxEvent::Rejected { leaf, status: regs.rax });
            }
        }
    }
}

impl Model {
    fn shared_mask(&self) -> u64 {
        1 << (self.config.gpaw - 1)
    }

    /// TDG.MEM.PAGE.ACCEPT, as the TDX module checks it.
    fn accept(&mut self, memory: &GuestMemory, rcx: u64) -> u64 {
        let invalid = TDX_OPERAND_INVALID | OPERAND_RCX;
        let level = (rcx & 7) as u8;
        let gpa = rcx & !0xFFF;
        if rcx & 0xFF8 != 0 || level > 2 || gpa & self.shared_mask() != 0 {
            return invalid;
        }
        let pages = level_pages(level);
        let first = gpa / PAGE_SIZE;
        if first % pages != 0 || !memory.contains(gpa, pages * PAGE_SIZE) {
            return invalid;
        }
        self.aliases
            .check(memory, "TDG.MEM.PAGE.ACCEPT", gpa, pages * PAGE_SIZE, None);
        if self.busy_answers > 0 {
            self.busy_answers -= 1;
            return TDX_OPERAND_BUSY | OPERAND_RCX;
        }
        let block = &mut self.pages[first as usize..(first + pages) as usize];
        if block.iter().any(|p| p.state == TdxPageState::Shared) {
            // Stand-in for the EPT-violation TD exit (see the crate docs).
            return TDX_EPT_WALK_FAILED;
        }
        // As the TDX module's Secure-EPT walk ends (TDX module 1.5,
        // tdg_mem_page_accept.c): at a table where the request wanted a
        // leaf, a size mismatch; at a larger leaf, "already accepted" if the
        // guest can use it, else an EPT violation.
        if block.iter().any(|p| p.level < level) {
            return TDX_PAGE_SIZE_MISMATCH | level as u64;
        }
        let leaf = block[0].level;
        if leaf > level {
            if block[0].state == TdxPageState::Accepted {
                return TDX_PAGE_ALREADY_ACCEPTED | leaf as u64;
            }
            // The EPT violation reaches the VMM, which must split the
            // pending leaf down to the requested size for the TD to make
            // progress, and re-enters the TD at the ACCEPT.
            for split in (level + 1..=leaf).rev() {
                let n = level_pages(split);
                let start = first / n * n;
                for p in &mut self.pages[start as usize..(start + n) as usize] {
                    // Pages already split finer stay so.
                    p.level = p.level.min(split - 1);
                }
            }
        }
        let block = &mut self.pages[first as usize..(first + pages) as usize];
        if block[0].state == TdxPageState::Accepted {
            return TDX_PAGE_ALREADY_ACCEPTED | level as u64;
        }
        for p in block.iter_mut() {
            p.state = TdxPageState::Accepted;
        }
        self.aliases.set_unaccepted(gpa, pages * PAGE_SIZE, false);
        memory.fill(gpa, pages * PAGE_SIZE, 0);
        TDX_SUCCESS
    }

    fn vmcall(&mut self, memory: &GuestMemory, regs: &mut Registers) {
        let exposed = regs.rcx;
        // R10 and R11 carry the sub-function and status: without them the
        // VMM cannot even see the request.
        if exposed & (1 << 10 | 1 << 11) != (1 << 10 | 1 << 11) || exposed & 0xF != 0 {
            regs.rax = TDX_OPERAND_INVALID | OPERAND_RCX;
            self.events.push(TdxEvent::Rejected {
                leaf: LEAF_VP_VMCALL,
                status: regs.rax,
            });
            return;
        }
        let instruction = matches!(
            regs.r11,
            INSTRUCTION_CPUID | INSTRUCTION_IO | INSTRUCTION_RDMSR | INSTRUCTION_WRMSR
        );
        if let (true, Some(TdxEmulationHostile::TdcallFails(status))) = (instruction, self.emulation_hostile) {
            regs.rax = status;
            self.events.push(TdxEvent::Rejected {
                leaf: LEAF_VP_VMCALL,
                status,
            });
            return;
        }
        regs.rax = TDX_SUCCESS;
        let exposed_reg = |bit: u32| exposed & (1 << bit) != 0;
        let [r12, r13, r14, r15] =
            [(12, regs.r12), (13, regs.r13), (14, regs.r14), (15, regs.r15)].map(|(bit, value)| {
                if exposed_reg(bit) {
                    value
                } else {
                    0
                }
            });
        // R12-R15 as the sub-function returns them (CPUID's four registers).
        let mut outputs: Option<[u64; 4]> = None;
        let (status, r11) = if regs.r10 != 0 {
            (VMCALL_SUBFUNC_UNSUPPORTED, 0)
        } else if instruction {
            let (status, r11, out) = self.instruction(regs.r11, [r12, r13, r14, r15]);
            outputs = out;
            (status, r11)
        } else {
            match regs.r11 {
                MAP_GPA => {
                    let (status, resume) = self.map_gpa(memory, r12, r13);
                    self.events.push(TdxEvent::MapGpa {
                        gpa: r12,
                        size: r13,
                        status,
                        resume,
                    });
                    (status, resume)
                }
                REPORT_FATAL_ERROR => {
                    self.fatal = Some(r12);
                    self.events.push(TdxEvent::ReportFatalError { code: r12 });
                    (VMCALL_SUCCESS, 0)
                }
                _ => (VMCALL_SUBFUNC_UNSUPPORTED, 0),
            }
        };
        regs.r10 = status;
        regs.r11 = r11;
        if let Some(out) = outputs {
            for (bit, reg, value) in [
                (12, &mut regs.r12, out[0]),
                (13, &mut regs.r13, out[1]),
                (14, &mut regs.r14, out[2]),
                (15, &mut regs.r15, out[3]),
            ] {
                if exposed_reg(bit) {
                    *reg = value;
                }
            }
        }
        // Every other exposed register comes back changed: the guest must
        // treat them as clobbered.
        let outputs_in_r12_to_r15 = outputs.is_some();
        for (bit, reg) in [
            (2, &mut regs.rdx),
            (6, &mut regs.rsi),
            (7, &mut regs.rdi),
            (8, &mut regs.r8),
            (9, &mut regs.r9),
            (12, &mut regs.r12),
            (13, &mut regs.r13),
            (14, &mut regs.r14),
            (15, &mut regs.r15),
        ] {
            if exposed_reg(bit) && !(outputs_in_r12_to_r15 && bit >= 12) {
                *reg = CLOBBER;
            }
        }
    }

    /// An Instruction.* sub-function, carried out on the emulated devices
    /// (or lied about). Returns R10, R11 and, for CPUID, R12-R15.
    fn instruction(&mut self, subfunction: u64, args: [u64; 4]) -> (u64, u64, Option<[u64; 4]>) {
        let [r12, r13, r14, r15] = args;
        let read = subfunction == INSTRUCTION_RDMSR || subfunction == INSTRUCTION_IO && r13 == 0;
        let (status, r11, outputs) = match self.emulation_hostile {
            Some(TdxEmulationHostile::Status(status)) => (status, 0, None),
            Some(TdxEmulationHostile::Answer(raw)) if subfunction == INSTRUCTION_CPUID => {
                (VMCALL_SUCCESS, 0, Some([raw; 4]))
            }
            Some(TdxEmulationHostile::Answer(raw)) if read => (VMCALL_SUCCESS, raw, None),
            Some(TdxEmulationHostile::GarbageAboveAccess) => {
                let (status, r11, outputs) = self.carry_out(subfunction, args);
                let above_in = match subfunction {
                    INSTRUCTION_IO if read => u64::MAX.checked_shl(8 * r12 as u32).unwrap_or(0),
                    _ => 0,
                };
                (
                    status,
                    r11 | above_in,
                    outputs.map(|o| o.map(|v| v | 0xFFFF_FFFF_0000_0000)),
                )
            }
            _ => self.carry_out(subfunction, args),
        };
        let event = match subfunction {
            INSTRUCTION_IO => TdxEvent::Io {
                size: r12,
                direction: r13,
                port: r14,
                data: if r13 == 0 { r11 } else { r15 },
                status,
            },
            INSTRUCTION_CPUID => TdxEvent::Cpuid {
                leaf: r12,
                subleaf: r13,
                status,
            },
            INSTRUCTION_RDMSR => TdxEvent::Rdmsr { index: r12, status },
            _ => TdxEvent::Wrmsr {
                index: r12,
                value: r13,
                status,
            },
        };
        self.events.push(event);
        (status, r11, outputs)
    }

    /// What an honest VMM does: checks the operands as the GHCI defines
    /// them, then emulates. Returns R10, R11 and, for CPUID, R12-R15.
    fn carry_out(&mut self, subfunction: u64, [r12, r13, r14, r15]: [u64; 4]) -> (u64, u64, Option<[u64; 4]>) {
        let invalid = (VMCALL_INVALID_OPERAND, 0, None);
        match subfunction {
            INSTRUCTION_IO => {
                let (Ok(port), true, true) = (u16::try_from(r14), matches!(r12, 1 | 2 | 4), r13 <= 1) else {
                    return invalid;
                };
                let bytes = r12 as u8;
                if r13 == 0 {
                    (VMCALL_SUCCESS, self.emulated.port_read(port, bytes) as u64, None)
                } else {
                    self.emulated.port_write(port, bytes, r15 as u32);
                    (VMCALL_SUCCESS, 0, None)
                }
            }
            INSTRUCTION_CPUID => match (u32::try_from(r12), u32::try_from(r13)) {
                (Ok(leaf), Ok(subleaf)) => {
                    let answer = self.emulated.cpuid(leaf, subleaf).map(u64::from);
                    (VMCALL_SUCCESS, 0, Some(answer))
                }
                _ => invalid,
            },
            INSTRUCTION_RDMSR => match u32::try_from(r12).ok().and_then(|i| self.emulated.rdmsr(i)) {
                Some(value) => (VMCALL_SUCCESS, value, None),
                None => invalid,
            },
            _ => match u32::try_from(r12) {
                Ok(index) if self.emulated.wrmsr(index, r13) => (VMCALL_SUCCESS, 0, None),
                _ => invalid,
            },
        }
    }

    /// MapGPA: returns (R10, R11).
    fn map_gpa(&mut self, memory: &GuestMemory, r12: u64, size: u64) -> (u64, u64) {
        let mask = self.shared_mask();
        let form = r12 & mask;
        let start = r12 & !mask;
        if size == 0 || (start | size) & (PAGE_SIZE - 1) != 0 {
            return (VMCALL_ALIGN_ERROR, r12);
        }
        let Some(end) = start.checked_add(size).filter(|&e| e <= memory.size() && e <= mask) else {
            return (VMCALL_INVALID_OPERAND, r12);
        };
        self.aliases.check(memory, "MapGPA", start, end - start, None);
        if let Some((calls, hostile)) = self.hostile_later {
            self.hostile_later = calls.checked_sub(1).map(|c| (c, hostile));
            if calls == 0 {
                self.hostile = Some(hostile);
            }
        }
        let chunk = self
            .config
            .map_gpa_chunk_pages
            .map_or(size, |p| (p * PAGE_SIZE).min(size));
        match self.hostile {
            Some(TdxHostile::ResumeBelowStart) => return (VMCALL_RETRY, r12.wrapping_sub(PAGE_SIZE)),
            Some(TdxHostile::ResumeAtEnd) => return (VMCALL_RETRY, end + form),
            Some(TdxHostile::ResumeUnaligned) => return (VMCALL_RETRY, r12 + PAGE_SIZE / 2),
            Some(TdxHostile::NoProgressForever) => return (VMCALL_RETRY, r12),
            Some(TdxHostile::SuccessWithoutConverting) => return (VMCALL_SUCCESS, 0),
            Some(TdxHostile::GarbageStatus(s)) => return (s, 0),
            Some(TdxHostile::ResumeRewind) => {
                self.rewind_flip = !self.rewind_flip;
                let resume = if self.rewind_flip {
                    r12 + PAGE_SIZE
                } else {
                    r12 - PAGE_SIZE
                };
                return (VMCALL_RETRY, resume);
            }
            Some(TdxHostile::ResumeWithoutSharedBit) => {
                self.convert(memory, start, start + chunk, form != 0);
                let status = if start + chunk < end {
                    VMCALL_RETRY
                } else {
                    VMCALL_SUCCESS
                };
                return (status, (start + chunk) & !mask);
            }
            None => {}
        }
        if self.stalls_left > 0 {
            self.stalls_left -= 1;
            return (VMCALL_RETRY, r12);
        }
        self.stalls_left = self.config.map_gpa_stalls_per_chunk;
        self.convert(memory, start, start + chunk, form != 0);
        if start + chunk < end {
            (VMCALL_RETRY, (start + chunk) | form)
        } else {
            (VMCALL_SUCCESS, 0)
        }
    }

    /// Moves `[start, end)` to shared (removing private pages: their
    /// contents are lost) or to private (adding pending pages with the
    /// largest mapping the alignment allows, up to `max_aug_level`).
    fn convert(&mut self, memory: &GuestMemory, start: u64, end: u64, to_shared: bool) {
        let (first, last) = (start / PAGE_SIZE, end / PAGE_SIZE);
        if to_shared {
            for gfn in first..last {
                let page = &mut self.pages[gfn as usize];
                if page.state != TdxPageState::Shared {
                    *page = TdxPage {
                        state: TdxPageState::Shared,
                        level: 0,
                    };
                    self.aliases.set_unaccepted(gfn * PAGE_SIZE, PAGE_SIZE, false);
                    memory.fill(gfn * PAGE_SIZE, PAGE_SIZE, SCRIBBLE);
                }
            }
            return;
        }
        let mut gfn = first;
        while gfn < last {
            let level = (0..=self.config.max_aug_level)
                .rev()
                .find(|&l| {
                    let n = level_pages(l);
                    gfn % n == 0
                        && gfn + n <= last
                        && self.pages[gfn as usize..(gfn + n) as usize]
                            .iter()
                            .all(|p| p.state == TdxPageState::Shared)
                })
                .unwrap_or(0);
            let n = level_pages(level);
            for (i, page) in self.pages[gfn as usize..(gfn + n) as usize].iter_mut().enumerate() {
                if page.state == TdxPageState::Shared {
                    *page = TdxPage {
                        state: TdxPageState::Pending,
                        level,
                    };
                    memory.fill((gfn + i as u64) * PAGE_SIZE, PAGE_SIZE, SCRIBBLE);
                }
            }
            gfn += n;
        }
    }
}

// SAFETY: the model changes guest memory only as the TDX module and VMM
// would: ACCEPT zeroes the accepted page, MapGPA scribbles converted pages;
// the reporting leaves change nothing.
unsafe impl Tdcall for MockTdx {
    unsafe fn tdcall(&self, regs: &mut Registers) {
        self.exits.here();
        self.handle(regs);
        self.exits.here();
    }
}
