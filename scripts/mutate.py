"""Planting one bug and checking that a test catches it: shared by the
scripts/*-mutants scripts."""
import pathlib, subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test(package, target, name):
    """A cargo test of one test by its exact name."""
    return ["cargo", "test", "-q", "-p", package, *target, "--", "--exact", name]


def plant(name, command, edits, keep=()):
    """Applies `edits` ([(file, old, new)], each old text present exactly
    once), runs `command` from the repository, restores every file (and
    the files in `keep`, which a failing run may write to), and reports.
    True if the command failed as it should."""
    originals = {ROOT / path: (ROOT / path).read_text() for path in keep}
    # Each edit applies to the file as the edits before it left it: two
    # edits of one file must both land, not the last one alone.
    mutated = {}
    try:
        for path, old, new in edits:
            file = ROOT / path
            current = mutated.get(file, originals.setdefault(file, file.read_text()))
            assert current.count(old) == 1, f"{name}: the code to mutate is not in {path} exactly once"
            mutated[file] = current.replace(old, new)
            file.write_text(mutated[file])
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    finally:
        for file, text in originals.items():
            file.write_text(text)
    text = out.stdout + out.stderr
    what = command[-1]
    if "error[" in text or "could not compile" in text:
        print(f"BROKEN {name}: the mutant does not compile\n{text[-2000:]}")
        return False
    if out.returncode == 0:
        print(f"SURVIVED {name}: {what} passed")
        return False
    lines = text.splitlines()
    at = next((i for i, l in enumerate(lines) if "panicked at" in l), None)
    if at is None:
        at = next((i for i, l in enumerate(lines) if "FAIL" in l), None)
    print(f"CAUGHT {name} by {what}:")
    for l in (lines[at:at + 3] if at is not None else []):
        print("    " + l[:300])
    return True
