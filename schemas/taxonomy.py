"""The taxonomy: which categories, attributes and values a tag may take, in English and Chinese.

A taxonomy file (YAML or JSON) is validated in two passes: its shape (pydantic), then its
cross-references (attributes a category names exist, labels are unique so a decoded label maps
back to one value). Either failure is a TaxonomyError naming the file, the path inside it and what
is wrong; nothing runs on an invalid file. taxonomy_version is a hash of the normalized content,
so reformatting the file or reordering its keys does not force a re-tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pipeline.errors import ConfigError

CATEGORY = "category"
SUMMARY = "summary"
RESERVED_NAMES = frozenset({CATEGORY, SUMMARY})
# The answer for a detail the photo does not show (a neckline under a coat, the heel of a shoe seen
# from above). VLMs guess badly here; an explicit value keeps a forced guess from reading as a tag.
NOT_VISIBLE = "not_visible"
NOT_VISIBLE_LABELS = {"en": "not visible", "zh": "看不出"}
Language = Literal["en", "zh"]

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class TaxonomyError(ConfigError):
    """An invalid taxonomy file: the message names the file, the path inside it and the problem."""


# --- the file's shape ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelSpec(_Strict):
    en: Text
    zh: Text


class ValueSpec(_Strict):
    id: Slug
    en: Text
    zh: Text
    synonyms: list[Text] = Field(default_factory=list)


class AttributeSpec(_Strict):
    label: LabelSpec
    values: list[ValueSpec] = Field(default_factory=list)
    values_from: Slug | None = None
    # Adds the value `not_visible`. Unset: on for per-category attributes (details a photo may hide),
    # off for global ones (every photo shows a color and a pattern).
    not_visible: bool | None = None


class CategorySpec(_Strict):
    id: Slug
    en: Text
    zh: Text
    synonyms: list[Text] = Field(default_factory=list)
    attributes: list[Slug | dict[Slug, list[Slug]]] = Field(default_factory=list)


class SummarySpec(_Strict):
    label: LabelSpec
    max_chars: int = Field(120, ge=1, le=2000)


class CategoryFieldSpec(_Strict):
    label: LabelSpec


class ViewsSpec(_Strict):
    """Which photo views (front, back, detail, ...) answer an attribute best, most preferred first:
    used when a SKU's images are merged, never shown to the model."""

    prefer: dict[Slug, list[Slug]] = Field(default_factory=dict)


class TaxonomyFile(_Strict):
    name: Text
    summary: SummarySpec
    category: CategoryFieldSpec
    global_attributes: list[Slug] = Field(default_factory=list)
    attributes: dict[Slug, AttributeSpec]
    categories: list[CategorySpec] = Field(min_length=1)
    views: ViewsSpec = Field(default_factory=ViewsSpec)


# --- the resolved, queryable taxonomy -------------------------------------------------------
@dataclass(frozen=True)
class Value:
    id: str
    en: str
    zh: str
    synonyms: tuple[str, ...] = ()

    def label(self, language: Language) -> str:
        return self.en if language == "en" else self.zh


@dataclass(frozen=True)
class Attribute:
    """One attribute as a category sees it: its allowed values may be a subset of the global list."""

    name: str
    en: str
    zh: str
    values: tuple[Value, ...]

    def label(self, language: Language) -> str:
        return self.en if language == "en" else self.zh

    @cached_property
    def value_ids(self) -> frozenset[str]:
        return frozenset(value.id for value in self.values)


@dataclass(frozen=True)
class Category:
    value: Value
    attributes: tuple[Attribute, ...]

    @property
    def id(self) -> str:
        return self.value.id


