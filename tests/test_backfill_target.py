"""The backfill plans against what the workers run (and warns with both values when its own
settings differ), holds its lock for its whole life, and leaves unpublished jobs queued when the
broker is down. On Postgres and SQLite."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.backfill import BackfillOptions, BackfillSummary, DryRun, run_backfill
from pipeline.cli import main
from pipeline.commands.exits import ExitCode, for_error
from pipeline.errors import RetryableError
from pipeline.settings import load_settings
from pipeline.writer import ResultWriter
from schemas.results import JobSpec
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result


def _tagged_by_workers(engine: Engine, taxonomy: Taxonomy, count: int = 3) -> None:
    """Items tagged by workers running model 'test/model', fp32, prompt 'pv-test' (conftest.provenance)."""
    ResultWriter(engine, taxonomy).write([make_result(job, taxonomy) for job in make_jobs(engine, count)])


def test_a_backfill_with_other_settings_plans_nothing_new_and_warns(engine: Engine, taxonomy: Taxonomy) -> None:
    _tagged_by_workers(engine, taxonomy)
    dry = run_backfill(load_settings(), taxonomy, engine, None, BackfillOptions(dry_run=True))
    assert isinstance(dry, DryRun)
    assert dry.by_reason == {}  # the workers' own versions: everything is current
    assert dry.planned_against is not None and dry.planned_against["model_id"] == "test/model"
    assert "latest successful result" in dry.planned_against["source"]
    model_warning = next(w for w in dry.warnings if w.startswith("SKUTAG_MODEL"))
    assert "'Qwen/Qwen3-VL-8B-Instruct'" in model_warning and "'test/model'" in model_warning
    assert any(w.startswith("SKUTAG_QUANTIZATION") and "'int8'" in w and "'fp32'" in w for w in dry.warnings)

    pinned = run_backfill(load_settings(), taxonomy, engine, None, BackfillOptions(dry_run=True, pin_model=True))
    assert isinstance(pinned, DryRun) and pinned.by_reason == {"model_changed": 3}


def test_the_cli_dry_run_says_what_it_plans_against(engine: Engine, taxonomy: Taxonomy) -> None:
    _tagged_by_workers(engine, taxonomy)
    result = CliRunner().invoke(main, ["--database-url", engine.url.render_as_string(hide_password=False),
                                       "backfill", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"planned_against"' in result.stdout and '"test/model"' in result.stdout
    assert "warning: SKUTAG_MODEL" in result.output and '"to_retag": 0' in result.stdout


def _items(engine: Engine, count: int) -> None:
    with engine.begin() as conn:
        ledger.upsert_items(conn, [ledger.CatalogRow(f"NEW-{i}", f"file:///images/new-{i}.jpg") for i in range(count)])


class _Publisher:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.published: list[int] = []

    def publish(self, jobs: Sequence[JobSpec], queue: str) -> None:
        if self.fail:
            raise RetryableError("broker unreachable at redis://127.0.0.1:1/0: refused")
        self.published += [job.job_id for job in jobs]

    def epoch(self) -> str | None:
        return None


def test_a_second_backfill_exits_6_while_the_first_waits(engine: Engine, taxonomy: Taxonomy) -> None:
    _items(engine, 2)  # never tagged: the first backfill plans and publishes them, then waits
    first: dict[str, Any] = {}
    options = BackfillOptions(poll_s=0.05)
    thread = threading.Thread(
        target=lambda: first.update(summary=run_backfill(load_settings(), taxonomy, engine, _Publisher(), options))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _published(engine):
            time.sleep(0.05)
        assert _published(engine) == 2  # the first is now waiting for its jobs
        second = CliRunner().invoke(
            main, ["--database-url", engine.url.render_as_string(hide_password=False), "backfill", "--no-wait"],
            env={"SKUTAG_BROKER_URL": "redis://127.0.0.1:1/0"},
        )  # fmt: skip
        assert second.exit_code == 6, second.output
        assert "another backfill is running" in second.output
    finally:
        with engine.begin() as conn:  # the workers finish: the first backfill ends
            conn.execute(sa.text("UPDATE jobs SET state = 'done' WHERE queue = 'backfill'"))
        thread.join(timeout=30)
    assert isinstance(first["summary"], BackfillSummary) and first["summary"].published == 2


def _published(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM jobs WHERE published_at IS NOT NULL")).scalar_one())


def test_a_backfill_that_cannot_publish_leaves_its_jobs_queued(engine: Engine, taxonomy: Taxonomy) -> None:
    _items(engine, 3)
    with pytest.raises(RetryableError, match="the next `skutag backfill` continues run") as caught:
        run_backfill(load_settings(), taxonomy, engine, _Publisher(fail=True), BackfillOptions(poll_s=0.01))
    assert for_error(caught.value) == ExitCode.UNAVAILABLE
    with engine.connect() as conn:
        states = conn.execute(
            sa.text("SELECT state, published_at IS NULL AS unpublished, count(*) FROM jobs "
                    "WHERE queue = 'backfill' GROUP BY state, published_at IS NULL")
        ).all()  # fmt: skip
    assert [(s, bool(u), n) for s, u, n in states] == [("queued", True, 3)]

    publisher = _Publisher()
    thread = threading.Thread(
        target=run_backfill, args=(load_settings(), taxonomy, engine, publisher, BackfillOptions(wait=False))
    )
    thread.start()
    thread.join(timeout=30)
    assert len(publisher.published) == 3  # the next backfill continued the run and published them
