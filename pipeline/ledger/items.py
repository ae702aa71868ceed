"""Catalog items in the ledger: upserts from catalog files or a source query, and the stored
HTTP validators (ETag / Last-Modified) the backfill's content check uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import copy_rows, insert_for, items
from pipeline.ledger.common import staging, utcnow


@dataclass(frozen=True)
class CatalogRow:
    """One row of a catalog file: one image of a SKU and what we know about the SKU. A SKU with
    several images has several rows (the first one's title and category hint are the SKU's)."""

    sku: str
    image_uri: str
    title: str | None = None
    category_hint: str | None = None
    view: str | None = None  # front, back, detail, ... (lower case)


_STAGE_ITEMS = """
CREATE TEMP TABLE IF NOT EXISTS stage_items (sku text, image_uri text, title text, category_hint text)
ON COMMIT DELETE ROWS"""

_UPSERT_STAGED_ITEMS = sa.text("""
INSERT INTO items (sku, image_uri, title, category_hint, created_at, updated_at)
SELECT DISTINCT ON (sku) sku, image_uri, title, category_hint, :now, :now FROM stage_items ORDER BY sku
ON CONFLICT (sku) DO UPDATE SET
    image_uri = excluded.image_uri, title = excluded.title, category_hint = excluded.category_hint,
    updated_at = excluded.updated_at, retired_at = NULL
WHERE items.image_uri <> excluded.image_uri
   OR items.title IS DISTINCT FROM excluded.title
   OR items.category_hint IS DISTINCT FROM excluded.category_hint
   OR items.retired_at IS NOT NULL
