"""Following and reading runs: `status` (live progress of one run), `runs` (the recent ones;
`runs cancel` / `runs seal` end one by hand) and `export` (the current tags from the consumer views)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console

from pipeline.commands.common import err_console, open_database, settings_from
from pipeline.commands.exits import for_run_state
from schemas.states import JobState, RunState


@click.command()
@click.argument("run_id", type=int)
@click.option("--once", is_flag=True, help="Print the counts once as JSON instead of following the run.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds between refreshes (and between piped lines).")  # fmt: skip
@click.pass_context
def status(ctx: click.Context, run_id: int, once: bool, interval: float) -> None:
    """Follow RUN until it ends: a live bar on a terminal, a progress line per change when piped
    (for logs), with the rate and an ETA; a finished run shows its mean rate. Exit code: 0 done,
    4 partly failed, 5 all failed (with --once: the same, or 0 while it still runs)."""
    from pipeline.run_progress import current_rate, describe, snapshot

    database = open_database(settings_from(ctx))
    first = snapshot(database, run_id)
    if first.state == "missing":
        raise click.BadParameter(f"there is no run {run_id}", param_hint="RUN_ID")
    if once:
        click.echo(json.dumps({"run": run_id, "state": first.state, "jobs": first.counts, "failures": first.failures}))
        sys.exit(for_run_state(first.state))
    follow = _follow_live if err_console.is_terminal else _follow_piped
    last = follow(database, first, interval)
    click.echo(describe(last, current_rate(first, last)))
    if last.failures:
        err_console.print(f"list them: skutag failures {run_id}; retry the retryable ones: skutag retry {run_id}")
    sys.exit(for_run_state(last.state))


def _follow_piped(database: Any, first: Any, interval: float) -> Any:
    """A line on stderr whenever the counts change (and the first), so a log shows progress."""
    from pipeline.run_progress import current_rate, describe, snapshot

    now, shown = first, None
    while True:
        if now.counts != shown:
            click.echo(describe(now, current_rate(first, now)), err=True)
            shown = now.counts
        if now.state != RunState.RUNNING:
            return now
        time.sleep(interval)
        now = snapshot(database, first.run_id)


def _follow_live(database: Any, first: Any, interval: float) -> Any:
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
            if now.state != RunState.RUNNING:
                return now
            time.sleep(interval)
            now = snapshot(database, first.run_id)


@click.group(invoke_without_command=True)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many runs, newest first.")
@click.pass_context
def runs(ctx: click.Context, limit: int) -> None:
    """List the most recent runs with their job counts and their failures by error code; end one
    by hand with `skutag runs cancel RUN` or `skutag runs seal RUN`."""
    if ctx.invoked_subcommand is None:
        _list_runs(ctx, limit)


@runs.command("cancel")
@click.argument("run_id", type=click.IntRange(min=1))
@click.pass_context
def runs_cancel(ctx: click.Context, run_id: int) -> None:
    """End RUN now: its queued and running jobs fail with code `cancelled` (workers skip them; a
    result already on its way is still written). Exit 2 if RUN does not exist or has ended."""
    from pipeline.run_control import cancel_run

    cancelled = cancel_run(open_database(settings_from(ctx)), run_id)
    click.echo(f"run {run_id} cancelled: {cancelled} open jobs failed as cancelled")


@runs.command("seal")
@click.argument("run_id", type=click.IntRange(min=1))
@click.pass_context
def runs_seal(ctx: click.Context, run_id: int) -> None:
    """Let RUN end with the jobs it has: for a run whose submit stopped before sealing it (killed,
    or the database went away). It ends at once if they are all finished, else with its last one."""
    from pipeline.run_control import seal_run

    sealed = seal_run(open_database(settings_from(ctx)), run_id)
    if sealed.state != RunState.RUNNING:
        click.echo(f"run {run_id} sealed and ended: {sealed.state}")
    elif sealed.newly:
        click.echo(f"run {run_id} sealed: it ends with the last of its {sealed.open_jobs} open jobs")
    else:
        click.echo(f"run {run_id} was sealed already; {sealed.open_jobs} jobs still open")


def _list_runs(ctx: click.Context, limit: int) -> None:
    from rich.table import Table

    from pipeline.failures import format_counts
    from pipeline.ledger import open_count
    from pipeline.spreadsheet import tab_separated
    from pipeline.status import recent_runs

    columns = ("run", "kind", "state", "jobs", "done", "review", "failed", "open", "created", "finished", "failures")
    table = Table()
    for column in columns:
        table.add_column(column)
    for run in recent_runs(open_database(settings_from(ctx)), limit):
        c = run.counts
        table.add_row(
            str(run.id), run.kind, run.state, str(run.total_jobs), str(c.get(JobState.DONE, 0)),
            str(c.get(JobState.NEEDS_REVIEW, 0)), str(c.get(JobState.FAILED, 0)), str(open_count(c)),
            f"{run.created_at:%Y-%m-%d %H:%M}", f"{run.finished_at:%Y-%m-%d %H:%M}" if run.finished_at else "",
            format_counts(run.failures),
        )  # fmt: skip
    if sys.stdout.isatty():
        Console().print(table)
        return
    click.echo(tab_separated(columns))  # piped: tab-separated, for scripts and spreadsheets
    for values in zip(*(column.cells for column in table.columns), strict=True):
        click.echo(tab_separated(values))


@click.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="jsonl: one document per sku (sku_tags_json); csv: one row per sku and attribute.")  # fmt: skip
@click.option("--output", "-o", type=click.File("w", encoding="utf-8", lazy=False), default="-",
              help="A file (default stdout); opened before the export starts.")  # fmt: skip
@click.pass_context
def export(ctx: click.Context, fmt: str, output: Any) -> None:
    """Export the current tags (with reviews applied) from the consumer views, with listing issues
    (jsonl: a listing_issues list per sku that has any; csv: a listing_values column per attribute)."""
    from pipeline.export import export_csv, export_jsonl

    database = open_database(settings_from(ctx))
    count = (export_jsonl if fmt == "jsonl" else export_csv)(database, output)
    err_console.print(f"exported {count} {'skus' if fmt == 'jsonl' else 'rows'}")
