"""The review log's Postgres triggers plan by index, never by scanning the queue.

A trigger's transition table has no statistics, so the planner guesses its size and, against a
queue of 100,000 items, chose to hash whole tables (review_tasks, review_items) for a statement
that touches a thousand rows: a bulk accept of 10,000 items took 30 s instead of 3. With
sequential scans off inside the two trigger functions only, every statement there is driven by
the inserted rows through the primary keys: 3,000 items 3.7 s -> 0.7 s (300k results, 60k queued).

Revision ID: 0007_review_trigger_plans
Revises: 0006_sku_images
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_review_trigger_plans"
down_revision: str | None = "0006_sku_images"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = ("skutag_reviews_validate", "skutag_reviews_apply")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite's row triggers probe by primary key already
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function}() SET enable_seqscan = off")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function}() RESET enable_seqscan")
