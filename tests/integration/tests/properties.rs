//! Property tests: the guest-side loops against hosts that answer at
//! random (never a panic, always bounded, `Ok` only when the answers
//! justify it) and against the honest models with random configurations
//! (always `Ok`, state exactly as asked).
//!
//! These loops see GPAs only, never page tables, so the paging depth does
//! not reach them; what comes with 5-level paging does: a TD that uses
//! LA57 has GPAW 52, so the MapGPA properties run with the shared bit at
//! 47 and at 51.

use std::cell::RefCell;

use hvmock::{SnpConfig, TdxConfig, TdxPageState};
use integration::{boot_ghcb, snp, tdx, MIB};
use proptest::prelude::*;
use snp_ghcb::msr_protocol::PscOp;
use snp_ghcb::psc::{change_page_state, PscError, MAX_EXITS_WITHOUT_PROGRESS};
use snp_ghcb::{Field, GhcbMsr};
use tdcall::{map_gpa, Registers, Tdcall, Visibility, MAX_RETRIES_WITHOUT_PROGRESS};

/// The shared bit the scripted answers carry; a run with GPAW 52 moves it
/// to bit 51 ([`widen`]).
const SHARED: u64 = 1 << 47;

/// `gpa` with its shared bit at `shared` instead of [`SHARED`].
fn widen(gpa: u64, shared: u64) -> u64 {
    if gpa & SHARED != 0 {
        gpa & !SHARED | shared
    } else {
        gpa
    }
}

/// A VMM that answers MapGPA from a script of (R10, R11) pairs, cycling,
/// and records every R12/R13 it was sent.
struct ScriptedVmm {
    script: Vec<(u64, u64)>,
    sent: RefCell<Vec<(u64, u64)>>,
}

// SAFETY: changes no memory.
unsafe impl Tdcall for ScriptedVmm {
    unsafe fn tdcall(&self, regs: &mut Registers) {
        let mut sent = self.sent.borrow_mut();
        let (r10, r11) = self.script[sent.len() % self.script.len()];
        sent.push((regs.r12, regs.r13));
        regs.rax = 0;
        regs.r10 = r10;
        regs.r11 = r11;
    }
}

fn answer(start: u64, end: u64) -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        Just((0u64, 0u64)),
        // RETRY with a resume GPA near or inside the request, either form.
        (start.saturating_sub(2 * 4096)..end + 2 * 4096, any::<bool>(), 0u64..3)
            .prop_map(|(g, shared, misalign)| (1, ((g & !0xFFF) + misalign * 0x800) | if shared { SHARED } else { 0 })),
        any::<u64>().prop_map(|s| (s, 0)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn map_gpa_against_random_vmm_is_bounded_and_honest(
        start_page in 0u64..64,
        pages in 1u64..32,
        shared in any::<bool>(),
        script in prop::collection::vec(answer(0, 96 * 4096), 1..12),
        gpaw_52 in any::<bool>(),
    ) {
        let mask = if gpaw_52 { 1 << 51 } else { SHARED };
        let script = script.into_iter().map(|(r10, r11)| (r10, if r10 == 1 { widen(r11, mask) } else { r11 })).collect();
        let (start, len) = (start_page * 4096, pages * 4096);
        let vmm = ScriptedVmm { script, sent: RefCell::new(Vec::new()) };
        let to = if shared { Visibility::Shared } else { Visibility::Private };
        // SAFETY: the scripted VMM changes no memory.
        let result = unsafe { map_gpa(&vmm, start, len, to, mask) };
        let sent = vmm.sent.borrow();
        let bound = (pages + 1) * (MAX_RETRIES_WITHOUT_PROGRESS as u64 + 1);
        prop_assert!(sent.len() as u64 <= bound, "{} calls > bound {}", sent.len(), bound);
        let form = if shared { mask } else { 0 };
        let end = (start + len) | form;
        let mut previous = 0;
        for &(r12, r13) in sent.iter() {
            prop_assert_eq!(r12 & (SHARED | 1 << 51), form);
            prop_assert!(r12 >= previous && r12 >= start | form && r12 < end && r12 % 4096 == 0);
            prop_assert_eq!(r12 + r13, end);
            previous = r12;
        }
        if result.is_ok() {
            let last = (sent.len() - 1) % vmm.script.len();
            prop_assert_eq!(vmm.script[last].0, 0, "Ok only after a success answer");
        }
    }

    #[test]
    fn map_gpa_against_honest_model_always_converts(
        start_page in 0u64..256,
        pages in 1u64..300,
        chunk in prop::option::of(1u64..50),
        stalls in 0u32..=MAX_RETRIES_WITHOUT_PROGRESS,
        gpaw in prop_oneof![Just(48u8), Just(52u8)],
    ) {
        let td = tdx(4 * MIB, TdxConfig { gpaw, map_gpa_chunk_pages: chunk, map_gpa_stalls_per_chunk: stalls, ..TdxConfig::default() });
        let (start, len) = (start_page * 4096, pages * 4096);
        // SAFETY: the model's memory is not used by Rust code.
        let calls = unsafe { map_gpa(&td, start, len, Visibility::Shared, td.shared_mask()) }.unwrap();
        let chunks = chunk.map_or(1, |c| pages.div_ceil(c));
        prop_assert_eq!(calls.calls, chunks * (stalls as u64 + 1));
        for gpa in (0..4 * MIB).step_by(4096) {
            let inside = gpa >= start && gpa < start + len;
            prop_assert_eq!(td.page(gpa).state == TdxPageState::Shared, inside);
        }
    }

    #[test]
    fn accept_range_takes_the_fewest_calls_the_mapping_allows(
        start_page in 0u64..1024,
        pages in 1u64..1100,
        aug in 0u8..=2,
    ) {
        let td = tdx(16 * MIB, TdxConfig { max_aug_level: aug, ..TdxConfig::default() });
        let (start, len) = (start_page * 4096, pages * 4096);
        // SAFETY: the model's memory is not used by Rust code.
        unsafe {
            map_gpa(&td, start, len, Visibility::Shared, td.shared_mask()).unwrap();
            map_gpa(&td, start, len, Visibility::Private, td.shared_mask()).unwrap();
        }
        // SAFETY: as above.
        let calls = unsafe { tdcall::accept_range(&td, start, len) }.unwrap();
        prop_assert_eq!(calls.accepted[0] + 512 * calls.accepted[1] + 512 * 512 * calls.accepted[2], pages);
        // With the VMM mapping 2 MiB where it can, every aligned 2 MiB is
        // one call; with 4 KiB mappings, each aligned 2 MiB costs one
        // refused 2 MiB call more.
        let two_mib_blocks = (start.div_ceil(2 * MIB) * 2 * MIB..start + len).step_by(2 * MIB as usize)
            .filter(|b| b + 2 * MIB <= start + len).count() as u64;
        let expected = if aug >= 1 { pages - 511 * two_mib_blocks } else { pages + two_mib_blocks };
        prop_assert_eq!(calls.calls, expected);
        prop_assert!(td.memory().is_filled(start, len, 0));
    }

    #[test]
    fn psc_against_honest_model_always_completes(
        start_page in 0u64..1024,
        pages in 1u64..1100,
        per_exit in prop::option::of(1u64..600),
        allow_2m in any::<bool>(),
    ) {
        let hv = snp(16 * MIB, SnpConfig { psc_pages_per_exit: per_exit, ..SnpConfig::default() });
        let mut ghcb = boot_ghcb(&hv);
        let (start, len) = (start_page * 4096, pages * 4096);
        // SAFETY: the model's memory is not used by Rust code.
        unsafe { change_page_state(&mut ghcb, &hv, start, len, PscOp::Shared, allow_2m) }.unwrap();
        for gpa in (0..16 * MIB - 4096).step_by(4096) {
            let inside = gpa >= start && gpa < start + len;
            prop_assert_eq!(hv.rmp(gpa).assigned, !inside);
        }
        prop_assert_eq!(hv.stats().protocol_violations, 0);
    }
}

