"""Merging the tags of a SKU's several images (front, back, detail, ...) into one set.

Each image is tagged on its own (the result cache still answers an identical image once). The
SKU's tags are then merged attribute by attribute, by one rule:

1. The candidates for an attribute are the images that answered it with a value the SKU's
   category allows. Where the taxonomy prefers views for the attribute (`views.prefer`, e.g.
   neckline: [front, model, detail]) and some candidate has one of them, only those candidates
   count: a back photo does not decide the neckline.
2. The most confident candidate wins; a tie goes to the more preferred view, then to the image
   listed first in the catalog.
3. The category is merged first, by the same rule; the other attributes are those of the merged
   category. The summary comes from the image whose category won.
4. When two counting candidates are both at least `conflict_confidence` sure and disagree, the
   attribute is a `conflict`: the winner still stands, and the attribute goes to review with
   both images. An attribute whose winning image was unsure goes to review as it would alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from schemas.results import AttributeTag
from schemas.taxonomy import CATEGORY, Taxonomy

DEFAULT_CONFLICT_CONFIDENCE = 0.8
Role = Literal["chosen", "agrees", "conflict", "outranked", "not_preferred"]


@dataclass(frozen=True)
class ImageTags:
    """One image's current tags, as the merge sees them."""

    image_uri: str
    view: str | None
    position: int  # order in the catalog: 0 is the SKU's first image
    job_id: int
    image_sha256: str | None
    attributes: Mapping[str, AttributeTag]
    summary: str | None = None
    review_attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """What one image said about one attribute, and what the merge made of it."""

    image: ImageTags
    value: str
    confidence: float
    role: Role


@dataclass(frozen=True)
class MergedAttribute:
    tag: AttributeTag
    source: ImageTags
    conflict: bool
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class MergedTags:
    category: str
    lead: ImageTags  # the image whose category won: the summary's source
    first: ImageTags  # the SKU's first tagged image: what the backfill's content check compares
    attributes: dict[str, MergedAttribute] = field(default_factory=dict)
    # One hash of every merged image's bytes: the SKU's image_sha256 in tags and tag_sets, which
    # review decisions are keyed on, so a decision on the merged tag ends when any image changes.
    evidence_sha256: str = ""

    @property
    def conflicts(self) -> list[str]:
        return [name for name, merged in self.attributes.items() if merged.conflict]

    @property
    def review_attributes(self) -> list[str]:
        """Conflicts, and attributes whose winning image routed them to review."""
        return [
            name
            for name, merged in self.attributes.items()
            if merged.conflict or name in merged.source.review_attributes
        ]

    @property
    def tags(self) -> dict[str, AttributeTag]:
        return {name: merged.tag for name, merged in self.attributes.items()}


class TagMerger:
    def __init__(self, taxonomy: Taxonomy, conflict_confidence: float = DEFAULT_CONFLICT_CONFIDENCE) -> None:
        self.taxonomy = taxonomy
        self.conflict_confidence = conflict_confidence

    def merge(self, images: Sequence[ImageTags]) -> MergedTags | None:
        """The SKU's merged tags; None when no image has a category (every image failed)."""
        tagged = [image for image in images if CATEGORY in image.attributes]
        if not tagged:
            return None
        category = self._merge_attribute(CATEGORY, tagged, self.taxonomy.category_attribute.value_ids)
        first = min(tagged, key=lambda image: image.position)
        merged = MergedTags(
            category.tag.value, lead=category.source, first=first, attributes={CATEGORY: category},
            evidence_sha256=evidence_sha256(tagged),
        )  # fmt: skip
        for attribute in self.taxonomy.attributes_for(merged.category):
            candidates = [image for image in tagged if attribute.name in image.attributes]
            if candidates:
                merged.attributes[attribute.name] = self._merge_attribute(
                    attribute.name, candidates, attribute.value_ids
                )
        return merged

    def _merge_attribute(self, name: str, images: Sequence[ImageTags], allowed: frozenset[str]) -> MergedAttribute:
        answered = [image for image in images if image.attributes[name].value in allowed]
        preferred_views = self.taxonomy.view_preferences.get(name, ())
        preferred = [image for image in answered if image.view in preferred_views]
        counting = preferred or answered or list(images)

        def rank(image: ImageTags) -> tuple[float, int, int]:
            view_rank = preferred_views.index(image.view) if image.view in preferred_views else len(preferred_views)
            return (-image.attributes[name].confidence, view_rank, image.position)

        winner = min(counting, key=rank)
        chosen = winner.attributes[name]
        sure = [image for image in counting if image.attributes[name].confidence >= self.conflict_confidence]
        conflict = chosen.confidence >= self.conflict_confidence and any(
            image.attributes[name].value != chosen.value for image in sure
        )
        sources = tuple(
            Source(
                image=image,
                value=image.attributes[name].value,
                confidence=image.attributes[name].confidence,
                role=_role(image, winner, counting, sure, chosen.value, conflict, name),
            )
            for image in sorted(images, key=lambda image: image.position)
        )
        return MergedAttribute(tag=chosen, source=winner, conflict=conflict, sources=sources)


def _role(
    image: ImageTags,
    winner: ImageTags,
    counting: Sequence[ImageTags],
    sure: Sequence[ImageTags],
    value: str,
    conflict: bool,
    name: str,
) -> Role:
    if image is winner:
        return "chosen"
    if image not in counting:
        return "not_preferred"
    if image.attributes[name].value == value:
        return "agrees"
    return "conflict" if conflict and image in sure else "outranked"


def evidence_sha256(images: Sequence[ImageTags]) -> str:
    """sha256 over the images' (position, uri, bytes hash), in position order: changes when any of
    them is replaced, added or dropped, and only then."""
    lines = "".join(f"{i.position}\t{i.image_uri}\t{i.image_sha256 or ''}\n" for i in sorted(images, key=_position))
    return hashlib.sha256(lines.encode()).hexdigest()


def _position(image: ImageTags) -> int:
    return image.position
