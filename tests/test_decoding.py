"""The per-row decoding state on a toy trie: exact per-value confidences when values share token
prefixes (the issue's two cases, nested branches, when scoring is skipped), forced tokens."""

from __future__ import annotations

import pytest

from pipeline.constrained import ChoiceTrie, DecodingPlan
from pipeline.decoding import Row, candidate, leaf_paths
from schemas.taxonomy import CATEGORY

# Token ids: 1 半, 2 连, 3 衣, 4 体, 5 外, 6 套, 7 身, 8 裤, 9 the closing text. dress and jumpsuit
# share their first token (连衣裙 / 连体裤); skirt and coat do not.
SKIRT, DRESS, JUMPSUIT, COAT = [1, 7, 9], [2, 3, 9], [2, 4, 9], [5, 6, 9]


def plan(*candidates: tuple[str, list[int]]) -> DecodingPlan:
    trie = ChoiceTrie.build(CATEGORY, list(candidates), None)
    values = [value for value, _ in candidates]
    return DecodingPlan(category=trie, attributes={}, order=dict.fromkeys(values, ()), summary_enabled=False)


def category_plan() -> DecodingPlan:
    return plan(("skirt", SKIRT), ("dress", DRESS), ("jumpsuit", JUMPSUIT), ("coat", COAT))


def started(decoding_plan: DecodingPlan) -> Row:
    row = Row(plan=decoding_plan, summary_cap=0)
    row.start()
    return row


def test_runner_up_is_the_second_value_not_a_branch() -> None:
    """P(连)=0.45 split 0.10/0.90, P(半身裙)=0.50: skirt 0.50, runner-up jumpsuit 0.405 (not dress 0.45)."""
    row = started(category_plan())
    candidates = row.decide({1: 0.50, 2: 0.45, 5: 0.05})
    assert [c.value for c in candidates] == ["dress", "jumpsuit"]
    row.resolve({"dress": 0.10, "jumpsuit": 0.90})
    tag = row.tags[CATEGORY]
    assert (tag.value, tag.runner_up) == ("skirt", "jumpsuit")
    assert tag.confidence == pytest.approx(0.50)
    assert tag.runner_up_confidence == pytest.approx(0.405)
    assert row.answer == SKIRT and row.done


def test_the_most_probable_value_wins_over_the_most_probable_branch() -> None:
    """P(连)=0.52 split evenly, skirt 0.46: skirt is chosen at 0.46, runner-up at 0.26."""
    row = started(category_plan())
    candidates = row.decide({1: 0.46, 2: 0.52, 5: 0.02})
    assert [c.value for c in candidates] == ["dress", "jumpsuit"]
    row.resolve({"dress": 0.5, "jumpsuit": 0.5})
    tag = row.tags[CATEGORY]
    assert tag.value == "skirt" and tag.confidence == pytest.approx(0.46)
    assert tag.runner_up in {"dress", "jumpsuit"} and tag.runner_up_confidence == pytest.approx(0.26)


def test_a_value_inside_the_shared_branch_can_win() -> None:
    row = started(category_plan())
    row.decide({1: 0.30, 2: 0.65, 5: 0.05})
    row.resolve({"dress": 0.8, "jumpsuit": 0.2})
    tag = row.tags[CATEGORY]
    assert (tag.value, tag.confidence, tag.runner_up) == ("dress", pytest.approx(0.52), "skirt")
    assert tag.runner_up_confidence == pytest.approx(0.30)
    assert row.answer == DRESS
    assert (row.decided, row.forced) == (2, 1)  # 连 and 衣 were choices; the closing text is forced


def test_no_scoring_when_the_shared_branch_cannot_come_second() -> None:
    row = started(category_plan())
    assert row.decide({1: 0.50, 2: 0.10, 5: 0.40}) == []
    tag = row.tags[CATEGORY]
    assert (tag.value, tag.runner_up) == ("skirt", "coat")
    assert tag.confidence == pytest.approx(0.50) and tag.runner_up_confidence == pytest.approx(0.40)


def test_confidences_are_the_exact_distribution_over_all_values() -> None:
    """Whatever the numbers, chosen + runner-up are the top two of the exact per-value products."""
    row_chances = {1: 0.2, 2: 0.5, 5: 0.3}
    within = {"dress": 0.3, "jumpsuit": 0.7}
    exact = {"skirt": 0.2, "coat": 0.3, "dress": 0.15, "jumpsuit": 0.35}
    row = started(category_plan())
    row.decide(row_chances)
    row.resolve(within)
    tag = row.tags[CATEGORY]
    top = sorted(exact.items(), key=lambda item: -item[1])
    assert (tag.value, tag.confidence) == (top[0][0], pytest.approx(top[0][1]))
    assert (tag.runner_up, tag.runner_up_confidence) == (top[1][0], pytest.approx(top[1][1]))
    assert sum(exact.values()) == pytest.approx(1.0)


def test_nested_branches_are_scored_along_every_branch_point() -> None:
    """连衣裙, 连衣裤 and 连体裤: the candidate for 连衣裙 passes two branching nodes."""
    nested = plan(("skirt", SKIRT), ("dress", [2, 3, 7, 9]), ("culottes", [2, 3, 8, 9]), ("jumpsuit", JUMPSUIT))
    root = nested.category.root
    assert [value for value, _ in leaf_paths(root)] == ["skirt", "dress", "culottes", "jumpsuit"]
    dress = candidate(root, "dress", [2, 3, 7, 9])
    assert dress.inputs == (2, 3)  # the closing 9 after the last choice needs no logits
    assert [(p.position, p.options, p.token) for p in dress.points] == [(0, (3, 4), 3), (1, (7, 8), 7)]
    jumpsuit = candidate(root, "jumpsuit", JUMPSUIT)
    assert jumpsuit.inputs == (2,) and [(p.position, p.token) for p in jumpsuit.points] == [(0, 4)]
    row = started(nested)
    assert [c.value for c in row.decide({1: 0.1, 2: 0.9})] == ["dress", "culottes", "jumpsuit"]
    row.resolve({"dress": 0.5 * 0.4, "culottes": 0.5 * 0.6, "jumpsuit": 0.5})
    tag = row.tags[CATEGORY]
    assert (tag.value, tag.confidence) == ("jumpsuit", pytest.approx(0.45))
    assert (tag.runner_up, tag.runner_up_confidence) == ("culottes", pytest.approx(0.27))


def test_forced_prefix_and_single_value_need_no_decision() -> None:
    row = started(plan(("only", [4, 5, 9])))
    assert row.done and row.answer == [4, 5, 9] and row.decided == 0
    tag = row.tags[CATEGORY]
    assert (tag.value, tag.confidence, tag.runner_up) == ("only", 1.0, None)
