"""The writer's hot path on Postgres: every statement it issues reads the big tables by index,
never JIT-compiles, and the number of statements per write stays what it is (each one is a round
trip, paid per transaction: at 32 results per transaction they were the cost)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pipeline.routing import Thresholds
from pipeline.writer import ResultWriter
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result

pytestmark = pytest.mark.postgres

STAGING = {"stage_results", "stage_tags", "stage_new", "stage_won"}
PLANNED = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")  # not SET, ANALYZE, COPY, DDL


def _rewrite_with_reviews(engine: Engine, taxonomy: Taxonomy, skus: int, threshold: float = 0.8) -> ResultWriter:
    """A writer that has tagged `skus` skus (with threshold 0.8 some attributes in review; with
    0.0 none), ready to re-tag them."""
    writer = ResultWriter(engine, taxonomy, thresholds=Thresholds(default=threshold))
    writer.write([make_result(job, taxonomy, seed=1) for job in make_jobs(engine, skus)])
    return writer


def _second_run(engine: Engine, taxonomy: Taxonomy, skus: int) -> list[Any]:
    return [make_result(job, taxonomy, seed=2) for job in make_jobs(engine, skus)]


@pytest.fixture
def plans(pg_engine: Engine) -> Iterator[list[tuple[str, str]]]:
    """(statement, plan) of every statement run on pg_engine, planned just before it runs, in
    its transaction (so with the writer's settings and staging rows)."""
    captured: list[tuple[str, str]] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if executemany or not statement.lstrip().upper().startswith(PLANNED):
            return
        with cursor.connection.cursor() as explaining:
            explaining.execute("EXPLAIN " + statement, parameters)
            captured.append((statement, "\n".join(row[0] for row in explaining.fetchall())))

    event.listen(pg_engine, "before_cursor_execute", explain)
    yield captured
    event.remove(pg_engine, "before_cursor_execute", explain)


def test_every_statement_of_a_write_reads_by_index(
    pg_engine: Engine, taxonomy: Taxonomy, plans: list[tuple[str, str]]
) -> None:
    writer = _rewrite_with_reviews(pg_engine, taxonomy, 40)
    results = _second_run(pg_engine, taxonomy, 40)
    plans.clear()
    writer.write(results)
    assert len(plans) > 10
    for statement, plan in plans:
        scanned = set(re.findall(r"Seq Scan on (\w+)", plan)) - STAGING
        assert not scanned, f"{statement}\n{plan}"
        assert "JIT:" not in plan, f"{statement}\n{plan}"


def _count_statements(engine: Engine) -> tuple[list[str], Any]:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    return statements, record


# Per write of single-image skus without listing text: 2 COPYs (not counted here) and these.
# With review: settings, the jobs' lock (cancelled ones are discarded), 3 ANALYZE, 2 captures,
# tags delete + insert, 1 probe for multi-image skus, 1 for listings, 5 review-queue statements,
# jobs, runs. Without anything to review and no sku in the queue: one probe instead of the 5.
@pytest.mark.parametrize(("threshold", "expected"), [(0.8, 18), (0.0, 14)])
def test_statements_per_write_of_single_image_skus(
    pg_engine: Engine, taxonomy: Taxonomy, threshold: float, expected: int
) -> None:
    writer = _rewrite_with_reviews(pg_engine, taxonomy, 40, threshold)
    results = _second_run(pg_engine, taxonomy, 40)
    statements, record = _count_statements(pg_engine)
    try:
        writer.write(results)
    finally:
        event.remove(pg_engine, "before_cursor_execute", record)
    with pg_engine.connect() as conn:
        queued = conn.execute(sa.text("SELECT count(*) FROM review_tasks")).scalar_one()
    assert (queued > 0) == (threshold > 0)
    assert len(statements) == expected, "\n".join(s.strip().splitlines()[0][:100] for s in statements)
