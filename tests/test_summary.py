"""The summary and the prompt around it: every natural ending closes the summary (`"`, `."`,
`"}`), added tokens never appear in it, the cap is the taxonomy's characters in the prompt's
language, and the prompt asks exactly for what the settings decode (each category's own value
lists; no summary asked when it is off)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.constrained import summary_text, summary_vocabulary
from pipeline.decoding import Row
from pipeline.inference import TaggingEngine
from pipeline.model_loading import load_model
from pipeline.prompts import build_prompt
from pipeline.real_vocab import ADDED_TOKENS, FIRST_ADDED_ID
from schemas.taxonomy import Taxonomy
from tests.conftest import engine_settings, random_images
from tests.test_decoding import category_plan


def test_closers_are_every_token_ending_text_with_the_quote() -> None:
    table: list[bytes | None] = [b"a", b'"', b'."', b'"}', b' style."}', b'"x', b'""', b"\\", b"\n", b'\\"', None]
    allowed, closers = summary_vocabulary(table)
    assert allowed == [0]
    assert closers == [1, 2, 3, 4]
    assert [summary_text(table[i] or b"") for i in closers] == [b"", b".", b"", b" style."]


def test_a_closing_token_ends_the_summary_with_its_text() -> None:
    row = Row(plan=category_plan(), summary_cap=50, summary_chars=120)
    row.start()
    row.decide({1: 1.0, 2: 0.0, 5: 0.0})
    row.in_summary, row.done = True, False
    row.take_summary_token(10, b"A red dress", closes=False)
    assert not row.done and row.pending[-1] == 10
    row.take_summary_token(1189, b".", closes=True)  # '."' as in Qwen's vocabulary
    assert row.done and row.summary == "A red dress."
    assert row.answer[-1] == 1189


def test_the_cap_counts_characters_not_tokens() -> None:
    row = Row(plan=category_plan(), summary_cap=256, summary_chars=5)
    row.in_summary = True
    for token, text in enumerate(["连衣", "裙，方", "领"]):
        row.take_summary_token(token, text.encode(), closes=False)
        if row.done:
            break
    assert row.done and row.summary == "连衣裙，方" and len(row.summary_tokens) == 2
    half = Row(plan=category_plan(), summary_cap=256, summary_chars=2)
    half.in_summary = True
    half.take_summary_token(0, "连".encode()[:2], closes=False)  # half a character counts as none yet
    assert not half.done


def test_added_tokens_never_enter_a_summary(qwen_model_dir: Path, taxonomy: Taxonomy) -> None:
    settings = engine_settings(qwen_model_dir)
    engine = TaggingEngine(load_model(settings), taxonomy, settings)
    added = range(FIRST_ADDED_ID, FIRST_ADDED_ID + len(ADDED_TOKENS))
    assert not engine.summary_mask[list(added)].any()
    assert 1189 in engine.closers  # '."'
    assert {engine.loaded.tokenizer.convert_tokens_to_ids(t) for t in ('"', '"}')} <= engine.closers


def test_a_chinese_summary_reaches_its_character_cap(qwen_model_dir: Path, taxonomy: Taxonomy) -> None:
    settings = engine_settings(qwen_model_dir, prompt_language="zh", summary_max_tokens=256)
    engine = TaggingEngine(load_model(settings), taxonomy, settings)
    tags, _ = engine.tag(random_images(2, seed=51))
    for item in tags:
        closed = item.answer_ids[-1] in engine.closers
        assert item.summary is not None
        assert closed or len(item.summary) == taxonomy.summary_max_chars, (len(item.summary), item.summary)
    assert any(len(item.summary or "") == taxonomy.summary_max_chars for item in tags)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_prompt_lists_each_categorys_own_values(taxonomy: Taxonomy, language: str) -> None:
    prefix = build_prompt(taxonomy, language, 40).prefix
    t_shirt = taxonomy.categories["t_shirt"]
    neckline = next(a for a in t_shirt.attributes if a.name == "neckline")
    assert len(neckline.values) < len(taxonomy.attributes["neckline"].values)
    own = ", ".join(value.label(language) for value in neckline.values)
    everything = ", ".join(value.label(language) for value in taxonomy.attributes["neckline"].values)
    assert f"  - neckline ({neckline.label(language)}): {own}\n" in prefix
    assert everything not in prefix.split(t_shirt.value.label(language) + ":")[1].split("\n- ")[0]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_task_asks_for_a_summary_only_when_one_is_decoded(taxonomy: Taxonomy, language: str) -> None:
    on = build_prompt(taxonomy, language, 40).prefix
    off = build_prompt(taxonomy, language, 0).prefix
    assert '"summary"' in on and "summary" not in off.split("<|im_start|>user")[1]
