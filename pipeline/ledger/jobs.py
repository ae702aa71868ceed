"""Jobs in the ledger: created queued, claimed under a lease, released for a retry, finished by the
writer; published to the broker and, when the broker lost them, forgotten as published."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import copy_rows, insert_for, jobs, runs
from pipeline.ledger.common import NOW, staging, utcnow
from schemas.results import ErrorCode, ItemError, JobSpec
from schemas.states import OPEN_JOB_STATES, JobState

_STAGE_JOBS = "CREATE TEMP TABLE IF NOT EXISTS stage_jobs (sku text, image_uri text) ON COMMIT DELETE ROWS"

_INSERT_STAGED_JOBS = sa.text(f"""
INSERT INTO jobs (run_id, sku, image_uri, reason, queue, state, attempts, created_at, updated_at)
SELECT :run_id, sku, image_uri, :reason, :queue, '{JobState.QUEUED.value}', 0, :now, :now FROM stage_jobs
ON CONFLICT (run_id, sku, image_uri) DO NOTHING
RETURNING id, sku, image_uri
""").bindparams(NOW)


def add_jobs(
    conn: Connection,
    run_id: int,
    entries: Sequence[tuple[str, str]],
    reason: str = "submitted",
    queue: str = "new",
    now: datetime | None = None,
) -> list[JobSpec]:
    """One queued job per (sku, image_uri) in the run (a sku with several images has one job per
    image); an image already in the run is not added twice."""
    if not entries:
        return []
    now = now or utcnow()
    unique = list(dict.fromkeys(entries))
    if conn.dialect.name == "postgresql":
        staging(conn, _STAGE_JOBS, "stage_jobs")
        copy_rows(conn, "stage_jobs", ("sku", "image_uri"), unique)
        params = {"run_id": run_id, "reason": reason, "queue": queue, "now": now}
        created = sorted(conn.execute(_INSERT_STAGED_JOBS, params).all(), key=lambda row: row.id)
        conn.execute(sa.update(runs).where(runs.c.id == run_id).values(total_jobs=runs.c.total_jobs + len(created)))
        return [JobSpec(job_id=row.id, run_id=run_id, sku=row.sku, image_uri=row.image_uri) for row in created]
    statement = (
        insert_for(conn)(jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.run_id, jobs.c.sku, jobs.c.image_uri])
        .returning(jobs.c.id, jobs.c.sku, jobs.c.image_uri, sort_by_parameter_order=True)
    )
    rows = [
        {"run_id": run_id, "sku": sku, "image_uri": uri, "reason": reason, "queue": queue,
         "state": JobState.QUEUED.value, "attempts": 0, "created_at": now, "updated_at": now}
        for sku, uri in unique
    ]  # fmt: skip
    inserted = conn.execute(statement, rows).all()
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(total_jobs=runs.c.total_jobs + len(inserted)))
    return [JobSpec(job_id=row.id, run_id=run_id, sku=row.sku, image_uri=row.image_uri) for row in inserted]


# --- claims and leases -----------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """What a worker may do with the jobs it was handed."""

    claimed: list[JobSpec]  # now running under this worker's lease
    exhausted: list[tuple[JobSpec, ItemError]]  # out of attempts: fail them, do not run them
    skipped: list[int]  # finished already, running under another live lease, or unknown


# A job may be taken when it waits in the queue, or when the worker that took it stopped renewing
# its lease (killed, hung). Another live lease means another copy of the message is being worked on.
_CLAIMABLE = sa.or_(
    jobs.c.state == JobState.QUEUED.value,
    sa.and_(
        jobs.c.state == JobState.RUNNING.value,
        jobs.c.lease_expires_at < sa.bindparam("now", type_=jobs.c.updated_at.type),
    ),
)


def claim_jobs(
    conn: Connection, specs: Sequence[JobSpec], lease_s: int, max_attempts: int, now: datetime | None = None
) -> Claim:
    """Take the claimable jobs among specs, counting the attempt and setting a lease, in one statement."""
    if not specs:
        return Claim([], [], [])
    now = now or utcnow()
    by_id = {spec.job_id: spec for spec in specs}
    statement = (
        sa.update(jobs)
        .where(jobs.c.id.in_(sorted(by_id)), _CLAIMABLE)
        .values(
            state=JobState.RUNNING.value,
            attempts=jobs.c.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
        .returning(jobs.c.id, jobs.c.attempts, jobs.c.last_error_code, jobs.c.last_error)
    )
    rows = {row.id: row for row in conn.execute(statement, {"now": now})}
    claimed: list[JobSpec] = []
    exhausted: list[tuple[JobSpec, ItemError]] = []
    for job_id, row in sorted(rows.items()):
        spec = by_id[job_id].model_copy(update={"attempt": row.attempts})
        if row.attempts <= max_attempts:
            claimed.append(spec)
        else:
            last = f"; last error: {row.last_error_code}: {row.last_error}" if row.last_error_code else ""
            message = f"gave up after {max_attempts} attempts{last}"
            exhausted.append((spec, ItemError(code=ErrorCode.ATTEMPTS_EXHAUSTED, message=message[:1000])))
    return Claim(claimed, exhausted, sorted(set(by_id) - set(rows)))


def release_jobs(conn: Connection, errors: Iterable[tuple[int, ItemError]], now: datetime | None = None) -> None:
    """Put running jobs back in the queue after a retryable failure, keeping the error for status."""
    now = now or utcnow()
    params = [{"job_id": job_id, "code": error.code.value, "message": error.message} for job_id, error in errors]
    if not params:
        return
    statement = (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == JobState.RUNNING.value)
        .values(
            state=JobState.QUEUED.value,
            lease_expires_at=None,
            published_at=None,
            last_error_code=sa.bindparam("code"),
            last_error=sa.bindparam("message"),
            updated_at=now,
        )
    )
    conn.execute(statement, params)


def expire_leases(conn: Connection, now: datetime | None = None) -> int:
    """Running jobs whose worker stopped renewing their lease go back to the queue (unpublished)."""
    now = now or utcnow()
    statement = (
        sa.update(jobs)
        .where(jobs.c.state == JobState.RUNNING.value, jobs.c.lease_expires_at < now)
        .values(state=JobState.QUEUED.value, lease_expires_at=None, published_at=None, updated_at=now)
    )
    return int(conn.execute(statement).rowcount or 0)


def reopen_running(conn: Connection, run_id: int) -> int:
    """Put a run's running jobs back in the queue at once (local mode resuming after a crash)."""
    statement = (
        sa.update(jobs)
        .where(jobs.c.run_id == run_id, jobs.c.state == JobState.RUNNING.value)
        .values(state=JobState.QUEUED.value, lease_expires_at=None, updated_at=utcnow())
    )
    return int(conn.execute(statement).rowcount or 0)


