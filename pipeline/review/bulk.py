"""Bulk accept: the model's value of every open, not blind task of many items, set-based.

One INSERT ... SELECT per chunk of items into the review log; the database's triggers apply the
decisions, close the tasks and shrink the queue, set-wise. Items another reviewer holds are left
to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.db import review_items, translated_errors

_BULK_ACCEPT = """
INSERT INTO reviews (sku, attribute, action, value, value_before, image_sha256, job_id, taxonomy_version,
                     reason, reviewer, blind, reviewed_at)
SELECT t.sku, t.attribute, 'accept', g.value, g.value, t.image_sha256, t.job_id, g.taxonomy_version,
       t.reason, :reviewer, t.blind, :now
FROM review_tasks t
JOIN tags g ON g.sku = t.sku AND g.attribute = t.attribute
WHERE t.sku IN ({skus}) AND NOT t.blind
ORDER BY t.sku, t.attribute
RETURNING sku
"""


def unclaimed(conn: Connection, skus: Sequence[str], reviewer: str, now: datetime) -> list[str]:
    """The skus no other reviewer holds a live claim on. Postgres locks their items until the
    transaction ends, so nobody can claim one in between."""
    held: set[str] = set()
    for start in range(0, len(skus), 1000):
        chunk = list(skus[start : start + 1000])
        query = sa.select(review_items.c.sku, review_items.c.claimed_by, review_items.c.claimed_until).where(
            review_items.c.sku.in_(chunk)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(of=review_items)
        for row in conn.execute(query):
            until = row.claimed_until
            if until is not None and until.tzinfo is None:
                until = until.replace(tzinfo=now.tzinfo)
            if row.claimed_by not in (None, reviewer) and until is not None and until >= now:
                held.add(str(row.sku))
    return [sku for sku in skus if sku not in held]


def bulk_accept(conn: Connection, skus: Sequence[str], reviewer: str, now: datetime) -> list[str]:
    """Accept the model's value of every open, not blind task of skus, in one INSERT per 1,000
    skus (the database's triggers apply them set-wise). Returns the skus decided."""
    decided: set[str] = set()
    for start in range(0, len(skus), 1000):
        chunk = list(skus[start : start + 1000])
        if conn.dialect.name == "postgresql":
            statement = sa.text(_BULK_ACCEPT.format(skus="SELECT unnest(CAST(:skus AS text[]))"))
            params: dict[str, Any] = {"skus": chunk}
        else:
            statement = sa.text(_BULK_ACCEPT.format(skus="SELECT value FROM json_each(:skus)"))
            params = {"skus": json.dumps(chunk)}
        result = conn.execute(
            statement.bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True))),
            {**params, "reviewer": reviewer, "now": now},
        )
        decided.update(str(row[0]) for row in result)
    return sorted(decided)


BULK_CHUNK = 1000


def accept_in_chunks(engine: Engine, skus: Sequence[str], reviewer: str, now: datetime) -> tuple[list[str], int]:
    """Bulk accept in transactions of BULK_CHUNK items, each locking its items and leaving those
    another reviewer holds: (skus decided, skus held by others). Short transactions keep the
    item locks short while reviewers work beside a large bulk accept."""
    decided: list[str] = []
    held = 0
    for start in range(0, len(skus), BULK_CHUNK):
        chunk = skus[start : start + BULK_CHUNK]
        with translated_errors("accepting in bulk"), engine.begin() as conn:
            free = unclaimed(conn, chunk, reviewer, now)
            held += len(chunk) - len(free)
            decided += bulk_accept(conn, free, reviewer, now)
    return decided, held
