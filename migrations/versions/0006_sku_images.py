"""Several images per SKU: the catalog's images per sku with their view, one job per image in a
run, where each merged tag came from (tag_sources, view sku_tag_sources), the review reason
'conflict'.

Revision ID: 0006_sku_images
Revises: 0005_review_thresholds
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_sku_images"
down_revision: str | None = "0005_review_thresholds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)
CONFLICT = "conflict"
CONFLICT_DESCRIPTION = "two images of the sku answer the attribute differently, both confidently"

# The consumer contract (README, "Several images per SKU"): keep these columns stable.
_SOURCES_VIEW = """
CREATE VIEW sku_tag_sources AS
SELECT s.sku,
       s.attribute,
       s.image_uri,
       s.view,
       s.position,
       s.value,
       tv.label_en,
       tv.label_zh,
       s.confidence,
       s.role,
       s.job_id,
       s.image_sha256,
       s.updated_at
FROM tag_sources s
LEFT JOIN tags t ON t.sku = s.sku AND t.attribute = s.attribute
LEFT JOIN taxonomy_values tv
       ON tv.taxonomy_version = t.taxonomy_version AND tv.attribute = s.attribute AND tv.value = s.value
"""


def upgrade() -> None:
    op.create_table(
        "item_images",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("view", sa.Text),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", "image_uri", name="pk_item_images"),
    )
    op.create_table(
        "tag_sources",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("view", sa.Text),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("image_sha256", sa.Text),
        sa.Column("updated_at", Ts, nullable=False),
        sa.CheckConstraint(
            "role IN ('chosen', 'agrees', 'conflict', 'outranked', 'not_preferred')", name="ck_tag_sources_role"
        ),
        sa.PrimaryKeyConstraint("sku", "attribute", "image_uri", name="pk_tag_sources"),
    )
    # One job per image of a sku in a run (was: one per sku). SQLite rebuilds the table (batch
    # mode; migrations/env.py turns foreign keys off around it so results are not cascaded away).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_run_id_sku", type_="unique")
        batch.create_unique_constraint("uq_jobs_run_id_sku_image_uri", ["run_id", "sku", "image_uri"])
    op.execute(f"INSERT INTO review_reasons (reason, description) VALUES ('{CONFLICT}', '{CONFLICT_DESCRIPTION}')")
    op.execute(_SOURCES_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sku_tag_sources")
    op.execute(f"DELETE FROM review_tasks WHERE reason = '{CONFLICT}'")
    op.execute(f"DELETE FROM review_reasons WHERE reason = '{CONFLICT}' AND NOT EXISTS "
               f"(SELECT 1 FROM reviews r WHERE r.reason = '{CONFLICT}')")  # fmt: skip
    # Jobs of a sku's extra images cannot stay under the old one-job-per-sku rule.
    op.execute("""DELETE FROM jobs WHERE EXISTS (SELECT 1 FROM jobs o WHERE o.run_id = jobs.run_id
                  AND o.sku = jobs.sku AND o.id < jobs.id)""")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_run_id_sku_image_uri", type_="unique")
        batch.create_unique_constraint("uq_jobs_run_id_sku", ["run_id", "sku"])
    op.drop_table("tag_sources")
    op.drop_table("item_images")
