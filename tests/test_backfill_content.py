"""The backfill's content check on a sku with several images: every image is re-fetched
conditionally with its own validators, and new bytes behind any one image's unchanged URL re-tag
the sku (one job per image); a single-image sku is checked as before. Against a real loopback
HTTP server whose bytes change behind the same URL."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.backfill import BackfillOptions, DryRun, check_content, run_backfill
from pipeline.catalog import read_catalog
from pipeline.ledger.plan import reset_content_changed
from pipeline.producer import submit_catalog
from pipeline.settings import Settings, load_settings
from pipeline.sku_images import ImageRow, record_images
from pipeline.writer import ResultWriter
from schemas.results import AttributeTag, TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import provenance

IMAGES = ("m1-front.jpg", "m1-back.jpg", "m1-detail.jpg", "s1.jpg")


class ChangingImages(BaseHTTPRequestHandler):
    """Serves bytes per path with a strong ETag; answers If-None-Match with 304 while they match."""

    served: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[tuple[str, bool]]] = []  # (path, conditional)

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = self.served[self.path]
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        asked = self.headers.get("If-None-Match")
        self.requests.append((self.path, asked is not None))
        self.send_response(304 if asked == etag else 200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", "0" if asked == etag else str(len(body)))
        self.end_headers()
        if asked != etag:
            self.wfile.write(body)


@pytest.fixture
def host() -> Iterator[str]:
    ChangingImages.served = {f"/{name}": f"{name} v1".encode() * 20 for name in IMAGES}
    ChangingImages.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChangingImages)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _tag_everything(engine: Engine, taxonomy: Taxonomy, settings: Settings, host: str) -> None:
    """MULTI-1 with three images and SINGLE-1 with one, each tagged from the bytes served now."""
    catalog = "sku,image_uri,view\n" + "".join(
        f"{'SINGLE-1' if name.startswith('s') else 'MULTI-1'},http://{host}/{name},{name[3:-4]}\n" for name in IMAGES
    )
    report = submit_catalog(read_catalog(io.StringIO(catalog)), engine, settings, taxonomy, None)
    with engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT id, run_id, sku, image_uri FROM jobs WHERE run_id = :r"),
                            {"r": report.run_id}).all()  # fmt: skip
    attributes = {attribute.name: AttributeTag(value=attribute.values[0].id, confidence=0.9)
                  for attribute in taxonomy.attributes_for("dress")}  # fmt: skip
    attributes["category"] = AttributeTag(value="dress", confidence=0.9)
    results = []
    for job_id, run_id, sku, uri in jobs:
        served = ChangingImages.served["/" + uri.rsplit("/", 1)[1]]
        results.append(TagResult(
            job_id=job_id, sku=sku, image_uri=uri, image_sha256=hashlib.sha256(served).hexdigest(), status="tagged",
            attributes=attributes, summary="a dress",
            provenance=provenance(taxonomy, run_id), produced_at=datetime(2026, 1, 1, tzinfo=UTC),
        ))  # fmt: skip
    ResultWriter(engine, taxonomy).write(results)


def _check(engine: Engine, settings: Settings) -> dict[str, int]:
    ChangingImages.requests = []
    with engine.begin() as conn:
        reset_content_changed(conn)
        return check_content(conn, settings)


def test_new_bytes_behind_a_skus_second_image_retag_the_sku(engine: Engine, taxonomy: Taxonomy, host: str) -> None:
    settings = load_settings(database_url=str(engine.url), allowed_hosts=[host])
    _tag_everything(engine, taxonomy, settings, host)

    # First check: every image fetched in full (nothing stored yet), all the same bytes.
    assert _check(engine, settings) == {"checked": 4, "not_modified": 0, "changed": 0, "errors": 0}
    assert sorted(ChangingImages.requests) == sorted((f"/{name}", False) for name in IMAGES)
    # Then every image, the back and detail shots too, asks with its own ETag.
    assert _check(engine, settings) == {"checked": 4, "not_modified": 4, "changed": 0, "errors": 0}
    assert sorted(ChangingImages.requests) == sorted((f"/{name}", True) for name in IMAGES)
    # The nightly catalog refresh lists the images again: they keep their validators.
    with engine.begin() as conn:
        rows = [ImageRow("MULTI-1", f"http://{host}/{name}", None, n) for n, name in enumerate(IMAGES[:3])]
        record_images(conn, ["MULTI-1"], rows, datetime.now(UTC))
    assert _check(engine, settings)["not_modified"] == 4

    # A new back photo uploaded behind the same URL: the sku is re-tagged, one job per image.
    ChangingImages.served["/m1-back.jpg"] = b"the new back photo" * 20
    dry = run_backfill(settings, taxonomy, engine, None, BackfillOptions(dry_run=True, check_content=True))
    assert isinstance(dry, DryRun)
    assert dry.content_check == {"checked": 4, "not_modified": 3, "changed": 1, "errors": 0}
    assert dry.by_reason == {"image_content_changed": 3}
    summary = run_backfill(settings, taxonomy, engine, None, BackfillOptions(check_content=True))
    assert not isinstance(summary, DryRun)
    with engine.connect() as conn:
        planned = conn.execute(sa.text("SELECT sku, image_uri, reason FROM jobs WHERE run_id = :r"),
                               {"r": summary.run_id}).all()  # fmt: skip
    assert sorted(planned) == [("MULTI-1", f"http://{host}/{name}", "image_content_changed") for name in
                               sorted(IMAGES[:3])]  # fmt: skip


def test_a_single_image_sku_is_checked_on_its_item_as_before(engine: Engine, taxonomy: Taxonomy, host: str) -> None:
    settings = load_settings(database_url=str(engine.url), allowed_hosts=[host])
    _tag_everything(engine, taxonomy, settings, host)
    _check(engine, settings)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT image_etag FROM items WHERE sku = 'SINGLE-1'")).scalar_one()
        per_image = conn.execute(sa.text("SELECT count(image_etag) FROM item_images WHERE sku = 'MULTI-1'"))
        assert stored and per_image.scalar_one() == 3
    ChangingImages.served["/s1.jpg"] = b"a new single photo" * 20
    dry = run_backfill(settings, taxonomy, engine, None, BackfillOptions(dry_run=True, check_content=True))
    assert isinstance(dry, DryRun)
    assert dry.content_check == {"checked": 4, "not_modified": 3, "changed": 1, "errors": 0}
    assert dry.by_reason == {"image_content_changed": 1}
