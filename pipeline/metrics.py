"""Prometheus metrics, named and typed by Prometheus's conventions: one meaning per metric, so a
sum over any label is a true total. Served on SKUTAG_METRICS_PORT (or --metrics-port) by each
process; the backfill, a cron job, can also push its final figures to a Pushgateway.

GPU worker:
    skutag_jobs_finished_total{status}      tagged | needs_review | failed; each job once
    skutag_job_failures_total{code}         final failures by error code (also in jobs_finished)
    skutag_job_retries_total{code}          retryable failures sent back to the queue
    skutag_cache_hits_total                 jobs answered from the result cache (no GPU work)
    skutag_jobs_skipped_total               redelivered jobs already done or running elsewhere
    skutag_gpu_batch_seconds                one GPU batch: preprocess + vision + prefill + decode
    skutag_gpu_batch_images                 images per GPU batch (merged across messages)
    skutag_forward_passes_total             language-model passes
    skutag_message_seconds                  one queue message: claim to results sent
Writer:
    skutag_results_written_total            results committed
    skutag_write_seconds                    one write transaction
    skutag_write_requeued_total             result messages put back after a failed write
    skutag_write_dropped_total              malformed result messages dropped
    skutag_results_discarded_total          results of jobs cancelled while they ran (not written)
Both, read from the broker at scrape time:
    skutag_queue_depth{queue}               messages waiting (Redis or RabbitMQ)
Backfill:
    skutag_backfill_jobs{state}             the run's jobs by ledger state
    skutag_backfill_outstanding             jobs published and not finished
    skutag_backfill_published_total
Every registry also has the default process_* and python_* collectors.
Rates are PromQL's job: rate(skutag_jobs_finished_total[5m]).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from pipeline.errors import RetryableError

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def new_registry() -> CollectorRegistry:
    """A registry with the default process and python collectors, as the global one has."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.finished = Counter("skutag_jobs_finished", "Jobs finished, by final status.", ["status"], registry=r)
        self.failures = Counter("skutag_job_failures", "Jobs failed for good, by error code.", ["code"], registry=r)
        self.retries = Counter("skutag_job_retries", "Retryable job failures, by error code.", ["code"], registry=r)
        self.cache_hits = Counter("skutag_cache_hits", "Jobs answered from the result cache.", registry=r)
        self.skipped = Counter("skutag_jobs_skipped", "Redelivered jobs skipped (done or leased).", registry=r)
        self.gpu_batch_seconds = Histogram(
            "skutag_gpu_batch_seconds", "One GPU batch: preprocess, vision, prefill and decode.",
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.gpu_batch_images = Histogram(
            "skutag_gpu_batch_images", "Images per GPU batch.", buckets=IMAGES_BUCKETS, registry=r
        )
        self.forward_passes = Counter("skutag_forward_passes", "Language-model forward passes.", registry=r)
        self.message_seconds = Histogram(
            "skutag_message_seconds", "One queue message of jobs: claim to results sent.",
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip

    def observe(self, report: Any, seconds: float) -> None:
        """Record a pipeline.worker.HandleReport for one message."""
        self.message_seconds.observe(seconds)
        for status, count in report.outcomes.items():
            self.finished.labels(status).inc(count)
        for code, count in report.failure_codes.items():
            self.failures.labels(code).inc(count)
        for code, count in report.retry_codes.items():
            self.retries.labels(code).inc(count)
        self.cache_hits.inc(report.cache_hits)
        self.skipped.inc(report.skipped)
        for stats in report.stats:  # one per GPU batch; a merged batch rides with one message only
            busy_ms = stats.preprocess_ms + stats.vision_ms + stats.prefill_ms + stats.decode_ms
            self.gpu_batch_seconds.observe(busy_ms / 1000)
            self.gpu_batch_images.observe(stats.images)
            self.forward_passes.inc(stats.forward_passes)

    def watch_queues(self, depths: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(QueueDepth(depths))


class WriterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.written = Counter("skutag_results_written", "Results committed to the database.", registry=r)
        self.write_seconds = Histogram(
            "skutag_write_seconds", "One write transaction.", buckets=SECONDS_BUCKETS, registry=r
        )
        self.requeued = Counter("skutag_write_requeued", "Result messages put back after a failed write.", registry=r)
        self.dropped = Counter("skutag_write_dropped", "Malformed result messages dropped.", registry=r)
        self.discarded = Counter(
            "skutag_results_discarded", "Results not written: their job was cancelled while it ran.", registry=r
        )

    def watch_queues(self, depths: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(QueueDepth(depths))


class QueueDepth:
    """skutag_queue_depth, read from the broker when scraped (not cached, so never stale)."""

    def __init__(self, depths: Callable[[], Mapping[str, int]]) -> None:
        self.depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("skutag_queue_depth", "Messages waiting in each broker queue.", labels=["queue"])
        try:
            for queue, depth in self.depths().items():
                family.add_metric([queue], depth)
        except Exception:  # a scrape must not fail because the broker is down; the gap is the signal
            log.debug("queue depth unavailable", exc_info=True)
        yield family


class BackfillMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.jobs = Gauge(
            "skutag_backfill_jobs", "The backfill run's jobs by state.", ["state"], registry=self.registry
        )
        self.outstanding = Gauge("skutag_backfill_outstanding", "Jobs published, not finished.", registry=self.registry)
        self.published = Counter("skutag_backfill_published", "Jobs published by the backfill.", registry=self.registry)

    def update(self, by_state: Mapping[str, int], outstanding: int, newly_published: int) -> None:
        for state, count in by_state.items():
            self.jobs.labels(state).set(count)
        self.outstanding.set(outstanding)
        self.published.inc(newly_published)


def serve(port: int | None, registry: CollectorRegistry) -> None:
    if port:
        start_http_server(port, registry=registry)
        log.info("metrics on :%d/metrics", port)


def push(gateway: str, registry: CollectorRegistry, job: str = "skutag_backfill") -> None:
    """Push the registry's figures to a Pushgateway (PUT: replaces this job's previous figures)."""
    try:
        push_to_gateway(gateway, job=job, registry=registry, timeout=10)
    except OSError as exc:
        raise RetryableError(f"could not push metrics to {gateway}: {exc}") from exc
