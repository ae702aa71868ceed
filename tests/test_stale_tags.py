"""Tags carry their evidence: the views show the image (uri and hash) the tags came from and go
stale when the listing points at another image; delisted skus are retired from the views with
their history kept; a dry-run backfill changes nothing in any table. On Postgres and SQLite."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.backfill import BackfillOptions, BackfillSummary, DryRun, refresh_from_rows, run_backfill
from pipeline.catalog import read_catalog
from pipeline.errors import InputError
from pipeline.settings import load_settings
from pipeline.writer import ResultWriter
from schemas.results import ErrorCode, ItemError, failed_result
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result


def _views(engine: Engine, sku: str) -> tuple[list[Any], Any]:
    with engine.connect() as conn:
        current = conn.execute(
            sa.text("SELECT value, image_uri, image_sha256, stale FROM sku_tags_current WHERE sku = :s"), {"s": sku}
        ).all()
        document = conn.execute(
            sa.text("SELECT tags, image_uri, image_sha256, stale FROM sku_tags_json WHERE sku = :s"), {"s": sku}
        ).one_or_none()
    return current, document


def _doc(row: Any) -> dict[str, Any]:
    return row.tags if isinstance(row.tags, dict) else json.loads(row.tags)


def _tag(engine: Engine, taxonomy: Taxonomy, count: int = 3) -> list[Any]:
    jobs = make_jobs(engine, count)
    results = [make_result(job, taxonomy) for job in jobs]
    ResultWriter(engine, taxonomy).write(results)
    return results


def _relist(engine: Engine, sku: str, uri: str) -> None:
    with engine.begin() as conn:
        ledger.upsert_items(conn, [ledger.CatalogRow(sku=sku, image_uri=uri)])


def test_views_show_the_image_the_tags_came_from_and_go_stale(engine: Engine, taxonomy: Taxonomy) -> None:
    first = _tag(engine, taxonomy)[0]
    current, document = _views(engine, first.sku)
    assert current and all(
        (row.image_uri, row.image_sha256, bool(row.stale)) == (first.image_uri, first.image_sha256, False)
        for row in current
    )
    assert (document.image_uri, document.image_sha256, bool(document.stale)) == (
        first.image_uri, first.image_sha256, False
    )  # fmt: skip
    assert _doc(document)["stale"] is False and _doc(document)["image_uri"] == first.image_uri

    _relist(engine, first.sku, "file:///images/new-photo.jpg")  # the listing moved to a new photo
    with engine.begin() as conn:  # ... whose re-tag fails: the old tags stay, but stale
        run_id = ledger.create_run(conn, "backfill", {})
        (job,) = ledger.add_jobs(conn, run_id, [(first.sku, "file:///images/new-photo.jpg")])
        ledger.seal_run(conn, run_id)
    failed = failed_result(job, ItemError(code=ErrorCode.NOT_FOUND, message="gone"), first.provenance)
    ResultWriter(engine, taxonomy).write([failed])
    current, document = _views(engine, first.sku)
    assert current and all(bool(row.stale) and row.image_uri == first.image_uri for row in current)
    assert bool(document.stale) and _doc(document)["stale"] is True

    _relist(engine, first.sku, first.image_uri or "")  # back to the photo the tags came from
    assert not any(bool(row.stale) for row in _views(engine, first.sku)[0])


def _retire(engine: Engine, taxonomy: Taxonomy, catalog: str, dry_run: bool = False) -> BackfillSummary | DryRun:
    bad: list[Any] = []
    refresh = refresh_from_rows(read_catalog(io.StringIO(catalog)), bad)
    return run_backfill(
        load_settings(), taxonomy, engine, None, BackfillOptions(dry_run=dry_run, retire_missing=True), refresh
    )


def test_retire_missing_drops_delisted_skus_from_the_views_and_keeps_history(
    engine: Engine, taxonomy: Taxonomy
) -> None:
    kept, gone, _third = _tag(engine, taxonomy)
    catalog = "sku,image_uri\n" + "".join(f"{r.sku},{r.image_uri}\n" for r in (kept, _third))
    summary = _retire(engine, taxonomy, catalog)
    assert summary.retired == {"retired": 1, "relisted": 0}
    assert _views(engine, gone.sku) == ([], None)
    assert _views(engine, kept.sku)[0]
    with engine.connect() as conn:
        history = conn.execute(sa.text("SELECT count(*) FROM results WHERE sku = :s"), {"s": gone.sku}).scalar_one()
        planned = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE sku = :s"), {"s": gone.sku}).scalar_one()
    assert history == 1 and planned == 1  # its result stays; no new job for a retired sku

    catalog += f"{gone.sku},{gone.image_uri}\n"  # listed again: back in the views
    assert _retire(engine, taxonomy, catalog).retired == {"retired": 0, "relisted": 1}
    assert _views(engine, gone.sku)[0]

    with pytest.raises(InputError, match="refusing to retire"):
        _retire(engine, taxonomy, "sku,image_uri\n")


def _fingerprint(engine: Engine) -> dict[str, tuple[int, str]]:
    """Row count and a checksum of every table's rows."""
    prints = {}
    with engine.connect() as conn:
        for table in sorted(sa.inspect(conn).get_table_names()):
            rows = conn.execute(sa.text(f'SELECT * FROM "{table}"')).all()
            digest = hashlib.sha256("\n".join(sorted(repr(tuple(row)) for row in rows)).encode()).hexdigest()
            prints[table] = (len(rows), digest)
    return prints


def test_a_dry_run_changes_nothing_in_any_table(engine: Engine, taxonomy: Taxonomy) -> None:
    tagged = _tag(engine, taxonomy)
    before = _fingerprint(engine)
    assert len(before) >= 8
    catalog = (
        "sku,image_uri\n"
        f"{tagged[0].sku},file:///images/changed.jpg\n"  # a new image: a re-tag, and the item row changes
        f"{tagged[1].sku},{tagged[1].image_uri}\n"  # tagged[2] is delisted: it would be retired
        "NEW-1,file:///images/new-1.jpg\n"  # a new item
    )
    result = _retire(engine, taxonomy, catalog, dry_run=True)
    assert isinstance(result, DryRun)
    assert result.by_reason["image_uri_changed"] == 1 and result.by_reason["never_tagged"] == 1
    assert result.retired == {"retired": 1, "relisted": 0}
    assert _fingerprint(engine) == before
