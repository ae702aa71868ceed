"""`skutag bench review` runs end to end at a tiny size (the figures themselves are in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from pipeline.bench import review
from tests.conftest import POSTGRES_URL


@pytest.mark.postgres
def test_the_review_benchmark_runs_and_reports_every_figure(postgres_admin: Engine) -> None:
    figures = review.run(POSTGRES_URL, results=300, queued=60, bulk=20, repeats=2)
    assert (figures["results"], figures["queued_items"], figures["bulk_accept_items"]) == (300, 60, 20)
    for name in ("queue_first_page", "queue_deep_page_keyset", "queue_attribute_filter", "deep_page_sql_keyset",
                 "deep_page_sql_offset_baseline"):  # fmt: skip
        assert figures[name]["p95_ms"] >= figures[name]["p50_ms"] > 0
    assert figures["per_decision_path_decisions"] == 30  # 20 items: pattern on each, style on every other
