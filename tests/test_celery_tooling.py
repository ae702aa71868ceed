"""Celery's own tools against a running `skutag worker`: `celery -A workers.app inspect ping`,
remote control, and the event stream that `celery events` and Flower read."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from pipeline.metrics import WorkerMetrics
from pipeline.settings import load_settings
from tests.conftest import REDIS_URL, _unavailable
from workers.app import QUEUE_NEW, TAG_TASK, create_app, environment_app

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

CELERY = str(Path(sys.executable).with_name("celery"))


class _SeenError(Exception):
    """Raised from an event handler to stop capturing: the awaited event arrived."""


def capture_until(
    app: Any, wanted: Callable[[dict[str, Any]], bool], trigger: Callable[[], None], timeout: float
) -> list[dict[str, Any]]:
    """Listen to the event stream; once the first event shows we are subscribed (workers send a
    heartbeat every 2 s), call trigger; return the events up to the wanted one."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout

    def on_event(event: dict[str, Any]) -> None:
        if not seen:
            threading.Thread(target=trigger).start()
        seen.append(event)
        if wanted(event) or time.monotonic() > deadline:
            raise _SeenError

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": on_event})
        try:
            receiver.capture(limit=None, timeout=timeout)
        except _SeenError:
            if wanted(seen[-1]):
                return seen
        except TimeoutError:
            pass
    raise AssertionError(f"no such event within {timeout} s; saw {[e.get('type') for e in seen]}")


@dataclass
class Processes:
    env: dict[str, str]
    worker_log: Path
    writer_log: Path
    worker_metrics: str
    writer_metrics: str


