"""Listing checks: precision and recall on generated titles with planted mismatches, en and zh.

Each case is an image's tags (a category and its attributes, confidences drawn as a model's would
spread) and a title written from them in English or Chinese: category, color, pattern, one of the
category's attributes, a style word, shop filler (新款, 包邮, Free shipping, sizes). A share of the
titles get one planted mismatch: a mentioned attribute's value swapped for another value (for
colors, one the image has neither as primary nor secondary color). Terms are drawn from labels
and synonyms alike, so titles read like listings, ambiguous words included.

The baseline, in the same run, is the same comparison on a word split (whitespace and punctuation,
exact vocabulary lookups): what a checker without longest-match segmentation would find.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.listing import Claim, ListingChecker, ListingPolicy, Vocabulary, find_issues, normalize
from schemas.results import AttributeTag
from schemas.taxonomy import CATEGORY, Attribute, Language, Taxonomy, Value, default_taxonomy

# Attributes a title names besides category and color: the objective ones a shopper searches by.
DETAIL_ATTRIBUTES = (
    "sleeve_length", "neckline", "hem_length", "leg_shape", "shoe_type", "bag_type", "hat_type", "heel_height",
)  # fmt: skip
FILLER = {
    # Some hold vocabulary inside other words on purpose: red in Hundred, 包 in 包邮, 黑 in 黑五.
    "en": ["Women's", "New 2025", "Free shipping", "Plus size S-XXL", "Hundred-day sale", "Gift for her", "Men's"],
    "zh": ["2025新款", "女装", "包邮", "韩版", "ins风", "显瘦", "黑五特惠", "春装"],
}
_HAN = re.compile(r"[\u3400-\u9fff]")


@dataclass(frozen=True)
class Case:
    language: Language
    title: str
    tags: dict[str, AttributeTag]
    planted: str | None  # the attribute whose title value was swapped

    @property
    def planted_on_confident_tag(self) -> bool:
        return self.planted is not None and self.tags[self.planted].confidence >= ListingPolicy().min_confidence


def generate_cases(taxonomy: Taxonomy, count: int, seed: int = 0, mismatch_share: float = 0.3) -> list[Case]:
    rng = random.Random(seed)
    languages: tuple[Language, Language] = ("en", "zh")
    return [_case(taxonomy, rng, languages[index % 2], rng.random() < mismatch_share) for index in range(count)]


def _case(taxonomy: Taxonomy, rng: random.Random, language: Language, plant: bool) -> Case:
    category = rng.choice([c for c in taxonomy.categories if c != "other"])
    tags = {CATEGORY: AttributeTag(value=category, confidence=round(rng.uniform(0.7, 1.0), 3))}
    for attribute in taxonomy.attributes_for(category):
        tags[attribute.name] = AttributeTag(value=rng.choice(attribute.values).id, confidence=_confidence(rng))
    named = _named_attributes(taxonomy, category, rng)
    planted = rng.choice([name for name in named if name != "style"]) if plant else None
    words = []
    for name in named:
        attribute = _attribute(taxonomy, category, name)
        value = _planted_value(attribute, tags, rng) if name == planted else _value(attribute, tags[name].value)
        words.append(_surface(value, language, rng))
    title = _compose(words, language, rng)
    return Case(language=language, title=title, tags=tags, planted=planted)


def _confidence(rng: random.Random) -> float:
    # Most of a model's answers are sure; a quarter fall below the default 0.8 of the checker.
    return round(rng.uniform(0.8, 1.0) if rng.random() < 0.75 else rng.uniform(0.4, 0.8), 3)


def _named_attributes(taxonomy: Taxonomy, category: str, rng: random.Random) -> list[str]:
    named = ["primary_color"] if rng.random() < 0.8 else []
    if rng.random() < 0.5:
        named.append("pattern")
    details = [a.name for a in taxonomy.categories[category].attributes if a.name in DETAIL_ATTRIBUTES]
    if details and rng.random() < 0.6:
        named.append(rng.choice(details))
    if rng.random() < 0.3:
        named.append("style")  # not checked by default: a planted style swap must not be found
    return [*named, CATEGORY]  # the noun last, as titles have it


def _attribute(taxonomy: Taxonomy, category: str, name: str) -> Attribute:
    if name == CATEGORY:
        return taxonomy.category_attribute
    return next(a for a in taxonomy.attributes_for(category) if a.name == name)


def _value(attribute: Attribute, value_id: str) -> Value:
    return next(value for value in attribute.values if value.id == value_id)


def _planted_value(attribute: Attribute, tags: Mapping[str, AttributeTag], rng: random.Random) -> Value:
    taken = {tags[attribute.name].value}
    if attribute.name == "primary_color" and "secondary_color" in tags:
        taken.add(tags["secondary_color"].value)
    return rng.choice([value for value in attribute.values if value.id not in taken and value.id != "other"])


def _surface(value: Value, language: Language, rng: random.Random) -> str:
    """A label or synonym of the value in the title's language."""
    if language == "en":
        forms = [*value.en.split(" or "), *(s for s in value.synonyms if not _HAN.search(s))]
    else:
        forms = [value.zh, *(s for s in value.synonyms if _HAN.search(s))]
    return rng.choice(forms)


