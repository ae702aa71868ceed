"""The ledger, results, current tags, reviews, taxonomy labels and the consumer views.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.DateTime(timezone=True)
OPEN = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    _create_ledger()
    _create_results()
    _create_current()
    _create_views()


def _create_ledger() -> None:
    op.create_table(
        "items",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("title", sa.Text),
        sa.Column("category_hint", sa.Text),
        sa.Column("image_etag", sa.Text),
        sa.Column("image_last_modified", sa.Text),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", name="pk_items"),
    )
    op.create_table(
        "runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("config", Json, nullable=False),
        sa.Column("total_jobs", sa.Integer, server_default="0", nullable=False),
        sa.Column("broker_epoch", sa.Text),
        sa.Column("planned_at", Ts),
        sa.Column("summary", Json),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("finished_at", Ts),
        sa.CheckConstraint("state IN ('running', 'done', 'partial', 'failed', 'cancelled')", name="ck_runs_state"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, server_default="submitted", nullable=False),
        sa.Column("queue", sa.Text, server_default="new", nullable=False),
        sa.Column("state", sa.Text, server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer, server_default="0", nullable=False),
        sa.Column("lease_expires_at", Ts),
        sa.Column("published_at", Ts),
        sa.Column("last_error_code", sa.Text),
        sa.Column("last_error", sa.Text),
        sa.Column("cache_hit", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.Column("finished_at", Ts),
        sa.CheckConstraint("state IN ('queued', 'running', 'done', 'needs_review', 'failed')", name="ck_jobs_state"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_jobs_run_id_runs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["sku"], ["items.sku"], name="fk_jobs_sku_items"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("run_id", "sku", name="uq_jobs_run_id_sku"),
    )
    op.create_index("ix_jobs_run_id_state", "jobs", ["run_id", "state"])
    op.create_index("ix_jobs_sku_id", "jobs", ["sku", "id"])  # the latest job per sku (backfill planning)
    op.create_index("ix_jobs_open", "jobs", ["state", "lease_expires_at"], postgresql_where=OPEN, sqlite_where=OPEN)


def _create_results() -> None:
    op.create_table(
        "results",
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("image_uri", sa.Text),
        sa.Column("image_sha256", sa.Text),
        sa.Column("cache_key", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("category", sa.Text),
        sa.Column("summary", sa.Text),
        sa.Column("attributes", Json, nullable=False),
        sa.Column("review_attributes", Json, nullable=False),
        sa.Column("error_code", sa.Text),
        sa.Column("error_message", sa.Text),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("model_revision", sa.Text),
        sa.Column("quantization", sa.Text, nullable=False),
        sa.Column("prompt_version", sa.Text, nullable=False),
        sa.Column("taxonomy_version", sa.Text, nullable=False),
        sa.Column("timings", Json, nullable=False),
        sa.Column("cache_hit", sa.Boolean, nullable=False),
        sa.Column("produced_at", Ts, nullable=False),
        sa.Column("written_at", Ts, nullable=False),
        sa.CheckConstraint("status IN ('tagged', 'needs_review', 'failed')", name="ck_results_status"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_results_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", name="pk_results"),
    )
    op.create_index("ix_results_sku_produced_at", "results", ["sku", "produced_at"])
    has_key = sa.text("cache_key IS NOT NULL")
    op.create_index("ix_results_cache_key", "results", ["cache_key"], postgresql_where=has_key, sqlite_where=has_key)


def _create_current() -> None:
    op.create_table(
        "tag_sets",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("category", sa.Text),
        sa.Column("summary", sa.Text),
        sa.Column("image_uri", sa.Text),
        sa.Column("image_sha256", sa.Text),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("quantization", sa.Text, nullable=False),
        sa.Column("prompt_version", sa.Text, nullable=False),
        sa.Column("taxonomy_version", sa.Text, nullable=False),
        sa.Column("produced_at", Ts, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", name="pk_tag_sets"),
    )
    op.create_table(
        "tags",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("runner_up", sa.Text),
        sa.Column("runner_up_confidence", sa.Float),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("image_sha256", sa.Text),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("taxonomy_version", sa.Text, nullable=False),
        sa.Column("produced_at", Ts, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", "attribute", name="pk_tags"),
    )
    op.create_index("ix_tags_attribute_value", "tags", ["attribute", "value"])
    op.create_table(
        "reviews",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.Text),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("reviewed_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", "attribute", name="pk_reviews"),
    )
    op.create_table(
        "taxonomy_values",
        sa.Column("taxonomy_version", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("label_en", sa.Text, nullable=False),
        sa.Column("label_zh", sa.Text, nullable=False),
        sa.Column("synonyms", Json, nullable=False),
        sa.PrimaryKeyConstraint("taxonomy_version", "attribute", "value", name="pk_taxonomy_values"),
    )


# The consumer contract (README, "Reading the tags"): keep these columns stable.
_CURRENT_VIEW = """
CREATE VIEW sku_tags_current AS
SELECT t.sku,
       t.attribute,
       COALESCE(r.value, t.value) AS value,
       CASE WHEN r.value IS NULL THEN t.confidence ELSE 1.0 END AS confidence,
       CASE WHEN r.value IS NULL THEN 'model' ELSE 'review' END AS source,
       tv.label_en,
       tv.label_zh,
       t.value AS model_value,
       t.confidence AS model_confidence,
       t.runner_up,
       t.model_id,
       t.taxonomy_version,
       {latest} AS updated_at
