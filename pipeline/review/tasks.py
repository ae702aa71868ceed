"""Keeps the review queue in step with the current tags, inside the writer's transaction.

When a result becomes a sku's current tags, the sku's open low-confidence tasks are replaced by
the attributes this result routes to review, except those a person already decided for the same
image (a re-tag of the same image keeps the review; a new image reopens it). Audit tasks survive
a re-tag of the same image and follow the new tags. Then the sku's queue item is rebuilt.

Set-based over the writer's staging table stage_won (sku, job_id): a few statements per batch.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_NOW = sa.bindparam("now", type_=sa.DateTime(timezone=True))

_EXPAND = {
    "postgresql": "jsonb_array_elements_text(r.review_attributes) AS a(value)",
    "sqlite": "json_each(r.review_attributes) AS a",
}

_DROP_STALE_TASKS = """
DELETE FROM review_tasks
WHERE sku IN (SELECT sku FROM {won})
  AND (reason = 'low_confidence'
       OR image_sha256 <> COALESCE((SELECT s.image_sha256 FROM tag_sets s WHERE s.sku = review_tasks.sku), '')
       OR NOT EXISTS (SELECT 1 FROM tags t WHERE t.sku = review_tasks.sku AND t.attribute = review_tasks.attribute))
"""

_FOLLOW_NEW_TAGS = """
UPDATE review_tasks SET
    job_id = (SELECT s.job_id FROM tag_sets s WHERE s.sku = review_tasks.sku),
    confidence = (SELECT t.confidence FROM tags t
                  WHERE t.sku = review_tasks.sku AND t.attribute = review_tasks.attribute)
WHERE sku IN (SELECT sku FROM {won})
"""

_OPEN_LOW_CONFIDENCE = """
INSERT INTO review_tasks (sku, attribute, reason, confidence, job_id, image_sha256, blind, created_at)
SELECT s.sku, t.attribute, 'low_confidence', t.confidence, s.job_id, s.image_sha256, {false}, :now
FROM {won} w
JOIN tag_sets s ON s.sku = w.sku
JOIN results r ON r.job_id = s.job_id
CROSS JOIN {expand}
JOIN tags t ON t.sku = s.sku AND t.attribute = a.value
WHERE s.status = 'needs_review' AND s.image_sha256 IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM review_decisions d
                  WHERE d.sku = s.sku AND d.attribute = t.attribute AND d.image_sha256 = s.image_sha256)
ORDER BY s.sku, t.attribute
ON CONFLICT (sku, attribute) DO NOTHING
"""

_DROP_ITEMS = "DELETE FROM review_items WHERE sku IN (SELECT sku FROM {won})"

REBUILD_ITEMS = """
INSERT INTO review_items (sku, job_id, run_id, category, image_sha256, min_confidence, open_tasks, created_at)
SELECT s.sku, s.job_id, r.run_id, s.category, s.image_sha256, MIN(t.confidence), COUNT(*), MIN(t.created_at)
FROM review_tasks t
JOIN tag_sets s ON s.sku = t.sku
JOIN results r ON r.job_id = s.job_id
WHERE t.sku IN (SELECT sku FROM {won})
GROUP BY s.sku, s.job_id, r.run_id, s.category, s.image_sha256
ORDER BY s.sku
"""


_IN_QUEUE = """
SELECT 1 FROM review_tasks WHERE sku IN (SELECT sku FROM {won})
UNION ALL
SELECT 1 FROM review_items WHERE sku IN (SELECT sku FROM {won})
LIMIT 1
"""


def open_review_tasks(conn: Connection, now: datetime, won: str = "stage_won", to_review: bool = True) -> None:
    """Bring the tasks and items of the skus in table `won` up to date with their current tags.
    to_review=False says none of these skus needs review now: then, when none of them is in the
    queue either, nothing would change, and one probe replaces the five statements."""
    if not to_review and conn.execute(sa.text(_IN_QUEUE.format(won=won))).first() is None:
        return
    dialect = conn.dialect.name
    false = "false" if dialect == "postgresql" else "0"
    conn.execute(sa.text(_DROP_STALE_TASKS.format(won=won)))
    conn.execute(sa.text(_FOLLOW_NEW_TAGS.format(won=won)))
    insert = _OPEN_LOW_CONFIDENCE.format(won=won, expand=_EXPAND[dialect], false=false)
    conn.execute(sa.text(insert).bindparams(_NOW), {"now": now})
    conn.execute(sa.text(_DROP_ITEMS.format(won=won)))
    conn.execute(sa.text(REBUILD_ITEMS.format(won=won)))
