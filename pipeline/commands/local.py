"""Local mode's commands: `run` a catalog in this process (no Redis, no workers) and `demo`, which
does that on a generated sample with the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from pipeline.commands.common import NO_CACHE_HELP, err_console, model_options, report_bad_rows, settings_from
from pipeline.commands.exits import ExitCode, for_run_state
from pipeline.settings import Settings, load_settings


@click.command("run")
@click.argument("catalog", type=click.File("r", encoding="utf-8-sig"), required=False)
@click.option(
    "--resume", "resume_run", type=click.IntRange(min=1), help="Finish the open jobs of an earlier local run."
)
@click.option("--image-root", "image_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Another folder local image paths may point into, besides SKUTAG_IMAGE_ROOTS and the "
                   "catalog's folder (repeatable).")  # fmt: skip
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
    from pipeline.catalog import catalog_folder
    from pipeline.local import settings_for_resume

    if catalog is None and resume_run is None:
        raise click.UsageError("give a CATALOG file, or --resume RUN")
    settings = settings_from(ctx, **overrides).with_image_roots(*image_roots)
    if catalog is not None:
        settings = settings.with_image_roots(catalog_folder(catalog.name))
    if resume_run is not None:
        resumed = settings_for_resume(settings, resume_run)
        if resumed is None:
            raise click.BadParameter(f"there is no run {resume_run}", param_hint="--resume")
        settings = resumed
    sys.exit(run_local(settings, catalog, resume_run, err_console, use_cache=not no_cache))


class _ProgressView:
    """Renders a local run (pipeline.local.LocalObserver) on a console: bad rows, a progress bar."""

    def __init__(self, settings: Settings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def submitted(self, report: Any) -> None:
        report_bad_rows(report.bad_rows)
        self.console.print(f"run {report.run_id}: {report.accepted} jobs, {len(report.bad_rows)} bad rows")

    def loading_model(self) -> None:
        self.console.print(f"loading {self.settings.model} ({self.settings.quantization}) ...")

    def started(self, run_id: int, total: int, finished: int) -> None:
        columns = (TextColumn(f"run {run_id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("tagging", total=total, completed=finished)

    def advanced(self, handled: Any) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, handled.results)

    def stopped(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_local(
    settings: Settings, catalog: Any, resume_run: int | None, console: Console, use_cache: bool = True
) -> ExitCode:
    """Run (or resume) a local run with a progress bar; the exit code of how it ended."""
    from pipeline.catalog import catalog_folder, read_catalog
    from pipeline.local import run_catalog

    rows = read_catalog(catalog, catalog.name, catalog_folder(catalog.name)) if resume_run is None else None
    run = run_catalog(settings, rows, resume_run, _ProgressView(settings, console), use_cache)
    rate = run.report.handled / run.report.seconds if run.report.seconds else 0.0
    console.print(
        f"run {run.run_id} {run.state}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(run.counts.items()))
        + f"; {run.report.cache_hits} from the result cache; {rate:.1f} images/s"
    )
    if run.failures:
        from pipeline.failures import format_counts

        # One line per fact: a console narrower than the sentence would otherwise wrap mid-list.
        console.print(f"failed by code: {format_counts(run.failures)}", soft_wrap=True)
        console.print(f"  list them: skutag failures {run.run_id}")
        console.print(f"  retry the retryable ones: skutag retry {run.run_id}")
    return for_run_state(run.state)


@click.command()
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
        code = run_local(settings, catalog, None, console)
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
    # A partly failed demo is a success: its sample catalog fails some rows on purpose.
    sys.exit(ExitCode.OK if code in (ExitCode.OK, ExitCode.PARTIAL) else code)


def _show_demo_results(database_url: str) -> None:
    from rich.table import Table

    from pipeline.status import latest_run_outcomes

    table = Table(title="demo results (the tiny model's tags are random)")
    for column in ("sku", "status", "category", "primary color", "style", "confidence", "error"):
        table.add_column(column)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    for row in latest_run_outcomes(database_url):
        confidence = f"{row.confidence:.2f}" if row.confidence is not None else ""
        table.add_row(
            row.sku, row.state, row.category or "", row.color or "", row.style or "", confidence,
            row.last_error_code or "",
        )  # fmt: skip
    console.print(table)
