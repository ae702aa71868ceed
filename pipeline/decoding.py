"""Per-row decoding state: one image's walk through the constrained answer, over the tries of
constrained.py. A Row holds the tokens it must append next (forced and decided), the choice in
progress and the tags finished so far; the engine feeds it one decision per forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.constrained import ChoiceTrie, DecodingPlan, TrieNode, forced_walk
from schemas.results import AttributeTag
from schemas.taxonomy import CATEGORY


@dataclass
class Choice:
    attribute: str
    trie: ChoiceTrie
    node: TrieNode
    confidence: float = 1.0
    runner_up: str | None = None
    runner_up_confidence: float = 0.0


@dataclass
class Row:
    """One image's walk through the answer."""

    plan: DecodingPlan
    summary_cap: int
    pending: list[int] = field(default_factory=list)  # to append in the next forward pass
    answer: list[int] = field(default_factory=list)  # every token appended so far, in order
    choice: Choice | None = None
    category: str | None = None
    queue: list[str] = field(default_factory=list)
    tags: dict[str, AttributeTag] = field(default_factory=dict)
    in_summary: bool = False
    summary_tokens: list[int] = field(default_factory=list)
    done: bool = False
    decided: int = 0
    forced: int = 0

    @property
    def ready(self) -> bool:
        """Open, with nothing left to append: its next token is a decision."""
        return not self.done and not self.pending

    def start(self) -> None:
        self.choice = Choice(CATEGORY, self.plan.category, self.plan.category.root)
        self._walk()

    @property
    def branch_tokens(self) -> list[int]:
        assert self.choice is not None
        return list(self.choice.node.children)

    def choose(self, token: int, probabilities: dict[int, float]) -> None:
        """Take the decided token at a branching node; probabilities are over the node's children."""
        choice = self.choice
        assert choice is not None
        for other, probability in probabilities.items():
            mass = choice.confidence * probability
            if other != token and mass > choice.runner_up_confidence:
                choice.runner_up = choice.node.children[other].first_value
                choice.runner_up_confidence = mass
        choice.confidence *= probabilities[token]
        choice.node = choice.node.children[token]
        self._append([token])
        self.decided += 1
        self._walk()

    def take_summary_token(self, token: int, closes: bool) -> None:
        self.decided += 1
        if closes:
            self.done = True
            return
        self.summary_tokens.append(token)
        self._append([token])
        if len(self.summary_tokens) >= self.summary_cap:
            self.done = True  # the cap: the closing quote is implied, no forward pass needed

    def _append(self, tokens: list[int]) -> None:
        self.pending += tokens
        self.answer += tokens

    def _walk(self) -> None:
        """Append forced tokens until the next decision; finish attributes on the way."""
        while self.choice is not None:
            tokens, node = forced_walk(self.choice.node)
            self._append(tokens)
            self.forced += len(tokens)
            self.choice.node = node
            if not node.is_leaf:
                return
            self._finish_choice(self.choice, node)

    def _finish_choice(self, choice: Choice, leaf: TrieNode) -> None:
        assert leaf.value_id is not None
        self.tags[choice.attribute] = AttributeTag(
            value=leaf.value_id,
            confidence=_clamp(choice.confidence),
            runner_up=choice.runner_up,
            runner_up_confidence=_clamp(choice.runner_up_confidence) if choice.runner_up else None,
        )
        if choice.attribute == CATEGORY:
            self.category = leaf.value_id
            self.queue = list(self.plan.order[leaf.value_id])
        if self.queue:
            name = self.queue.pop(0)
            assert self.category is not None
            trie = self.plan.trie_for(self.category, name)
            self.choice = Choice(name, trie, trie.root)
            return
        self.choice = None
        if self.plan.summary_enabled and self.summary_cap > 0:
            self.in_summary = True
        else:
            self.done = True


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, round(value, 6)))
