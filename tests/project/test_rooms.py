"""The tests are grouped by the room they guard: every test file sits in a room folder that is a package and has a
row in tests/README.md, every source path that table names exists, and every path a test computes from its own
location (``Path(__file__).parents[N] / ...``) exists (a file moved between levels, or merged from before the move,
would otherwise look in the wrong folder)."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _table() -> dict[str, str]:
    """tests/README.md's table: folder name -> the cell that says what it guards."""
    rows = re.findall(r"^\| `tests/(\w+)/` \| (.+) \|$", (TESTS / "README.md").read_text(), flags=re.M)
    return dict(rows)


def test_every_test_file_sits_in_a_room_folder_that_is_a_package():
    files = sorted(TESTS.rglob("test_*.py"))
    assert len(files) > 50
    assert [f.name for f in files if f.parent == TESTS] == [], "a test file at the top of tests/: move it to its room"
    for f in files:
        for folder in f.relative_to(TESTS).parents:
            assert (TESTS / folder / "__init__.py").is_file(), f"tests/{folder} has no __init__.py (needed by {f.name})"


def test_the_readme_table_lists_exactly_the_room_folders():
    rooms = {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert set(_table()) == rooms


def test_the_paths_the_table_names_exist():
    paths = [p for cell in _table().values() for p in re.findall(r"`([\w./-]+)`", cell) if "/" in p or "." in p]
    src = ROOT / "src" / "cratevit"
    # a bare module name after a src/cratevit/ path (`presets.py`) is a sibling in src/cratevit/
    missing = [p for p in paths if not (ROOT / p).exists() and not (src / p).exists()]
    assert len(paths) >= 15 and missing == []


def test_paths_a_test_computes_from_its_own_location_exist():
    """``Path(__file__).parents[N] / "src"`` and the like (N counts from the test's folder: 2 is the repository)."""
    pattern = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d)\]((?:\s*/\s*\"[^\"]+\")*)")
    found, missing = 0, []
    for file in sorted(TESTS.rglob("*.py")):
        for level, parts in pattern.findall(file.read_text()):
            path = file.resolve().parents[int(level)].joinpath(*re.findall(r"\"([^\"]+)\"", parts))
            found += 1
            if not path.exists() or path == Path("/") or not path.is_relative_to(ROOT):
                missing.append(f"{file.relative_to(ROOT)}: parents[{level}]{parts} -> {path}")
    assert found >= 10 and missing == []
