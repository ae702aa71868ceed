"""`skutag doctor`: can this machine run skutag? One line per check."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline.commands.common import model_options
from pipeline.commands.exits import for_checks


@click.command()
@model_options
@click.pass_context
def doctor(ctx: click.Context, /, **overrides: Any) -> None:
    """Check that this machine can run skutag: settings, database reachable and migrated, broker
    reachable, model files and config, GPU and bitsandbytes' CUDA kernels, image roots, free disk.
    One line per check. Exit code: 0 all ok, 1 a warning, 2 a check failed."""
    from pipeline.doctor import run_checks, worst

    root = ctx.find_root().params
    checks = []
    for check in run_checks({"database_url": root.get("database_url"), **overrides}):
        click.echo(check.line())
        checks.append(check)
    sys.exit(for_checks(worst(checks)))
