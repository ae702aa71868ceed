"""Constrained decoding for the tagging answer: a token trie per attribute, and the summary's mask.

Why our own and not xgrammar: the answer is a fixed sequence of closed choices (category, then
that category's attributes) plus one capped free-text field. A token trie per choice is an exact
grammar for that, and owning it buys three things a grammar matcher behind HF generate does not:
  1. forced tokens cost no forward pass: keys, quotes, commas and the rest of a value once its
     prefix is unique are appended in the same forward as the deciding token;
  2. confidence comes from the decision structure itself: the chosen value's probability
     renormalized over the allowed values at each branching token (product along its path);
  3. the runner-up value comes from the same logits, at no extra cost.

Each candidate is tokenized together with the text that follows it (the closing quote, the next
key and its opening quote), so the forced part after a value is tokenized the way the model saw
such text in training. Values must tokenize the same with and without left context (a label
starting with punctuation would merge with the opening quote): checked when the plan is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.errors import ModelError
from pipeline.prompts import CLOSING, key_opening
from schemas.taxonomy import CATEGORY, SUMMARY, Attribute, Language, Taxonomy

Encode = Callable[[str], list[int]]


@dataclass
class TrieNode:
    children: dict[int, TrieNode] = field(default_factory=dict)
    value_id: str | None = None  # set where a candidate's token sequence ends
    first_value: str | None = None  # a value in this subtree, in taxonomy order: the runner-up's name

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass(frozen=True)
class ChoiceTrie:
    """The allowed token sequences for one attribute of one category."""

    attribute: str
    root: TrieNode
    next_attribute: str | None  # None: the summary or the end of the answer follows

    @classmethod
    def build(
        cls, attribute: str, candidates: Sequence[tuple[str, list[int]]], next_attribute: str | None
    ) -> ChoiceTrie:
        root = TrieNode()
        for value_id, tokens in candidates:
            node = root
            if node.first_value is None:
                node.first_value = value_id
            for token in tokens:
                if node.value_id is not None:  # an earlier candidate ends inside this one
                    raise _overlap(attribute, node.value_id, value_id)
                node = node.children.setdefault(token, TrieNode())
                if node.first_value is None:
                    node.first_value = value_id
            if node.value_id is not None or node.children:
                raise _overlap(attribute, node.value_id or node.first_value or value_id, value_id)
            node.value_id = value_id
        return cls(attribute=attribute, root=root, next_attribute=next_attribute)


def _overlap(attribute: str, earlier: str, value_id: str) -> ModelError:
    """Two candidates where one's tokens are a prefix of the other's: the trie could not tell
    whether the shorter one ended."""
    return ModelError(
        f"attribute {attribute!r}: labels of {earlier!r} and {value_id!r} tokenize to overlapping sequences"
    )


def forced_walk(node: TrieNode) -> tuple[list[int], TrieNode]:
    """Follow single-child links: the tokens that need no decision, and where they end."""
    tokens = []
    while len(node.children) == 1:
        ((token, node),) = node.children.items()
        tokens.append(token)
    return tokens, node


@dataclass(frozen=True)
class DecodingPlan:
    """Every trie the answer can pass through, built once per (taxonomy, language, tokenizer)."""

    category: ChoiceTrie
    attributes: dict[tuple[str, str], ChoiceTrie]  # (category id, attribute) -> trie
    order: dict[str, tuple[str, ...]]  # category id -> attribute names asked after it
    summary_enabled: bool

    def trie_for(self, category_id: str, attribute: str) -> ChoiceTrie:
        return self.attributes[(category_id, attribute)]


def build_plan(taxonomy: Taxonomy, language: Language, encode: Encode, summary_enabled: bool) -> DecodingPlan:
    end = key_opening(SUMMARY) if summary_enabled else CLOSING
    first_global = taxonomy.global_attributes[0].name if taxonomy.global_attributes else None
    category_trie = _trie(taxonomy.category_attribute, language, encode, first_global, end)
    attributes: dict[tuple[str, str], ChoiceTrie] = {}
    order: dict[str, tuple[str, ...]] = {}
    for category_id in taxonomy.categories:
        asked = taxonomy.attributes_for(category_id)
        order[category_id] = tuple(a.name for a in asked)
        for position, attribute in enumerate(asked):
            following = asked[position + 1].name if position + 1 < len(asked) else None
            attributes[(category_id, attribute.name)] = _trie(attribute, language, encode, following, end)
    if first_global is None:
        # Without global attributes the category's closing text depends on the category; not supported.
        raise ModelError("the taxonomy needs at least one global attribute")
    return DecodingPlan(category=category_trie, attributes=attributes, order=order, summary_enabled=summary_enabled)


def _trie(attribute: Attribute, language: Language, encode: Encode, following: str | None, end: str) -> ChoiceTrie:
    closing = key_opening(following) if following else end
    candidates = []
    for value in attribute.values:
        label = value.label(language)
        tokens = encode(label + closing)
        if encode('x": "' + label + closing) != encode('x": "') + tokens:
            raise ModelError(
                f"the tokenizer merges the {attribute.name} label {label!r} with the text before it; "
                "start labels with a letter or digit"
            )
        candidates.append((value.id, tokens))
    return ChoiceTrie.build(attribute.name, candidates, following)


def summary_vocabulary(token_bytes: Sequence[bytes | None]) -> tuple[list[int], list[int]]:
    """Token ids allowed inside the summary string (no quote, backslash or control byte) and the ids
    that close it: any allowed text, then the quote, then optionally the closing brace and
    whitespace (`"`, `."`, `"}`, ` style."}` ...: the model's natural endings, not only a bare quote)."""
    allowed, closers = [], []
    for token_id, raw in enumerate(token_bytes):
        if not raw:
            continue
        text, quote, rest = raw.partition(b'"')
        if not _is_string_text(text):
            continue
        if not quote:
            allowed.append(token_id)
        elif rest.strip() in {b"", b"}"}:
            closers.append(token_id)
    return allowed, closers


def summary_text(raw: bytes) -> bytes:
    """What a summary token adds to the text: everything before a closing quote."""
    return raw.partition(b'"')[0]


def _is_string_text(raw: bytes) -> bool:
    return not any(byte == 0x5C or byte < 0x20 or byte == 0x7F for byte in raw)


def byte_level_token_bytes(vocabulary: dict[str, int], special_ids: set[int], size: int) -> list[bytes | None]:
    """The raw bytes of every token of a byte-level BPE vocabulary (GPT-2 / Qwen style)."""
    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    table: list[bytes | None] = [None] * size
    for token, token_id in vocabulary.items():
        if token_id >= size or token_id in special_ids:
            continue
        try:
            table[token_id] = bytes(decoder[char] for char in token)
        except KeyError:
            table[token_id] = None  # not a byte-level token (an added word piece): never in a summary
    return table


def bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


__all__ = [
    "CATEGORY",
    "ChoiceTrie",
    "DecodingPlan",
    "TrieNode",
    "build_plan",
    "byte_level_token_bytes",
    "bytes_to_unicode",
    "forced_walk",
    "summary_text",
    "summary_vocabulary",
]
