"""Shared pieces of the benchmarks: medians, scratch databases, a results table."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from pipeline.errors import ConfigError
from pipeline.migrate import upgrade


@dataclass(frozen=True)
class Measurement:
    name: str
    unit: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        return f"{min(self.samples):,.0f}-{max(self.samples):,.0f}"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


@contextmanager
def scratch_postgres(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server at server_url, dropped afterwards."""
    url = make_url(server_url)
    if url.get_backend_name() != "postgresql":
        raise ConfigError("this benchmark needs Postgres: pass --database-url postgresql+psycopg2://...")
    name = f"skutag_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        scratch = url.set(database=name).render_as_string(hide_password=False)
        upgrade(scratch)
        yield scratch
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def print_table(console: Console, title: str, rows: list[Measurement], baseline: Measurement) -> None:
    table = Table(title=title)
    for column in ("path", "median", "unit", "range", "vs baseline"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for row in rows:
        ratio = row.median / baseline.median if baseline.median else float("nan")
        table.add_row(row.name, f"{row.median:,.0f}", row.unit, row.spread, f"{ratio:.1f}x")
    console.print(table)
