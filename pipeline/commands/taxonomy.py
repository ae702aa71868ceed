"""`skutag taxonomy`: check or show a taxonomy."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.commands.common import settings_from


@click.group()
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
