"""The writer against real Postgres and SQLite: atomic, idempotent, a defined winner, no deadlocks."""

from __future__ import annotations

import json
import select
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pipeline.db import make_engine
from pipeline.errors import InputError, RetryableError
from pipeline.result_checks import InvalidResultError
from pipeline.writer import ResultWriter, notify_payloads, write_with_retry
from schemas.results import AttributeTag, ErrorCode, ItemError, TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result, provenance

SNAPSHOT_TABLES = ("results", "tag_sets", "tags", "jobs", "runs")


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            table: [tuple(row) for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2"))]
            for table in SNAPSHOT_TABLES
        }


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def test_a_batch_lands_with_its_jobs_and_run(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = make_jobs(engine, 20)
    results = [make_result(job, taxonomy) for job in jobs]
    report = ResultWriter(engine, taxonomy).write(results)

    expected_tags = sum(len(result.attributes) for result in results)
    assert (report.results, report.new_results, report.skus_updated, report.tag_rows) == (20, 20, 20, expected_tags)
    assert count(engine, "SELECT count(*) FROM results") == 20
    assert count(engine, "SELECT count(*) FROM tags") == expected_tags
    assert count(engine, "SELECT count(*) FROM jobs WHERE state = 'done' AND finished_at IS NOT NULL") == 20
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT state FROM runs")).scalar_one() == "done"
        value = conn.execute(
            sa.text("SELECT value FROM tags WHERE sku = :sku AND attribute = 'category'"), {"sku": jobs[3].sku}
        ).scalar_one()
    assert value == results[3].category


def test_replaying_a_batch_changes_nothing(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = make_jobs(engine, 15)
    results = [make_result(job, taxonomy) for job in jobs]
    writer = ResultWriter(engine, taxonomy)
    writer.write(results)
    before = snapshot(engine)

    report = writer.write(results)  # a redelivery of the same message
    assert report.new_results == 0
    assert snapshot(engine) == before

    # A second copy of the job computed again (a different answer) is not a second result.
    recomputed = [make_result(job, taxonomy, seed=9, produced_at=datetime(2027, 1, 1, tzinfo=UTC)) for job in jobs]
    assert writer.write(recomputed).new_results == 0
    assert snapshot(engine) == before


def test_a_value_outside_the_taxonomy_rejects_the_whole_batch(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = make_jobs(engine, 3)
    good = make_result(jobs[0], taxonomy, category="dress")
    bad_attributes = dict(make_result(jobs[1], taxonomy, category="dress").attributes)
    bad_attributes["neckline"] = AttributeTag(value="tuxedo", confidence=0.9)
    bad = make_result(jobs[1], taxonomy, category="dress").model_copy(update={"attributes": bad_attributes})

    with pytest.raises(InvalidResultError) as caught:
        ResultWriter(engine, taxonomy).write([good, bad])
    assert str(caught.value) == (
        f"invalid result: sku '{jobs[1].sku}': attributes.neckline: 'tuxedo' is not an allowed value; "
        "nothing from this batch was written"
    )
    assert caught.value.problems.keys() == {1}
    assert count(engine, "SELECT count(*) FROM results") == 0
    assert count(engine, "SELECT count(*) FROM tags") == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category": "spaceship"}, "attributes.category: 'spaceship' is not a category"),
        ({"drop": "sleeve_length"}, "attributes.sleeve_length: missing for category 'dress'"),
        ({"extra": "heel_height"}, "attributes.heel_height: not an attribute of category 'dress'"),
        ({"summary": "x" * 500}, "summary: 500 characters, over the cap of 120"),
        ({"runner_up": "plaid"}, "attributes.neckline.runner_up: 'plaid' is not an allowed value"),
        ({"taxonomy_version": "tx-other"}, "provenance.taxonomy_version: 'tx-other' but this writer"),
    ],
)
def test_each_malformed_result_is_named(
    sqlite_engine: Engine, taxonomy: Taxonomy, change: dict[str, str], message: str
) -> None:
    (job,) = make_jobs(sqlite_engine, 1)
    result = make_result(job, taxonomy, category="dress")
    attributes = dict(result.attributes)
    if "category" in change:
        attributes["category"] = AttributeTag(value=change["category"], confidence=1.0)
    if "drop" in change:
        del attributes[change["drop"]]
    if "extra" in change:
        attributes[change["extra"]] = AttributeTag(value="flat", confidence=1.0)
    if "runner_up" in change:
        attributes["neckline"] = attributes["neckline"].model_copy(update={"runner_up": change["runner_up"]})
    update: dict[str, Any] = {"attributes": attributes}
    if "summary" in change:
        update["summary"] = change["summary"]
    if "taxonomy_version" in change:
        update["provenance"] = provenance(taxonomy, taxonomy_version=change["taxonomy_version"])
    with pytest.raises(InvalidResultError, match="invalid result") as caught:
        ResultWriter(sqlite_engine, taxonomy).write([result.model_copy(update=update)])
    assert message in str(caught.value)
    assert f"sku '{job.sku}'" in str(caught.value)


def test_newest_result_wins_whatever_the_write_order(engine: Engine, taxonomy: Taxonomy) -> None:
    (first,) = make_jobs(engine, 1, prefix="A", kind="submit")
    (second,) = make_jobs(engine, 1, prefix="A", kind="backfill")  # same sku, a later run
    older = make_result(first, taxonomy, category="dress", produced_at=datetime(2026, 3, 1, tzinfo=UTC))
    newer = make_result(second, taxonomy, category="shoes", produced_at=datetime(2026, 3, 2, tzinfo=UTC))
    writer = ResultWriter(engine, taxonomy)

    writer.write([newer])
    assert writer.write([older]).skus_updated == 0  # stored as history, not as current

    with engine.connect() as conn:
        current = dict(
            conn.execute(sa.text("SELECT attribute, value FROM tags WHERE sku = :s"), {"s": first.sku}).all()
        )
    assert current["category"] == "shoes"
    assert "neckline" not in current  # the dress-only attributes of the older result are not mixed in
    assert set(current) == set(newer.attributes)
    assert count(engine, "SELECT count(*) FROM results") == 2


def test_a_failed_result_keeps_the_previous_tags(engine: Engine, taxonomy: Taxonomy) -> None:
    (first,) = make_jobs(engine, 1, prefix="B")
    (second,) = make_jobs(engine, 1, prefix="B", kind="backfill")
    writer = ResultWriter(engine, taxonomy)
    writer.write([make_result(first, taxonomy, category="bag")])
    failure = TagResult(
        job_id=second.job_id,
        sku=second.sku,
        status="failed",
        error=ItemError(code=ErrorCode.CORRUPT, message="image data is corrupt"),
        provenance=provenance(taxonomy, second.run_id),
    )
    writer.write([failure])
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT state, last_error_code FROM jobs WHERE id = :j"), {"j": second.job_id}).one()
        run_state = conn.execute(sa.text("SELECT state FROM runs WHERE id = :r"), {"r": second.run_id}).scalar_one()
    assert tuple(job) == ("failed", "corrupt")
    assert run_state == "failed"
    assert count(engine, "SELECT count(*) FROM tags WHERE attribute = 'category' AND value = 'bag'") == 1


def test_consumer_views_prefer_a_review_of_the_same_image(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = make_jobs(engine, 2)
    results = [make_result(job, taxonomy, category="dress") for job in jobs]
    ResultWriter(engine, taxonomy).write(results)
    reviewed, other = results
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO reviews (sku, attribute, action, value, image_sha256, taxonomy_version, reason,"
                " reviewer, reviewed_at) "
                "VALUES (:sku, 'pattern', 'correct', 'floral', :sha, :tv, 'manual', 'ana', :at), "
                "(:sku2, 'pattern', 'correct', 'floral', 'old-image', :tv, 'manual', 'ana', :at)"
            ),
            {
                "sku": reviewed.sku,
                "sha": reviewed.image_sha256,
                "sku2": other.sku,
                "at": datetime.now(UTC),
                "tv": taxonomy.version,
            },
        )
    with engine.connect() as conn:
        rows = {
            row.sku: row for row in conn.execute(sa.text("SELECT * FROM sku_tags_current WHERE attribute = 'pattern'"))
        }
        document = conn.execute(
            sa.text("SELECT tags FROM sku_tags_json WHERE sku = :s"), {"s": reviewed.sku}
        ).scalar_one()
    assert (rows[reviewed.sku].value, rows[reviewed.sku].source, float(rows[reviewed.sku].confidence)) == (
        "floral",
        "review",
        1.0,
    )
    assert rows[reviewed.sku].label_zh == "碎花"
    assert rows[reviewed.sku].model_value == reviewed.attributes["pattern"].value
    assert (rows[other.sku].source, rows[other.sku].value) == ("model", other.attributes["pattern"].value)

    document = json.loads(document) if isinstance(document, str) else document
    assert document["sku"] == reviewed.sku
    assert document["status"] == "tagged"
    assert document["attributes"]["pattern"] == {"value": "floral", "confidence": 1.0, "source": "review"}
    assert document["attributes"]["category"]["value"] == "dress"
    assert set(document["attributes"]) == set(reviewed.attributes)


@pytest.mark.postgres
def test_changed_skus_are_announced_with_notify(pg_engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = make_jobs(pg_engine, 4)
    listener = pg_engine.raw_connection()
    try:
        listener.dbapi_connection.set_isolation_level(0)  # type: ignore[union-attr]
        cursor = listener.cursor()
        cursor.execute("LISTEN skutag_tags_changed")
        ResultWriter(pg_engine, taxonomy, notify_channel="skutag_tags_changed").write(
            [make_result(j, taxonomy) for j in jobs]
        )
        connection = listener.dbapi_connection
        assert select.select([connection], [], [], 5) != ([], [], [])
        connection.poll()  # type: ignore[union-attr]
        payloads = [json.loads(n.payload) for n in connection.notifies]  # type: ignore[union-attr]
    finally:
        listener.close()
    assert sorted(sku for p in payloads for sku in p["skus"]) == sorted(job.sku for job in jobs)


def test_notify_payloads_stay_under_the_postgres_limit() -> None:
    skus = [f"SKU-{'x' * 40}-{i}" for i in range(1000)]
    payloads = list(notify_payloads(skus))
    assert len(payloads) > 1
    assert all(len(p.encode()) <= 8000 for p in payloads)
    assert [s for p in payloads for s in json.loads(p)["skus"]] == skus


@pytest.mark.postgres
def test_two_writers_on_overlapping_skus_agree_on_the_newest(pg_engine: Engine, taxonomy: Taxonomy) -> None:
    skus = 60
    runs = [make_jobs(pg_engine, skus, prefix="C", kind=f"run{r}") for r in range(6)]
    # Each run's results are newer than the previous run's; the two writers take alternate runs,
    # each in the opposite sku order, so their row locks would cross if the writer did not sort.
    batches = [
        [
            make_result(job, taxonomy, seed=r, produced_at=datetime(2026, 5, 1, tzinfo=UTC) + timedelta(hours=r))
            for job in run
        ]
        for r, run in enumerate(runs)
    ]
    errors: list[BaseException] = []

    def write(batch_indexes: list[int], reverse: bool) -> None:
        writer = ResultWriter(pg_engine, taxonomy)
        try:
            for index in batch_indexes:
                batch = batches[index][::-1] if reverse else batches[index]
                for start in range(0, skus, 20):
                    write_with_retry(writer, batch[start : start + 20], attempts=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=([5, 3, 1], False)),
        threading.Thread(target=write, args=([4, 2, 0], True)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert count(pg_engine, "SELECT count(*) FROM results") == skus * 6
    assert count(pg_engine, "SELECT count(*) FROM tag_sets") == skus
    newest = {result.sku: result for result in batches[5]}
    with pg_engine.connect() as conn:
        current = dict(conn.execute(sa.text("SELECT sku, job_id FROM tag_sets")).all())
        tag_jobs = conn.execute(sa.text("SELECT count(DISTINCT job_id), count(DISTINCT sku) FROM tags")).one()
    assert current == {sku: result.job_id for sku, result in newest.items()}
    assert tuple(tag_jobs) == (skus, skus)


@pytest.mark.postgres
def test_a_connection_cut_mid_write_is_retried_into_exactly_one_row(
    pg_engine: Engine, postgres_admin: Engine, taxonomy: Taxonomy
) -> None:
    jobs = make_jobs(pg_engine, 10)
    results = [make_result(job, taxonomy) for job in jobs]
    cuts = []

    def cut_connection(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT INTO tags" in statement and not cuts:
            pid = conn.connection.dbapi_connection.get_backend_pid()
            with postgres_admin.connect() as admin:
                admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            cuts.append(pid)

    event.listen(pg_engine, "before_cursor_execute", cut_connection)
    try:
        report = write_with_retry(ResultWriter(pg_engine, taxonomy), results, sleep=lambda _: None)
    finally:
        event.remove(pg_engine, "before_cursor_execute", cut_connection)
    assert len(cuts) == 1
    assert report.new_results == 10
    assert count(pg_engine, "SELECT count(*) FROM results") == 10
    assert count(pg_engine, "SELECT count(*) FROM tags") == sum(len(r.attributes) for r in results)


def test_an_unreachable_database_is_retryable_with_one_line(taxonomy: Taxonomy) -> None:
    engine = make_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    with pytest.raises(RetryableError) as caught:
        ResultWriter(engine, taxonomy).write([make_result(make_fake_job(), taxonomy)])
    assert str(caught.value).startswith("database error while storing taxonomy labels: ")
    assert "\n" not in str(caught.value)


def test_a_constraint_violation_is_final(sqlite_engine: Engine, taxonomy: Taxonomy) -> None:
    # A result for a job the ledger never issued breaks the foreign key: final, not retryable.
    with pytest.raises(InputError, match="FOREIGN KEY constraint failed"):
        ResultWriter(sqlite_engine, taxonomy).write([make_result(make_fake_job(), taxonomy)])


def make_fake_job() -> Any:
    from schemas.results import JobSpec

    return JobSpec(job_id=424242, run_id=1, sku="GHOST", image_uri="file:///ghost.jpg")


def test_a_run_does_not_end_before_all_its_jobs_exist(engine: Engine, taxonomy: Taxonomy) -> None:
    from pipeline import ledger

    rows = [ledger.CatalogRow(sku=f"SEAL-{i}", image_uri=f"file:///{i}.jpg") for i in range(2)]
    with engine.begin() as conn:
        ledger.upsert_items(conn, rows)
        run_id = ledger.create_run(conn, "submit", {})
        (first,) = ledger.add_jobs(conn, run_id, [(rows[0].sku, rows[0].image_uri)])
    writer = ResultWriter(engine, taxonomy)
    writer.write([make_result(first, taxonomy)])  # finished while the submit still adds jobs

    def state() -> str:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT state FROM runs WHERE id = :r"), {"r": run_id}).scalar_one())

    assert state() == "running"
    with engine.begin() as conn:
        (second,) = ledger.add_jobs(conn, run_id, [(rows[1].sku, rows[1].image_uri)])
        ledger.seal_run(conn, run_id)
    assert state() == "running"
    writer.write([make_result(second, taxonomy)])
    assert state() == "done"
