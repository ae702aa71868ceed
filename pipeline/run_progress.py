"""How far a run is, how fast it goes and when it should end: what `skutag status` shows.

The rate while following is measured over the time followed (what the workers do now); before
anything has moved, and once the run has ended, it is the run's mean: jobs finished over the
run's own lifetime (created to finished), so a finished run shows its real rate, not 0/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import translated_errors
from pipeline.ledger.failures import failure_counts, format_counts
from schemas.states import JobState, RunState


@dataclass(frozen=True)
class RunSnapshot:
    run_id: int
    state: str  # a run state, or "missing"
    counts: dict[str, int]
    created_at: datetime | None
    finished_at: datetime | None
    taken_at: datetime
    failures: dict[str, int] = field(default_factory=dict)  # failed jobs by error code

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return ledger.finished_count(self.counts)

    def mean_rate(self) -> float | None:
        """Jobs finished per second over the run's life so far."""
        if self.created_at is None:
            return None
        seconds = ((self.finished_at or self.taken_at) - self.created_at).total_seconds()
        return self.finished / seconds if seconds > 0 else None


def snapshot(database: Engine, run_id: int) -> RunSnapshot:
    with translated_errors("reading the run"), database.connect() as conn:
        row = ledger.run_times(conn, run_id)
        counts = ledger.run_counts(conn, run_id) if row else {}
        failures = failure_counts(conn, [run_id]).get(run_id, {}) if counts.get(JobState.FAILED) else {}
    taken_at = datetime.now(UTC)
    if row is None:
        return RunSnapshot(run_id, "missing", {}, None, None, taken_at)
    return RunSnapshot(run_id, row.state, counts, _aware(row.created_at), _aware(row.finished_at), taken_at, failures)


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without a zone; skutag stores UTC.
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def current_rate(first: RunSnapshot, now: RunSnapshot) -> float | None:
    """The rate over the time followed, or the run's mean when nothing moved yet or it ended."""
    seconds = (now.taken_at - first.taken_at).total_seconds()
    moved = now.finished - first.finished
    if now.state == RunState.RUNNING and moved > 0 and seconds > 0:
        return moved / seconds
    return now.mean_rate()


def eta_seconds(now: RunSnapshot, rate: float | None) -> float | None:
    if now.state != RunState.RUNNING or not rate:
        return None
    return (now.total - now.finished) / rate


def describe(now: RunSnapshot, rate: float | None) -> str:
    """One progress line, e.g. 'run 42 running: 120/500 finished (done 100, failed 20, queued 380),
    3.2 jobs/s, ETA 1m 59s'."""
    counts = ", ".join(f"{name} {count}" for name, count in sorted(now.counts.items()))
    line = f"run {now.run_id} {now.state}: {now.finished}/{now.total} finished ({counts or 'no jobs'})"
    if rate is not None:
        line += f", {rate:.1f} jobs/s" + (" mean" if now.state != RunState.RUNNING else "")
    eta = eta_seconds(now, rate)
    if eta is not None:
        line += f", ETA {format_duration(eta)}"
    if now.failures:
        line += f"; failed by code: {format_counts(now.failures)}"
    return line


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
