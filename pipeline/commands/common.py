"""What every command shares: settings from the environment and the root flags, the database
(schema checked), the model flags, and how bad rows and logs are shown."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from pipeline.settings import Settings, load_settings

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class OutputPath(click.Path):
    """A file the command will write when it is done: checked when the flag is parsed, before any
    work (a nightly job must not learn after an hour that its summary has nowhere to go)."""

    name = "file"

    def __init__(self) -> None:
        super().__init__(dir_okay=False, writable=True, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        folder = path.parent
        if not folder.is_dir():
            self.fail(f"{str(path)!r}: the directory {str(folder)!r} does not exist", param, ctx)
        if not os.access(folder, os.W_OK):
            self.fail(f"{str(path)!r}: the directory {str(folder)!r} is not writable", param, ctx)
        return path


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """The one Settings of this command: SKUTAG_* variables, overridden by the flags given (a bad
    flag value is reported under the flag's name, not the variable's)."""
    given = {"database_url": ctx.find_root().params.get("database_url"), **overrides}
    return load_settings(
        flag_names=flag_names(ctx, [name for name, value in given.items() if value is not None]), **given
    )


def flag_names(ctx: click.Context, settings: Sequence[str]) -> dict[str, str]:
    """The flag behind each of these settings among the options of ctx's command and its parents:
    the option of the same name (batch_size: --batch-size), else one the setting's name ends with
    (backfill_max_outstanding: --max-outstanding)."""
    options = [
        param
        for level in _levels(ctx)
        for param in level.command.params
        if isinstance(param, click.Option) and param.name
    ]
    names: dict[str, str] = {}
    for setting in settings:
        option = next((o for o in options if o.name == setting), None) or next(
            (o for o in options if setting.endswith(f"_{o.name}")), None
        )
        if option is not None:
            names[setting] = max(option.opts, key=len)
    return names


def _levels(ctx: click.Context) -> list[click.Context]:
    levels: list[click.Context] = []
    level: click.Context | None = ctx
    while level is not None:
        levels.append(level)
        level = level.parent
    return levels


def open_database(settings: Settings, create_if_embedded: bool = False) -> Any:
    """The database engine, once its schema is known to be current (created, for embedded SQLite)."""
    from pipeline.migrate import open_database as open_current

    return open_current(settings.database_url, create_if_embedded)


def model_options(command: Any) -> Any:
    """--model / --quantization / --device / --language, shared by every command that loads the model."""
    options = [
        click.option("--model", help="Hub id or local directory (SKUTAG_MODEL; default Qwen/Qwen3-VL-8B-Instruct)."),
        click.option("--quantization", type=click.Choice(["int8", "int8-torchao", "nf4", "bf16", "fp16", "fp32"]),
                     help="SKUTAG_QUANTIZATION (default int8)."),
        click.option("--device", help="auto, cpu, cuda or cuda:N (SKUTAG_DEVICE)."),
        click.option("--language", "prompt_language", type=click.Choice(["en", "zh"]),
                     help="Prompt and label language (SKUTAG_PROMPT_LANGUAGE)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


NO_CACHE_HELP = "Infer every image, even one whose content and versions have a stored result."


def report_bad_rows(bad_rows: list[Any], limit: int = 20) -> None:
    from rich.markup import escape

    from pipeline.secrets import mask_secrets

    for row in bad_rows[:limit]:
        err_console.print(f"[yellow]bad row[/yellow] {escape(mask_secrets(str(row)))}", markup=True)
    if len(bad_rows) > limit:
        err_console.print(f"[yellow]... and {len(bad_rows) - limit} more bad rows[/yellow]", markup=True)


def log_to_stderr(service: str, settings: Settings) -> None:
    """One logger per process, in SKUTAG_LOG_FORMAT, named after the service."""
    from pipeline.logs import configure_logging

    configure_logging(service, settings.log_format)


def metrics_port_option(command: Any) -> Any:
    return click.option(
        "--metrics-port", type=int, help="Serve Prometheus metrics on this port (SKUTAG_METRICS_PORT)."
    )(command)
