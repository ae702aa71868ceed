"""Recording a person's decisions: validated, appended to the `reviews` log, visible at once in
the consumer views, announced with NOTIFY.

Every decision names the tags it was made on (their job id). If the sku's current tags come from
another job, the tags changed since the reviewer saw them and the decision is refused (code
`tags_changed`), never applied to tags nobody looked at. A bad decision is a per-item refusal
with a code; the others in the same call are still recorded.

The database checks again what it can (a value of the taxonomy, an image hash, append-only): the
checks here exist to name the problem in words and to refuse per item instead of per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.db import insert_for, review_decisions, review_tasks, reviews, tag_sets, tags, translated_errors
from pipeline.review.tasks import REBUILD_ITEMS
from pipeline.writer import notify_payloads
from schemas.taxonomy import CATEGORY, Taxonomy

NOT_VISIBLE = "not_visible"
Action = Literal["accept", "correct", "not_visible"]
RefusalCode = Literal["unknown_sku", "not_an_attribute", "invalid_value", "tags_changed", "no_image", "nothing_to_undo"]
_CHUNK = 500  # skus per lookup query (bound parameters)


@dataclass(frozen=True)
class Decision:
    """What a reviewer decided about one attribute of one sku, on the tags of job `job_id`."""

    sku: str
    attribute: str
    action: Action
    job_id: int
    value: str | None = None  # for `correct` (and blind audits): the value chosen
    reason: str | None = None  # default: the open task's reason, else 'manual'
    note: str | None = None


@dataclass(frozen=True)
class Refusal:
    index: int
    sku: str
    attribute: str
    code: RefusalCode
    message: str


@dataclass
class DecisionReport:
    recorded: int = 0
    review_ids: list[int] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


@dataclass(frozen=True)
class ShownTag:
    """One current tag as the database holds it, with the decision in force for its image."""

    sku: str
    attribute: str
    job_id: int
    image_sha256: str | None
    category: str | None
    taxonomy_version: str
    model_value: str
    decided_value: str | None
    task_reason: str | None
    task_blind: bool

    @property
    def value_in_force(self) -> str:
        return self.decided_value if self.decided_value is not None else self.model_value


def current_tags(conn: Connection, skus: Iterable[str]) -> dict[tuple[str, str], ShownTag]:
    """The current tags of skus keyed by (sku, attribute)."""
    found: dict[tuple[str, str], ShownTag] = {}
    wanted = sorted(set(skus))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        query = (
            sa.select(
                tags.c.sku,
                tags.c.attribute,
                tag_sets.c.job_id,
                tag_sets.c.image_sha256,
                tag_sets.c.category,
                tags.c.taxonomy_version,
                tags.c.value,
                review_decisions.c.value.label("decided"),
                review_tasks.c.reason,
                review_tasks.c.blind,
            )
            .join(tag_sets, tag_sets.c.sku == tags.c.sku)
            .outerjoin(
                review_decisions,
                sa.and_(
                    review_decisions.c.sku == tags.c.sku,
                    review_decisions.c.attribute == tags.c.attribute,
                    review_decisions.c.image_sha256 == tag_sets.c.image_sha256,
                ),
            )
            .outerjoin(
                review_tasks,
                sa.and_(review_tasks.c.sku == tags.c.sku, review_tasks.c.attribute == tags.c.attribute),
            )
            .where(tags.c.sku.in_(chunk))
        )
        for row in conn.execute(query):
            found[(row.sku, row.attribute)] = ShownTag(
                sku=row.sku, attribute=row.attribute, job_id=row.job_id, image_sha256=row.image_sha256,
                category=row.category, taxonomy_version=row.taxonomy_version, model_value=row.value,
                decided_value=row.decided, task_reason=row.reason, task_blind=bool(row.blind),
            )  # fmt: skip
    return found


def allowed_values(taxonomy: Taxonomy, category: str | None, attribute: str) -> frozenset[str] | None:
    """The values attribute may take for an item of category; None when the taxonomy cannot say."""
    if attribute == CATEGORY:
        return taxonomy.category_attribute.value_ids
    if category is None or category not in taxonomy.categories:
        return None
    for candidate in taxonomy.attributes_for(category):
        if candidate.name == attribute:
            return candidate.value_ids
    return None


class DecisionRecorder:
    """Validates and records decisions for one database and taxonomy. Thread-safe."""

    def __init__(self, engine: Engine, taxonomy: Taxonomy, notify_channel: str | None = None) -> None:
        self.engine = engine
        self.taxonomy = taxonomy
        self.notify_channel = notify_channel if engine.dialect.name == "postgresql" else None

    def record(self, decisions: Sequence[Decision], reviewer: str, now: datetime | None = None) -> DecisionReport:
        """Record the valid decisions in one transaction; refuse the others, each with a code."""
        now = now or datetime.now(UTC)
        report = DecisionReport()
        if not reviewer.strip():
            raise ValueError("a decision needs a reviewer")
        with translated_errors("recording review decisions"), self.engine.begin() as conn:
            shown = current_tags(conn, (d.sku for d in decisions))
            rows = []
            for index, decision in enumerate(decisions):
                tag = shown.get((decision.sku, decision.attribute))
                refusal = self._refusal(index, decision, tag, shown)
                if refusal is not None:
                    report.refused.append(refusal)
                    continue
                assert tag is not None
                rows.append(_log_row(decision, tag, reviewer, now))
            if rows:
                report.review_ids = _insert_log(conn, rows)
                report.recorded = len(rows)
                self._notify(conn, sorted({row["sku"] for row in rows}))
        return report

    def undo_last(self, reviewer: str, now: datetime | None = None) -> DecisionReport:
        """Undo `reviewer`'s newest decision not yet undone: the value in force before it returns
        (the model's, or an earlier decision's) and the attribute goes back into the queue."""
        now = now or datetime.now(UTC)
        report = DecisionReport()
        with translated_errors("undoing a review decision"), self.engine.begin() as conn:
            last = _last_undoable(conn, reviewer)
            if last is None:
                report.refused.append(Refusal(0, "", "", "nothing_to_undo", f"{reviewer} has no decision to undo"))
                return report
            earlier = _value_before(conn, last)
            row = {
                "sku": last.sku, "attribute": last.attribute, "action": "undo", "value": earlier,
                "value_before": last.value, "image_sha256": last.image_sha256, "job_id": last.job_id,
                "taxonomy_version": last.taxonomy_version, "reason": last.reason, "reviewer": reviewer,
                "blind": last.blind, "undoes": last.id, "note": None, "reviewed_at": now,
            }  # fmt: skip
            report.review_ids = _insert_log(conn, [row])
            report.recorded = 1
            if earlier is None:
                _reopen_task(conn, last, now)
            self._notify(conn, [last.sku])
        return report

    def _refusal(
        self, index: int, decision: Decision, tag: ShownTag | None, shown: Mapping[tuple[str, str], ShownTag]
    ) -> Refusal | None:
        def refuse(code: RefusalCode, message: str) -> Refusal:
            return Refusal(index, decision.sku, decision.attribute, code, message)

        if tag is None:
            if not any(sku == decision.sku for sku, _ in shown):
                return refuse("unknown_sku", f"sku {decision.sku!r} has no current tags")
            return refuse("not_an_attribute", f"sku {decision.sku!r} has no attribute {decision.attribute!r}")
        if tag.job_id != decision.job_id:
            return refuse(
                "tags_changed",
                f"the tags of sku {decision.sku!r} changed since they were shown (job {decision.job_id} -> "
                f"{tag.job_id}); reload the item and decide again",
            )
        if not tag.image_sha256:
            return refuse("no_image", f"sku {decision.sku!r} has no image hash: a review must name the image it saw")
        return self._value_refusal(decision, tag, refuse)

    def _value_refusal(
        self, decision: Decision, tag: ShownTag, refuse: Callable[[RefusalCode, str], Refusal]
    ) -> Refusal | None:
        if decision.action == "not_visible":
            if decision.attribute == CATEGORY:
                return refuse("invalid_value", "the category cannot be 'not visible'")
            return None
        if decision.action == "accept" and decision.value is None:
            return None
        allowed = (
            allowed_values(self.taxonomy, tag.category, decision.attribute)
            if tag.taxonomy_version == self.taxonomy.version
            else None  # another taxonomy version: the database's check decides
        )
        if decision.value is None:
            return refuse("invalid_value", f"a correction of {decision.attribute!r} needs a value")
        if allowed is not None and decision.value not in allowed:
            return refuse(
                "invalid_value",
                f"{decision.value!r} is not an allowed value of {decision.attribute!r} for category {tag.category!r}",
            )
        return None

    def _notify(self, conn: Connection, skus: list[str]) -> None:
        if not self.notify_channel or not skus:
            return
        for payload in notify_payloads(skus):
            conn.execute(sa.select(sa.func.pg_notify(self.notify_channel, payload)))


def _log_row(decision: Decision, tag: ShownTag, reviewer: str, now: datetime) -> dict[str, Any]:
    value: str | None
    if decision.action == "not_visible":
        value, action = NOT_VISIBLE, "not_visible"
    elif decision.value is None or decision.action == "accept":
        value = decision.value if decision.value is not None else tag.model_value
        action = "accept" if value == tag.model_value else "correct"
    else:
        value = decision.value
        action = "accept" if value == tag.model_value else "correct"
    return {
        "sku": decision.sku, "attribute": decision.attribute, "action": action, "value": value,
        "value_before": tag.value_in_force, "image_sha256": tag.image_sha256, "job_id": tag.job_id,
        "taxonomy_version": tag.taxonomy_version, "reason": decision.reason or tag.task_reason or "manual",
        "reviewer": reviewer, "blind": tag.task_blind, "undoes": None, "note": decision.note, "reviewed_at": now,
    }  # fmt: skip


def _insert_log(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    # One multi-row INSERT per page of rows: the Postgres triggers run once per statement.
    ids: list[int] = []
    for start in range(0, len(rows), 1000):
        page = rows[start : start + 1000]
        ids += [row[0] for row in conn.execute(reviews.insert().values(page).returning(reviews.c.id))]
    return ids


def _last_undoable(conn: Connection, reviewer: str) -> Any:
    undone = sa.select(reviews.c.undoes).where(reviews.c.undoes.is_not(None)).scalar_subquery()
    query = (
        sa.select(reviews)
        .where(reviews.c.reviewer == reviewer, reviews.c.action != "undo", reviews.c.id.not_in(undone))
        .order_by(reviews.c.id.desc())
        .limit(1)
    )
    return conn.execute(query).first()


def _value_before(conn: Connection, last: Any) -> str | None:
    """The decision in force for the same image before `last`, or None (the model's value)."""
    earlier = conn.execute(
        sa.select(reviews.c.value)
        .where(
            reviews.c.sku == last.sku,
            reviews.c.attribute == last.attribute,
            reviews.c.image_sha256 == last.image_sha256,
            reviews.c.id < last.id,
        )
        .order_by(reviews.c.id.desc())
        .limit(1)
    ).first()
    return None if earlier is None else earlier.value


def _reopen_task(conn: Connection, last: Any, now: datetime) -> None:
    """Put the attribute back in the queue, if the tags are still those the decision was made on."""
    current = conn.execute(
        sa.select(tag_sets.c.job_id, tag_sets.c.image_sha256, tags.c.confidence)
        .join(tags, tags.c.sku == tag_sets.c.sku)
        .where(tag_sets.c.sku == last.sku, tags.c.attribute == last.attribute)
    ).first()
    if current is None or current.image_sha256 != last.image_sha256 or last.reason in ("import", "manual", "legacy"):
        return
    conn.execute(
        insert_for(conn)(review_tasks)
        .on_conflict_do_nothing()
        .values(
            sku=last.sku,
            attribute=last.attribute,
            reason=last.reason,
            confidence=current.confidence,
            job_id=current.job_id,
            image_sha256=current.image_sha256,
            blind=last.blind,
            created_at=now,
        )
    )
    conn.execute(sa.text("DELETE FROM review_items WHERE sku = :sku"), {"sku": last.sku})
    conn.execute(sa.text(REBUILD_ITEMS.format(won="(SELECT :sku AS sku) AS one")), {"sku": last.sku})
