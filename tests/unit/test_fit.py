"""The one least-squares slope behind every memory figure (bzb_shared/fit.py)."""

from __future__ import annotations

import pytest

from bzb_shared.fit import least_squares_slope


def test_slope_of_a_line_with_noise_around_it() -> None:
    xs = [float(x) for x in range(10)]
    ys = [3.0 * x + 7.0 + (0.5 if x % 2 else -0.5) for x in xs]
    assert least_squares_slope(xs, ys) == pytest.approx(3.0, abs=0.2)


@pytest.mark.parametrize(("xs", "ys"), [([], []), ([1.0], [5.0]), ([2.0, 2.0, 2.0], [1.0, 9.0, 4.0])])
def test_slope_is_zero_without_two_distinct_points(xs: list[float], ys: list[float]) -> None:
    assert least_squares_slope(xs, ys) == 0.0
