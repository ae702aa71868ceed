"""Runs in the ledger: one per submit, backfill or local run. A run is created running, sealed
once all its jobs exist, and ends with its last open job; these functions also read what a run
holds (counts, listings, summaries) for status, the CLI and the backfill's report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import jobs, runs
from pipeline.errors import InputError
from pipeline.ledger.common import NOW, utcnow
from schemas.results import ErrorCode
from schemas.states import OPEN_JOB_STATES, JobState, RunState, sql_list

# A run ends when its last open job does: done, partial (some failed) or failed (all failed).
_FINISH_RUNS = f"""
UPDATE runs SET
    state = CASE
        WHEN NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = runs.id AND j.state = '{JobState.FAILED.value}')
            THEN '{RunState.DONE.value}'
        WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = runs.id AND j.state <> '{JobState.FAILED.value}')
            THEN '{RunState.PARTIAL.value}'
        ELSE '{RunState.FAILED.value}' END,
    finished_at = :now
WHERE runs.state = '{RunState.RUNNING.value}' AND runs.planned_at IS NOT NULL
  AND runs.id IN ({{runs}})
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = runs.id AND j.state IN {sql_list(OPEN_JOB_STATES)})
"""


def finish_runs_statement(run_ids: str) -> sa.TextClause:
    """End the sealed runs among run_ids (an SQL expression: a bind parameter or a subquery) that
    have no open job left."""
    return sa.text(_FINISH_RUNS.format(runs=run_ids)).bindparams(NOW)


def create_run(conn: Connection, kind: str, config: dict[str, Any], now: datetime | None = None) -> int:
    statement = sa.insert(runs).values(
        kind=kind, state=RunState.RUNNING.value, config=config, total_jobs=0, created_at=now or utcnow()
    )
    return int(conn.execute(statement.returning(runs.c.id)).scalar_one())


def seal_run(conn: Connection, run_id: int, now: datetime | None = None) -> None:
    """Every job of the run exists now: from here the run ends with its last job (or at once,
    when it has none or they all finished already)."""
    now = now or utcnow()
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(planned_at=now))
    conn.execute(finish_runs_statement(":run_id"), {"now": now, "run_id": run_id})


def recount_jobs(conn: Connection, run_id: int) -> None:
    """Set the run's total_jobs from its jobs (after a set-based insert that did not count)."""
    total = sa.select(sa.func.count()).where(jobs.c.run_id == run_id).scalar_subquery()
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(total_jobs=total))


def open_run(conn: Connection, kind: str) -> int | None:
    """The newest run of this kind that is still running (a backfill resumes it)."""
    statement = (
        sa.select(runs.c.id)
        .where(runs.c.kind == kind, runs.c.state == RunState.RUNNING.value)
        .order_by(runs.c.id.desc())
        .limit(1)
    )
    return conn.execute(statement).scalar_one_or_none()


# --- reading runs ----------------------------------------------------------------------------
def run_counts(conn: Connection, run_id: int) -> dict[str, int]:
    rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).where(jobs.c.run_id == run_id).group_by(jobs.c.state))
    return {state: int(count) for state, count in rows}


def state_of_run(conn: Connection, run_id: int) -> str | None:
    """The run's state; None when there is no such run."""
    return conn.execute(sa.select(runs.c.state).where(runs.c.id == run_id)).scalar_one_or_none()


def run_state(conn: Connection, run_id: int) -> tuple[str, dict[str, int]]:
    """The run's state ('missing' when there is no such run) and its jobs by state."""
    return state_of_run(conn, run_id) or "missing", run_counts(conn, run_id)


def finished_count(counts: dict[str, int]) -> int:
    """Jobs no longer open, from run_counts."""
    open_states = {state.value for state in OPEN_JOB_STATES}
    return sum(count for state, count in counts.items() if state not in open_states)


def open_count(counts: dict[str, int]) -> int:
    return sum(counts.get(state.value, 0) for state in OPEN_JOB_STATES)


