"""The documentation stays what it promises: a short README in front, a reference that matches the code.

The README is the front door (what it is, how to run it, where the reference is); the reference
lives in docs/ and is built by `make docs` (`mkdocs build --strict`, which fails on a broken link).
Without a bound the README grows back into the reference, one section at a time. Without the
configuration check, a setting added to ``Settings`` is invisible to operators, and a default
changed in code leaves the table quietly wrong.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields

from bridge.config import Settings
from tests.support.processes import ROOT

README_MAX_LINES = 220
CONFIGURATION = ROOT / "docs" / "configuration.md"
_VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]*(?:\*)?)`")


def test_readme_stays_a_front_door_of_at_most_220_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def settings_table() -> dict[str, str]:
    """``VARIABLE -> default cell`` of the configuration page's settings table (one variable a row)."""
    rows: dict[str, str] = {}
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        names = _VARIABLE.findall(cells[0])
        assert len(names) == 1, f"one variable per row, so the table can be generated: {line!r}"
        assert names[0] not in rows, f"{names[0]} has two rows"
        rows[names[0]] = cells[1]
    return rows


def documented_default(cell: str) -> object:
    """The value a default cell states: a literal in backticks, or none for unset/empty/generated."""
    literal = re.fullmatch(r"`([^`]*)`", cell)
    if literal is None:
        return None
    text = literal.group(1)
    if text in {"true", "false"}:
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def code_default(value: object) -> object:
    """A ``Settings`` default as the table shows it: numbers as numbers, empty as none."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value or None


def test_configuration_page_lists_every_setting_with_its_default() -> None:
    table = settings_table()
    settings = {f.name.upper(): f.default for f in fields(Settings) if f.name != "otel"}
    undocumented = sorted(set(settings) - set(table))
    unknown = sorted(set(table) - set(settings) - {"OTEL_*"})
    assert not undocumented, f"add to docs/configuration.md: {undocumented}"
    assert not unknown, f"docs/configuration.md names variables Settings does not have: {unknown}"
    assert "OTEL_*" in table
    for name, default in settings.items():
        if default is MISSING:
            continue
        assert documented_default(table[name]) == code_default(default), (
            f"{name}: docs/configuration.md says {table[name]}, Settings says {default!r}"
        )
