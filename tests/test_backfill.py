"""The backfill: the delta matrix (each reason re-tags, nothing else does), crash and resume, one
backfill at a time, the backpressure bound against real Redis, the summary and the exit codes."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.backfill import BackfillOptions, DryRun, backfill_lock, enqueue, run_backfill
from pipeline.cli import main
from pipeline.errors import LockedError, RetryableError
from pipeline.producer import config_snapshot
from pipeline.settings import Settings, load_settings
from schemas.taxonomy import Taxonomy
from tests.conftest import REDIS_URL, RecordingPublisher


def tag_set(conn: sa.Connection, sku: str, uri: str, versions: dict[str, Any], **changes: Any) -> None:
    row = {
        "sku": sku, "job_id": 0, "status": "tagged", "image_uri": uri, "image_sha256": changes.pop("sha", "0" * 64),
        "model_id": versions["model"], "quantization": versions["quantization"],
        "prompt_version": versions["prompt_version"], "taxonomy_version": versions["taxonomy_version"],
        "produced_at": ledger.utcnow() - timedelta(days=changes.pop("age_days", 1)), "updated_at": ledger.utcnow(),
    } | changes  # fmt: skip
    conn.execute(sa.text(f"INSERT INTO tag_sets ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"), row)


def past_job(conn: sa.Connection, sku: str, uri: str, state: str, code: str | None = None) -> None:
    run_id = ledger.create_run(conn, "submit", {})
    (job,) = ledger.add_jobs(conn, run_id, [(sku, uri)])
    conn.execute(
        sa.text("UPDATE jobs SET state = :s, last_error_code = :c WHERE id = :j"),
        {"s": state, "c": code, "j": job.job_id},
    )


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    for name in ("same.jpg", "changed.jpg"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    return tmp_path


def build_matrix(engine: Engine, settings: Settings, taxonomy: Taxonomy, images: Path) -> dict[str, str | None]:
    """Items set up for each reason; returns sku -> the reason expected (None: not re-tagged)."""
    current = config_snapshot(settings, taxonomy)
    old = current | {"taxonomy_version": "tx-old", "prompt_version": "pv-old"}
    expected: dict[str, str | None] = {}
    items = {sku: f"https://img.example.com/{sku}.jpg" for sku in "ABCDEFGHIJKLM"}
    items["N"] = str(images / "changed.jpg")
    items["O"] = str(images / "same.jpg")
    with engine.begin() as conn:
        ledger.upsert_items(conn, [ledger.CatalogRow(sku, uri) for sku, uri in items.items()])
        expected["A"] = "never_tagged"
        tag_set(conn, "B", items["B"], current)
        expected["B"] = None
        tag_set(conn, "C", "https://img.example.com/C-old.jpg", current)
        expected["C"] = "image_uri_changed"
        tag_set(conn, "D", items["D"], current | {"model": "Qwen/Qwen2.5-VL-7B-Instruct"})
        expected["D"] = "model_changed"
        tag_set(conn, "E", items["E"], current | {"quantization": "bf16"})
        expected["E"] = "quantization_changed"
        tag_set(conn, "F", items["F"], old)
        expected["F"] = "taxonomy_changed"
        tag_set(conn, "G", items["G"], current | {"prompt_version": "pv-old"})
        expected["G"] = "prompt_changed"
        tag_set(conn, "H", items["H"], current, age_days=30)
        expected["H"] = "older_than_max_age"
        past_job(conn, "I", items["I"], "failed", "timeout")
        expected["I"] = "retry_failed"
        past_job(conn, "J", items["J"], "failed", "not_an_image")
        expected["J"] = None
        past_job(conn, "K", "https://img.example.com/K-broken.jpg", "failed", "not_an_image")
        expected["K"] = "never_tagged"  # its URI changed since it failed
        past_job(conn, "L", items["L"], "queued")
        expected["L"] = None  # in flight in another run
        for _ in range(settings.max_attempts):
            past_job(conn, "M", items["M"], "failed", "fetch_failed")
        expected["M"] = None  # out of retries
        tag_set(conn, "N", items["N"], current, sha=hashlib.sha256(b"the old bytes").hexdigest())
        expected["N"] = "image_content_changed"
        tag_set(conn, "O", items["O"], current, sha=hashlib.sha256(b"same.jpg" * 10).hexdigest())
        expected["O"] = None
    return expected


def test_each_reason_retags_and_nothing_else_does(engine: Engine, taxonomy: Taxonomy, catalog_dir: Path) -> None:
    settings = load_settings(image_roots=[catalog_dir])
    expected = build_matrix(engine, settings, taxonomy, catalog_dir)
    options = BackfillOptions(check_content=True, max_age=timedelta(days=7))
    dry = run_backfill(
        settings, taxonomy, engine, None, BackfillOptions(dry_run=True, check_content=True, max_age=timedelta(days=7))
    )
    assert isinstance(dry, DryRun)
    wanted = {reason for reason in expected.values() if reason}
    assert dry.by_reason == {reason: sum(1 for r in expected.values() if r == reason) for reason in wanted}
    assert dry.content_check is not None and dry.content_check["changed"] == 1

    summary = run_backfill(settings, taxonomy, engine, None, options)
    assert not isinstance(summary, DryRun)
    with engine.connect() as conn:
        planned = dict(
            conn.execute(sa.text("SELECT sku, reason FROM jobs WHERE run_id = :r"), {"r": summary.run_id}).all()
        )
    assert planned == {sku: reason for sku, reason in expected.items() if reason}

    # Without --max-age and --check-content, those two reasons do not fire.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET state = 'done'"))
        conn.execute(sa.text("UPDATE jobs SET state = 'done' WHERE run_id = :r"), {"r": summary.run_id})
    dry = run_backfill(settings, taxonomy, engine, None, BackfillOptions(dry_run=True))
    assert isinstance(dry, DryRun)
    assert "older_than_max_age" not in dry.by_reason and "image_content_changed" not in dry.by_reason


@pytest.fixture
def broker(redis_url: str) -> str:
    return redis_url


def seed_items(engine: Engine, count: int) -> None:
    with engine.begin() as conn:
        ledger.upsert_items(
            conn, [ledger.CatalogRow(f"BF-{i:05d}", f"https://img.example.com/{i}.jpg") for i in range(count)]
        )


class FakeWorkers:
    """Stands in for the GPU workers (not under test): takes messages off the real Redis queue and
    finishes their jobs in the ledger, a few messages per round."""

    def __init__(
        self, engine: Engine, per_round: int = 2, fail_every: int = 0, broker: str = REDIS_URL,
        versions: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.versions = versions
        self.engine = engine
        self.per_round = per_round
        self.fail_every = fail_every
        self.client = redis.Redis.from_url(broker)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeWorkers:
        self.thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _take(self) -> list[int]:
        ids = []
        for _ in range(self.per_round):
            raw = self.client.rpop("skutag.backfill")
            if raw is None:
                break
            body = json.loads(base64.b64decode(json.loads(raw)["body"]))
            ids += [job["job_id"] for job in body[0][0]]
        return ids

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            ids = self._take()
            with self.engine.begin() as conn:
                for job_id in ids:
                    failed = self.fail_every and job_id % self.fail_every == 0
                    conn.execute(
                        sa.text("UPDATE jobs SET state = :s, last_error_code = :c, finished_at = :t WHERE id = :j"),
                        {
                            "s": "failed" if failed else "done",
                            "c": "corrupt" if failed else None,
                            "t": ledger.utcnow(),
                            "j": job_id,
                        },
                    )
                    if self.versions and not failed:
                        sku, uri = conn.execute(
                            sa.text("SELECT sku, image_uri FROM jobs WHERE id = :j"), {"j": job_id}
                        ).one()
                        conn.execute(sa.text("DELETE FROM tag_sets WHERE sku = :s"), {"s": sku})
                        tag_set(conn, sku, uri, self.versions)
                conn.execute(
                    sa.text("""
                    UPDATE runs SET finished_at = :t, state = CASE
                      WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = runs.id AND j.state = 'failed')
                      THEN 'partial' ELSE 'done' END
                    WHERE state = 'running' AND total_jobs > 0
                      AND NOT EXISTS (
                        SELECT 1 FROM jobs j WHERE j.run_id = runs.id AND j.state IN ('queued', 'running'))"""),
                    {"t": ledger.utcnow()},
                )


@pytest.mark.redis
def test_backpressure_keeps_redis_bounded(pg_engine: Engine, taxonomy: Taxonomy, broker: str) -> None:
    from workers.app import QUEUE_BACKFILL, CeleryPublisher, create_app

    seed_items(pg_engine, 600)
    settings = load_settings(broker_url=broker, batch_size=10)
    client = redis.Redis.from_url(broker)
    depths: list[int] = []
    publisher = CeleryPublisher(create_app(settings), settings)
    with FakeWorkers(pg_engine, broker=broker):
        summary = run_backfill(
            settings, taxonomy, pg_engine, publisher, BackfillOptions(max_outstanding=50, poll_s=0.05),
            on_progress=lambda progress, outstanding: depths.append(client.llen(QUEUE_BACKFILL)),
        )  # fmt: skip
    assert not isinstance(summary, DryRun)
    assert summary.published == 600 and summary.jobs_by_state == {"done": 600}
    assert summary.state == "done"
    assert max(depths) * 10 <= 50  # messages of 10 jobs: never more than 50 jobs waiting in Redis
    assert max(depths) >= 3  # and the bound was actually reached


@pytest.mark.redis
def test_a_crashed_backfill_resumes_its_run(pg_engine: Engine, taxonomy: Taxonomy, broker: str) -> None:
    from workers.app import CeleryPublisher, create_app

    seed_items(pg_engine, 120)
    settings = load_settings(broker_url=broker, batch_size=10)

    class DiesOnSecondPublish(CeleryPublisher):
        calls = 0

        def publish(self, jobs: Any, queue: str) -> None:
            type(self).calls += 1
            if type(self).calls > 1:
                raise RetryableError("broker went away")
            super().publish(jobs, queue)

    with FakeWorkers(pg_engine, broker=broker), pytest.raises(RetryableError):
        run_backfill(settings, taxonomy, pg_engine, DiesOnSecondPublish(create_app(settings), settings),
                     BackfillOptions(max_outstanding=20, poll_s=0.05))  # fmt: skip
    with pg_engine.connect() as conn:
        (run_id,) = conn.execute(sa.text("SELECT id FROM runs WHERE kind = 'backfill'")).scalars().all()
        published_before = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE published_at IS NOT NULL")
        ).scalar_one()
    assert published_before == 20
    with FakeWorkers(pg_engine, broker=broker):
        summary = run_backfill(settings, taxonomy, pg_engine, CeleryPublisher(create_app(settings), settings),
                               BackfillOptions(max_outstanding=30, poll_s=0.05))  # fmt: skip
    assert not isinstance(summary, DryRun)
    assert summary.resumed and summary.run_id == run_id
    assert summary.published == 100  # the 20 published before the crash were not enqueued again
    assert summary.jobs_by_state == {"done": 120} and summary.planned_by_reason == {"never_tagged": 120}
    with pg_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 1


def test_only_one_backfill_at_a_time(engine: Engine, taxonomy: Taxonomy) -> None:
    with backfill_lock(engine), pytest.raises(LockedError, match="another backfill is running"):
        run_backfill(load_settings(), taxonomy, engine, None, BackfillOptions(dry_run=True))
    assert isinstance(run_backfill(load_settings(), taxonomy, engine, None, BackfillOptions(dry_run=True)), DryRun)


@pytest.mark.redis
def test_cli_summary_and_exit_codes(
    migrated_postgres_url: str, pg_engine: Engine, broker: str, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    env = {"SKUTAG_DATABASE_URL": migrated_postgres_url, "SKUTAG_BROKER_URL": broker, "SKUTAG_BATCH_SIZE": "10"}
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(
        "sku,image_uri\n" + "".join(f"CLI-{i},https://img.example.com/{i}.jpg\n" for i in range(40)) + ",x.jpg\n"
    )
    runner = CliRunner()
    dry = runner.invoke(main, ["backfill", "--catalog", str(catalog), "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    document = json.loads(dry.output[dry.output.index("{") : dry.output.rindex("}") + 1])
    assert document["dry_run"] and document["by_reason"] == {"never_tagged": 40} and "bad row line 42" in dry.output

    versions = config_snapshot(load_settings(), taxonomy)
    with FakeWorkers(pg_engine, fail_every=7, broker=broker, versions=versions):
        # the dry run changed nothing, so the catalog is read again
        result = runner.invoke(
            main, ["backfill", "--catalog", str(catalog), "--summary", str(tmp_path / "s.json")], env=env
        )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.exit_code == 4, result.output  # some jobs failed: partial
    assert summary["state"] == "partial" and summary["jobs_by_state"]["failed"] > 0
    assert summary["failed_by_reason"] == {"corrupt": summary["jobs_by_state"]["failed"]}
    assert set(summary) >= {"run_id", "planned_by_reason", "duration_s", "images_per_s", "gpu_seconds_per_1000_skus"}

    nothing_left = runner.invoke(main, ["backfill"], env=env)  # everything is current or failed for good
    assert nothing_left.exit_code == 0, nothing_left.output
    assert json.loads(nothing_left.output[nothing_left.output.index("{") :])["jobs_by_state"] == {}

    with backfill_lock(pg_engine):
        locked = runner.invoke(main, ["backfill"], env=env)
    assert locked.exit_code == 6
    assert (
        locked.output.strip()
        == "error: another backfill is running (it holds the backfill lock); this one did not start"
    )


def test_enqueue_without_wait_publishes_only_what_fits(pg_engine: Engine, taxonomy: Taxonomy) -> None:
    seed_items(pg_engine, 30)

    summary = run_backfill(
        load_settings(), taxonomy, pg_engine, RecordingPublisher(), BackfillOptions(max_outstanding=12, wait=False)
    )
    assert not isinstance(summary, DryRun)
    assert summary.published == 12 and summary.state == "running"
    again = enqueue(pg_engine, RecordingPublisher(), summary.run_id, max_outstanding=12, wait=False)
    assert again.published == 0  # nothing finished in between: no room
    with pg_engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET state = 'done' WHERE published_at IS NOT NULL"))
    assert enqueue(pg_engine, RecordingPublisher(), summary.run_id, max_outstanding=12, wait=False).published == 12
