"""Schema migrations through Alembic's API, so `skutag db upgrade` needs no alembic.ini."""

from __future__ import annotations

import re
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import MultipleHeads, RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import Engine

from pipeline.db import make_engine, translated_errors
from pipeline.errors import ConfigError


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    config = alembic_config(database_url)
    _check_revision(config, revision)
    with translated_errors("upgrading the schema"):
        command.upgrade(config, revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    config = alembic_config(database_url)
    _check_revision(config, revision)
    with translated_errors("downgrading the schema"):
        command.downgrade(config, revision)


def _check_revision(config: Config, revision: str) -> None:
    """An unknown revision is a usage error, said in one line before anything is touched."""
    if re.fullmatch(r"[+-]\d+", revision):  # relative steps: alembic resolves them against the database
        return
    scripts = ScriptDirectory.from_config(config)
    try:
        if not revision.strip():
            raise CommandError("empty revision")
        scripts.get_revisions(revision)
    except MultipleHeads:
        raise  # the migrations themselves are inconsistent: not the user's revision at fault
    except (CommandError, RevisionError) as exc:
        known = ", ".join(script.revision for script in reversed(list(scripts.walk_revisions())))
        raise ConfigError(f"--revision {revision!r}: no such schema revision (known: head, base, {known})") from exc


def current_revision(database_url: str) -> str | None:
    engine = make_engine(database_url)
    try:
        with translated_errors("reading the schema revision"), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def shown_url(database_url: str) -> str:
    """The database URL as it may be printed: without its password."""
    from pipeline.db import redacted

    return redacted(database_url)


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def ensure_schema(database_url: str, create_if_embedded: bool = False) -> None:
    """Refuse to run on a database without skutag's current schema (one clear line); the embedded
    SQLite database of local mode is created or migrated on the spot."""
    from pipeline.db import redacted

    if create_if_embedded and database_url.startswith("sqlite"):
        upgrade(database_url)
        return
    current, head = current_revision(database_url), head_revision(database_url)
    if current != head:
        found = f"schema {current}" if current else "no skutag tables"
        raise ConfigError(f"{redacted(database_url)} has {found}, this skutag needs {head}: run `skutag db upgrade`")


def open_database(database_url: str, create_if_embedded: bool = False) -> Engine:
    """An engine on a database whose schema is current (ensure_schema), built where it is used."""
    ensure_schema(database_url, create_if_embedded=create_if_embedded)
    return make_engine(database_url)
