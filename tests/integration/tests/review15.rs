//! Tests from a fifteenth hostile review (the guest's real path for TDX and
//! SEV-SNP hosts, the GHCB MSR protocol's CPUID, the guest's console and
//! page walker; commits c01b48c..2741fa0).
//!
//! Tests marked FAILS fail against the commit reviewed (2741fa0) and name
//! the promise they break; the others pass and kill a mutant that the
//! existing tests let survive (named in each). Findings that only a guest
//! boot can show (mutants of the real path that `scripts/qemu-guest` lets
//! through) are in the review report, not here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use coco_convert::{EncryptionBit, Paging, Visibility};
use snp_ghcb::msr_protocol::{cpuid_response, CpuidRegister, MsrProtocolError};
use snp_ghcb::GhcbMsr;

// The guest's page walker and console, compiled for the host (as
// review14.rs does with the firmware map), over stand-ins for the two
// guest modules they name.
mod memory {
    /// What walk.rs reads of the guest's `Tables`.
    pub struct Tables {
        pub root: u64,
        pub paging: coco_convert::Paging,
        pub enc: coco_convert::EncryptionBit,
    }
    /// On the host every table is a page of the test's own heap.
    pub const TABLE_FRAMES: (u64, u64) = (0, u64::MAX);
}

mod smp {
    /// One CPU, as far as the console's lock holder is concerned.
    pub fn cpu() -> usize {
        0
    }
}

mod scenarios {
    /// The guest fails the run; here the test panics.
    pub fn check(ok: bool, what: &str) {
        assert!(ok, "{what}");
    }
}

#[path = "../../guest/src/walk.rs"]
#[allow(dead_code)]
mod walk;

#[path = "../../guest/src/io.rs"]
#[allow(dead_code, unexpected_cfgs)]
mod io;

// ---------------------------------------------------------------------
// G1 (low): a CPUID answer through the GHCB MSR protocol that names
// another register than the one asked for is taken as the one asked for.
//
// Spec: GHCB spec 56421, section 2.3.1, CPUID response (0x005):
// GHCBData[31:30] is "the CPUID function register being returned".
// ghcb/src/msr_protocol.rs `cpuid_response` ignores it ("Linux does not
// check it, and neither does this"); protocol::cpuid therefore fills EAX
// with whatever register a confused or hostile host returned.
//
// Fix: `cpuid_response(response, register)` refusing a response whose
// [31:30] is not the request's register (hvmock and KVM echo it).
// ---------------------------------------------------------------------

/// A host that answers every CPUID request with the *next* register's
/// value, correctly labelled as that register.
struct ShiftedCpuid([u32; 4]);

// SAFETY: no memory is touched; the answers are computed.
unsafe impl GhcbMsr for ShiftedCpuid {
    unsafe fn vmgexit(&self, msr_value: u64) -> u64 {
        assert_eq!(msr_value & 0xFFF, 0x004, "only CPUID requests here");
        let asked = (msr_value >> 30) & 3;
        let given = (asked + 1) & 3;
        (self.0[given as usize] as u64) << 32 | given << 30 | 0x005
    }
}

#[test]
fn g1_fails_a_cpuid_answer_for_another_register_is_refused() {
    // FAILS at 2741fa0: Ok([2, 3, 4, 1]).
    let host = ShiftedCpuid([1, 2, 3, 4]);
    // SAFETY: the host above changes no memory.
    let answer = unsafe { snp_ghcb::protocol::cpuid(&host, 0) };
    assert!(
        answer.is_err(),
        "each register came back labelled as another one, yet was taken: {answer:x?}"
    );
}

// ---------------------------------------------------------------------
// G2 (test strength): every reserved bit of a CPUID response, not just
// bit 12, must be refused. snp_nae_io.rs checks bit 12 alone (by hand and
// through hvmock's MsrReservedBits, which also sets only bit 12), so the
// mutant `0x3FFF_F000` -> `0x0000_1000` in msr_protocol::cpuid_response
// survives the whole suite. This test passes and kills it.
// ---------------------------------------------------------------------

