"""SKUs with several images in the database: their images (item_images), the merge of their
images' tags into the SKU's current tags, where each tag came from (tag_sources), and conflicts
sent to review.

A single-image SKU never touches any of this: it has no item_images rows and its current tags are
its newest result's, as they always were. For a SKU with several images, each image is a job of
its own; whenever one of them gets a result, the writer re-merges the SKU from the newest result
of each of its current images (pipeline.merge), in the same transaction. So a changed back image
re-tags only that image (the others are answered by the result cache) and re-merges the SKU.

What the SKU's rows then say:
- tags: the merged value per attribute; job_id is the job of the image it came from
- tag_sets: category and summary from the image whose category won; image_uri and job_id of the
  SKU's first image; image_sha256 (also in tags) a hash over all its images' bytes hashes, which
  review decisions are keyed on: a decision on a merged tag ends when any image changes,
  status needs_review when an attribute is in conflict or its winning image was unsure
- tag_sources: every image's answer per attribute, with its role (chosen, agrees, conflict,
  outranked, not_preferred): the consumer view sku_tag_sources
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.catalog import Deduplicator
from pipeline.catalog_tables import item_images, tag_sources
from pipeline.ledger import CatalogRow
from pipeline.listing import ListingChecker
from pipeline.listing_store import open_listing_tasks, record_listing_issues
from pipeline.merge import ImageTags, MergedTags, TagMerger
from pipeline.review.tasks import REBUILD_ITEMS
from schemas.results import AttributeTag, TagResult

CONFLICT_REASON = "conflict"


@dataclass(frozen=True)
class ImageRow:
    sku: str
    image_uri: str
    view: str | None
    position: int


# --- recording a catalog's images ------------------------------------------------------------
def catalog_images(rows: Sequence[tuple[CatalogRow, int]], deduplicator: Deduplicator) -> list[ImageRow]:
    """The item_images rows of a chunk of (row, position): a sku's second image also records its
    first (which may have come in an earlier chunk)."""
    images: list[ImageRow] = []
    for row, position in rows:
        if position == 1:
            uri, view = deduplicator.first_image(row.sku)
            images.append(ImageRow(row.sku, uri, view, 0))
        if position >= 1:
            images.append(ImageRow(row.sku, row.image_uri, row.view, position))
    return images


def record_images(conn: Connection, first_seen: Sequence[str], images: Sequence[ImageRow], now: datetime) -> None:
    """Forget the stored images of skus met for the first time in this catalog, then store the
    images of skus with several. A sku listed with one image has none stored: it is single again.
    An image listed again keeps its validators (ETag / Last-Modified), so the nightly content
    check stays a conditional fetch; one listed in a later chunk than its sku's first row does
    not, and is fetched in full once."""
    validators: dict[tuple[str, str], dict[str, str | None]] = {}
    if first_seen and conn.execute(sa.select(sa.literal(1)).select_from(item_images).limit(1)).first():
        validators = _validators(conn, first_seen)
        conn.execute(sa.delete(item_images).where(item_images.c.sku.in_(first_seen)))
    if images:
        rows = [
            {"sku": i.sku, "image_uri": i.image_uri, "view": i.view, "position": i.position, "updated_at": now,
             **validators.get((i.sku, i.image_uri), _NO_VALIDATORS)}
            for i in images
        ]  # fmt: skip
        conn.execute(sa.insert(item_images), rows)


_NO_VALIDATORS: dict[str, str | None] = {"image_etag": None, "image_last_modified": None}


def _validators(conn: Connection, skus: Sequence[str]) -> dict[tuple[str, str], dict[str, str | None]]:
    """The stored validators of skus' images (those that have any)."""
    c = item_images.c
    statement = sa.select(c.sku, c.image_uri, c.image_etag, c.image_last_modified).where(
        c.sku.in_(skus), sa.or_(c.image_etag.is_not(None), c.image_last_modified.is_not(None))
    )
    return {
        (row.sku, row.image_uri): {"image_etag": row.image_etag, "image_last_modified": row.image_last_modified}
        for row in conn.execute(statement)
    }


# --- merging ---------------------------------------------------------------------------------
_LATEST_RESULTS = """
SELECT r.sku, r.image_uri, r.job_id, r.image_sha256, r.attributes, r.review_attributes, r.summary,
       r.model_id, r.taxonomy_version, r.produced_at
FROM results r
JOIN item_images i ON i.sku = r.sku AND i.image_uri = r.image_uri
WHERE r.sku IN :skus AND r.status <> 'failed'
ORDER BY r.sku, r.image_uri, r.produced_at DESC, r.job_id DESC
"""

