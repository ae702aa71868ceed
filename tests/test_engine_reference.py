"""The engine against a plain transformers forward (fp32, CPU, the real-vocabulary tiny model).

At every decision the engine's logits, computed on its cached prefix with per-row positions, gaps
masked and forced tokens riding along, must equal `model.model(...)` on the full token sequence
with transformers computing positions itself: rows steered onto different categories (different
paths, different numbers of tokens per pass), a second batch on the reused prefix cache, English
and Chinese, the summary on and off. A negative control (the answer's positions shifted by one) must fail the
same comparison, so the test can fail. The confidences are checked the same way: every allowed
value scored by full forwards, the engine's value and runner-up are the top two, exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.decoding import Candidate, Row, leaf_paths
from pipeline.inference import TaggingEngine, restricted_probabilities
from pipeline.model_loading import load_model
from schemas.images import PreparedImage
from schemas.taxonomy import CATEGORY, Taxonomy
from tests.conftest import engine_settings, random_images

TOLERANCE = 1e-4
STEERED = ("dress", "hat", "jumpsuit")  # one row per path; jumpsuit and dress share 连 in Chinese


class SteeredRow(Row):
    """A row whose category is fixed in advance (so a batch holds several paths); everything else
    the model decides."""

    target: str = ""

    def decide(self, chances: dict[int, float]) -> list[Candidate]:
        assert self.choice is not None
        if self.choice.attribute == CATEGORY:
            node = self.choice.node
            chances = {t: float(any(v == self.target for v, _ in leaf_paths(node.children[t]))) for t in chances}
        return super().decide(chances)

    def resolve(self, scores: dict[str, float]) -> None:
        assert self.choice is not None
        if self.choice.attribute == CATEGORY:
            scores = {value: float(value == self.target) for value in scores}
        super().resolve(scores)


class RecordingEngine(TaggingEngine):
    """The engine, noting at each decision the row's answer so far and the logits it decided on."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.records: list[tuple[int, list[int], Any]] = []
        self.rows: list[Row] = []
        self.steered: tuple[str, ...] = STEERED

    def _decode(self, rows: list[Row], state: Any, hidden: Any) -> tuple[int, int]:
        for index, row in enumerate(rows):
            steered = SteeredRow(plan=row.plan, summary_cap=row.summary_cap)
            steered.target = self.steered[index % len(self.steered)]
            rows[index] = steered
        self.rows = rows
        return super()._decode(rows, state, hidden)

    def _decide(self, ready: list[tuple[Row, Any]]) -> Any:
        if ready:
            logits = self.loaded.model.lm_head(torch.stack([hidden for _, hidden in ready])).float()
            for (row, _), row_logits in zip(ready, logits, strict=True):
                slot = next(i for i, r in enumerate(self.rows) if r is row)
                self.records.append((slot, list(row.answer), row_logits.clone()))
        return super()._decide(ready)


@torch.inference_mode()
def reference_logits(engine: TaggingEngine, image: PreparedImage, answers: list[list[int]], shift: int = 0) -> Any:
    """lm_head logits after each answer prefix, from one plain forward of the longest sequence."""
    model = engine.loaded.model
    prompt = engine.prefix_ids + engine.tail_ids
    longest = max(answers, key=len)
    ids = torch.tensor([prompt + longest])
    pixel_values, grid = engine.batcher([image])
    types = (ids == model.config.image_token_id).int()
    positions = None
    if shift:
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
        # The answer's positions one off from the prompt's (a uniform shift would change nothing:
        # rotary attention sees only distances).
        positions[..., len(prompt) :] += shift
    output = model.model(
        input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=types, position_ids=positions
    )
    for answer in answers:
        assert longest[: len(answer)] == answer  # every decision lies on the row's final path
    at = torch.tensor([len(prompt) + len(answer) - 1 for answer in answers])
    return model.lm_head(output.last_hidden_state[0, at]).float()