def run_config(conn: Connection, run_id: int) -> dict[str, Any] | None:
    """The config snapshot the run was started with; None when there is no such run."""
    config = conn.execute(sa.select(runs.c.config).where(runs.c.id == run_id)).scalar_one_or_none()
    return dict(config) if config is not None else None


def run_times(conn: Connection, run_id: int) -> Any:
    """(state, created_at, finished_at) of the run; None when there is no such run."""
    return conn.execute(
        sa.select(runs.c.state, runs.c.created_at, runs.c.finished_at).where(runs.c.id == run_id)
    ).one_or_none()


def runs_bypassing_cache(conn: Connection, run_ids: Iterable[int]) -> set[int]:
    """The runs among run_ids created with use_cache off (`--no-cache`, `backfill --max-age`)."""
    statement = sa.select(runs.c.id, runs.c.config).where(runs.c.id.in_(sorted(set(run_ids))))
    return {int(row.id) for row in conn.execute(statement) if (row.config or {}).get("use_cache") is False}


def run_row(conn: Connection, run_id: int) -> Any:
    return conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()


def cache_hits(conn: Connection, run_id: int) -> int:
    statement = sa.select(sa.func.count()).where(jobs.c.run_id == run_id, jobs.c.cache_hit.is_(True))
    return int(conn.execute(statement).scalar_one())


def jobs_by_reason(conn: Connection, run_id: int) -> dict[str, int]:
    statement = sa.select(jobs.c.reason, sa.func.count()).where(jobs.c.run_id == run_id).group_by(jobs.c.reason)
    return {str(reason): int(count) for reason, count in conn.execute(statement)}


def failures_by_code(conn: Connection, run_id: int) -> dict[str, int]:
    statement = (
        sa.select(jobs.c.last_error_code, sa.func.count())
        .where(jobs.c.run_id == run_id, jobs.c.state == JobState.FAILED.value)
        .group_by(jobs.c.last_error_code)
    )
    return {str(code): int(count) for code, count in conn.execute(statement)}


_GPU_MS = ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms")


def gpu_milliseconds(conn: Connection, run_id: int) -> tuple[float, int]:
    """Engine time summed over the run's results that ran on the model, and how many there were."""
    if conn.dialect.name == "postgresql":
        parts = " + ".join(f"COALESCE((r.timings->>'{name}')::float8, 0)" for name in _GPU_MS)
    else:
        parts = " + ".join(f"COALESCE(json_extract(r.timings, '$.{name}'), 0)" for name in _GPU_MS)
    statement = sa.text(
        f"SELECT COALESCE(sum({parts}), 0), count(*) FROM results r "
        "WHERE r.run_id = :run AND r.status <> 'failed' AND NOT r.cache_hit"
    )
    total, count = conn.execute(statement, {"run": run_id}).one()
    return float(total), int(count)


def recent_finished_runs(conn: Connection, limit: int) -> list[Any]:
    """(created_at, finished_at, total_jobs) of the newest finished runs that had jobs."""
    statement = (
        sa.select(runs.c.created_at, runs.c.finished_at, runs.c.total_jobs)
        .where(runs.c.finished_at.is_not(None), runs.c.total_jobs > 0)
        .order_by(runs.c.id.desc())
        .limit(limit)
    )
    return list(conn.execute(statement).all())


@dataclass(frozen=True)
class RunOverview:
    """One line of `skutag runs`."""

    id: int
    kind: str
    state: str
    total_jobs: int
    counts: dict[str, int]
    created_at: datetime
    finished_at: datetime | None
    failures: dict[str, int] = field(default_factory=dict)  # failed jobs by error code


