"""`skutag export`: the current tags (reviews applied) from the consumer views, streamed, with the
listing issues found for each sku.

    jsonl  one document per sku (sku_tags_json.tags), plus listing_issues when it has any
    csv    one row per sku and attribute (sku_tags_current), plus a listing_values column; text
           that a spreadsheet would run as a formula is neutralised (pipeline.spreadsheet)
"""

from __future__ import annotations

import json
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.db import translated_errors
from pipeline.listing_store import issues_by_sku
from pipeline.spreadsheet import FormulaSafeWriter

CSV_COLUMNS = (
    "sku", "attribute", "value", "confidence", "source", "label_en", "label_zh", "model_id",
    "taxonomy_version", "updated_at",
)  # fmt: skip


def export_jsonl(database: Engine, output: TextIO) -> int:
    """Write one JSON document per sku, in sku order; returns how many."""
    count = 0
    with translated_errors("exporting tags"), database.connect() as conn:
        issues = issues_by_sku(conn)
        rows = conn.execution_options(yield_per=2000).execute(
            sa.text("SELECT sku, tags FROM sku_tags_json ORDER BY sku")
        )
        for sku, document in rows:
            tags = json.loads(document) if isinstance(document, str) else dict(document)
            if sku in issues:
                tags["listing_issues"] = issues[sku]
            output.write(json.dumps(tags, ensure_ascii=False) + "\n")
            count += 1
    return count


def export_csv(database: Engine, output: TextIO) -> int:
    """Write a header and one row per (sku, attribute), in that order; returns the rows written."""
    count = 0
    query = sa.text(f"SELECT {', '.join(CSV_COLUMNS)} FROM sku_tags_current ORDER BY sku, attribute")
    with translated_errors("exporting tags"), database.connect() as conn:
        issues = issues_by_sku(conn)
        writer = FormulaSafeWriter(output)  # skus come from catalogs: no formula may run in a spreadsheet
        writer.writerow([*CSV_COLUMNS, "listing_values"])
        for row in conn.execution_options(yield_per=5000).execute(query):
            listed: list[str] = next(
                (i["listed_values"] for i in issues.get(row[0], ()) if i["attribute"] == row[1]), []
            )
            writer.writerow([*row, ",".join(listed)])
            count += 1
    return count
