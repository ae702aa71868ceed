"""Catalog files: CSV or JSONL rows of sku, image_uri, optional title and category hint.

Read as a stream (a catalog of millions never sits in memory). A bad row is reported with its line
number and the reason, and the good rows go ahead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from pipeline.errors import InputError
from pipeline.ledger import CatalogRow
from pipeline.stores import OBJECT_STORE_SCHEMES

ALIASES = {
    "sku": "sku",
    "image_uri": "image_uri",
    "image_url": "image_uri",
    "image": "image_uri",
    "title": "title",
    "category_hint": "category_hint",
    "category": "category_hint",
}
LIMITS = {"sku": 256, "image_uri": 4096, "title": 1000, "category_hint": 200}
SCHEMES = {"", "http", "https", "file"} | OBJECT_STORE_SCHEMES
# Undecodable bytes (read with surrogateescape) and JSON's "\ud800" escapes: no database or
# encoder downstream accepts them, so they are caught here, per row.
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def read_catalog(
    source: TextIO, name: str = "-", base_dir: Path | None = None
) -> Iterator[tuple[int, CatalogRow | RowError]]:
    """(line number, row or error) for each data row; JSONL when the name ends in .jsonl/.ndjson or
    the first character is '{', CSV otherwise. With base_dir, a relative image path becomes an
    absolute one under it: stored that way, it means the same file to every worker, whatever its
    working directory (pass catalog_folder(name): the catalog's own folder)."""
    if isinstance(source, io.TextIOWrapper):
        # Bytes that are not UTF-8 become lone surrogates (U+DC80..U+DCFF) instead of ending the
        # read: the row that holds them is then a bad row with its line number (see _field).
        source.reconfigure(errors="surrogateescape")
    first = source.read(1)
    if not first:
        return
    if name.endswith((".jsonl", ".ndjson")) or first == "{":
        rows = _jsonl(_prepend(first, source))
    else:
        rows = _csv(_prepend(first, source), name)
    if base_dir is None:
        yield from rows
        return
    for number, row in rows:
        yield number, absolute_image_path(row, base_dir) if isinstance(row, CatalogRow) else row


def catalog_folder(name: str) -> Path:
    """Where a catalog's relative image paths point: the file's folder (stdin: the working directory)."""
    if name in {"-", "<stdin>"}:
        return Path.cwd()
    return Path(name).resolve().parent


def absolute_image_path(row: CatalogRow, base_dir: Path) -> CatalogRow:
    """row with a relative local image path made absolute under base_dir (lexically: the intake
    still resolves symlinks and checks the image roots when it reads the file)."""
    uri = row.image_uri
    if urlsplit(uri).scheme or Path(uri).is_absolute():
        return row
    return replace(row, image_uri=os.path.normpath(base_dir.absolute() / uri))


def _prepend(first: str, source: TextIO) -> Iterator[str]:
    lines = iter(source)
    head = next(lines, "")
    yield first + head
    yield from lines


def _jsonl(lines: Iterable[str]) -> Iterator[tuple[int, CatalogRow | RowError]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, RowError(number, f"not valid JSON: {exc.msg}")
            continue
        if not isinstance(record, dict):
            yield number, RowError(number, "not a JSON object")
            continue
        yield number, validate(number, {ALIASES.get(str(k).strip().lower(), str(k)): v for k, v in record.items()})


def _csv(lines: Iterable[str], name: str) -> Iterator[tuple[int, CatalogRow | RowError]]:
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"{name}: the header line is not valid CSV: {exc}") from exc
    if header is None:
        return
    columns = [ALIASES.get(column.strip().lower().lstrip("\ufeff")) for column in header]
    missing = {"sku", "image_uri"} - set(columns)
    if missing:
        raise InputError(f"{name}: the header needs {' and '.join(sorted(missing))} columns (got {', '.join(header)})")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over csv.field_size_limit(), a NUL byte: this row only
            yield reader.line_num, RowError(reader.line_num, f"not valid CSV: {exc}")
            continue
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(columns):
            yield number, RowError(number, f"{len(row)} fields, the header has {len(columns)}")
            continue
        yield number, validate(number, {column: value for column, value in zip(columns, row, strict=False) if column})


def validate(number: int, record: dict[str, Any]) -> CatalogRow | RowError:
    values: dict[str, str | None] = {}
    for field in ("sku", "image_uri", "title", "category_hint"):
        text, problem = _field(field, record.get(field))
        if problem:
            return RowError(number, problem)
        values[field] = text
    problem = _required_problem(values)
    if problem:
        return RowError(number, problem)
    return CatalogRow(
        sku=str(values["sku"]),
        image_uri=str(values["image_uri"]),
        title=values["title"],
        category_hint=values["category_hint"],
    )


def _field(field: str, raw: object) -> tuple[str | None, str | None]:
    """(the cleaned value or None, the problem or None)."""
    if raw is not None and not isinstance(raw, str | int):
        return None, f"{field} must be text"
    text = str(raw).strip() if raw is not None else ""
    if _SURROGATES.search(text):
        return None, f"{field} is not valid UTF-8 text (undecodable bytes or a lone surrogate)"
    if len(text) > LIMITS[field]:
        return None, f"{field} is longer than {LIMITS[field]} characters"
    if any(ord(char) < 32 for char in text):
        return None, f"{field} contains control characters"
    return text or None, None


def _required_problem(values: dict[str, str | None]) -> str | None:
    if not values["sku"]:
        return "sku is empty"
    uri = values["image_uri"]
    if not uri:
        return "image_uri is empty"
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:  # http://[::1/x.jpg
        return f"image_uri is not a valid URI: {exc}"
    if scheme not in SCHEMES:
        return f"image_uri scheme {scheme!r} is not supported (http, https, file, a path, s3, gs, ...)"
    return None


def chunks(
    rows: Iterator[tuple[int, CatalogRow | RowError]], size: int
) -> Iterator[list[tuple[int, CatalogRow | RowError]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


@dataclass
class Deduplicator:
    """The first row for a sku wins; later ones are reported as bad rows pointing at it."""

    seen: dict[str, int]

    def __init__(self) -> None:
        self.seen = {}

    def check(self, number: int, row: CatalogRow) -> CatalogRow | RowError:
        first = self.seen.setdefault(row.sku, number)
        if first != number:
            return RowError(number, f"sku {row.sku!r} already on line {first}")
        return row
