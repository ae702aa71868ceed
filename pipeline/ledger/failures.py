"""Failures you can see: a run's failed jobs counted by error code, listed with their messages,
and re-queued (the retryable ones) as a new run.

A retry is a new run (kind 'retry', its config naming the run it retries), never a reset of the
failed jobs: each job keeps exactly one result, and the failure stays in the log. Only skus whose
latest job is the failed one are retried (a sku re-tagged since is left alone), with the item's
current image_uri.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import items, jobs, runs
from pipeline.errors import InputError
from pipeline.ledger.jobs import add_jobs
from pipeline.ledger.runs import create_run, seal_run
from schemas.results import RETRYABLE_CODES, ErrorCode, JobSpec
from schemas.states import JobState

# attempts_exhausted: the job ran out of attempts on retryable errors (or kept killing its worker);
# internal_error: a bug, worth another go once fixed. Every other code fails the same way again.
RETRYABLE = frozenset({*(code.value for code in RETRYABLE_CODES), ErrorCode.ATTEMPTS_EXHAUSTED.value,
                       ErrorCode.INTERNAL_ERROR.value})  # fmt: skip
UNKNOWN_CODE = "unknown"
FAILED = jobs.c.state == JobState.FAILED.value


@dataclass(frozen=True)
class FailedJob:
    job_id: int
    sku: str
    image_uri: str
    code: str
    message: str
    attempts: int

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


def failure_counts(conn: Connection, run_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Failed jobs per run, by error code, most frequent first."""
    wanted = sorted(set(run_ids))
    if not wanted:
        return {}
    code = sa.func.coalesce(jobs.c.last_error_code, UNKNOWN_CODE)
    statement = (
        sa.select(jobs.c.run_id, code.label("code"), sa.func.count().label("n"))
        .where(FAILED, jobs.c.run_id.in_(wanted))
        .group_by(jobs.c.run_id, code)
        .order_by(jobs.c.run_id, sa.func.count().desc(), code)
    )
    counts: dict[int, dict[str, int]] = {}
    for row in conn.execute(statement):
        counts.setdefault(int(row.run_id), {})[str(row.code)] = int(row.n)
    return counts


def failed_jobs(conn: Connection, run_id: int, code: str | None = None, latest_only: bool = False) -> list[FailedJob]:
    """The run's failed jobs (of one error code, if given), by code then sku. latest_only: only
    those still their sku's latest job, with the item's current image_uri (what a retry takes)."""
    uri = items.c.image_uri if latest_only else jobs.c.image_uri
    statement = (
        sa.select(jobs.c.id, jobs.c.sku, uri.label("image_uri"), jobs.c.last_error_code, jobs.c.last_error,
                  jobs.c.attempts)
        .select_from(jobs.join(items, items.c.sku == jobs.c.sku))
        .where(FAILED, jobs.c.run_id == run_id)
        .order_by(jobs.c.last_error_code, jobs.c.sku)
    )  # fmt: skip
    if latest_only:
        newer = jobs.alias("newer")
        statement = statement.where(~sa.exists().where(newer.c.sku == jobs.c.sku, newer.c.id > jobs.c.id))
    if code is not None:
        statement = statement.where(sa.func.coalesce(jobs.c.last_error_code, UNKNOWN_CODE) == code)
    return [
        FailedJob(int(r.id), r.sku, r.image_uri, r.last_error_code or UNKNOWN_CODE, r.last_error or "", int(r.attempts))
        for r in conn.execute(statement)
    ]


def format_counts(counts: dict[str, int]) -> str:
    """'not_found 3, corrupt 1'."""
    return ", ".join(f"{code} {count}" for code, count in counts.items())


@dataclass(frozen=True)
class Retry:
    run_id: int | None  # the new run; None when nothing was retryable
    retry_of: int
    kind: str  # the kind of the run retried: 'local' runs are finished with `skutag run --resume`
    jobs: list[JobSpec]
    by_code: dict[str, int]
    final_left: dict[str, int]  # failures not retried: their codes fail the same way again
    # (failures of skus tagged or queued again since are neither: nothing is left to do for them)


def retry_failed(conn: Connection, run_id: int, code: str | None = None, now: datetime | None = None) -> Retry:
    """A new run with one queued job per retryable failure of run_id (of code, if given); no run
    when there is nothing to retry."""
    original = conn.execute(sa.select(runs.c.kind, runs.c.config).where(runs.c.id == run_id)).one_or_none()
    if original is None:
        raise InputError(f"there is no run {run_id}")
    if code is not None and code not in RETRYABLE:
        raise InputError(
            f"{code} failures are final (the same input fails the same way); fix the items and submit them "
            f"again. Retryable codes: {', '.join(sorted(RETRYABLE))}"
        )
    failures = failed_jobs(conn, run_id, code, latest_only=True)
    chosen = [failure for failure in failures if failure.retryable]
    by_code: dict[str, int] = {}
    for failure in chosen:
        by_code[failure.code] = by_code.get(failure.code, 0) + 1
    final_left: dict[str, int] = {}
    for failure in failures:
        if not failure.retryable:
            final_left[failure.code] = final_left.get(failure.code, 0) + 1
    if not chosen:
        return Retry(None, run_id, original.kind, [], by_code, final_left)
    config: dict[str, Any] = {**(original.config or {}), "retry_of": run_id, "retry_code": code}
    new_run = create_run(conn, "retry" if original.kind != "local" else "local", config, now)
    specs = add_jobs(conn, new_run, [(f.sku, f.image_uri) for f in chosen], reason="retry_failed", now=now)
    seal_run(conn, new_run, now)
    return Retry(new_run, run_id, original.kind, specs, by_code, final_left)
