//! What must hold in every reachable state, what must hold where the run
//! ends, and what must be reachable at all (so the rest is not vacuous).

use stateright::{Model, Property};

use crate::engine::{Op, Outcome, Phase};
use crate::hw::{Attr, Mapping, PageUse, FRAMES};
use crate::reader::{Got, Reader};
use crate::{claimed, Byte, ConversionModel, State, Violation};

pub const NO_BAD_ACCESS: &str = "1. no access through a translation that disagrees with the host";
pub const NO_FREED_WALK: &str = "2. no walk through a freed or reused table page";
pub const POISON_STAYS_OUT: &str = "3. a poisoned frame is never present again";
pub const READER_SOUND: &str = "4. the reader gets the whole word or the zero-padded one";
pub const TERMINATES: &str = "5. where nothing can run, every thread finished and no claim is held";
pub const EVENTUALLY_DONE: &str = "5'. eventually every thread finished and no claim is held";
pub const NO_STALE_TRANSLATION: &str = "6. no usable translation disagrees with the host";
pub const BYTES_AGREE: &str = "7. a settled frame's state byte agrees with the host";
pub const SPLIT_RESERVED: &str = "8. every split has its table page reserved";

pub const FIXUP: &str = "the reader's load was zero-padded by the fix-up";
pub const WHOLE: &str = "the reader read the whole word";
pub const REUSED: &str = "a collapsed table page was freed after a shootdown and reused by a split";
pub const POISONED: &str = "a host failure poisoned a frame";
pub const BOTH_CONVERTED: &str = "every conversion of both threads succeeded";
pub const REFUSED: &str = "a conversion lost a claim and was refused";
pub const OUT_OF_TABLES: &str = "a conversion ran out of table pages and changed nothing";

/// The invariants, in the order the README lists them.
pub const ALWAYS: [&str; 8] = [
    NO_BAD_ACCESS,
    NO_FREED_WALK,
    POISON_STAYS_OUT,
    READER_SOUND,
    TERMINATES,
    NO_STALE_TRANSLATION,
    BYTES_AGREE,
    SPLIT_RESERVED,
];

pub fn properties() -> Vec<Property<ConversionModel>> {
    vec![
        Property::always(NO_BAD_ACCESS, |_, s: &State| {
            s.violations & (Violation::ACCESS | Violation::PVALIDATE_PUBLIC) == 0
        }),
        Property::always(NO_FREED_WALK, |_, s: &State| s.violations & Violation::WALK_FREED == 0),
        Property::always(POISON_STAYS_OUT, |_, s: &State| poison_stays_out(s)),
        Property::always(READER_SOUND, |_, s: &State| s.reader != Reader::Done(Got::Wrong)),
        Property::always(TERMINATES, |m: &ConversionModel, s: &State| {
            let mut actions = Vec::new();
            m.actions(s, &mut actions);
            !actions.is_empty() || all_done(s)
        }),
        Property::eventually(EVENTUALLY_DONE, |_, s: &State| all_done(s)),
        Property::always(NO_STALE_TRANSLATION, |_, s: &State| no_stale_translation(s)),
        Property::always(BYTES_AGREE, |_, s: &State| {
            (0..FRAMES).all(|f| match s.bytes[f] {
                Byte::Private => s.hw.host[f].usable() == Some(Attr::Private),
                Byte::Shared => s.hw.host[f].usable() == Some(Attr::Shared),
                _ => true,
            })
        }),
        Property::always(SPLIT_RESERVED, |_, s: &State| {
            s.violations & Violation::SPLIT_UNRESERVED == 0
        }),
        Property::sometimes(FIXUP, |_, s: &State| s.reader == Reader::Done(Got::ZeroPadded)),
        Property::sometimes(WHOLE, |_, s: &State| s.reader == Reader::Done(Got::Whole)),
        Property::sometimes(REUSED, |_, s: &State| {
            s.hw.pages.iter().any(|p| p.generation > 0 && p.usage == PageUse::Table)
        }),
        Property::sometimes(POISONED, |_, s: &State| s.bytes.contains(&Byte::Poisoned)),
        Property::sometimes(BOTH_CONVERTED, |m: &ConversionModel, s: &State| {
            s.convs.iter().enumerate().all(|(k, c)| {
                c.phase == Phase::Finished
                    && c.outcomes
                        .iter()
                        .zip(&m.cfg.programs[k])
                        .all(|(o, op)| matches!(op, Op::ReleaseDeferred) || *o == Outcome::Converted)
            })
        }),
        Property::sometimes(REFUSED, |_, s: &State| any_outcome(s, Outcome::Refused)),
        Property::sometimes(OUT_OF_TABLES, |_, s: &State| any_outcome(s, Outcome::OutOfTableMemory)),
    ]
}

fn any_outcome(s: &State, o: Outcome) -> bool {
    s.convs.iter().any(|c| c.outcomes.contains(&o))
}

fn all_done(s: &State) -> bool {
    s.convs.iter().all(|c| c.phase == Phase::Finished) && claimed(s) == 0 && s.lock.is_none()
}

fn poison_stays_out(s: &State) -> bool {
    s.violations & Violation::POISON_FILL == 0
        && (0..FRAMES)
            .filter(|&f| s.bytes[f] == Byte::Poisoned)
            .all(|f| !s.hw.direct_pte(f).present && !s.hw.alias[f].present)
}

/// Every translation some CPU could use right now without the engine
/// doing anything more (its TLB entries, the entries its cached PDE leads
/// to, the live present entries) agrees with the host: the guest never
/// even speculatively touches a frame the wrong way.
fn no_stale_translation(s: &State) -> bool {
    let agrees = |f: usize, attr: Attr| crate::access_ok(s, f, attr);
    let live = (0..FRAMES).all(|f| {
        let d = s.hw.direct_pte(f);
        let a = s.hw.alias[f];
        (!d.present || agrees(f, d.attr)) && (!a.present || agrees(f, a.attr))
    });
    live && s.hw.tlbs.iter().enumerate().all(|(cpu, t)| {
        let cached_walk = t.pde.is_none_or(|_| {
            (0..FRAMES).all(|f| {
                s.hw.translations(cpu, Mapping::Direct, f)
                    .iter()
                    .all(|(_, seen, _)| match seen {
                        crate::hw::Seen::Data(attr) => agrees(f, *attr),
                        _ => true,
                    })
            })
        });
        cached_walk
            && t.huge.is_none_or(|attr| (0..FRAMES).all(|f| agrees(f, attr)))
            && (0..FRAMES).all(|f| t.direct[f].is_none_or(|a| agrees(f, a)) && t.alias[f].is_none_or(|a| agrees(f, a)))
    })
}
