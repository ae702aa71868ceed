"""Thresholds chosen from data (`skutag eval --recommend-thresholds --write`): per attribute, the
confidence at or above which the writer publishes a tag without review, with the evidence.

Revision ID: 0005_review_thresholds
Revises: 0004_listing_review
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_review_thresholds"
down_revision: str | None = "0004_listing_review"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "review_thresholds",
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("target_precision", sa.Float, nullable=False),
        sa.Column("precision", sa.Float),
        sa.Column("coverage", sa.Float, nullable=False),
        sa.Column("evidence_n", sa.Integer, nullable=False),
        sa.Column("set_by", sa.Text, nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("threshold >= 0 AND threshold <= 1", name="ck_review_thresholds_range"),
        sa.PrimaryKeyConstraint("attribute", name="pk_review_thresholds"),
    )


def downgrade() -> None:
    op.drop_table("review_thresholds")
