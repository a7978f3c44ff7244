//! The real path's scenario-8 probes, checked in the emulated image against
//! the models: on a page held by a 4 KiB entry and on one inside a 2 MiB
//! entry, usable or not, with what each question leaves behind.

use crate::scenarios::{check, SPAN};
use crate::{fail, println};

const PAGE: u64 = 4096;
const BLOCK: u64 = 2 << 20;

/// One platform's probe, and the model's hold on its pages.
pub struct Probe<'a> {
    pub name: &'static str,
    /// The probe under test.
    pub ask: &'a dyn Fn(u64) -> bool,
    /// The model's word: private and accepted (TDX) or validated (SNP).
    pub usable: &'a dyn Fn(u64) -> bool,
    /// Makes `[pa, pa + len)` usable or not, held by 2 MiB entries when
    /// `large`, else by 4 KiB ones.
    pub set: &'a dyn Fn(u64, u64, bool, bool),
    /// A TD's question accepts the one page it asks about; an SNP guest's
    /// takes its validation back.
    pub leaves_the_page_usable: bool,
    /// Accepts or validates through the platform a block the model holds
    /// unusable in 4 KiB entries.
    pub restore: &'a dyn Fn(u64),
    /// Makes the host split a 2 MiB entry when asked at 2 MiB (`true`), or
    /// not, where the platform lets it (SEV-SNP's PSMASH).
    pub host_splits_2m: Option<&'a dyn Fn(bool)>,
}

/// Asks about the second page of a free 2 MiB block (so a 2 MiB question
/// must align its address) in each state, then restores the block.
/// `mapped`: the direct map maps the page private.
pub fn check_probe(p: &Probe<'_>, mapped: &dyn Fn(u64) -> bool) {
    let Some(block) = (SPAN.0..SPAN.1).step_by(BLOCK as usize).find(|&b| {
        (b..b + BLOCK)
            .step_by(PAGE as usize)
            .all(|pa| (p.usable)(pa) && mapped(pa))
    }) else {
        fail("probes: no usable 2 MiB block to ask about")
    };
    let page = block + PAGE;
    let neighbours_usable = || {
        (block..block + BLOCK)
            .step_by(PAGE as usize)
            .filter(|&pa| pa != page && (p.usable)(pa))
            .count()
    };
    for large in [false, true] {
        (p.set)(block, BLOCK, large, true);
        check((p.ask)(page), "probes: a usable page was said not to be");
        check(
            (p.usable)(page) && neighbours_usable() == 511,
            "probes: asking about a usable page changed the block",
        );
        if let (true, Some(host_splits)) = (large, p.host_splits_2m) {
            host_splits(true);
            let answer = (p.ask)(page);
            host_splits(false);
            check(
                answer && (p.usable)(page) && neighbours_usable() == 511,
                "probes: a usable page in a 2 MiB entry the host splits on the question was said not to be",
            );
        }
        if large {
            (p.set)(block, BLOCK, true, false);
        } else {
            (p.set)(page, PAGE, false, false);
        }
        check(
            !(p.ask)(page),
            "probes: a page the platform does not hold usable was said to be",
        );
        check(
            (p.usable)(page) == p.leaves_the_page_usable,
            "probes: the question left the page in another state than it says",
        );
        let expected = if large { 0 } else { 511 };
        check(
            neighbours_usable() == expected,
            "probes: asking about one page changed its neighbours",
        );
        (p.set)(block, BLOCK, false, false);
        (p.restore)(block);
        check(
            (block..block + BLOCK).step_by(PAGE as usize).all(p.usable),
            "probes: the block was not restored",
        );
    }
    println!(
        "  probes for a real host's scenario 8 ({}): 4 KiB and 2 MiB entries, usable or not; one question changes at most its own page",
        p.name
    );
}
