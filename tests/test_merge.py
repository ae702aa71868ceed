"""Merging a SKU's images: the documented rule (most confident, preferred views per attribute),
conflicts between confident images, and the taxonomy's view preferences."""

from __future__ import annotations

import pytest

from pipeline.merge import ImageTags, TagMerger
from schemas.results import AttributeTag
from schemas.taxonomy import Taxonomy, TaxonomyError, default_taxonomy, parse_taxonomy


def image(position: int, view: str | None, **tags: tuple[str, float]) -> ImageTags:
    attributes = {name: AttributeTag(value=value, confidence=confidence) for name, (value, confidence) in tags.items()}
    return ImageTags(image_uri=f"img-{position}.jpg", view=view, position=position, job_id=100 + position,
                     image_sha256=f"{position:064x}", attributes=attributes, summary=f"summary {position}")  # fmt: skip


@pytest.fixture(scope="module")
def merger() -> TagMerger:
    return TagMerger(default_taxonomy())


def test_the_most_confident_image_wins_each_attribute(merger: TagMerger) -> None:
    merged = merger.merge([
        image(0, None, category=("dress", 0.9), primary_color=("red", 0.7), pattern=("solid", 0.6)),
        image(1, None, category=("dress", 0.8), primary_color=("red", 0.95), pattern=("floral", 0.9)),
    ])  # fmt: skip
    assert merged is not None
    assert (merged.category, merged.lead.position) == ("dress", 0)
    assert merged.tags["primary_color"].confidence == 0.95
    assert (merged.tags["pattern"].value, merged.attributes["pattern"].source.position) == ("floral", 1)
    assert merged.conflicts == []


def test_preferred_views_decide_their_attributes(merger: TagMerger) -> None:
    # The back photo is surer about the neckline, but the taxonomy prefers the front for it.
    merged = merger.merge([
        image(0, "front", category=("dress", 0.9), neckline=("v_neck", 0.7)),
        image(1, "back", category=("dress", 0.9), neckline=("round_neck", 0.99)),
    ])  # fmt: skip
    assert merged is not None
    neckline = merged.attributes["neckline"]
    assert (neckline.tag.value, neckline.source.view, neckline.conflict) == ("v_neck", "front", False)
    assert [source.role for source in neckline.sources] == ["chosen", "not_preferred"]


def test_confident_images_that_disagree_are_a_conflict(merger: TagMerger) -> None:
    merged = merger.merge([
        image(0, "front", category=("dress", 0.9), primary_color=("red", 0.92)),
        image(1, "flat", category=("dress", 0.9), primary_color=("blue", 0.85)),
        image(2, "detail", category=("dress", 0.9), primary_color=("blue", 0.4)),
    ])  # fmt: skip
    assert merged is not None
    assert merged.conflicts == ["primary_color"] and "primary_color" in merged.review_attributes
    color = merged.attributes["primary_color"]
    assert color.tag.value == "red"
    assert [(source.image.position, source.role) for source in color.sources] == [
        (0, "chosen"), (1, "conflict"), (2, "not_preferred"),
    ]  # fmt: skip


def test_an_unsure_disagreement_is_no_conflict(merger: TagMerger) -> None:
    merged = merger.merge([
        image(0, None, category=("dress", 0.9), pattern=("floral", 0.9)),
        image(1, None, category=("dress", 0.9), pattern=("solid", 0.6)),
    ])  # fmt: skip
    assert merged is not None and merged.conflicts == []
    assert merged.attributes["pattern"].sources[1].role == "outranked"


def test_attributes_follow_the_merged_category(merger: TagMerger) -> None:
    # A detail shot read as 'other' still gives its color; its category loses to the front's.
    merged = merger.merge([
        image(0, "detail", category=("other", 0.95), primary_color=("green", 0.99)),
        image(1, "front", category=("trousers", 0.8), primary_color=("green", 0.7), leg_shape=("wide_leg", 0.9)),
    ])  # fmt: skip
    assert merged is not None
    assert (merged.category, merged.lead.view, merged.lead.summary) == ("trousers", "front", "summary 1")
    assert merged.tags["primary_color"].confidence == 0.7  # the taxonomy prefers a front view for color
    assert set(merged.tags) >= {"category", "primary_color", "leg_shape"}


def test_a_sku_whose_images_all_failed_has_no_merge(merger: TagMerger) -> None:
    assert merger.merge([image(0, "front")]) is None


def test_view_preferences_are_validated_and_do_not_change_the_version(taxonomy: Taxonomy) -> None:
    from importlib import resources

    import yaml

    document = yaml.safe_load(resources.files("schemas").joinpath("taxonomy.yaml").read_text(encoding="utf-8"))
    document["views"] = {"prefer": {"pattern": ["back"]}}
    assert parse_taxonomy(document, "edited").version == taxonomy.version
    document["views"] = {"prefer": {"no_such_attribute": ["front"]}}
    with pytest.raises(TaxonomyError, match=r"views\.prefer\.no_such_attribute"):
        parse_taxonomy(document, "edited")
