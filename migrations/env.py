"""Alembic environment: the database URL comes from skutag's Settings, like everything else."""

from __future__ import annotations

from alembic import context

from pipeline.db import make_engine, metadata
from pipeline.settings import load_settings

config = context.config
target_metadata = metadata


def _database_url() -> str:
    # `skutag db upgrade --database-url ...` passes its choice in; plain alembic falls back to Settings.
    given = config.attributes.get("database_url")
    return str(given) if given else load_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # Batch mode rebuilds a SQLite table (copy, drop, rename): with foreign keys on, the
                # drop would cascade to the rows that reference it. The pragma only works outside
                # a transaction, so it is set and committed before the migrations' transaction.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