#[test]
fn g2_every_reserved_bit_of_a_cpuid_response_is_refused() {
    for bit in 12..=29 {
        let response = 0x1234_5678_0000_0005 | 1u64 << bit;
        assert_eq!(
            cpuid_response(response, CpuidRegister::Eax),
            Err(MsrProtocolError::ReservedBits { response }),
            "reserved bit {bit}"
        );
    }
    // [31:30] (the register) is not reserved.
    for (reg, register) in CpuidRegister::ALL.into_iter().enumerate() {
        assert_eq!(
            cpuid_response(0x1234_5678_0000_0005 | (reg as u64) << 30, register),
            Ok(0x1234_5678)
        );
    }
}

// ---------------------------------------------------------------------
// C1 (medium, security): on the real SNP path the C-bit is the
// hypervisor's word twice over: `snp_c_bit` compares the SEV information
// response with CPUID Fn8000_001F, and in an SNP guest CPUID goes to the
// hypervisor too (through #VC). No check at that layer can catch a host
// that moves the bit in both answers, so there is no test here: the
// real-host image now verifies the bit as Linux's sev_verify_cbit does (a
// random value written private through the firmware's tables must read
// back the same through tables built with the reported bit), which needs
// real memory encryption and has never run.
// ---------------------------------------------------------------------

// ---------------------------------------------------------------------
// IO1 (medium): the console lock is held across the port write, and the
// #VE handler takes it: a #VE raised by a console write deadlocks.
//
// io.rs `set_route` (and `print`) keep CONSOLE locked while `port_out`
// runs. exits.rs `on_ve` calls `io::route()` (CONSOLE.lock()) first
// thing after TDG.VP.VEINFO.GET, and `println!` on refusal. In a TD, any
// failure before the route is known (boot, firmware map, detection, the
// la57 check: all call `fail`) reaches `io::exit` with the route
// Buffered, which calls `set_route(Route::Instruction)`: the buffered
// bytes go out by `out dx, al` with CONSOLE held, the `out` raises #VE,
// and on_ve spins on CONSOLE for ever. The failure is never printed,
// though on_ve was written to print it through the VMM ("Whatever
// happens next is printed through the VMM"). spin::Mutex is not
// re-entrant; the handler runs on the same CPU as the holder.
//
// The test stands a Host port writer in for the trapping `out` and
// calls `io::route()` from it, as on_ve does, on another thread with a
// deadline (on the guest's one CPU it would spin for ever).
//
// Fix: never hold CONSOLE across a port write that can trap: copy the
// kept bytes out and drop the lock before writing them (and in `print`,
// format under the lock but write after), or have on_ve/on_vc use
// `CONSOLE.try_lock()` and an unbuffered direct route; and in a TD take
// the TDVMCALL route in `exit` rather than the trapping instruction.
// ---------------------------------------------------------------------

static CONSOLE_TESTS: Mutex<()> = Mutex::new(());
static REENTERED: AtomicBool = AtomicBool::new(false);
static HANDLER_FINISHED: AtomicBool = AtomicBool::new(false);
static WRITTEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// A port write whose "#VE handler" reads the route, as on_ve does.
fn trapping_out(port: u16, value: u32, _width: u8) {
    if port == 0x3F8 {
        WRITTEN.lock().unwrap().push(value as u8);
    }
    if REENTERED.swap(true, Ordering::SeqCst) {
        return;
    }
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = io::route();
        let _ = done.send(());
    });
    HANDLER_FINISHED.store(
        finished.recv_timeout(Duration::from_millis(500)).is_ok(),
        Ordering::SeqCst,
    );
}

