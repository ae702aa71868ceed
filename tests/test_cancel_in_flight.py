"""A job cancelled while a worker held it stays cancelled: the writer discards its late result (no
result row, no current tags) and counts it; a result written before the cancel keeps its job done."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import make_engine
from pipeline.errors import InputError
from pipeline.writer import ResultWriter
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result


def rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql))]


def test_a_result_arriving_after_the_cancel_is_discarded(engine: Engine, taxonomy: Taxonomy) -> None:
    held = make_jobs(engine, 3, prefix="HELD")
    other = make_jobs(engine, 1, prefix="OTHER")  # another run, in the same writer batch
    with engine.begin() as conn:
        claim = ledger.claim_jobs(conn, held, lease_s=60, max_attempts=3)  # a worker holds them
        assert len(claim.claimed) == 3
        assert ledger.cancel_run(conn, held[0].run_id) == 3

    report = ResultWriter(engine, taxonomy).write([make_result(job, taxonomy) for job in held + other])

    assert (report.discarded, report.new_results) == (3, 1)
    states = rows(engine, "SELECT sku, state, last_error_code FROM jobs ORDER BY sku")
    assert states == [(job.sku, "failed", "cancelled") for job in held] + [(other[0].sku, "done", None)]
    assert rows(engine, "SELECT sku FROM results") == [(other[0].sku,)]
    assert rows(engine, "SELECT DISTINCT sku FROM tags") == [(other[0].sku,)]
    assert rows(engine, "SELECT sku FROM tag_sets") == [(other[0].sku,)]
    run_states = rows(engine, f"SELECT state FROM runs WHERE id = {held[0].run_id}")
    assert run_states == [("cancelled",)]


def test_a_cancel_during_a_write_waits_for_it_and_leaves_the_job_done(
    pg_engine: Engine, migrated_postgres_url: str, taxonomy: Taxonomy
) -> None:
    """The writer locks its jobs first: a cancel arriving mid-write waits, then finds them done."""
    engine = pg_engine
    jobs = make_jobs(engine, 2, prefix="RACE")
    with engine.begin() as conn:
        ledger.claim_jobs(conn, jobs, lease_s=60, max_attempts=3)
    in_write, go_on = threading.Event(), threading.Event()

    def pause_at_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT INTO results" in statement and not in_write.is_set():
            in_write.set()
            go_on.wait(10)

    try:
        event.listen(engine, "before_cursor_execute", pause_at_insert)
        writer = threading.Thread(
            target=lambda: ResultWriter(engine, taxonomy).write([make_result(job, taxonomy) for job in jobs])
        )
        writer.start()
        assert in_write.wait(10)
        cancelled: list[int | str] = []
        canceller = threading.Thread(target=lambda: cancelled.append(_cancel(migrated_postgres_url, jobs[0].run_id)))
        canceller.start()
        canceller.join(0.5)
        assert canceller.is_alive()  # waiting for the writer's lock on the jobs
        go_on.set()
        writer.join(10)
        canceller.join(10)
        # The writer finished the run's last jobs first: the run ended done, and the cancel says so.
        assert cancelled == [f"run {jobs[0].run_id} has already ended (done)"]
        assert rows(engine, "SELECT state FROM jobs ORDER BY id") == [("done",), ("done",)]
        assert rows(engine, "SELECT state FROM runs") == [("done",)]
    finally:
        go_on.set()  # never leave the writer paused, whatever failed
        event.remove(engine, "before_cursor_execute", pause_at_insert)


def _cancel(url: str, run_id: int) -> int | str:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            return ledger.cancel_run(conn, run_id)
    except InputError as exc:
        return exc.message
    finally:
        engine.dispose()