def lock_for_finishing(conn: Connection, job_ids: Sequence[int]) -> set[int]:
    """Lock the jobs a writer is about to finish, in id order (as every writer takes them), and
    return those `runs cancel` failed as cancelled: their late results must not be written. Holding
    the locks, a cancel arriving now waits and finds the jobs finished, not open."""
    if not job_ids:
        return set()
    statement = (
        sa.select(jobs.c.id, jobs.c.state, jobs.c.last_error_code)
        .where(jobs.c.id.in_(sorted(set(job_ids))))
        .order_by(jobs.c.id)
        .with_for_update()  # SQLite has no row locks: its one writer at a time does the same
    )
    return {
        row.id
        for row in conn.execute(statement)
        if row.state == JobState.FAILED.value and row.last_error_code == ErrorCode.CANCELLED.value
    }


def finish_jobs_statement(results: str, only: str) -> sa.TextClause:
    """The writer's job update, run in its own transaction beside the results: each job takes the
    state of its result (tagged -> done), its error and its cache hit, and loses its lease.
    `results` names the writer's table of (job_id, status, error_code, error_message, cache_hit),
    read as s; `only` is a condition on s choosing the rows that were newly written."""
    return sa.text(f"""
UPDATE jobs SET
    state = CASE s.status WHEN 'tagged' THEN '{JobState.DONE.value}' ELSE s.status END,
    last_error_code = s.error_code,
    last_error = s.error_message,
    cache_hit = s.cache_hit,
    lease_expires_at = NULL,
    finished_at = :now,
    updated_at = :now
FROM {results} s
WHERE jobs.id = s.job_id AND {only}
""").bindparams(NOW)


