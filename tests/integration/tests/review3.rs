//! Tests from a third hostile review (alias removal, the pool without its
//! lock across conversions, the schedule explorer, the model). Each one
//! fails against the commit reviewed and names what it shows.

#![allow(clippy::too_many_lines)]

use coco_convert::{Alias, Level, Target, Visibility};
use hvmock::TdxConfig;
use integration::sim::ALIAS_VA;
use integration::world::{Shape, TdxWorld, DIRECT_MAP_FLAGS};
use integration::{GIB, MIB};

const PAGE: u64 = 4096;

fn tdx(shape: Shape) -> TdxWorld {
    TdxWorld::new(TdxConfig::default(), shape)
}

/// Whether `va` translates to `pa` through a present leaf.
fn maps(w: &TdxWorld, va: u64, pa: u64) -> bool {
    w.m.page_tables().translate(&w.m.mem, va).is_some_and(|t| t.pa == pa)
}

// ---------------------------------------------------------------------
// Contract, "What the engine may change": "It makes not present only
// present leaves of the ranges it converts" and `unregister_alias` "leaves
// no entry of it present" -- of *it*, the alias `[va, va + len)`.
//
// What happens: `unmap_retiring` (engine/retire.rs) walks the alias with
// `for_each_entry` and clears P on every present leaf it meets, without
// splitting first. A huge leaf of the OS that maps the alias and more (an
// alias that is a part of a 2 MiB or 1 GiB leaf: a kernel image mapped
// with large pages but registered for its own extent) is made not present
// WHOLE: the OS's mapping outside the alias disappears. A conversion splits
// such a leaf at the alias's edge; the removal does not.
#[test]
fn unregistering_an_alias_inside_a_huge_leaf_unmaps_the_os_mapping_around_it() {
    let mut failures = Vec::new();
    // (leaf size, frame of the leaf, alias offset and length in it)
    let cases = [
        (Level::Pd, GIB + 8 * MIB, MIB / 2, MIB / 2),
        (Level::Pdpt, 0, 4 * MIB, 2 * MIB),
    ];
    for (level, pa, offset, len) in cases {
        let w = tdx(Shape::Mixed);
        let e = w.engine();
        let m = &w.m;
        m.builder()
            .map(ALIAS_VA, pa, level.span(), level, DIRECT_MAP_FLAGS, Visibility::Private);
        let id = e
            .register_alias(Alias {
                va: ALIAS_VA + offset,
                pa: pa + offset,
                len,
            })
            .unwrap();
        e.unregister_alias(id).unwrap();
        // Outside the alias, before and after it: the OS's, untouched.
        for off in [0, offset - PAGE, offset + len, level.span() - PAGE] {
            if !maps(&w, ALIAS_VA + off, pa + off) {
                failures.push(format!(
                    "{level:?} leaf, alias [+{offset:#x}, +{:#x}): {:#x} (outside the alias) no longer mapped",
                    offset + len,
                    ALIAS_VA + off
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------
// Contract, "Locks" / "Register an alias before mapping it; free its
// tables after unregistering": "`unregister_alias` ... leaves no entry of
// it present and none of the engine's tables in it, so the OS frees only
// its own tables of the range"; `Engine::unregister_alias`: "When this
// returns the alias ... holds none of the engine's tables".
//
// What happens: `detach_pass` (engine/retire.rs) unlinks only tables whose
// 2 MiB / 1 GiB region lies WHOLLY inside the alias. A conversion that
// splits an OS huge leaf at the alias's edge (the alias a part of a 2 MiB
// leaf, or 2 MiB-aligned inside a 1 GiB leaf) leaves an engine table in a
// region the alias covers only in part; after the removal it is still
// linked into the OS's tables, mapping the (now not present) alias: the
// OS, which "frees only its own tables", finds a table it does not own
// (its allocator never handed it out) in the range it reuses, and the
// engine never gets it back (no later conversion knows the alias to
// collapse it).
#[test]
#[ignore = "known limitation: a table the engine split where an alias's end cuts a huge leaf also maps the OS's memory beyond the alias, so unregister_alias cannot unlink it (docs/contract.md)"]
fn unregister_leaves_the_engines_split_table_where_the_alias_covers_a_region_in_part() {
    let mut failures = Vec::new();
    let cases = [
        (Level::Pd, GIB + 8 * MIB, MIB / 2, MIB / 2),
        (Level::Pdpt, 0, 4 * MIB, 2 * MIB),
    ];
    for (level, pa, offset, len) in cases {
        let w = tdx(Shape::Mixed);
        let e = w.engine();
        let m = &w.m;
        m.builder()
            .map(ALIAS_VA, pa, level.span(), level, DIRECT_MAP_FLAGS, Visibility::Private);
        let id = e
            .register_alias(Alias {
                va: ALIAS_VA + offset,
                pa: pa + offset,
                len,
            })
            .unwrap();
        // A frame of the alias to shared: the alias's leaf is split at the
        // frame, in tables from the engine's frame source.
        e.convert(
            Target::Physical {
                pa: pa + offset + 16 * PAGE,
                len: PAGE,
            },
            Visibility::Shared,
        )
        .unwrap();
        e.unregister_alias(id).unwrap();
        e.release_deferred_tables();
        let engines = m.frames.in_use_set();
        let left: Vec<(u64, (u64, u64))> = m
            .tables_with_regions()
            .into_iter()
            .filter(|(t, (region, span))| {
                engines.contains(t) && *region < ALIAS_VA + offset + len && ALIAS_VA + offset < region + span
            })
            .collect();
        if !left.is_empty() {
            failures.push(format!(
                "{level:?} leaf, alias [+{offset:#x}, +{:#x}): engine tables still linked over the removed \
                 alias (table, (region, span)): {left:x?}",
                offset + len
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------
// docs/checking.md, "Planted bugs": "`scripts/schedule-mutants` plants each
// bug, runs the scenario that should catch it ..."; its table lists
// `unregister_alias` without making the alias not present and without
// unlinking the engine's tables as caught by the alias scenario.
//
// What happens: the script looks for
// `.unregister(id, |alias| self.unmap_retiring(alias), |alias| self.detach_tables(alias))`
// on one line of convert/src/engine/mod.rs, but the call is formatted over
// five lines there: the script's own `assert current.count(old) == 1`
// raises, `scripts/schedule-mutants` dies with a traceback at the fourth
// mutant, and the two alias-removal mutants (and every mutant after them)
// are never planted nor run. (Planted by hand they are caught; the
// tooling that is documented to show it cannot.)
#[test]
fn schedule_mutants_can_plant_every_mutant_it_lists() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    // Every other `scripts/*-mutants` too: the same kind of table, the
    // same risk.
    // Each script's MUTANTS table, evaluated as the script does, and for
    // each edit the number of times its old text occurs in its file.
    let probe = r#"
import pathlib, re, sys
root = pathlib.Path(sys.argv[1])
scripts = sorted(p.name for p in (root / "scripts").glob("*-mutants"))
assert len(scripts) >= 7, scripts
for script in ["scripts/" + s for s in scripts]:
    # The table, without what runs it.
    src = re.split(r"\n(?:def run\(|def main\(|wanted = )", (root / script).read_text())[0]
    ns = {"__file__": str(root / script)}
    exec(src, ns)
    for name, *_, edits in ns["MUTANTS"]:
        for path, old, new in edits:
            print(f"{script}\t{name}\t{path}\t{(root / path).read_text().count(old)}")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", probe, root])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().count() >= 16, "{text}");
    let unplantable: Vec<&str> = text.lines().filter(|l| !l.ends_with("\t1")).collect();
    assert!(
        unplantable.is_empty(),
        "mutants whose code is not in the file exactly once (script, name, file, occurrences): {unplantable:#?}"
    );
}
