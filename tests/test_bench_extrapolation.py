"""`skutag bench backfill` extrapolates to 10M only from two or more different sizes."""

from __future__ import annotations

import pytest

from pipeline.bench.backfill import extrapolate


def row(items: int, seconds: float) -> dict[str, float]:
    return {"items": items, "planning_s": seconds, "peak_rss_mb": 100 + items / 10_000, "enqueue_s": seconds / 2}


@pytest.mark.parametrize("rows", [[row(1_000_000, 10.0)], [row(1_000_000, 10.0), row(1_000_000, 12.0)]])
def test_one_size_is_not_extrapolated(rows: list[dict[str, float]]) -> None:
    assert extrapolate(rows, 10_000_000) is None


def test_two_sizes_give_the_line_through_them() -> None:
    line = extrapolate([row(100_000, 1.0), row(1_000_000, 10.0)], 10_000_000)
    assert line is not None
    assert line["planning_s"] == pytest.approx(100.0)
    assert line["peak_rss_mb"] == pytest.approx(1100.0)
