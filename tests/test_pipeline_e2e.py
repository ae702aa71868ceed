"""End to end through real services: a real Postgres database, a real broker (our own Redis or
RabbitMQ server, so a test may restart it; every test runs on both), real `skutag worker` and
`skutag writer` subprocesses, the tiny model. Failures are real too: SIGKILL, a broker restart,
Postgres connections cut mid-write."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import Engine

from pipeline.catalog import read_catalog
from pipeline.db import make_engine
from pipeline.migrate import upgrade
from pipeline.producer import SubmitReport, submit_catalog
from pipeline.settings import Settings, load_settings
from schemas.taxonomy import Taxonomy
from tests.conftest import _unavailable, create_database, drop_database
from tests.rabbitmq import RabbitMQServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.rabbitmq]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A private redis-server without persistence: restarting it loses every queued message."""

    name = "redis"

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._pings, 10, "redis-server to start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Broker(Protocol):
    name: str

    @property
    def url(self) -> str: ...

    def restart(self) -> None: ...


class PrivateRabbitMQ:
    """The session's private RabbitMQ, its skutag queues emptied for this test."""

    name = "rabbitmq"

    def __init__(self, server: RabbitMQServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> None:
        self.server.restart()


class Pipeline:
    """Services, settings and worker processes for one test."""

    def __init__(self, database_url: str, broker: Broker, model_dir: Path, images: Path, logs: Path) -> None:
        self.database_url = database_url
        self.broker = broker
        self.images = images
        self.logs = logs
        self.env = {
            **os.environ,
            "SKUTAG_DATABASE_URL": database_url,
            "SKUTAG_BROKER_URL": broker.url,
            "SKUTAG_MODEL": str(model_dir),
            "SKUTAG_QUANTIZATION": "fp32",
            "SKUTAG_DEVICE": "cpu",
            "SKUTAG_SUMMARY_MAX_TOKENS": "3",
            "SKUTAG_IMAGE_ROOTS": f'["{images}"]',
            "SKUTAG_BATCH_SIZE": "16",
            "SKUTAG_BATCH_WAIT_MS": "20",
            "SKUTAG_INTAKE_THREADS": "2",
            "SKUTAG_LEASE_S": "4",
            "SKUTAG_RECONCILE_INTERVAL_S": "1",
            "SKUTAG_MAX_ATTEMPTS": "5",
            "PYTHONUNBUFFERED": "1",
        }
        self.engine: Engine = make_engine(database_url)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_files: list[Any] = []

    @property
    def settings(self) -> Settings:
        keys = {k[len("SKUTAG_") :].lower(): v for k, v in self.env.items() if k.startswith("SKUTAG_")}
        return load_settings(**{k: v for k, v in keys.items() if k in {"database_url", "broker_url", "batch_size"}})

    def start(self, role: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{role}-{len(self.processes)}.log").open("wb")
        self.log_files.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", role], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        return process

    def submit(self, catalog: Path, taxonomy: Taxonomy) -> SubmitReport:
        from workers.app import CeleryPublisher, create_app

        settings = self.settings
        publisher = CeleryPublisher(create_app(settings), settings)
        with catalog.open() as handle:
            return submit_catalog(read_catalog(handle, catalog.name), self.engine, settings, taxonomy, publisher)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()

    def wait_for_run(self, run_id: int, timeout: float = 240) -> None:
        def finished() -> bool:
            self.check_alive()
            return bool(self.scalar("SELECT state FROM runs WHERE id = :r", r=run_id) != "running")

        wait_for(finished, timeout, f"run {run_id}")

    def wait_for_results(self, count: int, timeout: float = 120) -> None:
        def enough() -> bool:
            self.check_alive()
            return bool(self.scalar("SELECT count(*) FROM results") >= count)

        wait_for(enough, timeout, f"{count} results")

    def check_alive(self) -> None:
        """A worker or writer that died on its own fails the test now, with its log."""
        for process in self.processes:
            if process.poll() is not None and process.returncode != -signal.SIGKILL:
                raise AssertionError(f"{process.args} exited with {process.returncode}\n{self.logs_text()}")

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
        for log in self.log_files:
            log.close()
        self.engine.dispose()

    def logs_text(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A broker this test may restart: a private redis-server, or the session's private RabbitMQ."""
    if request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq_url")  # its queues emptied before and after
        yield PrivateRabbitMQ(request.getfixturevalue("rabbitmq_server"))
        return
    if shutil.which("redis-server") is None:
        _unavailable("redis-server", FileNotFoundError("redis-server is not installed"))
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pipeline(tmp_path: Path, tiny_model_dir: Path, postgres_admin: Engine, broker: Broker) -> Iterator[Pipeline]:
    url = create_database(postgres_admin)
    upgrade(url)
    images = tmp_path / "images"
    images.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Pipeline(url, broker, tiny_model_dir, images, logs)
    try:
        yield running
    finally:
        running.stop_all()
        drop_database(postgres_admin, url)


def catalog(pipeline: Pipeline, count: int, prefix: str = "E", bad: int = 0) -> Path:
    rows = ["sku,image_uri"]
    for index in range(count):
        name = f"{prefix}-{index}.jpg"
        if not (pipeline.images / name).exists():
            Image.new("RGB", (96, 80 + index % 40), ((index * 53) % 256, (index * 29) % 256, (index * 7) % 256)).save(
                pipeline.images / name
            )
        rows.append(f"{prefix}-{index:05d},{name}")
    (pipeline.images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [f"{prefix}-BAD-{index},{'missing.jpg' if index % 2 else 'broken.jpg'}" for index in range(bad)]
    path = pipeline.images.parent / f"{prefix}-catalog.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def assert_exactly_once(pipeline: Pipeline, run_id: int, expected: int) -> None:
    with pipeline.engine.connect() as conn:
        per_job = conn.execute(
            sa.text(
                "SELECT count(*), count(DISTINCT r.job_id) FROM results r "
                "JOIN jobs j ON j.id = r.job_id WHERE j.run_id = :r"
            ),
            {"r": run_id},
        ).one()
        open_jobs = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE run_id = :r AND state IN ('queued', 'running')"), {"r": run_id}
        ).scalar_one()
    assert tuple(per_job) == (expected, expected), pipeline.logs_text()
    assert open_jobs == 0


def test_five_hundred_skus_give_exactly_five_hundred_result_sets(pipeline: Pipeline, taxonomy: Taxonomy) -> None:
    pipeline.start("worker")
    pipeline.start("writer")
    report = pipeline.submit(catalog(pipeline, 500), taxonomy)
    assert report.published == 500
    pipeline.wait_for_run(report.run_id)
    assert_exactly_once(pipeline, report.run_id, 500)
    assert pipeline.scalar("SELECT state FROM runs WHERE id = :r", r=report.run_id) == "done", pipeline.logs_text()
    assert pipeline.scalar("SELECT count(*) FROM tag_sets") == 500


def test_a_worker_killed_mid_batch_loses_nothing(pipeline: Pipeline, taxonomy: Taxonomy) -> None:
    worker = pipeline.start("worker")
    pipeline.start("writer")
    report = pipeline.submit(catalog(pipeline, 300, prefix="K"), taxonomy)
    pipeline.wait_for_results(30)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    interrupted = pipeline.scalar("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
    assert interrupted > 0, "the worker finished everything before it was killed"
    pipeline.start("worker")
    pipeline.wait_for_run(report.run_id)
    assert_exactly_once(pipeline, report.run_id, 300)


def test_a_broker_restart_loses_nothing(pipeline: Pipeline, taxonomy: Taxonomy) -> None:
    """Redis (no persistence) loses every message: the reconciler sees its run_id change and
    re-publishes. RabbitMQ keeps its durable queues' confirmed messages: nothing to re-publish,
    and the unacknowledged ones come back. Either way each job ends with exactly one result."""
    from pipeline.reconcile import reconcile
    from workers.app import CeleryPublisher, create_app

    pipeline.start("worker")
    pipeline.start("writer")
    report = pipeline.submit(catalog(pipeline, 300, prefix="R"), taxonomy)
    pipeline.wait_for_results(20)
    pipeline.broker.restart()
    settings = pipeline.settings
    publisher = CeleryPublisher(create_app(settings), settings)
    reconciled = reconcile(pipeline.engine, publisher, republish_after_s=settings.republish_after_s)
    if pipeline.broker.name == "redis":  # queued and unacknowledged messages are gone
        assert reconciled.lost_messages + reconciled.published > 0
    pipeline.wait_for_run(report.run_id)
    assert_exactly_once(pipeline, report.run_id, 300)


def test_postgres_connections_cut_mid_run_still_give_one_result_per_job(
    pipeline: Pipeline, taxonomy: Taxonomy, postgres_admin: Engine
) -> None:
    pipeline.start("worker")
    pipeline.start("writer")
    report = pipeline.submit(catalog(pipeline, 300, prefix="P"), taxonomy)
    pipeline.wait_for_results(20)
    database = sa.engine.make_url(pipeline.database_url).database
    cut = 0
    for _ in range(8):  # every connection the worker and the writer hold, several times over
        with postgres_admin.connect() as admin:
            cut += admin.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": database},
            ).scalar_one()
        time.sleep(0.4)
    assert cut > 0
    pipeline.wait_for_run(report.run_id)
    assert_exactly_once(pipeline, report.run_id, 300)


def test_bad_items_do_not_hold_up_good_ones_and_a_second_submit_reuses_results(
    pipeline: Pipeline, taxonomy: Taxonomy
) -> None:
    pipeline.start("worker")
    pipeline.start("writer")
    path = catalog(pipeline, 40, prefix="C", bad=6)
    first = pipeline.submit(path, taxonomy)
    pipeline.wait_for_run(first.run_id)
    assert pipeline.scalar("SELECT state FROM runs WHERE id = :r", r=first.run_id) == "partial"
    assert pipeline.scalar("SELECT count(*) FROM jobs WHERE run_id = :r AND state = 'failed'", r=first.run_id) == 6
    second = pipeline.submit(path, taxonomy)
    pipeline.wait_for_run(second.run_id)
    hits = pipeline.scalar("SELECT count(*) FROM jobs WHERE run_id = :r AND cache_hit", r=second.run_id)
    assert hits == 40
    assert_exactly_once(pipeline, second.run_id, 46)


@pytest.mark.timeout(600)
def test_a_worker_fails_each_poisoned_item_alone_on_its_first_attempt(pipeline: Pipeline, taxonomy: Taxonomy) -> None:
    # Issue 9, case 1: poisoned items (0-3 byte files and bodies, a directory, HTTP 204 and an
    # unprompted 304, 256.1.1.1, xn--, redirects to them) in the same queue messages as good ones.
    # Before the per-item boundary each such message failed whole, was retried after its lease,
    # and every job in it ended attempts_exhausted with no cause.
    from tests.test_intake_boundary import expected_codes, poisoned_catalog, populate, running_odd_server

    with running_odd_server() as server:
        rows = poisoned_catalog(populate(pipeline.images), server, good=8)
        rows = [(sku, uri) for sku, uri in rows if "\0" not in uri and not uri.startswith("http://[::1")]
        pipeline.env["SKUTAG_ALLOWED_HOSTS"] = f'["{server}"]'
        pipeline.start("worker")
        pipeline.start("writer")
        catalog_path = pipeline.images / "poisoned.csv"
        catalog_path.write_text("sku,image_uri\n" + "".join(f"{sku},{uri}\n" for sku, uri in rows))
        report = pipeline.submit(catalog_path, taxonomy)
        pipeline.wait_for_run(report.run_id, timeout=180)
        expected = {sku: code for sku, code in expected_codes(pipeline.images, server).items() if sku in dict(rows)}
    with pipeline.engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT sku, state, last_error_code, attempts FROM jobs")).all()
    assert {sku: code for sku, state, code, _ in jobs if state == "failed"} == expected, pipeline.logs_text()
    assert {state for sku, state, _, _ in jobs if sku.startswith("GOOD")} <= {"done", "needs_review"}
    # (Attempts are not asserted: this fixture's 4 s lease expires under a loaded CPU and the
    # reconciler re-runs slow jobs by design; the codes above are what the poison used to erase.)
