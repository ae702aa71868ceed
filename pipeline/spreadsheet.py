"""CSV and TSV that are safe to open in a spreadsheet (OWASP "CSV injection").

Excel, LibreOffice and Google Sheets run a cell that starts with =, +, -, @, tab or carriage return
as a formula (`=HYPERLINK(...)`, `+cmd|' /C calc'!A0`). SKUs and titles come from catalogs we do not
control, so every text cell that starts with one of those is prefixed with a single quote, which
the spreadsheet shows as text and does not run. Numbers are left alone (a confidence stays a
number); JSONL exports are data for programs and are not touched. Every command that writes CSV
or TSV (export, failures, runs list) goes through this module, so all neutralise the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, TextIO

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(value: Any) -> Any:
    """The cell as a spreadsheet should see it: text that would start a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


class FormulaSafeWriter:
    """csv.writer with every cell neutralised."""

    def __init__(self, output: TextIO) -> None:
        self._writer = csv.writer(output)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([neutralised(value) for value in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def tab_separated(row: Iterable[Any]) -> str:
    """One TSV line (no newline) of neutralised cells; a tab or line break inside a cell becomes a
    space, so the columns stay where `cut -f` and spreadsheets expect them."""
    return "\t".join(_one_line(str(neutralised(value))) for value in row)


def _one_line(cell: str) -> str:
    return cell.replace("\t", " ").replace("\r", " ").replace("\n", " ")
