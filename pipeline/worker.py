"""The work a GPU worker does with a handful of jobs, independent of how they were delivered.

    claim (ledger) -> intake (thread pool) -> result cache -> engine (via the dynamic batcher)
    -> results to the sink (the writer) ; retryable failures back to the queue

The Celery GPU worker (workers/), local mode (`skutag run`) and the benchmarks all use JobHandler;
only the sink differs (a Redis queue to the writer, or the writer itself).

DynamicBatcher owns the model on one thread: requests from several message-handling threads are
merged into one batch (up to batch_size, waiting at most batch_wait_ms for more), so intake for
the next messages overlaps the GPU's work on this one and the GPU never waits on decoding.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.db import translated_errors
from pipeline.errors import InferenceError, SkutagError
from pipeline.images import ImageIntake
from pipeline.inference import BatchStats, ItemTags, TaggingEngine
from pipeline.retrying import retry_until
from pipeline.routing import Thresholds
from pipeline.runner import tag_batch
from pipeline.settings import Settings
from schemas.images import PreparedImage
from schemas.results import ErrorCode, ItemError, JobSpec, Provenance, TagResult, cache_key, failed_result

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    """Where final results go: the writer queue, or the writer itself."""

    def send_results(self, results: Sequence[TagResult]) -> None: ...


class JobPublisher(Protocol):
    """Puts jobs (back) on the broker. epoch() names the broker's current life (Redis run_id)."""

    def publish(self, jobs: Sequence[JobSpec], queue: str) -> None: ...

    def epoch(self) -> str | None: ...


# --- dynamic batching ------------------------------------------------------------------------
@dataclass
class _Request:
    images: Sequence[PreparedImage]
    future: Future[tuple[list[ItemTags], list[BatchStats]]] = field(default_factory=Future)


class DynamicBatcher:
    """The only thread that touches the model. submit() from any thread; requests are merged."""

    def __init__(self, engine: TaggingEngine, batch_size: int, wait_s: float) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="skutag-gpu", daemon=True)
        self._thread.start()

    def provenance(self, run_id: int | None = None) -> Provenance:
        return self.engine.provenance(run_id)

    def submit(self, images: Sequence[PreparedImage]) -> Future[tuple[list[ItemTags], list[BatchStats]]]:
        request = _Request(images)
        self._queue.put(request)
        return request.future

    def tag_many(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], list[BatchStats]]:
        return self.submit(images).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            requests = [first]
            size = len(first.images)
            deadline = time.monotonic() + self.wait_s
            while size < self.batch_size:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                requests.append(more)
                size += len(more.images)
            self._serve(requests)

    def _serve(self, requests: list[_Request]) -> None:
        images = [image for request in requests for image in request.images]
        try:
            tags, stats = self.engine.tag_many(images)
        except InferenceError as exc:  # the batch's own failure: every request in it shares it
            for request in requests:
                request.future.set_exception(exc)
            return
        except Exception as exc:  # maybe one request's image: serve each alone, so only its owner sees it
            if len(requests) > 1:
                for request in requests:
                    self._serve([request])
            else:
                requests[0].future.set_exception(exc)
            return
        # The batch's stats go with its first request only, so a merged batch is counted once
        # (metrics, reports); each image's share of the time already rides in its ItemTags.
        start = 0
        for index, request in enumerate(requests):
            end = start + len(request.images)
            request.future.set_result((tags[start:end], stats if index == 0 else []))
            start = end


class _TimedTagger:
    """tag_batch's view of the batcher: with the per-batch time limit of the article's timeout control."""

    def __init__(self, batcher: DynamicBatcher, limit_s: float) -> None:
        self.batcher = batcher
        self.limit_s = limit_s

    def provenance(self, run_id: int | None = None) -> Provenance:
        return self.batcher.provenance(run_id)

    def tag_many(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], list[BatchStats]]:
        try:
            return self.batcher.submit(images).result(timeout=self.limit_s)
        except FutureTimeout as exc:
            raise InferenceError(f"batch not tagged within {self.limit_s:g} s") from exc


