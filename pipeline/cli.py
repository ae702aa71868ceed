"""The `skutag` command line. Every command builds one Settings (flags override SKUTAG_* variables),
prints one line per error (a traceback only with --debug) and exits with a code that means
something:

    0 success   1 unexpected error   2 bad usage, settings, input or model   3 a service is down
    4 a run ended partly failed      5 a run failed entirely                 6 locked by another process
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import click
from rich.console import Console

from pipeline.errors import SkutagError
from pipeline.settings import Settings, load_settings

EXIT_PARTIAL = 4
EXIT_FAILED = 5

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class SkutagGroup(click.Group):
    """Turns skutag's errors into one red line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from rich.markup import escape

        from pipeline.secrets import mask_secrets

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except SkutagError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            err_console.print(f"[red]error:[/red] {escape(mask_secrets(exc.message))}", markup=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # a bug: one line (no credentials), the traceback with --debug
            if ctx.find_root().params.get("debug"):
                raise
            detail = escape(mask_secrets(f"{type(exc).__name__}: {exc}"))
            err_console.print(f"[red]unexpected error:[/red] {detail} (run with --debug for the traceback)")
            sys.exit(1)


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    root = ctx.find_root().params
    return load_settings(database_url=root.get("database_url"), **overrides)


@click.group(cls=SkutagGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--database-url", metavar="URL", help="Overrides SKUTAG_DATABASE_URL (default: sqlite:///skutag.db).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="skutag")
def main(database_url: str | None, debug: bool) -> None:
    """Tag e-commerce catalog images with a vision-language model.

    \b
    First steps:
      skutag demo                      tag a generated sample catalog, end to end, on this machine
      skutag db upgrade                create or migrate the tables in SKUTAG_DATABASE_URL
      skutag run catalog.csv           tag a catalog in this process (no Redis, no workers)
      skutag submit catalog.csv        queue it for GPU workers (skutag worker / skutag writer)

    Settings come from SKUTAG_* environment variables or a .env file; flags override them.
    """


# --- database --------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Create, migrate or inspect the database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create the tables and views, or migrate them to REVISION."""
    from pipeline.db import redacted
    from pipeline.migrate import current_revision, upgrade

    settings = settings_from(ctx)
    upgrade(settings.database_url, revision)
    click.echo(f"{redacted(settings.database_url)} is at revision {current_revision(settings.database_url)}")


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True, help="'base' drops every skutag table.")
@click.confirmation_option(prompt="This drops skutag tables and their data. Continue?")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the schema down to REVISION (base: nothing left)."""
    from pipeline.migrate import current_revision, downgrade

    settings = settings_from(ctx)
    downgrade(settings.database_url, revision)
    click.echo(f"schema is at revision {current_revision(settings.database_url) or 'base (empty)'}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database and the newest one this skutag knows."""
    from pipeline.migrate import current_revision, head_revision

    settings = settings_from(ctx)
    current = current_revision(settings.database_url)
    head = head_revision(settings.database_url)
    click.echo(f"current: {current or 'none (run skutag db upgrade)'}  head: {head}")


# --- taxonomy --------------------------------------------------------------------------------
@main.group()
def taxonomy() -> None:
    """Check or show a taxonomy: the categories, attributes and values tags may take."""


@taxonomy.command("check")
@click.argument("path", type=click.Path(path_type=Path), required=False)
def taxonomy_check(path: Path | None) -> None:
    """Validate a taxonomy file (the packaged one when PATH is left out)."""
    from schemas.taxonomy import load_taxonomy

    loaded = load_taxonomy(path)
    values = sum(len(a.values) for a in loaded.attributes.values())
    click.echo(
        f"{loaded.source}: valid; {len(loaded.categories)} categories, {len(loaded.attributes)} attributes, "
        f"{values} values; taxonomy_version {loaded.version}"
    )


@taxonomy.command("show")
@click.option("--language", type=click.Choice(["en", "zh"]), default="en", show_default=True)
@click.pass_context
def taxonomy_show(ctx: click.Context, language: str) -> None:
    """Print each category with the attributes asked for it and their allowed values."""
    from schemas.taxonomy import load_taxonomy

    loaded = load_taxonomy(settings_from(ctx).taxonomy_path)
    for category in loaded.categories.values():
        click.echo(f"{category.id} ({category.value.label(language)})")  # type: ignore[arg-type]
        for attribute in loaded.attributes_for(category.id):
            labels = ", ".join(value.label(language) for value in attribute.values)  # type: ignore[arg-type]
            click.echo(f"  {attribute.name}: {labels}")


# --- model -----------------------------------------------------------------------------------
def model_options(command: Any) -> Any:
    """--model / --quantization / --device / --language, shared by every command that loads the model."""
    options = [
        click.option("--model", help="Hub id or local directory (SKUTAG_MODEL; default Qwen/Qwen3-VL-8B-Instruct)."),
        click.option("--quantization", type=click.Choice(["int8", "nf4", "bf16", "fp16", "fp32"]),
                     help="SKUTAG_QUANTIZATION (default int8)."),
        click.option("--device", help="auto, cpu, cuda or cuda:N (SKUTAG_DEVICE)."),
        click.option("--language", "prompt_language", type=click.Choice(["en", "zh"]),
                     help="Prompt and label language (SKUTAG_PROMPT_LANGUAGE)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@main.group()
def model() -> None:
    """Build or inspect models."""


@model.command("tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--tokenizer",
    "tokenizer_kind",
    type=click.Choice(["tiny", "qwen"]),
    default="tiny",
    show_default=True,
    help="tiny: a 4k BPE trained on the taxonomy (every label one token); qwen: Qwen's real 151,936-row vocabulary.",
)
def model_tiny(directory: Path, seed: int, tokenizer_kind: Literal["tiny", "qwen"]) -> None:
    """Write a tiny random-weight Qwen3-VL to DIRECTORY: the real classes, a locally built tokenizer,
    loadable like the real model (INT8 included). Its tags are random; it tests the machinery."""
    from pipeline.tiny import build_tiny_model

    build_tiny_model(directory, seed=seed, tokenizer_kind=tokenizer_kind)
    click.echo(f"tiny Qwen3-VL written to {directory}; use it with --model {directory} or SKUTAG_MODEL={directory}")


@main.command("tag-image")
@click.argument("image_uri")
@model_options
@click.option("--fit", "image_fit", type=click.Choice(["crop", "pad"]), help="Center crop (default) or pad on white.")
@click.pass_context
def tag_image(ctx: click.Context, /, image_uri: str, **overrides: Any) -> None:
    """Tag one image (a path, file:// or http(s) URL) and print the result as JSON: for prompt
    iteration and spot checks, through the same intake and engine as the workers."""
    from pipeline.images import ImageIntake
    from pipeline.inference import TaggingEngine, load_model
    from pipeline.routing import Thresholds
    from pipeline.runner import tag_batch
    from schemas.results import JobSpec
    from schemas.taxonomy import load_taxonomy

    settings = settings_from(ctx, **overrides)
    if "://" not in image_uri:  # a file named on the command line is trusted, wherever it is
        settings = settings.model_copy(
            update={"image_roots": [*settings.image_roots, Path(image_uri).resolve().parent]}
        )
    taxonomy_ = load_taxonomy(settings.taxonomy_path)
    intake = ImageIntake(settings)
    try:
        outcome = intake.prepare(image_uri)
    finally:
        intake.close()
    engine = TaggingEngine(load_model(settings), taxonomy_, settings)
    job = JobSpec(job_id=0, run_id=0, sku="-", image_uri=image_uri)
    batch = tag_batch(engine, [job], [outcome], thresholds=Thresholds.from_settings(settings))
    (result,) = batch.results
    document = result.model_dump(mode="json", exclude={"job_id"})
    document["batch"] = batch.stats[0].as_dict() if batch.stats else None
    click.echo(json.dumps(document, ensure_ascii=False, indent=2))
    if result.status == "failed":
        sys.exit(2)


# --- doctor ----------------------------------------------------------------------------------
@main.command()
@model_options
@click.pass_context
def doctor(ctx: click.Context, /, **overrides: Any) -> None:
    """Check that this machine can run skutag: settings, database reachable and migrated, broker
    reachable, model files and config, GPU and bitsandbytes' CUDA kernels, image roots, free disk.
    One line per check. Exit code: 0 all ok, 1 a warning, 2 a check failed."""
    from pipeline.doctor import run_checks, worst

    root = ctx.find_root().params
    checks = []
    for check in run_checks({"database_url": root.get("database_url"), **overrides}):
        click.echo(check.line())
        checks.append(check)
    sys.exit(int(worst(checks)))


# --- benchmarks ------------------------------------------------------------------------------
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


@main.group()
def bench() -> None:
    """Benchmarks against their baselines, in one run (medians and ratios; see docs/benchmarks.md)."""


@bench.command("intake")
@click.option("--repeats", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True, help="For the all-cores line.")
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
@click.option("--quantizations", default="int8,nf4,bf16", show_default=True)
@click.option("--batch-sizes", default="1,8,32,64", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures as JSON.")
def bench_gpu(tiny: bool, work_dir: Path, quantizations: str, batch_sizes: str, output: Path | None) -> None:
    """Qwen3-VL-8B architecture, random weights: images/s and peak GPU memory for int8 / nf4 / bf16 at
    several batch sizes vs the article's way (one image at a time, free-form generate, fp16)."""
    from pipeline.bench import gpu

    summary = gpu.run(
        work_dir,
        tiny=tiny,
        quantizations=tuple(q.strip() for q in quantizations.split(",") if q.strip()),
        batch_sizes=tuple(int(b) for b in batch_sizes.split(",")),
    )
    if output:
        output.write_text(json.dumps(summary, indent=2))
    click.echo(json.dumps(summary))


@bench.command("pipeline")
@bench_services
@click.option("--images", default=512, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
def bench_pipeline(server_url: str, broker_url: str, images: int, repeats: int, batch_size: int) -> None:
    """End-to-end images/s (Redis + Celery + Postgres) vs the same engine in a plain loop, tiny model."""
    from pipeline.bench import pipeline as pipeline_bench

    summary = pipeline_bench.run(server_url, broker_url, images=images, repeats=repeats, batch_size=batch_size)
    click.echo(json.dumps(summary))


@bench.command("submit")
@bench_services
@click.option("--rows", default=100_000, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def bench_submit(server_url: str, broker_url: str, rows: int, repeats: int) -> None:
    """Jobs/s from a catalog file into Redis: skutag submit vs one .delay() per job."""
    from pipeline.bench import submit as submit_bench

    click.echo(json.dumps(submit_bench.run(server_url, broker_url, rows=rows, repeats=repeats)))


@bench.command("backfill")
@bench_services
@click.option("--sizes", default="100000,300000,1000000", show_default=True)
def bench_backfill(server_url: str, broker_url: str, sizes: str) -> None:
    """Backfill planning time, enqueue rate and peak RSS on synthetic catalogs up to 1M items."""
    from pipeline.bench import backfill as backfill_bench

    summary = backfill_bench.run(server_url, broker_url, tuple(int(s) for s in sizes.split(",")))
    click.echo(json.dumps(summary))


@bench.command("listing")
@click.option("--cases", default=2000, show_default=True, help="Generated titles, half English, half Chinese.")
@click.option("--seed", default=0, show_default=True)
def bench_listing(cases: int, seed: int) -> None:
    """Listing checks: precision and recall on titles with planted mismatches, vs a word-split reader."""
    from pipeline.bench import listing

    click.echo(json.dumps(listing.run(count=cases, seed=seed), ensure_ascii=False, indent=2))


@bench.command("writer")
@click.option(
    "--database-url",
    "server_url",
    default="postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    show_default=True,
    help="A Postgres server; the benchmark uses a scratch database on it.",
)
@click.option("--results", "results_per_run", default=4096, show_default=True, help="Results per measurement.")
@click.option("--naive-rows", default=1500, show_default=True, help="Rows for the slow per-row baseline.")
@click.option("--repeats", default=5, show_default=True)
def bench_writer(server_url: str, results_per_run: int, naive_rows: int, repeats: int) -> None:
    """Attribute rows/s: the writer (COPY + set-based upsert) vs per-row ORM insert + commit."""
    from pipeline.bench import writer

    summary = writer.run(server_url, results_per_run=results_per_run, naive_rows=naive_rows, repeats=repeats)
    click.echo(json.dumps(summary))


# --- the pipeline ----------------------------------------------------------------------------
def _database(settings: Settings, create_if_embedded: bool = False) -> Any:
    from pipeline.db import make_engine
    from pipeline.migrate import ensure_schema

    ensure_schema(settings.database_url, create_if_embedded=create_if_embedded)
    return make_engine(settings.database_url)


def _report_bad_rows(bad_rows: list[Any], limit: int = 20) -> None:
    from rich.markup import escape

    from pipeline.secrets import mask_secrets

    for row in bad_rows[:limit]:
        err_console.print(f"[yellow]bad row[/yellow] {escape(mask_secrets(str(row)))}", markup=True)
    if len(bad_rows) > limit:
        err_console.print(f"[yellow]... and {len(bad_rows) - limit} more bad rows[/yellow]", markup=True)


NO_CACHE_HELP = "Infer every image, even one whose content and versions have a stored result."


@main.command()
@click.argument("catalog", type=click.File("r", encoding="utf-8-sig"))
@click.option("--no-cache", is_flag=True, help=NO_CACHE_HELP)
@click.pass_context
def submit(ctx: click.Context, catalog: Any, no_cache: bool) -> None:
    """Queue CATALOG for the GPU workers: a CSV or JSONL file (or - for stdin) with columns sku,
    image_uri and optionally title, category_hint. Bad rows are reported with their line numbers;
    the good rows go ahead. Follow the run with `skutag status RUN`."""
    from pipeline.catalog import read_catalog
    from pipeline.producer import submit_catalog
    from pipeline.secrets import mask_secrets
    from schemas.taxonomy import load_taxonomy
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx)
    database = _database(settings)
    publisher = CeleryPublisher(create_app(settings), settings)
    report = submit_catalog(
        read_catalog(catalog, catalog.name), database, settings, load_taxonomy(settings.taxonomy_path), publisher,
        use_cache=not no_cache,
    )  # fmt: skip
    _report_bad_rows(report.bad_rows)
    rate = report.accepted / report.seconds if report.seconds else 0.0
    click.echo(
        f"run {report.run_id}: {report.accepted} jobs recorded, {report.published} published "
        f"({rate:,.0f} jobs/s), {len(report.bad_rows)} bad rows. Follow it: skutag status {report.run_id}"
    )
    if report.publish_error:
        err_console.print(
            f"[red]error:[/red] {mask_secrets(report.publish_error)}; the jobs are safe in the ledger: "
            "run `skutag reconcile` once the broker is back",
            markup=True,
        )
        sys.exit(3)
    if report.accepted == 0 and report.bad_rows:
        sys.exit(2)


CELERY_PASSTHROUGH = {"ignore_unknown_options": True}


def celery_worker_options(command: Any) -> Any:
    """--events, and any `celery worker` option after the command's own (e.g. --loglevel=DEBUG)."""
    events = click.option(
        "--events", "worker_events", is_flag=True, default=None,
        help="Send task events for `celery events` and Flower (SKUTAG_WORKER_EVENTS).",
    )  # fmt: skip
    passthrough = click.argument("celery_args", nargs=-1, type=click.UNPROCESSED, metavar="[CELERY WORKER OPTIONS]")
    return events(metrics_port_option(passthrough(command)))


def metrics_port_option(command: Any) -> Any:
    return click.option(
        "--metrics-port", type=int, help="Serve Prometheus metrics on this port (SKUTAG_METRICS_PORT)."
    )(command)


@main.command("worker", context_settings=CELERY_PASSTHROUGH)
@model_options
@click.option("--queues", default="new,backfill", show_default=True, help="Which job queues to consume, in order.")
@click.option(
    "--concurrency", "worker_concurrency", type=int, help="Messages worked on at once (SKUTAG_WORKER_CONCURRENCY)."
)
@click.option("--batch-size", type=int, help="Images per GPU batch (SKUTAG_BATCH_SIZE).")
@celery_worker_options
@click.pass_context
def worker_command(ctx: click.Context, /, queues: str, celery_args: tuple[str, ...], **overrides: Any) -> None:
    """Run a GPU worker: load the model once, then tag jobs from the broker until stopped (SIGTERM
    finishes the running batches first). Start one per GPU. Options skutag does not know go to
    `celery worker`, e.g. `skutag worker --events --loglevel=DEBUG --max-memory-per-child=...`.
    `celery -A workers.app inspect ping` (or `events`, or Flower) then sees it."""
    from workers.app import QUEUES
    from workers.tasks import run_gpu_worker

    settings = settings_from(ctx, **overrides)
    _database(settings).dispose()
    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if unknown:
        raise click.BadParameter(
            f"unknown queue {unknown[0]!r}; choose from {', '.join(QUEUES)}", param_hint="--queues"
        )
    _log_to_stderr("worker", settings)
    run_gpu_worker(settings, [QUEUES[name] for name in names], settings.worker_concurrency, celery_args)


@main.command("writer", context_settings=CELERY_PASSTHROUGH)
@click.option("--no-reconcile", is_flag=True, help="Do not run the periodic reconciler in this writer.")
@celery_worker_options
@click.pass_context
def writer_command(
    ctx: click.Context,
    no_reconcile: bool,
    celery_args: tuple[str, ...],
    worker_events: bool | None,
    metrics_port: int | None,
) -> None:
    """Run a writer: bulk-write result batches from the broker into the database, and reconcile the
    ledger with the broker every SKUTAG_RECONCILE_INTERVAL_S seconds. Options skutag does not
    know go to `celery worker`."""
    from workers.tasks import run_writer

    settings = settings_from(ctx, worker_events=worker_events, metrics_port=metrics_port)
    _database(settings).dispose()
    _log_to_stderr("writer", settings)
    run_writer(settings, reconcile_periodically=not no_reconcile, celery_args=celery_args)


def _log_to_stderr(service: str, settings: Settings) -> None:
    from pipeline.logs import configure_logging

    configure_logging(service, settings.log_format)


@main.command()
@click.pass_context
def reconcile(ctx: click.Context) -> None:
    """Re-queue jobs whose worker died (lease expired), and publish jobs the broker lost or never
    got (Redis restarted or down at submit). Safe to run any time; writers run it periodically."""
    from pipeline.reconcile import reconcile as run_reconcile
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx)
    database = _database(settings)
    report = run_reconcile(database, CeleryPublisher(create_app(settings), settings), settings)
    if report.skipped:
        click.echo("another reconciler is running; nothing done")
        return
    click.echo(
        f"{report.expired_leases} expired leases re-queued, {report.lost_messages} lost messages found, "
        f"{report.published} jobs published"
    )


EXIT_FOR_STATE = {"done": 0, "partial": EXIT_PARTIAL, "failed": EXIT_FAILED, "cancelled": EXIT_FAILED}


@main.command()
@click.argument("run_id", type=int)
@click.option("--once", is_flag=True, help="Print the counts once as JSON instead of following the run.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes (and between piped lines).")
@click.pass_context
def status(ctx: click.Context, run_id: int, once: bool, interval: float) -> None:
    """Follow RUN until it ends: a live bar on a terminal, a progress line per change when piped
    (for logs), with the rate and an ETA; a finished run shows its mean rate. Exit code: 0 done,
    4 partly failed, 5 all failed (with --once: the same, or 0 while it still runs)."""
    from pipeline.run_progress import snapshot

    database = _database(settings_from(ctx))
    first = snapshot(database, run_id)
    if first.state == "missing":
        raise click.BadParameter(f"there is no run {run_id}", param_hint="RUN_ID")
    if once:
        click.echo(json.dumps({"run": run_id, "state": first.state, "jobs": first.counts, "failures": first.failures}))
        sys.exit(EXIT_FOR_STATE.get(first.state, 0))
    follow = _follow_live if err_console.is_terminal else _follow_piped
    last = follow(database, first, interval)
    from pipeline.run_progress import current_rate, describe

    click.echo(describe(last, current_rate(first, last)))
    if last.failures:
        err_console.print(f"list them: skutag failures {run_id}; retry the retryable ones: skutag retry {run_id}")
    sys.exit(EXIT_FOR_STATE.get(last.state, 0))


def _follow_piped(database: Any, first: Any, interval: float) -> Any:
    """A line on stderr whenever the counts change (and the first), so a log shows progress."""
    import time

    from pipeline.run_progress import current_rate, describe, snapshot

    now, shown = first, None
    while True:
        if now.counts != shown:
            click.echo(describe(now, current_rate(first, now)), err=True)
            shown = now.counts
        if now.state != "running":
            return now
        time.sleep(interval)
        now = snapshot(database, first.run_id)


def _follow_live(database: Any, first: Any, interval: float) -> Any:
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.run_progress import current_rate, describe, snapshot

    columns = (BarColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    now = first
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("run", total=first.total, detail="")
        while True:
            progress.update(
                task, total=now.total, completed=now.finished, detail=describe(now, current_rate(first, now))
            )
            if now.state != "running":
                return now
            time.sleep(interval)
            now = snapshot(database, first.run_id)


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def runs(ctx: click.Context, limit: int) -> None:
    """List the most recent runs with their job counts and their failures by error code."""
    import sqlalchemy as sa
    from rich.table import Table

    from pipeline.db import jobs
    from pipeline.db import runs as runs_table
    from pipeline.failures import failure_counts, format_counts

    database = _database(settings_from(ctx))
    counts = (
        sa.select(jobs.c.run_id, jobs.c.state, sa.func.count().label("n"))
        .group_by(jobs.c.run_id, jobs.c.state)
        .subquery()
    )
    columns = ("run", "kind", "state", "jobs", "done", "review", "failed", "open", "created", "finished", "failures")
    table = Table()
    for column in columns:
        table.add_column(column)
    with database.connect() as conn:
        recent = conn.execute(sa.select(runs_table).order_by(runs_table.c.id.desc()).limit(limit)).all()
        by_run: dict[int, dict[str, int]] = {}
        for row in conn.execute(sa.select(counts).where(counts.c.run_id.in_([r.id for r in recent]))):
            by_run.setdefault(row.run_id, {})[row.state] = row.n
        failures = failure_counts(conn, [r.id for r in recent if by_run.get(r.id, {}).get("failed")])
    for run_row in recent:
        c = by_run.get(run_row.id, {})
        table.add_row(
            str(run_row.id), run_row.kind, run_row.state, str(run_row.total_jobs), str(c.get("done", 0)),
            str(c.get("needs_review", 0)), str(c.get("failed", 0)), str(c.get("queued", 0) + c.get("running", 0)),
            f"{run_row.created_at:%Y-%m-%d %H:%M}",
            f"{run_row.finished_at:%Y-%m-%d %H:%M}" if run_row.finished_at else "",
            format_counts(failures.get(run_row.id, {})),
        )  # fmt: skip
    if sys.stdout.isatty():
        Console().print(table)
        return
    click.echo("\t".join(columns))  # piped: tab-separated, for scripts
    for values in zip(*(column.cells for column in table.columns), strict=True):
        click.echo("\t".join(str(value) for value in values))


FAILURE_COLUMNS = ("sku", "code", "attempts", "message", "image_uri")


@main.command()
@click.argument("run_id", type=int)
@click.option("--code", help="Only failures with this error code (e.g. not_found, fetch_failed).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True,
              help="table: aligned on a terminal, tab-separated when piped; csv: RFC 4180.")  # fmt: skip
@click.pass_context
def failures(ctx: click.Context, run_id: int, code: str | None, fmt: str) -> None:
    """List the failed skus of RUN with their error code, message and attempts (URL passwords masked).

    \b
      skutag failures 42 --code not_found --format csv > missing.csv"""
    from csv import writer as csv_writer

    from rich.table import Table

    from pipeline.failures import failed_jobs
    from pipeline.run_progress import snapshot
    from pipeline.secrets import mask_secrets

    database = _database(settings_from(ctx))
    if snapshot(database, run_id).state == "missing":
        raise click.BadParameter(f"there is no run {run_id}", param_hint="RUN_ID")
    with database.connect() as conn:
        rows = [
            (f.sku, f.code, str(f.attempts), mask_secrets(f.message), mask_secrets(f.image_uri))
            for f in failed_jobs(conn, run_id, code)
        ]
    if fmt == "csv":
        out = csv_writer(sys.stdout)
        out.writerow(FAILURE_COLUMNS)
        out.writerows(rows)
    elif sys.stdout.isatty():
        table = Table(*FAILURE_COLUMNS)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        click.echo("\t".join(FAILURE_COLUMNS))
        for row in rows:
            click.echo("\t".join(value.replace("\t", " ").replace("\n", " ") for value in row))
    err_console.print(f"{len(rows)} failed jobs in run {run_id}" + (f" with code {code}" if code else ""))


@main.command()
@click.argument("run_id", type=int)
@click.option("--code", help="Only failures with this (retryable) error code.")
@click.pass_context
def retry(ctx: click.Context, run_id: int, code: str | None) -> None:
    """Re-queue the retryable failures of RUN (fetch_failed, timeout, inference_failed,
    attempts_exhausted, internal_error) as a new run, with each item's current image. Final codes
    (not_found, corrupt, ...) fail the same way again: fix those items and submit them. A local
    run's retry is finished with `skutag run --resume NEW_RUN`."""
    from pipeline.db import translated_errors
    from pipeline.errors import RetryableError
    from pipeline.failures import format_counts, retry_failed
    from pipeline.secrets import mask_secrets

    settings = settings_from(ctx)
    database = _database(settings)
    with translated_errors("re-queueing failures"), database.begin() as conn:
        planned = retry_failed(conn, run_id, code)
    final = f"; final failures left alone: {format_counts(planned.final_left)}" if planned.final_left else ""
    if planned.run_id is None:
        click.echo(f"nothing to retry in run {run_id}{final}")
        return
    click.echo(
        f"run {planned.run_id}: {len(planned.jobs)} jobs retrying run {run_id}'s failures "
        f"({format_counts(planned.by_code)}){final}"
    )
    if planned.kind == "local":
        click.echo(f"finish it in this process: skutag run --resume {planned.run_id}")
        return
    from pipeline import ledger
    from workers.app import CeleryPublisher, create_app

    publisher = CeleryPublisher(create_app(settings), settings)
    try:
        publisher.publish(planned.jobs, "new")
        with translated_errors("marking jobs published"), database.begin() as conn:
            ledger.mark_published(conn, [job.job_id for job in planned.jobs], publisher.epoch())
    except RetryableError as exc:
        err_console.print(
            f"[red]error:[/red] {mask_secrets(exc.message)}; the jobs are queued in the ledger: "
            "`skutag reconcile` (or any writer) publishes them once the broker is back",
            markup=True,
        )
        sys.exit(3)
    click.echo(f"follow it: skutag status {planned.run_id}")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="jsonl: one document per sku (sku_tags_json); csv: one row per sku and attribute.")  # fmt: skip
@click.option("--output", "-o", type=click.File("w", encoding="utf-8"), default="-", help="A file (default stdout).")
@click.pass_context
def export(ctx: click.Context, fmt: str, output: Any) -> None:
    """Export the current tags (with reviews applied) from the consumer views, with listing issues
    (jsonl: a listing_issues list per sku that has any; csv: a listing_values column per attribute)."""
    import csv

    import sqlalchemy as sa

    from pipeline.listing_store import issues_by_sku

    database = _database(settings_from(ctx))
    count = 0
    with database.connect() as conn:
        issues = issues_by_sku(conn)
        if fmt == "jsonl":
            rows = conn.execution_options(yield_per=2000).execute(
                sa.text("SELECT sku, tags FROM sku_tags_json ORDER BY sku")
            )
            for sku, document in rows:
                tags = json.loads(document) if isinstance(document, str) else dict(document)
                if sku in issues:
                    tags["listing_issues"] = issues[sku]
                output.write(json.dumps(tags, ensure_ascii=False) + "\n")
                count += 1
        else:
            columns = ["sku", "attribute", "value", "confidence", "source", "label_en", "label_zh", "model_id",
                       "taxonomy_version", "updated_at"]  # fmt: skip
            query = sa.text(f"SELECT {', '.join(columns)} FROM sku_tags_current ORDER BY sku, attribute")
            writer = csv.writer(output)
            writer.writerow([*columns, "listing_values"])
            for row in conn.execution_options(yield_per=5000).execute(query):
                listed: list[str] = next(
                    (i["listed_values"] for i in issues.get(row[0], ()) if i["attribute"] == row[1]), []
                )
                writer.writerow([*row, ",".join(listed)])
                count += 1
    err_console.print(f"exported {count} {'skus' if fmt == 'jsonl' else 'rows'}")


@main.command("run")
@click.argument("catalog", type=click.File("r", encoding="utf-8-sig"), required=False)
@click.option("--resume", "resume_run", type=int, help="Finish the open jobs of an earlier local run.")
@click.option("--image-root", "image_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where local image paths may point (default: the catalog's directory).")  # fmt: skip
@click.option("--no-cache", is_flag=True, help=NO_CACHE_HELP)
@model_options
@click.pass_context
def run_command(
    ctx: click.Context,
    /,
    catalog: Any,
    resume_run: int | None,
    image_roots: tuple[Path, ...],
    no_cache: bool,
    **overrides: Any,
) -> None:
    """Tag CATALOG in this process: the same stages as the workers, with no Redis. The embedded
    default is SQLite and the configured model; with SKUTAG_DATABASE_URL and a GPU it is a
    one-machine production run. Exit code: 0 done, 4 partly failed, 5 all failed."""
    if catalog is None and resume_run is None:
        raise click.UsageError("give a CATALOG file, or --resume RUN")
    roots = list(image_roots) or (
        [Path(catalog.name).resolve().parent] if catalog and catalog.name != "<stdin>" else None
    )
    settings = settings_from(ctx, image_roots=roots, **overrides)
    if resume_run is not None and not image_roots:
        settings = _with_run_image_roots(settings, resume_run)
    sys.exit(_run_local(settings, catalog, resume_run, use_cache=not no_cache))


def _with_run_image_roots(settings: Settings, run_id: int) -> Settings:
    """Resume with the image roots the run started with, so relative paths resolve the same."""
    import sqlalchemy as sa

    from pipeline.db import runs as runs_table

    database = _database(settings, create_if_embedded=True)
    with database.connect() as conn:
        config = conn.execute(sa.select(runs_table.c.config).where(runs_table.c.id == run_id)).scalar_one_or_none()
    database.dispose()
    if config is None:
        raise click.BadParameter(f"there is no run {run_id}", param_hint="--resume")
    roots = config.get("image_roots")
    return settings.model_copy(update={"image_roots": [Path(root) for root in roots]}) if roots else settings


def _run_local(
    settings: Settings, catalog: Any, resume_run: int | None, console: Console | None = None, use_cache: bool = True
) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline import ledger
    from pipeline.catalog import read_catalog
    from pipeline.inference import TaggingEngine, load_model
    from pipeline.listing import ListingChecker
    from pipeline.local import log_to_file, run_jobs, run_state
    from pipeline.producer import submit_catalog
    from pipeline.routing import Thresholds
    from pipeline.worker import JobHandler
    from pipeline.writer import ResultWriter
    from schemas.taxonomy import load_taxonomy

    console = console or err_console
    database = _database(settings, create_if_embedded=True)
    taxonomy_ = load_taxonomy(settings.taxonomy_path)
    if resume_run is None:
        submitted = submit_catalog(
            read_catalog(catalog, catalog.name), database, settings, taxonomy_, None, kind="local", use_cache=use_cache
        )
        _report_bad_rows(submitted.bad_rows)
        run_id = submitted.run_id
        console.print(f"run {run_id}: {submitted.accepted} jobs, {len(submitted.bad_rows)} bad rows")
    else:
        run_id = resume_run
        with database.begin() as conn:
            ledger.reopen_running(conn, run_id)  # a local run has no other worker: its leases are stale
    console.print(f"loading {settings.model} ({settings.quantization}) ...")
    handler = JobHandler(settings, TaggingEngine(load_model(settings), taxonomy_, settings), database)
    writer = ResultWriter(
        database,
        taxonomy_,
        settings.notify_channel,
        ListingChecker.from_settings(settings, taxonomy_),
        thresholds=Thresholds.from_settings(settings),
    )
    _, counts = run_state(database, run_id)
    total = sum(counts.values())
    try:
        with (
            log_to_file(settings.work_dir / "skutag.log"),
            Progress(
                TextColumn(f"run {run_id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
            ) as progress,
        ):
            task = progress.add_task(
                "tagging", total=total, completed=total - counts.get("queued", 0) - counts.get("running", 0)
            )
            report = run_jobs(
                handler, writer, run_id, on_progress=lambda handled: progress.advance(task, handled.results)
            )
    finally:
        handler.close()
    state, counts = run_state(database, run_id)
    rate = report.handled / report.seconds if report.seconds else 0.0
    console.print(
        f"run {run_id} {state}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"; {report.cache_hits} from the result cache; {rate:.1f} images/s"
    )
    _print_failures_hint(database, run_id, console)
    return EXIT_FOR_STATE.get(state, 0)


def _print_failures_hint(database: Any, run_id: int, console: Console) -> None:
    """Failed jobs by error code, and the commands that list and retry them."""
    from pipeline.failures import failure_counts, format_counts

    with database.connect() as conn:
        failures = failure_counts(conn, [run_id]).get(run_id)
    if failures:
        console.print(
            f"failed by code: {format_counts(failures)}. List them: skutag failures {run_id}; "
            f"retry the retryable ones: skutag retry {run_id}"
        )


@main.command()
@click.option(
    "--catalog",
    type=click.File("r", encoding="utf-8-sig"),
    help="Refresh the items from this CSV/JSONL first (else SKUTAG_BACKFILL_SOURCE_QUERY, if set).",
)
@click.option(
    "--check-content",
    is_flag=True,
    help="Re-fetch tagged images (conditionally: ETag / Last-Modified) and re-tag those whose bytes changed.",
)
@click.option(
    "--max-age",
    "max_age_days",
    type=float,
    help="Also re-tag items whose tags are older than this many days (implies --no-cache: they are re-inferred).",
)
@click.option("--no-cache", is_flag=True, help=NO_CACHE_HELP)
@click.option("--max-outstanding", type=int, help="Most jobs in Redis at once (SKUTAG_BACKFILL_MAX_OUTSTANDING).")
@click.option("--dry-run", is_flag=True, help="Count what would be re-tagged, by reason, with an estimated duration.")
@click.option("--no-wait", is_flag=True, help="Publish what fits now and exit; the next backfill continues the run.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the JSON summary to this file.")  # fmt: skip
@click.option("--pushgateway", metavar="URL",
              help="Push the final metrics to this Prometheus Pushgateway (job skutag_backfill).")  # fmt: skip
@metrics_port_option
@model_options
@click.pass_context
def backfill(
    ctx: click.Context,
    /,
    catalog: Any,
    check_content: bool,
    max_age_days: float | None,
    no_cache: bool,
    max_outstanding: int | None,
    dry_run: bool,
    no_wait: bool,
    summary_path: Path | None,
    pushgateway: str | None,
    **overrides: Any,
) -> None:
    """Re-tag what changed since the last run: new items, changed images, new model / prompt /
    taxonomy versions, retryable failures, old tags. One at a time (exit 6 if another runs);
    resumes its run after a crash; never more than --max-outstanding jobs in Redis. Prints a JSON
    summary. Exit code: 0 all done, 4 some failed, 5 all failed, 2/3/6 could not run.

    \b
    Nightly, from cron:
      15 1 * * *  skutag backfill --catalog /data/catalog.csv --summary /var/log/skutag/last.json"""
    from datetime import timedelta

    from pipeline.backfill import BackfillOptions, DryRun, refresh_from_query, refresh_from_rows, run_backfill
    from pipeline.catalog import read_catalog
    from pipeline.db import make_engine
    from pipeline.metrics import BackfillMetrics, push, serve
    from schemas.taxonomy import load_taxonomy
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx, backfill_max_outstanding=max_outstanding, **overrides)
    _log_to_stderr("backfill", settings)
    database = _database(settings)
    bad_rows: list[Any] = []
    refresh = None
    if catalog is not None:
        refresh = refresh_from_rows(read_catalog(catalog, catalog.name), bad_rows)
    elif settings.backfill_source_query:
        source = make_engine(settings.backfill_source_url or settings.database_url)
        refresh = refresh_from_query(source, settings.backfill_source_query)
    options = BackfillOptions(
        dry_run=dry_run, check_content=check_content, wait=not no_wait,
        max_age=timedelta(days=max_age_days) if max_age_days else None,
        max_outstanding=settings.backfill_max_outstanding, no_cache=no_cache,
    )  # fmt: skip
    publisher = None if dry_run else CeleryPublisher(create_app(settings), settings)
    metrics = BackfillMetrics()
    serve(settings.metrics_port, metrics.registry)
    result = run_backfill(settings, load_taxonomy(settings.taxonomy_path), database, publisher, options, refresh,
                          on_progress=_backfill_progress(metrics))  # fmt: skip
    _report_bad_rows(bad_rows)
    if pushgateway and not dry_run:
        _push_final(metrics, result, pushgateway, push)
    document = _backfill_document(result)
    text = json.dumps(document, indent=2)
    click.echo(text)
    if summary_path:
        summary_path.write_text(text + "\n")
    if not isinstance(result, DryRun):
        sys.exit(EXIT_FOR_STATE.get(result.state, 0))


def _push_final(metrics: Any, result: Any, gateway: str, push: Any) -> None:
    """The cron process ends here: hand its last figures to the Pushgateway. A failed push is
    reported, not fatal: the run's own exit code matters more to cron than its metrics."""
    from pipeline.errors import RetryableError

    by_state = result.jobs_by_state
    metrics.update(by_state, by_state.get("queued", 0) + by_state.get("running", 0), 0)
    try:
        push(gateway, metrics.registry)
    except RetryableError as exc:
        err_console.print(f"[yellow]warning:[/yellow] {exc.message}", markup=True)


def _backfill_progress(metrics: Any) -> Any:
    import time

    last = {"at": 0.0, "published": 0}

    def report(progress: Any, outstanding: int) -> None:
        metrics.update(progress.by_state or {}, outstanding, progress.published - last["published"])
        last["published"] = progress.published
        now = time.monotonic()
        if now - last["at"] >= 5:
            err_console.print(f"backfill: {progress.published} published, {outstanding} outstanding")
            last["at"] = now

    return report


def _backfill_document(result: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from pipeline.backfill import DryRun

    if isinstance(result, DryRun):
        return {"dry_run": True, "to_retag": result.total, "by_reason": result.by_reason,
                "estimated_s": result.estimated_s, "planning_s": round(result.planning_s, 3),
                "content_check": result.content_check}  # fmt: skip
    return asdict(result)


# --- demo ------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".skutag"), show_default=True
)
@click.pass_context
def demo(ctx: click.Context, work_dir: Path) -> None:
    """Tag a generated sample catalog end to end on this machine: SQLite, the tiny random model on
    the CPU, no server, no network. Shows where the rows are and how to use the real model."""
    from pipeline.demo import write_sample_catalog
    from pipeline.tiny import build_tiny_model, is_tiny_model

    root = ctx.find_root().params
    database_url = root.get("database_url") or f"sqlite:///{work_dir / 'demo' / 'skutag.db'}"
    model_dir = work_dir / "tiny-model"
    console = Console(stderr=True)
    if not is_tiny_model(model_dir):
        console.print(f"building the tiny random-weight Qwen3-VL in {model_dir} ...")
        build_tiny_model(model_dir)
    catalog_path = write_sample_catalog(work_dir / "demo")
    console.print(f"sample catalog: {catalog_path} (16 products, 6 deliberately bad rows)")
    settings = load_settings(database_url=database_url, model=str(model_dir), image_roots=[catalog_path.parent])
    with catalog_path.open(encoding="utf-8") as catalog:
        code = _run_local(settings, catalog, None, console)
    _show_demo_results(settings.database_url)
    click.echo(
        f"\nThe rows are in {settings.database_url} (tables jobs, results, tags; views sku_tags_current, "
        f"sku_tags_json). Try:\n  sqlite3 {work_dir / 'demo' / 'skutag.db'} "
        '"SELECT sku, attribute, value, confidence FROM sku_tags_current LIMIT 10"\n'
        f"  skutag --database-url {settings.database_url} export --format csv\n\n"
        "The tiny model has random weights, so these tags are random: the demo shows the machinery\n"
        "(intake, constrained INT8 decoding, confidences, review routing, bad-row handling, the ledger).\n"
        "For real tags run on a GPU with the real model: SKUTAG_MODEL=Qwen/Qwen3-VL-8B-Instruct skutag run FILE"
    )
    sys.exit(0 if code in (0, EXIT_PARTIAL) else code)


def _show_demo_results(database_url: str) -> None:
    import sqlalchemy as sa
    from rich.table import Table

    from pipeline.db import make_engine

    table = Table(title="demo results (the tiny model's tags are random)")
    for column in ("sku", "status", "category", "primary color", "style", "confidence", "error"):
        table.add_column(column)
    query = sa.text("""
        SELECT j.sku, j.state, j.last_error_code,
               (SELECT value FROM tags t WHERE t.sku = j.sku AND t.attribute = 'category') AS category,
               (SELECT value FROM tags t WHERE t.sku = j.sku AND t.attribute = 'primary_color') AS color,
               (SELECT value FROM tags t WHERE t.sku = j.sku AND t.attribute = 'style') AS style,
               (SELECT confidence FROM tags t WHERE t.sku = j.sku AND t.attribute = 'category') AS confidence
        FROM jobs j WHERE j.run_id = (SELECT max(id) FROM runs) ORDER BY j.state, j.sku""")
    engine = make_engine(database_url)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    with engine.connect() as conn:
        for row in conn.execute(query):
            confidence = f"{row.confidence:.2f}" if row.confidence is not None else ""
            table.add_row(
                row.sku,
                row.state,
                row.category or "",
                row.color or "",
                row.style or "",
                confidence,
                row.last_error_code or "",
            )
    engine.dispose()
    console.print(table)


# --- review ----------------------------------------------------------------------------------
def _register_review() -> None:
    from pipeline.review.commands import review

    main.add_command(review)


_register_review()
