"""Tags carry their evidence: the consumer views show the image_uri and image hash the tags came
from and a `stale` flag (the item's listing now points at another image, one with no successful
result yet); items.retired_at marks delisted SKUs (`skutag backfill --retire-missing`), which
leave the views while their history stays in results and tags.

The views start from 0003_review_log's definitions (still the newest on main: 0006 and 0007 did
not touch them) and add columns at the end, so every existing column keeps its name and place.
A sku with several images (0006_sku_images) is stale only when the image its tags came from is
none of its listed images any more.

Revision ID: 0008_stale_tags
Revises: 0007_review_trigger_plans
Create Date: 2026-12-04
"""

from collections.abc import Sequence
from importlib import import_module

import sqlalchemy as sa
from alembic import op

revision: str = "0008_stale_tags"
down_revision: str | None = "0007_review_trigger_plans"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Ts = sa.DateTime(timezone=True)

# The consumer contract (README, "Reading the tags"): keep these columns stable.
_CURRENT_VIEW = """
CREATE VIEW sku_tags_current AS
SELECT t.sku,
       t.attribute,
       COALESCE(d.value, t.value) AS value,
       CASE WHEN d.value IS NULL THEN t.confidence ELSE 1.0 END AS confidence,
       CASE WHEN d.value IS NULL THEN 'model' ELSE 'review' END AS source,
       tv.label_en,
       tv.label_zh,
       t.value AS model_value,
       t.confidence AS model_confidence,
       t.runner_up,
       t.model_id,
       t.taxonomy_version,
       {latest} AS updated_at,
       d.reviewer,
       s.image_uri,
       t.image_sha256,
       {stale} AS stale
FROM tags t
JOIN items i ON i.sku = t.sku AND i.retired_at IS NULL
JOIN tag_sets s ON s.sku = t.sku
LEFT JOIN review_decisions d
       ON d.sku = t.sku AND d.attribute = t.attribute AND d.image_sha256 = t.image_sha256
LEFT JOIN taxonomy_values tv
       ON tv.taxonomy_version = t.taxonomy_version
      AND tv.attribute = t.attribute
      AND tv.value = COALESCE(d.value, t.value)
"""

# needs_review turns into tagged once every attribute routed to review has a decision for the
# current image (as in 0003).
_STATUS = """
CASE WHEN s.status = 'needs_review' AND NOT EXISTS (
        SELECT 1 FROM results r CROSS JOIN {expand}
        WHERE r.job_id = s.job_id
          AND NOT EXISTS (SELECT 1 FROM review_decisions d WHERE d.sku = s.sku AND d.attribute = a.value
                            AND d.image_sha256 = s.image_sha256))
     THEN 'tagged' ELSE s.status END"""

_JSON_VIEW = """
CREATE VIEW sku_tags_json AS
SELECT s.sku,
       s.status,
       s.updated_at,
       {build}(
           'sku', s.sku,
           'status', s.status,
           'summary', s.summary,
           'model_id', s.model_id,
           'prompt_version', s.prompt_version,
           'taxonomy_version', s.taxonomy_version,
           'updated_at', s.updated_at,
           'attributes', {attributes},
           'image_uri', s.image_uri,
           'image_sha256', s.image_sha256,
           'stale', {stale_json}
       ) AS tags,
       s.image_uri,
       s.image_sha256,
       s.stale
FROM (SELECT s.sku, {status} AS status, s.summary, s.model_id, s.prompt_version, s.taxonomy_version,
             s.updated_at, s.image_uri, s.image_sha256, {stale} AS stale
      FROM tag_sets s JOIN items i ON i.sku = s.sku AND i.retired_at IS NULL) s
"""

_ATTRIBUTES = {
    "postgresql": """COALESCE(
               (SELECT jsonb_object_agg(c.attribute, jsonb_build_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku),
               '{}'::jsonb)""",
    "sqlite": """json(COALESCE(
               (SELECT json_group_object(c.attribute, json_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku),
               '{}'))""",
}


# The tags' image is not among the sku's other listed images either (several images per sku).
_NOT_LISTED = "NOT EXISTS (SELECT 1 FROM item_images ii WHERE ii.sku = s.sku AND ii.image_uri = s.image_uri)"


def _create_views(postgres: bool) -> None:
    if postgres:
        # The listing now shows another image than the one these tags came from.
        stale = f"(s.image_uri IS NULL OR (i.image_uri <> s.image_uri AND {_NOT_LISTED}))"
        op.execute(_CURRENT_VIEW.format(latest="GREATEST(t.updated_at, d.reviewed_at)", stale=stale))
        status = _STATUS.format(expand="jsonb_array_elements_text(r.review_attributes) AS a(value)")
        op.execute(_JSON_VIEW.format(build="jsonb_build_object", attributes=_ATTRIBUTES["postgresql"],
                                     stale_json="s.stale", status=status, stale=stale))  # fmt: skip
        return
    stale = f"(CASE WHEN s.image_uri IS NULL OR (i.image_uri <> s.image_uri AND {_NOT_LISTED}) THEN 1 ELSE 0 END)"
    op.execute(_CURRENT_VIEW.format(latest="MAX(t.updated_at, COALESCE(d.reviewed_at, ''))", stale=stale))
    status = _STATUS.format(expand="json_each(r.review_attributes) AS a")
    op.execute(_JSON_VIEW.format(build="json_object", attributes=_ATTRIBUTES["sqlite"],
                                 stale_json="json(CASE WHEN s.stale THEN 'true' ELSE 'false' END)",
                                 status=status, stale=stale))  # fmt: skip


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    op.add_column("items", sa.Column("retired_at", Ts))
    _create_views(op.get_bind().dialect.name == "postgresql")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    op.execute("ALTER TABLE items DROP COLUMN retired_at")  # SQLite 3.35+ and Postgres alike
    import_module("migrations.versions.0003_review_log")._create_views(op.get_bind().dialect.name == "postgresql")
