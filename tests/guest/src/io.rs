//! Serial output (COM1) and the verdict.
//!
//! How a port write reaches the device depends on where the guest runs: in
//! the emulated mode, and on a machine that is neither a TD nor an SNP
//! guest, the `out` instruction; in a TD, TDVMCALL\<Instruction.IO\>; in
//! an SNP guest, the GHCB's IOIO event, once a GHCB exists. Until the
//! route is known (the image for real hosts starts so), output is kept in
//! a buffer and written out when it is.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

/// A port write the host carries out: (port, value, width in bytes).
pub type HostOut = fn(u16, u32, u8);

#[derive(Clone, Copy)]
pub enum Route {
    /// The `out` instruction.
    Instruction,
    /// Kept until the route is known.
    Buffered,
    /// Through the host, by a request instead of the instruction.
    Host(HostOut),
}

/// The route, readable without the console's lock: a #VE or #VC handler
/// may run while this CPU holds it (the `out` of a console write traps in
/// a TD or an SNP guest). 0: the instruction, 1: kept; else the host's
/// function.
static ROUTE: AtomicUsize = AtomicUsize::new(if cfg!(feature = "emulator") { 0 } else { 1 });

impl Route {
    fn encode(self) -> usize {
        match self {
            Route::Instruction => 0,
            Route::Buffered => 1,
            Route::Host(out) => out as usize,
        }
    }

    fn decode(raw: usize) -> Route {
        match raw {
            0 => Route::Instruction,
            1 => Route::Buffered,
            // SAFETY: every other value ROUTE holds was stored from a
            // `HostOut` by `encode`.
            f => Route::Host(unsafe { core::mem::transmute::<usize, HostOut>(f) }),
        }
    }
}

/// The route port writes take now.
pub fn route() -> Route {
    Route::decode(ROUTE.load(Ordering::Acquire))
}

/// What is kept until the route is known. Its lock also keeps lines
/// whole between CPUs.
struct Kept {
    bytes: [u8; 16 * 1024],
    len: usize,
    /// Bytes that did not fit.
    lost: usize,
}

static KEPT: spin::Mutex<Kept> = spin::Mutex::new(Kept {
    bytes: [0; 16 * 1024],
    len: 0,
    lost: 0,
});
/// The CPU holding [`KEPT`] (its index + 1; 0: none). A trap handler that
/// prints on the CPU that holds it (a #VE raised by the console's own
/// `out`, a failure inside a print) writes around the lock, which would
/// otherwise never be released.
static HOLDER: AtomicUsize = AtomicUsize::new(0);
/// Bytes dropped because they had to be kept while this CPU held the
/// buffer.
static LOST_NESTED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the buffer, locked; or with none, if this CPU already
/// holds it (a trap inside a console write).
fn with_kept<T>(f: impl FnOnce(Option<&mut Kept>) -> T) -> T {
    let me = crate::smp::cpu() + 1;
    if HOLDER.load(Ordering::Acquire) == me {
        return f(None);
    }
    let mut kept = KEPT.lock();
    HOLDER.store(me, Ordering::Release);
    let result = f(Some(&mut kept));
    HOLDER.store(0, Ordering::Release);
    result
}

fn port_out(route: Route, port: u16, value: u32, width: u8) {
    match (route, width) {
        (Route::Host(out), _) => out(port, value, width),
        // SAFETY: port I/O to devices this guest owns (COM1, debug exit).
        (_, 1) => unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") value as u8, options(nostack, preserves_flags))
        },
        // SAFETY: as above.
        _ => unsafe {
            core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
        },
    }
}

/// A port write by the `out` instruction, whatever the route: for the
/// emulated mode alone (the legacy PIC's masks, which only the UEFI entry
/// finds unmasked; the models' console forwarded to the real one).
#[cfg(feature = "emulator")]
pub fn out_instruction(port: u16, value: u32, width: u8) {
    port_out(Route::Instruction, port, value, width);
}

/// Writes bytes by the route of the moment (a handler may change it
/// between two bytes), or keeps them.
struct Console<'a>(Option<&'a mut Kept>);

impl Console<'_> {
    fn byte(&mut self, b: u8) {
        match (route(), &mut self.0) {
            (Route::Buffered, Some(kept)) if kept.len < kept.bytes.len() => {
                kept.bytes[kept.len] = b;
                kept.len += 1;
            }
            (Route::Buffered, Some(kept)) => kept.lost += 1,
            (Route::Buffered, None) => {
                LOST_NESTED.fetch_add(1, Ordering::Relaxed);
            }
            (route, _) => port_out(route, 0x3F8, b as u32, 1),
        }
    }
}

impl Write for Console<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.byte(b'\r');
            }
            self.byte(b);
        }
        Ok(())
    }
}

fn halt_forever(_code: u32) -> ! {
    loop {
        // SAFETY: halting is always allowed at CPL 0.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// How the guest stops once the verdict is out: `hlt` here; in a TD or an
/// SNP guest `hlt` itself traps, so the platform sets its own.
static STOP: spin::Mutex<fn(u32) -> !> = spin::Mutex::new(halt_forever);

/// How the guest stops, given the verdict it wrote.
#[cfg(not(feature = "emulator"))]
pub fn set_stop(stop: fn(u32) -> !) {
    *STOP.lock() = stop;
}

/// From now on, port writes take `route`; what was kept is written first.
/// Inside a console write on this CPU (a trap handler's), the route alone
/// changes: the write it interrupted goes on with it.
pub fn set_route(route: Route) {
    with_kept(|kept| {
        ROUTE.store(route.encode(), Ordering::Release);
        let (Some(kept), false) = (kept, matches!(route, Route::Buffered)) else {
            return;
        };
        for i in 0..kept.len {
            // The route of the moment: a #VE or #VC raised by this write
            // may have changed it.
            port_out(self::route(), 0x3F8, kept.bytes[i] as u32, 1);
        }
        kept.len = 0;
        let lost = core::mem::take(&mut kept.lost) + LOST_NESTED.swap(0, Ordering::Relaxed);
        if lost != 0 {
            let _ = writeln!(Console(Some(kept)), "({lost} bytes of early output lost)");
        }
    });
}

pub fn print(args: fmt::Arguments<'_>) {
    with_kept(|kept| {
        let _ = Console(kept).write_fmt(args);
    });
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::io::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The value the runner counts as a pass: QEMU exits with (v << 1) | 1 = 33.
pub const PASS: u32 = 0x10;
/// Anything else fails; this one is ours.
pub const FAIL: u32 = 0x11;
/// The image for real hosts found neither TDX nor SEV-SNP (QEMU exits
/// with 37): what it must do under plain OVMF.
#[cfg(not(feature = "emulator"))]
pub const NOT_CONFIDENTIAL: u32 = 0x12;

/// Writes the verdict to QEMU's isa-debug-exit port (which ends the run
/// where the device exists), then stops.
pub fn exit(code: u32) -> ! {
    if matches!(route(), Route::Buffered) {
        // The route never became known: the instruction is all there is
        // (in a TD or an SNP guest it traps, and the handlers carry it).
        set_route(Route::Instruction);
    }
    port_out(route(), 0xF4, code, 4);
    let stop = *STOP.lock();
    stop(code)
}
