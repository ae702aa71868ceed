"""Local mode (`skutag run FILE`): the same stages as the distributed pipeline, in one process, with
no broker. The ledger is still the truth (SQLite by default, or any configured database), so a run
stopped halfway and started again with `skutag run --resume RUN` finishes what is left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import translated_errors
from pipeline.failures import counts_by_code
from pipeline.images import ImageIntake
from pipeline.inference import BatchStats, TaggingEngine, load_model
from pipeline.listing import ListingChecker
from pipeline.migrate import open_database
from pipeline.producer import SubmitReport, submit_catalog
from pipeline.routing import Thresholds
from pipeline.runner import tag_batch
from pipeline.secrets import SecretMaskingFilter
from pipeline.settings import Settings, taxonomy_for
from pipeline.status import run_status
from pipeline.worker import HandleReport, JobHandler
from pipeline.writer import ResultWriter, WriterSink
from schemas.results import JobSpec, TagResult


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Local mode's log: an unexpected item error's traceback (logged once, with the job id and
    sku) goes to this file, never to the terminal the user is reading progress on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretMaskingFilter())
    loggers = [logging.getLogger(name) for name in ("skutag", "pipeline")]
    before = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in zip(loggers, before, strict=True):
            logger.removeHandler(handler)
            logger.propagate = propagate
        handler.close()


@dataclass
class LocalReport:
    run_id: int
    handled: int = 0
    cache_hits: int = 0
    stats: list[BatchStats] = field(default_factory=list)
    seconds: float = 0.0


def open_jobs(database: Engine, run_id: int, after_id: int, limit: int) -> list[JobSpec]:
    with translated_errors("reading jobs"), database.connect() as conn:
        return ledger.open_jobs(conn, run_id, after_id, limit)


def run_jobs(
    handler: JobHandler,
    writer: ResultWriter,
    run_id: int,
    on_progress: Callable[[HandleReport], None] | None = None,
) -> LocalReport:
    """Work through every open job of the run; two deliveries in flight, so intake of the next
    overlaps the engine on this one. Retries come round again until their attempts run out."""
    started = time.perf_counter()
    report = LocalReport(run_id=run_id)
    sink = WriterSink(writer)
    size = handler.options.batch_size
    for _sweep in range(handler.options.max_attempts + 1):
        after, in_flight = 0, []
        with ThreadPoolExecutor(2, thread_name_prefix="skutag-local") as pool:
            while batch := open_jobs(handler.database, run_id, after, size):
                after = batch[-1].job_id
                in_flight.append(pool.submit(handler.handle, batch, sink))
                if len(in_flight) >= 2:
                    _collect(in_flight.pop(0), report, on_progress)
            for future in in_flight:
                _collect(future, report, on_progress)
        if not _has_open_jobs(handler.database, run_id):
            break
    report.seconds = time.perf_counter() - started
    return report


def _collect(
    future: Future[HandleReport], report: LocalReport, on_progress: Callable[[HandleReport], None] | None
) -> None:
    handled = future.result()
    report.handled += handled.results
    report.cache_hits += handled.cache_hits
    report.stats += handled.stats
    if on_progress:
        on_progress(handled)


def _has_open_jobs(database: Engine, run_id: int) -> bool:
    with translated_errors("reading jobs"), database.connect() as conn:
        return ledger.has_open_jobs(conn, run_id)


# --- a whole local run -----------------------------------------------------------------------
class LocalObserver(Protocol):
    """What a local run tells its caller (the CLI renders it), in this order."""

    def submitted(self, report: SubmitReport) -> None: ...  # a new run's jobs are in the ledger

    def loading_model(self) -> None: ...

    def started(self, run_id: int, total: int, finished: int) -> None: ...  # jobs in the run, already finished

    def advanced(self, handled: HandleReport) -> None: ...

    def stopped(self) -> None: ...  # also after an error


@dataclass
class LocalRun:
    run_id: int
    state: str
    counts: dict[str, int]
    report: LocalReport
    failures: dict[str, int] = field(default_factory=dict)  # failed jobs by error code


def run_catalog(
    settings: Settings,
    rows: Iterator[tuple[int, Any]] | None,
    resume_run: int | None,
    observer: LocalObserver,
    use_cache: bool = True,
) -> LocalRun:
    """Tag a catalog in this process: submit its rows as a new run (or resume run resume_run), load
    the model, work through every open job, and return how the run ended. use_cache False
    (`--no-cache`) makes a new run infer every image instead of reusing stored model outputs."""
    database = open_database(settings.database_url, create_if_embedded=True)
    taxonomy = taxonomy_for(settings)
    if resume_run is None:
        assert rows is not None, "a new local run needs catalog rows"
        submitted = submit_catalog(rows, database, settings, taxonomy, None, kind="local", use_cache=use_cache)
        observer.submitted(submitted)
        run_id = submitted.run_id
    else:
        run_id = resume_run
        with translated_errors("reopening the run"), database.begin() as conn:
            ledger.reopen_running(conn, run_id)  # a local run has no other worker: its leases are stale
    observer.loading_model()
    handler = JobHandler.from_settings(settings, TaggingEngine(load_model(settings), taxonomy, settings), database)
    writer = ResultWriter(
        database,
        taxonomy,
        settings.notify_channel,
        ListingChecker.from_settings(settings, taxonomy),
        thresholds=Thresholds.from_settings(settings),
        conflict_confidence=settings.merge_conflict_confidence,
    )
    _, counts = run_status(database, run_id)
    total = sum(counts.values())
    try:
        with log_to_file(settings.work_dir / "skutag.log"):
            observer.started(run_id, total, total - ledger.open_count(counts))
            try:
                report = run_jobs(handler, writer, run_id, on_progress=observer.advanced)
            finally:
                observer.stopped()
    finally:
        handler.close()
    state, counts = run_status(database, run_id)
    return LocalRun(run_id, state, counts, report, counts_by_code(database, run_id))


def settings_for_resume(settings: Settings, run_id: int) -> Settings | None:
    """Settings with the image roots the run started with added, so its paths are allowed the
    same; None when there is no such run."""
    database = open_database(settings.database_url, create_if_embedded=True)
    try:
        with translated_errors("reading the run"), database.connect() as conn:
            config = ledger.run_config(conn, run_id)
    finally:
        database.dispose()
    if config is None:
        return None
    roots = config.get("image_roots")
    return settings.with_image_roots(*(Path(root) for root in roots or ()))


def tag_image(settings: Settings, image_uri: str) -> tuple[TagResult, BatchStats | None]:
    """One image through the workers' intake and engine, outside any run (`skutag tag-image`)."""
    taxonomy = taxonomy_for(settings)
    intake = ImageIntake(settings)
    try:
        outcome = intake.prepare(image_uri)
    finally:
        intake.close()
    engine = TaggingEngine(load_model(settings), taxonomy, settings)
    job = JobSpec(job_id=0, run_id=0, sku="-", image_uri=image_uri)
    batch = tag_batch(engine, [job], [outcome], thresholds=Thresholds.from_settings(settings))
    (result,) = batch.results
    return result, batch.stats[0] if batch.stats else None
