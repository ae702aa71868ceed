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
from typing import Any

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
        try:
            return super().invoke(ctx)
        except SkutagError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            err_console.print(f"[red]error:[/red] {exc.message}", markup=True)
            sys.exit(exc.exit_code)


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
def model_tiny(directory: Path, seed: int) -> None:
    """Write a tiny random-weight Qwen3-VL to DIRECTORY: the real classes, a locally built tokenizer,
    loadable like the real model (INT8 included). Its tags are random; it tests the machinery."""
    from pipeline.tiny import build_tiny_model

    build_tiny_model(directory, seed=seed)
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
    batch = tag_batch(engine, [job], [outcome])
    (result,) = batch.results
    document = result.model_dump(mode="json", exclude={"job_id"})
    document["batch"] = batch.stats[0].as_dict() if batch.stats else None
    click.echo(json.dumps(document, ensure_ascii=False, indent=2))
    if result.status == "failed":
        sys.exit(2)


# --- benchmarks ------------------------------------------------------------------------------
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


# --- demo ------------------------------------------------------------------------------------
@main.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Set up the embedded database and show the taxonomy skutag will tag against."""
    from pipeline.db import redacted
    from pipeline.migrate import upgrade
    from schemas.taxonomy import load_taxonomy

    settings = settings_from(ctx)
    upgrade(settings.database_url)
    taxonomy_ = load_taxonomy(settings.taxonomy_path)
    click.echo(f"database ready: {redacted(settings.database_url)} (tables items, runs, jobs, results, tags, ...)")
    click.echo(f"taxonomy {taxonomy_.name} {taxonomy_.version}: {len(taxonomy_.categories)} categories")
    click.echo("the tagging pipeline is not built yet: this demo stops after the data layer")
