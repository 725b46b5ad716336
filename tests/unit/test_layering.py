"""The parts of the repository that must stand alone do not import each other (in-process, fast).

The stub is the fake upstream the bridge is tested against: had it imported the bridge's
telemetry, a bug there would show up on both sides of the wire and cancel out. The benchmarks
measure the bridge from outside and must not lean on test helpers; shared code lives in
``bzb_shared``, which imports none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level packages it must never import
FORBIDDEN = {
    "bridge": {"rag_stub", "tests", "bench"},
    "rag_stub": {"bridge", "tests", "bench"},
    "bench": {"tests", "rag_stub"},
    "bzb_shared": {"bridge", "rag_stub", "tests", "bench"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_what_it_must_stand_apart_from(package: str) -> None:
    offenders = {
        f"{path.relative_to(ROOT)} imports {sorted(imported_roots(path) & FORBIDDEN[package])}"
        for path in (ROOT / package).rglob("*.py")
        if imported_roots(path) & FORBIDDEN[package]
    }
    assert not offenders


def test_nothing_reads_a_private_attribute_of_the_child_process_runner() -> None:
    """``_cond`` is the runner's lock; bench reads output through ``lines_from`` instead."""
    for path in (ROOT / "bench").rglob("*.py"):
        assert "._cond" not in path.read_text(encoding="utf-8"), path
