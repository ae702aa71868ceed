"""Qwen's real vocabulary, rebuilt offline (pipeline/real_vocab.py): the tokenizer reproduces the
published ids, every taxonomy value is reachable through the tries on both tokenizers, and the
engine's answers on the real-vocabulary tiny model are valid and tokenized canonically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from pipeline.constrained import DecodingPlan, build_plan
from pipeline.decoding import Row
from pipeline.inference import TaggingEngine
from pipeline.model_loading import load_model
from pipeline.prompts import build_prompt
from pipeline.real_vocab import ADDED_TOKENS, FIRST_ADDED_ID
from schemas.taxonomy import CATEGORY, Language, Taxonomy
from tests.conftest import engine_settings, random_images


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(qwen_model_dir)


def encoder(tokenizer: Any) -> Any:
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def test_the_tokenizer_gives_qwens_ids(qwen_tokenizer: Any, qwen_model_dir: Path) -> None:
    encode = encoder(qwen_tokenizer)
    assert encode("Hello, world!") == [9707, 11, 1879, 0]  # Qwen2/3's known encoding
    assert encode(' style."}') == [1707, 1189, 92]  # '."' is one token: the summary must close on it
    for offset, (token, special) in enumerate(ADDED_TOKENS):
        assert qwen_tokenizer.convert_tokens_to_ids(token) == FIRST_ADDED_ID + offset
        assert qwen_tokenizer.added_tokens_decoder[FIRST_ADDED_ID + offset].special is special
    assert qwen_tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]
    assert encode("cafe\u0301") == encode("café")  # NFC
    assert encode("2026") == [17, 15, 17, 21]  # digits one by one, as Qwen's pattern splits them


def test_the_model_has_the_real_shape(qwen_model_dir: Path) -> None:
    import json

    config = json.loads((qwen_model_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936
    assert config["image_token_id"] == 151655 and config["vision_start_token_id"] == 151652


def plans(tokenizer: Any, taxonomy: Taxonomy) -> dict[Language, DecodingPlan]:
    encode = encoder(tokenizer)
    return {language: build_plan(taxonomy, language, encode, summary_enabled=True) for language in ("en", "zh")}


@pytest.mark.parametrize("kind", ["tiny", "qwen"])
def test_every_value_is_reachable(kind: str, request: pytest.FixtureRequest, taxonomy: Taxonomy) -> None:
    """For every category and every attribute asked for it, each allowed value can be decided."""
    directory = request.getfixturevalue("tiny_model_dir" if kind == "tiny" else "qwen_model_dir")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for language, plan in plans(tokenizer, taxonomy).items():
        first = next(iter(taxonomy.categories))
        for category in taxonomy.categories:
            for name in (CATEGORY, *plan.order[category]) if category == first else plan.order[category]:
                trie = plan.category if name == CATEGORY else plan.trie_for(category, name)
                for value in trie_values(trie.root):
                    tags = decide(plan, category, name, value)
                    assert tags[name] == value, (language, category, name, value)


def trie_values(node: Any) -> list[str]:
    found = [node.value_id] if node.value_id else []
    for child in node.children.values():
        found += trie_values(child)
    return found


def decide(plan: DecodingPlan, category: str, attribute: str, value: str) -> dict[str, str]:
    """Run a row through the answer with all probability on category and, at attribute, on value
    (elsewhere on the first option); scoring requests get the same certainty."""
    row = Row(plan=plan, summary_cap=0)
    row.start()
    while row.choice is not None:
        name = row.choice.attribute
        target = value if name == attribute else category if name == CATEGORY else None
        options = row.branch_tokens
        chosen = options[0] if target is None else next(t for t in options if target in subtree(row.choice.node, t))
        candidates = row.decide({token: float(token == chosen) for token in options})
        if candidates:
            wanted = target or candidates[0].value
            row.resolve({c.value: float(c.value == wanted) for c in candidates})
    return {name: tag.value for name, tag in row.tags.items()}


def subtree(node: Any, token: int) -> list[str]:
    return trie_values(node.children[token])


def test_real_labels_share_prefixes(qwen_tokenizer: Any, taxonomy: Taxonomy) -> None:
    """The paths the tiny tokenizer never exercises: labels of several tokens, shared first tokens."""
    zh = plans(qwen_tokenizer, taxonomy)["zh"]
    root = zh.category.root
    shared = [token for token, child in root.children.items() if len(trie_values(child)) > 1]
    assert shared, "连衣裙 / 连体裤 should share their first token"


@pytest.mark.parametrize("language", ["en", "zh"])
def test_answers_are_valid_and_tokenized_canonically(
    qwen_model_dir: Path, qwen_tokenizer: Any, taxonomy: Taxonomy, language: str
) -> None:
    """The model sees its answer tokenized the way the tokenizer would tokenize the answer's text."""
    from pipeline.result_checks import result_problems
    from tests.test_inference import as_result

    settings = engine_settings(qwen_model_dir, summary_max_tokens=0, prompt_language=language)
    engine = TaggingEngine(load_model(settings), taxonomy, settings)
    tags, _ = engine.tag(random_images(6, seed=21))
    after_image = build_prompt(taxonomy, settings.prompt_language, 0).after_image
    encode = encoder(qwen_tokenizer)
    for item in tags:
        assert result_problems(as_result(engine, item), taxonomy) == []
        text = qwen_tokenizer.decode(list(item.answer_ids))
        assert encode(after_image + text) == encode(after_image) + list(item.answer_ids), text
        assert text.endswith('"}')