@pytest.fixture(scope="module")
def engines(qwen_model_dir: Path, taxonomy: Taxonomy) -> dict[tuple[str, int], RecordingEngine]:
    built = {}
    for language in ("en", "zh"):
        for summary in (0, 5):
            settings = engine_settings(qwen_model_dir, prompt_language=language, summary_max_tokens=summary)
            built[(language, summary)] = RecordingEngine(load_model(settings), taxonomy, settings)
    return built


@pytest.mark.parametrize("summary", [0, 5])
@pytest.mark.parametrize("language", ["en", "zh"])
def test_every_decision_equals_a_plain_forward(
    engines: dict[tuple[str, int], RecordingEngine], language: str, summary: int
) -> None:
    engine = engines[(language, summary)]
    # A second batch starts from the reused prefix cache (once is enough to show it).
    for batch_seed in (31, 32) if (language, summary) == ("zh", 5) else (31,):
        engine.records = []
        images = random_images(3, seed=batch_seed)
        tags, _ = engine.tag(images)
        assert [t.attributes[CATEGORY].value for t in tags] == list(STEERED)
        assert len({len(t.attributes) for t in tags}) > 1  # the rows took paths of different lengths
        worst = shifted_best = 0.0
        for slot, image in enumerate(images):
            records = [(answer, logits) for s, answer, logits in engine.records if s == slot]
            ours = torch.stack([logits for _, logits in records])
            answers = [answer for answer, _ in records]
            worst = max(worst, float((ours - reference_logits(engine, image, answers)).abs().max()))
            shifted = reference_logits(engine, image, answers, shift=1)
            shifted_best = max(shifted_best, float((ours - shifted).abs().max()))
        assert worst < TOLERANCE, f"engine logits differ from the plain forward by {worst:.2e}"
        assert shifted_best > TOLERANCE * 10, "the comparison cannot tell positions shifted by one"


def value_probabilities(engine: TaggingEngine, image: PreparedImage, answer: list[int], node: Any) -> dict[str, float]:
    """Every value under node, scored by a full forward of the answer so far plus the value's tokens."""
    result = {}
    for value, path in leaf_paths(node):
        answers = [answer + path[:k] for k in range(len(path))]
        step_logits = reference_logits(engine, image, answers)
        probability, current = 1.0, node
        for k, token in enumerate(path):
            if len(current.children) > 1:
                options = list(current.children)
                probability *= restricted_probabilities(step_logits[k : k + 1], [options])[0][token]
            current = current.children[token]
        result[value] = probability
    return result


@pytest.mark.timeout(900)
def test_confidences_are_exact_per_value_probabilities(engines: dict[tuple[str, int], RecordingEngine]) -> None:
    """zh: shared first tokens. The chosen value and the runner-up are the top two of the exact
    per-value distribution, with their own probabilities."""
    engine = engines[("zh", 0)]
    engine.steered = ("bag",)  # 手拿包 / 手提包 share 手: the bag type needs the scoring pass
    try:
        images = random_images(1, seed=41)
        tags, _ = engine.tag(images)
    finally:
        engine.steered = STEERED
    plan = engine.plan
    checked = []
    for slot, (image, item) in enumerate(zip(images, tags, strict=True)):
        answer = engine.rows[slot].answer
        category = item.attributes[CATEGORY].value
        # The answer is the chosen values' token paths, one trie after the other.
        start = len(dict(leaf_paths(plan.category.root))[category])
        for name in plan.order[category]:
            root = plan.trie_for(category, name).root
            tag = item.attributes[name]
            shared = any(len(leaf_paths(child)) > 1 for child in root.children.values())
            if shared or name == "closure":  # a full forward per value is slow on a shared CPU
                exact = value_probabilities(engine, image, answer[:start], root)
                top = sorted(exact.items(), key=lambda kv: -kv[1])
                assert (tag.value, tag.runner_up) == (top[0][0], top[1][0]), name
                assert tag.confidence == pytest.approx(top[0][1], abs=1e-4)
                assert tag.runner_up_confidence == pytest.approx(top[1][1], abs=1e-4)
                checked.append((name, shared))
            start += len(dict(leaf_paths(root))[tag.value])
    assert sorted(checked) == [("bag_type", True), ("closure", False)]