@pytest.fixture(scope="module")
def processes(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, migrated_postgres_url: str
) -> Iterator[Processes]:
    """One `skutag worker` and one `skutag writer` for the module (starting them takes a while)."""
    redis_url = flushed_redis()
    logs = tmp_path_factory.mktemp("celery-processes")
    env = {
        **os.environ,
        "SKUTAG_DATABASE_URL": migrated_postgres_url,
        "SKUTAG_BROKER_URL": redis_url,
        "SKUTAG_MODEL": str(tiny_model_dir),
        "SKUTAG_QUANTIZATION": "fp32",
        "SKUTAG_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    ports = free_port(), free_port()
    commands = {
        # --events and --metrics-port are skutag's; --loglevel goes through to `celery worker`.
        "worker": ["worker", "--events", "--loglevel=DEBUG", "--concurrency", "1", "--metrics-port", str(ports[0])],
        "writer": ["writer", "--no-reconcile", "--metrics-port", str(ports[1])],
    }
    started: list[subprocess.Popen[bytes]] = []
    try:
        for role, args in commands.items():
            with (logs / f"{role}.log").open("wb") as output:
                # The writer logs JSON: every line it writes must then be one JSON object.
                role_env = env | {"SKUTAG_LOG_FORMAT": "json"} if role == "writer" else env
                started.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pipeline", *args], env=role_env, stdout=output, stderr=subprocess.STDOUT
                    )
                )
        for process, role in zip(started, commands, strict=True):
            wait_for_ready(process, logs / f"{role}.log")
        yield Processes(
            env,
            logs / "worker.log",
            logs / "writer.log",
            f"http://127.0.0.1:{ports[0]}/metrics",
            f"http://127.0.0.1:{ports[1]}/metrics",
        )
    finally:
        for process in started:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flushed_redis() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
        client.flushdb()
    except redis.ConnectionError as exc:
        _unavailable("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


def wait_for_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"worker not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CELERY, "-A", "workers.app", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_celery_tools_see_a_running_worker(processes: Processes) -> None:
    env, log = processes.env, processes.worker_log
    ping = celery(env, "inspect", "ping", "--timeout", "10")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "pong" in ping.stdout and "skutag-gpu-" in ping.stdout and "skutag-writer-" in ping.stdout

    queues = celery(env, "inspect", "active_queues", "--timeout", "10")
    assert QUEUE_NEW in queues.stdout and "skutag.backfill" in queues.stdout, queues.stdout + queues.stderr

    control = celery(env, "control", "enable_events", "--timeout", "10")
    assert control.returncode == 0 and "events" in control.stdout, control.stdout + control.stderr

    registered = celery(env, "inspect", "registered", "--timeout", "10")
    assert TAG_TASK in registered.stdout

    # The passed-through --loglevel=DEBUG reached celery worker.
    assert "DEBUG" in log.read_text(errors="replace")


def test_the_worker_sends_heartbeats_and_task_events(processes: Processes) -> None:
    env = processes.env
    settings = load_settings(broker_url=env["SKUTAG_BROKER_URL"])
    app = create_app(settings)
    # Heartbeats from both the GPU worker and the writer (Flower shows both as online).
    beats = capture_until(
        app, lambda e: e["type"] == "worker-heartbeat" and e["hostname"].startswith("skutag-gpu-"), lambda: None, 60
    )
    beats += capture_until(
        app, lambda e: e["type"] == "worker-heartbeat" and e["hostname"].startswith("skutag-writer-"), lambda: None, 60
    )
    assert {e["hostname"].split("-")[1] for e in beats if e["type"] == "worker-heartbeat"} == {"gpu", "writer"}

    # A job the ledger does not know: the worker skips it, and the task still succeeds.
    message = [{"job_id": 987654321, "run_id": 1, "sku": "NOPE", "image_uri": "file:///nope.jpg"}]
    events = capture_until(
        app,
        lambda e: e["type"] == "task-succeeded",
        lambda: app.send_task(TAG_TASK, args=[message], queue=QUEUE_NEW),
        timeout=120,
    )
    types = [event["type"] for event in events]
    assert "task-received" in types, types
    received = next(event for event in events if event["type"] == "task-received")
    assert received["name"] == TAG_TASK


def test_the_module_level_app_reads_settings_when_first_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.app

    assert isinstance(workers.app.app, Celery)  # what `celery -A workers.app` finds
    monkeypatch.setenv("SKUTAG_BROKER_URL", "redis://127.0.0.1:6390/3")
    app = environment_app()
    monkeypatch.setenv("SKUTAG_BROKER_URL", "redis://127.0.0.1:6391/4")
    assert app.conf.broker_url == "redis://127.0.0.1:6391/4"
    assert app.conf.task_default_queue == QUEUE_NEW


def test_each_process_serves_its_metrics(processes: Processes) -> None:
    from pipeline.metrics import WriterMetrics
    from tests.test_metrics import exposed_names, scrape

    worker_names = exposed_names(httpx.get(processes.worker_metrics, timeout=10).text)
    writer_names = exposed_names(httpx.get(processes.writer_metrics, timeout=10).text)
    expected_worker = exposed_names(scrape(WorkerMetrics().registry)) | {"skutag_queue_depth"}
    expected_writer = exposed_names(scrape(WriterMetrics().registry)) | {"skutag_queue_depth"}
    assert expected_worker <= worker_names, sorted(expected_worker - worker_names)
    assert expected_writer <= writer_names, sorted(expected_writer - writer_names)
    for names in (worker_names, writer_names):
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names
    assert {
        "skutag_jobs_finished_total",
        "skutag_gpu_batch_seconds_bucket",
        "skutag_job_failures_total",
    } <= worker_names
    assert "skutag_results_written_total" in writer_names and "skutag_jobs_finished_total" not in writer_names
    depth = httpx.get(processes.worker_metrics, timeout=10).text
    assert 'skutag_queue_depth{queue="skutag.new"}' in depth


def test_a_json_logging_process_writes_only_json_under_its_own_name(processes: Processes) -> None:
    documents = [json.loads(line) for line in processes.writer_log.read_text().splitlines() if line.strip()]
    assert {document["service"] for document in documents} == {"writer"}
    loggers = {document["logger"] for document in documents}
    assert "skutag.writer" in loggers and "skutag.worker" not in loggers
    assert any(document["message"].endswith(" ready.") for document in documents)
