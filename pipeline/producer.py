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
from pipeline.errors import RetryableError, SkutagError
from pipeline.prompts import build_prompt
from pipeline.settings import Settings
from pipeline.sku_images import catalog_images, record_images
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
    try:
        _record_rows(rows, database, publisher, queue, report, on_chunk)
    except BaseException as exc:  # a bug, an outage, Ctrl-C: no run may stay open forever
        _seal_aborted(database, report, exc)
        raise
    with translated_errors("sealing the run"), database.begin() as conn:
        ledger.seal_run(conn, report.run_id)
    report.seconds = time.perf_counter() - started
    return report


def _record_rows(
    rows: Iterator[tuple[int, Any]],
    database: Engine,
    publisher: JobPublisher | None,
    queue: str,
    report: SubmitReport,
    on_chunk: Callable[[int], None] | None,
) -> None:
    deduplicator = Deduplicator()
    for chunk in chunks(rows, CHUNK_ROWS):
        good: list[tuple[ledger.CatalogRow, int]] = []  # (row, its position among the sku's images)
        for number, row in chunk:
            checked = row if isinstance(row, RowError) else deduplicator.check(number, row)
            if isinstance(checked, RowError):
                report.bad_rows.append(checked)
            else:
                good.append((checked, deduplicator.position(checked)))
        specs = _record(database, report.run_id, good, deduplicator, queue)
        report.accepted += len(specs)
        if publisher is not None and report.publish_error is None:
            _publish(database, publisher, specs, queue, report)
        if on_chunk:
            on_chunk(len(chunk))


def _seal_aborted(database: Engine, report: SubmitReport, exc: BaseException) -> None:
    """The submit stopped halfway: the jobs recorded so far are real (some may be tagged already),
    so the run is sealed with them and ends with its last job, and the error says so. If even that
    fails (the database is what went away), the error says how to seal it by hand."""
    reason = exc.message if isinstance(exc, SkutagError) else type(exc).__name__
    run = report.run_id
    note = {"submit_aborted": reason[:500], "jobs_recorded": report.accepted, "bad_rows": len(report.bad_rows)}
    try:
        with translated_errors("sealing the aborted run"), database.begin() as conn:
            if ledger.discard_empty_run(conn, report.run_id):
                said = "nothing was recorded"
            else:
                ledger.seal_open_run(conn, report.run_id, note)
                said = f"run {run} was sealed with the {report.accepted} jobs recorded before the submit stopped"
    except SkutagError:
        said = f"run {run} is still open: `skutag runs seal {run}` (or cancel) once the database is back"
    if isinstance(exc, SkutagError):
        exc.message = f"{exc.message}; {said}"
    exc.add_note(said)


def _record(
    database: Engine, run_id: int, rows: Sequence[tuple[ledger.CatalogRow, int]], deduplicator: Deduplicator, queue: str
) -> list[JobSpec]:
    """Items from each sku's first row, the images of skus with several, one job per image."""
    firsts = [row for row, position in rows if position == 0]
    with translated_errors("recording jobs"), database.begin() as conn:
        ledger.upsert_items(conn, firsts)
        record_images(conn, [row.sku for row in firsts], catalog_images(rows, deduplicator), ledger.utcnow())
        return ledger.add_jobs(conn, run_id, [(row.sku, row.image_uri) for row, _ in rows], queue=queue)


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
