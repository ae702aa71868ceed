"""Label Studio interop on Postgres and SQLite: the export is Label Studio's task format (data,
one prediction per attribute with its score, a labeling config that fits), and an export's
annotations come back as validated reviews."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from pipeline.cli import main
from pipeline.review import label_studio
from pipeline.review.sampling import sample_audit
from schemas.taxonomy import Taxonomy
from tests.test_review_decisions import tagged
from tests.test_review_eval import _tag


def _export(engine: Engine, tmp_path: Path, *extra: str) -> tuple[list[dict[str, Any]], Path]:
    url = engine.url.render_as_string(hide_password=False)
    out, config = tmp_path / "tasks.json", tmp_path / "config.xml"
    result = CliRunner().invoke(main, ["--database-url", url, "review", "export", "--format", "label-studio",
                                       "--output", str(out), "--label-config", str(config), *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), config


def test_export_is_label_studio_tasks_with_a_scored_prediction_per_attribute(
    engine: Engine, taxonomy: Taxonomy, tmp_path: Path
) -> None:
    results = tagged(engine, taxonomy, count=2)
    tasks, config = _export(engine, tmp_path, "--image-base-url", "http://127.0.0.1:8686")
    assert [t["data"]["sku"] for t in tasks] == [r.sku for r in results]
    task, result = tasks[0], results[0]
    assert task["data"]["image"] == f"http://127.0.0.1:8686/image?sku={result.sku}"
    assert task["data"]["job_id"] == result.job_id and task["data"]["image_sha256"] == result.image_sha256
    by_attribute = {p["result"][0]["from_name"]: p for p in task["predictions"]}
    assert set(by_attribute) == set(result.attributes)
    pattern = by_attribute["pattern"]
    assert pattern["score"] == 0.2 and pattern["model_version"] == "test/model:pattern"
    choice = {"choices": [result.attributes["pattern"].value]}
    assert pattern["result"][0] == {
        "id": "pattern", "from_name": "pattern", "to_name": "image", "type": "choices", "value": choice, "score": 0.2,
    }  # fmt: skip
    view = ET.fromstring(config.read_text())
    controls = {c.get("name"): [x.get("value") for x in c] for c in view.iter("Choices")}
    assert all(c.get("toName") == "image" for c in view.iter("Choices"))
    for name, prediction in by_attribute.items():  # every predicted value is a choice of its control
        assert prediction["result"][0]["value"]["choices"][0] in controls[name]
    assert "not_visible" in controls["pattern"] and "not_visible" not in controls["category"]


def test_blind_audit_attributes_are_exported_without_the_model_answer(engine: Engine, taxonomy: Taxonomy,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    _tag(engine, taxonomy, 1, confidence=0.9)  # confident: eligible for an audit
    with engine.begin() as conn:
        sample_audit(conn, 1, datetime.now(UTC), blind=True)
    tasks, _ = _export(engine, tmp_path)
    assert len(tasks) == 1 and tasks[0]["predictions"] == []


def _annotated(task: dict[str, Any], choices: dict[str, str], who: Any = 7, cancelled: bool = False) -> None:
    task.setdefault("annotations", []).append({
        "id": len(task.get("annotations", [])) + 1, "completed_by": who, "was_cancelled": cancelled,
        "updated_at": f"2026-12-04T08:0{len(task.get('annotations', []))}:00Z",
        "result": [{"from_name": a, "to_name": "image", "type": "choices", "value": {"choices": [v]}}
                   for a, v in choices.items()],
    })  # fmt: skip


def test_import_records_annotations_as_validated_reviews(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> None:
    results = tagged(engine, taxonomy, count=3)
    tasks, _ = _export(engine, tmp_path)
    _annotated(tasks[0], {"pattern": "plaid"}, who={"email": "li@example.com"})
    _annotated(tasks[0], {"pattern": "striped", "style": "casual"}, who={"email": "li@example.com"})  # newest wins
    _annotated(tasks[1], {"pattern": "not_a_pattern", "style": "not_visible"})
    _annotated(tasks[2], {"pattern": "floral"}, cancelled=True)
    tasks.append({"data": {"image": "x"}, "annotations": []})
    exported = tmp_path / "ls-export.json"
    exported.write_text(json.dumps(tasks))
    url = engine.url.render_as_string(hide_password=False)
    answer = CliRunner().invoke(main, ["--database-url", url, "review", "import", str(exported)])
    assert answer.exit_code == 2, answer.output
    assert "4 tasks: 3 decisions recorded, 1 refused, 2 tasks without a usable annotation" in answer.output
    assert f"refused {results[1].sku} pattern: invalid_value" in answer.output
    with engine.connect() as conn:
        log = conn.execute(sa.text("SELECT sku, attribute, value, reviewer, reason FROM reviews ORDER BY id")).all()
        status = dict(conn.execute(sa.text("SELECT sku, status FROM sku_tags_json")).all())
    assert [tuple(r) for r in log] == [
        (results[0].sku, "pattern", "striped", "label-studio:li@example.com", "import"),
        (results[0].sku, "style", "casual", "label-studio:li@example.com", "import"),
        (results[1].sku, "style", "not_visible", "label-studio:7", "import"),
    ]
    assert status[results[0].sku] == "tagged" and status[results[1].sku] == "needs_review"


def test_import_refuses_annotations_on_changed_tags(engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> None:
    (result,) = tagged(engine, taxonomy, count=1)
    tasks, _ = _export(engine, tmp_path)
    tasks[0]["data"]["job_id"] = (result.job_id or 0) + 100  # as if re-tagged after the export
    _annotated(tasks[0], {"pattern": "plaid"})
    report = label_studio.import_annotations(engine, taxonomy, tasks)
    assert report.recorded == 0 and [r.code for r in report.refused] == ["tags_changed"]


def test_a_file_that_is_not_an_export_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    answer = CliRunner().invoke(main, ["--database-url", f"sqlite:///{tmp_path}/x.db", "db", "upgrade"])
    assert answer.exit_code == 0
    answer = CliRunner().invoke(main, ["--database-url", f"sqlite:///{tmp_path}/x.db", "review", "import", str(bad)])
    assert answer.exit_code == 2
    assert answer.output.strip().splitlines() == [f"error: {bad}: a Label Studio JSON export is a list of tasks"]
