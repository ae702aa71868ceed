"""The ledger and the reconciler against real databases; catalog parsing; the producer into real Redis."""

from __future__ import annotations

import base64
import io
import json
from datetime import timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.catalog import RowError, read_catalog
from pipeline.errors import InputError
from pipeline.producer import submit_catalog
from pipeline.reconcile import reconcile
from pipeline.settings import load_settings
from schemas.results import ErrorCode, ItemError
from schemas.taxonomy import Taxonomy
from tests.conftest import RecordingPublisher, make_jobs


# --- catalog files ---------------------------------------------------------------------------
def parse(text: str, name: str = "catalog.csv") -> list[tuple[int, object]]:
    return list(read_catalog(io.StringIO(text), name))


def test_csv_rows_and_bad_rows_with_line_numbers() -> None:
    rows = parse(
        "SKU,Image_URL,title,category\n"
        "A-1,https://img.example.com/a.jpg,Red dress,dress\n"
        ",https://img.example.com/b.jpg,,\n"
        "A-3,,,\n"
        "A-4,ftp://example.com/x.jpg,,\n"
        "\n"
        'A-6,images/a6.jpg,"a title, with a comma",\n'
        "A-7,a.jpg,x,y,extra\n"
    )
    good = {number: row for number, row in rows if not isinstance(row, RowError)}
    bad = {number: str(row) for number, row in rows if isinstance(row, RowError)}
    assert sorted(good) == [2, 7]
    assert good[2].category_hint == "dress" and good[7].title == "a title, with a comma"  # type: ignore[attr-defined]
    assert bad == {
        3: "line 3: sku is empty",
        4: "line 4: image_uri is empty",
        5: "line 5: image_uri scheme 'ftp' is not supported (http, https, file, a path, s3, gs, ...)",
        8: "line 8: 5 fields, the header has 4",
    }


def test_jsonl_rows() -> None:
    rows = parse('{"sku": "J-1", "image_uri": "a.jpg"}\nnot json\n[1, 2]\n{"sku": "J-4", "image_uri": 5}\n', "c.jsonl")
    assert [str(r) if isinstance(r, RowError) else r.sku for _, r in rows] == [  # type: ignore[attr-defined]
        "J-1",
        "line 2: not valid JSON: Expecting value",
        "line 3: not a JSON object",
        "J-4",
    ]


def test_a_csv_without_the_required_columns_is_refused() -> None:
    with pytest.raises(InputError, match=r"catalog.csv: the header needs image_uri and sku columns"):
        parse("name,url\nx,y\n")


# --- claims and leases -----------------------------------------------------------------------
def test_a_job_is_claimed_once_while_its_lease_lives(engine: Engine) -> None:
    jobs = make_jobs(engine, 3)
    now = ledger.utcnow()
    with engine.begin() as conn:
        first = ledger.claim_jobs(conn, jobs, lease_s=60, max_attempts=3, now=now)
        again = ledger.claim_jobs(conn, jobs, lease_s=60, max_attempts=3, now=now + timedelta(seconds=30))
        later = ledger.claim_jobs(conn, jobs[:1], lease_s=60, max_attempts=3, now=now + timedelta(seconds=61))
    assert [j.job_id for j in first.claimed] == [j.job_id for j in jobs]
    assert again.claimed == [] and again.skipped == [j.job_id for j in jobs]
    assert [(j.job_id, j.attempt) for j in later.claimed] == [(jobs[0].job_id, 2)]


def test_attempts_run_out_into_a_dead_letter(engine: Engine) -> None:
    (job,) = make_jobs(engine, 1)
    with engine.begin() as conn:
        for attempt in range(2):
            claim = ledger.claim_jobs(conn, [job], lease_s=60, max_attempts=2)
            assert [j.attempt for j in claim.claimed] == [attempt + 1]
            ledger.release_jobs(conn, [(job.job_id, ItemError(code=ErrorCode.TIMEOUT, message="slow host"))])
        claim = ledger.claim_jobs(conn, [job], lease_s=60, max_attempts=2)
    assert claim.claimed == []
    ((spec, error),) = claim.exhausted
    assert spec.job_id == job.job_id and error.code == ErrorCode.ATTEMPTS_EXHAUSTED
    assert error.message == "gave up after 2 attempts; last error: timeout: slow host"


# --- the reconciler --------------------------------------------------------------------------
def test_reconcile_publishes_what_no_message_carries(engine: Engine) -> None:
    jobs = make_jobs(engine, 4)
    publisher = RecordingPublisher()
    settings = load_settings()
    report = reconcile(engine, publisher, republish_after_s=settings.republish_after_s)
    assert report.published == 4 and publisher.job_ids == [j.job_id for j in jobs]
    assert (
        reconcile(engine, publisher, republish_after_s=settings.republish_after_s).published == 0
    )  # all marked published now


def test_reconcile_requeues_expired_leases(engine: Engine) -> None:
    jobs = make_jobs(engine, 2)
    publisher = RecordingPublisher()
    settings = load_settings()
    reconcile(engine, publisher, republish_after_s=settings.republish_after_s)
    with engine.begin() as conn:
        ledger.claim_jobs(conn, jobs, lease_s=10, max_attempts=3)
    publisher.published.clear()
    assert (
        reconcile(engine, publisher, republish_after_s=settings.republish_after_s).published == 0
    )  # leases still alive
    report = reconcile(
        engine, publisher, republish_after_s=settings.republish_after_s, now=ledger.utcnow() + timedelta(seconds=11)
    )
    assert report.expired_leases == 2 and publisher.job_ids == [j.job_id for j in jobs]