def recent_runs(conn: Connection, limit: int) -> list[RunOverview]:
    """The newest runs, newest first, with their jobs by state."""
    counts = (
        sa.select(jobs.c.run_id, jobs.c.state, sa.func.count().label("n"))
        .group_by(jobs.c.run_id, jobs.c.state)
        .subquery()
    )
    recent = conn.execute(sa.select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
    by_run: dict[int, dict[str, int]] = {}
    for row in conn.execute(sa.select(counts).where(counts.c.run_id.in_([r.id for r in recent]))):
        by_run.setdefault(row.run_id, {})[row.state] = row.n
    return [
        RunOverview(r.id, r.kind, r.state, r.total_jobs, by_run.get(r.id, {}), r.created_at, r.finished_at)
        for r in recent
    ]


_LATEST_RUN_OUTCOMES = sa.text("""
    SELECT j.sku, j.state, j.last_error_code,
           (SELECT value FROM tags t WHERE t.sku = j.sku AND t.attribute = 'category') AS category,
           (SELECT value FROM tags t WHERE t.sku = j.sku AND t.attribute = 'primary_color') AS color,
           (SELECT value FROM tags t WHERE t.sku = j.sku AND t.attribute = 'style') AS style,
           (SELECT confidence FROM tags t WHERE t.sku = j.sku AND t.attribute = 'category') AS confidence
    FROM jobs j WHERE j.run_id = (SELECT max(id) FROM runs) ORDER BY j.state, j.sku""")


def latest_run_outcomes(conn: Connection) -> list[Any]:
    """Each job of the newest run with its state, error and a few current tags (the demo's table)."""
    return list(conn.execute(_LATEST_RUN_OUTCOMES).all())


# --- ending runs by hand ---------------------------------------------------------------------
def _still_running(conn: Connection, run_id: int) -> Any:
    row = conn.execute(sa.select(runs.c.state, runs.c.planned_at).where(runs.c.id == run_id)).one_or_none()
    if row is None:
        raise InputError(f"no run {run_id}")
    if row.state != RunState.RUNNING.value:
        raise InputError(f"run {run_id} has already ended ({row.state})")
    return row


def seal_open_run(conn: Connection, run_id: int, note: dict[str, Any] | None = None) -> bool:
    """Seal a run whose submit stopped before sealing it: it ends with the jobs it has. note goes
    into the run's summary (why it was sealed). False when it was sealed already."""
    row = _still_running(conn, run_id)
    if note is not None:
        conn.execute(sa.update(runs).where(runs.c.id == run_id).values(summary=note))
    if row.planned_at is not None:
        return False
    seal_run(conn, run_id)
    return True


def discard_empty_run(conn: Connection, run_id: int) -> bool:
    """Delete a run that has no jobs (a submit that stopped before its first row was recorded)."""
    no_jobs = ~sa.exists().where(jobs.c.run_id == run_id)
    return bool(conn.execute(sa.delete(runs).where(runs.c.id == run_id, no_jobs)).rowcount)


def cancel_run(conn: Connection, run_id: int, now: datetime | None = None) -> int:
    """End a run now: its open jobs fail as cancelled (a message still in the broker finds nothing
    to claim; the writer discards a result already on its way). Returns the jobs cancelled."""
    _still_running(conn, run_id)
    now = now or utcnow()
    cancelled = conn.execute(
        sa.update(jobs)
        .where(jobs.c.run_id == run_id, jobs.c.state.in_([state.value for state in OPEN_JOB_STATES]))
        .values(
            state=JobState.FAILED.value, last_error_code=ErrorCode.CANCELLED.value,
            last_error="the run was cancelled", lease_expires_at=None, finished_at=now, updated_at=now,
        )
    ).rowcount  # fmt: skip
    ended = conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.state == RunState.RUNNING.value)
        .values(state=RunState.CANCELLED.value, planned_at=sa.func.coalesce(runs.c.planned_at, now), finished_at=now)
    ).rowcount
    if not ended:  # a writer finished its last jobs while this waited for their locks: it ended done
        _still_running(conn, run_id)
    return int(cancelled or 0)
