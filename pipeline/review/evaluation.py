"""`skutag eval`: how accurate the tags are, per attribute, against gold answers.

Gold comes from audit reviews (decisions recorded on audit-sample tasks, the image the reviewer
saw) or from a CSV file (sku, attribute, value). Predictions are a run's results (--run) or the
current model tags; a review never counts as a prediction. Thresholds in force are those the
writer routes by: SKUTAG_ATTRIBUTE_THRESHOLDS, then stored ones (`--write`), then
SKUTAG_CONFIDENCE_THRESHOLD.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.db import (
    insert_for,
    results,
    review_decisions,
    review_thresholds,
    reviews,
    tag_sets,
    tags,
    translated_errors,
)
from pipeline.errors import InputError
from pipeline.review import metrics
from pipeline.routing import Thresholds

Key = tuple[str, str]  # (sku, attribute)


@dataclass(frozen=True)
class Prediction:
    value: str
    confidence: float


@dataclass
class AttributeReport:
    attribute: str
    n: int
    accuracy: float | None
    macro_f1: float | None
    threshold: float
    coverage: float | None
    precision: float | None
    auroc: float | None
    ece: float | None
    confused: list[tuple[str, str, int]]
    bins: list[metrics.CalibrationBin] = field(default_factory=list)
    recommended: metrics.Recommendation | None = None


# --- gold ------------------------------------------------------------------------------------
def gold_from_audits(conn: Connection) -> dict[Key, str]:
    """The decision in force on every attribute that was audited, for the image it names."""
    query = (
        sa.select(review_decisions.c.sku, review_decisions.c.attribute, review_decisions.c.value)
        .join(reviews, reviews.c.id == review_decisions.c.review_id)
        .join(
            tag_sets,
            sa.and_(
                tag_sets.c.sku == review_decisions.c.sku, tag_sets.c.image_sha256 == review_decisions.c.image_sha256
            ),
        )
        .where(reviews.c.reason == "audit")
    )
    return {(row.sku, row.attribute): row.value for row in conn.execute(query)}


def gold_from_csv(path: Path) -> dict[Key, str]:
    """sku,attribute,value rows (a header line naming them is required); raises InputError."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"sku", "attribute", "value"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{path}: the header must name sku, attribute, value (missing {sorted(missing)})")
            gold: dict[Key, str] = {}
            for line, row in enumerate(reader, start=2):
                if not row["sku"] or not row["attribute"] or not row["value"]:
                    raise InputError(f"{path}: line {line}: sku, attribute and value must all be given")
                gold[(row["sku"], row["attribute"])] = row["value"]
    except OSError as exc:
        raise InputError(f"{path}: cannot read gold file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text") from exc
    return gold


# --- predictions -----------------------------------------------------------------------------
def predictions_of_run(conn: Connection, run_id: int) -> dict[Key, Prediction]:
    query = sa.select(results.c.sku, results.c.attributes).where(
        results.c.run_id == run_id, results.c.status != "failed"
    )
    found: dict[Key, Prediction] = {}
    for row in conn.execute(query):
        attributes = row.attributes if isinstance(row.attributes, dict) else json.loads(row.attributes)
        for name, tag in attributes.items():
            found[(row.sku, name)] = Prediction(str(tag["value"]), float(tag["confidence"]))
    return found


def current_predictions(conn: Connection, skus: Iterable[str] | None = None) -> dict[Key, Prediction]:
    query = sa.select(tags.c.sku, tags.c.attribute, tags.c.value, tags.c.confidence)
    found: dict[Key, Prediction] = {}
    if skus is None:
        return {(r.sku, r.attribute): Prediction(r.value, r.confidence) for r in conn.execute(query)}
    wanted = sorted(set(skus))
    for start in range(0, len(wanted), 500):
        chunk = query.where(tags.c.sku.in_(wanted[start : start + 500]))
        found.update({(r.sku, r.attribute): Prediction(r.value, r.confidence) for r in conn.execute(chunk)})
    return found


# --- thresholds in force ---------------------------------------------------------------------
def stored_thresholds(conn: Connection) -> dict[str, float]:
    return {row.attribute: row.threshold for row in conn.execute(sa.select(review_thresholds))}


def thresholds_in_force(conn: Connection, configured: Thresholds, explicit: Mapping[str, float]) -> Thresholds:
    """Explicit per-attribute settings win, then stored thresholds, then the default."""
    return Thresholds(configured.default, {**stored_thresholds(conn), **explicit})