# --- handling jobs ---------------------------------------------------------------------------
@dataclass
class HandleReport:
    received: int = 0
    results: int = 0
    retried: int = 0
    skipped: int = 0
    cache_hits: int = 0
    stats: list[BatchStats] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)  # results by status, cache hits included
    failure_codes: dict[str, int] = field(default_factory=dict)  # failed results by error code
    retry_codes: dict[str, int] = field(default_factory=dict)  # retryable failures by error code


@dataclass(frozen=True, kw_only=True)
class HandlerOptions:
    """What JobHandler reads from the settings: batching, time limits, leases and attempts."""

    batch_size: int
    batch_wait_s: float
    batch_time_limit_s: float
    intake_threads: int
    lease_s: int
    max_attempts: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HandlerOptions:
        return cls(
            batch_size=settings.batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
            batch_time_limit_s=settings.batch_time_limit_s,
            intake_threads=settings.intake_threads,
            lease_s=settings.lease_s,
            max_attempts=settings.max_attempts,
        )


class JobHandler:
    """Everything a worker process holds: engine + batcher, intake pool, database engine."""

    def __init__(
        self,
        *,
        options: HandlerOptions,
        engine: TaggingEngine,
        database: Engine,
        intake: ImageIntake,
        thresholds: Thresholds,
    ) -> None:
        self.options = options
        self.engine = engine
        self.database = database
        self.intake = intake
        self.pool = ThreadPoolExecutor(options.intake_threads, thread_name_prefix="skutag-intake")
        self.batcher = DynamicBatcher(engine, options.batch_size, options.batch_wait_s)
        self.tagger = _TimedTagger(self.batcher, options.batch_time_limit_s)
        self.thresholds = thresholds
        self._run_uses_cache: dict[int, bool] = {}  # a run's config never changes: ask once per run

    @classmethod
    def from_settings(cls, settings: Settings, engine: TaggingEngine, database: Engine) -> JobHandler:
        """The handler a worker or local run builds: options, thresholds and intake from the one Settings."""
        return cls(
            options=HandlerOptions.from_settings(settings), engine=engine, database=database,
            intake=ImageIntake(settings), thresholds=Thresholds.from_settings(settings),
        )  # fmt: skip

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.intake.close()

    def handle(self, specs: Sequence[JobSpec], sink: ResultSink) -> HandleReport:
        """Process one delivery of jobs. Idempotent: a redelivered job that is done is skipped.

        Database work is retried with back-off until the lease ends (for the claim: one lease from
        receipt); past it a RetryableError goes up and the caller hands the delivery back to the
        broker, whose next delivery may claim the jobs again at once (their lease has run out)."""
        report = HandleReport(received=len(specs))
        received = time.monotonic()
        claim, lease_end = retry_until(received + self.options.lease_s, lambda: self._claim(specs), "claiming jobs")
        report.skipped = len(claim.skipped)
        exhausted = [failed_result(job, error, self.engine.provenance(job.run_id)) for job, error in claim.exhausted]
        if not claim.claimed:
            self._finish(exhausted, [], sink, report, lease_end)
            return report
        try:
            outcomes = self.intake.prepare_jobs(claim.claimed, self.pool)
            cache = retry_until(lease_end, lambda: self._cache_for(claim.claimed, outcomes), "reading the result cache")
            batch = tag_batch(self.tagger, claim.claimed, outcomes, cache, self.options.max_attempts, self.thresholds)
            report.cache_hits, report.stats = batch.cache_hits, batch.stats
            self._finish(exhausted + batch.results, batch.retries, sink, report, lease_end)
        except SkutagError:
            raise  # outages that outlasted the lease go back to the caller (Celery retries the message)
        except Exception as exc:
            self._release_after_bug(claim.claimed, exc, lease_end)
        return report

    def _claim(self, specs: Sequence[JobSpec]) -> tuple[ledger.Claim, float]:
        """The claim, and when (on the monotonic clock) the lease it took ends."""
        started = time.monotonic()
        with translated_errors("claiming jobs"), self.database.begin() as conn:
            claim = ledger.claim_jobs(conn, specs, self.options.lease_s, self.options.max_attempts)
        return claim, started + self.options.lease_s

    def _release_after_bug(self, claimed: Sequence[JobSpec], exc: Exception, lease_end: float) -> None:
        """A bug outside any one item: only the jobs this delivery claimed go back to the queue, at
        once and with the cause (not after their lease, not failed as attempts_exhausted without
        one); their attempt was counted, so a bug that always strikes ends in max_attempts."""
        log.error(
            "handling %d claimed jobs failed unexpectedly; releasing them: %s", len(claimed),
            ", ".join(f"job {job.job_id} sku {job.sku!r}" for job in claimed[:20]), exc_info=exc,
            extra={"run_id": claimed[0].run_id} if len({job.run_id for job in claimed}) == 1 else {},
        )  # fmt: skip
        error = ItemError(code=ErrorCode.INTERNAL_ERROR, message=f"internal error ({type(exc).__name__}); see the log")
        retry_until(lease_end, lambda: self._release([(job, error) for job in claimed]), "releasing jobs")

    def _cache_for(self, jobs: Sequence[JobSpec], outcomes: Sequence[object]) -> dict[int, TagResult]:
        """Stored model outputs by job id, for the jobs whose run may use the result cache
        (`--no-cache` runs and `backfill --max-age` runs always infer)."""
        with translated_errors("reading the result cache"), self.database.connect() as conn:
            unknown = {job.run_id for job in jobs} - set(self._run_uses_cache)
            if unknown:
                bypass = ledger.runs_bypassing_cache(conn, unknown)
                self._run_uses_cache |= {run_id: run_id not in bypass for run_id in unknown}
            keys = {
                job.job_id: cache_key(outcome.sha256, self.engine.provenance(job.run_id))
                for job, outcome in zip(jobs, outcomes, strict=True)
                if isinstance(outcome, PreparedImage) and self._run_uses_cache.get(job.run_id, True)
            }
            stored = ledger.cached_results(conn, keys.values())
        return {job_id: stored[key] for job_id, key in keys.items() if key in stored}

    def _finish(
        self,
        results: list[TagResult],
        retries: list[tuple[JobSpec, ItemError]],
        sink: ResultSink,
        report: HandleReport,
        lease_end: float,
    ) -> None:
        if results:
            retry_until(lease_end, lambda: sink.send_results(results), "sending results")
        report.results = len(results)
        for result in results:
            report.outcomes[result.status] = report.outcomes.get(result.status, 0) + 1
            if result.status == "failed" and result.error is not None:
                report.failure_codes[result.error.code] = report.failure_codes.get(result.error.code, 0) + 1
                log.warning(
                    "job failed: %s: %s", result.error.code, result.error.message,
                    extra={"run_id": result.provenance.run_id, "job_id": result.job_id, "sku": result.sku},
                )  # fmt: skip
        for job, error in retries:
            report.retry_codes[error.code] = report.retry_codes.get(error.code, 0) + 1
            log.info(
                "job will be retried: %s: %s", error.code, error.message,
                extra={"run_id": job.run_id, "job_id": job.job_id, "sku": job.sku},
            )  # fmt: skip
        if retries:
            # Back to the queue with no message: the reconciler (new jobs) or the backfill (its own)
            # publishes them on its next round, which is the retry's back-off.
            retry_until(lease_end, lambda: self._release(retries), "releasing jobs for retry")
            report.retried = len(retries)

    def _release(self, retries: list[tuple[JobSpec, ItemError]]) -> None:
        with translated_errors("releasing jobs for retry"), self.database.begin() as conn:
            ledger.release_jobs(conn, [(job.job_id, error) for job, error in retries])
