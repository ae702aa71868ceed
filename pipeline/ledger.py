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

from pipeline.db import FINISH_RUNS, copy_rows, insert_for, items, jobs, results, runs
from schemas.results import AttributeTag, ErrorCode, ItemError, JobSpec, Provenance, TagResult


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CatalogRow:
    """One row of a catalog file: what a SKU's main image is and what we know about it."""

    sku: str
    image_uri: str
    title: str | None = None
    category_hint: str | None = None


_STAGE_ITEMS = """
CREATE TEMP TABLE IF NOT EXISTS stage_items (sku text, image_uri text, title text, category_hint text)
ON COMMIT DELETE ROWS"""

_UPSERT_STAGED_ITEMS = sa.text("""
INSERT INTO items (sku, image_uri, title, category_hint, created_at, updated_at)
SELECT DISTINCT ON (sku) sku, image_uri, title, category_hint, :now, :now FROM stage_items ORDER BY sku
ON CONFLICT (sku) DO UPDATE SET
    image_uri = excluded.image_uri, title = excluded.title, category_hint = excluded.category_hint,
    updated_at = excluded.updated_at
WHERE items.image_uri <> excluded.image_uri
   OR items.title IS DISTINCT FROM excluded.title
   OR items.category_hint IS DISTINCT FROM excluded.category_hint
""").bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))


def _staging(conn: Connection, ddl: str, table: str) -> None:
    """A per-connection temporary table, emptied: it clears on commit, but one transaction may
    stage twice (a backfill refreshes items in chunks)."""
    key = f"skutag_{table}"
    if not conn.info.get(key):
        conn.exec_driver_sql(ddl)
        conn.info[key] = True
    conn.exec_driver_sql(f"DELETE FROM {table}")


def upsert_items(conn: Connection, rows: Sequence[CatalogRow], now: datetime | None = None) -> None:
    """Insert or refresh catalog items; updated_at moves only when something changed.
    Postgres: COPY into a staging table + one INSERT ... ON CONFLICT (a row-by-row executemany
    managed ~5,000 rows/s); SQLite: executemany."""
    if not rows:
        return
    now = now or utcnow()
    if conn.dialect.name == "postgresql":
        _staging(conn, _STAGE_ITEMS, "stage_items")
        copy_rows(conn, "stage_items", ("sku", "image_uri", "title", "category_hint"),
                  ((r.sku, r.image_uri, r.title, r.category_hint) for r in rows))  # fmt: skip
        conn.execute(_UPSERT_STAGED_ITEMS, {"now": now})
        return
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


_STAGE_JOBS = "CREATE TEMP TABLE IF NOT EXISTS stage_jobs (sku text, image_uri text) ON COMMIT DELETE ROWS"

_INSERT_STAGED_JOBS = sa.text("""
INSERT INTO jobs (run_id, sku, image_uri, reason, queue, state, attempts, created_at, updated_at)
SELECT :run_id, sku, image_uri, :reason, :queue, 'queued', 0, :now, :now FROM stage_jobs
ON CONFLICT (run_id, sku) DO NOTHING
RETURNING id, sku, image_uri
""").bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))


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
    if conn.dialect.name == "postgresql":
        _staging(conn, _STAGE_JOBS, "stage_jobs")
        copy_rows(conn, "stage_jobs", ("sku", "image_uri"), unique.items())
        params = {"run_id": run_id, "reason": reason, "queue": queue, "now": now}
        created = sorted(conn.execute(_INSERT_STAGED_JOBS, params).all(), key=lambda row: row.id)
        conn.execute(sa.update(runs).where(runs.c.id == run_id).values(total_jobs=runs.c.total_jobs + len(created)))
        return [JobSpec(job_id=row.id, run_id=run_id, sku=row.sku, image_uri=row.image_uri) for row in created]
    statement = (
        insert_for(conn)(jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.run_id, jobs.c.sku])
        .returning(jobs.c.id, jobs.c.sku, jobs.c.image_uri, sort_by_parameter_order=True)
    )
    rows = [
        {"run_id": run_id, "sku": sku, "image_uri": uri, "reason": reason, "queue": queue, "state": "queued",
         "attempts": 0, "created_at": now, "updated_at": now}
        for sku, uri in unique.items()
    ]  # fmt: skip
    inserted = conn.execute(statement, rows).all()
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(total_jobs=runs.c.total_jobs + len(inserted)))
    return [JobSpec(job_id=row.id, run_id=run_id, sku=row.sku, image_uri=row.image_uri) for row in inserted]


@dataclass(frozen=True)
class Claim:
    """What a worker may do with the jobs it was handed."""

    claimed: list[JobSpec]  # now running under this worker's lease
    exhausted: list[tuple[JobSpec, ItemError]]  # out of attempts: fail them, do not run them
    skipped: list[int]  # finished already, running under another live lease, or unknown


# A job may be taken when it waits in the queue, or when the worker that took it stopped renewing
# its lease (killed, hung). Another live lease means another copy of the message is being worked on.
_CLAIMABLE = sa.or_(
    jobs.c.state == "queued",
    sa.and_(jobs.c.state == "running", jobs.c.lease_expires_at < sa.bindparam("now", type_=jobs.c.updated_at.type)),
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
            state="running",
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


def seal_run(conn: Connection, run_id: int, now: datetime | None = None) -> None:
    """Every job of the run exists now: from here the run ends with its last job (or at once,
    when it has none or they all finished already)."""
    now = now or utcnow()
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(planned_at=now))
    finish = sa.text(FINISH_RUNS.format(runs=":run_id")).bindparams(
        sa.bindparam("now", type_=sa.DateTime(timezone=True))
    )
    conn.execute(finish, {"now": now, "run_id": run_id})


