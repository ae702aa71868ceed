"""Failures you can see: status, runs and `skutag failures` name failed skus by error code;
`skutag retry` re-queues the retryable ones as a new run. On Postgres and SQLite."""

from __future__ import annotations

import csv
import io
import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from pipeline.cli import main
from tests.conftest import make_jobs

# sku index -> (error code, message); the other jobs end done
FAILED = {
    0: ("not_found", "no file at /images/SKU-0.jpg"),
    1: ("not_found", "no file at /images/SKU-1.jpg"),
    2: ("fetch_failed", "connection reset by https://user:hunter2@cdn.example/a.jpg"),
    3: ("timeout", "no answer within 15 s"),
    4: ("attempts_exhausted", "gave up after 3 attempts; last error: timeout"),
}


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def cli(engine: Engine, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--database-url", _url(engine), *args], env=env)
    return result.exit_code, result.output


def cli_stdout(engine: Engine, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--database-url", _url(engine), *args])
    return result.exit_code, result.stdout


def finish_run(engine: Engine, kind: str = "submit", count: int = 8) -> int:
    jobs = make_jobs(engine, count, kind=kind)
    with engine.begin() as conn:
        for index, job in enumerate(jobs):
            code, message = FAILED.get(index, (None, None))
            conn.execute(
                sa.text(
                    "UPDATE jobs SET state = :s, last_error_code = :c, last_error = :m, attempts = :a WHERE id = :j"
                ),
                {"s": "failed" if code else "done", "c": code, "m": message, "a": 3 if code else 1, "j": job.job_id},
            )
        conn.execute(sa.text("UPDATE runs SET state = 'partial', finished_at = created_at WHERE id = :r"),
                     {"r": jobs[0].run_id})  # fmt: skip
    return jobs[0].run_id


def test_status_and_runs_show_failures_by_code(engine: Engine) -> None:
    run_id = finish_run(engine)
    code, output = cli(engine, "status", str(run_id), "--once")
    document = json.loads(output)
    assert code == 4 and document["failures"] == {
        "not_found": 2, "attempts_exhausted": 1, "fetch_failed": 1, "timeout": 1
    }  # fmt: skip
    code, output = cli(engine, "status", str(run_id))
    assert code == 4 and "failed by code: not_found 2" in output and f"skutag failures {run_id}" in output
    code, output = cli_stdout(engine, "runs")
    header, row = output.splitlines()[:2]
    assert header.split("\t")[-1] == "failures" and row.split("\t")[-1].startswith("not_found 2, ")


def test_failures_lists_skus_with_code_message_and_attempts(engine: Engine) -> None:
    run_id = finish_run(engine)
    code, output = cli_stdout(engine, "failures", str(run_id), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(output)))
    assert code == 0 and len(rows) == 5
    by_sku = {row["sku"]: row for row in rows}
    assert by_sku["SKU-000000"] | {"image_uri": ""} == {
        "sku": "SKU-000000", "code": "not_found", "attempts": "3", "message": "no file at /images/SKU-0.jpg",
        "image_uri": "",
    }  # fmt: skip
    assert "hunter2" not in output and "https://user:***@cdn.example/a.jpg" in by_sku["SKU-000002"]["message"]

    code, output = cli_stdout(engine, "failures", str(run_id), "--code", "not_found")
    lines = output.splitlines()[1:]
    assert code == 0 and [line.split("\t")[:3] for line in lines] == [
        ["SKU-000000", "not_found", "3"], ["SKU-000001", "not_found", "3"]
    ]  # fmt: skip
    assert cli(engine, "failures", "999")[0] == 2


def test_retry_requeues_the_retryable_failures_as_a_new_run(engine: Engine) -> None:
    run_id = finish_run(engine)
    with engine.begin() as conn:  # SKU-3 was tagged again since: nothing left to retry for it
        later = conn.execute(
            sa.text(
                "INSERT INTO runs (kind, state, config, total_jobs, created_at) "
                "VALUES ('submit', 'done', '{}', 1, CURRENT_TIMESTAMP) RETURNING id"
            )
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO jobs (run_id, sku, image_uri, reason, queue, state, attempts, created_at, "
                "updated_at) VALUES (:r, 'SKU-000003', 'x.jpg', 'submitted', 'new', 'done', 1, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"r": later},
        )
        conn.execute(sa.text("UPDATE items SET image_uri = 'file:///images/new-2.jpg' WHERE sku = 'SKU-000002'"))
    code, output = cli(engine, "retry", str(run_id), env={"SKUTAG_BROKER_URL": "redis://:pw@127.0.0.1:1/0"})
    assert code == 3, output  # the broker is down: the jobs wait in the ledger for the reconciler
    assert "retrying run" in output and "final failures left alone: not_found 2" in output and ":pw@" not in output
    with engine.connect() as conn:
        new_run = conn.execute(sa.text("SELECT max(id) FROM runs")).scalar_one()
        retried = conn.execute(
            sa.text("SELECT sku, image_uri, state, reason, published_at FROM jobs WHERE run_id = :r ORDER BY sku"),
            {"r": new_run},
        ).all()
        kind = conn.execute(sa.text("SELECT kind FROM runs WHERE id = :r"), {"r": new_run}).scalar_one()
    assert kind == "retry"
    assert [(r.sku, r.image_uri, r.state, r.reason, r.published_at) for r in retried] == [
        ("SKU-000002", "file:///images/new-2.jpg", "queued", "retry_failed", None),
        ("SKU-000004", "file:///images/SKU-4.jpg", "queued", "retry_failed", None),
    ]


def test_retry_by_code_and_final_codes(engine: Engine) -> None:
    run_id = finish_run(engine, kind="local")
    code, output = cli(engine, "retry", str(run_id), "--code", "not_found")
    assert code == 2 and "not_found failures are final" in output
    code, output = cli(engine, "retry", str(run_id), "--code", "timeout")
    assert code == 0 and "1 jobs retrying" in output and "(timeout 1)" in output
    assert "skutag run --resume" in output  # a local run's retry is finished in-process
    code, output = cli(engine, "retry", str(run_id), "--code", "timeout")
    assert code == 0 and "nothing to retry" in output  # its job is no longer the sku's latest


@pytest.mark.redis
def test_retry_publishes_when_the_broker_is_up(pg_engine: Engine, redis_url: str) -> None:
    run_id = finish_run(pg_engine)
    code, output = cli(pg_engine, "retry", str(run_id), env={"SKUTAG_BROKER_URL": redis_url})
    assert code == 0 and "follow it: skutag status" in output, output
    with pg_engine.connect() as conn:
        unpublished = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE reason = 'retry_failed' AND published_at IS NULL")
        ).scalar_one()
    assert unpublished == 0
