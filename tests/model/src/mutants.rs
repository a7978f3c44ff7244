//! Deliberate bugs, one at a time, to show the checker catches each: every
//! one must yield a counterexample.

/// A change to the engine's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutant {
    /// (a) The frames' entries stay present: the not-present steps change
    /// nothing (the shootdown still runs).
    SkipNotPresent,
    /// (b) The shootdown (and the deferred frees after it) run after the
    /// host calls instead of before.
    ShootdownAfterHost,
    /// (c) A collapsed table page goes straight back to the frame source,
    /// not to the deferred list.
    FreeBeforeShootdown,
    /// (d) The entries are made present with the new attribute before the
    /// host calls.
    PresentBeforeHost,
    /// (e) SNP: PVALIDATE through a public (shared) mapping of the frame
    /// instead of the private scratch window.
    PvalidatePublic,
    /// (f) TDX to private: TDG.MEM.PAGE.ACCEPT before MapGPA.
    AcceptBeforeMapGpa,
    /// (g) The split also makes the converting frames not present, and the
    /// direct map's range is left out of the shootdown, on the reasoning
    /// that no CPU can cache an entry of a table just made: the huge
    /// translation the split replaced stays cached.
    NoFlushAfterSplit,
}

impl Mutant {
    pub const ALL: [Mutant; 7] = [
        Mutant::SkipNotPresent,
        Mutant::ShootdownAfterHost,
        Mutant::FreeBeforeShootdown,
        Mutant::PresentBeforeHost,
        Mutant::PvalidatePublic,
        Mutant::AcceptBeforeMapGpa,
        Mutant::NoFlushAfterSplit,
    ];

    /// The brief's letter for the mutant.
    pub fn letter(self) -> char {
        match self {
            Mutant::SkipNotPresent => 'a',
            Mutant::ShootdownAfterHost => 'b',
            Mutant::FreeBeforeShootdown => 'c',
            Mutant::PresentBeforeHost => 'd',
            Mutant::PvalidatePublic => 'e',
            Mutant::AcceptBeforeMapGpa => 'f',
            Mutant::NoFlushAfterSplit => 'g',
        }
    }
}
