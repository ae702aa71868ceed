"""Listing issues in the database: replaced with a sku's current tags, read back for export.

The writer calls record_listing_issues in the transaction that makes a result current, so the
issues always describe the tags consumers see: a new result for a sku replaces its old issues,
also with none when the new image agrees with the listing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.catalog_tables import listing_mismatches
from pipeline.listing import REVIEW_REASON, ListingChecker, ListingIssue
from schemas.results import TagResult

WORD_SEPARATOR = " | "


@dataclass(frozen=True)
class RecordedIssues:
    replaced: bool  # some of the skus had stored issues (so perhaps listing tasks) before
    stored: int  # issues stored now


def record_listing_issues(
    conn: Connection, checker: ListingChecker, current: Sequence[TagResult], now: datetime
) -> RecordedIssues:
    """Check each result that became its sku's current one against the sku's listing; replace the
    sku's stored issues with what the check finds."""
    if not current:
        return RecordedIssues(False, 0)
    listings, with_issues = _listings_and_stored_issues(conn, [result.sku for result in current])
    # Most skus have no stored issue: then there is nothing to delete (a round trip saved per batch).
    if with_issues:
        conn.execute(sa.delete(listing_mismatches).where(listing_mismatches.c.sku.in_(with_issues)))
    rows = [
        _row(result, issue, now)
        for result in current
        if result.sku in listings
        for issue in checker.check(listings[result.sku], result.attributes)
    ]
    if rows:
        conn.execute(sa.insert(listing_mismatches), rows)
    return RecordedIssues(bool(with_issues), len(rows))


# One round trip: the listings to check (title or category hint) and the skus with stored issues.
_LISTINGS_AND_STORED_ISSUES = """
SELECT sku, title, category_hint, 0 AS stored FROM items
WHERE sku IN :skus AND (title IS NOT NULL OR category_hint IS NOT NULL)
UNION ALL
SELECT DISTINCT sku, NULL, NULL, 1 FROM listing_mismatches WHERE sku IN :skus
"""


def _listings_and_stored_issues(
    conn: Connection, skus: Sequence[str]
) -> tuple[dict[str, dict[str, str | None]], list[str]]:
    query = sa.text(_LISTINGS_AND_STORED_ISSUES).bindparams(sa.bindparam("skus", expanding=True))
    listings: dict[str, dict[str, str | None]] = {}
    with_issues: list[str] = []
    for sku, title, hint, stored in conn.execute(query, {"skus": list(skus)}):
        if stored:
            with_issues.append(sku)
        else:
            listings[sku] = {"title": title, "category_hint": hint}
    return listings, with_issues


def _row(result: TagResult, issue: ListingIssue, now: datetime) -> dict[str, Any]:
    return {
        "sku": result.sku,
        "attribute": issue.attribute,
        "listed_values": ",".join(issue.listed_values),
        "listed_words": WORD_SEPARATOR.join(issue.listed_words),
        "listed_in": ",".join(issue.listed_in),
        "image_value": issue.image_value,
        "confidence": issue.confidence,
        "job_id": result.job_id,
        "image_sha256": result.image_sha256,
        "taxonomy_version": result.provenance.taxonomy_version,
        "detected_at": now,
    }


# --- the review queue -------------------------------------------------------------------------
_DROP_LISTING_TASKS = f"""
DELETE FROM review_tasks WHERE reason = '{REVIEW_REASON}' AND sku IN (SELECT sku FROM {{won}})
"""

# A listing issue asks a person which is right, the listing or the tag; one already decided for
# this image is not asked again. With a low-confidence task on the same attribute it is one task
# (one per sku and attribute), under this reason.
_OPEN_LISTING_TASKS = f"""
INSERT INTO review_tasks (sku, attribute, reason, confidence, job_id, image_sha256, blind, created_at)
SELECT m.sku, m.attribute, '{REVIEW_REASON}', m.confidence, m.job_id, m.image_sha256, {{false}}, :now
FROM listing_mismatches m
JOIN {{won}} w ON w.sku = m.sku
WHERE m.image_sha256 IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM review_decisions d
                  WHERE d.sku = m.sku AND d.attribute = m.attribute AND d.image_sha256 = m.image_sha256)
ORDER BY m.sku, m.attribute
ON CONFLICT (sku, attribute) DO NOTHING
"""


def open_listing_tasks(conn: Connection, now: datetime, recorded: RecordedIssues, won: str = "stage_won") -> None:
    """Replace the listing tasks of the skus in table `won` with their current issues. Runs before
    the review queue's own update (pipeline.review.tasks), which rebuilds the skus' queue items.
    A listing task is only ever opened from a stored issue, in the transaction that stores it: with
    no issue before (recorded.replaced) there is no task to drop, with none now none to open."""
    false = "false" if conn.dialect.name == "postgresql" else "0"
    if recorded.replaced:
        conn.execute(sa.text(_DROP_LISTING_TASKS.format(won=won)))
    if recorded.stored:
        conn.execute(sa.text(_OPEN_LISTING_TASKS.format(won=won, false=false)), {"now": now})


# --- reading ---------------------------------------------------------------------------------
EXPORT_COLUMNS = (
    "attribute", "listed_values", "listed_words", "listed_in", "image_value", "confidence", "decided_value",
)  # fmt: skip


def issues_by_sku(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Every stored issue from the listing_issues view, grouped by sku (issues are few: one map)."""
    query = sa.text(f"SELECT sku, {', '.join(EXPORT_COLUMNS)} FROM listing_issues ORDER BY sku, attribute")
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(query):
        grouped.setdefault(row[0], []).append(export_document(dict(zip(EXPORT_COLUMNS, row[1:], strict=True))))
    return grouped


def export_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """One issue as exported: lists for the list-valued columns."""
    return {
        "attribute": row["attribute"],
        "listed_values": _split(row["listed_values"], ","),
        "listed_words": _split(row["listed_words"], WORD_SEPARATOR),
        "listed_in": _split(row["listed_in"], ","),
        "image_value": row["image_value"],
        "confidence": row["confidence"],
        "review_reason": REVIEW_REASON,
        "decided_value": row["decided_value"],  # a reviewer's value for this image, if any
    }


def _split(text: str | None, separator: str) -> list[str]:
    return [part for part in (text or "").split(separator) if part]
