//! Serial output (COM1) and the verdict.
//!
//! How a port write reaches the device depends on where the guest runs: in
//! the emulated mode, and on a machine that is neither a TD nor an SNP
//! guest, the `out` instruction; in a TD, TDVMCALL\<Instruction.IO\>; in
//! an SNP guest, the GHCB's IOIO event, once a GHCB exists. Until the
//! route is known (the image for real hosts starts so), output is kept in
//! a buffer and written out when it is.

use core::fmt::{self, Write};

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

struct Console {
    route: Route,
    kept: [u8; 16 * 1024],
    len: usize,
    /// Bytes that did not fit while buffering.
    lost: usize,
}

static CONSOLE: spin::Mutex<Console> = spin::Mutex::new(Console {
    route: if cfg!(feature = "emulator") {
        Route::Instruction
    } else {
        Route::Buffered
    },
    kept: [0; 16 * 1024],
    len: 0,
    lost: 0,
});

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

impl Write for Console {
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

impl Console {
    fn byte(&mut self, b: u8) {
        match self.route {
            Route::Buffered if self.len < self.kept.len() => {
                self.kept[self.len] = b;
                self.len += 1;
            }
            Route::Buffered => self.lost += 1,
            route => port_out(route, 0x3F8, b as u32, 1),
        }
    }
}

/// The route port writes take now.
pub fn route() -> Route {
    CONSOLE.lock().route
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
pub fn set_route(route: Route) {
    let mut console = CONSOLE.lock();
    console.route = route;
    if matches!(route, Route::Buffered) {
        return;
    }
    for i in 0..console.len {
        port_out(route, 0x3F8, console.kept[i] as u32, 1);
    }
    console.len = 0;
    if console.lost != 0 {
        let lost = core::mem::take(&mut console.lost);
        let _ = writeln!(console, "({lost} bytes of early output lost)");
    }
}

pub fn print(args: fmt::Arguments<'_>) {
    let _ = CONSOLE.lock().write_fmt(args);
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
/// where the device exists), then halts.
pub fn exit(code: u32) -> ! {
    let route = {
        let mut console = CONSOLE.lock();
        if matches!(console.route, Route::Buffered) {
            // The route never became known: the instruction is all there is.
            drop(console);
            set_route(Route::Instruction);
            console = CONSOLE.lock();
        }
        console.route
    };
    port_out(route, 0xF4, code, 4);
    let stop = *STOP.lock();
    stop(code)
}
