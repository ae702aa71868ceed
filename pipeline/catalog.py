"""Catalog files: CSV or JSONL rows of sku, image_uri, optional title, category hint and view.

A SKU with several images (front, back, detail) has one row per image, the first one's title and
category hint being the SKU's; a JSONL record may instead list them in `image_uris`, as strings
or {"uri": ..., "view": ...} objects.

Read as a stream (a catalog of millions never sits in memory). A bad row is reported with its line
number and the reason, and the good rows go ahead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
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
    "view": "view",
    "image_uris": "image_uris",
    "image_urls": "image_uris",
    "images": "image_uris",
}
LIMITS = {"sku": 256, "image_uri": 4096, "title": 1000, "category_hint": 200, "view": 64}
MAX_IMAGES = 50  # per JSONL record
SCHEMES = {"", "http", "https", "file"} | OBJECT_STORE_SCHEMES
# Undecodable bytes (read with surrogateescape) and JSON's "\ud800" escapes: no database or
# encoder downstream accepts them, so they are caught here, per row.
_SURROGATES = re.compile("[\ud800-\udfff]")
# Far above any real row (its known fields are capped at ~5,600 characters); bounds the memory
# one line of a hostile or broken file can take.
MAX_LINE_CHARS = 1 << 20
TEXT_FIELDS_WITH_TABS = frozenset({"title", "category_hint"})  # free text: a tab is whitespace


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
        rows = _jsonl(BoundedLines(first, source))
    else:
        rows = _csv(BoundedLines(first, source), name)
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


class LineTooLongError(Exception):
    def __init__(self, number: int) -> None:
        super().__init__(f"longer than {MAX_LINE_CHARS:,} characters")
        self.number = number


class BoundedLines:
    """The source's lines, none held longer than MAX_LINE_CHARS: an over-long line is skipped in
    bounded chunks and raises LineTooLongError once (the iterator goes on with the next line), so a
    50 MB line costs no more memory than a normal one. number is the last line's number."""

    def __init__(self, first: str, source: TextIO, limit: int = MAX_LINE_CHARS) -> None:
        self.pending, self.source, self.limit, self.number = first, source, limit, 0

    def __iter__(self) -> BoundedLines:
        return self

    def __next__(self) -> str:
        line = self.pending + self.source.readline(self.limit + 1 - len(self.pending))
        self.pending = ""
        if not line:
            raise StopIteration
        self.number += 1
        if len(line) > self.limit and not line.endswith("\n"):
            while (rest := self.source.readline(self.limit)) and not rest.endswith("\n"):
                pass
            raise LineTooLongError(self.number)
        return line


def _numbered(lines: BoundedLines) -> Iterator[tuple[int, str | RowError]]:
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except LineTooLongError as exc:
            yield exc.number, RowError(exc.number, f"the line is {exc}")
            continue
        yield lines.number, line


def _jsonl(lines: BoundedLines) -> Iterator[tuple[int, CatalogRow | RowError]]:
    for number, line in _numbered(lines):
        if isinstance(line, RowError):
            yield number, line
            continue
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
        named = {ALIASES.get(str(k).strip().lower(), str(k)): v for k, v in record.items()}
        for row in _image_records(number, named):
            yield number, row if isinstance(row, RowError) else validate(number, row)


def _image_records(number: int, record: dict[str, Any]) -> Iterator[dict[str, Any] | RowError]:
    """The record itself, or one record per entry of its image_uris list."""
    images = record.pop("image_uris", None)
    if images is None:
        yield record
        return
    if record.get("image_uri") is not None:
        yield RowError(number, "give image_uri or image_uris, not both")
        return
    if not isinstance(images, list) or not images or len(images) > MAX_IMAGES:
        yield RowError(number, f"image_uris must be a list of 1 to {MAX_IMAGES} URIs or {{uri, view}} objects")
        return
    for entry in images:
        if isinstance(entry, dict):
            uri = entry.get("uri", entry.get("image_uri"))
            yield {**record, "image_uri": uri, "view": entry.get("view")}
        else:
            yield {**record, "image_uri": entry}


