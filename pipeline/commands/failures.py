"""`skutag failures RUN` (the failed skus with code, message and attempts) and `skutag retry RUN`
(the retryable ones re-queued as a new run)."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from pipeline.commands.common import err_console, open_database, settings_from
from pipeline.commands.exits import ExitCode

FAILURE_COLUMNS = ("sku", "code", "attempts", "message", "image_uri")


@click.command()
@click.argument("run_id", type=int)
@click.option("--code", help="Only failures with this error code (e.g. not_found, fetch_failed).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True,
              help="table: aligned on a terminal, tab-separated when piped; csv: RFC 4180.")  # fmt: skip
@click.pass_context
def failures(ctx: click.Context, run_id: int, code: str | None, fmt: str) -> None:
    """List the failed skus of RUN with their error code, message and attempts (URL passwords masked).

    \b
      skutag failures 42 --code not_found --format csv > missing.csv"""
    from rich.table import Table

    from pipeline.failures import list_failures
    from pipeline.run_progress import snapshot
    from pipeline.secrets import mask_secrets
    from pipeline.spreadsheet import FormulaSafeWriter, tab_separated

    database = open_database(settings_from(ctx))
    if snapshot(database, run_id).state == "missing":
        raise click.BadParameter(f"there is no run {run_id}", param_hint="RUN_ID")
    rows = [
        (f.sku, f.code, str(f.attempts), mask_secrets(f.message), mask_secrets(f.image_uri))
        for f in list_failures(database, run_id, code)
    ]
    if fmt == "csv":
        out = FormulaSafeWriter(sys.stdout)  # skus come from catalogs: no formula may run in a spreadsheet
        out.writerow(FAILURE_COLUMNS)
        out.writerows(rows)
    elif sys.stdout.isatty():
        table = Table(*FAILURE_COLUMNS)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        click.echo(tab_separated(FAILURE_COLUMNS))
        for row in rows:
            click.echo(tab_separated(row))  # skus come from catalogs, as for csv
    err_console.print(f"{len(rows)} failed jobs in run {run_id}" + (f" with code {code}" if code else ""))


@click.command()
@click.argument("run_id", type=int)
@click.option("--code", help="Only failures with this (retryable) error code.")
@click.pass_context
def retry(ctx: click.Context, run_id: int, code: str | None) -> None:
    """Re-queue the retryable failures of RUN (fetch_failed, timeout, inference_failed,
    attempts_exhausted, internal_error) as a new run, with each item's current image. Final codes
    (not_found, corrupt, ...) fail the same way again: fix those items and submit them. A local
    run's retry is finished with `skutag run --resume NEW_RUN`."""
    from pipeline.errors import RetryableError
    from pipeline.failures import format_counts, retry_run
    from pipeline.producer import publish_jobs
    from pipeline.secrets import mask_secrets
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx)
    database = open_database(settings)
    planned = retry_run(database, run_id, code)
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
    try:
        publish_jobs(database, CeleryPublisher(create_app(settings), settings), planned.jobs)
    except RetryableError as exc:
        err_console.print(
            f"[red]error:[/red] {mask_secrets(exc.message)}; the jobs are queued in the ledger: "
            "`skutag reconcile` (or any writer) publishes them once the broker is back",
            markup=True,
        )
        sys.exit(ExitCode.UNAVAILABLE)
    click.echo(f"follow it: skutag status {planned.run_id}")
