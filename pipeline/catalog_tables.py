"""Tables of the catalog features, on skutag's one metadata (pipeline.db imports this module):

listing_mismatches  where a listing's title or category hint contradicts a confident tag
                    (pipeline/listing_store.py; the view listing_issues)
item_images         the images of a sku with several (view, position, each image's ETag /
                    Last-Modified for the content check); single-image skus have none
                    (pipeline/sku_images.py)
tag_sources         for those skus: what each image said per attribute and what the merge made
                    of it (pipeline/sku_images.py; the view sku_tag_sources)
"""

from __future__ import annotations

import sqlalchemy as sa

from pipeline.db import BigId, Timestamp, metadata


def one_of(column: str, allowed: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in allowed)})"


listing_mismatches = sa.Table(
    "listing_mismatches",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("listed_values", sa.Text, nullable=False, doc="Value ids the listing names, comma-separated."),
    sa.Column("listed_words", sa.Text, nullable=False, doc="The listing's words that named them, ' | '-separated."),
    sa.Column("listed_in", sa.Text, nullable=False, doc="title, category_hint or both, comma-separated."),
    sa.Column("image_value", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("job_id", BigId, nullable=False),
    sa.Column("image_sha256", sa.Text),
    sa.Column("taxonomy_version", sa.Text, nullable=False),
    sa.Column("detected_at", Timestamp, nullable=False),
)

item_images = sa.Table(
    "item_images",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("image_uri", sa.Text, primary_key=True),
    sa.Column("view", sa.Text, doc="front, back, detail, ... as the catalog names it (lower case)"),
    sa.Column("position", sa.Integer, nullable=False, doc="0 is the sku's first image, items.image_uri"),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("image_etag", sa.Text, doc="validators of the content check's last fetch of this image"),
    sa.Column("image_last_modified", sa.Text),
)

tag_sources = sa.Table(
    "tag_sources",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("image_uri", sa.Text, primary_key=True),
    sa.Column("view", sa.Text),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("job_id", BigId, nullable=False),
    sa.Column("image_sha256", sa.Text),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.CheckConstraint(one_of("role", ("chosen", "agrees", "conflict", "outranked", "not_preferred")), name="role"),
)