def _csv(lines: BoundedLines, name: str) -> Iterator[tuple[int, CatalogRow | RowError]]:
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"{name}: the header line is not valid CSV: {exc}") from exc
    except LineTooLongError as exc:
        raise InputError(f"{name}: line 1 is {exc}: that is not a catalog header (sku,image_uri,...)") from exc
    if header is None:
        return
    columns = [ALIASES.get(column.strip().lower().lstrip("\ufeff")) for column in header]
    missing = {"sku", "image_uri"} - set(columns)
    if missing:
        raise InputError(f"{name}: the header needs {' and '.join(sorted(missing))} columns (got {', '.join(header)})")
    for number, row in _rows(reader, lines):
        if isinstance(row, RowError):
            yield number, row
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(columns):
            yield number, RowError(number, f"{len(row)} fields, the header has {len(columns)}")
            continue
        yield number, validate(number, {column: value for column, value in zip(columns, row, strict=False) if column})


def _rows(reader: Iterator[list[str]], lines: BoundedLines) -> Iterator[tuple[int, list[str] | RowError]]:
    """The CSV records with the number of their last physical line; an over-long line is a bad row."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except LineTooLongError as exc:
            yield exc.number, RowError(exc.number, f"the line is {exc}")
            continue
        except csv.Error as exc:  # a field over csv.field_size_limit(), a NUL byte: this row only
            yield lines.number, RowError(lines.number, f"not valid CSV: {exc}")
            continue
        yield lines.number, row


def validate(number: int, record: dict[str, Any]) -> CatalogRow | RowError:
    values: dict[str, str | None] = {}
    for field in ("sku", "image_uri", "title", "category_hint", "view"):
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
        view=values["view"].lower() if values["view"] else None,
    )


def _field(field: str, raw: object) -> tuple[str | None, str | None]:
    """(the cleaned value or None, the problem or None)."""
    if isinstance(raw, bool) or (raw is not None and not isinstance(raw, str | int)):  # JSON true is no sku
        return None, f"{field} must be text"
    text = str(raw).strip() if raw is not None else ""
    if _SURROGATES.search(text):
        return None, f"{field} is not valid UTF-8 text (undecodable bytes or a lone surrogate)"
    if len(text) > LIMITS[field]:
        return None, f"{field} is longer than {LIMITS[field]} characters"
    allowed = "\t" if field in TEXT_FIELDS_WITH_TABS else ""
    if any(ord(char) < 32 and char not in allowed for char in text):
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
    """A sku's rows are its images, in file order. The same image listed twice for a sku is
    reported as a bad row pointing at the first. Keeps one small entry per sku (the first line and
    image), plus the images of skus that have several."""

    seen: dict[str, tuple[int, str, str | None]]  # sku -> (first line, first image, its view)
    extra: dict[str, dict[str, int]]  # sku -> {image uri: line}, for skus with several images

    def __init__(self) -> None:
        self.seen = {}
        self.extra = {}

    def check(self, number: int, row: CatalogRow) -> CatalogRow | RowError:
        first = self.seen.setdefault(row.sku, (number, row.image_uri, row.view))
        if first[0] == number and first[1] == row.image_uri:
            return row
        if row.image_uri == first[1]:
            return RowError(number, f"sku {row.sku!r} already has image {row.image_uri!r} on line {first[0]}")
        images = self.extra.setdefault(row.sku, {})
        if row.image_uri in images:
            return RowError(
                number, f"sku {row.sku!r} already has image {row.image_uri!r} on line {images[row.image_uri]}"
            )
        images[row.image_uri] = number
        return row

    def position(self, row: CatalogRow) -> int:
        """0 for a sku's first image, then 1, 2, ... in file order (after check accepted the row)."""
        if self.seen[row.sku][1] == row.image_uri:
            return 0
        return list(self.extra[row.sku]).index(row.image_uri) + 1

    def first_image(self, sku: str) -> tuple[str, str | None]:
        _, uri, view = self.seen[sku]
        return uri, view
