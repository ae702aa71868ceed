"""Listing issues: where a listing's title or category hint contradicts a confident image tag.

Revision ID: 0002_listing_issues
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_listing_issues"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)

# The consumer contract (README, "Listing checks"): keep these columns stable.
_VIEW = """
CREATE VIEW listing_issues AS
SELECT m.sku,
       m.attribute,
       m.listed_values,
       m.listed_words,
       m.listed_in,
       m.image_value,
       tv.label_en AS image_label_en,
       tv.label_zh AS image_label_zh,
       m.confidence,
       'listing_mismatch' AS review_reason,
       i.title,
       i.category_hint,
       m.job_id,
       m.image_sha256,
       m.taxonomy_version,
       m.detected_at
FROM listing_mismatches m
LEFT JOIN items i ON i.sku = m.sku
LEFT JOIN taxonomy_values tv
       ON tv.taxonomy_version = m.taxonomy_version AND tv.attribute = m.attribute AND tv.value = m.image_value
"""


def upgrade() -> None:
    op.create_table(
        "listing_mismatches",
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("listed_values", sa.Text, nullable=False),
        sa.Column("listed_words", sa.Text, nullable=False),
        sa.Column("listed_in", sa.Text, nullable=False),
        sa.Column("image_value", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("image_sha256", sa.Text),
        sa.Column("taxonomy_version", sa.Text, nullable=False),
        sa.Column("detected_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("sku", "attribute", name="pk_listing_mismatches"),
    )
    op.execute(_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS listing_issues")
    op.drop_table("listing_mismatches")
