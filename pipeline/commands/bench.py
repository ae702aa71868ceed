"""`skutag bench`: benchmarks against their baselines, in one run (docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pipeline.commands.common import OutputPath

POSITIVE = click.IntRange(min=1)


def bench_services(command: Any) -> Any:
    """--database-url (a Postgres server for scratch databases) and --broker-url (flushed)."""
    broker = click.option(
        "--broker-url", default="redis://127.0.0.1:6379/13", show_default=True, help="A Redis database it flushes."
    )
    server = click.option(
        "--database-url",
        "server_url",
        default="postgresql+psycopg2://postgres@127.0.0.1:5432/test",
        show_default=True,
        help="A Postgres server; the benchmark uses scratch databases on it.",
    )
    return server(broker(command))


@click.group()
def bench() -> None:
    """Benchmarks against their baselines, in one run (medians and ratios; see docs/benchmarks.md)."""


@bench.command("intake")
@click.option("--repeats", default=5, show_default=True, type=POSITIVE)
@click.option("--threads", default=2, show_default=True, type=POSITIVE, help="For the all-cores line.")
def bench_intake(repeats: int, threads: int) -> None:
    """Images/s per core: skutag's intake vs the article's snippet, on generated realistic JPEGs."""
    from pipeline.bench import intake

    click.echo(json.dumps(intake.run(repeats=repeats, threads=threads)))


@bench.command("gpu")
@click.option("--tiny", is_flag=True, help="The tiny model on the CPU: checks the script in seconds.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".skutag/bench-gpu"),
    show_default=True,
    help="Where the random checkpoint is written (about 17 GB for the 8B).",
)
@click.option("--quantizations", default="bf16,int8-torchao,int8,nf4", show_default=True)
@click.option(
    "--batch-sizes", default="auto,32,8,1", show_default=True, help="auto: the largest batch the free GPU memory holds."
)
@click.option(
    "--decode-modes", default="eager,static,compiled", show_default=True,
    help="SKUTAG_DECODE_MODE values to measure at each batch size (compiled: CUDA graphs).",
)  # fmt: skip
@click.option(
    "--summary-tokens", default=40, show_default=True, help="The summary's token bound (rows run on and off)."
)
@click.option("--output", type=OutputPath(), help="Also write the figures as JSON, rewritten after every row.")
def bench_gpu(
    tiny: bool,
    work_dir: Path,
    quantizations: str,
    batch_sizes: str,
    decode_modes: str,
    summary_tokens: int,
    output: Path | None,
) -> None:
    """Qwen3-VL-8B architecture, random weights: images/s, peak GPU memory and forward passes per image
    for bf16 / int8-torchao / int8 (bitsandbytes) / nf4, each decode mode, summary on and off, at several batch sizes vs
    the article's way (one image at a time, free-form generate, fp16). Each row is written as measured."""
    from pipeline.bench import gpu

    sizes: tuple[int | str, ...] = tuple(b.strip() if b.strip() == "auto" else int(b) for b in batch_sizes.split(","))
    summary = gpu.run(
        work_dir,
        tiny=tiny,
        quantizations=tuple(q.strip() for q in quantizations.split(",") if q.strip()),
        batch_sizes=sizes,
        decode_modes=_decode_modes(decode_modes),
        summary_tokens=summary_tokens,
        output=output,
    )
    click.echo(json.dumps(summary))


def _decode_modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in ("eager", "static", "compiled")]
    if unknown or not modes:
        raise click.BadParameter(f"{unknown[0] if unknown else text!r}: choose from eager, static, compiled")
    return modes


