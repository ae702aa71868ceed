"""Label Studio interop, for teams that already review there.

Export: one Label Studio task per sku (Basic Label Studio JSON: `data` with the image URL and the
sku, job and image hash; `predictions`). Each attribute is its own prediction with its own score:
Label Studio sorts and filters tasks by a prediction's one score, so a score per attribute is how
a reviewer there gets to "every low-confidence pattern". Values are skutag's value ids (the
labeling config shows the English and Chinese labels as hints); blind audit attributes carry no
prediction. `label_config` writes the matching <View>.

Import: Label Studio's JSON export. The newest submitted (not cancelled) annotation of each task
becomes decisions through the same validation as the app (reason `import`, reviewer
`label-studio:<annotator>`): a value outside the taxonomy or tags that changed since the export
(the task's job_id) are refused per item, with a code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.db import items, review_items, review_tasks, tag_sets, tags, translated_errors
from pipeline.errors import InputError
from pipeline.review.decisions import NOT_VISIBLE, Decision, DecisionRecorder, Refusal
from schemas.taxonomy import CATEGORY, Taxonomy

TO_NAME = "image"


def _image_url(image_uri: str, sku: str, base_url: str | None) -> str:
    """What Label Studio loads: http(s) and cloud URIs as they are; anything else through the review
    app (base_url/image?sku=...), which serves known skus' images through the intake."""
    if image_uri.split("://", 1)[0] in {"http", "https", "s3", "gs", "azure-blob"} or base_url is None:
        return image_uri
    return f"{base_url.rstrip('/')}/image?sku={quote(sku, safe='')}"


def export_tasks(engine: Engine, queued_only: bool = True, run_id: int | None = None,
                 image_base_url: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Tasks for the skus in the review queue (or, queued_only=False, every sku with tags)."""
    query = sa.select(tag_sets.c.sku, tag_sets.c.job_id, tag_sets.c.image_uri, tag_sets.c.image_sha256,
                      tag_sets.c.model_id, tag_sets.c.category, items.c.title)  # fmt: skip
    query = query.outerjoin(items, items.c.sku == tag_sets.c.sku).order_by(tag_sets.c.sku)
    if queued_only:
        query = query.join(review_items, review_items.c.sku == tag_sets.c.sku)
        if run_id is not None:
            query = query.where(review_items.c.run_id == run_id)
    tasks = []
    with translated_errors("exporting for Label Studio"), engine.connect() as conn:
        heads = list(conn.execute(query))
        attributes = _attributes(conn, [head.sku for head in heads])
        for head in heads:
            tasks.append(
                {
                    "data": {
                        TO_NAME: _image_url(head.image_uri or "", head.sku, image_base_url), "sku": head.sku,
                        "title": head.title, "category": head.category, "job_id": head.job_id,
                        "image_sha256": head.image_sha256,
                    },
                    "predictions": [
                        _prediction(head.model_id, name, value, confidence)
                        for name, value, confidence, blind in attributes.get(head.sku, [])
                        if not blind
                    ],
                }
            )  # fmt: skip
    return tasks


def _attributes(conn: Any, skus: list[str]) -> dict[str, list[tuple[str, str, float, bool]]]:
    found: dict[str, list[tuple[str, str, float, bool]]] = {}
    for start in range(0, len(skus), 500):
        chunk = skus[start : start + 500]
        query = (
            sa.select(tags.c.sku, tags.c.attribute, tags.c.value, tags.c.confidence, review_tasks.c.blind)
            .outerjoin(
                review_tasks, sa.and_(review_tasks.c.sku == tags.c.sku, review_tasks.c.attribute == tags.c.attribute)
            )
            .where(tags.c.sku.in_(chunk))
            .order_by(tags.c.sku, tags.c.attribute)
        )
        for row in conn.execute(query):
            found.setdefault(row.sku, []).append((row.attribute, row.value, row.confidence, bool(row.blind)))
    return found


def _prediction(model_id: str, attribute: str, value: str, confidence: float) -> dict[str, Any]:
    return {
        "model_version": f"{model_id}:{attribute}",
        "score": round(float(confidence), 6),
        "result": [
            {
                "id": attribute,
                "from_name": attribute,
                "to_name": TO_NAME,
                "type": "choices",
                "value": {"choices": [value]},
                "score": round(float(confidence), 6),
            }
        ],
    }


def label_config(taxonomy: Taxonomy) -> str:
    """The labeling config the exported tasks fit: the image and one single-choice per attribute."""
    blocks = [f'  <Image name="{TO_NAME}" value="$image"/>', '  <Header value="$sku: $title"/>']
    attributes = [taxonomy.category_attribute, *taxonomy.attributes.values()]
    for attribute in attributes:
        choices = [
            f"    <Choice value={quoteattr(v.id)} hint={quoteattr(f'{v.en} / {v.zh}')}/>" for v in attribute.values
        ]
        if attribute.name != CATEGORY:
            choices.append(f'    <Choice value="{NOT_VISIBLE}" hint="not visible / 看不见"/>')
        header = f"  <Header value={quoteattr(f'{attribute.en} / {attribute.zh}')}/>"
        blocks.append(header)
        blocks.append(f'  <Choices name="{attribute.name}" toName="{TO_NAME}" choice="single" showInline="true">')
        blocks += choices
        blocks.append("  </Choices>")
    return "<View>\n" + "\n".join(blocks) + "\n</View>\n"


# --- import ----------------------------------------------------------------------------------
@dataclass
class ImportReport:
    tasks: int = 0
    recorded: int = 0
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # tasks without a usable annotation, and why


def read_export(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a Label Studio JSON export ({exc})") from exc
    if not isinstance(document, list) or not all(isinstance(task, dict) for task in document):
        raise InputError(f"{path}: a Label Studio JSON export is a list of tasks")
    return document


def _annotator(annotation: dict[str, Any]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return f"label-studio:{who if who not in (None, '') else 'unknown'}"


def decisions_of(task: dict[str, Any]) -> tuple[str, list[Decision]] | str:
    """(annotator, decisions) of a task's newest submitted annotation, or why there is none."""
    data = task.get("data")
    if not isinstance(data, dict):
        data = {}
    sku, job_id = data.get("sku"), data.get("job_id")
    if not isinstance(sku, str) or not isinstance(job_id, int):
        return f"task {task.get('id')}: data.sku and data.job_id missing (not exported by skutag)"
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return f"{sku}: no submitted annotation"
    newest = max(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
    decisions = []
    for result in newest.get("result") or []:
        if not isinstance(result, dict) or result.get("type") != "choices":
            continue
        choices = (result.get("value") or {}).get("choices")
        if not isinstance(choices, list) or len(choices) != 1:
            continue
        value, attribute = str(choices[0]), str(result.get("from_name"))
        action = "not_visible" if value == NOT_VISIBLE else "correct"
        decisions.append(Decision(sku, attribute, action, job_id, value=value, reason="import"))  # type: ignore[arg-type]
    return _annotator(newest), decisions


def import_annotations(engine: Engine, taxonomy: Taxonomy, tasks: Iterable[dict[str, Any]],
                       notify_channel: str | None = None) -> ImportReport:  # fmt: skip
    recorder = DecisionRecorder(engine, taxonomy, notify_channel)
    report = ImportReport()
    for task in tasks:
        report.tasks += 1
        found = decisions_of(task)
        if isinstance(found, str):
            report.skipped.append(found)
            continue
        annotator, decisions = found
        outcome = recorder.record(decisions, annotator)
        report.recorded += outcome.recorded
        report.refused += outcome.refused
    return report
