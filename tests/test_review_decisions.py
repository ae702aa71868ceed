"""The review data layer on Postgres and SQLite: the queue follows the writer, decisions are a
validated append-only log the database itself guards, and they show at once in the views."""

from __future__ import annotations

import json
import select
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.errors import InputError
from pipeline.migrate import upgrade
from pipeline.review.decisions import Decision, DecisionRecorder
from pipeline.writer import ResultWriter
from schemas.results import JobSpec, TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result

IMAGE_A = "a" * 64
IMAGE_B = "b" * 64


def needs_review(result: TagResult, attributes: list[str], image: str = IMAGE_A, **confidences: float) -> TagResult:
    tags = dict(result.attributes)
    for name, confidence in confidences.items():
        tags[name] = tags[name].model_copy(update={"confidence": confidence})
    return result.model_copy(
        update={"status": "needs_review", "review_attributes": attributes, "image_sha256": image, "attributes": tags}
    )


def tagged(engine: Engine, taxonomy: Taxonomy, count: int = 1, review: tuple[str, ...] = ("pattern", "style"),
           image: str = IMAGE_A, prefix: str = "SKU", seed: int = 0) -> list[TagResult]:  # fmt: skip
    jobs = make_jobs(engine, count, prefix=prefix)
    results = [
        needs_review(make_result(job, taxonomy, seed=seed, category="dress"), list(review), image,
                     pattern=0.2, style=0.3)
        for job in jobs
    ]  # fmt: skip
    ResultWriter(engine, taxonomy).write(results)
    return results


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def current(engine: Engine, sku: str) -> dict[str, Any]:
    found = rows(
        engine, "SELECT attribute, value, confidence, source, label_en FROM sku_tags_current WHERE sku = :s", s=sku
    )
    return {row.attribute: row for row in found}


def json_status(engine: Engine, sku: str) -> tuple[str, dict[str, Any]]:
    (row,) = rows(engine, "SELECT status, tags FROM sku_tags_json WHERE sku = :s", s=sku)
    tags = row.tags if isinstance(row.tags, dict) else json.loads(row.tags)
    return row.status, tags


def other_value(taxonomy: Taxonomy, attribute: str, not_this: str) -> str:
    values = taxonomy.attributes[attribute].values
    return next(v.id for v in values if v.id != not_this)