""").bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))


def upsert_items(conn: Connection, rows: Sequence[CatalogRow], now: datetime | None = None) -> None:
    """Insert or refresh catalog items; updated_at moves only when something changed. A retired
    item listed again is retired no more.
    Postgres: COPY into a staging table + one INSERT ... ON CONFLICT (a row-by-row executemany
    managed ~5,000 rows/s); SQLite: executemany."""
    if not rows:
        return
    now = now or utcnow()
    if conn.dialect.name == "postgresql":
        staging(conn, _STAGE_ITEMS, "stage_items")
        copy_rows(conn, "stage_items", ("sku", "image_uri", "title", "category_hint"),
                  ((r.sku, r.image_uri, r.title, r.category_hint) for r in rows))  # fmt: skip
        conn.execute(_UPSERT_STAGED_ITEMS, {"now": now})
        return
    insert = insert_for(conn)(items)
    changed = sa.or_(
        items.c.image_uri != insert.excluded.image_uri,
        items.c.title.is_distinct_from(insert.excluded.title),
        items.c.category_hint.is_distinct_from(insert.excluded.category_hint),
        items.c.retired_at.is_not(None),  # listed again: back in the views and the plan
    )
    statement = insert.on_conflict_do_update(
        index_elements=[items.c.sku],
        set_={
            "image_uri": insert.excluded.image_uri,
            "title": insert.excluded.title,
            "category_hint": insert.excluded.category_hint,
            "updated_at": insert.excluded.updated_at,
            "retired_at": None,
        },
        where=changed,
    )
    unique = {row.sku: row for row in rows}  # the last row for a sku wins, as in the file
    conn.execute(
        statement,
        [
            {"sku": r.sku, "image_uri": r.image_uri, "title": r.title, "category_hint": r.category_hint,
             "created_at": now, "updated_at": now}
            for r in unique.values()
        ],
    )  # fmt: skip


# One row per image to check. A single-image sku: its item (validators on items). A sku with
# several images: each of them (validators on item_images), with the hash of the bytes it was last
# tagged from (NULL for an image never tagged: the plan re-tags the sku for it anyway).
_TAGGED_ITEMS = sa.text("""
    WITH page AS (
        SELECT i.sku, i.image_uri, i.image_etag, i.image_last_modified,
               -- a sku listed again with one image keeps its evidence hash in tag_sets until re-merged
               COALESCE((SELECT max(ts.image_sha256) FROM tag_sources ts
                         WHERE ts.sku = i.sku AND ts.image_uri = i.image_uri), t.image_sha256) AS image_sha256
        FROM items i JOIN tag_sets t ON t.sku = i.sku AND t.image_uri = i.image_uri
        WHERE i.sku > :after ORDER BY i.sku LIMIT :page)
    SELECT p.sku, p.image_uri, p.image_etag, p.image_last_modified, p.image_sha256, NULL AS position
    FROM page p WHERE NOT EXISTS (SELECT 1 FROM item_images ii WHERE ii.sku = p.sku)
    UNION ALL
    SELECT ii.sku, ii.image_uri, ii.image_etag, ii.image_last_modified,
           COALESCE((SELECT max(ts.image_sha256) FROM tag_sources ts
                     WHERE ts.sku = ii.sku AND ts.image_uri = ii.image_uri),
                    (SELECT r.image_sha256 FROM results r
                     WHERE r.sku = ii.sku AND r.image_uri = ii.image_uri AND r.status <> 'failed'
                     ORDER BY r.produced_at DESC, r.job_id DESC LIMIT 1)) AS image_sha256,
           ii.position
    FROM page p JOIN item_images ii ON ii.sku = p.sku
    ORDER BY 1, 6""")


def tagged_items_page(conn: Connection, after: str, page: int) -> list[Any]:
    """The images of the next `page` items whose current tags came from their current image URI,
    in sku order after `after`: rows of (sku, image_uri, image_etag, image_last_modified,
    image_sha256, position); position is NULL for a single-image sku, whose row is its item."""
    return list(conn.execute(_TAGGED_ITEMS, {"after": after, "page": page}).all())


def store_validators(conn: Connection, validators: Sequence[tuple[str, str | None, str | None]]) -> None:
    """Remember each (sku, etag, last_modified) for the next conditional fetch; one executemany."""
    if validators:
        conn.execute(
            sa.text("UPDATE items SET image_etag = :e, image_last_modified = :m WHERE sku = :s"),
            [{"s": sku, "e": etag, "m": modified} for sku, etag, modified in validators],
        )


def store_image_validators(conn: Connection, validators: Sequence[tuple[str, str, str | None, str | None]]) -> None:
    """The same for the images of skus with several: (sku, image_uri, etag, last_modified)."""
    if validators:
        conn.execute(
            sa.text(
                "UPDATE item_images SET image_etag = :e, image_last_modified = :m WHERE sku = :s AND image_uri = :u"
            ),
            [{"s": sku, "u": uri, "e": etag, "m": modified} for sku, uri, etag, modified in validators],
        )


# --- retiring delisted items -----------------------------------------------------------------
# The skus a catalog refresh saw, per connection (no key on Postgres: COPY takes duplicates).
_SEEN = {
    "postgresql": "CREATE TEMP TABLE IF NOT EXISTS catalog_seen (sku text)",
    "sqlite": "CREATE TEMP TABLE IF NOT EXISTS catalog_seen (sku TEXT PRIMARY KEY)",
}


def reset_catalog_seen(conn: Connection) -> None:
    conn.exec_driver_sql(_SEEN[conn.dialect.name])
    conn.exec_driver_sql("DELETE FROM catalog_seen")


def add_catalog_seen(conn: Connection, skus: Sequence[str]) -> None:
    if not skus:
        return
    if conn.dialect.name == "postgresql":
        copy_rows(conn, "catalog_seen", ("sku",), [(sku,) for sku in skus])
    else:
        conn.exec_driver_sql("INSERT OR IGNORE INTO catalog_seen (sku) VALUES (?)", [(sku,) for sku in skus])


def retired_count(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).where(items.c.retired_at.is_not(None))).scalar_one())


def retire_missing(conn: Connection, now: datetime | None = None) -> int:
    """Retire the items the refresh did not see; how many. (Those it saw are retired no more: the
    upsert brings them back.) A retired item leaves the consumer views and the backfill's plan;
    nothing is deleted."""
    seen = sa.text("SELECT sku FROM catalog_seen").columns(sa.column("sku", sa.Text))
    statement = (
        sa.update(items)
        .where(items.c.retired_at.is_(None), items.c.sku.not_in(seen))
        .values(retired_at=now or utcnow())
    )
    return int(conn.execute(statement).rowcount or 0)
