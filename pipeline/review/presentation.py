"""What the review pages show, computed from the taxonomy: labels in both languages, the rows of
an item's attribute table (with the choices the number keys pick from), the queue filter parsed
from a request's parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.review import queue
from pipeline.review.decisions import NOT_VISIBLE, allowed_values
from schemas.taxonomy import CATEGORY, Taxonomy


def label(taxonomy: Taxonomy, attribute: str, value: str | None, language: str = "en") -> str:
    if value is None:
        return ""
    if value == NOT_VISIBLE:
        return "not visible" if language == "en" else "看不见"
    source = taxonomy.category_attribute if attribute == CATEGORY else taxonomy.attributes.get(attribute)
    if source is not None:
        for candidate in source.values:
            if candidate.id == value:
                return candidate.en if language == "en" else candidate.zh
    return value


def attribute_label(taxonomy: Taxonomy, attribute: str) -> tuple[str, str]:
    if attribute == CATEGORY:
        return taxonomy.category_attribute.en, taxonomy.category_attribute.zh
    found = taxonomy.attributes.get(attribute)
    return (found.en, found.zh) if found else (attribute, attribute)


def parse_filter(params: Any) -> queue.QueueFilter:
    def number(name: str, kind: Callable[[str], Any]) -> Any:
        raw = params.get(name)
        if raw in (None, ""):
            return None
        try:
            return kind(raw)
        except ValueError:
            return None

    def text(name: str) -> str | None:
        raw = params.get(name)
        return str(raw)[:200] if raw else None

    return queue.QueueFilter(
        run_id=number("run", int),
        category=text("category"),
        attribute=text("attribute"),
        reason=text("reason"),
        min_confidence=number("min", float),
        max_confidence=number("max", float),
    )


def _choice(taxonomy: Taxonomy, attribute: str, value: str) -> dict[str, str]:
    return {"id": value, "en": label(taxonomy, attribute, value), "zh": label(taxonomy, attribute, value, "zh")}


def attribute_rows(taxonomy: Taxonomy, item: queue.ItemView) -> list[dict[str, Any]]:
    """Every attribute of item as the page shows it: labels, confidence, choices for the number keys.
    A blind audit task hides the model's answer (value, confidence, runner-up)."""
    rows = []
    order = {name: index for index, name in enumerate([CATEGORY, *taxonomy.attributes])}
    for attribute in sorted(item.attributes, key=lambda a: (order.get(a.name, 999), a.name)):
        allowed = allowed_values(taxonomy, item.category, attribute.name) or frozenset({attribute.value})
        source = taxonomy.category_attribute if attribute.name == CATEGORY else taxonomy.attributes.get(attribute.name)
        ordered = [v.id for v in source.values if v.id in allowed] if source else sorted(allowed)
        blind = attribute.blind and attribute.decided_value is None
        en, zh = attribute_label(taxonomy, attribute.name)
        rows.append(
            {
                "name": attribute.name, "label_en": en, "label_zh": zh, "open": attribute.task_reason is not None,
                "reason": attribute.task_reason, "blind": blind,
                "value": None if blind else attribute.value,
                "value_en": None if blind else label(taxonomy, attribute.name, attribute.value),
                "value_zh": None if blind else label(taxonomy, attribute.name, attribute.value, "zh"),
                "confidence": None if blind else round(attribute.confidence, 4),
                "runner_up": None if blind else attribute.runner_up,
                "runner_up_en": None if blind else label(taxonomy, attribute.name, attribute.runner_up),
                "runner_up_confidence": None if blind or attribute.runner_up_confidence is None
                else round(attribute.runner_up_confidence, 4),
                "decided": attribute.decided_value, "decided_by": attribute.decided_by,
                "decided_en": label(taxonomy, attribute.name, attribute.decided_value),
                "choices": [_choice(taxonomy, attribute.name, value) for value in ordered],
            }
        )  # fmt: skip
    return rows
