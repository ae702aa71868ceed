"""The review app over HTTP (Starlette's test client, real Postgres and SQLite): the queue, one
item, decisions, claims, bulk accept, images through the intake, and the security rules."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from pipeline import ledger
from pipeline.errors import ConfigError
from pipeline.review.auth import hash_password, verify_password
from pipeline.review.serve import make_review_app
from pipeline.settings import Settings, load_settings
from pipeline.writer import ResultWriter
from schemas.results import TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import make_result

HOSTILE = "<script>alert('x')</script>"


@dataclass
class Catalog:
    engine: Engine
    settings: Settings
    results: list[TagResult]
    root: Path


def build_catalog(engine: Engine, taxonomy: Taxonomy, root: Path, count: int = 6, prefix: str = "SKU") -> Catalog:
    """count dresses and skirts, each with a real PNG under root; item i has pattern confidence
    0.1 + i/200, odd items also style at 0.4, every other attribute 0.9."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        path = root / f"{abs(hash(prefix))}-{index}.png"
        Image.new("RGB", (64, 48), (index * 30 % 256, 80, 120)).save(path)
        title = f"{HOSTILE} item {index}" if index == 0 else f"item {index}"
        rows.append(ledger.CatalogRow(sku=f"{prefix}-{index:03d}", image_uri=str(path), title=title))
    with engine.begin() as conn:
        ledger.upsert_items(conn, rows)
        run_id = ledger.create_run(conn, "submit", {})
        jobs = ledger.add_jobs(conn, run_id, [(row.sku, row.image_uri) for row in rows])
        ledger.seal_run(conn, run_id)
    results = []
    for index, job in enumerate(jobs):
        result = make_result(job, taxonomy, category="dress" if index % 3 else "skirt")
        # The writer routes by the thresholds in force (0.5): only pattern (and style on odd items) go to review.
        tags = {name: tag.model_copy(update={"confidence": 0.9}) for name, tag in result.attributes.items()}
        tags["pattern"] = tags["pattern"].model_copy(update={"confidence": 0.1 + index / 200})
        review = ["pattern"] + (["style"] if index % 2 else [])
        if "style" in review:
            tags["style"] = tags["style"].model_copy(update={"confidence": 0.4})
        import hashlib

        sha = hashlib.sha256(Path(job.image_uri).read_bytes()).hexdigest()
        results.append(result.model_copy(update={
            "status": "needs_review", "review_attributes": review, "attributes": tags, "image_sha256": sha,
        }))  # fmt: skip
    ResultWriter(engine, taxonomy).write(results)
    settings = load_settings(database_url=str(engine.url), image_roots=[root], work_dir=root.parent / "work")
    return Catalog(engine, settings, results, root)


@pytest.fixture
def catalog(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> Catalog:
    return build_catalog(engine, taxonomy, tmp_path / "images")


def client_for(catalog: Catalog, host: str = "127.0.0.1", reviewer: str = "ana", **settings: Any) -> TestClient:
    chosen = catalog.settings.model_copy(update=settings)
    app = make_review_app(chosen, catalog.engine, host=host, reviewer=reviewer)
    return TestClient(app, base_url="http://127.0.0.1:8686")


@pytest.fixture
def client(catalog: Catalog) -> Iterator[TestClient]:
    with client_for(catalog) as client:
        yield client


def csrf_of(client: TestClient, path: str = "/") -> str:
    page = client.get(path).text
    match = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)


def queue_skus(page: str) -> list[str]:
    return re.findall(r'<tr data-sku="([^"]+)"', page)


def decide(client: TestClient, token: str, **body: Any) -> Any:
    return client.post("/decide", json=body, headers={"X-CSRF-Token": token})


def test_the_queue_lists_lowest_confidence_first_with_filters_and_counts(client: TestClient, catalog: Catalog) -> None:
    page = client.get("/").text
    assert queue_skus(page) == [r.sku for r in catalog.results]  # pattern 0.100, 0.105, ... 0.125
    assert '<span class="count" id="total">6</span>' in page
    assert "low_confidence (9)" in page  # 6 pattern + 3 style tasks
    assert queue_skus(client.get("/?category=skirt").text) == [catalog.results[0].sku, catalog.results[3].sku]
    assert queue_skus(client.get("/?attribute=style").text) == [catalog.results[i].sku for i in (1, 3, 5)]
    assert queue_skus(client.get("/?min=0.11&max=0.121").text) == [catalog.results[i].sku for i in (2, 3, 4)]
    assert queue_skus(client.get("/?reason=audit").text) == []
    assert queue_skus(client.get("/?run=999").text) == []