# The images of skus, and (image_uri NULL) which of them have tag sources: one round trip.
_IMAGES = """
SELECT sku, image_uri, view, position FROM item_images WHERE sku IN :skus
UNION ALL
SELECT DISTINCT sku, NULL, NULL, 0 FROM tag_sources WHERE sku IN :skus
"""
_SKUS: sa.BindParameter[Any] = sa.bindparam("skus", expanding=True)


@dataclass(frozen=True)
class _Latest:
    image: ImageTags
    model_id: str
    taxonomy_version: str
    produced_at: Any


def merge_sku_images(conn: Connection, merger: TagMerger, skus: Sequence[str], now: datetime) -> dict[str, MergedTags]:
    """Re-merge those of skus (the skus of a batch's new results) that have several images, from
    each image's newest result; returns their merged tags. Every image counts whatever order the
    results arrive in: a sku is re-merged for any new result of one of its images."""
    if not skus:
        return {}
    images: dict[str, dict[str, tuple[str | None, int]]] = {}
    with_sources: list[str] = []
    for sku, uri, view, position in conn.execute(sa.text(_IMAGES).bindparams(_SKUS), {"skus": list(skus)}):
        if uri is None:
            with_sources.append(sku)
        else:
            images.setdefault(sku, {})[uri] = (view, position)
    # Sources are rewritten below for the skus with several images; the others lose theirs (a
    # sku listed again with one image). Most skus have none: nothing to delete then.
    if with_sources:
        conn.execute(sa.delete(tag_sources).where(tag_sources.c.sku.in_(with_sources)))
    if not images:
        return {}
    latest: dict[str, dict[str, _Latest]] = {}
    for row in conn.execute(sa.text(_LATEST_RESULTS).bindparams(_SKUS), {"skus": sorted(images)}):
        per_sku = latest.setdefault(row.sku, {})
        if row.image_uri not in per_sku:
            view, position = images[row.sku][row.image_uri]
            per_sku[row.image_uri] = _Latest(_image_tags(row, view, position), row.model_id,
                                             row.taxonomy_version, row.produced_at)  # fmt: skip
    merged: dict[str, MergedTags] = {}
    for sku, per_image in latest.items():
        result = merger.merge([entry.image for entry in per_image.values()])
        if result is not None:
            merged[sku] = result
            _store(conn, sku, result, per_image, now)
    return merged


def _image_tags(row: Any, view: str | None, position: int) -> ImageTags:
    attributes = _json(row.attributes)
    return ImageTags(
        image_uri=row.image_uri, view=view, position=position, job_id=row.job_id, image_sha256=row.image_sha256,
        attributes={name: AttributeTag.model_validate(tag) for name, tag in attributes.items()},
        summary=row.summary, review_attributes=tuple(_json(row.review_attributes)),
    )  # fmt: skip


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _store(conn: Connection, sku: str, merged: MergedTags, per_image: Mapping[str, _Latest], now: datetime) -> None:
    anchor = merged.first  # the sku's first image; decisions compare merged.evidence_sha256 (all images)
    conn.execute(sa.text("DELETE FROM tags WHERE sku = :sku"), {"sku": sku})
    conn.execute(
        sa.text("""
        INSERT INTO tags (sku, attribute, value, confidence, runner_up, runner_up_confidence, job_id,
                          image_sha256, model_id, taxonomy_version, produced_at, updated_at)
        VALUES (:sku, :attribute, :value, :confidence, :runner_up, :runner_up_confidence, :job_id,
                :image_sha256, :model_id, :taxonomy_version, :produced_at, :now)"""),
        [
            {"sku": sku, "attribute": name, "value": m.tag.value, "confidence": m.tag.confidence,
             "runner_up": m.tag.runner_up, "runner_up_confidence": m.tag.runner_up_confidence,
             "job_id": m.source.job_id, "image_sha256": merged.evidence_sha256,
             "model_id": per_image[m.source.image_uri].model_id,
             "taxonomy_version": per_image[m.source.image_uri].taxonomy_version,
             "produced_at": per_image[m.source.image_uri].produced_at, "now": now}
            for name, m in merged.attributes.items()
        ],
    )  # fmt: skip
    conn.execute(
        sa.text("""
        UPDATE tag_sets SET job_id = :job_id, status = :status, category = :category, summary = :summary,
                            image_uri = :image_uri, image_sha256 = :image_sha256, updated_at = :now
        WHERE sku = :sku"""),
        {"sku": sku, "job_id": anchor.job_id, "category": merged.category, "summary": merged.lead.summary,
         "status": "needs_review" if merged.review_attributes else "tagged", "image_uri": anchor.image_uri,
         "image_sha256": merged.evidence_sha256, "now": now},
    )  # fmt: skip
    conn.execute(
        sa.insert(tag_sources),
        [
            {"sku": sku, "attribute": name, "image_uri": source.image.image_uri, "view": source.image.view,
             "position": source.image.position, "value": source.value, "confidence": source.confidence,
             "role": source.role, "job_id": source.image.job_id, "image_sha256": source.image.image_sha256,
             "updated_at": now}
            for name, m in merged.attributes.items()
            for source in m.sources
        ],
    )  # fmt: skip


