"""The result cache: a stored result is reused for the same image bytes under the same model,
prompt and taxonomy versions (results.cache_key). The writer fills it; workers read it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import results
from schemas.results import AttributeTag, Provenance, TagResult


def cached_results(conn: Connection, keys: Iterable[str]) -> dict[str, TagResult]:
    """The newest stored result per cache key (image sha256 + model/prompt/taxonomy versions)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    statement = (
        sa.select(results)
        .where(results.c.cache_key.in_(wanted), results.c.status != "failed")
        .order_by(results.c.produced_at)
    )
    found: dict[str, TagResult] = {}
    for row in conn.execute(statement):
        found[row.cache_key] = _stored_result(row)
    return found


def _stored_result(row: Any) -> TagResult:
    return TagResult(
        job_id=row.job_id,
        sku=row.sku,
        image_uri=row.image_uri,
        image_sha256=row.image_sha256,
        status=row.status,
        attributes={name: AttributeTag.model_validate(tag) for name, tag in row.attributes.items()},
        summary=row.summary,
        review_attributes=list(row.review_attributes),
        provenance=Provenance(
            model_id=row.model_id, model_revision=row.model_revision, quantization=row.quantization,
            prompt_version=row.prompt_version, taxonomy_version=row.taxonomy_version, run_id=row.run_id,
        ),
        produced_at=row.produced_at,
    )  # fmt: skip