def test_the_writer_queues_the_attributes_routed_to_review(engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(engine, taxonomy)
    tasks = rows(engine, "SELECT attribute, reason, confidence, job_id FROM review_tasks ORDER BY attribute")
    assert [(t.attribute, t.reason, t.confidence) for t in tasks] == [
        ("pattern", "low_confidence", 0.2), ("style", "low_confidence", 0.3),
    ]  # fmt: skip
    (item,) = rows(engine, "SELECT sku, min_confidence, open_tasks, category, job_id FROM review_items")
    assert (item.sku, item.min_confidence, item.open_tasks, item.category) == (result.sku, 0.2, 2, "dress")
    assert item.job_id == result.job_id
    assert json_status(engine, result.sku)[0] == "needs_review"


def test_decisions_show_at_once_and_the_sku_is_tagged_when_nothing_is_left(engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(engine, taxonomy)
    recorder = DecisionRecorder(engine, taxonomy)
    corrected = other_value(taxonomy, "style", result.attributes["style"].value)
    report = recorder.record([Decision(result.sku, "pattern", "accept", result.job_id or 0)], reviewer="ana")
    assert report.recorded == 1 and not report.refused
    assert json_status(engine, result.sku)[0] == "needs_review"  # style is still open
    recorder.record([Decision(result.sku, "style", "correct", result.job_id or 0, value=corrected)], reviewer="ana")

    view = current(engine, result.sku)
    assert (view["style"].value, view["style"].confidence, view["style"].source) == (corrected, 1.0, "review")
    assert view["style"].label_en == next(v.en for v in taxonomy.attributes["style"].values if v.id == corrected)
    assert (view["pattern"].value, view["pattern"].source) == (result.attributes["pattern"].value, "review")
    assert view["season"].source == "model"
    status, document = json_status(engine, result.sku)
    assert status == "tagged" and document["status"] == "tagged"
    assert document["attributes"]["style"] == {"value": corrected, "confidence": 1.0, "source": "review"}
    assert rows(engine, "SELECT * FROM review_tasks") == []
    assert rows(engine, "SELECT * FROM review_items") == []
    log = rows(
        engine, "SELECT attribute, action, value, value_before, image_sha256, reviewer, reason FROM reviews ORDER BY id"
    )
    assert [(r.attribute, r.action, r.reviewer, r.reason, r.image_sha256) for r in log] == [
        ("pattern", "accept", "ana", "low_confidence", IMAGE_A), ("style", "correct", "ana", "low_confidence", IMAGE_A),
    ]  # fmt: skip
    assert log[1].value_before == result.attributes["style"].value


def test_a_bad_decision_is_refused_with_a_code_and_the_rest_recorded(engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(engine, taxonomy)
    job = result.job_id or 0
    report = DecisionRecorder(engine, taxonomy).record(
        [
            Decision(result.sku, "style", "correct", job, value="not_a_style"),
            Decision(result.sku, "category", "correct", job, value="not_a_category"),
            Decision(result.sku, "neckline_of_a_shoe", "accept", job),
            Decision("NO-SUCH-SKU", "style", "accept", job),
            Decision(result.sku, "pattern", "accept", job - 1),
            Decision(result.sku, "category", "not_visible", job),
            Decision(result.sku, "pattern", "not_visible", job),
        ],
        reviewer="ana",
    )
    codes = [(r.index, r.code) for r in report.refused]
    assert codes == [(0, "invalid_value"), (1, "invalid_value"), (2, "not_an_attribute"), (3, "unknown_sku"),
                     (4, "tags_changed"), (5, "invalid_value")]  # fmt: skip
    assert "changed since they were shown" in report.refused[4].message
    assert report.recorded == 1
    assert current(engine, result.sku)["pattern"].value == "not_visible"


def _raw_review(engine: Engine, taxonomy: Taxonomy, sku: str, **changes: Any) -> None:
    row = {
        "sku": sku, "attribute": "category", "action": "correct", "value": "dress", "image_sha256": IMAGE_A,
        "taxonomy_version": taxonomy.version, "reason": "manual", "reviewer": "by-hand",
        "reviewed_at": datetime.now(UTC),
    } | changes  # fmt: skip
    columns = ", ".join(row)
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO reviews ({columns}) VALUES ({', '.join(':' + c for c in row)})"), row)


@pytest.mark.parametrize(
    "changes",
    [
        {"value": "not_a_category"},  # the symptom: it appeared in sku_tags_current with confidence 1
        {"attribute": "style", "value": "dress"},  # a value of another attribute
        {"image_sha256": None},  # a review that names no image
        {"image_sha256": ""},
        {"reviewer": ""},
        {"reason": "because"},
        {"action": "overrule"},
        {"taxonomy_version": "tx-unknown"},
    ],
)
def test_the_database_itself_refuses_an_invalid_review(
    engine: Engine, taxonomy: Taxonomy, changes: dict[str, Any]
) -> None:
    (result,) = tagged(engine, taxonomy)
    with pytest.raises(sa.exc.IntegrityError):
        _raw_review(engine, taxonomy, result.sku, **changes)
    assert rows(engine, "SELECT * FROM reviews") == []
    assert current(engine, result.sku)["category"].source == "model"


def test_a_valid_review_inserted_by_hand_applies_like_any_other(engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(engine, taxonomy)
    _raw_review(engine, taxonomy, result.sku, attribute="pattern", value="striped")
    _raw_review(engine, taxonomy, result.sku, attribute="style", value="casual")
    assert current(engine, result.sku)["pattern"].value == "striped"
    assert json_status(engine, result.sku)[0] == "tagged"


def test_the_log_is_append_only(engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(engine, taxonomy)
    DecisionRecorder(engine, taxonomy).record([Decision(result.sku, "pattern", "accept", result.job_id or 0)], "ana")
    for statement in ("UPDATE reviews SET value = 'striped'", "DELETE FROM reviews"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text(statement))
    assert len(rows(engine, "SELECT * FROM reviews")) == 1


def test_translated_refusal_is_an_input_error(engine: Engine, taxonomy: Taxonomy) -> None:
    from pipeline.db import translated_errors

    (result,) = tagged(engine, taxonomy)
    with pytest.raises(InputError, match="database error while reviewing"), translated_errors("reviewing"):
        _raw_review(engine, taxonomy, result.sku, value="not_a_category")


def _retag(engine: Engine, taxonomy: Taxonomy, result: TagResult, image: str, seconds: int) -> TagResult:
    from pipeline import ledger

    with engine.begin() as conn:
        run_id = ledger.create_run(conn, "submit", {})
        (job,) = ledger.add_jobs(conn, run_id, [(result.sku, result.image_uri or "")])
        ledger.seal_run(conn, run_id)
    again = make_result(
        job, taxonomy, seed=0, category="dress", produced_at=result.produced_at + timedelta(seconds=seconds)
    )
    again = needs_review(again, ["pattern", "style"], image, pattern=0.2, style=0.3)
    ResultWriter(engine, taxonomy).write([again])
    return again


def test_a_retag_of_the_same_image_keeps_the_review_and_a_new_image_reopens_it(
    engine: Engine, taxonomy: Taxonomy
) -> None:
    (result,) = tagged(engine, taxonomy)
    job = result.job_id or 0
    DecisionRecorder(engine, taxonomy).record(
        [Decision(result.sku, "pattern", "correct", job, value="plaid"), Decision(result.sku, "style", "accept", job)],
        reviewer="ana",
    )
    same = _retag(engine, taxonomy, result, IMAGE_A, 10)
    assert current(engine, result.sku)["pattern"].value == "plaid"
    assert json_status(engine, result.sku)[0] == "tagged"
    assert rows(engine, "SELECT * FROM review_tasks") == []

    _retag(engine, taxonomy, same, IMAGE_B, 20)
    assert current(engine, result.sku)["pattern"].source == "model"
    assert json_status(engine, result.sku)[0] == "needs_review"
    reopened = rows(engine, "SELECT attribute, image_sha256 FROM review_tasks ORDER BY attribute")
    assert [(r.attribute, r.image_sha256) for r in reopened] == [("pattern", IMAGE_B), ("style", IMAGE_B)]
    assert rows(engine, "SELECT open_tasks FROM review_items")[0].open_tasks == 2


def test_undo_restores_the_value_before_and_reopens_the_task(engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(engine, taxonomy)
    recorder = DecisionRecorder(engine, taxonomy)
    job = result.job_id or 0
    recorder.record([Decision(result.sku, "pattern", "correct", job, value="plaid")], "ana")
    recorder.record([Decision(result.sku, "pattern", "correct", job, value="floral", reason="low_confidence")], "ana")
    recorder.record([Decision(result.sku, "style", "accept", job)], "bo")  # someone else's: not ana's to undo

    assert recorder.undo_last("ana").recorded == 1
    assert current(engine, result.sku)["pattern"].value == "plaid"
    assert recorder.undo_last("ana").recorded == 1
    assert current(engine, result.sku)["pattern"].source == "model"
    assert [r.attribute for r in rows(engine, "SELECT attribute FROM review_tasks")] == ["pattern"]
    assert rows(engine, "SELECT open_tasks FROM review_items")[0].open_tasks == 1
    assert recorder.undo_last("ana").refused[0].code == "nothing_to_undo"
    assert current(engine, result.sku)["style"].source == "review"


@pytest.mark.postgres
def test_a_decision_sends_notify_with_the_sku(pg_engine: Engine, taxonomy: Taxonomy) -> None:
    (result,) = tagged(pg_engine, taxonomy, prefix="<script>alert(1)</script>")
    listener = pg_engine.raw_connection()
    try:
        listener.set_isolation_level(0)  # type: ignore[attr-defined]
        cursor = listener.cursor()
        cursor.execute("LISTEN skutag_review_test")
        recorder = DecisionRecorder(pg_engine, taxonomy, notify_channel="skutag_review_test")
        recorder.record([Decision(result.sku, "pattern", "accept", result.job_id or 0)], "ana")
        select.select([listener], [], [], 5)
        listener.poll()  # type: ignore[attr-defined]
        payloads = [json.loads(n.payload) for n in listener.notifies]  # type: ignore[attr-defined]
    finally:
        listener.close()
    assert payloads == [{"skus": [result.sku]}]


def test_migrating_0001_data_keeps_valid_reviews_and_queues_needs_review(tmp_path: Path, taxonomy: Taxonomy) -> None:
    from pipeline.db import make_engine

    url = f"sqlite:///{tmp_path}/old.db"
    upgrade(url, "0001")
    engine = make_engine(url)
    try:
        jobs = _jobs_0001(engine, 2)
        results = [needs_review(make_result(job, taxonomy, category="dress"), ["pattern"], pattern=0.1) for job in jobs]
        # The 0001 writer: no queue tables yet, so write its rows directly.
        _write_0001(engine, taxonomy, results)
        with engine.begin() as conn:
            for sku, value, image in ((jobs[0].sku, "striped", IMAGE_A), (jobs[1].sku, "not_a_pattern", IMAGE_A)):
                conn.execute(
                    sa.text("INSERT INTO reviews (sku, attribute, value, image_sha256, reviewer, reviewed_at) "
                            "VALUES (:sku, 'pattern', :value, :image, 'old', '2026-01-01 00:00:00')"),
                    {"sku": sku, "value": value, "image": image},
                )  # fmt: skip
        upgrade(url)
        assert current(engine, jobs[0].sku)["pattern"].value == "striped"
        assert current(engine, jobs[1].sku)["pattern"].source == "model"
        assert [r.sku for r in rows(engine, "SELECT sku FROM review_items")] == [jobs[1].sku]
        assert json_status(engine, jobs[0].sku)[0] == "tagged"
    finally:
        engine.dispose()


def _jobs_0001(engine: Engine, count: int) -> list[JobSpec]:
    """Jobs as the 0001 schema holds them (the ledger's own code follows the newest schema)."""
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        run = "INSERT INTO runs (id, kind, state, config, total_jobs, planned_at, created_at) VALUES (1, 'submit',"
        conn.execute(sa.text(run + " 'running', '{}', :n, :now, :now)"), {"n": count, "now": now})
        specs = []
        for index in range(count):
            sku, uri = f"SKU-{index:06d}", f"file:///images/SKU-{index}.jpg"
            item = "INSERT INTO items (sku, image_uri, created_at, updated_at) VALUES (:s, :u, :now, :now)"
            conn.execute(sa.text(item), {"s": sku, "u": uri, "now": now})
            job_id = conn.execute(
                sa.text("INSERT INTO jobs (run_id, sku, image_uri, created_at, updated_at) "
                        "VALUES (1, :s, :u, :now, :now) RETURNING id"), {"s": sku, "u": uri, "now": now},
            ).scalar_one()  # fmt: skip
            specs.append(JobSpec(job_id=job_id, run_id=1, sku=sku, image_uri=uri))
    return specs


def _write_0001(engine: Engine, taxonomy: Taxonomy, results: list[TagResult]) -> None:
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        for attribute, value, en, zh, _ in taxonomy.value_rows():
            conn.execute(
                sa.text("INSERT INTO taxonomy_values VALUES (:v, :a, :value, :en, :zh, '[]')"),
                {"v": taxonomy.version, "a": attribute, "value": value, "en": en, "zh": zh},
            )
        for r in results:
            conn.execute(sa.text(
                "INSERT INTO results (job_id, run_id, sku, image_sha256, status, category, attributes,"
                " review_attributes, model_id, quantization, prompt_version, taxonomy_version, timings, cache_hit,"
                " produced_at, written_at) VALUES (:job, 1, :sku, :image, 'needs_review', 'dress', '{}', :review,"
                " 'm', 'fp32', 'p', :tv, '{}', 0, :now, :now)"),
                {"job": r.job_id, "sku": r.sku, "image": r.image_sha256, "review": json.dumps(r.review_attributes),
                 "tv": taxonomy.version, "now": now},
            )  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO tag_sets (sku, job_id, status, category, image_sha256, model_id, quantization,"
                " prompt_version, taxonomy_version, produced_at, updated_at)"
                " VALUES (:sku, :job, 'needs_review', 'dress', :image, 'm', 'fp32', 'p', :tv, :now, :now)"),
                {"job": r.job_id, "sku": r.sku, "image": r.image_sha256, "tv": taxonomy.version, "now": now},
            )  # fmt: skip
            for name, tag in r.attributes.items():
                conn.execute(sa.text(
                    "INSERT INTO tags (sku, attribute, value, confidence, job_id, image_sha256, model_id,"
                    " taxonomy_version, produced_at, updated_at)"
                    " VALUES (:sku, :a, :v, :c, :job, :image, 'm', :tv, :now, :now)"),
                    {"sku": r.sku, "a": name, "v": tag.value, "c": tag.confidence, "job": r.job_id,
                     "image": r.image_sha256, "tv": taxonomy.version, "now": now},
                )  # fmt: skip