# --- in the writer's transaction --------------------------------------------------------------
def merge_and_check_listings(
    conn: Connection,
    merger: TagMerger,
    listing: ListingChecker,
    batch: Sequence[TagResult],
    new_results: Sequence[Any],
    won: Sequence[Any],
    now: datetime,
) -> dict[str, MergedTags]:
    """After the batch's tags are in: re-merge its multi-image skus, then check the listings of
    every sku whose tags changed against those tags (merged ones for multi-image skus)."""
    merged = merge_sku_images(conn, merger, merge_candidates(batch, new_results), now)
    recorded = record_listing_issues(conn, listing, listing_input(batch, won, merged), now)
    open_listing_tasks(conn, now, recorded)
    return merged


def _as_merged(result: TagResult, merged: MergedTags) -> TagResult:
    """A multi-image sku's result as its listing is checked: merged tags, on its first image's job
    and the sku's evidence hash (what its review tasks and decisions are keyed on)."""
    return result.model_copy(
        update={"attributes": merged.tags, "job_id": merged.first.job_id, "image_sha256": merged.evidence_sha256}
    )


def merge_candidates(batch: Sequence[TagResult], new_results: Sequence[Any]) -> list[str]:
    """Skus with a new, not failed result in this batch: those of them with several images re-merge."""
    new = {row[0] for row in new_results}
    return sorted({r.sku for r in batch if r.job_id in new and r.status != "failed"})


def listing_input(batch: Sequence[TagResult], won: Sequence[Any], merged: dict[str, MergedTags]) -> list[TagResult]:
    """The results whose tags are now current, as the listing check should see them: for a sku
    with several images, its merged tags (also when this batch's image did not become current)."""
    by_job = {result.job_id: result for result in batch}
    current = {str(row[0]): by_job[row[1]] for row in won}
    for result in batch:
        if result.sku in merged and result.status != "failed":
            current.setdefault(result.sku, result)
    return [result if sku not in merged else _as_merged(result, merged[sku]) for sku, result in current.items()]


# --- conflicts to review ---------------------------------------------------------------------
_OPEN_CONFLICT = f"""
INSERT INTO review_tasks (sku, attribute, reason, confidence, job_id, image_sha256, blind, created_at)
SELECT s.sku, :attribute, '{CONFLICT_REASON}', :confidence, s.job_id, s.image_sha256, {{false}}, :now
FROM tag_sets s
WHERE s.sku = :sku AND s.image_sha256 IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM review_decisions d
                  WHERE d.sku = s.sku AND d.attribute = :attribute AND d.image_sha256 = s.image_sha256)
ON CONFLICT (sku, attribute) DO UPDATE SET reason = excluded.reason
"""


def open_conflict_tasks(conn: Connection, merged: Mapping[str, MergedTags], now: datetime) -> int:
    """A review task (reason `conflict`) per attribute on which a sku's confident images disagree;
    runs after the review queue's own update, then rebuilds the skus' queue items."""
    false = "false" if conn.dialect.name == "postgresql" else "0"
    params = [
        {"sku": sku, "attribute": name, "confidence": tags.attributes[name].tag.confidence, "now": now}
        for sku, tags in merged.items()
        for name in tags.conflicts
    ]
    if not params:
        return 0
    conn.execute(sa.text(_OPEN_CONFLICT.format(false=false)), params)
    skus = {"skus": sorted(merged)}
    conn.execute(sa.text("DELETE FROM review_items WHERE sku IN :skus").bindparams(_SKUS), skus)
    rebuild = REBUILD_ITEMS.format(won="(SELECT sku FROM tag_sets WHERE sku IN :skus) AS merged")
    conn.execute(sa.text(rebuild).bindparams(_SKUS), skus)
    return len(params)