def test_keyset_pagination_walks_the_whole_queue_once(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> None:
    catalog = build_catalog(engine, taxonomy, tmp_path / "images", count=57)
    seen: list[str] = []
    with client_for(catalog) as client:
        link: str | None = "/"
        while link:
            page = client.get(link.replace("&amp;", "&")).text
            seen += queue_skus(page)
            found = re.search(r'<a href="([^"]+)" id="next-page">', page)
            link = found.group(1) if found else None

    def lowest(index: int) -> float:  # odd items also have style at 0.4
        return min(0.1 + index / 200, 0.4) if index % 2 else 0.1 + index / 200

    expected = sorted(range(57), key=lambda i: (lowest(i), catalog.results[i].sku))
    assert seen == [catalog.results[i].sku for i in expected]


def test_sku_and_title_are_escaped_everywhere(client: TestClient, catalog: Catalog) -> None:
    hostile = catalog.results[0].sku
    for path in ("/", f"/item?sku={hostile}", "/grid"):
        page = client.get(path, params=None).text
        assert HOSTILE not in page, path
        assert "&lt;script&gt;" in page, path


def test_a_hostile_sku_is_escaped(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> None:
    catalog = build_catalog(engine, taxonomy, tmp_path / "images", count=1, prefix=HOSTILE)
    with client_for(catalog) as client:
        for path in ("/", "/grid"):
            page = client.get(path).text
            assert "<script>alert" not in page and "&lt;script&gt;alert" in page
        item = client.get("/item", params={"sku": catalog.results[0].sku}).text
        assert "<script>alert" not in item
        data = re.search(r'<script type="application/json" id="item-data">(.*?)</script>', item, re.S)
        assert data and "\\u003cscript\\u003e" in data.group(1)


def test_a_decision_is_recorded_with_the_reviewer_and_shows_in_the_views(client: TestClient, catalog: Catalog) -> None:
    result = catalog.results[1]
    token = csrf_of(client, f"/item?sku={result.sku}")
    answer = decide(client, token, sku=result.sku, attribute="pattern", action="correct", value="plaid",
                    job_id=result.job_id)  # fmt: skip
    assert answer.status_code == 200 and answer.json()["ok"], answer.text
    with catalog.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT reviewer, value, action FROM reviews")).one()
        view = conn.execute(
            sa.text("SELECT value, source FROM sku_tags_current WHERE sku = :s AND attribute = 'pattern'"),
            {"s": result.sku},
        ).one()
    assert tuple(row) == ("ana", "plaid", "correct")
    assert tuple(view) == ("plaid", "review")
    assert queue_skus(client.get("/?attribute=pattern").text).count(result.sku) == 0


def test_every_post_needs_the_csrf_token_and_our_origin(client: TestClient, catalog: Catalog) -> None:
    result = catalog.results[0]
    body = {"sku": result.sku, "attribute": "pattern", "action": "accept", "job_id": result.job_id}
    assert client.post("/decide", json=body).status_code == 403
    assert client.post("/decide", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    token = csrf_of(client)
    evil = {"X-CSRF-Token": token, "Origin": "http://evil.example"}
    assert client.post("/decide", json=body, headers=evil).status_code == 403
    assert client.post("/undo", json={}).status_code == 403
    assert client.post("/bulk-accept", data={"expected": "6"}).status_code == 403
    with catalog.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM reviews")).scalar_one() == 0


def test_two_reviewers_never_hold_the_same_item(catalog: Catalog) -> None:
    with client_for(catalog, reviewer="ana") as ana, client_for(catalog, reviewer="bo") as bo:
        first = ana.get("/next", follow_redirects=False).headers["location"]
        second = bo.get("/next", follow_redirects=False).headers["location"]
        assert catalog.results[0].sku.replace("<", "%3C") in first or "sku=" in first
        assert first != second
        result = catalog.results[0]
        token = csrf_of(bo)
        refused = decide(bo, token, sku=result.sku, attribute="pattern", action="accept", job_id=result.job_id)
        assert refused.status_code == 409 and "ana is reviewing" in refused.json()["message"]
        assert "ana is reviewing this item" in bo.get("/item", params={"sku": result.sku}).text


def test_a_decision_on_changed_tags_is_refused_clearly(client: TestClient, catalog: Catalog) -> None:
    result = catalog.results[2]
    token = csrf_of(client)
    answer = decide(
        client, token, sku=result.sku, attribute="pattern", action="accept", job_id=(result.job_id or 0) + 99
    )
    assert answer.status_code == 409
    assert answer.json()["code"] == "tags_changed"
    assert "reload the item" in answer.json()["message"]


def test_bulk_accept_takes_the_confirmed_count_only(client: TestClient, catalog: Catalog) -> None:
    token = csrf_of(client, "/grid?category=dress")
    form = {"csrf": token, "scope": "filter", "category": "dress", "expected": "3"}
    refused = client.post("/bulk-accept", data=form, follow_redirects=False)
    assert "nothing+was+accepted" in refused.headers["location"]
    accepted = client.post("/bulk-accept", data={**form, "expected": "4"}, follow_redirects=True)
    assert "accepted the model&#39;s answers for 4 items" in accepted.text
    with catalog.engine.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT sku, status FROM sku_tags_json")).all())
    assert sorted(s for s, status in statuses.items() if status == "tagged") == sorted(
        r.sku for i, r in enumerate(catalog.results) if i % 3
    )


def test_images_come_only_for_known_skus_through_the_intake(client: TestClient, catalog: Catalog) -> None:
    result = catalog.results[1]
    image = client.get("/image", params={"sku": result.sku})
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content[:2] == b"\xff\xd8"
    assert client.get("/image", params={"sku": "NOPE"}).status_code == 404
    assert client.get("/image", params={"url": "http://169.254.169.254/"}).status_code == 404
    cached = list((catalog.settings.work_dir / "review-thumbnails").rglob("*.jpg"))
    assert len(cached) == 1


def test_an_image_outside_the_roots_is_refused_by_the_intake(catalog: Catalog, tmp_path: Path) -> None:
    with client_for(catalog, image_roots=[tmp_path / "elsewhere"]) as client:
        answer = client.get("/image", params={"sku": catalog.results[1].sku})
    assert answer.status_code == 502
    assert answer.text.startswith("image unavailable: forbidden_address")


def test_another_address_needs_credentials(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="without reviewer credentials"):
        client_for(catalog, host="0.0.0.0")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        client_for(catalog, host="0.0.0.0", review_token="short")


def test_with_a_token_identity_comes_from_the_login(catalog: Catalog) -> None:
    with client_for(catalog, host="0.0.0.0", review_token="t" * 20) as client:
        assert client.get("/", follow_redirects=False).status_code == 303
        token = csrf_of(client, "/login")
        bad = client.post("/login", data={"csrf": token, "name": "cy", "secret": "wrong"})
        assert bad.status_code == 401
        good = client.post("/login", data={"csrf": token, "name": "cy", "secret": "t" * 20, "next": "/"})
        assert good.status_code == 200 and 'id="reviewer">cy<' in good.text
        result = catalog.results[0]
        answer = decide(client, csrf_of(client), sku=result.sku, attribute="pattern", action="accept",
                        job_id=result.job_id)  # fmt: skip
        assert answer.json()["ok"]
    with catalog.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT reviewer FROM reviews")).scalar_one() == "cy"


def test_a_users_file_holds_hashed_passwords(catalog: Catalog, tmp_path: Path) -> None:
    users = tmp_path / "reviewers"
    users.write_text(f"# reviewers\ndee:{hash_password('correct horse')}\n")
    assert "correct horse" not in users.read_text()
    assert verify_password("correct horse", users.read_text().split(":", 1)[1].strip())
    with client_for(catalog, host="10.0.0.5", review_users_file=users) as client:
        token = csrf_of(client, "/login")
        assert client.post("/login", data={"csrf": token, "name": "dee", "secret": "wrong"}).status_code == 401
        assert client.post("/login", data={"csrf": token, "name": "dee", "secret": "correct horse"}).status_code == 200
    users.write_text("dee:plaintext\n")
    with pytest.raises(ConfigError, match="line 1"):
        client_for(catalog, host="10.0.0.5", review_users_file=users)


def test_undo_returns_the_last_decision_to_the_queue(client: TestClient, catalog: Catalog) -> None:
    result = catalog.results[0]
    token = csrf_of(client)
    decide(client, token, sku=result.sku, attribute="pattern", action="not_visible", job_id=result.job_id)
    assert result.sku not in queue_skus(client.get("/").text)
    assert client.post("/undo", json={}, headers={"X-CSRF-Token": token}).json()["ok"]
    assert queue_skus(client.get("/").text)[0] == result.sku