FROM tags t
LEFT JOIN reviews r
       ON r.sku = t.sku AND r.attribute = t.attribute AND r.image_sha256 {same} t.image_sha256
LEFT JOIN taxonomy_values tv
       ON tv.taxonomy_version = t.taxonomy_version
      AND tv.attribute = t.attribute
      AND tv.value = COALESCE(r.value, t.value)
"""

_JSON_VIEW_POSTGRES = """
CREATE VIEW sku_tags_json AS
SELECT s.sku,
       s.status,
       s.updated_at,
       jsonb_build_object(
           'sku', s.sku,
           'status', s.status,
           'summary', s.summary,
           'model_id', s.model_id,
           'prompt_version', s.prompt_version,
           'taxonomy_version', s.taxonomy_version,
           'updated_at', s.updated_at,
           'attributes', COALESCE(
               (SELECT jsonb_object_agg(c.attribute, jsonb_build_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku),
               '{}'::jsonb)
       ) AS tags
FROM tag_sets s
"""

_JSON_VIEW_SQLITE = """
CREATE VIEW sku_tags_json AS
SELECT s.sku,
       s.status,
       s.updated_at,
       json_object(
           'sku', s.sku,
           'status', s.status,
           'summary', s.summary,
           'model_id', s.model_id,
           'prompt_version', s.prompt_version,
           'taxonomy_version', s.taxonomy_version,
           'updated_at', s.updated_at,
           'attributes', json(COALESCE(
               (SELECT json_group_object(c.attribute, json_object(
                           'value', c.value, 'confidence', c.confidence, 'source', c.source))
                FROM sku_tags_current c WHERE c.sku = s.sku),
               '{}'))
       ) AS tags
FROM tag_sets s
"""


def _create_views() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CURRENT_VIEW.format(latest="GREATEST(t.updated_at, r.reviewed_at)", same="IS NOT DISTINCT FROM"))
        op.execute(_JSON_VIEW_POSTGRES)
    else:
        op.execute(_CURRENT_VIEW.format(latest="MAX(t.updated_at, COALESCE(r.reviewed_at, ''))", same="IS"))
        op.execute(_JSON_VIEW_SQLITE)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sku_tags_json")
    op.execute("DROP VIEW IF EXISTS sku_tags_current")
    for table in ("taxonomy_values", "reviews", "tags", "tag_sets", "results", "jobs", "runs", "items"):
        op.drop_table(table)
