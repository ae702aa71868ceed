"""Each image of a sku with several keeps its own HTTP validators (ETag / Last-Modified), so the
backfill's content check can re-fetch every image conditionally, not the first alone (whose
validators, like a single-image sku's, stay on items).

Revision ID: 0011_image_validators
Revises: 0010_not_visible
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_image_validators"
down_revision: str | None = "0010_not_visible"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, not batch mode: on SQLite a batch rebuild of item_images would break the
# consumer views that name it (sku_tags_current, sku_tags_json).
def upgrade() -> None:
    op.add_column("item_images", sa.Column("image_etag", sa.Text))
    op.add_column("item_images", sa.Column("image_last_modified", sa.Text))


def downgrade() -> None:
    op.drop_column("item_images", "image_last_modified")
    op.drop_column("item_images", "image_etag")
