"""A submit is sealed: rows the reader cannot decode or parse are bad rows with their line numbers,
and a submit that stops halfway leaves no run open forever (sealed with what it recorded, and it
says so); `skutag runs seal` and `skutag runs cancel` end a run by hand."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.catalog import RowError, read_catalog
from pipeline.db import runs
from pipeline.errors import InputError, RetryableError
from pipeline.producer import CHUNK_ROWS, submit_catalog
from pipeline.settings import load_settings
from schemas.taxonomy import Taxonomy

LONG = "x" * 131_073  # one more than csv.field_size_limit()


def read(path: Path) -> list[tuple[int, object]]:
    with path.open(encoding="utf-8-sig") as handle:  # as `skutag submit` opens it
        return list(read_catalog(handle, path.name))


def bad_lines(rows: list[tuple[int, object]]) -> dict[int, str]:
    return {number: row.reason for number, row in rows if isinstance(row, RowError)}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"BAD-UTF8,images/caf\xe9.jpg", "image_uri is not valid UTF-8"),
        (b"BAD-UTF8-TITLE,a.jpg,\xff\xfe title", "title is not valid UTF-8"),
        (f"BAD-LONG,a.jpg,t,{LONG}".encode(), "not valid CSV: field larger than field limit"),
        (b"BAD-URI,http://[::1/x.jpg", "image_uri is not a valid URI"),
        (b"BAD-NUL,a\x00.jpg", "image_uri contains control characters"),
    ],
)
def test_undecodable_or_unparsable_csv_rows_are_bad_rows_with_line_numbers(
    tmp_path: Path, line: bytes, reason: str
) -> None:
    path = tmp_path / "catalog.csv"
    path.write_bytes(b"sku,image_uri,title,unused\nGOOD-1,a.jpg\n" + line + b"\nGOOD-2,b.jpg\n")
    rows = read(path)
    assert list(bad_lines(rows)) == [3]
    assert bad_lines(rows)[3].startswith(reason), bad_lines(rows)
    good = [row.sku for _, row in rows if isinstance(row, ledger.CatalogRow)]
    assert good == ["GOOD-1", "GOOD-2"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"sku": "\\ud800", "image_uri": "a.jpg"}', "sku is not valid UTF-8"),
        (b'{"sku": "LONE-LOW", "image_uri": "a\\udfff.jpg"}', "image_uri is not valid UTF-8"),
        (b'{"sku": "BAD-\xc3", "image_uri": "a.jpg"}', "sku is not valid UTF-8"),
        (b'{"sku": "BAD-URI", "image_uri": "http://[::1/x.jpg"}', "image_uri is not a valid URI"),
    ],
)
def test_lone_surrogates_and_bad_bytes_in_jsonl_are_bad_rows(tmp_path: Path, line: bytes, reason: str) -> None:
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(
        b'{"sku": "GOOD-1", "image_uri": "a.jpg"}\n' + line + b'\n{"sku": "GOOD-2", "image_uri": "b.jpg"}\n'
    )
    rows = read(path)
    assert list(bad_lines(rows)) == [2]
    assert bad_lines(rows)[2].startswith(reason), bad_lines(rows)


# --- a submit that stops halfway ---------------------------------------------------------------
def rows_then(count: int, failure: BaseException) -> Iterator[tuple[int, Any]]:
    for number in range(1, count + 1):
        yield number, ledger.CatalogRow(sku=f"S-{number:06d}", image_uri=f"file:///{number}.jpg")
    raise failure


def run_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(runs.c.id, runs.c.state, runs.c.planned_at, runs.c.summary)))


@pytest.mark.parametrize("failure", [RuntimeError("a bug"), InputError("bad file"), KeyboardInterrupt()])
def test_a_submit_that_stops_halfway_seals_its_run_with_what_it_recorded(
    engine: Engine, taxonomy: Taxonomy, failure: BaseException
) -> None:
    settings = load_settings(database_url=str(engine.url))
    with pytest.raises(type(failure)) as caught:
        submit_catalog(rows_then(CHUNK_ROWS + 1000, failure), engine, settings, taxonomy, None)
    [run] = run_rows(engine)
    assert run.planned_at is not None, "the run was left open"
    summary = run.summary if isinstance(run.summary, dict) else json.loads(run.summary)
    assert summary["jobs_recorded"] == CHUNK_ROWS
    said = f"run {run.id} was sealed with the {CHUNK_ROWS} jobs recorded before the submit stopped"
    assert said in caught.value.__notes__
    if isinstance(failure, InputError):
        assert said in caught.value.message  # what the CLI prints, in its one line


def test_a_submit_that_stops_before_its_first_row_leaves_no_run(engine: Engine, taxonomy: Taxonomy) -> None:
    settings = load_settings(database_url=str(engine.url))
    with pytest.raises(InputError, match="nothing was recorded"):
        submit_catalog(rows_then(10, InputError("the header needs sku")), engine, settings, taxonomy, None)
    assert run_rows(engine) == []


def test_an_outage_that_stops_the_submit_says_how_to_seal_by_hand(
    engine: Engine, taxonomy: Taxonomy, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(database_url=str(engine.url))

    def database_gone(*_args: object, **_kwargs: object) -> bool:
        raise RetryableError("database unreachable")

    monkeypatch.setattr(ledger, "seal_open_run", database_gone)
    with pytest.raises(RetryableError) as caught:
        submit_catalog(rows_then(CHUNK_ROWS + 10, RetryableError("gone")), engine, settings, taxonomy, None)
    [run] = run_rows(engine)
    assert f"`skutag runs seal {run.id}`" in caught.value.message


# --- sealing and cancelling by hand --------------------------------------------------------------
def open_run(engine: Engine, count: int, sealed: bool = False) -> int:
    with engine.begin() as conn:
        rows = [ledger.CatalogRow(sku=f"H-{i}", image_uri=f"file:///{i}.jpg") for i in range(count)]
        ledger.upsert_items(conn, rows)
        run_id = ledger.create_run(conn, "submit", {})
        ledger.add_jobs(conn, run_id, [(row.sku, row.image_uri) for row in rows])
        if sealed:
            ledger.seal_run(conn, run_id)
        return run_id


def test_cancel_fails_the_open_jobs_and_ends_the_run(engine: Engine) -> None:
    run_id = open_run(engine, 5)
    with engine.begin() as conn:
        assert ledger.cancel_run(conn, run_id) == 5
        assert ledger.run_counts(conn, run_id) == {"failed": 5}
        state = conn.execute(sa.select(runs.c.state).where(runs.c.id == run_id)).scalar_one()
        claim = ledger.claim_jobs(conn, ledger.select_jobs(conn, sa.true(), limit=10), lease_s=60, max_attempts=3)
    assert state == "cancelled"
    assert claim.claimed == []  # a message still in the broker finds nothing to do
    with engine.begin() as conn, pytest.raises(InputError, match=f"run {run_id} has already ended"):
        ledger.cancel_run(conn, run_id)


def test_seal_ends_an_unsealed_run_once_its_jobs_are_done(engine: Engine) -> None:
    empty = open_run(engine, 0)
    with engine.begin() as conn:
        assert ledger.seal_open_run(conn, empty) is True
        assert conn.execute(sa.select(runs.c.state).where(runs.c.id == empty)).scalar_one() == "done"
        with pytest.raises(InputError, match="no run 999"):
            ledger.seal_open_run(conn, 999)
