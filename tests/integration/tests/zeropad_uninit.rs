//! Before `init`, the fix-up declines every fault rather than let the
//! decoder build its tables (a heap allocation) in a fault handler.

use coco_convert::zeropad::{self, FaultFrame, FaultKind, NotHandled};

#[test]
fn before_init_nothing_is_handled_and_nothing_changes() {
    assert!(!zeropad::is_initialised());
    let mut frame = FaultFrame {
        gprs: [0x6FFD; 16],
        rip: 0x1234,
    };
    let before = frame;
    let r = zeropad::fixup_with(&mut frame, &[0x48, 0x8B, 0x01], 0x7000, |_| {
        panic!("no read before init")
    });
    assert_eq!(r, Err(NotHandled::NotInitialised));
    assert_eq!(
        zeropad::handle_fault(&mut frame, 0x7000, FaultKind::PageFault),
        Err(NotHandled::NotInitialised)
    );
    assert_eq!(frame, before);
    zeropad::init();
    assert_eq!(
        zeropad::fixup_with(&mut frame, &[0x48, 0x8B, 0x01], 0x7000, |_| 0),
        Ok(())
    );
}
