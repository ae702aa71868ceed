"""The distributed pipeline's commands: `submit` a catalog, run a GPU `worker` or a `writer`, and
`reconcile` the ledger with the broker."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline.commands.common import (
    NO_CACHE_HELP,
    err_console,
    log_to_stderr,
    metrics_port_option,
    model_options,
    open_database,
    report_bad_rows,
    settings_from,
)
from pipeline.commands.exits import ExitCode


@click.command()
@click.argument("catalog", type=click.File("r", encoding="utf-8-sig"))
@click.option("--no-cache", is_flag=True, help=NO_CACHE_HELP)
@click.pass_context
def submit(ctx: click.Context, catalog: Any, no_cache: bool) -> None:
    """Queue CATALOG for the GPU workers: a CSV or JSONL file (or - for stdin) with columns sku,
    image_uri and optionally title, category_hint. Bad rows are reported with their line numbers;
    the good rows go ahead. Follow the run with `skutag status RUN`."""
    from pipeline.catalog import catalog_folder, read_catalog
    from pipeline.producer import submit_catalog
    from pipeline.secrets import mask_secrets
    from pipeline.settings import taxonomy_for
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx)
    database = open_database(settings)
    publisher = CeleryPublisher(create_app(settings), settings)
    rows = read_catalog(catalog, catalog.name, catalog_folder(catalog.name))
    taxonomy = taxonomy_for(settings)
    report = submit_catalog(rows, database, settings, taxonomy, publisher, use_cache=not no_cache)
    report_bad_rows(report.bad_rows)
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
        sys.exit(ExitCode.UNAVAILABLE)
    if report.accepted == 0 and report.bad_rows:
        sys.exit(ExitCode.BAD_INPUT)


CELERY_PASSTHROUGH = {"ignore_unknown_options": True}


def celery_worker_options(command: Any) -> Any:
    """--events, and any `celery worker` option after the command's own (e.g. --loglevel=DEBUG)."""
    events = click.option(
        "--events", "worker_events", is_flag=True, default=None,
        help="Send task events for `celery events` and Flower (SKUTAG_WORKER_EVENTS).",
    )  # fmt: skip
    passthrough = click.argument("celery_args", nargs=-1, type=click.UNPROCESSED, metavar="[CELERY WORKER OPTIONS]")
    return events(metrics_port_option(passthrough(command)))


@click.command("worker", context_settings=CELERY_PASSTHROUGH)
@model_options
@click.option("--queues", default="new,backfill", show_default=True, help="Which job queues to consume, in order.")
@click.option(
    "--concurrency", "worker_concurrency", type=int, help="Messages worked on at once (SKUTAG_WORKER_CONCURRENCY)."
)
@click.option(
    "--batch-size", type=int,
    help="Images merged from queue messages into one engine call (SKUTAG_BATCH_SIZE; it also sizes messages).",
)  # fmt: skip
@click.option(
    "--engine-batch-size", metavar="auto|N",
    help="Most images per forward batch; a larger call runs in chunks of this size (SKUTAG_ENGINE_BATCH_SIZE). "
    "auto (the default): what the free GPU memory holds once the model is loaded; 32 on a CPU.",
)  # fmt: skip
@click.option(
    "--decode-mode", type=click.Choice(["eager", "static", "compiled"]),
    help="The engine's key/value cache (SKUTAG_DECODE_MODE): compiled uses CUDA graphs on a GPU.",
)  # fmt: skip
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
    open_database(settings).dispose()
    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if unknown:
        raise click.BadParameter(
            f"unknown queue {unknown[0]!r}; choose from {', '.join(QUEUES)}", param_hint="--queues"
        )
    log_to_stderr("worker", settings)
    run_gpu_worker(settings, [QUEUES[name] for name in names], settings.worker_concurrency, celery_args)


@click.command("writer", context_settings=CELERY_PASSTHROUGH)
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
    open_database(settings).dispose()
    log_to_stderr("writer", settings)
    run_writer(settings, reconcile_periodically=not no_reconcile, celery_args=celery_args)


@click.command()
@click.pass_context
def reconcile(ctx: click.Context) -> None:
    """Re-queue jobs whose worker died (lease expired), and publish jobs the broker lost or never
    got (Redis restarted or down at submit). Safe to run any time; writers run it periodically."""
    from pipeline.reconcile import reconcile as run_reconcile
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx)
    database = open_database(settings)
    publisher = CeleryPublisher(create_app(settings), settings)
    report = run_reconcile(database, publisher, republish_after_s=settings.republish_after_s)
    if report.skipped:
        click.echo("another reconciler is running; nothing done")
        return
    click.echo(
        f"{report.expired_leases} expired leases re-queued, {report.lost_messages} lost messages found, "
        f"{report.published} jobs published"
    )
