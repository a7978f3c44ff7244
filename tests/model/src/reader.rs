//! `load_unaligned_zeropad` on its own CPU: an 8-byte load that starts in
//! a frame no conversion touches and runs into the next one, which
//! converts. The two halves translate separately (an instruction's two page
//! translations are not atomic with respect to other CPUs), each through
//! the TLB or a walk that fills it.

use crate::hw::{How, Mapping, Seen};
use crate::{Config, State, Violation};

/// What the load returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Got {
    /// Both halves read through translations that agree with the host.
    Whole,
    /// The second half faulted and the fix-up returned the first half
    /// zero-padded.
    ZeroPadded,
    /// Anything else: a half read through a translation that disagrees
    /// with the host (ciphertext, #VE, #VC), a frame in transition, a walk
    /// through a freed table, or a fault the fix-up declines (in the first
    /// half).
    Wrong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reader {
    Idle,
    /// The first half read through `via`.
    FirstDone {
        via: Mapping,
    },
    Done(Got),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    First,
    Second,
}

/// The reads the reader may do now: (half, mapping, how).
pub fn reads(cfg: &Config, s: &State, out: &mut Vec<(Half, Mapping, How)>) {
    let cpu = cfg.reader_cpu();
    match s.reader {
        Reader::Idle => {
            for via in [Mapping::Direct, Mapping::Alias] {
                for (how, _, _) in s.hw.translations(cpu, via, cfg.reader_frame) {
                    out.push((Half::First, via, how));
                }
            }
        }
        Reader::FirstDone { via } => {
            for (how, _, _) in s.hw.translations(cpu, via, cfg.reader_frame + 1) {
                out.push((Half::Second, via, how));
            }
        }
        Reader::Done(_) => {}
    }
}

pub fn read(cfg: &Config, s: &mut State, half: Half, via: Mapping, how: How) {
    let cpu = cfg.reader_cpu();
    let frame = match half {
        Half::First => cfg.reader_frame,
        Half::Second => cfg.reader_frame + 1,
    };
    let (_, seen, tlb) =
        s.hw.translations(cpu, via, frame)
            .into_iter()
            .find(|(h, _, _)| *h == how)
            .expect("an enabled read");
    crate::fill(s, cpu, tlb);
    s.reader = match (half, seen) {
        (_, Seen::FreedTable) => {
            s.violations |= Violation::WALK_FREED;
            Reader::Done(Got::Wrong)
        }
        (_, Seen::Data(attr)) if !crate::access_ok(s, frame, attr) => {
            s.violations |= Violation::ACCESS;
            Reader::Done(Got::Wrong)
        }
        (Half::First, Seen::Data(_)) => Reader::FirstDone { via },
        // The fix-up declines a fault that is not at the next word.
        (Half::First, Seen::Fault) => Reader::Done(Got::Wrong),
        (Half::Second, Seen::Data(_)) => Reader::Done(Got::Whole),
        (Half::Second, Seen::Fault) => Reader::Done(Got::ZeroPadded),
    };
}
