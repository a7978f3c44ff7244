//! A TDX guest kernel's boot path.

use coco_convert::platform::tdx::Tdx;
use coco_convert::{Engine, StateTable, Target, Visibility};
use tdcall::TdcallInstruction;

use crate::os::{config, BootFrames, DirectMapAccess, LocalShootdown, PHYS_OFFSET, STATES};
use crate::BootError;

static TABLE_FRAMES: BootFrames = BootFrames::new(0x3000_0000, 0x3100_0000);

/// Shares a 16 MiB buffer with the host, then takes it back.
pub fn boot(cr3: u64, cr4: u64) -> Result<(), BootError> {
    // SAFETY: this kernel runs in a TD at CPL 0.
    let tdx = Tdx::from_vp_info(unsafe { TdcallInstruction::new() })?;
    let engine = Engine::new(
        config(cr3, cr4),
        DirectMapAccess,
        &TABLE_FRAMES,
        LocalShootdown,
        tdx,
        StateTable::new(0, &STATES),
    );
    // A direct-map or vmalloc-style range: every alias converts with it.
    let buffer = Target::Virtual {
        va: PHYS_OFFSET + (64 << 20),
        len: 16 << 20,
    };
    engine.convert(buffer, Visibility::Shared)?;
    engine.convert(
        Target::Physical {
            pa: 64 << 20,
            len: 16 << 20,
        },
        Visibility::Private,
    )?;
    Ok(())
}
