"""What `skutag status`, `skutag runs` and the demo read about runs, through the ledger, with
database errors translated: one connection per call."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import make_engine, translated_errors
from pipeline.ledger.failures import failure_counts
from schemas.states import JobState


def run_status(database: Engine, run_id: int) -> tuple[str, dict[str, int]]:
    """The run's state ('missing' when there is no such run) and its jobs by state."""
    with translated_errors("reading the run"), database.connect() as conn:
        return ledger.run_state(conn, run_id)


def recent_runs(database: Engine, limit: int) -> list[ledger.RunOverview]:
    """The newest runs with their jobs by state and, where some failed, their failures by code."""
    with translated_errors("listing runs"), database.connect() as conn:
        recent = ledger.recent_runs(conn, limit)
        failures = failure_counts(conn, [run.id for run in recent if run.counts.get(JobState.FAILED)])
    return [replace(run, failures=failures.get(run.id, {})) for run in recent]


def latest_run_outcomes(database_url: str) -> list[Any]:
    """The newest run's jobs with a few of their tags (the demo's table)."""
    database = make_engine(database_url)
    try:
        with translated_errors("reading the latest run"), database.connect() as conn:
            return ledger.latest_run_outcomes(conn)
    finally:
        database.dispose()
