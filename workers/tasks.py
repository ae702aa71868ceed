"""The two Celery workers, wired to the pipeline's stages. No pipeline logic lives here.

GPU worker (`skutag worker`): threads pool, one process; the model is loaded once, before the
worker starts consuming (no prefork parent ever touches CUDA). Each message is handled by
pipeline.worker.JobHandler; its DynamicBatcher merges concurrent messages into GPU batches.

Writer (`skutag writer`): solo pool; celery-batches merges up to writer_batch_messages messages
into one transaction. celery-batches acks a batch whose function raises and never retries it, so
this function does not raise: on a database outage it retries, then puts the payloads back on the
queue; if even that fails, the jobs' leases expire and the reconciler runs them again. The writer
also runs the reconciler every reconcile_interval_s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery_batches import Batches
from pydantic import ValidationError

from pipeline.db import make_engine, redacted
from pipeline.errors import RetryableError, SkutagError
from pipeline.inference import TaggingEngine, load_model
from pipeline.listing import ListingChecker
from pipeline.logs import log_context
from pipeline.metrics import WorkerMetrics, WriterMetrics, serve
from pipeline.reconcile import reconcile
from pipeline.retrying import retry_until
from pipeline.routing import Thresholds
from pipeline.settings import Settings, taxonomy_for
from pipeline.worker import JobHandler
from pipeline.writer import ResultWriter, write_valid
from schemas.results import JobSpec, TagResult
from workers.app import QUEUE_WRITE, TAG_TASK, WRITE_TASK, CeleryPublisher, CelerySink, create_app, queue_depths

# Each process logs under its own name, so a shared log stream can be filtered by role.
log = logging.getLogger("skutag.worker")
writer_log = logging.getLogger("skutag.writer")
reconcile_log = logging.getLogger("skutag.reconcile")

# A delivery handed back after a lease of database retries comes round again this soon.
REDELIVER_AFTER_S = 1


def register_tag_task(app: Celery, handler: JobHandler, sink: CelerySink, metrics: WorkerMetrics) -> None:
    # max_retries=None on the task (not on self.retry, where None means "the default", 3): a message
    # is never dropped for an outage. handle() has already retried with back-off for a lease.
    @app.task(name=TAG_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)  # type: ignore[untyped-decorator]
    def tag(self: Any, jobs: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        specs = valid_specs(jobs)
        runs = {spec.run_id for spec in specs}
        with log_context(run_id=runs.pop() if len(runs) == 1 else None):
            _tag(self, specs, started)

    def _tag(self: Any, specs: list[JobSpec], started: float) -> None:
        try:
            report = handler.handle(specs, sink)
        except RetryableError as exc:
            log.warning("batch of %d jobs goes back to the queue: %s", len(specs), exc.message)
            raise self.retry(exc=exc, countdown=REDELIVER_AFTER_S) from exc
        metrics.observe(report, time.perf_counter() - started)
        log.info(
            "%d jobs: %d results (%d from cache), %d retried, %d skipped in %.0f ms",
            report.received, report.results, report.cache_hits, report.retried, report.skipped,
            (time.perf_counter() - started) * 1000,
        )  # fmt: skip


def valid_specs(jobs: object) -> list[JobSpec]:
    """The well-formed jobs of a message; a malformed entry is logged and left to the reconciler
    (its ledger row is still queued), never allowed to fail its neighbours."""
    specs = []
    for job in jobs if isinstance(jobs, list) else []:
        try:
            specs.append(JobSpec.model_validate(job))
        except ValidationError as exc:
            log.error("dropped a malformed job in a message: %s", str(exc).splitlines()[0])
    return specs


def worker_argv(settings: Settings, role: str, options: Sequence[str], celery_args: Sequence[str]) -> list[str]:
    """`celery worker` arguments: skutag's, then the operator's (later options win in Celery's parser).
    Heartbeats stay on (Flower and `celery events` need them); --events turns on task events."""
    # JSON logs: no banner on stdout, so every line a log shipper reads is one JSON object.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    argv = [*quiet, "worker", *options, f"--hostname=skutag-{role}-{os.getpid()}@%h", "--loglevel=INFO"]
    if settings.worker_events:
        argv.append("--task-events")
    return [*argv, *celery_args]


def run_gpu_worker(
    settings: Settings, queues: Sequence[str], concurrency: int, celery_args: Sequence[str] = ()
) -> None:
    """Load the model, then consume until stopped (SIGTERM: finish running batches, then exit)."""
    app = create_app(settings)
    taxonomy = taxonomy_for(settings)
    engine = TaggingEngine(load_model(settings), taxonomy, settings)
    handler = JobHandler.from_settings(settings, engine, make_engine(settings.database_url, pool_size=concurrency + 2))
    metrics = WorkerMetrics()
    metrics.watch_queues(lambda: queue_depths(settings))
    serve(settings.metrics_port, metrics.registry)
    register_tag_task(app, handler, CelerySink(app, settings), metrics)
    log.info("model %s (%s) loaded; consuming %s", settings.model, settings.quantization, ", ".join(queues))
    try:
        options = ["--pool=threads", f"--concurrency={concurrency}", f"--queues={','.join(queues)}",
                   "--prefetch-multiplier=1"]  # fmt: skip
        app.worker_main(argv=worker_argv(settings, "gpu", options, celery_args))
    finally:
        handler.close()


def register_write_task(app: Celery, writer: ResultWriter, settings: Settings, metrics: WriterMetrics) -> None:
    @app.task(  # type: ignore[untyped-decorator]
        name=WRITE_TASK,
        base=Batches,
        flush_every=settings.writer_batch_messages,
        flush_interval=0.2,
        acks_late=True,
    )
    def write_results(requests: Sequence[Any]) -> None:
        results: list[TagResult] = []
        for request in requests:
            try:
                results += [TagResult.model_validate(item) for item in request.args[0]]
            except (ValidationError, IndexError, TypeError) as exc:  # the jobs' leases will bring them back
                metrics.dropped.inc()
                writer_log.error("dropped a malformed result message: %s", str(exc).splitlines()[0])
        if not results:
            return
        started = time.perf_counter()
        try:
            # The jobs' leases run for lease_s: a write that succeeds before then loses nothing.
            deadline = time.monotonic() + settings.lease_s
            report = retry_until(deadline, lambda: write_valid(writer, results), "writing results")
        except RetryableError as exc:
            writer_log.error(
                "could not write %d results (%s): putting them back on the queue", len(results), exc.message
            )
            metrics.requeued.inc(_requeue(app, requests))
            return
        metrics.write_seconds.observe(time.perf_counter() - started)
        metrics.written.inc(len(results) - report.discarded)
        metrics.discarded.inc(report.discarded)
        writer_log.info("wrote %d results from %d messages", len(results), len(requests))


def _requeue(app: Celery, requests: Sequence[Any]) -> int:
    """Put the messages back; returns how many made it."""
    sent = 0
    try:
        for request in requests:
            app.send_task(WRITE_TASK, args=request.args, queue=QUEUE_WRITE)
            sent += 1
    except Exception:  # broker down as well: the ledger's leases bring the jobs back
        writer_log.exception("could not put results back on the queue; the reconciler will re-run their jobs")
    return sent


def _reconcile_forever(stop: threading.Event, settings: Settings, app: Celery) -> None:
    database = make_engine(settings.database_url)
    publisher = CeleryPublisher(app, settings)
    while not stop.wait(settings.reconcile_interval_s):
        try:
            report = reconcile(database, publisher, republish_after_s=settings.republish_after_s)
        except SkutagError as exc:
            reconcile_log.warning("reconcile failed, will try again: %s", exc.message)
            continue
        if report.expired_leases or report.lost_messages or report.published:
            reconcile_log.info(
                "reconcile: %d expired leases, %d lost messages, %d jobs published",
                report.expired_leases, report.lost_messages, report.published,
            )  # fmt: skip


def run_writer(settings: Settings, reconcile_periodically: bool = True, celery_args: Sequence[str] = ()) -> None:
    app = create_app(settings)
    taxonomy = taxonomy_for(settings)
    listing = ListingChecker.from_settings(settings, taxonomy)
    writer = ResultWriter(
        make_engine(settings.database_url),
        taxonomy,
        settings.notify_channel,
        listing,
        thresholds=Thresholds.from_settings(settings),
        conflict_confidence=settings.merge_conflict_confidence,
    )
    metrics = WriterMetrics()
    metrics.watch_queues(lambda: queue_depths(settings))
    serve(settings.metrics_port, metrics.registry)
    register_write_task(app, writer, settings, metrics)
    writer_log.info("writing results from %s into %s", QUEUE_WRITE, redacted(settings.database_url))
    stop = threading.Event()
    if reconcile_periodically:
        threading.Thread(
            target=_reconcile_forever, args=(stop, settings, app), name="skutag-reconcile", daemon=True
        ).start()
    try:
        options = [
            "--pool=solo",
            f"--queues={QUEUE_WRITE}",
            f"--prefetch-multiplier={2 * settings.writer_batch_messages}",
        ]
        app.worker_main(argv=worker_argv(settings, "writer", options, celery_args))
    finally:
        stop.set()
