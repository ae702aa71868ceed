"""`skutag review ...` and `skutag eval`: parse, call one library function, render."""

from __future__ import annotations

import getpass
from typing import Any

import click

from pipeline.settings import Settings, load_settings


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    return load_settings(database_url=ctx.find_root().params.get("database_url"), **overrides)


def _database(settings: Settings) -> Any:
    from pipeline.db import make_engine
    from pipeline.migrate import ensure_schema

    ensure_schema(settings.database_url)
    return make_engine(settings.database_url)


@click.group()
def review() -> None:
    """Review tags in the browser, sample them for accuracy, exchange them with Label Studio.

    \b
      skutag review serve                     the review app on http://127.0.0.1:8686
      skutag review hash-password NAME        a users-file line for SKUTAG_REVIEW_USERS_FILE
    """


@review.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Another address needs SKUTAG_REVIEW_TOKEN or SKUTAG_REVIEW_USERS_FILE.")  # fmt: skip
@click.option("--port", default=8686, show_default=True, type=click.IntRange(1, 65535))
@click.option("--reviewer", help="Your name in the log when no credentials are set (default: the OS user).")
@click.pass_context
def serve_command(ctx: click.Context, host: str, port: int, reviewer: str | None) -> None:
    """Serve the review app: the queue (lowest confidence first), one item with its image beside
    every attribute (keys: a accept, 1-9 pick, n not visible, u undo, j/k next/previous), a grid
    with bulk accept, and the evaluation report at /report."""
    from pipeline.review.serve import serve

    settings = _settings(ctx)
    engine = _database(settings)
    click.echo(f"review app on http://{host}:{port}/ (Ctrl+C stops it)", err=True)
    serve(settings, engine, host, port, reviewer)


@review.command("hash-password")
@click.argument("name")
def hash_password_command(name: str) -> None:
    """Print a `NAME:scrypt$...` line for the users file (the password is asked twice, not echoed)."""
    from pipeline.review.auth import USER_NAME, hash_password

    if not USER_NAME.fullmatch(name):
        raise click.BadParameter("letters, digits and _.@- only, up to 64", param_hint="NAME")
    password = getpass.getpass("password: ")
    if len(password) < 8 or password != getpass.getpass("again: "):
        raise click.ClickException("passwords differ or are shorter than 8 characters")
    click.echo(f"{name}:{hash_password(password)}")
