//! Two CPUs converting at once overlap their host calls: the table lock,
//! which serialises page-table changes, is held across no hypercall. A
//! model's host call on each CPU waits until the other CPU's has entered
//! too; only an engine that lets both calls be in flight at once gets
//! past it, and while both are, the test asks whether the lock is held.
//! The waits have a deadline, so an engine that serialises the calls
//! fails the test instead of hanging it.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use coco_convert::platform::snp::{GhcbSlot, PerCpuGhcbs, Snp};
use coco_convert::platform::tdx::Tdx;
use coco_convert::{Engine, FrameSource, PageState, PhysMem, Platform, Target, TlbShootdown, Visibility};
use integration::null::{NullSnp, NullTdx};
use integration::sim::{current_cpu, set_cpu};
use integration::world::{Machine, Shape, TABLES};
use integration::MIB;
use snp_ghcb::{GhcbMsr, PageSize, Pvalidate, RawPvalidate};
use tdcall::{leaf, subfunction, Registers, Tdcall};

/// How long a CPU's host call, and the test, wait for the other CPU's.
/// Far beyond what two calls that can overlap need to meet.
const DEADLINE: Duration = Duration::from_secs(5);

/// One frame for each CPU, in different GiBs of the direct map (a 1 GiB
/// page and 2 MiB pages in [`Shape::Mixed`]).
const FRAMES: [u64; 2] = [64 * MIB, 1024 * MIB + 64 * MIB];

#[derive(Debug, Default)]
struct Meeting {
    /// Which CPUs' host calls have entered.
    entered: [bool; 2],
    in_flight: usize,
    /// Set by the test once it has looked: the calls may return.
    released: bool,
}

/// Where the two CPUs' first host calls of a conversion meet.
#[derive(Debug, Default)]
struct Rendezvous {
    armed: AtomicBool,
    meeting: Mutex<Meeting>,
    changed: Condvar,
}

impl Rendezvous {
    /// In a host call: the calling CPU's first call after arming waits
    /// until the test releases it (which it does once both CPUs' calls
    /// are in, or at the deadline).
    fn host_call(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let cpu = current_cpu();
        let mut m = self.meeting.lock().unwrap();
        if m.entered[cpu] {
            return;
        }
        m.entered[cpu] = true;
        m.in_flight += 1;
        self.changed.notify_all();
        let (mut m, _) = self.changed.wait_timeout_while(m, DEADLINE, |m| !m.released).unwrap();
        m.in_flight -= 1;
    }

    /// The test's side: waits until both CPUs' calls are in (or the
    /// deadline passes), runs `look` while they are, and releases them.
    /// Returns whether both met, and what `look` said.
    fn meet<R>(&self, look: impl FnOnce() -> R) -> (bool, R) {
        let m = self.meeting.lock().unwrap();
        let (mut m, _) = self
            .changed
            .wait_timeout_while(m, DEADLINE, |m| m.entered != [true, true])
            .unwrap();
        // Looked at with the meeting locked: neither call can return
        // meanwhile.
        let met = m.in_flight == 2;
        let seen = look();
        m.released = true;
        self.changed.notify_all();
        (met, seen)
    }
}

/// TDX whose MapGPA meets the other CPU's.
#[derive(Debug, Default)]
struct MeetingTdx {
    rendezvous: Rendezvous,
    answers: NullTdx,
}

// SAFETY: answers as the null TDX does, and changes no memory.
unsafe impl Tdcall for MeetingTdx {
    unsafe fn tdcall(&self, regs: &mut Registers) {
        if regs.rax == leaf::VP_VMCALL && regs.r11 == subfunction::MAP_GPA {
            self.rendezvous.host_call();
        }
        // SAFETY: forwarded.
        unsafe { self.answers.tdcall(regs) }
    }
}

/// SNP whose Page State Change exits meet the other CPU's.
#[derive(Debug)]
struct MeetingSnp {
    rendezvous: Rendezvous,
    answers: NullSnp,
}

// SAFETY: forwards to the null SNP, which writes only the GHCB page.
unsafe impl GhcbMsr for MeetingSnp {
    unsafe fn vmgexit(&self, value: u64) -> u64 {
        // The GHCB protocol (a GHCB's address, low bits clear): the page
        // state change exit, not an MSR-protocol request.
        if value & 0xFFF == 0 {
            self.rendezvous.host_call();
        }
        // SAFETY: forwarded.
        unsafe { self.answers.vmgexit(value) }
    }
}

