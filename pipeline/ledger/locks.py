"""One-at-a-time locks held in the database: one backfill, one reconciler.

Postgres: advisory locks (a session lock for the backfill, a transaction lock for the reconciler);
SQLite: an flock beside the database file for the backfill, and nothing for the reconciler
(SQLite serializes writers anyway)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from pipeline.db import translated_errors
from pipeline.errors import LockedError

BACKFILL_LOCK = 0x5C07B1
RECONCILE_LOCK = 0x5C07A6

_BACKFILL_BUSY = "another backfill is running (it holds the backfill lock); this one did not start"


@contextmanager
def backfill_lock(database: Engine) -> Iterator[Connection]:
    """Hold the one-backfill-at-a-time lock for the duration; yields the connection that holds it
    (Postgres: a session advisory lock; SQLite: an flock beside the database file)."""
    with translated_errors("taking the backfill lock"), database.connect() as conn:
        if conn.dialect.name == "postgresql":
            if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": BACKFILL_LOCK}).scalar_one():
                conn.rollback()
                raise LockedError(_BACKFILL_BUSY)
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": BACKFILL_LOCK})
                conn.commit()
            return
        with _file_lock(_sqlite_lock_path(database)):
            yield conn


def _sqlite_lock_path(database: Engine) -> Path:
    name = make_url(str(database.url)).database or "memory"
    return Path(f"{name}.backfill.lock")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(_BACKFILL_BUSY) from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def try_reconcile_lock(conn: Connection) -> bool:
    """Take the reconciler's lock for conn's transaction; False when another reconciler holds it."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RECONCILE_LOCK}).scalar_one())
