"""The lifecycle states of jobs and runs, as stored in the ledger (pipeline.ledger owns the tables).

job:  queued -> running (claimed, with a lease) -> done | needs_review | failed
      running -> queued again on a retryable failure or an expired lease
run:  running -> done (nothing failed) | partial (some failed) | failed (all failed);
      cancelled is reserved for runs stopped by an operator
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    NEEDS_REVIEW = "needs_review"
    FAILED = "failed"


class RunState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Still to be worked on: waiting in the queue, or claimed by a worker.
OPEN_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


def sql_list(states: tuple[StrEnum, ...]) -> str:
    """States as an SQL list literal, for text statements: ('queued', 'running')."""
    return "(" + ", ".join(f"'{state.value}'" for state in states) + ")"
