"""Backfill scale benchmark: synthetic catalogs of 100k, 300k and 1M items in Postgres with a
realistic mix, planned and enqueued by a real `skutag backfill` process; its planning time, its
enqueue rate into Redis and its peak RSS, per size, and a linear extrapolation to 10M (only from
two or more different sizes; with one, the benchmark says it will not extrapolate).

The mix: 90% of items tagged with the current versions (and a finished job each), of which 3% have
a new image URI since and 2% an old taxonomy version; 10% never tagged. So ~15% get a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from pipeline.bench.common import scratch_postgres
from pipeline.db import make_engine
from pipeline.producer import config_snapshot
from pipeline.settings import load_settings
from schemas.taxonomy import default_taxonomy

_SEED = """
INSERT INTO items (sku, image_uri, created_at, updated_at)
SELECT 'S' || lpad(n::text, 9, '0'), 'https://img.example.com/p/' || n || '.jpg', now(), now()
FROM generate_series(1, :n) AS n;

INSERT INTO runs (id, kind, state, config, total_jobs, created_at, finished_at)
VALUES (1, 'submit', 'done', '{}', 0, now() - interval '1 day', now() - interval '1 day');

INSERT INTO jobs (id, run_id, sku, image_uri, reason, queue, state, attempts, created_at, updated_at, finished_at)
SELECT n, 1, 'S' || lpad(n::text, 9, '0'),
       CASE WHEN n % 100 BETWEEN 1 AND 3 THEN 'https://img.example.com/old/' || n || '.jpg'
            ELSE 'https://img.example.com/p/' || n || '.jpg' END,
       'submitted', 'new', 'done', 1, now(), now(), now()
FROM generate_series(1, :n) AS n WHERE n % 10 <> 0;

INSERT INTO tag_sets (sku, job_id, status, image_uri, image_sha256, model_id, quantization, prompt_version,
                      taxonomy_version, produced_at, updated_at)
SELECT sku, id, 'tagged', image_uri, md5(sku), :model, :quantization, :prompt_version,
       CASE WHEN id % 100 BETWEEN 4 AND 5 THEN 'tx-old' ELSE :taxonomy_version END, now(), now()
FROM jobs WHERE run_id = 1;

SELECT setval(pg_get_serial_sequence('jobs', 'id'), (SELECT max(id) FROM jobs));
SELECT setval(pg_get_serial_sequence('runs', 'id'), 1);
"""


def seed(database_url: str, items: int) -> float:
    settings = load_settings()
    versions = config_snapshot(settings, default_taxonomy())
    params = {
        "n": items,
        "model": versions["model"],
        "quantization": versions["quantization"],
        "prompt_version": versions["prompt_version"],
        "taxonomy_version": versions["taxonomy_version"],
    }
    engine = make_engine(database_url)
    started = time.perf_counter()
    with engine.begin() as conn:
        for statement in _SEED.split(";\n"):
            if statement.strip():
                conn.execute(sa.text(statement), {k: v for k, v in params.items() if f":{k}" in statement})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def run_backfill_process(database_url: str, broker_url: str, max_outstanding: int) -> tuple[dict[str, Any], float]:
    """`skutag backfill --no-wait` in a subprocess; its JSON summary and its peak RSS in MB."""
    env = {**os.environ, "SKUTAG_DATABASE_URL": database_url, "SKUTAG_BROKER_URL": broker_url}
    command = [sys.executable, "-m", "pipeline", "backfill", "--no-wait", "--max-outstanding", str(max_outstanding)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak_kb = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.05)
    output = process.stdout.read().decode() if process.stdout else ""
    if process.returncode not in (0, 4):
        raise RuntimeError(f"backfill exited with {process.returncode}: {output[-2000:]}")
    return json.loads(output[output.index("{") :]), peak_kb / 1024


def run(server_url: str, broker_url: str, sizes: tuple[int, ...] = (100_000, 300_000, 1_000_000),
        console: Console | None = None) -> dict[str, Any]:  # fmt: skip
    console = console or Console()
    client = redis.Redis.from_url(broker_url)
    rows = []
    for size in sizes:
        with scratch_postgres(server_url) as url:
            seeded = seed(url, size)
            client.flushdb()
            summary, peak_mb = run_backfill_process(url, broker_url, max_outstanding=size)
            published = summary["published"]
            enqueue_s = summary["enqueue_s"]
            row = {
                "items": size,
                "planned": sum(summary["planned_by_reason"].values()),
                "planning_s": summary["planning_s"],
                "enqueue_s": enqueue_s,
                "enqueue_jobs_per_s": published / enqueue_s if enqueue_s else None,
                "peak_rss_mb": round(peak_mb, 1),
                "by_reason": summary["planned_by_reason"],
                "seed_s": round(seeded, 1),
                "redis_messages": client.llen("skutag.backfill"),
            }
            rows.append(row)
            console.print(f"{size:,} items: {row}")
    client.flushdb()
    table = Table(title="backfill at scale (Postgres 15, this VM)")
    for column in ("items", "jobs planned", "planning s", "enqueue jobs/s", "peak RSS MB"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['items']:,}", f"{row['planned']:,}", f"{row['planning_s']:.1f}",
                      f"{row['enqueue_jobs_per_s']:,.0f}", f"{row['peak_rss_mb']:.0f}")  # fmt: skip
    console.print(table)
    extrapolated = extrapolate(rows, 10_000_000)
    if extrapolated is None:
        refused = f"not extrapolated to 10M: a line needs two or more different sizes (measured: {sizes_of(rows)})"
        console.print(refused)
        return {"rows": rows, "extrapolated_10m": None, "extrapolation": refused}
    console.print(
        f"10M items, extrapolated linearly from {sizes_of(rows)}: planning ~{extrapolated['planning_s']:.0f} s, "
        f"peak RSS ~{extrapolated['peak_rss_mb']:.0f} MB, enqueue ~{extrapolated['enqueue_s']:.0f} s"
    )
    return {"rows": rows, "extrapolated_10m": extrapolated}


def sizes_of(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{size:,}" for size in sorted({int(row["items"]) for row in rows}))


def extrapolate(rows: list[dict[str, Any]], target: int) -> dict[str, float] | None:
    """Least-squares line through (items, value) for each measure, evaluated at target; None when
    the rows hold fewer than two different sizes (one point fixes no slope: a "line" through it
    would say 10M items cost what 1M did)."""
    xs = [float(row["items"]) for row in rows]
    if len(set(xs)) < 2:
        return None
    out = {}
    for key in ("planning_s", "peak_rss_mb", "enqueue_s"):
        ys = [float(row[key]) for row in rows]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        out[key] = mean_y + slope * (target - mean_x)
    return out
