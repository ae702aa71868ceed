"""Ending a run by hand: `skutag runs cancel RUN` and `skutag runs seal RUN`.

cancel: the run's open jobs fail with code `cancelled` and the run ends as cancelled; messages still
in the broker find nothing to claim, and a result already on its way when the run was cancelled is
discarded by the writer (the job stays cancelled; logged "result discarded: job cancelled").
seal: a run whose submit stopped before sealing it (a killed process, a lost database) ends with
the jobs it has: at once if they are all finished, else with its last one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import translated_errors


@dataclass(frozen=True)
class Sealed:
    run_id: int
    newly: bool  # False: the run was sealed already and is waiting for its last jobs
    state: str
    open_jobs: int


def cancel_run(database: Engine, run_id: int) -> int:
    """Cancel run_id; returns how many open jobs were failed as cancelled."""
    with translated_errors("cancelling the run"), database.begin() as conn:
        return ledger.cancel_run(conn, run_id)


def seal_run(database: Engine, run_id: int) -> Sealed:
    with translated_errors("sealing the run"), database.begin() as conn:
        newly = ledger.seal_open_run(conn, run_id)
        state = ledger.state_of_run(conn, run_id) or "missing"
        open_jobs = ledger.open_count(ledger.run_counts(conn, run_id))
    return Sealed(run_id, newly, state, open_jobs)
