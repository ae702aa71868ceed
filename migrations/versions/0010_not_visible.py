"""`not_visible` counted apart in the consumer views: sku_tags_current gains `visible` (false where
the value, the model's or a reviewer's, is `not_visible`), and sku_tags_json's document keeps such
attributes out of `attributes` and lists them under `not_visible`, so a consumer reading the
document never mistakes "the photo does not show it" for a tag.

The views start from 0008_stale_tags' definitions (still the newest for these two views) and add at the
end, so every existing column keeps its name and place.

Revision ID: 0010_not_visible
Revises: 0009_review_undo_guard
Create Date: 2026-12-04
"""

from collections.abc import Sequence
from importlib import import_module

from alembic import op

revision: str = "0010_not_visible"
down_revision: str | None = "0009_review_undo_guard"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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
       {stale} AS stale,
       COALESCE(d.value, t.value) <> 'not_visible' AS visible
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
           'stale', {stale_json},
           'not_visible', {not_visible}
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
                FROM sku_tags_current c WHERE c.sku = s.sku AND c.visible),
               '{}'::jsonb)""",
    "sqlite": """json(COALESCE(
               (SELECT json_group_object(c.attribute, json_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku AND c.visible),
               '{}'))""",
}

_NOT_VISIBLE = {
    "postgresql": """COALESCE(
               (SELECT jsonb_agg(c.attribute ORDER BY c.attribute)
                FROM sku_tags_current c WHERE c.sku = s.sku AND NOT c.visible),
               '[]'::jsonb)""",
    "sqlite": """json(COALESCE(
               (SELECT json_group_array(h.attribute)
                FROM (SELECT c.attribute FROM sku_tags_current c
                      WHERE c.sku = s.sku AND NOT c.visible ORDER BY c.attribute) h),
               '[]'))""",
}


def _stale_tags() -> object:
    return import_module("migrations.versions.0008_stale_tags")


def _create_views(postgres: bool) -> None:
    previous = _stale_tags()
    not_listed: str = previous._NOT_LISTED  # type: ignore[attr-defined]
    status_sql: str = previous._STATUS  # type: ignore[attr-defined]
    if postgres:
        stale = f"(s.image_uri IS NULL OR (i.image_uri <> s.image_uri AND {not_listed}))"
        op.execute(_CURRENT_VIEW.format(latest="GREATEST(t.updated_at, d.reviewed_at)", stale=stale))
        status = status_sql.format(expand="jsonb_array_elements_text(r.review_attributes) AS a(value)")
        op.execute(_JSON_VIEW.format(build="jsonb_build_object", attributes=_ATTRIBUTES["postgresql"],
                                     stale_json="s.stale", not_visible=_NOT_VISIBLE["postgresql"],
                                     status=status, stale=stale))  # fmt: skip
        return
    stale = f"(CASE WHEN s.image_uri IS NULL OR (i.image_uri <> s.image_uri AND {not_listed}) THEN 1 ELSE 0 END)"
    op.execute(_CURRENT_VIEW.format(latest="MAX(t.updated_at, COALESCE(d.reviewed_at, ''))", stale=stale))
    status = status_sql.format(expand="json_each(r.review_attributes) AS a")
    op.execute(_JSON_VIEW.format(build="json_object", attributes=_ATTRIBUTES["sqlite"],
                                 stale_json="json(CASE WHEN s.stale THEN 'true' ELSE 'false' END)",
                                 not_visible=_NOT_VISIBLE["sqlite"], status=status, stale=stale))  # fmt: skip


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    _create_views(op.get_bind().dialect.name == "postgresql")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    _stale_tags()._create_views(op.get_bind().dialect.name == "postgresql")  # type: ignore[attr-defined]