def write_thresholds(engine: Engine, chosen: Mapping[str, metrics.Recommendation], target: float, n: Mapping[str, int],
                     set_by: str) -> int:  # fmt: skip
    rows = [
        {"attribute": name, "threshold": rec.threshold, "target_precision": target, "precision": rec.precision,
         "coverage": rec.coverage, "evidence_n": n[name], "set_by": set_by, "set_at": datetime.now(UTC)}
        for name, rec in chosen.items()
        if rec.threshold is not None
    ]  # fmt: skip
    if not rows:
        return 0
    with translated_errors("storing thresholds"), engine.begin() as conn:
        insert = insert_for(conn)(review_thresholds)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=["attribute"],
                set_={c: insert.excluded[c] for c in rows[0] if c != "attribute"},
            ),
            rows,
        )
    return len(rows)


# --- the report ------------------------------------------------------------------------------
def load_scored(engine: Engine, run_id: int | None, gold_file: Path | None, configured: Thresholds,
                explicit: Mapping[str, float]) -> tuple[dict[str, list[metrics.Scored]], Thresholds]:  # fmt: skip
    """Gold (audits, or the CSV) paired with predictions (run_id's results, or the current tags)
    per attribute, and the thresholds in force."""
    gold = gold_from_csv(gold_file) if gold_file else None
    with translated_errors("evaluating"), engine.connect() as conn:
        gold = gold if gold is not None else gold_from_audits(conn)
        if run_id is not None:
            predicted = predictions_of_run(conn, run_id)
        else:
            predicted = current_predictions(conn, {sku for sku, _ in gold})
        thresholds = thresholds_in_force(conn, configured, explicit)
    return pair_up(gold, predicted), thresholds


def pair_up(gold: Mapping[Key, str], predicted: Mapping[Key, Prediction]) -> dict[str, list[metrics.Scored]]:
    by_attribute: dict[str, list[metrics.Scored]] = defaultdict(list)
    for key in sorted(gold):
        prediction = predicted.get(key)
        if prediction is not None:
            by_attribute[key[1]].append(metrics.Scored(prediction.value, prediction.confidence, gold[key]))
    return dict(by_attribute)


def evaluate(paired: Mapping[str, list[metrics.Scored]], thresholds: Thresholds,
             target_precision: float | None = None) -> list[AttributeReport]:  # fmt: skip
    reports = []
    for name in sorted(paired):
        items = paired[name]
        threshold = thresholds.for_attribute(name)
        coverage, precision = metrics.at_threshold(items, threshold)
        reports.append(
            AttributeReport(
                attribute=name, n=len(items), accuracy=metrics.accuracy(items), macro_f1=metrics.macro_f1(items),
                threshold=threshold, coverage=coverage, precision=precision, auroc=metrics.auroc(items),
                ece=metrics.expected_calibration_error(items), confused=metrics.confused_pairs(items),
                bins=metrics.calibration_bins(items),
                recommended=metrics.recommend_threshold(items, target_precision) if target_precision else None,
            )
        )  # fmt: skip
    return reports


def as_json(reports: list[AttributeReport]) -> list[dict[str, Any]]:
    return [asdict(report) for report in reports]


# --- comparing two runs ----------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    attribute: str
    n: int
    agreement: float
    disagreements: list[tuple[str, str, int]]


def compare_runs(engine: Engine, run_a: int, run_b: int) -> list[Agreement]:
    """Per attribute, how often two runs gave the same value to the same image (same sku and
    image sha256): the gate before switching quantization or model."""
    with translated_errors("comparing runs"), engine.connect() as conn:
        a, b = _run_images(conn, run_a), _run_images(conn, run_b)
    per_attribute: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(set(a) & set(b)):
        for name, value in a[key].items():
            if name in b[key]:
                per_attribute[name].append((value, b[key][name]))
    out = []
    for name in sorted(per_attribute):
        pairs = per_attribute[name]
        scored = [metrics.Scored(vb, 1.0, va) for va, vb in pairs]
        out.append(Agreement(name, len(pairs), sum(va == vb for va, vb in pairs) / len(pairs),
                             metrics.confused_pairs(scored)))  # fmt: skip
    return out


def _run_images(conn: Connection, run_id: int) -> dict[tuple[str, str], dict[str, str]]:
    query = sa.select(results.c.sku, results.c.image_sha256, results.c.attributes).where(
        results.c.run_id == run_id, results.c.status != "failed", results.c.image_sha256.is_not(None)
    )
    found = {}
    for row in conn.execute(query):
        attributes = row.attributes if isinstance(row.attributes, dict) else json.loads(row.attributes)
        found[(row.sku, row.image_sha256)] = {name: str(tag["value"]) for name, tag in attributes.items()}
    return found
