"""The backfill's plan, set-based: which items need a job, with the first reason that applies.

    retry_failed           its last job failed with a retryable error, and failures < max_attempts
    never_tagged           no current tags
    image_uri_changed      the item's image_uri differs from the one its tags came from, or (a
                           sku with several images) one of its images is new, replaced or gone
    image_content_changed  same URI, different bytes (listed in content_changed by the content check)
    model_changed / quantization_changed / taxonomy_changed / prompt_changed
    older_than_max_age     tags older than the cutoff
Nothing is planned for an item whose last job is still open, or failed for good on the same URI,
nor for a retired (delisted) item. A planned sku with several images gets one job per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import copy_rows
from pipeline.ledger.common import NOW
from pipeline.ledger.runs import recount_jobs
from schemas.results import RETRYABLE_CODES, ErrorCode
from schemas.states import OPEN_JOB_STATES, JobState, sql_list

REASONS = (
    "retry_failed", "never_tagged", "image_uri_changed", "image_content_changed", "model_changed",
    "quantization_changed", "taxonomy_changed", "prompt_changed", "older_than_max_age",
)  # fmt: skip
RETRYABLE = (*(code.value for code in RETRYABLE_CODES), ErrorCode.ATTEMPTS_EXHAUSTED.value)

_FAILED = JobState.FAILED.value

# A sku with several images (item_images) changed when one of its images was never tried (a new
# or replaced URI: no result at all, so an image failing for good is not re-planned every night),
# or when its merged tags still hold an answer from an image the catalog no longer lists.
_IMAGES_CHANGED = """(
        EXISTS (SELECT 1 FROM item_images ii WHERE ii.sku = i.sku AND NOT EXISTS (
                  SELECT 1 FROM results r WHERE r.sku = ii.sku AND r.image_uri = ii.image_uri))
     OR EXISTS (SELECT 1 FROM tag_sources ts WHERE ts.sku = i.sku AND NOT EXISTS (
                  SELECT 1 FROM item_images ii WHERE ii.sku = ts.sku AND ii.image_uri = ts.image_uri)))"""

# One row per item that needs a job, with its reason. The last job per sku comes from the
# (sku, id) index; the failure count is only evaluated for items whose last job failed.
_PLAN = f"""
SELECT sku, image_uri, reason FROM (
  SELECT i.sku, i.image_uri,
    CASE
      WHEN lj.state IN {sql_list(OPEN_JOB_STATES)} THEN NULL
      WHEN lj.state = '{_FAILED}' AND lj.image_uri = i.image_uri AND lj.last_error_code NOT IN ({{retryable}}) THEN NULL
      WHEN lj.state = '{_FAILED}' AND lj.image_uri = i.image_uri THEN
        CASE WHEN (SELECT count(*) FROM jobs f WHERE f.sku = i.sku AND f.state = '{_FAILED}') < :max_failures
             THEN 'retry_failed' END
      WHEN t.sku IS NULL THEN 'never_tagged'
      WHEN t.image_uri IS NULL OR t.image_uri <> i.image_uri THEN 'image_uri_changed'
      WHEN {{images_changed}} THEN 'image_uri_changed'
      WHEN cc.sku IS NOT NULL THEN 'image_content_changed'
      WHEN t.model_id <> :model_id THEN 'model_changed'
      WHEN t.quantization <> :quantization THEN 'quantization_changed'
      WHEN t.taxonomy_version <> :taxonomy_version THEN 'taxonomy_changed'
      WHEN t.prompt_version <> :prompt_version THEN 'prompt_changed'
      WHEN t.produced_at < :cutoff THEN 'older_than_max_age'
    END AS reason
  FROM items i
  LEFT JOIN tag_sets t ON t.sku = i.sku
  LEFT JOIN content_changed cc ON cc.sku = i.sku
  LEFT JOIN jobs lj ON lj.id = (SELECT max(j.id) FROM jobs j WHERE j.sku = i.sku)
  WHERE i.retired_at IS NULL
) planned
WHERE reason IS NOT NULL
"""

# A planned sku with several images gets a job per image (unchanged ones are answered by the
# result cache), so its merged tags are re-made from every current image, not the first alone.
_PLAN_JOBS = """
SELECT p.sku, COALESCE(ii.image_uri, p.image_uri) AS image_uri, p.reason
FROM ({plan}) p LEFT JOIN item_images ii ON ii.sku = p.sku
"""

_CONTENT_TABLE = "CREATE TEMP TABLE IF NOT EXISTS content_changed (sku text PRIMARY KEY)"


def reset_content_changed(conn: Connection) -> None:
    """Create the connection's (temporary) list of items whose image bytes changed, empty: a pooled
    connection keeps its temporary tables."""
    conn.exec_driver_sql(_CONTENT_TABLE)
    conn.exec_driver_sql("DELETE FROM content_changed")


def add_content_changed(conn: Connection, skus: Sequence[str]) -> None:
    if not skus:
        return
    if conn.dialect.name == "postgresql":
        copy_rows(conn, "content_changed", ("sku",), [(sku,) for sku in skus])
    else:
        conn.exec_driver_sql("INSERT OR IGNORE INTO content_changed (sku) VALUES (?)", [(sku,) for sku in skus])


def _plan_query() -> str:
    plan = _PLAN.format(retryable=", ".join(f"'{code}'" for code in RETRYABLE), images_changed=_IMAGES_CHANGED)
    return _PLAN_JOBS.format(plan=plan)


def _bind(text: str) -> sa.TextClause:
    return sa.text(text).bindparams(sa.bindparam("cutoff", type_=sa.DateTime(timezone=True)))


def count_plan(conn: Connection, params: dict[str, Any]) -> dict[str, int]:
    """What the plan would create, by reason. params: model_id, quantization, taxonomy_version,
    prompt_version, cutoff, max_failures."""
    rows = conn.execute(_bind(f"SELECT reason, count(*) FROM ({_plan_query()}) p GROUP BY reason"), params)
    return {reason: int(count) for reason, count in rows}


def insert_plan(conn: Connection, run_id: int, queue: str, params: dict[str, Any], now: datetime) -> None:
    """Create the run's jobs in one statement (a resumed run gets only what it is missing)."""
    statement = _bind(f"""
        INSERT INTO jobs (run_id, sku, image_uri, reason, queue, state, attempts, created_at, updated_at)
        SELECT :run_id, sku, image_uri, reason, :queue, '{JobState.QUEUED.value}', 0, :now, :now
        FROM ({_plan_query()}) p
        WHERE true
        ON CONFLICT (run_id, sku, image_uri) DO NOTHING""").bindparams(NOW)
    conn.execute(statement, {**params, "run_id": run_id, "queue": queue, "now": now})
    recount_jobs(conn, run_id)
