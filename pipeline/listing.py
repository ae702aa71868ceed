"""Listing checks: does the catalog's own text (title, category hint) agree with the image's tags?

A listing is read against the taxonomy's vocabulary: every value's English and Chinese label and
its synonyms (an English label "X or Y" names both X and Y). The text is segmented by longest
match over that vocabulary, not split into words, so Chinese, which has no spaces, reads as
terms: among the ways to cut it into known terms, the one covering the most characters with the
fewest (longest) terms wins (红色连衣裙 is 红色 + 连衣裙; 短袖T恤 is 短袖 + T恤, where greedy
left-to-right matching would take the synonym 短袖T and strand 恤). English terms must start and end on a
word boundary (red is not in "hundred") and may take a plural s/es (dresses). One-letter English
terms are left out; one-character Chinese terms stay (黑, 包), and shop words that contain them
without meaning them (包邮, free shipping) are read as words that claim nothing.

Each matched term is a claim: "this attribute has one of these values". A term may name several
attributes (red is a primary and a secondary color); the claim holds when any of them agrees, and
is judged on the first of them the image has a tag for. An attribute is contradicted when the
image's tag for it is confident (>= min_confidence), is not among the values the text names for
it, and no claim judged on it holds in another attribute (title says red, the image is blue with
red as secondary color: no issue). Subjective attributes (style, season by default) are not
checked. Negations ("not red") are not understood: the words still count as claims.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.settings import Settings
from schemas.taxonomy import CATEGORY, NOT_VISIBLE, Taxonomy

DEFAULT_MIN_CONFIDENCE = 0.8
DEFAULT_IGNORED_ATTRIBUTES = ("style", "season")
LISTING_FIELDS = ("title", "category_hint")
REVIEW_REASON = "listing_mismatch"

Choice = tuple[str, str]  # (attribute, value id)

# Shop words that contain a one-character term without meaning it (包 is a bag, 包邮 free
# shipping; 无 is 'no secondary color', 无痕 seamless): read as words that claim nothing.
NEUTRAL_TERMS = ("包邮", "包装", "包退", "包换", "包括", "面包", "无痕", "无缝", "无弹", "无印", "无门槛", "黑五")
_SEPARATORS = str.maketrans({"-": " ", "_": " ", "\u2010": " ", "\u2011": " ", "\u2013": " "})


class Tag(Protocol):
    """What the checker needs of an image tag (schemas.results.AttributeTag fits)."""

    @property
    def value(self) -> str: ...

    @property
    def confidence(self) -> float: ...


@dataclass(frozen=True)
class Claim:
    """One vocabulary term found in a listing field."""

    source: str  # title or category_hint
    words: str  # the term as normalized text
    choices: frozenset[Choice]

    def values_for(self, attribute: str) -> set[str]:
        return {value for name, value in self.choices if name == attribute}


@dataclass(frozen=True)
class ListingIssue:
    """The listing says one thing, a confident image tag another."""

    attribute: str
    listed_values: tuple[str, ...]  # value ids the text names for the attribute
    listed_words: tuple[str, ...]  # the words that named them
    listed_in: tuple[str, ...]  # title and/or category_hint
    image_value: str
    confidence: float


@dataclass(frozen=True)
class ListingPolicy:
    enabled: bool = True
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    ignored_attributes: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_IGNORED_ATTRIBUTES))


# --- reading text ----------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Full-width to half-width, case folded, hyphens as spaces, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_SEPARATORS)
    return " ".join(folded.split())


def _is_word_char(char: str) -> bool:
    return char.isascii() and char.isalnum()


class _Node:
    __slots__ = ("children", "choices")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.choices: frozenset[Choice] | None = None  # set where a term ends


class Vocabulary:
    """Every label and synonym of a taxonomy as a character trie: term -> the (attribute, value)s it names."""

    def __init__(self, terms: Mapping[str, frozenset[Choice]]) -> None:
        self._root = _Node()
        for term, choices in terms.items():
            node = self._root
            for char in term:
                node = node.children.setdefault(char, _Node())
            node.choices = choices

    @classmethod
    def from_taxonomy(cls, taxonomy: Taxonomy) -> Vocabulary:
        terms: dict[str, set[Choice]] = {}
        for attribute, value, en, zh, synonyms in taxonomy.value_rows():
            if value == NOT_VISIBLE:  # "not visible" is no claim a listing makes
                continue
            for term in _terms(en, zh, synonyms):
                terms.setdefault(term, set()).add((attribute, value))
        vocabulary = {term: frozenset(choices) for term, choices in terms.items()}
        return cls({term: frozenset() for term in NEUTRAL_TERMS} | vocabulary)

    def claims(self, text: str, source: str) -> list[Claim]:
        """The terms of text, left to right: the reading that covers the most characters with the
        fewest terms (短袖T恤 is 短袖 + T恤, not 短袖T + a stray 恤), exact forms before plurals."""
        normalized = normalize(text)
        size = len(normalized)
        # best[i]: (characters covered, -terms, exact forms) of the best reading of normalized[i:],
        # and the match it starts with (end, choices) or None when position i is skipped.
        best: list[tuple[tuple[int, int, int], tuple[int, frozenset[Choice]] | None]] = [((0, 0, 0), None)] * (size + 1)
        for position in range(size - 1, -1, -1):
            score, _ = best[position + 1]
            best[position] = (score, None)
            for end, exact, choices in self._matches_at(normalized, position):
                covered, terms, exacts = best[end][0]
                candidate = (covered + end - position, terms - 1, exacts + exact)
                if candidate > best[position][0]:
                    best[position] = (candidate, (end, choices))
        found: list[Claim] = []
        position = 0
        while position < size:
            match = best[position][1]
            if match is None:
                position += 1
                continue
            end, choices = match
            if choices:
                found.append(Claim(source=source, words=normalized[position:end], choices=choices))
            position = end
        return found

    def _matches_at(self, text: str, start: int) -> Iterable[tuple[int, int, frozenset[Choice]]]:
        """(end, 1 if exact else 0, choices) of every term starting at start."""
        if _is_word_char(text[start]) and start > 0 and _is_word_char(text[start - 1]):
            return  # inside an English word: no term starts here
        node = self._root
        for index in range(start, len(text)):
            next_node = node.children.get(text[index])
            if next_node is None:
                return
            node = next_node
            choices = node.choices
            if choices is not None:
                for end, exact in _term_ends(text, index + 1):
                    yield end, int(exact), choices


def _term_ends(text: str, end: int) -> Iterable[tuple[int, bool]]:
    """Where a term ending at end may end: there (exact), or after a plural s/es, on a word boundary."""
    last = text[end - 1]
    if not _is_word_char(last):
        yield end, True
        return
    for suffix, exact in (("", True), ("s", False), ("es", False)):
        stop = end + len(suffix)
        if text.startswith(suffix, end) and (stop == len(text) or not _is_word_char(text[stop])):
            if suffix and not last.isalpha():
                continue
            yield stop, exact


def _terms(en: str, zh: str, synonyms: Sequence[str]) -> set[str]:
    names = [*en.split(" or "), zh, *synonyms]
    return {term for term in (normalize(name) for name in names) if len(term) > 1 or not _is_word_char(term)}


# --- checking --------------------------------------------------------------------------------
class ListingChecker:
    """Reads listings against one taxonomy and compares them with an image's tags."""

    def __init__(self, taxonomy: Taxonomy, policy: ListingPolicy | None = None) -> None:
        self.taxonomy = taxonomy
        self.policy = policy or ListingPolicy()
        self.vocabulary = Vocabulary.from_taxonomy(taxonomy)
        self._order = {name: index for index, name in enumerate([CATEGORY, *taxonomy.attributes])}

    def read(self, fields: Mapping[str, str | None]) -> list[Claim]:
        """The claims of every listing field (title, category_hint) that has text."""
        return [
            claim
            for source in LISTING_FIELDS
            if fields.get(source)
            for claim in self.vocabulary.claims(str(fields[source]), source)
        ]

    @classmethod
    def from_settings(cls, settings: Settings, taxonomy: Taxonomy) -> ListingChecker:
        policy = ListingPolicy(
            enabled=settings.listing_checks,
            min_confidence=settings.listing_min_confidence,
            ignored_attributes=frozenset(settings.listing_ignored_attributes),
        )
        return cls(taxonomy, policy)

    def check(self, fields: Mapping[str, str | None], tags: Mapping[str, Tag]) -> list[ListingIssue]:
        if not self.policy.enabled:
            return []
        return find_issues(self.read(fields), tags, self.policy, self._order)