def _compose(words: Sequence[str], language: Language, rng: random.Random) -> str:
    fillers = rng.sample(FILLER[language], 2)
    if language == "en":
        return f"{fillers[0]} {' '.join(words)} - {fillers[1]}"
    return f"{fillers[0]}{''.join(words)} {fillers[1]}"


# --- the word-split baseline -----------------------------------------------------------------
class WordSplitReader:
    """Splits on whitespace and punctuation and looks each word (and word pair) up exactly."""

    def __init__(self, vocabulary: Vocabulary, taxonomy: Taxonomy) -> None:
        self.terms: dict[str, frozenset[tuple[str, str]]] = {}
        for attribute, value, en, zh, synonyms in taxonomy.value_rows():
            for name in [*en.split(" or "), zh, *synonyms]:
                term = normalize(name)
                self.terms[term] = self.terms.get(term, frozenset()) | {(attribute, value)}

    def claims(self, text: str, source: str) -> list[Claim]:
        words = re.split(r"[\s,.;:!?()\[\]/|]+", normalize(text))
        found = []
        for index, word in enumerate(words):
            pair = f"{word} {words[index + 1]}" if index + 1 < len(words) else ""
            term = pair if pair in self.terms else word
            if term in self.terms:
                found.append(Claim(source=source, words=term, choices=self.terms[term]))
        return found


# --- measuring -------------------------------------------------------------------------------
@dataclass
class Score:
    cases: int = 0
    planted: int = 0
    planted_confident: int = 0
    flagged: int = 0
    true_positives: int = 0
    found_confident: int = 0

    def add(self, case: Case, flagged: set[str]) -> None:
        self.cases += 1
        self.planted += case.planted is not None
        self.planted_confident += case.planted_on_confident_tag
        self.flagged += len(flagged)
        hit = case.planted is not None and case.planted in flagged
        self.true_positives += hit
        self.found_confident += hit and case.planted_on_confident_tag

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "planted": self.planted,
            "flagged": self.flagged,
            "true_positives": self.true_positives,
            "precision": round(self.true_positives / self.flagged, 4) if self.flagged else None,
            "recall": round(self.true_positives / self.planted, 4) if self.planted else None,
            "recall_confident": round(self.found_confident / self.planted_confident, 4)
            if self.planted_confident
            else None,
        }


def score(cases: Sequence[Case], reader: Any, policy: ListingPolicy, taxonomy: Taxonomy) -> dict[str, Score]:
    order = {name: index for index, name in enumerate([CATEGORY, *taxonomy.attributes])}
    scores = {"en": Score(), "zh": Score()}
    for case in cases:
        issues = find_issues(reader.claims(case.title, "title"), case.tags, policy, order)
        scores[case.language].add(case, {issue.attribute for issue in issues})
    return scores


def run(count: int = 2000, seed: int = 0) -> dict[str, Any]:
    taxonomy = default_taxonomy()
    cases = generate_cases(taxonomy, count, seed)
    checker = ListingChecker(taxonomy)
    started = time.perf_counter()
    scores = score(cases, checker.vocabulary, checker.policy, taxonomy)
    seconds = time.perf_counter() - started
    baseline = score(cases, WordSplitReader(checker.vocabulary, taxonomy), checker.policy, taxonomy)
    return {
        "cases": count,
        "seed": seed,
        "min_confidence": checker.policy.min_confidence,
        "skutag": {language: s.as_dict() for language, s in scores.items()},
        "word_split_baseline": {language: s.as_dict() for language, s in baseline.items()},
        "titles_per_s": round(count / seconds),
        "examples": [{"title": case.title, "planted": case.planted} for case in cases[:6]],
    }
