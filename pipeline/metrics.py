"""Prometheus metrics for GPU workers and the backfill, served on SKUTAG_METRICS_PORT when set.

Worker:   skutag_images_total{outcome}          tagged | needs_review | failed | cached | retried
          skutag_batch_seconds                  one message's handling time (claim to results sent)
          skutag_forward_passes_total           language-model passes
          skutag_queue_depth{queue}             messages waiting in Redis, read at scrape time
Backfill: skutag_backfill_jobs{state}           the run's jobs by ledger state
          skutag_backfill_outstanding           jobs published and not finished
          skutag_backfill_published_total
Rates (images/s) are PromQL's job: rate(skutag_images_total[5m]).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.images = Counter("skutag_images", "Images handled, by outcome.", ["outcome"], registry=self.registry)
        self.batch_seconds = Histogram(
            "skutag_batch_seconds", "Time to handle one message of jobs.", registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        self.forward_passes = Counter("skutag_forward_passes", "Language-model forward passes.", registry=self.registry)

    def observe(self, report: Any, seconds: float) -> None:
        """Record a pipeline.worker.HandleReport."""
        self.batch_seconds.observe(seconds)
        self.images.labels("cached").inc(report.cache_hits)
        self.images.labels("retried").inc(report.retried)
        for outcome, count in report.outcomes.items():
            self.images.labels(outcome).inc(count)
        self.forward_passes.inc(sum(stats.forward_passes for stats in report.stats))

    def watch_queues(self, depths: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_QueueDepth(depths))


class _QueueDepth:
    def __init__(self, depths: Callable[[], dict[str, int]]) -> None:
        self.depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("skutag_queue_depth", "Messages waiting in each Redis queue.", labels=["queue"])
        try:
            for queue, depth in self.depths().items():
                family.add_metric([queue], depth)
        except Exception:  # a scrape must not fail because Redis is down; the gap is the signal
            log.debug("queue depth unavailable", exc_info=True)
        yield family


class BackfillMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge(
            "skutag_backfill_jobs", "The backfill run's jobs by state.", ["state"], registry=self.registry
        )
        self.outstanding = Gauge("skutag_backfill_outstanding", "Jobs published, not finished.", registry=self.registry)
        self.published = Counter("skutag_backfill_published", "Jobs published by the backfill.", registry=self.registry)

    def update(self, by_state: dict[str, int], outstanding: int, newly_published: int) -> None:
        for state, count in by_state.items():
            self.jobs.labels(state).set(count)
        self.outstanding.set(outstanding)
        self.published.inc(newly_published)


def serve(port: int | None, registry: CollectorRegistry) -> None:
    if port:
        start_http_server(port, registry=registry)
        log.info("metrics on :%d/metrics", port)