def mark_published(
    conn: Connection, job_ids: Sequence[int], epoch: str | None = None, now: datetime | None = None
) -> None:
    """Record that these jobs are in the broker; epoch identifies the broker's current life."""
    if not job_ids:
        return
    now = now or utcnow()
    for start in range(0, len(job_ids), 5000):
        part = list(job_ids[start : start + 5000])
        conn.execute(sa.update(jobs).where(jobs.c.id.in_(part), jobs.c.state == "queued").values(published_at=now))
    if epoch is not None:
        run_ids = sa.select(jobs.c.run_id).where(jobs.c.id.in_(list(job_ids[:5000]))).distinct()
        conn.execute(sa.update(runs).where(runs.c.id.in_(run_ids)).values(broker_epoch=epoch))


# --- status ----------------------------------------------------------------------------------
def run_counts(conn: Connection, run_id: int) -> dict[str, int]:
    rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).where(jobs.c.run_id == run_id).group_by(jobs.c.state))
    return {state: int(count) for state, count in rows}


def cache_hits(conn: Connection, run_id: int) -> int:
    statement = sa.select(sa.func.count()).where(jobs.c.run_id == run_id, jobs.c.cache_hit.is_(True))
    return int(conn.execute(statement).scalar_one())


# --- the result cache ------------------------------------------------------------------------
def cached_results(conn: Connection, keys: Iterable[str]) -> dict[str, TagResult]:
    """The newest stored result per cache key (image sha256 + model/prompt/taxonomy versions)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    statement = (
        sa.select(results)
        .where(results.c.cache_key.in_(wanted), results.c.status != "failed")
        .order_by(results.c.produced_at)
    )
    found: dict[str, TagResult] = {}
    for row in conn.execute(statement):
        found[row.cache_key] = _stored_result(row)
    return found


def runs_bypassing_cache(conn: Connection, run_ids: Iterable[int]) -> set[int]:
    """The runs among run_ids created with use_cache off (`--no-cache`, `backfill --max-age`)."""
    statement = sa.select(runs.c.id, runs.c.config).where(runs.c.id.in_(sorted(set(run_ids))))
    return {int(row.id) for row in conn.execute(statement) if (row.config or {}).get("use_cache") is False}


def _stored_result(row: Any) -> TagResult:
    return TagResult(
        job_id=row.job_id,
        sku=row.sku,
        image_uri=row.image_uri,
        image_sha256=row.image_sha256,
        status=row.status,
        attributes={name: AttributeTag.model_validate(tag) for name, tag in row.attributes.items()},
        summary=row.summary,
        review_attributes=list(row.review_attributes),
        provenance=Provenance(
            model_id=row.model_id, model_revision=row.model_revision, quantization=row.quantization,
            prompt_version=row.prompt_version, taxonomy_version=row.taxonomy_version, run_id=row.run_id,
        ),
        produced_at=row.produced_at,
    )  # fmt: skip


# --- reconciliation --------------------------------------------------------------------------
def expire_leases(conn: Connection, now: datetime | None = None) -> int:
    """Running jobs whose worker stopped renewing their lease go back to the queue (unpublished)."""
    now = now or utcnow()
    statement = (
        sa.update(jobs)
        .where(jobs.c.state == "running", jobs.c.lease_expires_at < now)
        .values(state="queued", lease_expires_at=None, published_at=None, updated_at=now)
    )
    return int(conn.execute(statement).rowcount or 0)


def reopen_running(conn: Connection, run_id: int) -> int:
    """Put a run's running jobs back in the queue at once (local mode resuming after a crash)."""
    statement = (
        sa.update(jobs)
        .where(jobs.c.run_id == run_id, jobs.c.state == "running")
        .values(state="queued", lease_expires_at=None, updated_at=utcnow())
    )
    return int(conn.execute(statement).rowcount or 0)


def forget_lost_publications(conn: Connection, epoch: str | None, stale_before: datetime) -> int:
    """Queued jobs whose message cannot be in the broker any more: published in an earlier life of
    the broker (Redis restarted without persistence), or so long ago that it must have been lost."""
    lost_runs = sa.select(runs.c.id).where(runs.c.broker_epoch.is_not(None), runs.c.broker_epoch != epoch)
    lost = sa.or_(jobs.c.published_at < stale_before, jobs.c.run_id.in_(lost_runs) if epoch else sa.false())
    statement = (
        sa.update(jobs)
        .where(jobs.c.state == "queued", jobs.c.published_at.is_not(None), lost)
        .values(published_at=None)
    )
    return int(conn.execute(statement).rowcount or 0)


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


UNPUBLISHED = sa.and_(jobs.c.state == "queued", jobs.c.published_at.is_(None))


def unpublished_jobs(conn: Connection, limit: int, after_id: int = 0) -> list[JobSpec]:
    """Queued jobs of the new-listings queue that no message carries: what the reconciler
    publishes. (The backfill queue is published by the backfill process alone, which keeps its
    bound on outstanding jobs.)"""
    return select_jobs(conn, UNPUBLISHED, jobs.c.id > after_id, jobs.c.queue == "new", limit=limit)
