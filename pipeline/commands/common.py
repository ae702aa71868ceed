"""What every command shares: settings from the environment and the root flags, the database
(schema checked), the model flags, and how bad rows and logs are shown."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from pipeline.settings import Settings, load_settings

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """The one Settings of this command: SKUTAG_* variables, overridden by the flags given."""
    root = ctx.find_root().params
    return load_settings(database_url=root.get("database_url"), **overrides)


def open_database(settings: Settings, create_if_embedded: bool = False) -> Any:
    """The database engine, once its schema is known to be current (created, for embedded SQLite)."""
    from pipeline.migrate import open_database as open_current

    return open_current(settings.database_url, create_if_embedded)


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
