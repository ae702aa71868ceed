"""Review routing: which attributes a person should check, decided from the model's confidences
and the thresholds in force.

Routing is computed, never cached. The model's output (values, confidences, runner-ups) is what
the result cache reuses; status and review_attributes are derived again by the writer for every
result it writes, fresh or cached, so a changed SKUTAG_CONFIDENCE_THRESHOLD (or per-attribute
threshold) applies to the very next write, whether or not the image was re-inferred.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.settings import Settings
from schemas.results import AttributeTag, Status, TagResult


@dataclass(frozen=True)
class Thresholds:
    """The confidence below which an attribute goes to human review (per attribute, or the default)."""

    default: float = 0.5
    per_attribute: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(settings.confidence_threshold, dict(settings.attribute_thresholds))

    def for_attribute(self, name: str) -> float:
        return self.per_attribute.get(name, self.default)


def review_attributes(attributes: Mapping[str, AttributeTag], thresholds: Thresholds) -> list[str]:
    return [name for name, tag in attributes.items() if tag.confidence < thresholds.for_attribute(name)]


def routed(result: TagResult, thresholds: Thresholds) -> TagResult:
    """The result with status and review_attributes derived from thresholds (a failed result as is)."""
    if result.status == "failed":
        return result
    review = review_attributes(result.attributes, thresholds)
    status: Status = "needs_review" if review else "tagged"
    if status == result.status and review == result.review_attributes:
        return result
    return result.model_copy(update={"status": status, "review_attributes": review})
