"""Per-row decoding state: one image's walk through the constrained answer, over the tries of
constrained.py. A Row holds the tokens it must append next (forced and decided), the choice in
progress and the tags finished so far; the engine feeds it one decision per forward pass.

Exact per-value confidence. At a choice's branching node the engine gives the probabilities of
the node's children, renormalized over them. A child leading to one value gives that value's
probability outright. A child shared by several values (real labels share first tokens: 连衣裙 /
连体裤 both start with 连) only bounds theirs; its values are scored exactly by teacher-forcing
their remaining tokens in one batched extra pass, and only where that bound could still put one
of them first or second. The chosen value is then the most probable allowed value, its
confidence P(value) / sum of P(allowed values), and the runner-up the second value with its own
probability, never a whole branch's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.constrained import ChoiceTrie, DecodingPlan, TrieNode, forced_walk
from schemas.results import AttributeTag
from schemas.taxonomy import CATEGORY


@dataclass(frozen=True)
class BranchPoint:
    """Where a candidate's tokens pass a branching node: the logits at input position `position`
    are renormalized over `options`, and `token` is the candidate's next token among them."""

    position: int
    options: tuple[int, ...]
    token: int


@dataclass(frozen=True)
class Candidate:
    """One value under a shared branch, to score by teacher forcing: feed `inputs` after the row's
    current position; P(value | branch) is the product over `points`."""

    value: str
    inputs: tuple[int, ...]
    points: tuple[BranchPoint, ...]


@dataclass
class Choice:
    attribute: str
    trie: ChoiceTrie
    node: TrieNode
    confidence: float = 1.0
    runner_up: str | None = None
    runner_up_confidence: float = 0.0
    masses: dict[str, float] = field(default_factory=dict)  # value -> exact probability, when known
    paths: dict[str, list[int]] = field(default_factory=dict)  # value -> its tokens from the decision node
    branch_mass: dict[str, float] = field(default_factory=dict)  # value awaiting a score -> its branch's mass


def leaf_paths(node: TrieNode) -> list[tuple[str, list[int]]]:
    """Every value under node with its tokens from node, in taxonomy order."""
    found: list[tuple[str, list[int]]] = [(node.value_id, [])] if node.value_id is not None else []
    for token, child in node.children.items():
        found += [(value, [token, *rest]) for value, rest in leaf_paths(child)]
    return found


def candidate(node: TrieNode, value: str, path: list[int]) -> Candidate:
    """Teacher-forcing input for value's path below node: up to its last branching node."""
    points, current = [], node.children[path[0]]
    for position, token in enumerate(path[1:]):
        if len(current.children) > 1:
            points.append(BranchPoint(position, tuple(current.children), token))
        current = current.children[token]
    last = points[-1].position if points else 0
    return Candidate(value=value, inputs=tuple(path[: last + 1]), points=tuple(points))


def branching_nodes(node: TrieNode, path: list[int]) -> int:
    """How many of path's tokens below node were choices among several (node itself not counted)."""
    count, current = 0, node.children[path[0]]
    for token in path[1:]:
        count += len(current.children) > 1
        current = current.children[token]
    return count


@dataclass
class Row:
    """One image's walk through the answer."""

    plan: DecodingPlan
    summary_cap: int  # most summary tokens (a bound; the cap that counts is summary_chars)
    summary_chars: int = 0  # the taxonomy's max_chars: characters in the prompt's language
    pending: list[int] = field(default_factory=list)  # to append in the next forward pass
    answer: list[int] = field(default_factory=list)  # every token appended so far, in order
    choice: Choice | None = None
    category: str | None = None
    queue: list[str] = field(default_factory=list)
    tags: dict[str, AttributeTag] = field(default_factory=dict)
    in_summary: bool = False
    summary_tokens: list[int] = field(default_factory=list)
    summary_bytes: bytearray = field(default_factory=bytearray)
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

    def decide(self, chances: dict[int, float]) -> list[Candidate]:
        """Take the probabilities of the branching node's children (renormalized over them). Settles
        the choice when they suffice; otherwise returns the candidates to score (then: resolve)."""
        choice = self.choice
        assert choice is not None
        node, known, shared = choice.node, {}, {}
        for token, child in node.children.items():
            paths = leaf_paths(child)
            for value, rest in paths:
                choice.paths[value] = [token, *rest]
            if len(paths) == 1:
                known[paths[0][0]] = chances[token]
            else:
                shared[token] = (chances[token], [value for value, _ in paths])
        choice.masses = known
        # A shared branch's mass bounds each of its values: score it only if one could come second.
        second = sorted(known.values(), reverse=True)[1] if len(known) > 1 else 0.0
        needed = {value: mass for mass, values in shared.values() if mass > second for value in values}
        if not needed:
            self._settle()
            return []
        choice.branch_mass = needed
        return [candidate(node, value, choice.paths[value]) for value in needed]

    def resolve(self, scores: dict[str, float]) -> None:
        """Each candidate's probability given its branch (the product over its branch points)."""
        choice = self.choice
        assert choice is not None
        for value, mass in choice.branch_mass.items():
            choice.masses[value] = mass * scores[value]
        choice.branch_mass = {}
        self._settle()

    def _settle(self) -> None:
        """Take the most probable value (taxonomy order breaks ties), the runner-up second."""
        choice = self.choice
        assert choice is not None
        order = list(choice.paths)
        ranked = sorted(choice.masses.items(), key=lambda item: (-item[1], order.index(item[0])))
        best, confidence = ranked[0]
        choice.confidence = confidence
        if len(ranked) > 1:
            choice.runner_up, choice.runner_up_confidence = ranked[1]
        path = choice.paths[best]
        decided = 1 + branching_nodes(choice.node, path)
        self.decided += decided
        self.forced += len(path) - decided
        self._append(path)
        node = choice.node
        for token in path:
            node = node.children[token]
        choice.node = node
        self._walk()

    def take_summary_token(self, token: int, text: bytes, closes: bool) -> None:
        """Take a summary token: text is what it adds before any closing quote; a closing token
        (`"`, `."`, `"}` ...) ends the summary with no further pass."""
        self.decided += 1
        self.summary_tokens.append(token)
        self.summary_bytes += text
        self.answer.append(token)
        if closes:
            self.done = True
            return
        self.pending.append(token)
        characters = len(self.summary_bytes.decode("utf-8", errors="ignore"))
        if len(self.summary_tokens) >= self.summary_cap or 0 < self.summary_chars <= characters:
            self.done = True  # a cap: the closing quote is implied, no forward pass needed

    @property
    def summary(self) -> str | None:
        text = self.summary_bytes.decode("utf-8", errors="ignore").strip()
        if self.summary_chars:
            text = text[: self.summary_chars].rstrip()
        return text or None

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