@dataclass(frozen=True)
class Taxonomy:
    name: str
    version: str
    category_attribute: Attribute
    global_attributes: tuple[Attribute, ...]
    categories: Mapping[str, Category]
    attributes: Mapping[str, Attribute]
    summary_label: LabelSpec
    summary_max_chars: int
    source: str = field(default="", compare=False)
    # attribute -> views, most preferred first (merging a SKU's images); not part of the version
    view_preferences: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def attributes_for(self, category_id: str) -> tuple[Attribute, ...]:
        """What is asked after the category is chosen: the global attributes, then its own."""
        return self.global_attributes + self.categories[category_id].attributes

    def check_tags(self, category_id: str, values: Mapping[str, str]) -> list[str]:
        """Problems with one item's tags, as 'field: reason' strings; empty when valid."""
        if category_id not in self.categories:
            return [f"{CATEGORY}: {category_id!r} is not a category of taxonomy {self.name!r}"]
        expected = {attribute.name: attribute for attribute in self.attributes_for(category_id)}
        problems = [
            f"{name}: not an attribute of category {category_id!r}"
            for name in values
            if name not in expected and name != CATEGORY
        ]
        for name, attribute in expected.items():
            value = values.get(name)
            if value is None:
                problems.append(f"{name}: missing for category {category_id!r}")
            elif value not in attribute.value_ids:
                problems.append(f"{name}: {value!r} is not an allowed value")
        return problems

    def value_rows(self) -> Iterable[tuple[str, str, str, str, tuple[str, ...]]]:
        """(attribute, value id, en, zh, synonyms) for every value: the labels table consumers join."""
        for value in self.category_attribute.values:
            yield CATEGORY, value.id, value.en, value.zh, value.synonyms
        for attribute in self.attributes.values():
            for value in attribute.values:
                yield attribute.name, value.id, value.en, value.zh, value.synonyms


# --- loading ---------------------------------------------------------------------------------
def load_taxonomy(path: Path | None = None) -> Taxonomy:
    """The taxonomy at path, or the packaged default when path is None."""
    if path is None:
        return default_taxonomy()
    return parse_taxonomy(_read_document(path), source=str(path))


@cache
def default_taxonomy() -> Taxonomy:
    text = resources.files("schemas").joinpath("taxonomy.yaml").read_text(encoding="utf-8")
    return parse_taxonomy(yaml.safe_load(text), source="schemas/taxonomy.yaml (packaged)")


def parse_taxonomy(document: Any, source: str) -> Taxonomy:
    try:
        spec = TaxonomyFile.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise TaxonomyError(f"{source}: {_json_path(error['loc'])}: {error['msg']}{more}") from exc
    problems = list(_cross_reference_problems(spec))
    if problems:
        path, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TaxonomyError(f"{source}: {path}: {message}{more}")
    return _resolve(spec, source)


