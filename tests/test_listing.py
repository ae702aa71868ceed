"""Listing checks: reading titles in English and Chinese against the taxonomy, finding the
contradictions with confident image tags, storing them with the current tags, exporting them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.bench.listing import generate_cases, score
from pipeline.cli import main
from pipeline.listing import ListingChecker, ListingPolicy
from pipeline.writer import ResultWriter
from schemas.results import AttributeTag, JobSpec, TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import provenance


@pytest.fixture(scope="module")
def checker() -> ListingChecker:
    from schemas.taxonomy import default_taxonomy

    return ListingChecker(default_taxonomy())


def read(checker: ListingChecker, title: str) -> list[tuple[str, set[str]]]:
    return [(claim.words, {f"{a}={v}" for a, v in claim.choices}) for claim in checker.read({"title": title})]


def tags(**values: tuple[str, float]) -> dict[str, AttributeTag]:
    return {name: AttributeTag(value=value, confidence=confidence) for name, (value, confidence) in values.items()}


# --- reading ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("Red floral dress", [("red", "primary_color=red"), ("floral", "pattern=floral"), ("dress", "category=dress")]),
        ("DRESSES for women", [("dresses", "category=dress")]),  # case and plural
        ("Slim-fit V-Neck tee", [("slim", "fit=slim"), ("v neck", "neckline=v_neck"), ("tee", "category=t_shirt")]),
        ("Ｒｅｄ　ｄｒｅｓｓ", [("red", "primary_color=red"), ("dress", "category=dress")]),  # full-width
        ("hundred tired credit shorts", [("shorts", "category=shorts")]),  # red, tie not inside words
        ("shirt", [("shirt", "category=shirt_blouse")]),  # the label "shirt or blouse" names both
    ],
)
def test_english_titles_read_on_word_boundaries(
    checker: ListingChecker, title: str, expected: list[tuple[str, str]]
) -> None:
    found = read(checker, title)
    assert [words for words, _ in found] == [words for words, _ in expected]
    for (_, choices), (_, wanted) in zip(found, expected, strict=True):
        assert wanted in choices


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("2025新款红色碎花连衣裙短袖", ["红色", "碎花", "连衣裙", "短袖"]),
        ("白色短袖T恤", ["白色", "短袖", "t恤"]),  # not the synonym 短袖T and a stray 恤
        ("黑色高腰阔腿牛仔裤", ["黑色", "高腰", "阔腿", "牛仔裤"]),
        ("包邮黑五特惠 灰色双肩包", ["灰色", "双肩包"]),  # 包 of 包邮 and 黑 of 黑五 claim nothing
        ("黑热裤", ["黑", "热裤"]),  # one-character Chinese terms do count
    ],
)
def test_chinese_titles_read_by_longest_match(checker: ListingChecker, title: str, expected: list[str]) -> None:
    assert [words for words, _ in read(checker, title)] == expected


def test_category_hints_are_read_too(checker: ListingChecker) -> None:
    claims = checker.read({"title": None, "category_hint": "Women > Jeans"})
    assert [(c.source, c.words) for c in claims] == [("category_hint", "jeans")]


# --- checking --------------------------------------------------------------------------------
def test_a_title_naming_another_category_is_an_issue(checker: ListingChecker) -> None:
    (issue,) = checker.check({"title": "red dress"}, tags(category=("trousers", 0.9), primary_color=("red", 0.95)))
    assert (issue.attribute, issue.listed_values, issue.image_value, issue.confidence) == (
        "category", ("dress",), "trousers", 0.9,
    )  # fmt: skip
    assert issue.listed_words == ("dress",) and issue.listed_in == ("title",)


@pytest.mark.parametrize("title", ["红色牛仔裤", "Red jeans"])
def test_colors_are_one_issue_on_the_primary_color(checker: ListingChecker, title: str) -> None:
    image = tags(category=("trousers", 0.9), primary_color=("blue", 0.95), secondary_color=("none", 0.9))
    issues = checker.check({"title": title}, image)
    assert [(i.attribute, i.listed_values, i.image_value) for i in issues] == [("primary_color", ("red",), "blue")]


def test_a_listed_color_the_image_has_as_secondary_is_no_issue(checker: ListingChecker) -> None:
    image = tags(category=("trousers", 0.9), primary_color=("blue", 0.95), secondary_color=("red", 0.9))
    assert checker.check({"title": "red jeans"}, image) == []


def test_unsure_tags_and_subjective_attributes_raise_nothing(checker: ListingChecker) -> None:
    image = tags(category=("trousers", 0.79), style=("sporty", 0.99), season=("winter", 0.99))
    assert checker.check({"title": "vintage summer dress"}, image) == []


def test_the_threshold_and_switch_come_from_the_policy(checker: ListingChecker) -> None:
    image = tags(category=("trousers", 0.6))
    lenient = ListingChecker(checker.taxonomy, ListingPolicy(min_confidence=0.5))
    assert [i.attribute for i in lenient.check({"title": "dress"}, image)] == ["category"]
    off = ListingChecker(checker.taxonomy, ListingPolicy(enabled=False, min_confidence=0.5))
    assert off.check({"title": "dress"}, image) == []


def test_planted_mismatches_are_found_in_both_languages(checker: ListingChecker) -> None:
    # The benchmark's generator (docs/benchmarks.md has the full-size figures), at default settings.
    cases = generate_cases(checker.taxonomy, 600, seed=7)
    scores = score(cases, checker.vocabulary, checker.policy, checker.taxonomy)
    for language in ("en", "zh"):
        result = scores[language].as_dict()
        assert result["planted"] > 50
        assert result["precision"] >= 0.95, (language, result)
        assert result["recall_confident"] >= 0.9, (language, result)


# --- storing and exporting -------------------------------------------------------------------
def _job(engine: Engine, sku: str, title: str | None, hint: str | None = None) -> JobSpec:
    row = ledger.CatalogRow(sku=sku, image_uri=f"file:///images/{sku}.jpg", title=title, category_hint=hint)
    with engine.begin() as conn:
        ledger.upsert_items(conn, [row])
        run_id = ledger.create_run(conn, "submit", {})
        (job,) = ledger.add_jobs(conn, run_id, [(row.sku, row.image_uri)])
        ledger.seal_run(conn, run_id)
    return job


def _result(job: JobSpec, taxonomy: Taxonomy, category: str, color: str, seconds: int = 0) -> TagResult:
    from datetime import UTC, datetime, timedelta

    attributes = {"category": AttributeTag(value=category, confidence=0.93)}
    for attribute in taxonomy.attributes_for(category):
        value = color if attribute.name == "primary_color" else attribute.values[0].id
        # The rest: sure enough for no review (0.5), not sure enough to contradict a listing (0.8).
        attributes[attribute.name] = AttributeTag(
            value=value, confidence=0.9 if attribute.name == "primary_color" else 0.7
        )
    return TagResult(
        job_id=job.job_id, sku=job.sku, image_uri=job.image_uri, image_sha256=f"{job.job_id:064x}", status="tagged",
        attributes=attributes, provenance=provenance(taxonomy, job.run_id),
        produced_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds),
    )  # fmt: skip


def _issues(engine: Engine) -> list[tuple[object, ...]]:
    query = (
        "SELECT sku, attribute, listed_values, listed_in, image_value, image_label_zh, confidence, review_reason"
        " FROM listing_issues ORDER BY 1, 2"
    )
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(query))]


def test_issues_are_stored_with_the_current_tags_and_replaced_by_the_next(engine: Engine, taxonomy: Taxonomy) -> None:
    writer = ResultWriter(engine, taxonomy)
    dress = _job(engine, "DRESS-1", "Red dress", "Dresses")
    zh = _job(engine, "ZH-1", "2025新款红色连衣裙 包邮")
    plain = _job(engine, "PLAIN-1", None)
    writer.write([_result(dress, taxonomy, "trousers", "blue"), _result(zh, taxonomy, "dress", "blue"),
                  _result(plain, taxonomy, "trousers", "blue")])  # fmt: skip
    assert _issues(engine) == [
        ("DRESS-1", "category", "dress", "title,category_hint", "trousers", "长裤", 0.93, "listing_mismatch"),
        ("DRESS-1", "primary_color", "red", "title", "blue", "蓝色", 0.9, "listing_mismatch"),
        ("ZH-1", "primary_color", "red", "title", "blue", "蓝色", 0.9, "listing_mismatch"),
    ]
    assert _listing_tasks(engine) == [("DRESS-1", "category"), ("DRESS-1", "primary_color"), ("ZH-1", "primary_color")]
    # A new image that agrees with the listing clears the sku's issues and tasks; the others stay.
    again = _job(engine, "DRESS-1", "Red dress", "Dresses")
    writer.write([_result(again, taxonomy, "dress", "red", seconds=10)])
    assert [row[:2] for row in _issues(engine)] == [("ZH-1", "primary_color")]
    assert _listing_tasks(engine) == [("ZH-1", "primary_color")]
    with engine.connect() as conn:
        item = conn.execute(sa.text("SELECT sku, open_tasks FROM review_items WHERE sku = 'ZH-1'")).one()
    assert tuple(item) == ("ZH-1", 1)


def _listing_tasks(engine: Engine) -> list[tuple[object, ...]]:
    query = "SELECT sku, attribute FROM review_tasks WHERE reason = 'listing_mismatch' ORDER BY 1, 2"
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(query))]


def test_export_carries_the_issues(tmp_path: Path, sqlite_engine: Engine, taxonomy: Taxonomy) -> None:
    job = _job(sqlite_engine, "DRESS-2", "red dress")
    ResultWriter(sqlite_engine, taxonomy).write([_result(job, taxonomy, "trousers", "red")])
    url = str(sqlite_engine.url)
    result = CliRunner().invoke(main, ["--database-url", url, "export", "-o", str(tmp_path / "tags.jsonl")])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "tags.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert document["listing_issues"] == [{
        "attribute": "category", "listed_values": ["dress"], "listed_words": ["dress"], "listed_in": ["title"],
        "image_value": "trousers", "confidence": 0.93, "review_reason": "listing_mismatch", "decided_value": None,
    }]  # fmt: skip
    result = CliRunner().invoke(
        main, ["--database-url", url, "export", "--format", "csv", "-o", str(tmp_path / "t.csv")]
    )
    lines = (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith(",listing_values")
    rows = [line for line in lines if line.startswith("DRESS-2,category,")]
    assert rows and rows[0].endswith(",dress")
