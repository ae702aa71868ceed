"""Listing issues go to the review queue: the reason 'listing_mismatch', and the listing_issues
view shows a reviewer's decision on the same image (decided_value).

Revision ID: 0004_listing_review
Revises: 0003_review_log
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_listing_review"
down_revision: str | None = "0003_review_log"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REASON = "listing_mismatch"
DESCRIPTION = "the listing title or category hint names another value than a confident tag"

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
       d.value AS decided_value,
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
LEFT JOIN review_decisions d
       ON d.sku = m.sku AND d.attribute = m.attribute AND d.image_sha256 = m.image_sha256
"""

_PREVIOUS_VIEW = """
CREATE VIEW listing_issues AS
SELECT m.sku, m.attribute, m.listed_values, m.listed_words, m.listed_in, m.image_value,
       tv.label_en AS image_label_en, tv.label_zh AS image_label_zh, m.confidence,
       'listing_mismatch' AS review_reason, i.title, i.category_hint, m.job_id, m.image_sha256,
       m.taxonomy_version, m.detected_at
FROM listing_mismatches m
LEFT JOIN items i ON i.sku = m.sku
LEFT JOIN taxonomy_values tv
       ON tv.taxonomy_version = m.taxonomy_version AND tv.attribute = m.attribute AND tv.value = m.image_value
"""


def upgrade() -> None:
    op.execute(f"INSERT INTO review_reasons (reason, description) VALUES ('{REASON}', '{DESCRIPTION}')")
    op.execute("DROP VIEW listing_issues")
    op.execute(_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW listing_issues")
    op.execute(_PREVIOUS_VIEW)
    op.execute(f"DELETE FROM review_tasks WHERE reason = '{REASON}'")
    # A review recorded with this reason keeps it: the log is append-only.
    op.execute(f"DELETE FROM review_reasons WHERE reason = '{REASON}' AND NOT EXISTS "
               f"(SELECT 1 FROM reviews r WHERE r.reason = '{REASON}')")  # fmt: skip
