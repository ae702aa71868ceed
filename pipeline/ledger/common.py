"""What the ledger's modules share: the clock and per-connection staging tables."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# Text statements bind their timestamps with this type, so SQLite stores them as DateTime does.
NOW = sa.bindparam("now", type_=sa.DateTime(timezone=True))


def utcnow() -> datetime:
    return datetime.now(UTC)


def staging(conn: Connection, ddl: str, table: str) -> None:
    """A per-connection temporary table, emptied: it clears on commit, but one transaction may
    stage twice (a backfill refreshes items in chunks)."""
    key = f"skutag_{table}"
    if not conn.info.get(key):
        conn.exec_driver_sql(ddl)
        conn.info[key] = True
    conn.exec_driver_sql(f"DELETE FROM {table}")