/// A hypervisor that, on every PSC exit, writes random values over the
/// header, one entry and SW_EXITINFO1/2 of the GHCB it was given.
struct ScribblingHypervisor {
    memory: std::sync::Arc<hvmock::GuestMemory>,
    ghcb_gpa: u64,
    writes: Vec<(u64, u64, u64, u64, u8)>,
    exits: RefCell<usize>,
}

// SAFETY: writes only the GHCB page.
unsafe impl GhcbMsr for ScribblingHypervisor {
    unsafe fn vmgexit(&self, msr: u64) -> u64 {
        assert_eq!(msr, self.ghcb_gpa);
        let mut exits = self.exits.borrow_mut();
        let (header, entry, info1, info2, index) = self.writes[*exits % self.writes.len()];
        *exits += 1;
        let m = &self.memory;
        m.write_u64(self.ghcb_gpa + 0x800, header);
        m.write_u64(self.ghcb_gpa + 0x808 + 8 * (index as u64 % 8), entry);
        m.write_u64(self.ghcb_gpa + 0x398, info1);
        m.write_u64(self.ghcb_gpa + 0x3A0, info2);
        msr
    }
}

fn header_write() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..12, 0u64..12).prop_map(|(cur, end)| end << 16 | cur),
        (0u64..12).prop_map(|cur| 7 << 16 | cur),
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn psc_against_random_hypervisor_is_bounded_and_honest(
        writes in prop::collection::vec(
            (header_write(), any::<u64>(), prop_oneof![Just(0u64), any::<u64>()], prop_oneof![Just(0u64), any::<u64>()], any::<u8>()),
            1..10,
        ),
    ) {
        let memory = std::sync::Arc::new(hvmock::GuestMemory::new(MIB));
        let ghcb_gpa = 0xF_F000;
        let hv = ScribblingHypervisor { memory: memory.clone(), ghcb_gpa, writes, exits: RefCell::new(0) };
        // SAFETY: the page is used by nothing else.
        let mut ghcb = unsafe { snp_ghcb::GhcbPage::new(std::ptr::NonNull::new(memory.ptr(ghcb_gpa).cast()).unwrap(), ghcb_gpa) };
        // 8 entries of 4 KiB.
        // SAFETY: the scripted hypervisor changes nothing but the GHCB.
        let result = unsafe { change_page_state(&mut ghcb, &hv, 0, 8 * 4096, PscOp::Private, false) };
        let exits = *hv.exits.borrow() as u64;
        // Progress is a strictly growing (cur_entry, cur_page) <= (8, 0).
        prop_assert!(exits <= 9 * (MAX_EXITS_WITHOUT_PROGRESS as u64 + 1), "{} exits", exits);
        if result.is_ok() {
            let header = ghcb.shared_qword(0);
            prop_assert_eq!(header, 7 << 16 | 8, "Ok only when the header says all 8 entries are done");
            prop_assert_eq!(ghcb.field(Field::SwExitInfo2), 0);
        } else if let Err(PscError::Nae(_)) = result {
            prop_assert_ne!(ghcb.field(Field::SwExitInfo1) as u32, 0);
        }
    }
}
