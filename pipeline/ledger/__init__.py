"""The job ledger: items, runs and jobs in the database, the source of truth for what is done.

Redis only delivers job ids; whether a job still needs work is decided here. A job moves
queued -> running (claimed, with a lease) -> done | needs_review | failed (by the writer, with
the statement this package gives it). A claim that finds the job already finished skips it, so a
redelivered message costs nothing; a lease that expires puts the job back in reach of the
reconciler. States are schemas.states.JobState / RunState.

No other module reads or writes the jobs and runs tables: the producer, local mode, the backfill,
the reconciler, the writer and the CLI call these functions.

    items    catalog rows, HTTP validators for the content check
    jobs     create, claim, release, publish, expire, finish; read open / unpublished jobs
    runs     create, seal, end; counts, listings, summaries
    plan     the backfill's set-based plan
    cache    the result cache (stored results by content key)
    locks    one backfill / one reconciler at a time
"""

from pipeline.ledger.cache import cached_results
from pipeline.ledger.common import utcnow
from pipeline.ledger.items import (
    CatalogRow,
    add_catalog_seen,
    reset_catalog_seen,
    retire_missing,
    retired_count,
    store_image_validators,
    store_validators,
    tagged_items_page,
    upsert_items,
)
from pipeline.ledger.jobs import (
    UNPUBLISHED,
    Claim,
    add_jobs,
    claim_jobs,
    expire_leases,
    finish_jobs_statement,
    forget_lost_publications,
    has_open_jobs,
    lock_for_finishing,
    mark_published,
    open_jobs,
    outstanding_jobs,
    release_jobs,
    reopen_running,
    select_jobs,
    unpublished_jobs,
    unpublished_run_jobs,
)
from pipeline.ledger.locks import backfill_lock, try_reconcile_lock
from pipeline.ledger.runs import (
    RunOverview,
    cache_hits,
    cancel_run,
    create_run,
    discard_empty_run,
    failures_by_code,
    finish_runs_statement,
    finished_count,
    gpu_milliseconds,
    jobs_by_reason,
    latest_run_outcomes,
    open_count,
    open_run,
    recent_finished_runs,
    recent_runs,
    recount_jobs,
    run_config,
    run_counts,
    run_row,
    run_state,
    run_times,
    runs_bypassing_cache,
    seal_open_run,
    seal_run,
    state_of_run,
)

__all__ = [
    "UNPUBLISHED",
    "CatalogRow",
    "Claim",
    "RunOverview",
    "add_catalog_seen",
    "add_jobs",
    "backfill_lock",
    "cache_hits",
    "cached_results",
    "cancel_run",
    "claim_jobs",
    "create_run",
    "discard_empty_run",
    "expire_leases",
    "failures_by_code",
    "finish_jobs_statement",
    "finish_runs_statement",
    "finished_count",
    "forget_lost_publications",
    "gpu_milliseconds",
    "has_open_jobs",
    "jobs_by_reason",
    "latest_run_outcomes",
    "lock_for_finishing",
    "mark_published",
    "open_count",
    "open_jobs",
    "open_run",
    "outstanding_jobs",
    "recent_finished_runs",
    "recent_runs",
    "recount_jobs",
    "release_jobs",
    "reopen_running",
    "reset_catalog_seen",
    "retire_missing",
    "retired_count",
    "run_config",
    "run_counts",
    "run_row",
    "run_state",
    "run_times",
    "runs_bypassing_cache",
    "seal_open_run",
    "seal_run",
    "select_jobs",
    "state_of_run",
    "store_image_validators",
    "store_validators",
    "tagged_items_page",
    "try_reconcile_lock",
    "unpublished_jobs",
    "unpublished_run_jobs",
    "upsert_items",
    "utcnow",
]
