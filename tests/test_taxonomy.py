"""The packaged taxonomy, taxonomy_version, and the exact error for each kind of invalid file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from schemas.taxonomy import TaxonomyError, default_taxonomy, load_taxonomy

PACKAGED = Path(__file__).parents[1] / "schemas" / "taxonomy.yaml"


def packaged_document() -> dict[str, Any]:
    return yaml.safe_load(PACKAGED.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def write(tmp_path: Path, document: Any, name: str = "taxonomy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, allow_unicode=True) if name.endswith(".yaml") else json.dumps(document))
    return path


def test_packaged_taxonomy_covers_an_apparel_catalog() -> None:
    taxonomy = default_taxonomy()
    assert len(taxonomy.categories) >= 12
    assert {a.name for a in taxonomy.global_attributes} == {
        "primary_color",
        "secondary_color",
        "pattern",
        "style",
        "season",
    }
    for required in (
        "neckline",
        "sleeve_length",
        "hem_length",
        "waist_rise",
        "leg_shape",
        "closure",
        "heel_height",
        "shoe_type",
        "bag_type",
    ):
        assert required in taxonomy.attributes
    styles = {v.id: v for v in taxonomy.attributes["style"].values}
    assert styles["french_country"].zh == "法式田园"
    assert {"casual", "commute", "vintage", "sporty", "streetwear"} <= styles.keys()
    for attribute in taxonomy.attributes.values():
        for value in attribute.values:
            assert value.en and value.zh and value.synonyms, (attribute.name, value.id)


def test_category_specific_attributes_and_subsets() -> None:
    taxonomy = default_taxonomy()
    shoe = {a.name: a for a in taxonomy.attributes_for("shoes")}
    assert "neckline" not in shoe
    # The narrowed subset, plus not_visible (on by default for per-category attributes).
    assert shoe["closure"].value_ids == {"lace_up", "slip_on", "buckle", "hook_and_loop", "zipper", "not_visible"}
    assert {v.id for v in taxonomy.attributes["secondary_color"].values} == {"none"} | {
        v.id for v in taxonomy.attributes["primary_color"].values
    }


def test_version_ignores_formatting_but_not_content(tmp_path: Path) -> None:
    document = packaged_document()
    as_json = load_taxonomy(write(tmp_path, document, "t.json"))
    assert as_json.version == default_taxonomy().version
    document["attributes"]["season"]["values"][0]["zh"] = "春秋季"
    assert load_taxonomy(write(tmp_path, document)).version != default_taxonomy().version


def _broken(mutate: Any) -> dict[str, Any]:
    document = packaged_document()
    mutate(document)
    return document


INVALID = [
    (
        lambda d: d["categories"][4]["attributes"].append("necklin"),
        "categories[4].attributes[4]: unknown attribute 'necklin'",
    ),
    (
        lambda d: d["attributes"]["pattern"]["values"][1].update(id="solid"),
        "attributes.pattern.values[1].id: duplicate id 'solid'",
    ),
    (
        lambda d: d["attributes"]["pattern"]["values"][2].update(zh="纯色"),
        "attributes.pattern.values[2].zh: duplicate zh '纯色'",
    ),
    (lambda d: d["attributes"]["season"]["values"][0].pop("zh"), "attributes.season.values[0].zh: Field required"),
    (
        lambda d: d["attributes"]["fit"]["values"][0].update(id="Slim Fit"),
        "attributes.fit.values[0].id: String should match pattern",
    ),
    (lambda d: d.update(categories=[]), "categories: List should have at least 1 item"),
    (lambda d: d["global_attributes"].append("material"), "global_attributes[5]: unknown attribute 'material'"),
    (
        lambda d: d["categories"][0]["attributes"].append("style"),
        "categories[0].attributes[3]: 'style' is already a global attribute",
    ),
    (
        lambda d: d["categories"][10]["attributes"][2].update(closure=["velcro"]),
        "categories[10].attributes[2].closure: 'velcro' is not a value of 'closure'",
    ),
    (lambda d: d["attributes"].update(category=d["attributes"]["fit"]), "attributes.category: 'category' is reserved"),
    (lambda d: d["attributes"]["fit"].update(values=[]), "attributes.fit: has no values"),
    (lambda d: d["attributes"]["fit"].update(colour="red"), "attributes.fit.colour: Extra inputs are not permitted"),
    (lambda d: d["summary"].update(max_chars=0), "summary.max_chars: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(("mutate", "message"), INVALID)
def test_each_invalid_file_names_file_path_and_problem(tmp_path: Path, mutate: Any, message: str) -> None:
    path = write(tmp_path, _broken(mutate))
    with pytest.raises(TaxonomyError) as caught:
        load_taxonomy(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_unreadable_and_unparsable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TaxonomyError, match=r"nope.yaml: cannot read taxonomy file: No such file or directory"):
        load_taxonomy(missing)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nattributes: [unclosed\n")
    with pytest.raises(TaxonomyError, match=r"bad.yaml: line 3: invalid YAML: "):
        load_taxonomy(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"name": }')
    with pytest.raises(TaxonomyError, match=r"bad.json: line 1: invalid JSON: Expecting value"):
        load_taxonomy(bad_json)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    with pytest.raises(TaxonomyError, match=r"list.yaml: \(top level\): Input should be a valid dictionary"):
        load_taxonomy(not_a_mapping)


def test_cli_check_exits_2_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, _broken(lambda d: d["global_attributes"].append("material")))
    result = CliRunner().invoke(main, ["taxonomy", "check", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {path}: global_attributes[5]: unknown attribute 'material'"
    ok = CliRunner().invoke(main, ["taxonomy", "check"])
    assert ok.exit_code == 0
    assert f"taxonomy_version {default_taxonomy().version}" in ok.output
