"""`skutag db`: create, migrate or inspect the database schema."""

from __future__ import annotations

import click

from pipeline.commands.common import settings_from


@click.group()
def db() -> None:
    """Create, migrate or inspect the database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create the tables and views, or migrate them to REVISION."""
    from pipeline.migrate import current_revision, shown_url, upgrade

    settings = settings_from(ctx)
    upgrade(settings.database_url, revision)
    click.echo(f"{shown_url(settings.database_url)} is at revision {current_revision(settings.database_url)}")


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
