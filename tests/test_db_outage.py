"""Database outages: work in flight waits them out (back-off until the lease ends), then goes back
to the broker; no message is dropped after a fixed number of tries, no job is stranded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import RetryableError
from pipeline.migrate import upgrade
from pipeline.retrying import Backoff, retry_until
from schemas.taxonomy import Taxonomy
from tests.conftest import _unavailable
from tests.private_postgres import PrivatePostgres, server_bin_dir
from tests.test_pipeline_e2e import Pipeline, RedisServer, assert_exactly_once, catalog


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int) -> Any:
    calls = {"n": 0}

    def action() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise RetryableError("database unreachable")
        return "ok"

    return action


def test_retry_until_waits_out_an_outage_shorter_than_the_deadline() -> None:
    clock = FakeClock()
    result = retry_until(60, failing(12), "claiming", Backoff(0.5, 4.0), clock, clock.sleep)
    assert result == "ok"
    assert clock.sleeps[:5] == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped
    assert len(clock.sleeps) == 12  # far more than Celery's default of 3 tries


def test_retry_until_gives_up_at_the_deadline_and_not_before() -> None:
    clock = FakeClock()
    with pytest.raises(RetryableError):
        retry_until(10, failing(1000), "claiming", Backoff(0.5, 4.0), clock, clock.sleep)
    assert clock.now == pytest.approx(10)  # the last sleep is cut to the deadline


def test_retry_until_does_not_retry_final_errors() -> None:
    clock = FakeClock()

    def broken() -> None:
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        retry_until(10, broken, "claiming", clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []


def test_the_tag_task_retries_forever_not_celerys_default_three_times() -> None:
    from celery import Celery

    from pipeline.metrics import WorkerMetrics
    from workers.app import TAG_TASK
    from workers.tasks import register_tag_task

    app = Celery("test", set_as_current=False)
    register_tag_task(app, handler=None, sink=None, metrics=WorkerMetrics())  # type: ignore[arg-type]
    assert app.tasks[TAG_TASK].max_retries is None


# --- the fault test: a private Postgres stopped while a worker claims -----------------------
@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        _unavailable("initdb/pg_ctl", FileNotFoundError("no Postgres server binaries installed"))
        raise AssertionError("unreachable")
    server = PrivatePostgres(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


JOBS = 48
OUTAGE_S = 35  # longer than Celery's default retries (3 x 5 s) and two leases


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_a_postgres_outage_while_a_worker_claims_loses_no_job(
    private_postgres: PrivatePostgres, tmp_path: Path, tiny_model_dir: Path, taxonomy: Taxonomy
) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        _unavailable("redis-server", FileNotFoundError("redis-server is not installed"))
    upgrade(private_postgres.url)
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    (tmp_path / "images").mkdir()
    (tmp_path / "logs").mkdir()
    pipeline = Pipeline(private_postgres.url, redis_server, tiny_model_dir, tmp_path / "images", tmp_path / "logs")
    # Slow batches keep messages waiting to be claimed when the database goes; the default
    # republish_after_s (2 h) means a stranded job would never come back within the test.
    pipeline.env |= {"SKUTAG_LEASE_S": "15", "SKUTAG_BATCH_SIZE": "4", "SKUTAG_REPUBLISH_AFTER_S": "7200"}
    try:
        pipeline.start("worker")
        pipeline.start("writer")
        report = pipeline.submit(catalog(pipeline, JOBS, prefix="O"), taxonomy)
        pipeline.wait_for_results(8)
        private_postgres.stop()
        outage_ends = time.monotonic() + OUTAGE_S
        while time.monotonic() < outage_ends:
            pipeline.check_alive()  # an outage must not kill the worker or the writer
            time.sleep(1)
        private_postgres.start()
        pipeline.wait_for_run(report.run_id, timeout=300)
        assert_exactly_once(pipeline, report.run_id, JOBS)
        assert pipeline.scalar("SELECT count(*) FROM jobs WHERE state = 'failed'") == 0, pipeline.logs_text()
        worker_log = (tmp_path / "logs" / "worker-0.log").read_text()
        assert "claiming jobs: database error" in worker_log  # the outage was met while claiming
    except BaseException:
        print(pipeline.logs_text(), private_postgres.log_text())
        raise
    finally:
        pipeline.stop_all()
        redis_server.stop()
