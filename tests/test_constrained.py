"""Constrained decoding's pure logic on a toy taxonomy and toy tokenizers: the tries, forced walks,
shared prefixes, the order attributes are asked in, and the summary's vocabulary."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.constrained import (
    ChoiceTrie,
    TrieNode,
    build_plan,
    byte_level_token_bytes,
    forced_walk,
    summary_vocabulary,
)
from pipeline.errors import ModelError
from pipeline.prompts import CLOSING, key_opening
from schemas.taxonomy import SUMMARY, Taxonomy, parse_taxonomy


def toy_taxonomy(**changes: Any) -> Taxonomy:
    """Three categories sharing the prefix "sh"; colours with shared prefixes ("red" / "red brown" /
    "rose"); an attribute with a single value (a choice that is all forced). not_visible is off:
    these tests are about the tries, not about that option (tests/test_not_visible.py)."""
    document: dict[str, Any] = {
        "name": "toy",
        "summary": {"label": {"en": "Summary", "zh": "摘要"}},
        "category": {"label": {"en": "Category", "zh": "品类"}},
        "global_attributes": ["color"],
        "attributes": {
            "color": {
                "label": {"en": "Color", "zh": "颜色"},
                "values": [
                    {"id": "red", "en": "red", "zh": "红色"},
                    {"id": "red_brown", "en": "red brown", "zh": "红棕色"},
                    {"id": "rose", "en": "rose", "zh": "玫瑰色"},
                    {"id": "blue", "en": "blue", "zh": "蓝色"},
                ],
            },
            "sleeve": {
                "label": {"en": "Sleeve", "zh": "袖长"},
                "values": [{"id": "short", "en": "short", "zh": "短袖"}, {"id": "long", "en": "long", "zh": "长袖"}],
                "not_visible": False,
            },
            "heel": {
                "label": {"en": "Heel", "zh": "跟高"},
                "values": [{"id": "flat", "en": "flat", "zh": "平跟"}],
                "not_visible": False,
            },
        },
        "categories": [
            {"id": "shirt", "en": "shirt", "zh": "衬衫", "attributes": ["sleeve"]},
            {"id": "shoes", "en": "shoes", "zh": "鞋", "attributes": ["heel"]},
            {"id": "shorts", "en": "shorts", "zh": "短裤"},
        ],
    }
    document.update(changes)
    return parse_taxonomy(document, source="toy")


def char_encode(text: str) -> list[int]:
    """One token per character: the same with or without left context."""
    return [ord(char) for char in text]


def walk(trie: ChoiceTrie, tokens: list[int]) -> TrieNode:
    node = trie.root
    for token in tokens:
        node = node.children[token]
    return node


# --- tries -----------------------------------------------------------------------------------
@pytest.mark.parametrize("language", ["en", "zh"])
def test_every_value_has_exactly_one_path_ending_in_its_id(language: str) -> None:
    taxonomy = toy_taxonomy()
    plan = build_plan(taxonomy, language, char_encode, summary_enabled=True)  # type: ignore[arg-type]
    tries = [(plan.category, taxonomy.category_attribute), *(
        (plan.trie_for(category, name), taxonomy.attributes[name]) for category, name in plan.attributes
    )]  # fmt: skip
    for trie, attribute in tries:
        leaves = _leaves(trie.root)
        assert sorted(leaves) == sorted(value.id for value in attribute.values)
        for value in attribute.values:
            closing = key_opening(trie.next_attribute) if trie.next_attribute else key_opening(SUMMARY)
            node = walk(trie, char_encode(value.label(language) + closing))  # type: ignore[arg-type]
            assert node.value_id == value.id and node.is_leaf


def _leaves(node: TrieNode) -> list[str]:
    found = [node.value_id] if node.value_id is not None else []
    for child in node.children.values():
        found += _leaves(child)
    return found


def test_attributes_are_asked_globals_first_then_the_categorys_own_in_a_chain() -> None:
    plan = build_plan(toy_taxonomy(), "en", char_encode, summary_enabled=False)
    assert plan.order == {"shirt": ("color", "sleeve"), "shoes": ("color", "heel"), "shorts": ("color",)}
    assert plan.category.next_attribute == "color"
    assert plan.trie_for("shirt", "color").next_attribute == "sleeve"
    assert plan.trie_for("shirt", "sleeve").next_attribute is None
    assert plan.trie_for("shorts", "color").next_attribute is None
    # The last choice closes the answer (no summary) or opens the summary's key.
    assert walk(plan.trie_for("shorts", "color"), char_encode("blue" + CLOSING)).value_id == "blue"
    with_summary = build_plan(toy_taxonomy(), "en", char_encode, summary_enabled=True)
    assert walk(with_summary.trie_for("shorts", "color"), char_encode("blue" + key_opening(SUMMARY))).value_id == "blue"


# --- forced walks and shared prefixes --------------------------------------------------------
def test_a_choice_with_one_value_is_forced_from_the_root_to_its_leaf() -> None:
    trie = build_plan(toy_taxonomy(), "en", char_encode, summary_enabled=False).trie_for("shoes", "heel")
    tokens, end = forced_walk(trie.root)
    assert tokens == char_encode("flat" + CLOSING)
    assert end.value_id == "flat" and end.is_leaf


def test_a_branching_root_forces_nothing() -> None:
    trie = build_plan(toy_taxonomy(), "en", char_encode, summary_enabled=False).trie_for("shirt", "color")
    tokens, end = forced_walk(trie.root)
    assert tokens == [] and end is trie.root
    assert set(trie.root.children) == {ord("r"), ord("b")}


def test_shared_prefixes_branch_where_the_labels_differ_and_force_the_rest() -> None:
    trie = build_plan(toy_taxonomy(), "en", char_encode, summary_enabled=False).trie_for("shirt", "color")
    after_r = walk(trie, char_encode("r"))
    assert set(after_r.children) == {ord("e"), ord("o")}  # red / red brown / rose: a decision
    assert forced_walk(after_r) == ([], after_r)
    # "red" and "red brown" share "red" and part at the next character: the closing quote or a space.
    after_red = walk(trie, char_encode("red"))
    assert set(after_red.children) == {ord('"'), ord(" ")}
    assert after_red.first_value == "red"  # taxonomy order names the subtree: the runner-up's name
    tokens, end = forced_walk(after_red.children[ord(" ")])
    assert tokens == char_encode("brown" + key_opening("sleeve"))
    assert end.value_id == "red_brown"
    # "ro" is unique: the rest of "rose" and the next key are forced in one go.
    tokens, end = forced_walk(walk(trie, char_encode("ro")))
    assert tokens == char_encode("se" + key_opening("sleeve")) and end.value_id == "rose"


def test_categories_sharing_a_prefix() -> None:
    plan = build_plan(toy_taxonomy(), "en", char_encode, summary_enabled=False)
    tokens, after_sh = forced_walk(plan.category.root)
    assert tokens == char_encode("sh")  # every category starts with "sh": no forward pass needed
    assert set(after_sh.children) == {ord("i"), ord("o")}
    after_sho = walk(plan.category, char_encode("sho"))
    assert set(after_sho.children) == {ord("e"), ord("r")}
    assert after_sho.first_value == "shoes"
    assert plan.category.root.first_value == "shirt"


# --- what the plan refuses -------------------------------------------------------------------
def test_overlapping_token_sequences_are_refused() -> None:
    with pytest.raises(ModelError, match="overlapping"):
        ChoiceTrie.build("color", [("red", [1, 2]), ("red_brown", [1, 2, 3])], None)
    with pytest.raises(ModelError, match="overlapping"):
        ChoiceTrie.build("color", [("red", [1, 2, 3]), ("dark_red", [1, 2])], None)
    with pytest.raises(ModelError, match="overlapping"):
        ChoiceTrie.build("color", [("red", [1, 2]), ("also_red", [1, 2])], None)


def test_a_label_the_tokenizer_merges_with_the_opening_quote_is_refused() -> None:
    def merging_encode(text: str) -> list[int]:
        """Characters, except that a quote followed by '-' is one token (as BPE merges do)."""
        tokens, index = [], 0
        while index < len(text):
            if text.startswith('"-', index):
                tokens.append(1_000_000)
                index += 2
            else:
                tokens.append(ord(text[index]))
                index += 1
        return tokens

    colors = toy_taxonomy().attributes["color"]
    assert build_plan(toy_taxonomy(), "en", merging_encode, summary_enabled=False)  # no label starts with '-'
    dashed = {
        "color": {
            "label": {"en": "Color", "zh": "颜色"},
            "values": [{"id": v.id, "en": v.en, "zh": v.zh} for v in colors.values]
            + [{"id": "dash", "en": "-dash", "zh": "-虚线"}],
        },
        "sleeve": {"label": {"en": "Sleeve", "zh": "袖长"}, "values": [{"id": "short", "en": "short", "zh": "短"}]},
        "heel": {"label": {"en": "Heel", "zh": "跟高"}, "values": [{"id": "flat", "en": "flat", "zh": "平跟"}]},
    }
    with pytest.raises(ModelError, match="merges the color label '-dash'"):
        build_plan(toy_taxonomy(attributes=dashed), "en", merging_encode, summary_enabled=False)


def test_a_taxonomy_without_global_attributes_is_refused() -> None:
    taxonomy = toy_taxonomy(
        global_attributes=[],
        categories=[{"id": "shirt", "en": "shirt", "zh": "衬衫", "attributes": ["color", "sleeve"]}],
    )
    with pytest.raises(ModelError, match="global attribute"):
        build_plan(taxonomy, "en", char_encode, summary_enabled=False)


# --- the summary's vocabulary ----------------------------------------------------------------
def test_summary_vocabulary_allows_text_and_closes_on_a_quote() -> None:
    table: list[bytes | None] = [
        b"a", b" red", b'"', b'"}', b'" }\n', b'\\', b"x\"y", b"\n", b"\x7f", None, b"", b'"a', "é".encode(),
    ]  # fmt: skip
    allowed, closers = summary_vocabulary(table)
    assert allowed == [0, 1, 12]  # plain text, UTF-8 included
    assert closers == [2, 3, 4]  # a quote, alone or before the closing brace / whitespace
    # A quote followed by more text never closes: it would start a second string.
    assert 11 not in allowed and 11 not in closers


def test_byte_level_token_bytes_decodes_gpt2_style_tokens() -> None:
    # Byte-level BPE writes a space as 'Ġ' (U+0120) and a newline as 'Ċ' (U+010A).
    vocabulary = {"a": 0, "Ġred": 1, "Ċ": 2, "<|im_end|>": 3, "中": 4, "ÃŃ": 5, "far": 99}
    table = byte_level_token_bytes(vocabulary, special_ids={3}, size=6)
    assert table[0] == b"a"
    assert table[1] == b" red"
    assert table[2] == b"\n"
    assert table[3] is None  # special tokens never appear in a summary
    assert table[4] is None  # not a byte-level character: an added word piece
    assert table[5] == "í".encode()  # two byte-level characters, one UTF-8 character
    assert len(table) == 6  # ids beyond the model's vocabulary are ignored
