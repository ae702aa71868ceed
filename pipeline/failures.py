"""Failures you can see: a run's failed jobs by error code, listed, and the retryable ones
re-queued as a new run (the ledger's `failures` module holds the SQL and the rules; this is what
`skutag failures`, `skutag retry`, `status` and local mode call, one transaction each)."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from pipeline.db import translated_errors
from pipeline.ledger.failures import FailedJob, Retry, failed_jobs, failure_counts, format_counts, retry_failed

__all__ = ["FailedJob", "Retry", "counts_by_code", "format_counts", "list_failures", "retry_run"]


def counts_by_code(database: Engine, run_id: int) -> dict[str, int]:
    """The run's failed jobs by error code, most frequent first."""
    with translated_errors("counting failures"), database.connect() as conn:
        return failure_counts(conn, [run_id]).get(run_id, {})


def list_failures(database: Engine, run_id: int, code: str | None = None) -> list[FailedJob]:
    with translated_errors("listing failures"), database.connect() as conn:
        return failed_jobs(conn, run_id, code)


def retry_run(database: Engine, run_id: int, code: str | None = None) -> Retry:
    """A new run with the retryable failures of run_id (see pipeline.ledger.failures.retry_failed)."""
    with translated_errors("re-queueing failures"), database.begin() as conn:
        return retry_failed(conn, run_id, code)
