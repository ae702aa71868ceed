"""SKUTAG_DECODE_MODE: the static KV cache (preallocated slots, per-row writes, padded chunk
widths) and the compiled decode step give what the eager DynamicCache path gives, on the tiny model
with Qwen's real vocabulary, English and Chinese, for a batch of rows on different paths (a bag's
type needs the scoring pass in Chinese: 手拿包 / 手提包 share 手), a second batch on the kept
buffers and a batch of another size. The static path's decision logits are also checked against a
plain transformers forward, as the eager path's are in test_engine_reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.inference import ItemTags
from pipeline.kv_state import bucket, longest_structured_answer, slot_count
from pipeline.model_loading import load_model
from schemas.taxonomy import CATEGORY, Taxonomy
from tests.conftest import engine_settings, random_images
from tests.test_engine_reference import TOLERANCE, RecordingEngine, reference_logits

MIXED = ("dress", "bag", "hat", "jumpsuit", "shoes")  # five paths; dress / jumpsuit share 连 in zh


@pytest.fixture(scope="module")
def loaded(qwen_model_dir: Path) -> Any:
    return load_model(engine_settings(qwen_model_dir))


def engine(loaded: Any, taxonomy: Taxonomy, mode: str, language: str) -> RecordingEngine:
    settings = engine_settings(Path(loaded.model_id), prompt_language=language, decode_mode=mode)
    built = RecordingEngine(loaded, taxonomy, settings)
    built.steered = MIXED
    return built


def run(engine: RecordingEngine, batches: list[list[Any]]) -> tuple[list[ItemTags], int]:
    """Every batch in turn: their tags, and the scoring passes they took."""
    tags, scoring = [], 0
    for images in batches:
        batch_tags, stats = engine.tag(images)
        tags += batch_tags
        scoring += stats.scoring_passes
    return tags, scoring


def assert_same_tags(ours: list[ItemTags], eager: list[ItemTags]) -> None:
    assert len(ours) == len(eager)
    for item, expected in zip(ours, eager, strict=True):
        assert item.answer_ids == expected.answer_ids
        assert item.summary == expected.summary
        assert item.attributes.keys() == expected.attributes.keys()
        for name, tag in item.attributes.items():
            want = expected.attributes[name]
            assert (tag.value, tag.runner_up) == (want.value, want.runner_up), name
            assert tag.confidence == pytest.approx(want.confidence, abs=TOLERANCE), name
            assert (tag.runner_up_confidence or 0.0) == pytest.approx(want.runner_up_confidence or 0.0, abs=TOLERANCE)


BATCHES = [random_images(5, seed=51), random_images(5, seed=52), random_images(2, seed=53)]


@pytest.fixture(scope="module")
def eager_tags(loaded: Any, taxonomy: Taxonomy) -> dict[str, tuple[list[ItemTags], int]]:
    return {language: run(engine(loaded, taxonomy, "eager", language), BATCHES) for language in ("en", "zh")}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_static_decoding_equals_eager(
    loaded: Any, taxonomy: Taxonomy, eager_tags: dict[str, tuple[list[ItemTags], int]], language: str
) -> None:
    expected, eager_scoring = eager_tags[language]
    assert [t.attributes[CATEGORY].value for t in expected[:5]] == list(MIXED)
    assert any(t.summary for t in expected)
    static = engine(loaded, taxonomy, "static", language)
    tags, scoring = run(static, BATCHES)
    assert_same_tags(tags, expected)
    assert scoring == eager_scoring
    if language == "zh":
        assert scoring > 0  # the scoring pass ran on copies of the static rows
    assert static._slot_buffers is not None
    assert sorted(static._slot_buffers._caches) == [2, 5]  # kept per batch size, the prefix written once


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
@pytest.mark.parametrize("language", ["en", "zh"])
def test_compiled_decoding_equals_eager(
    loaded: Any, taxonomy: Taxonomy, eager_tags: dict[str, tuple[list[ItemTags], int]], language: str
) -> None:
    """torch.compile of the decode step on the CPU (inductor; about 30 s to compile here)."""
    expected, _ = eager_tags[language]
    compiled = engine(loaded, taxonomy, "compiled", language)
    tags, _ = run(compiled, BATCHES[:2])  # a second batch reuses the buffers and the graphs
    assert_same_tags(tags, expected[:10])


@pytest.mark.parametrize("language", ["en", "zh"])
def test_static_decisions_equal_a_plain_forward(loaded: Any, taxonomy: Taxonomy, language: str) -> None:
    static = engine(loaded, taxonomy, "static", language)
    images = random_images(3, seed=61)
    static.tag(images)
    worst = 0.0
    for slot, image in enumerate(images):
        records = [(answer, logits) for s, answer, logits in static.records if s == slot]
        ours = torch.stack([logits for _, logits in records])
        reference = reference_logits(static, image, [answer for answer, _ in records])
        worst = max(worst, float((ours - reference).abs().max()))
    assert worst < TOLERANCE, f"static-cache logits differ from the plain forward by {worst:.2e}"


def test_every_answer_fits_the_preallocated_slots(loaded: Any, taxonomy: Taxonomy) -> None:
    """The bound comes from the plan: the longest answer it allows, plus the summary cap, plus
    the widest padded chunk; the longest real answer must fit under it."""
    static = engine(loaded, taxonomy, "static", "zh")
    prompt = len(static.prefix_ids) + len(static.tail_ids)
    structured = longest_structured_answer(static.plan)
    slots = slot_count(prompt, static.plan, static.settings.summary_max_tokens)
    assert slots == prompt + structured + static.settings.summary_max_tokens + structured
    tags, _ = static.tag(random_images(5, seed=71))
    assert max(len(item.answer_ids) for item in tags) <= structured + static.settings.summary_max_tokens


def test_chunk_widths_fall_in_a_few_buckets() -> None:
    assert [bucket(width, 90) for width in (1, 2, 4, 5, 16, 17, 64, 65, 90)] == [1, 4, 4, 16, 16, 64, 64, 90, 90]
