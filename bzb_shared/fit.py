"""The least-squares slope every memory measurement here reports (RSS per stream, per cancel, per minute).

One definition for the soak (bench/) and the memory tests' helpers (tests/support/), which must not
import each other: separate copies drift apart, e.g. on what they do with fewer than two points.
"""

from __future__ import annotations

from collections.abc import Sequence


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of the least-squares line through ``(xs, ys)``; 0 with fewer than two distinct xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
