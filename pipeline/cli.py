"""The `skutag` command line. Every command builds one Settings (flags override SKUTAG_* variables),
prints one line per error (a traceback only with --debug) and exits with a code that means
something:

    0 success   1 unexpected error   2 bad usage, settings, input or model   3 a service is down
    4 a run ended partly failed      5 a run failed entirely                 6 locked by another process
"""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline.commands import COMMANDS
from pipeline.commands.common import err_console
from pipeline.commands.exits import ExitCode, for_error
from pipeline.errors import SkutagError


class SkutagGroup(click.Group):
    """Turns skutag's errors into one red line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from rich.markup import escape

        from pipeline.secrets import mask_secrets

        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a bad flag or argument: one line naming it, as for settings
            where = exc.ctx.command_path if exc.ctx else "skutag"
            err_console.print(f"[red]error:[/red] {escape(exc.format_message())} (see {where} -h)", markup=True)
            sys.exit(ExitCode.BAD_INPUT)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except SkutagError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            err_console.print(f"[red]error:[/red] {escape(mask_secrets(exc.message))}", markup=True)
            sys.exit(for_error(exc))
        except Exception as exc:  # a bug: one line (no credentials), the traceback with --debug
            if ctx.find_root().params.get("debug"):
                raise
            detail = escape(mask_secrets(f"{type(exc).__name__}: {exc}"))
            err_console.print(f"[red]unexpected error:[/red] {detail} (run with --debug for the traceback)")
            sys.exit(ExitCode.UNEXPECTED)


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


for _command in COMMANDS:
    main.add_command(_command)
