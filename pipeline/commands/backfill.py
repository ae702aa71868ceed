"""`skutag backfill`: the nightly re-tag of what changed, with a JSON summary and metrics."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pipeline.commands.common import (
    NO_CACHE_HELP,
    OutputPath,
    err_console,
    log_to_stderr,
    metrics_port_option,
    model_options,
    open_database,
    report_bad_rows,
    settings_from,
)
from pipeline.commands.exits import for_run_state

RETIRE_HELP = "Retire the items the catalog no longer lists: out of the views and the plan; history stays."


@click.command()
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
@click.option("--retire-missing", is_flag=True, help=RETIRE_HELP)
@click.option("--max-outstanding", type=int, help="Most jobs in Redis at once (SKUTAG_BACKFILL_MAX_OUTSTANDING).")
@click.option("--dry-run", is_flag=True, help="Count what would be re-tagged, by reason, with an estimated duration.")
@click.option("--no-wait", is_flag=True, help="Publish what fits now and exit; the next backfill continues the run.")
@click.option("--summary", "summary_path", type=OutputPath(),
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
    retire_missing: bool,
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

    from rich.markup import escape

    from pipeline.backfill import BackfillOptions, DryRun, catalog_refresh, run_backfill
    from pipeline.catalog import catalog_folder, read_catalog
    from pipeline.metrics import BackfillMetrics, push, serve
    from pipeline.settings import taxonomy_for
    from workers.app import CeleryPublisher, create_app

    settings = settings_from(ctx, backfill_max_outstanding=max_outstanding, **overrides)
    log_to_stderr("backfill", settings)
    database = open_database(settings)
    bad_rows: list[Any] = []
    refresh = catalog_refresh(
        settings, read_catalog(catalog, catalog.name, catalog_folder(catalog.name)) if catalog else None, bad_rows
    )
    options = BackfillOptions(
        dry_run=dry_run, check_content=check_content, wait=not no_wait,
        max_age=timedelta(days=max_age_days) if max_age_days else None,
        max_outstanding=settings.backfill_max_outstanding, no_cache=no_cache, retire_missing=retire_missing,
        pin_model=overrides.get("model") is not None,
    )  # fmt: skip
    publisher = None if dry_run else CeleryPublisher(create_app(settings), settings)
    metrics = BackfillMetrics()
    serve(settings.metrics_port, metrics.registry)
    result = run_backfill(settings, taxonomy_for(settings), database, publisher, options, refresh,
                          on_progress=_backfill_progress(metrics))  # fmt: skip
    report_bad_rows(bad_rows)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", markup=True, highlight=False)
    if pushgateway and not dry_run:
        _push_final(metrics, result, pushgateway, push)
    document = _backfill_document(result)
    text = json.dumps(document, indent=2)
    click.echo(text)
    if summary_path:
        summary_path.write_text(text + "\n")
    if not isinstance(result, DryRun):
        sys.exit(for_run_state(result.state))


def _push_final(metrics: Any, result: Any, gateway: str, push: Any) -> None:
    """The cron process ends here: hand its last figures to the Pushgateway. A failed push is
    reported, not fatal: the run's own exit code matters more to cron than its metrics."""
    from pipeline.errors import RetryableError
    from pipeline.ledger import open_count

    by_state = result.jobs_by_state
    metrics.update(by_state, open_count(by_state), 0)
    try:
        push(gateway, metrics.registry)
    except RetryableError as exc:
        err_console.print(f"[yellow]warning:[/yellow] {exc.message}", markup=True)


def _backfill_progress(metrics: Any) -> Any:
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
    from pipeline.backfill import DryRun

    if isinstance(result, DryRun):
        return {"dry_run": True, "to_retag": result.total, "by_reason": result.by_reason,
                "estimated_s": result.estimated_s, "planning_s": round(result.planning_s, 3),
                "content_check": result.content_check, "retired": result.retired,
                "planned_against": result.planned_against, "warnings": result.warnings}  # fmt: skip
    return asdict(result)
