"""docs/training.md's fault table: every row names the tests that prove it, and each
named test exists (a renamed or deleted test shows up here, not as a false claim)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "training.md"
NAMED = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`(?:\s*\(([^)]*)\))?")


def _rows() -> list[list[str]]:
    section = PAGE.read_text(encoding="utf-8").split("\n## Faults\n", 1)[1]
    start = section.index("\n| role | fault |") + 1
    lines = section[start:].split("\n\n", 1)[0].splitlines()  # the section's first table
    assert lines[0].startswith("| role | fault |"), lines[0]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def test_every_fault_row_names_tests_that_exist():
    rows = _rows()
    assert len(rows) >= 25
    for role, fault, _, proof in rows:
        row = f"{role} / {fault}"
        assert "not yet tested" not in proof and "untested" not in proof, row
        named = NAMED.findall(proof)
        assert named, f"{row}: names no test"
        for path, name, events in named:
            source = (ROOT / path).read_text(encoding="utf-8")
            if name:
                assert re.search(rf"^def {name}\(", source, re.M), f"{row}: {path}::{name}"
            for event in re.findall(r"`([\w-]+)` events?", events):
                assert f'"{event}"' in source, f"{row}: event {event} in {path}"
