"""The producer: a catalog file in -> items upserted, a run, its jobs in the ledger -> published.

The ledger write comes first and is the commitment: if the broker is down, the jobs wait with no
published_at and `skutag reconcile` (or the writer's periodic reconciler) publishes them later.
Publishing is chunked (one message per batch_size jobs) over one connection, so a file goes into
Redis at tens of thousands of jobs per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.catalog import Deduplicator, RowError, chunks
from pipeline.db import translated_errors
from pipeline.errors import RetryableError
from pipeline.prompts import build_prompt
from pipeline.settings import Settings
from pipeline.worker import JobPublisher
from schemas.results import JobSpec
from schemas.taxonomy import Taxonomy

CHUNK_ROWS = 5000


@dataclass
class SubmitReport:
    run_id: int
    accepted: int = 0
    published: int = 0
    bad_rows: list[RowError] = field(default_factory=list)
    publish_error: str | None = None
    seconds: float = 0.0


def config_snapshot(settings: Settings, taxonomy: Taxonomy, use_cache: bool = True) -> dict[str, Any]:
    """What a run was asked to do with, stored with the run. use_cache False (`--no-cache`) makes
    the workers infer every image of the run instead of reusing stored model outputs."""
    prompt = build_prompt(taxonomy, settings.prompt_language, settings.summary_max_tokens)
    return {
        "model": settings.model,
        "model_revision": settings.model_revision,
        "quantization": settings.quantization,
        "prompt_version": prompt.version,
        "taxonomy_version": taxonomy.version,
        "taxonomy": taxonomy.name,
        "language": settings.prompt_language,
        "image_size": settings.image_size,
        "image_fit": settings.image_fit,
        "image_roots": [str(root.resolve()) for root in settings.image_roots],  # `run --resume` reads them back
        "use_cache": use_cache,
    }


def submit_catalog(
    rows: Iterator[tuple[int, Any]],
    database: Engine,
    settings: Settings,
    taxonomy: Taxonomy,
    publisher: JobPublisher | None,
    kind: str = "submit",
    queue: str = "new",
    on_chunk: Callable[[int], None] | None = None,
    use_cache: bool = True,
) -> SubmitReport:
    """Ledger first, then the broker. Bad rows are collected, good rows go ahead."""
    started = time.perf_counter()
    config = config_snapshot(settings, taxonomy, use_cache)
    with translated_errors("creating the run"), database.begin() as conn:
        report = SubmitReport(run_id=ledger.create_run(conn, kind, config))
    deduplicator = Deduplicator()
    for chunk in chunks(rows, CHUNK_ROWS):
        good: list[ledger.CatalogRow] = []
        for number, row in chunk:
            checked = row if isinstance(row, RowError) else deduplicator.check(number, row)
            if isinstance(checked, RowError):
                report.bad_rows.append(checked)
            else:
                good.append(checked)
        specs = _record(database, report.run_id, good, queue)
        report.accepted += len(specs)
        if publisher is not None and report.publish_error is None:
            _publish(database, publisher, specs, queue, report)
        if on_chunk:
            on_chunk(len(chunk))
    with translated_errors("sealing the run"), database.begin() as conn:
        ledger.seal_run(conn, report.run_id)
    report.seconds = time.perf_counter() - started
    return report


def _record(database: Engine, run_id: int, rows: Sequence[ledger.CatalogRow], queue: str) -> list[JobSpec]:
    with translated_errors("recording jobs"), database.begin() as conn:
        ledger.upsert_items(conn, rows)
        return ledger.add_jobs(conn, run_id, [(row.sku, row.image_uri) for row in rows], queue=queue)


def _publish(database: Engine, publisher: JobPublisher, specs: list[JobSpec], queue: str, report: SubmitReport) -> None:
    try:
        publisher.publish(specs, queue)
    except RetryableError as exc:
        report.publish_error = exc.message
        return
    with translated_errors("marking jobs published"), database.begin() as conn:
        ledger.mark_published(conn, [spec.job_id for spec in specs], publisher.epoch())
    report.published += len(specs)


def publish_jobs(database: Engine, publisher: JobPublisher, specs: Sequence[JobSpec], queue: str = "new") -> None:
    """Put jobs already in the ledger on the broker and mark them published. Raises RetryableError
    when the broker is down: the jobs stay queued, and the reconciler publishes them later."""
    publisher.publish(specs, queue)
    with translated_errors("marking jobs published"), database.begin() as conn:
        ledger.mark_published(conn, [spec.job_id for spec in specs], publisher.epoch())
