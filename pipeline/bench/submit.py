"""Producer benchmark: jobs/s from a catalog file into Redis. skutag's submit (ledger rows in
Postgres via COPY, then one message per batch over a pipelined connection) vs the naive way: one
`.delay()`-style message per job and no ledger at all, on the same file, in one run."""

from __future__ import annotations

import csv
import io
import statistics
import time
from typing import Any

import redis
from rich.console import Console

from pipeline.bench.common import scratch_postgres
from pipeline.catalog import read_catalog
from pipeline.db import make_engine
from pipeline.producer import submit_catalog
from pipeline.settings import load_settings
from schemas.taxonomy import default_taxonomy
from workers.app import TAG_TASK, CeleryPublisher, create_app


def catalog_text(rows: int, prefix: str) -> str:
    lines = ["sku,image_uri,title"]
    lines += [f"{prefix}-{i:08d},https://img.example.com/p/{prefix}/{i}.jpg,Product {i}" for i in range(rows)]
    return "\n".join(lines) + "\n"


def naive_delay(app: Any, text: str) -> int:
    count = 0
    with app.producer_or_acquire() as producer:
        for row in csv.DictReader(io.StringIO(text)):
            job = {"job_id": count, "run_id": 0, "sku": row["sku"], "image_uri": row["image_uri"]}
            app.send_task(TAG_TASK, args=[[job]], queue="skutag.bench", producer=producer)
            count += 1
    return count


def run(server_url: str, broker_url: str, rows: int = 100_000, naive_rows: int = 10_000, repeats: int = 3,
        console: Console | None = None) -> dict[str, Any]:  # fmt: skip
    console = console or Console()
    client = redis.Redis.from_url(broker_url)
    ours, naive = [], []
    with scratch_postgres(server_url) as url:
        settings = load_settings(database_url=url, broker_url=broker_url)
        app = create_app(settings)
        database = make_engine(url)
        for repeat in range(repeats):
            client.flushdb()
            text = catalog_text(rows, f"R{repeat}")
            started = time.perf_counter()
            report = submit_catalog(read_catalog(io.StringIO(text)), database, settings, default_taxonomy(),
                                    CeleryPublisher(app, settings))  # fmt: skip
            ours.append(report.published / (time.perf_counter() - started))
            client.flushdb()
            naive_text = catalog_text(naive_rows, f"N{repeat}")
            started = time.perf_counter()
            naive.append(naive_delay(app, naive_text) / (time.perf_counter() - started))
            console.print(
                f"repeat {repeat + 1}: skutag submit {ours[-1]:,.0f} jobs/s, naive .delay() {naive[-1]:,.0f} jobs/s"
            )
        database.dispose()
    client.flushdb()
    ours_median, naive_median = statistics.median(ours), statistics.median(naive)
    console.print(f"skutag submit {ours_median:,.0f} jobs/s (ledger + Redis); "
                  f"naive {naive_median:,.0f} jobs/s (Redis only); {ours_median / naive_median:.1f}x")  # fmt: skip
    return {"rows": rows, "submit_jobs_per_s": ours_median, "naive_jobs_per_s": naive_median,
            "ratio": ours_median / naive_median, "samples": {"submit": ours, "naive": naive}}  # fmt: skip
