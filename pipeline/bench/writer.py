"""Writer benchmark: attribute rows/s into Postgres, skutag's writer vs a naive per-row ORM
insert + commit of the same rows, in one run, on a scratch database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pipeline import ledger
from pipeline.bench.common import Measurement, print_table, scratch_postgres, timed
from pipeline.db import make_engine
from pipeline.writer import ResultWriter
from schemas.results import AttributeTag, JobSpec, Provenance, TagResult
from schemas.taxonomy import CATEGORY, Taxonomy, default_taxonomy


class _Base(DeclarativeBase):
    pass


class NaiveTag(_Base):
    """What a first version would write: one ORM object per attribute, committed one by one."""

    __tablename__ = "bench_naive_tags"
    sku: Mapped[str] = mapped_column(primary_key=True)
    attribute: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]
    confidence: Mapped[float]
    runner_up: Mapped[str | None]
    model_id: Mapped[str]
    updated_at: Mapped[datetime]


def _fresh_jobs(engine: Engine, count: int, label: str) -> list[JobSpec]:
    rows = [ledger.CatalogRow(sku=f"B-{i:07d}", image_uri=f"https://img.example.com/B-{i}.jpg") for i in range(count)]
    with engine.begin() as conn:
        ledger.upsert_items(conn, rows)
        run_id = ledger.create_run(conn, "bench", {"label": label})
        created = ledger.add_jobs(conn, run_id, [(r.sku, r.image_uri) for r in rows])
        ledger.seal_run(conn, run_id)
        return created


def synthetic_results(jobs: list[JobSpec], taxonomy: Taxonomy, seed: int) -> list[TagResult]:
    rng = random.Random(seed)
    provenance = Provenance(
        model_id="Qwen/Qwen3-VL-8B-Instruct", quantization="int8", prompt_version="pv-bench",
        taxonomy_version=taxonomy.version,
    )  # fmt: skip
    produced = datetime.now(UTC)
    results = []
    for job in jobs:
        category = rng.choice(sorted(taxonomy.categories))
        attributes = {CATEGORY: AttributeTag(value=category, confidence=rng.random())}
        for attribute in taxonomy.attributes_for(category):
            value, runner_up = rng.sample([v.id for v in attribute.values], 2)
            attributes[attribute.name] = AttributeTag(
                value=value, confidence=rng.random(), runner_up=runner_up, runner_up_confidence=rng.random() / 2
            )
        results.append(
            TagResult(
                job_id=job.job_id, sku=job.sku, image_uri=job.image_uri, image_sha256=f"{rng.getrandbits(256):064x}",
                status="tagged", attributes=attributes, summary="a casual cotton T-shirt with a round neck",
                provenance=provenance.model_copy(update={"run_id": job.run_id}),
                produced_at=produced + timedelta(microseconds=job.job_id),
            )
        )  # fmt: skip
    return results


def _ours(engine: Engine, taxonomy: Taxonomy, results: list[TagResult], batch: int) -> float:
    writer = ResultWriter(engine, taxonomy, notify_channel="skutag_bench")
    rows = sum(len(r.attributes) for r in results)
    seconds = timed(lambda: [writer.write(results[i : i + batch]) for i in range(0, len(results), batch)])
    return rows / seconds


def _naive(engine: Engine, results: list[TagResult], limit: int) -> float:
    rows: list[dict[str, Any]] = [
        {"sku": r.sku, "attribute": name, "value": tag.value, "confidence": tag.confidence,
         "runner_up": tag.runner_up, "model_id": r.provenance.model_id, "updated_at": datetime.now(UTC)}
        for r in results for name, tag in r.attributes.items()
    ][:limit]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE bench_naive_tags"))

    def insert_one_by_one() -> None:
        with Session(engine) as session:
            for row in rows:
                session.add(NaiveTag(**row))
                session.commit()

    return len(rows) / timed(insert_one_by_one)


def run(
    server_url: str,
    results_per_run: int = 4096,
    batch_sizes: tuple[int, ...] = (32, 256, 1024),
    naive_rows: int = 1500,
    repeats: int = 5,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console()
    taxonomy = default_taxonomy()
    ours: dict[int, list[float]] = {size: [] for size in batch_sizes}
    naive: list[float] = []
    with scratch_postgres(server_url) as url:
        engine = make_engine(url)
        _Base.metadata.create_all(engine)
        try:
            for repeat in range(repeats):
                for size in batch_sizes:
                    jobs = _fresh_jobs(engine, results_per_run, f"r{repeat}b{size}")
                    ours[size].append(_ours(engine, taxonomy, synthetic_results(jobs, taxonomy, repeat), size))
                jobs = _fresh_jobs(engine, naive_rows, f"naive{repeat}")
                naive.append(_naive(engine, synthetic_results(jobs, taxonomy, repeat), naive_rows))
                console.print(f"repeat {repeat + 1}/{repeats} done", style="dim")
        finally:
            engine.dispose()
    baseline = Measurement("naive ORM insert + commit per row", "rows/s", naive)
    measured = [Measurement(f"skutag writer, {size} results/txn", "rows/s", ours[size]) for size in batch_sizes]
    print_table(console, f"writer: attribute rows/s, median of {repeats}", [*measured, baseline], baseline)
    return {
        "baseline_rows_per_s": baseline.median,
        **{f"writer_batch_{m.name.split(', ')[1].split()[0]}_rows_per_s": m.median for m in measured},
        **{f"ratio_batch_{size}": m.median / baseline.median for size, m in zip(batch_sizes, measured, strict=True)},
    }