def _read_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaxonomyError(f"{path}: cannot read taxonomy file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TaxonomyError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise TaxonomyError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TaxonomyError(f"{path}: {where}invalid YAML: {problem}") from exc


def _json_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _cross_reference_problems(spec: TaxonomyFile) -> Iterable[tuple[str, str]]:
    for name, attribute in spec.attributes.items():
        where = f"attributes.{name}"
        if name in RESERVED_NAMES:
            yield where, f"{name!r} is reserved"
        if attribute.values_from is not None and attribute.values_from not in spec.attributes:
            yield f"{where}.values_from", f"unknown attribute {attribute.values_from!r}"
        elif attribute.values_from is not None and spec.attributes[attribute.values_from].values_from:
            yield f"{where}.values_from", "may not point at an attribute that itself uses values_from"
        elif not attribute.values and attribute.values_from is None:
            yield where, "has no values"
        else:
            yield from _value_problems(spec, where, name)
    yield from _duplicate_problems("categories", [category_value(c) for c in spec.categories])
    for name in spec.views.prefer:
        if name != CATEGORY and name not in spec.attributes:
            yield f"views.prefer.{name}", f"unknown attribute {name!r}"
    for index, name in enumerate(spec.global_attributes):
        if name not in spec.attributes:
            yield f"global_attributes[{index}]", f"unknown attribute {name!r}"
    for index, category in enumerate(spec.categories):
        yield from _category_problems(spec, f"categories[{index}]", category)


def _value_problems(spec: TaxonomyFile, where: str, name: str) -> Iterable[tuple[str, str]]:
    own = _own_and_inherited(spec, name)
    if any(value.id == NOT_VISIBLE for value in own):
        yield where, f"{NOT_VISIBLE!r} is reserved: set `not_visible: true` on the attribute instead"
    elif has_not_visible(spec, name):
        yield from _duplicate_problems(where, [*own, _not_visible_spec()])
    else:
        yield from _duplicate_problems(where, own)


def _category_problems(spec: TaxonomyFile, where: str, category: CategorySpec) -> Iterable[tuple[str, str]]:
    seen: set[str] = set()
    for position, entry in enumerate(category.attributes):
        entry_where = f"{where}.attributes[{position}]"
        if isinstance(entry, dict) and len(entry) != 1:
            yield entry_where, "a narrowed attribute is written {name: [value ids]}, one name per entry"
            continue
        name, subset = _entry_parts(entry)
        if name not in spec.attributes:
            yield entry_where, f"unknown attribute {name!r}"
            continue
        if name in spec.global_attributes:
            yield entry_where, f"{name!r} is already a global attribute"
        if name in seen:
            yield entry_where, f"{name!r} is listed twice"
        seen.add(name)
        known = {value.id for value in _own_and_inherited(spec, name)}
        for value_id in subset or ():
            if value_id not in known:
                yield f"{entry_where}.{name}", f"{value_id!r} is not a value of {name!r}"


def _duplicate_problems(where: str, values: list[ValueSpec]) -> Iterable[tuple[str, str]]:
    # Labels must be unique within an attribute: the model writes a label and we map it back to an id.
    for key in ("id", "en", "zh"):
        seen: set[str] = set()
        for index, value in enumerate(values):
            text = getattr(value, key)
            folded = text.casefold()
            if folded in seen:
                yield f"{where}.values[{index}].{key}", f"duplicate {key} {text!r}"
            seen.add(folded)


def _entry_parts(entry: str | dict[str, list[str]]) -> tuple[str, list[str] | None]:
    if isinstance(entry, str):
        return entry, None
    ((name, subset),) = entry.items()
    return name, subset


def category_value(category: CategorySpec) -> ValueSpec:
    return ValueSpec(id=category.id, en=category.en, zh=category.zh, synonyms=category.synonyms)


def _own_and_inherited(spec: TaxonomyFile, name: str) -> list[ValueSpec]:
    attribute = spec.attributes[name]
    inherited = spec.attributes[attribute.values_from].values if attribute.values_from else []
    return [*attribute.values, *inherited]


def has_not_visible(spec: TaxonomyFile, name: str) -> bool:
    """Whether attribute name offers `not_visible` (its own setting, else: per-category ones do)."""
    setting = spec.attributes[name].not_visible
    return setting if setting is not None else name not in spec.global_attributes


def _not_visible_spec() -> ValueSpec:
    return ValueSpec(
        id=NOT_VISIBLE, en=NOT_VISIBLE_LABELS["en"], zh=NOT_VISIBLE_LABELS["zh"], synonyms=["not shown", "不可见"]
    )


def _to_value(spec: ValueSpec) -> Value:
    return Value(id=spec.id, en=spec.en, zh=spec.zh, synonyms=tuple(spec.synonyms))


def _resolve(spec: TaxonomyFile, source: str) -> Taxonomy:
    attributes = {
        name: Attribute(
            name=name,
            en=attribute.label.en,
            zh=attribute.label.zh,
            values=tuple(
                _to_value(value)
                for value in [
                    *_own_and_inherited(spec, name),
                    *([_not_visible_spec()] if has_not_visible(spec, name) else []),
                ]
            ),
        )
        for name, attribute in spec.attributes.items()
    }
    categories = {
        category.id: Category(
            value=_to_value(category_value(category)),
            attributes=tuple(_narrow(attributes, entry) for entry in category.attributes),
        )
        for category in spec.categories
    }
    category_attribute = Attribute(
        name=CATEGORY,
        en=spec.category.label.en,
        zh=spec.category.label.zh,
        values=tuple(category.value for category in categories.values()),
    )
    return Taxonomy(
        name=spec.name,
        version=taxonomy_version(spec),
        category_attribute=category_attribute,
        global_attributes=tuple(attributes[name] for name in spec.global_attributes),
        categories=categories,
        attributes=attributes,
        summary_label=spec.summary.label,
        summary_max_chars=spec.summary.max_chars,
        source=source,
        view_preferences={name: tuple(views) for name, views in spec.views.prefer.items()},
    )


def _narrow(attributes: Mapping[str, Attribute], entry: str | dict[str, list[str]]) -> Attribute:
    name, subset = _entry_parts(entry)
    attribute = attributes[name]
    if subset is None:
        return attribute
    wanted = set(subset) | {NOT_VISIBLE}  # a narrowed attribute keeps not_visible where it has it
    return Attribute(
        name=name,
        en=attribute.en,
        zh=attribute.zh,
        values=tuple(value for value in attribute.values if value.id in wanted),
    )


def taxonomy_version(spec: TaxonomyFile) -> str:
    """A hash of the normalized content: key order and YAML formatting do not change it. View
    preferences are left out: they change how a SKU's images are merged, not what the model is
    asked, so editing them re-merges without re-tagging."""
    # The resolved not_visible values count too: the default can add them without a word in the file.
    not_visible = sorted(name for name in spec.attributes if has_not_visible(spec, name))
    document = {"spec": spec.model_dump(mode="json", exclude={"views"}), "not_visible": not_visible}
    canonical = json.dumps(document, sort_keys=True, ensure_ascii=False)
    return "tx-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
