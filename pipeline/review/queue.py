"""The review queue as a reviewer sees it: filtered pages (lowest confidence first, keyset
pagination), counts, short claims so two reviewers never hold the same item, one item's tags, and
bulk accept of everything a filter matches.

A page is one index range scan whatever the queue's size: the cursor is the last row's
(confidence, sku), never an OFFSET. With an attribute filter the order is that attribute's
confidence (review_tasks' index); otherwise the item's lowest open confidence (review_items').
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import (
    items,
    review_decisions,
    review_items,
    review_tasks,
    reviews,
    tag_sets,
    tags,
    taxonomy_values,
)

CLAIM_SECONDS = 120  # long enough to decide an item, short enough that a closed tab frees it soon
PAGE_SIZE = 50


@dataclass(frozen=True)
class QueueFilter:
    run_id: int | None = None
    category: str | None = None
    attribute: str | None = None
    reason: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None

    def as_params(self) -> dict[str, str]:
        """The filter as query-string parameters (only those set)."""
        values = {
            "run": self.run_id, "category": self.category, "attribute": self.attribute, "reason": self.reason,
            "min": self.min_confidence, "max": self.max_confidence,
        }  # fmt: skip
        return {name: str(value) for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class Cursor:
    confidence: float
    sku: str

    def encode(self) -> str:
        return f"{self.confidence!r}~{self.sku}"

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        if not text or "~" not in text:
            return None
        confidence, _, sku = text.partition("~")
        try:
            return cls(float(confidence), sku)
        except ValueError:
            return None


@dataclass(frozen=True)
class QueueRow:
    sku: str
    confidence: float
    open_tasks: int
    category: str | None
    run_id: int
    title: str | None
    claimed_by: str | None
    claimed_until: datetime | None


@dataclass
class QueuePage:
    rows: list[QueueRow]
    next_cursor: Cursor | None


@dataclass
class QueueCounts:
    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_attribute: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, int] = field(default_factory=dict)


# --- listing ---------------------------------------------------------------------------------
def _ordered_source(flt: QueueFilter) -> tuple[Any, Any]:
    """(the selectable, its confidence column): tasks of one attribute, or whole items."""
    if flt.attribute is None:
        return review_items, review_items.c.min_confidence
    joined = review_tasks.join(review_items, review_items.c.sku == review_tasks.c.sku)
    return joined, review_tasks.c.confidence


def _conditions(flt: QueueFilter, confidence: Any) -> list[Any]:
    conditions: list[Any] = []
    if flt.attribute is not None:
        conditions.append(review_tasks.c.attribute == flt.attribute)
        if flt.reason is not None:
            conditions.append(review_tasks.c.reason == flt.reason)
    elif flt.reason is not None:
        conditions.append(
            sa.exists().where(review_tasks.c.sku == review_items.c.sku, review_tasks.c.reason == flt.reason)
        )
    if flt.run_id is not None:
        conditions.append(review_items.c.run_id == flt.run_id)
    if flt.category is not None:
        conditions.append(review_items.c.category == flt.category)
    if flt.min_confidence is not None:
        conditions.append(confidence >= flt.min_confidence)
    if flt.max_confidence is not None:
        conditions.append(confidence <= flt.max_confidence)
    return conditions


def list_page(conn: Connection, flt: QueueFilter, after: Cursor | None = None, limit: int = PAGE_SIZE) -> QueuePage:
    source, confidence = _ordered_source(flt)
    query = (
        sa.select(
            review_items.c.sku,
            confidence.label("confidence"),
            review_items.c.open_tasks,
            review_items.c.category,
            review_items.c.run_id,
            review_items.c.claimed_by,
            review_items.c.claimed_until,
        )
        .select_from(source)
        .where(*_conditions(flt, confidence))
        .order_by(confidence, review_items.c.sku)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(sa.tuple_(confidence, review_items.c.sku) > sa.tuple_(after.confidence, after.sku))
    found = list(conn.execute(query))
    titles = _titles(conn, [row.sku for row in found[:limit]])
    rows = [
        QueueRow(row.sku, row.confidence, row.open_tasks, row.category, row.run_id, titles.get(row.sku),
                 row.claimed_by, row.claimed_until)
        for row in found[:limit]
    ]  # fmt: skip
    next_cursor = Cursor(rows[-1].confidence, rows[-1].sku) if len(found) > limit else None
    return QueuePage(rows, next_cursor)


def _titles(conn: Connection, skus: Sequence[str]) -> dict[str, str | None]:
    if not skus:
        return {}
    query = sa.select(items.c.sku, items.c.title).where(items.c.sku.in_(skus))
    return {row.sku: row.title for row in conn.execute(query)}


def count(conn: Connection, flt: QueueFilter) -> QueueCounts:
    """How many items match flt, and how the open tasks split by reason, attribute and category.
    Plain counts: with an attribute filter a task row is one sku (the key is sku, attribute)."""
    source, confidence = _ordered_source(flt)
    total_query = sa.select(sa.func.count()).select_from(source).where(*_conditions(flt, confidence))
    counts = QueueCounts(total=conn.execute(total_query).scalar_one())
    tasks_only = QueueFilter(**{**flt.__dict__, "attribute": None, "reason": None})
    scope: Any = review_tasks
    if flt.run_id is not None or flt.category is not None:  # item columns: join the items
        scope = review_tasks.join(review_items, review_items.c.sku == review_tasks.c.sku)
    for column, target in ((review_tasks.c.reason, counts.by_reason), (review_tasks.c.attribute, counts.by_attribute)):
        query = sa.select(column, sa.func.count()).select_from(scope)
        query = query.where(*_task_conditions(tasks_only)).group_by(column)
        target.update({str(key): int(number) for key, number in conn.execute(query)})
    no_category = QueueFilter(**{**flt.__dict__, "category": None})
    source, confidence = _ordered_source(no_category)
    by_category = (
        sa.select(review_items.c.category, sa.func.count())
        .select_from(source)
        .where(*_conditions(no_category, confidence))
        .group_by(review_items.c.category)
    )
    counts.by_category = {str(key): int(number) for key, number in conn.execute(by_category)}
    return counts


def _task_conditions(flt: QueueFilter) -> list[Any]:
    conditions: list[Any] = []
    if flt.run_id is not None:
        conditions.append(review_items.c.run_id == flt.run_id)
    if flt.category is not None:
        conditions.append(review_items.c.category == flt.category)
    if flt.min_confidence is not None:
        conditions.append(review_tasks.c.confidence >= flt.min_confidence)
    if flt.max_confidence is not None:
        conditions.append(review_tasks.c.confidence <= flt.max_confidence)
    return conditions


# --- claims ----------------------------------------------------------------------------------
def claim(conn: Connection, sku: str, reviewer: str, now: datetime) -> str | None:
    """Claim sku for reviewer. Returns None when claimed, else who holds it (or '' if not queued)."""
    until = now + timedelta(seconds=CLAIM_SECONDS)
    free = sa.or_(
        review_items.c.claimed_by.is_(None),
        review_items.c.claimed_by == reviewer,
        review_items.c.claimed_until < now,
    )
    updated = conn.execute(
        review_items.update()
        .where(review_items.c.sku == sku, free)
        .values(claimed_by=reviewer, claimed_until=until)
        .returning(review_items.c.sku)
    ).first()
    if updated is not None:
        return None
    holder = conn.execute(sa.select(review_items.c.claimed_by).where(review_items.c.sku == sku)).first()
    return "" if holder is None else str(holder.claimed_by)


def claim_next(
    conn: Connection, flt: QueueFilter, reviewer: str, now: datetime, after: Cursor | None = None
) -> str | None:
    """Claim the first unclaimed item of flt (after cursor) for reviewer; its sku, or None.
    Postgres skips rows another transaction is claiming (SKIP LOCKED) instead of waiting."""
    source, confidence = _ordered_source(flt)
    free = sa.or_(
        review_items.c.claimed_by.is_(None), review_items.c.claimed_by == reviewer, review_items.c.claimed_until < now
    )
    query = (
        sa.select(review_items.c.sku)
        .select_from(source)
        .where(*_conditions(flt, confidence), free)
        .order_by(confidence, review_items.c.sku)
        .limit(1)
    )
    if after is not None:
        query = query.where(sa.tuple_(confidence, review_items.c.sku) > sa.tuple_(after.confidence, after.sku))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=review_items, skip_locked=True)
    for _ in range(3):  # SQLite: another writer may claim between the read and the update
        row = conn.execute(query).first()
        if row is None:
            return None
        if claim(conn, row.sku, reviewer, now) is None:
            return str(row.sku)
    return None


def release(conn: Connection, sku: str, reviewer: str) -> None:
    conn.execute(
        review_items.update()
        .where(review_items.c.sku == sku, review_items.c.claimed_by == reviewer)
        .values(claimed_by=None, claimed_until=None)
    )


def holder(conn: Connection, sku: str, reviewer: str, now: datetime) -> str | None:
    """Who else holds a live claim on sku (None: nobody, or reviewer)."""
    row = conn.execute(
        sa.select(review_items.c.claimed_by, review_items.c.claimed_until).where(review_items.c.sku == sku)
    ).first()
    if row is None or row.claimed_by in (None, reviewer) or row.claimed_until is None:
        return None
    until = row.claimed_until if row.claimed_until.tzinfo else row.claimed_until.replace(tzinfo=now.tzinfo)
    return str(row.claimed_by) if until > now else None


# --- one item --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttributeView:
    name: str
    value: str
    confidence: float
    runner_up: str | None
    runner_up_confidence: float | None
    decided_value: str | None
    decided_by: str | None
    task_reason: str | None
    blind: bool


@dataclass(frozen=True)
class ItemView:
    sku: str
    title: str | None
    category: str | None
    job_id: int
    image_sha256: str | None
    image_uri: str | None
    taxonomy_version: str
    attributes: list[AttributeView]
    claimed_by: str | None

    @property
    def open_attributes(self) -> list[str]:
        return [a.name for a in self.attributes if a.task_reason is not None]


def load_item(conn: Connection, sku: str) -> ItemView | None:
    head = conn.execute(
        sa.select(
            tag_sets.c.sku,
            tag_sets.c.category,
            tag_sets.c.job_id,
            tag_sets.c.image_sha256,
            tag_sets.c.image_uri,
            tag_sets.c.taxonomy_version,
            items.c.title,
            review_items.c.claimed_by,
        )
        .outerjoin(items, items.c.sku == tag_sets.c.sku)
        .outerjoin(review_items, review_items.c.sku == tag_sets.c.sku)
        .where(tag_sets.c.sku == sku)
    ).first()
    if head is None:
        return None
    decision = sa.and_(
        review_decisions.c.sku == tags.c.sku,
        review_decisions.c.attribute == tags.c.attribute,
        review_decisions.c.image_sha256 == tags.c.image_sha256,
    )
    task = sa.and_(review_tasks.c.sku == tags.c.sku, review_tasks.c.attribute == tags.c.attribute)
    query = (
        sa.select(
            tags.c.attribute,
            tags.c.value,
            tags.c.confidence,
            tags.c.runner_up,
            tags.c.runner_up_confidence,
            review_decisions.c.value.label("decided"),
            review_decisions.c.reviewer,
            review_tasks.c.reason,
            review_tasks.c.blind,
        )
        .select_from(tags.outerjoin(review_decisions, decision).outerjoin(review_tasks, task))
        .where(tags.c.sku == sku)
    )
    attributes = [
        AttributeView(row.attribute, row.value, row.confidence, row.runner_up, row.runner_up_confidence,
                      row.decided, row.reviewer, row.reason, bool(row.blind))
        for row in conn.execute(query)
    ]  # fmt: skip
    return ItemView(
        sku=head.sku,
        title=head.title,
        category=head.category,
        job_id=head.job_id,
        image_sha256=head.image_sha256,
        image_uri=head.image_uri,
        taxonomy_version=head.taxonomy_version,
        attributes=attributes,
        claimed_by=head.claimed_by,
    )


def labels(conn: Connection, taxonomy_version: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(attribute, value) -> (label_en, label_zh) for one taxonomy version."""
    query = sa.select(
        taxonomy_values.c.attribute, taxonomy_values.c.value, taxonomy_values.c.label_en, taxonomy_values.c.label_zh
    ).where(taxonomy_values.c.taxonomy_version == taxonomy_version)
    return {(row.attribute, row.value): (row.label_en, row.label_zh) for row in conn.execute(query)}


def image_of(conn: Connection, sku: str) -> tuple[str, str | None] | None:
    """The image uri and sha256 of a sku with current tags: the only images the app serves."""
    row = conn.execute(sa.select(tag_sets.c.image_uri, tag_sets.c.image_sha256).where(tag_sets.c.sku == sku)).first()
    if row is None or not row.image_uri:
        return None
    return str(row.image_uri), row.image_sha256


# --- bulk accept: selection (the accepting is pipeline/review/bulk.py) ---------------------------
def matching_skus(conn: Connection, flt: QueueFilter, limit: int) -> list[str]:
    """Every sku flt matches, lowest confidence first, up to limit."""
    source, confidence = _ordered_source(flt)
    query = (
        sa.select(review_items.c.sku)
        .select_from(source)
        .where(*_conditions(flt, confidence))
        .order_by(confidence, review_items.c.sku)
        .limit(limit)
    )
    return list(dict.fromkeys(str(row.sku) for row in conn.execute(query)))


def last_decision_of(conn: Connection, reviewer: str) -> Any:
    return conn.execute(
        sa.select(reviews).where(reviews.c.reviewer == reviewer).order_by(reviews.c.id.desc()).limit(1)
    ).first()