def test_reconcile_republishes_after_the_broker_lost_its_queue(engine: Engine) -> None:
    jobs = make_jobs(engine, 3)
    publisher = RecordingPublisher("before-restart")
    settings = load_settings()
    reconcile(engine, publisher, republish_after_s=settings.republish_after_s)
    publisher.published.clear()
    assert reconcile(engine, publisher, republish_after_s=settings.republish_after_s).published == 0
    publisher.current_epoch = "after-restart"  # Redis restarted without persistence
    report = reconcile(engine, publisher, republish_after_s=settings.republish_after_s)
    assert report.lost_messages == 3 and publisher.job_ids == [j.job_id for j in jobs]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT broker_epoch FROM runs")).scalar_one() == "after-restart"


# --- the producer into real Redis ------------------------------------------------------------


@pytest.mark.redis
def test_submit_records_then_publishes_in_chunks(pg_engine: Engine, taxonomy: Taxonomy, redis_url: str) -> None:
    from workers.app import QUEUE_NEW, CeleryPublisher, create_app

    settings = load_settings(broker_url=redis_url, batch_size=32)
    lines = ["sku,image_uri"] + [f"P-{i},https://img.example.com/{i}.jpg" for i in range(100)]
    lines += ["P-5,https://img.example.com/5.jpg", ",x.jpg"]  # the same image twice; no sku
    publisher = CeleryPublisher(create_app(settings), settings)
    report = submit_catalog(read_catalog(io.StringIO("\n".join(lines))), pg_engine, settings, taxonomy, publisher)
    assert (report.accepted, report.published) == (100, 100)
    assert [str(b) for b in report.bad_rows] == [
        "line 102: sku 'P-5' already has image 'https://img.example.com/5.jpg' on line 7",
        "line 103: sku is empty",
    ]
    client = redis.Redis.from_url(redis_url)
    messages = [json.loads(raw) for raw in client.lrange(QUEUE_NEW, 0, -1)]
    assert len(messages) == 4  # 32 + 32 + 32 + 4
    bodies = [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]
    assert sorted(job["sku"] for body in bodies for job in body) == sorted(f"P-{i}" for i in range(100))
    with pg_engine.connect() as conn:
        unpublished = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE published_at IS NULL")).scalar_one()
        epoch = conn.execute(sa.text("SELECT broker_epoch FROM runs")).scalar_one()
    assert unpublished == 0 and epoch == client.info("server")["run_id"]


@pytest.mark.redis
def test_submit_with_the_broker_down_keeps_the_jobs_for_reconcile(pg_engine: Engine, taxonomy: Taxonomy) -> None:
    from workers.app import CeleryPublisher, create_app

    settings = load_settings(broker_url="redis://127.0.0.1:1/0")
    app = create_app(settings)
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {"max_retries": 0}
    report = submit_catalog(
        read_catalog(io.StringIO("sku,image_uri\nD-1,a.jpg\nD-2,b.jpg\n")),
        pg_engine,
        settings,
        taxonomy,
        CeleryPublisher(app, settings),
    )
    assert report.accepted == 2 and report.published == 0
    assert report.publish_error is not None and report.publish_error.startswith(
        "broker unreachable at redis://127.0.0.1:1/0"
    )
    with pg_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs WHERE published_at IS NULL")).scalar_one() == 2


@pytest.mark.redis
def test_cli_submit_and_reconcile(migrated_postgres_url: str, pg_engine: Engine, redis_url: str, tmp_path: Any) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    env = {"SKUTAG_DATABASE_URL": migrated_postgres_url, "SKUTAG_BROKER_URL": redis_url}
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"sku": "C-1", "image_uri": "a.jpg"}\n{"sku": "C-2", "image_uri": "b.jpg"}\n{"sku": ""}\n')
    runner = CliRunner()
    submitted = runner.invoke(main, ["submit", str(catalog)], env=env)
    assert submitted.exit_code == 0, submitted.output
    assert "bad row line 3: sku is empty" in submitted.output
    assert "run 1: 2 jobs recorded, 2 published" in submitted.output
    assert redis.Redis.from_url(redis_url).llen("skutag.new") == 1

    with pg_engine.begin() as conn:  # as if Redis had lost the message
        conn.execute(sa.text("UPDATE jobs SET published_at = NULL"))
    reconciled = runner.invoke(main, ["reconcile"], env=env)
    assert reconciled.exit_code == 0, reconciled.output
    assert reconciled.output.strip() == "0 expired leases re-queued, 0 lost messages found, 2 jobs published"
    status = runner.invoke(main, ["status", "1", "--once"], env=env)
    assert status.exit_code == 0 and json.loads(status.output) == {
        "run": 1, "state": "running", "jobs": {"queued": 2}, "failures": {}
    }  # fmt: skip

    empty = runner.invoke(main, ["submit", str(tmp_path / "missing.csv")], env=env)
    assert empty.exit_code == 2 and "No such file or directory" in empty.output
