"""Prometheus metrics: what a worker and a backfill expose, queue depth read from real Redis."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest
from sqlalchemy.engine import Engine

from pipeline.inference import BatchStats
from pipeline.metrics import BackfillMetrics, WorkerMetrics
from pipeline.settings import load_settings
from pipeline.worker import HandleReport


def scrape(registry: object) -> str:
    return generate_latest(registry).decode()  # type: ignore[arg-type]


def test_worker_metrics_follow_prometheus_conventions() -> None:
    metrics = WorkerMetrics()
    outcomes = {"tagged": 2, "failed": 1, "needs_review": 1}
    stats = [BatchStats(images=3, forward_passes=12, vision_ms=300, prefill_ms=200, decode_ms=500)]
    report = HandleReport(
        received=5, results=4, retried=1, cache_hits=1, skipped=0, outcomes=outcomes, stats=stats,
        failure_codes={"not_found": 1}, retry_codes={"timeout": 1},
    )  # fmt: skip
    metrics.observe(report, 1.4)
    text = scrape(metrics.registry)
    # Each job finishes once, under one status: summing over status is the number of jobs.
    assert 'skutag_jobs_finished_total{status="tagged"} 2.0' in text
    assert 'skutag_jobs_finished_total{status="failed"} 1.0' in text
    assert 'skutag_job_failures_total{code="not_found"} 1.0' in text
    assert 'skutag_job_retries_total{code="timeout"} 1.0' in text
    assert "skutag_cache_hits_total 1.0" in text
    assert "skutag_forward_passes_total 12.0" in text
    # The GPU batch histogram times the batch (1.0 s of engine work), not the message (1.4 s).
    assert "skutag_gpu_batch_seconds_sum 1.0" in text
    assert "skutag_gpu_batch_images_sum 3.0" in text
    assert "skutag_message_seconds_sum 1.4" in text
    assert "process_cpu_seconds_total" in text and "python_info" in text


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each broker skutag supports: the test Redis database, a private RabbitMQ."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def test_queue_depth_is_read_from_the_broker_at_scrape_time(broker_url: str) -> None:
    from schemas.results import JobSpec
    from workers.app import CeleryPublisher, create_app, queue_depths

    settings = load_settings(broker_url=broker_url, batch_size=1)  # one message per job
    jobs = [JobSpec(job_id=i, run_id=1, sku=f"Q-{i}", image_uri=f"file:///q/{i}.jpg") for i in range(3)]
    CeleryPublisher(create_app(settings), settings).publish(jobs, "backfill")
    metrics = WorkerMetrics()
    metrics.watch_queues(lambda: queue_depths(settings))
    text = scrape(metrics.registry)
    assert 'skutag_queue_depth{queue="skutag.backfill"} 3.0' in text
    assert 'skutag_queue_depth{queue="skutag.new"} 0.0' in text  # never declared: nothing waits
    assert 'skutag_queue_depth{queue="skutag.write"} 0.0' in text


def test_a_publish_after_its_queue_was_deleted_still_arrives(broker_url: str) -> None:
    """kombu caches declarations per pooled connection, shared by every app in the process; a
    message to a queue deleted since would vanish on RabbitMQ. skutag declares before each publish."""
    from kombu import Connection

    from schemas.results import JobSpec
    from workers.app import CeleryPublisher, create_app, queue_depths

    settings = load_settings(broker_url=broker_url, batch_size=1)
    jobs = [JobSpec(job_id=i, run_id=1, sku=f"D-{i}", image_uri=f"file:///d/{i}.jpg") for i in range(2)]
    CeleryPublisher(create_app(settings), settings).publish(jobs, "new")
    with Connection(broker_url) as connection, connection.channel() as channel:
        channel.queue_delete("skutag.new")
    left = queue_depths(settings)["skutag.new"]  # RabbitMQ: 0; kombu's Redis delete keeps the list
    CeleryPublisher(create_app(settings), settings).publish(jobs, "new")
    assert queue_depths(settings)["skutag.new"] == left + 2


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


class _Pushgateway(BaseHTTPRequestHandler):
    """A loopback stand-in for a Pushgateway: records each request's method, path and body."""

    received: ClassVar[list[tuple[str, str, str]]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.received.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def pushgateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    _Pushgateway.received = []
    server = HTTPServer(("127.0.0.1", 0), _Pushgateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _Pushgateway.received
    server.shutdown()
    server.server_close()


@pytest.mark.postgres
@pytest.mark.redis
def test_the_backfill_pushes_its_final_figures(
    migrated_postgres_url: str,
    pg_engine: Engine,
    redis_url: str,
    tmp_path: Path,
    pushgateway: tuple[str, list[tuple[str, str, str]]],
) -> None:
    from pipeline.cli import main

    url, received = pushgateway
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,image_uri\n" + "".join(f"PG-{i},https://img.example.com/{i}.jpg\n" for i in range(25)))
    env = {"SKUTAG_DATABASE_URL": migrated_postgres_url, "SKUTAG_BROKER_URL": redis_url, "SKUTAG_BATCH_SIZE": "10"}
    args = ["backfill", "--catalog", str(catalog), "--no-wait", "--pushgateway", url]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    ((method, path, body),) = received
    assert (method, path) == ("PUT", "/metrics/job/skutag_backfill")
    assert "skutag_backfill_published_total 25.0" in body
    assert 'skutag_backfill_jobs{state="queued"} 25.0' in body
    assert "skutag_backfill_outstanding 25.0" in body


def test_an_unreachable_pushgateway_is_a_warning_not_a_crash() -> None:
    from pipeline.errors import RetryableError
    from pipeline.metrics import push

    with pytest.raises(RetryableError, match="could not push metrics"):
        push("http://127.0.0.1:1", BackfillMetrics().registry)


def exposed_names(text: str) -> set[str]:
    """The sample names a scrape offers, families without samples yet included (from # TYPE)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names |= {name + suffix for suffix in suffixes}
    return names


def every_skutag_metric() -> set[str]:
    """What the worker, the writer and the backfill expose, from their own registries."""
    from pipeline.metrics import WriterMetrics

    worker = WorkerMetrics()
    worker.watch_queues(lambda: {"skutag.new": 0})
    return set().union(*(exposed_names(scrape(m.registry)) for m in (worker, WriterMetrics(), BackfillMetrics())))


def test_the_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "skutag.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 8
    referenced = {name for expr in expressions for name in re.findall(r"\b(?:skutag|process|python)_[a-z_]+", expr)}
    missing = referenced - every_skutag_metric()
    assert not missing, f"the dashboard queries metrics nobody exposes: {sorted(missing)}"
