"""`skutag status`: progress lines when piped, an ETA while running, the mean rate when done."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.db import make_engine
from pipeline.migrate import upgrade
from pipeline.run_progress import RunSnapshot, current_rate, describe, eta_seconds, format_duration
from tests.conftest import make_jobs

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snap(state: str, counts: dict[str, int], at_s: float, finished_after_s: float | None = None) -> RunSnapshot:
    finished_at = T0 + timedelta(seconds=finished_after_s) if finished_after_s is not None else None
    return RunSnapshot(1, state, counts, T0, finished_at, T0 + timedelta(seconds=at_s))


def test_rate_and_eta_while_running() -> None:
    first = snap("running", {"done": 100, "queued": 900}, at_s=100)
    now = snap("running", {"done": 300, "failed": 20, "queued": 680}, at_s=120)
    rate = current_rate(first, now)
    assert rate == 11.0  # 220 jobs in the 20 s followed, not the run's mean of 2.7/s
    assert eta_seconds(now, rate) == 680 / 11
    assert describe(now, rate) == (
        "run 1 running: 320/1000 finished (done 300, failed 20, queued 680), 11.0 jobs/s, ETA 1m 02s"
    )


def test_before_anything_moves_the_rate_is_the_runs_mean() -> None:
    first = snap("running", {"done": 50, "queued": 50}, at_s=10)
    assert current_rate(first, first) == 5.0
    assert "ETA 10s" in describe(first, current_rate(first, first))


def test_a_finished_run_shows_its_real_mean_rate_and_no_eta() -> None:
    first = snap("done", {"done": 990, "needs_review": 10}, at_s=5000, finished_after_s=400)
    rate = current_rate(first, first)
    assert rate == 2.5  # 1000 jobs over the run's 400 s, whenever one looks
    assert describe(first, rate) == "run 1 done: 1000/1000 finished (done 990, needs_review 10), 2.5 jobs/s mean"


def test_durations_read_well() -> None:
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 * 5 + 120)] == ["0s", "1m 00s", "1m 01s", "5h 02m"]


def test_piped_status_prints_progress_lines_then_the_result(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/skutag.db"
    upgrade(url)
    engine = make_engine(url)
    jobs = make_jobs(engine, 20)

    def workers() -> None:  # stand-ins for the GPU workers: finish 5 jobs at a time, then end the run
        time.sleep(1.0)
        for start in range(0, 20, 5):
            time.sleep(0.5)
            ids = [job.job_id for job in jobs[start : start + 5]]
            with engine.begin() as conn:
                conn.execute(sa.text(f"UPDATE jobs SET state = 'done' WHERE id IN ({','.join(map(str, ids))})"))
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE runs SET state = 'done', finished_at = :t"), {"t": datetime.now(UTC)})

    thread = threading.Thread(target=workers)
    thread.start()
    result = CliRunner().invoke(main, ["--database-url", url, "status", "1", "--interval", "0.1"])
    thread.join()
    engine.dispose()
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    progress = [line for line in lines if " running: " in line]
    # One line per change (how many depends on how fast this busy machine starts the command).
    assert len(progress) >= 2, lines
    finished = [int(re.search(r"running: (\d+)/20 finished", line)[1]) for line in progress]  # type: ignore[index]
    assert finished == sorted(set(finished)), progress
    assert all(re.search(r"jobs/s, ETA \d", line) for line in progress if not line.startswith("run 1 running: 0/")), (
        progress
    )
    assert re.fullmatch(r"run 1 done: 20/20 finished \(done 20\), [\d.]+ jobs/s mean", lines[-1]), lines[-1]
    assert not lines[-1].startswith("run 1 done: 20/20 finished (done 20), 0.0")