def find_issues(
    claims: Sequence[Claim], tags: Mapping[str, Tag], policy: ListingPolicy, order: Mapping[str, int] | None = None
) -> list[ListingIssue]:
    """The attributes a confident tag contradicts, in taxonomy order.

    A claim naming several attributes is judged on the first of them (taxonomy order) that the
    image has a tag for: red speaks of the main color, so a red title on a blue image with a sure
    'no secondary color' is one issue (primary color), not two; 短裙 (skirt, and a mini length)
    is judged as a category. The other attributes still count as where the claim may hold."""
    ranking = order or {}

    def rank(attribute: str) -> tuple[int, str]:
        return ranking.get(attribute, len(ranking)), attribute

    by_attribute: dict[str, list[Claim]] = {}
    for claim in claims:
        tagged = [attribute for attribute, _value in claim.choices if attribute in tags]
        if tagged:
            by_attribute.setdefault(min(tagged, key=rank), []).append(claim)
    issues = (
        _contradiction(attribute, by_attribute[attribute], tags, policy) for attribute in sorted(by_attribute, key=rank)
    )
    return [issue for issue in issues if issue is not None]


def _contradiction(
    attribute: str, claims: Sequence[Claim], tags: Mapping[str, Tag], policy: ListingPolicy
) -> ListingIssue | None:
    tag = tags.get(attribute)
    if attribute in policy.ignored_attributes or tag is None or tag.confidence < policy.min_confidence:
        return None
    if tag.value == NOT_VISIBLE:  # the photo does not show it: nothing to contradict
        return None
    listed = {value for claim in claims for value in claim.values_for(attribute)}
    if tag.value in listed or any(_held_elsewhere(claim, attribute, tags) for claim in claims):
        return None
    return ListingIssue(
        attribute=attribute,
        listed_values=tuple(sorted(listed)),
        listed_words=tuple(dict.fromkeys(claim.words for claim in claims)),
        listed_in=tuple(source for source in LISTING_FIELDS if any(claim.source == source for claim in claims)),
        image_value=tag.value,
        confidence=tag.confidence,
    )


def _held_elsewhere(claim: Claim, attribute: str, tags: Mapping[str, Tag]) -> bool:
    """The claim names another attribute too, and the image has that value there."""
    return any(name != attribute and name in tags and tags[name].value == value for name, value in claim.choices)
