"""Several images per SKU: catalog rows and image_uris lists, one job per image, the merge into
the SKU's tags with a planted conflict routed to review, and a changed image re-tagged alone."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.backfill import BackfillOptions, DryRun, run_backfill
from pipeline.catalog import read_catalog
from pipeline.cli import main
from pipeline.db import make_engine
from pipeline.producer import submit_catalog
from pipeline.review.decisions import Decision, DecisionRecorder
from pipeline.settings import load_settings
from pipeline.sku_images import ImageRow, record_images
from pipeline.writer import ResultWriter
from schemas.results import AttributeTag, JobSpec, TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import provenance

CATALOG = """sku,image_uri,view,title
MULTI-1,https://img.example.com/m1-front.jpg,Front,Floral midi dress
MULTI-1,https://img.example.com/m1-back.jpg,back,
MULTI-1,https://img.example.com/m1-detail.jpg,detail,
SINGLE-1,https://img.example.com/s1.jpg,,Blue jeans
MULTI-1,https://img.example.com/m1-back.jpg,back,
"""


def test_a_catalog_lists_a_skus_images_as_rows_or_a_list() -> None:
    rows = [row for _, row in read_catalog(io.StringIO(CATALOG))]
    assert [(r.sku, r.view) for r in rows[:4]] == [("MULTI-1", "front"), ("MULTI-1", "back"), ("MULTI-1", "detail"),
                                                    ("SINGLE-1", None)]  # fmt: skip
    jsonl = json.dumps({"sku": "J-1", "title": "tee", "image_uris": ["a.jpg", {"uri": "b.jpg", "view": "back"}]})
    listed = [row for _, row in read_catalog(io.StringIO(jsonl + "\n"), "c.jsonl")]
    assert [(r.sku, r.image_uri, r.view, r.title) for r in listed] == [("J-1", "a.jpg", None, "tee"),
                                                                       ("J-1", "b.jpg", "back", "tee")]  # fmt: skip
    both = json.dumps({"sku": "J-2", "image_uri": "a.jpg", "image_uris": ["b.jpg"]})
    ((_, error),) = list(read_catalog(io.StringIO(both + "\n"), "c.jsonl"))
    assert "not both" in str(error)


def _submit(engine: Engine, taxonomy: Taxonomy, catalog: str) -> dict[str, JobSpec]:
    settings = load_settings(database_url=str(engine.url))
    report = submit_catalog(read_catalog(io.StringIO(catalog)), engine, settings, taxonomy, None)
    assert [str(bad) for bad in report.bad_rows] == [
        "line 6: sku 'MULTI-1' already has image 'https://img.example.com/m1-back.jpg' on line 3"
    ]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, run_id, sku, image_uri FROM jobs WHERE run_id = :r"),
                            {"r": report.run_id}).all()  # fmt: skip
    return {uri.rsplit("/", 1)[1]: JobSpec(job_id=i, run_id=r, sku=sku, image_uri=uri) for i, r, sku, uri in rows}


def _result(job: JobSpec, taxonomy: Taxonomy, seconds: int, **tags: tuple[str, float]) -> TagResult:
    attributes = {name: AttributeTag(value=value, confidence=conf) for name, (value, conf) in tags.items()}
    category = attributes["category"].value
    for attribute in taxonomy.attributes_for(category):  # the rest: unsure, the first value
        attributes.setdefault(attribute.name, AttributeTag(value=attribute.values[0].id, confidence=0.55))
    return TagResult(
        job_id=job.job_id, sku=job.sku, image_uri=job.image_uri, image_sha256=f"{job.job_id:064x}",
        status="tagged", attributes=attributes, summary=f"from {job.image_uri}",
        provenance=provenance(taxonomy, job.run_id),
        produced_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds),
    )  # fmt: skip


def _rows(engine: Engine, sql: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql))]


def test_a_three_image_sku_merges_and_flags_a_planted_conflict(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = _submit(engine, taxonomy, CATALOG)
    assert sorted(jobs) == ["m1-back.jpg", "m1-detail.jpg", "m1-front.jpg", "s1.jpg"]  # one job per image
    results = [
        _result(jobs["m1-front.jpg"], taxonomy, 1, category=("dress", 0.96), pattern=("floral", 0.9),
                neckline=("v_neck", 0.8), primary_color=("red", 0.9)),
        # The back is surer about the neckline, but the front decides it (taxonomy views.prefer).
        _result(jobs["m1-back.jpg"], taxonomy, 2, category=("dress", 0.9), pattern=("floral", 0.7),
                neckline=("round_neck", 0.99), primary_color=("red", 0.8)),
        # The planted conflict: the detail shot is sure the pattern is striped, the front floral.
        _result(jobs["m1-detail.jpg"], taxonomy, 3, category=("dress", 0.6), pattern=("striped", 0.95),
                primary_color=("red", 0.85)),
        _result(jobs["s1.jpg"], taxonomy, 4, category=("trousers", 0.9)),
    ]  # fmt: skip
    writer = ResultWriter(engine, taxonomy)
    writer.write(results[:2])  # in two batches, the detail last: the sku re-merges each time
    writer.write(results[2:])

    tags = dict(_rows(engine, "SELECT attribute, value FROM tags WHERE sku = 'MULTI-1'"))
    assert (tags["category"], tags["neckline"], tags["pattern"], tags["primary_color"]) == (
        "dress", "v_neck", "striped", "red",
    )  # fmt: skip
    sources = _rows(
        engine,
        "SELECT attribute, view, value, role FROM sku_tag_sources"
        " WHERE sku = 'MULTI-1' AND attribute IN ('pattern', 'neckline') ORDER BY 1, position",
    )
    assert sources == [
        ("neckline", "front", "v_neck", "chosen"), ("neckline", "back", "round_neck", "not_preferred"),
        ("neckline", "detail", "round_neck", "outranked"),  # a detail shot may show the neckline: unsure here
        ("pattern", "front", "floral", "conflict"), ("pattern", "back", "floral", "not_preferred"),
        ("pattern", "detail", "striped", "chosen"),
    ]  # fmt: skip
    assert _rows(
        engine, "SELECT attribute, reason FROM review_tasks WHERE sku = 'MULTI-1' AND reason = 'conflict'"
    ) == [("pattern", "conflict")]
    # The title says floral; the merged pattern is a sure striped: a listing issue on the merged
    # tags, kept on the sku's evidence hash (all its images) like its review tasks.
    ((evidence,),) = _rows(engine, "SELECT image_sha256 FROM tag_sets WHERE sku = 'MULTI-1'")
    assert evidence not in {f"{job.job_id:064x}" for job in jobs.values()}
    issues = _rows(engine, "SELECT attribute, listed_values, image_value, image_sha256 FROM listing_issues")
    assert issues == [("pattern", "floral", "striped", evidence)]
    tag_set = _rows(engine, "SELECT status, category, summary, image_uri FROM tag_sets WHERE sku = 'MULTI-1'")
    assert tag_set == [("needs_review", "dress", "from https://img.example.com/m1-front.jpg",
                        "https://img.example.com/m1-front.jpg")]  # fmt: skip
    # A single-image sku is untouched by all of it.
    assert _rows(engine, "SELECT count(*) FROM tag_sources WHERE sku = 'SINGLE-1'") == [(0,)]
    assert _rows(engine, "SELECT value FROM tags WHERE sku = 'SINGLE-1' AND attribute = 'category'") == [("trousers",)]


def test_the_conflict_confidence_is_the_writers_setting(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = _submit(engine, taxonomy, CATALOG)
    # Floral at 0.9 against striped at 0.95: a conflict at the default 0.8, none at 0.92.
    settings = load_settings(database_url=str(engine.url), merge_conflict_confidence=0.92)
    ResultWriter(engine, taxonomy, conflict_confidence=settings.merge_conflict_confidence).write([
        _result(jobs["m1-front.jpg"], taxonomy, 1, category=("dress", 0.96), pattern=("floral", 0.9)),
        _result(jobs["m1-detail.jpg"], taxonomy, 2, category=("dress", 0.96), pattern=("striped", 0.95)),
    ])  # fmt: skip
    assert _rows(engine, "SELECT count(*) FROM review_tasks WHERE reason = 'conflict'") == [(0,)]
    assert _rows(engine, "SELECT role FROM tag_sources WHERE attribute = 'pattern' ORDER BY position") == [
        ("outranked",), ("chosen",)
    ]  # fmt: skip


def test_a_decision_on_a_merged_tag_ends_when_any_image_changes(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = _submit(engine, taxonomy, CATALOG)
    writer = ResultWriter(engine, taxonomy)
    multi = [jobs[name] for name in ("m1-front.jpg", "m1-back.jpg", "m1-detail.jpg")]
    writer.write([_result(job, taxonomy, n, category=("dress", 0.9), pattern=("floral", 0.6))
                  for n, job in enumerate(multi)])  # fmt: skip
    ((job_id,),) = _rows(engine, "SELECT job_id FROM tag_sets WHERE sku = 'MULTI-1'")
    DecisionRecorder(engine, taxonomy).record(
        [Decision("MULTI-1", "pattern", "correct", int(job_id), value="plaid")], reviewer="ana"
    )
    pattern = "SELECT value, source FROM sku_tags_current WHERE sku = 'MULTI-1' AND attribute = 'pattern'"
    assert _rows(engine, pattern) == [("plaid", "review")]
    with engine.connect() as conn:  # the content check compares each image's own bytes, not the evidence hash
        checked = {row.image_uri: row.image_sha256 for row in ledger.tagged_items_page(conn, "", 10)}
    assert [checked[job.image_uri] for job in multi] == [f"{job.job_id:064x}" for job in multi]

    # The back image tagged again in a later run, same bytes: the decision stands.
    back_bytes = f"{multi[1].job_id:064x}"
    retag = _result(_new_job(engine, multi[1]), taxonomy, 10, category=("dress", 0.9), pattern=("floral", 0.6))
    writer.write([retag.model_copy(update={"image_sha256": back_bytes})])
    assert _rows(engine, pattern) == [("plaid", "review")]
    # New bytes behind the back image (not the first one): the merged tag is the model's again.
    changed = _result(_new_job(engine, multi[1]), taxonomy, 20, category=("dress", 0.9), pattern=("floral", 0.6))
    writer.write([changed.model_copy(update={"image_sha256": "e" * 64})])
    assert _rows(engine, pattern) == [("floral", "model")]


def _new_job(engine: Engine, job: JobSpec) -> JobSpec:
    with engine.begin() as conn:
        run_id = ledger.create_run(conn, "submit", {})
        (created,) = ledger.add_jobs(conn, run_id, [(job.sku, job.image_uri)])
        return created


def test_the_backfill_notices_a_change_to_any_image_of_a_sku(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = _submit(engine, taxonomy, CATALOG)
    ResultWriter(engine, taxonomy).write(
        [_result(job, taxonomy, n, category=("dress", 0.9)) for n, job in enumerate(jobs.values())]
    )
    settings = load_settings(database_url=str(engine.url))
    front, back, detail = (f"https://img.example.com/m1-{view}.jpg" for view in ("front", "back", "detail"))

    def plan_after(images: list[str]) -> dict[str, int]:
        with engine.begin() as conn:
            rows = [ImageRow("MULTI-1", uri, None, position) for position, uri in enumerate(images)]
            record_images(conn, ["MULTI-1"], rows, datetime.now(UTC))
        dry = run_backfill(settings, taxonomy, engine, None, BackfillOptions(dry_run=True))
        assert isinstance(dry, DryRun)
        return dry.by_reason

    assert plan_after([front, back, detail]) == {}  # nothing changed
    # The back image replaced: the sku is re-tagged, one job per current image.
    assert plan_after([front, "https://img.example.com/m1-back-v2.jpg", detail]) == {"image_uri_changed": 3}
    # The detail image gone: its answers are still in the merged tags.
    assert plan_after([front, back]) == {"image_uri_changed": 2}
    summary = run_backfill(settings, taxonomy, engine, None, BackfillOptions())
    assert not isinstance(summary, DryRun)
    planned = _rows(engine, f"SELECT sku, image_uri, reason FROM jobs WHERE run_id = {summary.run_id} ORDER BY id")
    assert sorted(planned) == [("MULTI-1", back, "image_uri_changed"), ("MULTI-1", front, "image_uri_changed")]


def _photo(path: Path, color: tuple[int, int, int]) -> None:
    Image.new("RGB", (96, 128), color).save(path, "JPEG", quality=90)


def test_a_changed_back_image_retags_that_image_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for view, color in (("front", (200, 20, 20)), ("back", (20, 200, 20)), ("detail", (20, 20, 200))):
        _photo(images / f"{view}.jpg", color)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(
        "sku,image_uri,view\n" + "".join(f"M-1,images/{v}.jpg,{v}\n" for v in ("front", "back", "detail"))
    )
    url = f"sqlite:///{tmp_path}/multi.db"
    run = ["--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32"]
    env = {"SKUTAG_IMAGE_ROOTS": json.dumps([str(tmp_path)])}
    first = CliRunner().invoke(main, run, env=env, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    _photo(images / "back.jpg", (240, 240, 240))  # a new back photo behind the same URI
    second = CliRunner().invoke(main, run, env=env, catch_exceptions=False)
    assert second.exit_code == 0, second.output

    engine = make_engine(url)
    with engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT run_id, image_uri, cache_hit FROM jobs ORDER BY run_id, id")).all()
        sources = dict(conn.execute(sa.text(
            "SELECT DISTINCT view, image_sha256 FROM tag_sources WHERE sku = 'M-1'")).all())  # fmt: skip
        query = "SELECT image_sha256 FROM results WHERE image_uri LIKE '%/back.jpg' ORDER BY job_id"
        back = conn.execute(sa.text(query)).scalars().all()
        merged = conn.execute(sa.text("SELECT count(*) FROM tags WHERE sku = 'M-1'")).scalar_one()
    engine.dispose()
    run_2 = {Path(uri).name: bool(hit) for run_id, uri, hit in jobs if run_id == 2}
    assert run_2 == {"front.jpg": True, "back.jpg": False, "detail.jpg": True}
    assert len(set(back)) == 2 and sources["back"] == back[-1]  # re-merged from the new back image
    assert merged > 0
