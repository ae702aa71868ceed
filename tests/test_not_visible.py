"""`not_visible`: the taxonomy option (on by default for per-category attributes), stored as such,
counted apart in the consumer views on both databases, and never a listing contradiction."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Engine

from pipeline.listing import ListingChecker
from pipeline.writer import ResultWriter
from schemas.results import AttributeTag
from schemas.taxonomy import NOT_VISIBLE, Taxonomy, TaxonomyError, parse_taxonomy
from tests.conftest import make_jobs, make_result


def default_document() -> Any:
    from importlib import resources

    return yaml.safe_load(resources.files("schemas").joinpath("taxonomy.yaml").read_text(encoding="utf-8"))


def value_ids(taxonomy: Taxonomy, name: str) -> list[str]:
    return [value.id for value in taxonomy.attributes[name].values]


def test_per_category_attributes_offer_not_visible_by_default(taxonomy: Taxonomy) -> None:
    for name in ("neckline", "sleeve_length", "heel_height"):
        assert value_ids(taxonomy, name)[-1] == NOT_VISIBLE
    for attribute in taxonomy.global_attributes:
        assert NOT_VISIBLE not in value_ids(taxonomy, attribute.name)
    assert NOT_VISIBLE not in value_ids(taxonomy, "shoe_type")  # turned off in the file
    for category in taxonomy.categories.values():  # narrowed subsets keep it
        for attribute in category.attributes:
            assert (NOT_VISIBLE in attribute.value_ids) == (NOT_VISIBLE in value_ids(taxonomy, attribute.name))
    labels = {row[1:4] for row in taxonomy.value_rows() if row[0] == "neckline"}
    assert (NOT_VISIBLE, "not visible", "看不出") in labels


def test_the_option_is_per_attribute_and_changes_the_version(taxonomy: Taxonomy) -> None:
    document = default_document()
    document["attributes"]["neckline"]["not_visible"] = False
    document["attributes"]["pattern"]["not_visible"] = True
    changed = parse_taxonomy(document, source="test")
    assert NOT_VISIBLE not in value_ids(changed, "neckline")
    assert value_ids(changed, "pattern")[-1] == NOT_VISIBLE
    assert changed.version != taxonomy.version


def test_a_value_of_its_own_named_not_visible_is_refused() -> None:
    document = copy.deepcopy(default_document())
    document["attributes"]["fit"]["values"].append({"id": NOT_VISIBLE, "en": "hidden", "zh": "隐藏"})
    with pytest.raises(TaxonomyError, match="'not_visible' is reserved"):
        parse_taxonomy(document, source="test")
    document = copy.deepcopy(default_document())
    document["attributes"]["fit"]["values"].append({"id": "hidden", "en": "not visible", "zh": "隐藏"})
    with pytest.raises(TaxonomyError, match="duplicate en 'not visible'"):
        parse_taxonomy(document, source="test")


def visible_value(taxonomy: Taxonomy, name: str, value: str) -> str:
    return value if value != NOT_VISIBLE else taxonomy.attributes[name].values[0].id


def test_not_visible_round_trips_to_the_views(engine: Engine, taxonomy: Taxonomy) -> None:
    (job,) = make_jobs(engine, 1)
    result = make_result(job, taxonomy, category="dress")
    attributes = {name: tag.model_copy(update={"value": visible_value(taxonomy, name, tag.value)})
                  for name, tag in result.attributes.items()}  # fmt: skip
    attributes["neckline"] = AttributeTag(value=NOT_VISIBLE, confidence=0.83, runner_up="v_neck",
                                          runner_up_confidence=0.1)  # fmt: skip
    result = result.model_copy(update={"attributes": attributes})
    report = ResultWriter(engine, taxonomy).write([result])
    assert report.results == 1, report
    with engine.connect() as conn:
        rows = {r.attribute: r for r in conn.execute(sa.text("SELECT * FROM sku_tags_current WHERE sku = :s"),
                                                     {"s": result.sku})}  # fmt: skip
        document = conn.execute(
            sa.text("SELECT tags FROM sku_tags_json WHERE sku = :s"), {"s": result.sku}
        ).scalar_one()
    tags = document if isinstance(document, dict) else json.loads(document)
    assert (rows["neckline"].value, bool(rows["neckline"].visible), rows["neckline"].label_en) == (
        NOT_VISIBLE, False, "not visible")  # fmt: skip
    assert all(bool(row.visible) for name, row in rows.items() if name != "neckline")
    assert tags["not_visible"] == ["neckline"]
    assert "neckline" not in tags["attributes"] and set(tags["attributes"]) == set(rows) - {"neckline"}


def test_not_visible_contradicts_no_listing(taxonomy: Taxonomy) -> None:
    checker = ListingChecker(taxonomy)
    tag = AttributeTag(value=NOT_VISIBLE, confidence=0.99)
    dress = AttributeTag(value="dress", confidence=0.99)
    issues = checker.check({"title": "V-neck dress"}, {"category": dress, "neckline": tag})
    assert [issue.attribute for issue in issues] == []
    seen = AttributeTag(value="round_neck", confidence=0.99)  # the control: a visible other value is flagged
    issues = checker.check({"title": "V-neck dress"}, {"category": dress, "neckline": seen})
    assert [issue.attribute for issue in issues] == ["neckline"]
