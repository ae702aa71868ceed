"""Migrations up and down on empty Postgres and SQLite databases, through the CLI users run."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.db import make_engine, metadata
from pipeline.migrate import current_revision, downgrade, head_revision, upgrade

VIEWS = {"sku_tags_current", "sku_tags_json", "listing_issues", "sku_tag_sources"}


def _relations(url: str) -> tuple[set[str], set[str]]:
    engine = make_engine(url)
    try:
        inspector = sa.inspect(engine)
        return set(inspector.get_table_names()) - {"alembic_version"}, set(inspector.get_view_names())
    finally:
        engine.dispose()


def _check_round_trip(url: str) -> None:
    assert current_revision(url) is None
    upgrade(url)
    assert current_revision(url) == head_revision(url)
    tables, views = _relations(url)
    assert tables == set(metadata.tables)
    assert views == VIEWS
    downgrade(url)
    assert current_revision(url) is None
    assert _relations(url) == (set(), set())
    upgrade(url)  # and back up again on the same database
    assert _relations(url)[1] == VIEWS


@pytest.mark.postgres
def test_migrations_round_trip_on_an_empty_postgres(empty_postgres_url: str) -> None:
    _check_round_trip(empty_postgres_url)


def test_migrations_round_trip_on_sqlite(tmp_path: Path) -> None:
    _check_round_trip(f"sqlite:///{tmp_path}/fresh.db")


@pytest.mark.postgres
def test_migrated_schema_matches_the_table_definitions(empty_postgres_url: str) -> None:
    # The hand-written migration and pipeline/db.py must describe the same columns.
    upgrade(empty_postgres_url)
    engine = make_engine(empty_postgres_url)
    try:
        inspector = sa.inspect(engine)
        for table in metadata.tables.values():
            migrated = {column["name"] for column in inspector.get_columns(table.name)}
            assert migrated == set(table.columns.keys()), table.name
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def test_migrations_and_table_definitions_agree(database: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # Alembic's autogenerate comparison (tables, columns, types, nullability, server defaults,
    # indexes, unique constraints and foreign keys) between the migrated database and pipeline/db.py:
    # a migration that drifts from the models, or a model change without a migration, shows here.
    url = request.getfixturevalue("empty_postgres_url") if database == "postgres" else f"sqlite:///{tmp_path}/g.db"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_cli_upgrade_and_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    runner = CliRunner()
    result = runner.invoke(main, ["--database-url", url, "db", "upgrade"])
    assert result.exit_code == 0, result.output
    head = head_revision(url)
    assert result.output.strip().endswith(f"is at revision {head}")
    result = runner.invoke(main, ["--database-url", url, "db", "current"])
    assert result.output.strip() == f"current: {head}  head: {head}"
    result = runner.invoke(main, ["--database-url", url, "db", "downgrade", "--yes"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "schema is at revision base (empty)"


def test_cli_reports_an_unreachable_database_in_one_line() -> None:
    result = CliRunner().invoke(main, ["--database-url", "postgresql+psycopg2://x@127.0.0.1:1/none", "db", "upgrade"])
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: database error while upgrading the schema: ")


def test_cli_rejects_an_unsupported_database_url() -> None:
    result = CliRunner().invoke(main, ["--database-url", "mysql://root@localhost/x", "db", "upgrade"])
    assert result.exit_code == 2
    # Named as the flag the user typed; the URL itself is never echoed (it may carry a password).
    assert result.output.strip() == (
        "error: invalid settings: --database-url: only postgresql and sqlite are supported, not 'mysql'"
    )
