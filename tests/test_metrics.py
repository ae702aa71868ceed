"""Prometheus metrics: what a worker and a backfill expose, queue depth read from real Redis."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import generate_latest

from pipeline.inference import BatchStats
from pipeline.metrics import BackfillMetrics, WorkerMetrics
from pipeline.settings import load_settings
from pipeline.worker import HandleReport


def scrape(registry: object) -> str:
    return generate_latest(registry).decode()  # type: ignore[arg-type]


def test_worker_metrics_count_outcomes_and_passes() -> None:
    metrics = WorkerMetrics()
    outcomes = {"tagged": 2, "failed": 1, "needs_review": 1}
    stats = [BatchStats(images=3, forward_passes=12)]
    report = HandleReport(received=4, results=4, retried=1, cache_hits=1, outcomes=outcomes, stats=stats)
    metrics.observe(report, 0.4)
    text = scrape(metrics.registry)
    assert 'skutag_images_total{outcome="tagged"} 2.0' in text
    assert 'skutag_images_total{outcome="cached"} 1.0' in text
    assert 'skutag_images_total{outcome="retried"} 1.0' in text
    assert "skutag_forward_passes_total 12.0" in text
    assert "skutag_batch_seconds_count 1.0" in text


@pytest.mark.redis
def test_queue_depth_is_read_from_redis_at_scrape_time(redis_url: str) -> None:
    from workers.app import queue_depths

    client = redis.Redis.from_url(redis_url)
    client.lpush("skutag.backfill", "a", "b", "c")
    metrics = WorkerMetrics()
    settings = load_settings(broker_url=redis_url)
    metrics.watch_queues(lambda: queue_depths(settings))
    text = scrape(metrics.registry)
    assert 'skutag_queue_depth{queue="skutag.backfill"} 3.0' in text
    assert 'skutag_queue_depth{queue="skutag.new"} 0.0' in text


def test_a_scrape_survives_redis_being_down() -> None:
    from workers.app import queue_depths

    metrics = WorkerMetrics()
    settings = load_settings(broker_url="redis://127.0.0.1:1/0")
    metrics.watch_queues(lambda: queue_depths(settings))
    assert "skutag_queue_depth" in scrape(metrics.registry)


def test_backfill_metrics() -> None:
    metrics = BackfillMetrics()
    metrics.update({"queued": 5, "done": 7}, outstanding=5, newly_published=12)
    text = scrape(metrics.registry)
    assert 'skutag_backfill_jobs{state="done"} 7.0' in text
    assert "skutag_backfill_outstanding 5.0" in text
    assert "skutag_backfill_published_total 12.0" in text
