"""Accuracy sampling and evaluation: metrics checked against answers computed by hand, then the
whole loop on Postgres and SQLite (sample -> audit decisions -> skutag eval -> thresholds stored
-> the writer routes by them), run comparison and the HTML report."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from pipeline import ledger
from pipeline.cli import main
from pipeline.review import metrics
from pipeline.review.decisions import Decision, DecisionRecorder
from pipeline.review.report import report_for_app
from pipeline.review.sampling import allocate, sample_audit
from pipeline.review.serve import make_review_app
from pipeline.settings import load_settings
from pipeline.writer import ResultWriter
from schemas.results import TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import make_result

S = metrics.Scored
# Six answers of one attribute, worked by hand in the comments of the tests below.
SIX = [S("a", 0.95, "a"), S("a", 0.85, "a"), S("b", 0.75, "a"), S("b", 0.65, "b"), S("a", 0.45, "b"),
       S("b", 0.15, "b")]  # fmt: skip


def test_accuracy_and_macro_f1_by_hand() -> None:
    assert metrics.accuracy(SIX) == pytest.approx(4 / 6)
    # a: TP 2, FP 1, FN 1 -> F1 4/6; b: TP 2, FP 1, FN 1 -> 4/6; mean 2/3
    assert metrics.macro_f1(SIX) == pytest.approx(2 / 3)
    assert metrics.macro_f1([S("a", 1, "a"), S("a", 1, "b")]) == pytest.approx((2 / 3 + 0) / 2)
    assert metrics.accuracy([]) is None


def test_coverage_and_precision_at_the_threshold_by_hand() -> None:
    # confidence >= 0.5 keeps the first four; three of them are right
    assert metrics.at_threshold(SIX, 0.5) == (pytest.approx(4 / 6), pytest.approx(3 / 4))
    assert metrics.at_threshold(SIX, 0.99) == (0.0, None)


def test_auroc_by_hand() -> None:
    # right {.95, .85, .65, .15} vs wrong {.75, .45}: 2 + 2 + 1 + 0 = 5 of 8 pairs ranked right
    assert metrics.auroc(SIX) == pytest.approx(5 / 8)
    assert metrics.auroc([S("a", 0.5, "a"), S("b", 0.5, "a")]) == pytest.approx(0.5)  # a tie counts half
    assert metrics.auroc([S("a", 0.9, "a")]) is None  # no wrong answer: undefined


def test_expected_calibration_error_by_hand() -> None:
    # one answer per bin: |acc - conf| = .05 + .15 + .75 + .35 + .45 + .85 = 2.6, over 6 answers
    assert metrics.expected_calibration_error(SIX) == pytest.approx(2.6 / 6)
    bins = metrics.calibration_bins([S("a", 1.0, "a"), S("a", 0.0, "b")])
    assert (bins[9].count, bins[0].count) == (1, 1)  # 1.0 belongs to the last bin
    assert metrics.expected_calibration_error([S("a", 1.0, "a")]) == 0.0


def test_confused_pairs_and_recommended_thresholds_by_hand() -> None:
    assert metrics.confused_pairs(SIX) == [("a", "b", 1), ("b", "a", 1)]
    # 0.95 -> 1/1, 0.85 -> 2/2, 0.75 -> 2/3: the lowest reaching 0.95 is 0.85, a third of the answers
    assert metrics.recommend_threshold(SIX, 0.95) == metrics.Recommendation(0.85, 1.0, pytest.approx(2 / 6))
    # 0.65 -> 3/4 reaches 0.7 (0.45 -> 3/5 does not)
    assert metrics.recommend_threshold(SIX, 0.7) == metrics.Recommendation(0.65, 0.75, pytest.approx(4 / 6))
    assert metrics.recommend_threshold([S("a", 0.9, "b")], 0.95).threshold is None


def test_allocation_is_proportional_with_one_from_each_stratum() -> None:
    assert allocate({"dress": 90, "skirt": 9, "bag": 1}, 10) == {"dress": 8, "skirt": 1, "bag": 1}
    assert allocate({"dress": 3, "skirt": 2}, 10) == {"dress": 3, "skirt": 2}
    assert sum(allocate({"a": 50, "b": 30, "c": 20}, 7).values()) == 7
    assert allocate({"a": 0, "b": 5}, 2) == {"b": 2}


# --- the loop on a database ------------------------------------------------------------------
def _tag(engine: Engine, taxonomy: Taxonomy, count: int, prefix: str = "E", run_of: list[str] | None = None,
         confidence: float = 0.9, seed: int = 0) -> list[TagResult]:  # fmt: skip
    skus = run_of or [f"{prefix}-{i:03d}" for i in range(count)]
    with engine.begin() as conn:
        ledger.upsert_items(conn, [ledger.CatalogRow(sku=s, image_uri=f"file:///x/{s}.jpg") for s in skus])
        run_id = ledger.create_run(conn, "submit", {})
        jobs = ledger.add_jobs(conn, run_id, [(s, f"file:///x/{s}.jpg") for s in skus])
        ledger.seal_run(conn, run_id)
    results = []
    for index, job in enumerate(jobs):
        result = make_result(job, taxonomy, seed=seed, category="dress" if index % 2 else "skirt",
                             produced_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seed))  # fmt: skip
        tags = {n: t.model_copy(update={"confidence": confidence}) for n, t in result.attributes.items()}
        results.append(result.model_copy(update={"attributes": tags, "image_sha256": f"{index:064x}"}))
    ResultWriter(engine, taxonomy).write(results)
    return results


def _other(taxonomy: Taxonomy, attribute: str, value: str) -> str:
    return next(v.id for v in taxonomy.attributes[attribute].values if v.id != value)


def test_sampling_queues_blind_audit_items_stratified(engine: Engine, taxonomy: Taxonomy) -> None:
    _tag(engine, taxonomy, 20)
    with engine.begin() as conn:
        report = sample_audit(conn, 6, datetime.now(UTC), stratify=True, blind=True, seed=1)
    assert (report.eligible, report.sampled, report.by_category) == (20, 6, {"dress": 3, "skirt": 3})
    with engine.connect() as conn:
        tasks = conn.execute(sa.text("SELECT sku, reason, blind FROM review_tasks")).all()
        items = conn.execute(sa.text("SELECT COUNT(*) FROM review_items")).scalar_one()
    assert {t.reason for t in tasks} == {"audit"} and all(t.blind for t in tasks)
    assert len({t.sku for t in tasks}) == 6 == items
    with engine.begin() as conn:  # an open audit is not drawn again
        assert sample_audit(conn, 100, datetime.now(UTC)).sampled == 14


def test_eval_on_audits_then_thresholds_from_data(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> None:
    results = _tag(engine, taxonomy, 8, confidence=0.9)
    with engine.begin() as conn:
        sample_audit(conn, 8, datetime.now(UTC), seed=3)
    # The reviewer confirms pattern on 6 items and corrects it on 2; everything else is right.
    recorder = DecisionRecorder(engine, taxonomy)
    decisions = []
    for index, result in enumerate(results):
        for name, tag in result.attributes.items():
            wrong = name == "pattern" and index < 2
            value = _other(taxonomy, name, tag.value) if wrong else tag.value
            decisions.append(Decision(result.sku, name, "correct", result.job_id or 0, value=value))
    assert not recorder.record(decisions, "auditor").refused

    url = str(engine.url.render_as_string(hide_password=False))
    runner = CliRunner()
    answer = runner.invoke(main, ["--database-url", url, "eval", "--format", "json"])
    assert answer.exit_code == 0, answer.output
    by_name = {row["attribute"]: row for row in json.loads(answer.output)}
    pattern = by_name["pattern"]
    assert (pattern["n"], pattern["accuracy"], pattern["coverage"], pattern["precision"]) == (8, 0.75, 1.0, 0.75)
    assert pattern["ece"] == pytest.approx(0.15)  # one bin: |0.75 - 0.9|
    assert pattern["auroc"] == 0.5  # every confidence is 0.9: it ranks nothing, chance
    assert by_name["style"]["accuracy"] == 1.0

    table = runner.invoke(main, ["--database-url", url, "eval", "--recommend-thresholds", "--target-precision",
                                 "0.95", "--write"])  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "none reaches the target" in table.output  # pattern: 0.75 at every threshold
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT attribute, threshold FROM review_thresholds")).all())
    assert stored["style"] == 0.9 and "pattern" not in stored
    assert ResultWriter(engine, taxonomy).thresholds_in_force.get().for_attribute("style") == 0.9

    html = runner.invoke(main, ["--database-url", url, "eval", "--format", "html", "--output-file",
                                str(tmp_path / "report.html")])  # fmt: skip
    assert html.exit_code == 0, html.output
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(by_name)

    # the same report, served by the review app at /report
    settings = load_settings(database_url=url, work_dir=tmp_path / "work")
    app = make_review_app(settings, engine, reviewer="auditor", report_html=report_for_app(settings, engine))
    with TestClient(app, base_url="http://127.0.0.1:8686") as client:
        served = client.get("/report")
    assert served.status_code == 200
    assert "reliability diagram of pattern" in served.text and "75.0%" in served.text


def test_eval_with_a_gold_csv_and_one_line_errors(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> None:
    (result,) = _tag(engine, taxonomy, 1)
    gold = tmp_path / "gold.csv"
    with gold.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "attribute", "value"])
        writer.writerow([result.sku, "pattern", result.attributes["pattern"].value])
        writer.writerow([result.sku, "style", _other(taxonomy, "style", result.attributes["style"].value)])
    url = str(engine.url.render_as_string(hide_password=False))
    answer = CliRunner().invoke(main, ["--database-url", url, "eval", "--gold", str(gold), "--format", "json"])
    assert answer.exit_code == 0, answer.output
    assert {r["attribute"]: r["accuracy"] for r in json.loads(answer.output)} == {"pattern": 1.0, "style": 0.0}
    gold.write_text("sku,value\nx,y\n")
    bad = CliRunner().invoke(main, ["--database-url", url, "eval", "--gold", str(gold)])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "must name sku, attribute, value" in bad.output
    empty = CliRunner().invoke(main, ["--database-url", url, "eval"])
    assert empty.exit_code == 2 and "no gold answer" in empty.output


def test_compare_two_runs_on_the_same_images(engine: Engine, taxonomy: Taxonomy) -> None:
    first = _tag(engine, taxonomy, 4, seed=1)
    _tag(engine, taxonomy, 4, run_of=[r.sku for r in first], seed=1)  # same images, same answers
    url = str(engine.url.render_as_string(hide_password=False))
    answer = CliRunner().invoke(main, ["--database-url", url, "eval", "--compare", "1", "2", "--format", "json"])
    assert answer.exit_code == 0, answer.output
    rows = json.loads(answer.output)
    assert {r["attribute"] for r in rows} >= {"category", "pattern"}
    assert all(r["agreement"] == 1.0 and r["n"] >= 2 for r in rows)
    none = CliRunner().invoke(main, ["--database-url", url, "eval", "--compare", "1", "99"])
    assert none.exit_code == 2 and "share no image" in none.output
