"""The catalog reader's intake cases: JSON types are not coerced into skus, free text may hold a
tab, and an over-long line (a 50 MB header, a 2 MB row) is refused in bounded memory."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.catalog import MAX_LINE_CHARS, RowError, read_catalog
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.ledger import CatalogRow


def rows(text: str, name: str = "catalog.csv") -> list[tuple[int, CatalogRow | RowError]]:
    return list(read_catalog(io.StringIO(text), name))


@pytest.mark.parametrize("value", ["true", "false", "1.5", "null", "[1]", '{"a": 1}'])
def test_a_jsonl_sku_that_is_not_text_or_a_number_is_a_bad_row(value: str) -> None:
    ((number, row),) = rows(f'{{"sku": {value}, "image_uri": "a.jpg"}}\n', "c.jsonl")
    assert number == 1 and isinstance(row, RowError), row
    assert "sku" in row.reason


def test_a_jsonl_integer_sku_is_still_its_digits() -> None:
    ((_, row),) = rows('{"sku": 12345, "image_uri": "a.jpg", "title": "x"}\n', "c.jsonl")
    assert isinstance(row, CatalogRow) and row.sku == "12345"


def test_a_tab_in_a_title_or_category_hint_is_accepted() -> None:
    parsed = rows('sku,image_uri,title,category\nA,a.jpg,"red\\tdress",dress\tmaxi\n'.replace("\\t", "\t"))
    ((_, row),) = parsed
    assert isinstance(row, CatalogRow), row
    assert row.title == "red\tdress" and row.category_hint == "dress\tmaxi"
    jsonl = rows('{"sku": "B", "image_uri": "b.jpg", "title": "linen\\tshirt"}\n', "c.jsonl")
    assert isinstance(jsonl[0][1], CatalogRow) and jsonl[0][1].title == "linen\tshirt"


@pytest.mark.parametrize("field", ["sku", "image_uri"])
def test_control_characters_in_a_key_field_are_still_refused(field: str) -> None:
    record = {"sku": "A", "image_uri": "a.jpg"} | {field: "x\ty"}
    ((_, row),) = rows(
        f'{{"sku": "{record["sku"]}", "image_uri": "{record["image_uri"]}"}}\n'.replace("\t", "\\t"), "c.jsonl"
    )
    assert isinstance(row, RowError) and "control characters" in row.reason


def test_a_50_mb_header_line_is_refused_in_bounded_memory() -> None:
    source = io.StringIO("sku," + "x" * (50 * 2**20) + "\nA,a.jpg\n")  # allocated before measuring
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            list(read_catalog(source, "catalog.csv"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "line 1 is longer than" in caught.value.message and "header" in caught.value.message
    assert peak < 8 * MAX_LINE_CHARS, f"reading the header took {peak / 2**20:.0f} MB"


@pytest.mark.parametrize("name", ["catalog.csv", "catalog.jsonl"])
def test_an_over_long_row_is_a_bad_row_and_the_next_rows_go_ahead(name: str) -> None:
    if name.endswith(".csv"):
        text = "sku,image_uri\nA,a.jpg\nB," + "y" * (2 * MAX_LINE_CHARS) + "\nC,c.jpg\n"
    else:
        text = '{"sku": "A", "image_uri": "a.jpg"}\n{"sku": "B", "x": "' + "y" * (2 * MAX_LINE_CHARS) + '"}\n'
        text += '{"sku": "C", "image_uri": "c.jpg"}\n'
    parsed = rows(text, name)
    offset = 1 if name.endswith(".csv") else 0  # the CSV header is line 1
    assert [number for number, _ in parsed] == [1 + offset, 2 + offset, 3 + offset]
    assert isinstance(parsed[1][1], RowError) and "longer than" in parsed[1][1].reason
    assert [row.sku for _, row in parsed if isinstance(row, CatalogRow)] == ["A", "C"]


def test_run_with_a_50_mb_header_exits_2_with_one_line(tmp_path: Path) -> None:
    catalog = tmp_path / "huge-header.csv"
    with catalog.open("w") as handle:
        handle.write("sku,image_uri," + "h" * (50 * 2**20) + "\nA,a.jpg\n")
    result = CliRunner().invoke(main, ["--database-url", f"sqlite:///{tmp_path}/x.db", "run", str(catalog)])
    assert result.exit_code == 2, result.output
    assert "line 1 is longer than" in result.output and "Traceback" not in result.output