# --- the broker's view -----------------------------------------------------------------------
def mark_published(
    conn: Connection, job_ids: Sequence[int], epoch: str | None = None, now: datetime | None = None
) -> None:
    """Record that these jobs are in the broker; epoch identifies the broker's current life."""
    if not job_ids:
        return
    now = now or utcnow()
    for start in range(0, len(job_ids), 5000):
        part = list(job_ids[start : start + 5000])
        conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(part), jobs.c.state == JobState.QUEUED.value).values(published_at=now)
        )
    if epoch is not None:
        run_ids = sa.select(jobs.c.run_id).where(jobs.c.id.in_(list(job_ids[:5000]))).distinct()
        conn.execute(sa.update(runs).where(runs.c.id.in_(run_ids)).values(broker_epoch=epoch))


def forget_lost_publications(conn: Connection, epoch: str | None, stale_before: datetime) -> int:
    """Queued jobs whose message cannot be in the broker any more: published in an earlier life of
    the broker (Redis restarted without persistence), or so long ago that it must have been lost."""
    lost_runs = sa.select(runs.c.id).where(runs.c.broker_epoch.is_not(None), runs.c.broker_epoch != epoch)
    lost = sa.or_(jobs.c.published_at < stale_before, jobs.c.run_id.in_(lost_runs) if epoch else sa.false())
    statement = (
        sa.update(jobs)
        .where(jobs.c.state == JobState.QUEUED.value, jobs.c.published_at.is_not(None), lost)
        .values(published_at=None)
    )
    return int(conn.execute(statement).rowcount or 0)


# --- reading jobs ----------------------------------------------------------------------------
def select_jobs(conn: Connection, *conditions: Any, limit: int) -> list[JobSpec]:
    """Jobs matching conditions, oldest first, as the specs a worker is handed."""
    statement = (
        sa.select(jobs.c.id, jobs.c.run_id, jobs.c.sku, jobs.c.image_uri, jobs.c.attempts)
        .where(*conditions)
        .order_by(jobs.c.id)
        .limit(limit)
    )
    return [
        JobSpec(job_id=r.id, run_id=r.run_id, sku=r.sku, image_uri=r.image_uri, attempt=r.attempts)
        for r in conn.execute(statement)
    ]


UNPUBLISHED = sa.and_(jobs.c.state == JobState.QUEUED.value, jobs.c.published_at.is_(None))
_OPEN = jobs.c.state.in_([state.value for state in OPEN_JOB_STATES])


def unpublished_jobs(conn: Connection, limit: int, after_id: int = 0) -> list[JobSpec]:
    """Queued jobs of the new-listings queue that no message carries: what the reconciler
    publishes. (The backfill queue is published by the backfill process alone, which keeps its
    bound on outstanding jobs.)"""
    return select_jobs(conn, UNPUBLISHED, jobs.c.id > after_id, jobs.c.queue == "new", limit=limit)


def unpublished_run_jobs(conn: Connection, run_id: int, limit: int) -> list[JobSpec]:
    """A run's queued jobs that no message carries, oldest first."""
    return select_jobs(conn, jobs.c.run_id == run_id, UNPUBLISHED, limit=limit)


def open_jobs(conn: Connection, run_id: int, after_id: int, limit: int) -> list[JobSpec]:
    """A run's queued or running jobs after job id after_id, oldest first."""
    return select_jobs(conn, jobs.c.run_id == run_id, _OPEN, jobs.c.id > after_id, limit=limit)


def has_open_jobs(conn: Connection, run_id: int) -> bool:
    statement = sa.select(sa.func.count()).where(jobs.c.run_id == run_id, _OPEN)
    return bool(conn.execute(statement).scalar_one())


def outstanding_jobs(conn: Connection, run_id: int) -> int:
    """A run's open jobs that are in the broker (published): what the backfill's bound counts."""
    statement = sa.select(sa.func.count()).where(jobs.c.run_id == run_id, _OPEN, jobs.c.published_at.is_not(None))
    return int(conn.execute(statement).scalar_one())
