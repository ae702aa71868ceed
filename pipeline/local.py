"""Local mode (`skutag run FILE`): the same stages as the distributed pipeline, in one process, with
no broker. The ledger is still the truth (SQLite by default, or any configured database), so a run
stopped halfway and started again with `skutag run --resume RUN` finishes what is left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import OPEN_JOB_STATES, jobs, runs, translated_errors
from pipeline.inference import BatchStats
from pipeline.secrets import SecretMaskingFilter
from pipeline.worker import HandleReport, JobHandler
from pipeline.writer import InvalidResultError, ResultWriter, write_with_retry
from schemas.results import ErrorCode, ItemError, JobSpec, TagResult, failed_result


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


class WriterSink:
    """Hands results straight to the writer (local mode, benchmarks): no queue in between."""

    def __init__(self, writer: ResultWriter) -> None:
        self.writer = writer

    def send_results(self, results: Sequence[TagResult]) -> None:
        write_valid(self.writer, results)


def write_valid(writer: ResultWriter, results: Sequence[TagResult]) -> None:
    """Write a batch; results the writer rejects are written as failed (invalid_result) instead,
    so one malformed result never holds back the others."""
    try:
        write_with_retry(writer, results)
    except InvalidResultError as exc:
        repaired = [
            failed_result(
                JobSpec(job_id=r.job_id or 0, run_id=r.provenance.run_id or 0, sku=r.sku, image_uri=r.image_uri or ""),
                ItemError(code=ErrorCode.INVALID_RESULT, message=exc.problems[index]),
                r.provenance,
                r.image_sha256,
            )
            if index in exc.problems
            else r
            for index, r in enumerate(results)
        ]
        write_with_retry(writer, repaired)


@dataclass
class LocalReport:
    run_id: int
    handled: int = 0
    cache_hits: int = 0
    stats: list[BatchStats] = field(default_factory=list)
    seconds: float = 0.0


def open_jobs(database: Engine, run_id: int, after_id: int, limit: int) -> list[JobSpec]:
    with translated_errors("reading jobs"), database.connect() as conn:
        return ledger.select_jobs(
            conn, jobs.c.run_id == run_id, jobs.c.state.in_(OPEN_JOB_STATES), jobs.c.id > after_id, limit=limit
        )


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
    size = handler.settings.batch_size
    for _sweep in range(handler.settings.max_attempts + 1):
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
    statement = sa.select(sa.func.count()).where(jobs.c.run_id == run_id, jobs.c.state.in_(OPEN_JOB_STATES))
    with database.connect() as conn:
        return bool(conn.execute(statement).scalar_one())


def run_state(database: Engine, run_id: int) -> tuple[str, dict[str, int]]:
    with translated_errors("reading the run"), database.connect() as conn:
        state = conn.execute(sa.select(runs.c.state).where(runs.c.id == run_id)).scalar_one_or_none()
        return state or "missing", ledger.run_counts(conn, run_id)
