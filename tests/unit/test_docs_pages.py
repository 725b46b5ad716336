"""The documentation stays what it promises: a short README in front, a reference that matches the code.

The README is the front door (what it is, how to run it, where the reference is); the reference
lives in docs/ and is built by `make docs` (`mkdocs build --strict`, which fails on a broken link).
Without a bound the README grows back into the reference, one section at a time. Without the
configuration check, a setting added to ``Settings`` is invisible to operators, and a default
changed in code leaves the table quietly wrong.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import ROOT

README_MAX_LINES = 220


def test_readme_stays_a_front_door_of_at_most_220_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_configuration_table_is_the_one_generated_from_the_settings() -> None:
    """Every setting's row comes from its one declaration; `make docs` rewrites the table after a change."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_settings_table.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
