"""The job ledger: items, runs and jobs in the database, the source of truth for what is done.

Redis only delivers job ids; whether a job still needs work is decided here. A job moves
queued -> running (claimed, with a lease) -> done | needs_review | failed (by the writer). A claim
that finds the job already finished skips it, so a redelivered message costs nothing; a lease that
expires puts the job back in reach of the reconciler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import OPEN_JOB_STATES, insert_for, items, jobs, runs
from schemas.results import ItemError, JobSpec


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CatalogRow:
    """One row of a catalog file: what a SKU's main image is and what we know about it."""

    sku: str
    image_uri: str
    title: str | None = None
    category_hint: str | None = None


def upsert_items(conn: Connection, rows: Sequence[CatalogRow], now: datetime | None = None) -> None:
    """Insert or refresh catalog items; updated_at moves only when something changed."""
    if not rows:
        return
    now = now or utcnow()
    insert = insert_for(conn)(items)
    changed = sa.or_(
        items.c.image_uri != insert.excluded.image_uri,
        items.c.title.is_distinct_from(insert.excluded.title),
        items.c.category_hint.is_distinct_from(insert.excluded.category_hint),
    )
    statement = insert.on_conflict_do_update(
        index_elements=[items.c.sku],
        set_={
            "image_uri": insert.excluded.image_uri,
            "title": insert.excluded.title,
            "category_hint": insert.excluded.category_hint,
            "updated_at": insert.excluded.updated_at,
        },
        where=changed,
    )
    unique = {row.sku: row for row in rows}  # the last row for a sku wins, as in the file
    conn.execute(
        statement,
        [
            {"sku": r.sku, "image_uri": r.image_uri, "title": r.title, "category_hint": r.category_hint,
             "created_at": now, "updated_at": now}
            for r in unique.values()
        ],
    )  # fmt: skip


def create_run(conn: Connection, kind: str, config: dict[str, Any], now: datetime | None = None) -> int:
    statement = sa.insert(runs).values(
        kind=kind, state="running", config=config, total_jobs=0, created_at=now or utcnow()
    )
    return int(conn.execute(statement.returning(runs.c.id)).scalar_one())


def add_jobs(
    conn: Connection,
    run_id: int,
    entries: Sequence[tuple[str, str]],
    reason: str = "submitted",
    queue: str = "new",
    now: datetime | None = None,
) -> list[JobSpec]:
    """One queued job per (sku, image_uri) in the run; a sku already in the run is not added twice."""
    if not entries:
        return []
    now = now or utcnow()
    unique = dict(entries)
    statement = (
        insert_for(conn)(jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.run_id, jobs.c.sku])
        .returning(jobs.c.id, jobs.c.sku, jobs.c.image_uri, sort_by_parameter_order=True)
    )
    params = [
        {"run_id": run_id, "sku": sku, "image_uri": uri, "reason": reason, "queue": queue, "state": "queued",
         "attempts": 0, "created_at": now, "updated_at": now}
        for sku, uri in unique.items()
    ]  # fmt: skip
    created = conn.execute(statement, params).all()
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(total_jobs=runs.c.total_jobs + len(created)))
    return [JobSpec(job_id=row.id, run_id=run_id, sku=row.sku, image_uri=row.image_uri) for row in created]


@dataclass(frozen=True)
class Claim:
    """What a worker may do with the jobs it was handed."""

    claimed: list[JobSpec]  # now running under this worker's lease
    exhausted: list[JobSpec]  # out of attempts: to be failed, not run
    skipped: list[int]  # already finished (a redelivery) or unknown


def claim_jobs(
    conn: Connection, specs: Sequence[JobSpec], lease_s: int, max_attempts: int, now: datetime | None = None
) -> Claim:
    """Take the open jobs among specs: count the attempt and set a lease, in one statement."""
    if not specs:
        return Claim([], [], [])
    now = now or utcnow()
    by_id = {spec.job_id: spec for spec in specs}
    statement = (
        sa.update(jobs)
        .where(jobs.c.id.in_(sorted(by_id)), jobs.c.state.in_(OPEN_JOB_STATES))
        .values(
            state="running",
            attempts=jobs.c.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
        .returning(jobs.c.id, jobs.c.attempts)
    )
    attempts = {row.id: row.attempts for row in conn.execute(statement)}
    claimed: list[JobSpec] = []
    exhausted: list[JobSpec] = []
    for job_id, attempt in sorted(attempts.items()):
        spec = by_id[job_id].model_copy(update={"attempt": attempt})
        (claimed if attempt <= max_attempts else exhausted).append(spec)
    skipped = sorted(set(by_id) - set(attempts))
    return Claim(claimed, exhausted, skipped)


def release_jobs(conn: Connection, errors: Iterable[tuple[int, ItemError]], now: datetime | None = None) -> None:
    """Put running jobs back in the queue after a retryable failure, keeping the error for status."""
    now = now or utcnow()
    params = [{"job_id": job_id, "code": error.code.value, "message": error.message} for job_id, error in errors]
    if not params:
        return
    statement = (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == "running")
        .values(
            state="queued",
            lease_expires_at=None,
            published_at=None,
            last_error_code=sa.bindparam("code"),
            last_error=sa.bindparam("message"),
            updated_at=now,
        )
    )
    conn.execute(statement, params)


def mark_published(conn: Connection, job_ids: Sequence[int], now: datetime | None = None) -> None:
    if job_ids:
        conn.execute(sa.update(jobs).where(jobs.c.id.in_(job_ids)).values(published_at=now or utcnow()))


def run_counts(conn: Connection, run_id: int) -> dict[str, int]:
    rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).where(jobs.c.run_id == run_id).group_by(jobs.c.state))
    return {state: int(count) for state, count in rows}
