//! An SEV-SNP guest kernel's boot path.

use core::ptr::NonNull;

use coco_convert::platform::snp::{GhcbSlot, PerCpuGhcbs, Snp};
use coco_convert::{setup_ghcb, Engine, PerCpuWindows, StateTable, Target, Visibility, WindowSlot};
use snp_ghcb::{Ghcb, GhcbMsrInstruction, PvalidateInstruction};

use crate::os::{config, cpu, BootFrames, DirectMapAccess, LocalShootdown, PHYS_OFFSET, STATES};
use crate::BootError;

const CPUS: usize = 1;

static TABLE_FRAMES: BootFrames = BootFrames::new(0x3000_0000, 0x3100_0000);
static GHCBS: [GhcbSlot; CPUS] = [const { GhcbSlot::new() }; CPUS];
/// Each CPU's private scratch window for PVALIDATE: a 2 MiB-aligned range
/// only that CPU maps (the entries above its PD entry built at boot) and a
/// zeroed page-table page.
static WINDOWS: [WindowSlot; CPUS] = [WindowSlot {
    va: 0xFFFF_C000_0000_0000,
    pt: 0x3100_0000,
}];
/// This CPU's GHCB page.
const GHCB_PA: u64 = 0x3110_0000;

/// Sets up this CPU's GHCB, shares a 16 MiB buffer with the host, then
/// takes it back.
pub fn boot(cr3: u64, cr4: u64) -> Result<(), BootError> {
    // SAFETY: this kernel runs in an SNP guest at CPL 0; the C-bit comes
    // from the GHCB MSR protocol, which changes no memory.
    let snp = unsafe {
        Snp::negotiate(
            GhcbMsrInstruction::new(),
            PvalidateInstruction::new(),
            PerCpuGhcbs::new(&GHCBS, cpu),
        )
    }?;
    // SAFETY: each CPU has its own window (see `WINDOWS`), conversions do
    // not migrate between CPUs, and the kernel runs at CPL 0.
    let windows = unsafe { PerCpuWindows::new(&WINDOWS, cpu) };
    let engine = Engine::new(
        config(cr3, cr4),
        DirectMapAccess,
        &TABLE_FRAMES,
        LocalShootdown,
        snp,
        StateTable::new(0, &STATES),
    )
    .with_window(&windows);
    // Once per CPU, before its first conversion: the GHCB page goes shared
    // through the MSR protocol, is registered and installed.
    let ghcb = NonNull::new((PHYS_OFFSET + GHCB_PA) as *mut Ghcb).expect("the direct map is not at 0");
    // SAFETY: the page at GHCB_PA is this CPU's GHCB alone, mapped by the
    // direct map for the kernel's lifetime.
    unsafe { setup_ghcb(&engine, GHCB_PA, ghcb) }?;
    engine.convert(
        Target::Virtual {
            va: PHYS_OFFSET + (64 << 20),
            len: 16 << 20,
        },
        Visibility::Shared,
    )?;
    engine.convert(
        Target::Physical {
            pa: 64 << 20,
            len: 16 << 20,
        },
        Visibility::Private,
    )?;
    Ok(())
}