#[test]
fn io1_fails_a_trap_raised_by_a_console_write_can_read_the_console_route() {
    // FAILS at 2741fa0: the "handler" cannot take CONSOLE while the
    // flush holds it.
    let _serial = CONSOLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    io::set_route(io::Route::Buffered);
    io::print(format_args!("early line\n"));
    REENTERED.store(false, Ordering::SeqCst);
    io::set_route(io::Route::Host(trapping_out));
    assert!(REENTERED.load(Ordering::SeqCst), "the flush wrote nothing");
    assert!(
        HANDLER_FINISHED.load(Ordering::SeqCst),
        "a #VE raised by the console flush would spin for ever on CONSOLE in on_ve (io::route())"
    );
}

// ---------------------------------------------------------------------
// IO3: a trap handler that prints while its own CPU is inside a console
// write (a #VE raised by the console's `out`, reporting why it failed)
// writes around the lock its CPU holds, instead of spinning on it.
// ---------------------------------------------------------------------

fn printing_out(port: u16, value: u32, _width: u8) {
    if port == 0x3F8 {
        WRITTEN.lock().unwrap().push(value as u8);
    }
    if !REENTERED.swap(true, Ordering::SeqCst) {
        io::print(format_args!("[trap]"));
    }
}

#[test]
fn io3_a_handler_printing_inside_a_console_write_on_its_cpu_does_not_deadlock() {
    let _serial = CONSOLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    io::set_route(io::Route::Buffered);
    WRITTEN.lock().unwrap().clear();
    io::print(format_args!("early\n"));
    REENTERED.store(false, Ordering::SeqCst);
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        io::set_route(io::Route::Host(printing_out));
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(2)).is_ok(),
        "the handler's print spun for ever on the lock its own CPU holds"
    );
    let out = String::from_utf8(WRITTEN.lock().unwrap().clone()).unwrap();
    // The handler's words land where its trap interrupted the write.
    assert!(out.contains("[trap]"), "{out:?}");
    assert_eq!(out.replacen("[trap]", "", 1), "early\r\n");
}

// ---------------------------------------------------------------------
// IO2 (passes): what does not fit in the 16 KiB kept before the route is
// known is counted and reported once, and nothing kept is written twice.
// ---------------------------------------------------------------------

