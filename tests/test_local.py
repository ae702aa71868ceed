"""Local mode and the CLI around runs: `skutag run`, status, runs, export, the demo; bad items,
the result cache, resuming, and a worker's memory over a long run."""

from __future__ import annotations

import csv
import io
import json
import resource
import statistics
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.db import make_engine
from pipeline.inference import TaggingEngine
from pipeline.worker import JobHandler
from pipeline.writer import ResultWriter, WriterSink
from schemas.taxonomy import Taxonomy
from tests.conftest import engine_settings, make_jobs


def write_catalog(directory: Path, count: int, bad: bool = True) -> Path:
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        image = Image.new("RGB", (200 + index * 7, 300), ((index * 37) % 256, (index * 91) % 256, 120))
        image.save(images / f"item-{index}.jpg", "JPEG")
        rows.append((f"SKU-{index:04d}", f"images/item-{index}.jpg"))
    if bad:
        (images / "text.jpg").write_text("not pixels")
        rows += [("BAD-MISSING", "images/none.jpg"), ("BAD-TEXT", "images/text.jpg"), ("BAD-ESCAPE", "../outside.jpg")]
    path = directory / "catalog.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "image_uri"])
        writer.writerows(rows)
        if bad:
            writer.writerow(["", "images/item-0.jpg"])
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_local_run_tags_good_items_and_reports_bad_ones(tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = write_catalog(tmp_path, 12)
    url = f"sqlite:///{tmp_path}/local.db"
    code, output = cli(
        "--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32"
    )
    assert code == 4, output  # partial: the three bad items failed
    assert "bad row line 17: sku is empty" in output
    assert "run 1: 15 jobs, 1 bad rows" in output
    assert "failed by code: forbidden_address 1, not_an_image 1, not_found 1" in output
    assert "skutag failures 1" in output
    engine = make_engine(url)
    with engine.connect() as conn:
        states = dict(conn.execute(sa.text("SELECT sku, state FROM jobs")).all())
        errors = dict(conn.execute(sa.text("SELECT sku, last_error_code FROM jobs WHERE state = 'failed'")).all())
        results = conn.execute(sa.text("SELECT count(*), count(DISTINCT job_id) FROM results")).one()
    assert errors == {"BAD-MISSING": "not_found", "BAD-TEXT": "not_an_image", "BAD-ESCAPE": "forbidden_address"}
    assert all(states[f"SKU-{i:04d}"] in {"done", "needs_review"} for i in range(12))
    assert tuple(results) == (15, 15)

    # The same catalog again: every good image comes from the result cache.
    code, output = cli(
        "--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32"
    )
    assert code == 4 and "12 from the result cache" in output
    with engine.connect() as conn:
        hits = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE run_id = 2 AND cache_hit")).scalar_one()
    assert hits == 12

    code, output = cli("--database-url", url, "status", "2", "--once")
    assert code == 4
    assert json.loads(output) == {
        "run": 2, "state": "partial", "jobs": {"failed": 3, **_good_counts(engine, 2)},
        "failures": {"forbidden_address": 1, "not_an_image": 1, "not_found": 1},
    }  # fmt: skip
    code, output = cli("--database-url", url, "runs")
    assert code == 0 and "local" in output and "partial" in output
    engine.dispose()


def _good_counts(engine: sa.Engine, run_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT state, count(*) FROM jobs WHERE run_id = :r AND state <> 'failed' GROUP BY state"),
            {"r": run_id},
        ).all()
    return dict(rows)


def test_export_writes_the_consumer_views(tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = write_catalog(tmp_path, 3, bad=False)
    url = f"sqlite:///{tmp_path}/export.db"
    cli("--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32")
    code, output = cli("--database-url", url, "export")
    lines = [json.loads(line) for line in output.strip().splitlines() if line.startswith("{")]
    assert code == 0 and sorted(doc["sku"] for doc in lines) == ["SKU-0000", "SKU-0001", "SKU-0002"]
    assert all("category" in doc["attributes"] for doc in lines)
    code, output = cli("--database-url", url, "export", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO("\n".join(x for x in output.splitlines() if not x.startswith("exported")))))
    assert rows and set(rows[0]) >= {"sku", "attribute", "value", "confidence", "source", "label_en", "label_zh"}
    assert {row["source"] for row in rows} == {"model"}


def test_a_stopped_run_resumes_without_redoing_finished_jobs(tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = write_catalog(tmp_path, 6, bad=False)
    url = f"sqlite:///{tmp_path}/resume.db"
    cli("--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32")
    engine = make_engine(url)
    with engine.begin() as conn:  # as if the process died: two jobs mid-flight, one never started
        conn.execute(
            sa.text("UPDATE jobs SET state = 'running', lease_expires_at = '2999-01-01 00:00:00' WHERE id IN (1, 2)")
        )
        conn.execute(sa.text("UPDATE jobs SET state = 'queued' WHERE id = 3"))
        conn.execute(sa.text("DELETE FROM results WHERE job_id IN (1, 2, 3)"))
        conn.execute(sa.text("UPDATE runs SET state = 'running', finished_at = NULL"))
    code, output = cli(
        "--database-url", url, "run", "--resume", "1", "--model", str(tiny_model_dir), "--quantization", "fp32"
    )
    assert code == 0, output
    with engine.connect() as conn:
        per_job = conn.execute(sa.text("SELECT count(*), count(DISTINCT job_id) FROM results")).one()
        open_jobs = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")).scalar_one()
    assert tuple(per_job) == (6, 6) and open_jobs == 0
    engine.dispose()


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    code, output = cli("demo", "--work-dir", str(tmp_path / "work"))
    assert code == 0, output
    assert "sample catalog:" in output and "bad row line" in output
    assert "these tags are random" in output
    engine = make_engine(f"sqlite:///{tmp_path / 'work' / 'demo' / 'skutag.db'}")
    with engine.connect() as conn:
        failed = dict(conn.execute(sa.text("SELECT sku, last_error_code FROM jobs WHERE state = 'failed'")).all())
        tagged = conn.execute(sa.text("SELECT count(*) FROM tag_sets")).scalar_one()
    assert failed == {
        "BAD-BOMB": "decompression_bomb",
        "BAD-ESCAPE": "forbidden_address",
        "BAD-MISSING": "not_found",
        "BAD-NOT-IMAGE": "not_an_image",
    }
    assert tagged == 16
    engine.dispose()


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def test_worker_memory_stays_flat_over_a_long_run(
    tmp_path: Path, tiny_model_dir: Path, tiny_engine: TaggingEngine, taxonomy: Taxonomy, sqlite_engine: sa.Engine
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(32):
        Image.new("RGB", (640, 480), (index * 7 % 256, 40, 90)).save(images / f"{index}.jpg", "JPEG")
    settings = engine_settings(tiny_model_dir, image_roots=[images], batch_size=32)
    handler = JobHandler.from_settings(settings, tiny_engine, sqlite_engine)
    sink = WriterSink(ResultWriter(sqlite_engine, taxonomy))
    try:
        samples = []
        for round_ in range(40):
            jobs = make_jobs(sqlite_engine, 32, prefix=f"M{round_}")
            jobs = [job.model_copy(update={"image_uri": f"{i}.jpg"}) for i, job in enumerate(jobs)]
            with sqlite_engine.begin() as conn:  # distinct content each round: no cache hits
                conn.execute(sa.text("DELETE FROM results"))
            handler.handle(jobs, sink)
            samples.append(_rss_mb())
    finally:
        handler.close()
    # Single samples swing by +-40 MB with the allocator's temporaries; a leak moves the median.
    warm, end = statistics.median(samples[10:20]), statistics.median(samples[-10:])
    assert end - warm < 40, f"median RSS grew from {warm:.0f} MB to {end:.0f} MB over 20 batches: {samples}"