// SAFETY: forwards to the null SNP, which changes nothing.
unsafe impl Pvalidate for MeetingSnp {
    unsafe fn pvalidate(&self, va: u64, size: PageSize, validate: bool) -> RawPvalidate {
        // SAFETY: forwarded.
        unsafe { self.answers.pvalidate(va, size, validate) }
    }

    unsafe fn evict_cache_lines(&self, va: u64, pages: u64) {
        // SAFETY: forwarded.
        unsafe { self.answers.evict_cache_lines(va, pages) }
    }
}

/// CPU 0 and CPU 1 each convert their frame to shared at once; the test
/// looks at the table lock while both host calls are in flight. Returns
/// (whether both calls were in flight at once, whether the lock was held
/// then).
fn convert_on_two_cpus<M, F, T, P>(e: &Engine<'_, M, F, T, P>, rendezvous: &Rendezvous) -> (bool, bool)
where
    M: PhysMem + Sync,
    F: FrameSource + Sync,
    T: TlbShootdown + Sync,
    P: Platform + Sync,
{
    rendezvous.armed.store(true, Ordering::Release);
    let (met, held) = std::thread::scope(|s| {
        let cpus: Vec<_> = FRAMES
            .iter()
            .enumerate()
            .map(|(cpu, &pa)| {
                s.spawn(move || {
                    set_cpu(cpu);
                    e.convert(Target::Physical { pa, len: 4096 }, Visibility::Shared)
                })
            })
            .collect();
        let seen = rendezvous.meet(|| e.table_lock_held());
        for cpu in cpus {
            cpu.join().unwrap().expect("conversion");
        }
        seen
    });
    for pa in FRAMES {
        assert_eq!(e.state(pa), Some(PageState::Shared), "{pa:#x}");
    }
    (met, held)
}

#[test]
fn tdx_two_cpus_have_their_map_gpa_in_flight_at_once_without_the_table_lock() {
    let m = Machine::new(coco_convert::EncryptionBit::tdx(1 << 47).unwrap(), Shape::Mixed);
    let tdx = MeetingTdx::default();
    let e = m.engine(Tdx::new(&tdx, 1 << 47).unwrap());
    let (met, held) = convert_on_two_cpus(&e, &tdx.rendezvous);
    assert!(met, "the two CPUs' MapGPA calls were never in flight at once");
    assert!(!held, "the table lock was held while both MapGPA calls were in flight");
    assert_eq!(m.watch.violations(), Vec::<String>::new());
}

#[test]
fn snp_two_cpus_have_their_page_state_changes_in_flight_at_once_without_the_table_lock() {
    let m = Machine::new(coco_convert::EncryptionBit::snp(51).unwrap(), Shape::Mixed);
    let snp = MeetingSnp {
        rendezvous: Rendezvous::default(),
        answers: NullSnp::new(m.mem.clone()),
    };
    let slots: &[GhcbSlot] = Box::leak(Box::new([GhcbSlot::new(), GhcbSlot::new()]));
    let platform = Snp::new(&snp, &snp, PerCpuGhcbs::new(slots, current_cpu), 51).unwrap();
    let e = m.engine(platform).with_window(&m.windows);
    // Each CPU's GHCB, just below the table frames, set up on that CPU.
    for cpu in 0..2 {
        set_cpu(cpu);
        let pa = TABLES - (cpu as u64 + 1) * 4096;
        let ptr = NonNull::new(m.mem.ptr(pa).cast()).unwrap();
        // SAFETY: the page is simulated memory nothing else uses.
        unsafe { coco_convert::setup_ghcb(&e, pa, ptr) }.expect("GHCB");
    }
    set_cpu(0);
    let (met, held) = convert_on_two_cpus(&e, &snp.rendezvous);
    assert!(
        met,
        "the two CPUs' page state change exits were never in flight at once"
    );
    assert!(!held, "the table lock was held while both exits were in flight");
    assert_eq!(m.watch.violations(), Vec::<String>::new());
}