static COUNTED: AtomicUsize = AtomicUsize::new(0);
fn counting_out(port: u16, value: u32, _width: u8) {
    if port == 0x3F8 {
        WRITTEN.lock().unwrap().push(value as u8);
        COUNTED.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn io2_early_output_past_the_buffer_is_counted_not_duplicated() {
    let _serial = CONSOLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    io::set_route(io::Route::Host(counting_out));
    io::set_route(io::Route::Buffered);
    WRITTEN.lock().unwrap().clear();
    // 20000 bytes and 100 newlines, each of which is kept as "\r\n".
    let line = "x".repeat(199);
    for _ in 0..100 {
        io::print(format_args!("{line}\n"));
    }
    io::set_route(io::Route::Host(counting_out));
    let out = String::from_utf8(WRITTEN.lock().unwrap().clone()).unwrap();
    let lost = 20_100 - 16 * 1024;
    let tail = format!("({lost} bytes of early output lost)\r\n");
    assert!(out.ends_with(&tail), "{:?}", &out[out.len().saturating_sub(80)..]);
    assert_eq!(out.len(), 16 * 1024 + tail.len());
    // A second switch writes nothing again.
    WRITTEN.lock().unwrap().clear();
    io::set_route(io::Route::Host(counting_out));
    assert!(WRITTEN.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------
// W1 (low): the walker follows a table pointer that carries the TDX
// shared bit as if it were private.
//
// walk.rs promises "what the MMU would translate, read the way the MMU
// reads it". `translate` and `visit` strip the encryption bit from
// non-leaf entries (`entry & ADDRESS_FIELD & !t.enc.mask()`) and read the
// private frame. In a TD the shared bit is a GPA bit for paging-structure
// reads too: the CPU would read that table through the shared alias (the
// host's memory), so the leaf the walker reports -- private, the right
// frame -- is not what the MMU uses. Scenario 8's "every mapping of RAM
// is private" then passes on tables whose walk goes through host memory.
// (On SEV-SNP page-table walks are always private, so stripping the
// C-bit there is right.)
//
// Fix: for a Shared-means-set bit (TDX), fail the check on any non-leaf
// entry that carries it instead of stripping it.
// ---------------------------------------------------------------------

#[repr(C, align(4096))]
struct Table([u64; 512]);

fn table() -> &'static mut Table {
    Box::leak(Box::new(Table([0; 512])))
}

fn addr(t: &Table) -> u64 {
    t as *const Table as u64
}

const PRESENT_RW: u64 = 0b11;
const PS: u64 = 1 << 7;

#[test]
fn w1_fails_a_table_pointer_through_the_shared_alias_is_not_reported_private() {
    // FAILS at 2741fa0: Some(Leaf { side: Private, .. }).
    let shared = 1u64 << 47;
    let enc = EncryptionBit::tdx(shared).unwrap();
    let (pml4, pdpt, pd) = (table(), table(), table());
    let (pdpt_pa, pd_pa) = (addr(pdpt), addr(pd));
    pml4.0[1] = pdpt_pa | PRESENT_RW;
    pdpt.0[0] = pd_pa | shared | PRESENT_RW; // the table pointer is shared
    pd.0[3] = 0x4060_0000 | PS | PRESENT_RW; // a private 2 MiB leaf
    let t = memory::Tables {
        root: addr(pml4),
        paging: Paging::Four,
        enc,
    };
    let va = (1u64 << 39) + 3 * (2 << 20) + 0x1234;
    let seen = std::panic::catch_unwind(|| walk::translate(&t, va));
    assert!(
        !matches!(seen, Ok(Some(ref leaf)) if leaf.side == Visibility::Private),
        "the PD is read through its shared alias by the MMU; the walker reports {seen:?}"
    );
}

// ---------------------------------------------------------------------
// W2 (passes): large leaves at either depth, the PAT bit of a 2 MiB leaf,
// the C-bit, and the upper half's sign extension.
// ---------------------------------------------------------------------

#[test]
fn w2_large_leaves_and_the_upper_half_at_five_levels() {
    let c_bit = 51;
    let enc = EncryptionBit::snp(c_bit).unwrap();
    let (pml5, pml4, pdpt, pd) = (table(), table(), table(), table());
    let (pml4_pa, pdpt_pa, pd_pa) = (addr(pml4), addr(pdpt), addr(pd));
    let c = 1u64 << c_bit;
    pml5.0[510] = pml4_pa | c | PRESENT_RW;
    pml4.0[7] = pdpt_pa | c | PRESENT_RW;
    pdpt.0[2] = 0x8000_0000 | c | PS | PRESENT_RW; // 1 GiB, private
    pdpt.0[3] = pd_pa | c | PRESENT_RW;
    pd.0[5] = 0x1_0020_0000 | 1 << 12 | PS | PRESENT_RW; // 2 MiB, shared, PAT set
    let t = memory::Tables {
        root: addr(pml5),
        paging: Paging::Five,
        enc,
    };
    let base = 0xFF00_0000_0000_0000u64 | 510 << 48 | 7 << 39;
    let gib = walk::translate(&t, base + (2 << 30) + 0x345).unwrap();
    assert_eq!(
        (gib.pa, gib.size, gib.side),
        (0x8000_0345, 1 << 30, Visibility::Private)
    );
    let mib = walk::translate(&t, base + (3 << 30) + 5 * (2 << 20) + 0x10).unwrap();
    assert_eq!(
        (mib.pa, mib.size, mib.side),
        (0x1_0020_0010, 2 << 20, Visibility::Shared)
    );
    let mut leaves = Vec::new();
    walk::for_each_leaf(&t, &mut |l| leaves.push((l.va, l.size)));
    assert_eq!(
        leaves,
        vec![(base + (2 << 30), 1 << 30), (base + (3 << 30) + 5 * (2 << 20), 2 << 20)]
    );
}
