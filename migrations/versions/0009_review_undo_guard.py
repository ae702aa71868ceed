"""The review log's apply trigger looks for undo rows before deleting decisions.

Its DELETE FROM review_decisions ran for every insert, planned from statistics taken while the
table was nearly empty: a scan of every decision per inserted row, so each bulk accept cost more
than the one before (a chunk of 1,000 items: 0.14 s on an empty log, 2.2 s after 3,000 items on
a 60,000-item queue). Only an undo back to the model's value deletes a decision; the statement
now runs only when the statement inserted one.

Revision ID: 0009_review_undo_guard
Revises: 0008_stale_tags
Create Date: 2026-12-04
"""

from collections.abc import Sequence
from importlib import import_module

from alembic import op

revision: str = "0009_review_undo_guard"
down_revision: str | None = "0008_stale_tags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GUARD = """    IF EXISTS (SELECT 1 FROM inserted WHERE value IS NULL) THEN
        DELETE FROM review_decisions d
            USING (SELECT DISTINCT ON (sku, attribute) * FROM inserted ORDER BY sku, attribute, id DESC) n
            WHERE d.sku = n.sku AND d.attribute = n.attribute AND n.value IS NULL;
    END IF;
"""
_UNGUARDED = """    DELETE FROM review_decisions d
        USING (SELECT DISTINCT ON (sku, attribute) * FROM inserted ORDER BY sku, attribute, id DESC) n
        WHERE d.sku = n.sku AND d.attribute = n.attribute AND n.value IS NULL;
"""


def _apply_function() -> str:
    statements = import_module("migrations.versions.0003_review_log")._PG_TRIGGERS
    (definition,) = [s for s in statements if "CREATE FUNCTION skutag_reviews_apply()" in s]
    assert _UNGUARDED in definition
    return str(definition).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")


# CREATE OR REPLACE drops the function's settings: keep 0007's plan setting.
_PLAN = "ALTER FUNCTION skutag_reviews_apply() SET enable_seqscan = off"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_apply_function().replace(_UNGUARDED, _GUARD))
        op.execute(_PLAN)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_apply_function())
        op.execute(_PLAN)