@bench.command("engine")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".skutag/bench-engine"),
    show_default=True,
    help="Where the two tiny models are built (once).",
)
@click.option("--images", default=16, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--decode-modes", default="eager,static", show_default=True, help="SKUTAG_DECODE_MODE values to compare.")
@click.option("--repeats", default=3, show_default=True, type=POSITIVE, help="images/s is the median of these.")
def bench_engine(work_dir: Path, images: int, batch_size: int, decode_modes: str, repeats: int) -> None:
    """CPU, tiny models, both tokenizers, en/zh, summary on/off, each decode mode: forward passes per
    image (scoring passes apart), answer tokens per image (what one pass per token would cost),
    images/s (median of the repeats, the modes taking turns) and the ratio to eager."""
    from pipeline.bench import engine as engine_bench

    engine_bench.run(
        work_dir, images=images, batch=batch_size, on_row=lambda row: click.echo(json.dumps(row)),
        decode_modes=_decode_modes(decode_modes), repeats=repeats,
    )  # fmt: skip


@bench.command("pipeline")
@bench_services
@click.option("--images", default=512, show_default=True, type=POSITIVE)
@click.option("--repeats", default=3, show_default=True, type=POSITIVE)
@click.option("--batch-size", default=32, show_default=True, type=POSITIVE)
def bench_pipeline(server_url: str, broker_url: str, images: int, repeats: int, batch_size: int) -> None:
    """End-to-end images/s (Redis + Celery + Postgres) vs the same engine in a plain loop, tiny model."""
    from pipeline.bench import pipeline as pipeline_bench

    summary = pipeline_bench.run(server_url, broker_url, images=images, repeats=repeats, batch_size=batch_size)
    click.echo(json.dumps(summary))


@bench.command("submit")
@bench_services
@click.option("--rows", default=100_000, show_default=True, type=POSITIVE)
@click.option("--repeats", default=3, show_default=True, type=POSITIVE)
def bench_submit(server_url: str, broker_url: str, rows: int, repeats: int) -> None:
    """Jobs/s from a catalog file into Redis: skutag submit vs one .delay() per job."""
    from pipeline.bench import submit as submit_bench

    click.echo(json.dumps(submit_bench.run(server_url, broker_url, rows=rows, repeats=repeats)))


def _positive_sizes(_ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: write whole numbers separated by commas", param=param) from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: every size must be at least 1", param=param)
    return sizes


@bench.command("backfill")
@bench_services
@click.option("--sizes", default="100000,300000,1000000", show_default=True, callback=_positive_sizes,
              help="Catalog sizes to measure; the 10M extrapolation needs two or more different ones.")  # fmt: skip
def bench_backfill(server_url: str, broker_url: str, sizes: tuple[int, ...]) -> None:
    """Backfill planning time, enqueue rate and peak RSS on synthetic catalogs up to 1M items."""
    from pipeline.bench import backfill as backfill_bench

    summary = backfill_bench.run(server_url, broker_url, sizes)
    click.echo(json.dumps(summary))


@bench.command("memory")
@click.option("--images", default=1000, show_default=True, help="Images in each catalog.")
@click.option(
    "--large-side", default=4000, show_default=True, help="Side of the large PNGs (small files, many pixels)."
)
@click.option("--small-side", default=256, show_default=True, help="Side of the baseline's PNGs.")
def bench_memory(images: int, large_side: int, small_side: int) -> None:
    """Peak RSS of `skutag run` on large images vs the same run on small ones (goal: flat, < 1 GB)."""
    from dataclasses import asdict

    from pipeline.bench import memory

    runs = memory.run(images=images, large_side=large_side, small_side=small_side)
    click.echo(json.dumps([asdict(item) for item in runs]))


@bench.command("listing")
@click.option(
    "--cases", default=2000, show_default=True, type=POSITIVE, help="Generated titles, half English, half Chinese."
)
@click.option("--seed", default=0, show_default=True)
def bench_listing(cases: int, seed: int) -> None:
    """Listing checks: precision and recall on titles with planted mismatches, vs a word-split reader."""
    from pipeline.bench import listing

    click.echo(json.dumps(listing.run(count=cases, seed=seed), ensure_ascii=False, indent=2))


@bench.command("review")
@bench_services
@click.option("--results", default=1_000_000, show_default=True, help="Results (and skus) in the database.")
@click.option("--queued", default=100_000, show_default=True, help="Of them, items in the review queue.")
@click.option("--bulk", default=10_000, show_default=True, help="Items per bulk accept.")
@click.option("--repeats", default=50, show_default=True)
def bench_review(server_url: str, broker_url: str, results: int, queued: int, bulk: int, repeats: int) -> None:
    """Review app: queue page server time (p50/p95; keyset vs OFFSET) and bulk accept vs per-decision."""
    from pipeline.bench import review

    del broker_url  # no broker involved
    click.echo(json.dumps(review.run(server_url, results=results, queued=queued, bulk=bulk, repeats=repeats), indent=2))


@bench.command("writer")
@click.option(
    "--database-url",
    "server_url",
    default="postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    show_default=True,
    help="A Postgres server; the benchmark uses a scratch database on it.",
)
@click.option(
    "--results", "results_per_run", default=4096, show_default=True, type=POSITIVE, help="Results per measurement."
)
@click.option(
    "--naive-rows", default=1500, show_default=True, type=POSITIVE, help="Rows for the slow per-row baseline."
)
@click.option("--repeats", default=5, show_default=True, type=POSITIVE)
def bench_writer(server_url: str, results_per_run: int, naive_rows: int, repeats: int) -> None:
    """Attribute rows/s: the writer (COPY + set-based upsert) vs per-row ORM insert + commit."""
    from pipeline.bench import writer

    summary = writer.run(server_url, results_per_run=results_per_run, naive_rows=naive_rows, repeats=repeats)
    click.echo(json.dumps(summary))
