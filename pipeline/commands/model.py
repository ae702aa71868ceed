"""`skutag model` (build or inspect models) and `skutag tag-image` (one image through intake and
engine, for prompt iteration)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import click

from pipeline.commands.common import err_console, model_options, settings_from
from pipeline.commands.exits import ExitCode
from schemas.results import ErrorCode


@click.group()
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


@click.command("tag-image")
@click.argument("image_uri")
@model_options
@click.option("--fit", "image_fit", type=click.Choice(["crop", "pad"]), help="Center crop (default) or pad on white.")
@click.pass_context
def tag_image(ctx: click.Context, /, image_uri: str, **overrides: Any) -> None:
    """Tag one image (a path, file:// or http(s) URL) and print the result as JSON: for prompt
    iteration and spot checks, through the same intake and engine as the workers."""
    from pipeline.local import tag_image as tag_one

    settings = settings_from(ctx, **overrides)
    if "://" not in image_uri:  # a file named on the command line is trusted, wherever it is
        settings = settings.with_image_roots(Path(image_uri).resolve().parent)
    debug = bool(ctx.find_root().params.get("debug"))
    with _log_only_with_debug(debug):
        result, stats = tag_one(settings, image_uri)
    document = result.model_dump(mode="json", exclude={"job_id"})
    document["batch"] = stats.as_dict() if stats else None
    click.echo(json.dumps(document, ensure_ascii=False, indent=2))
    if result.error is not None and result.error.code == ErrorCode.INTERNAL_ERROR:
        hint = "" if debug else " (run with --debug for the traceback)"
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] internal_error: tagging {escape(image_uri)} failed{hint}", markup=True)
        sys.exit(ExitCode.UNEXPECTED)  # a bug, as for any command (pipeline/cli.py)
    if result.status == "failed":
        sys.exit(ExitCode.BAD_INPUT)


@contextmanager
def _log_only_with_debug(debug: bool) -> Iterator[None]:
    """tag-image has no log file: the traceback the per-item boundary logs for an internal_error
    would reach stderr through logging's last-resort handler, beside the one-line error. Shown
    with --debug only, like every command's tracebacks."""
    root = logging.getLogger()
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if debug else logging.NullHandler()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
