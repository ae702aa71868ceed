"""Accuracy metrics of one attribute's predictions against gold, as plain functions of lists so
each can be checked by hand: accuracy, macro-F1, coverage and precision at a threshold, AUROC of
the confidence (does it rank right answers above wrong ones?), expected calibration error over
ten equal-width bins, the most confused value pairs, and the threshold that reaches a target
precision with the most coverage."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

ECE_BINS = 10


@dataclass(frozen=True)
class Scored:
    """One prediction with its gold answer."""

    predicted: str
    confidence: float
    gold: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.gold


def accuracy(items: Sequence[Scored]) -> float | None:
    return sum(i.correct for i in items) / len(items) if items else None


def macro_f1(items: Sequence[Scored]) -> float | None:
    """The unweighted mean of per-value F1 over every value seen in gold or predictions."""
    if not items:
        return None
    values = {i.gold for i in items} | {i.predicted for i in items}
    scores = []
    for value in sorted(values):
        tp = sum(1 for i in items if i.predicted == value and i.gold == value)
        fp = sum(1 for i in items if i.predicted == value and i.gold != value)
        fn = sum(1 for i in items if i.predicted != value and i.gold == value)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def at_threshold(items: Sequence[Scored], threshold: float) -> tuple[float | None, float | None]:
    """(coverage, precision): the share the threshold lets through unreviewed (confidence >=
    threshold, as routing does) and how often those are right."""
    if not items:
        return None, None
    kept = [i for i in items if i.confidence >= threshold]
    coverage = len(kept) / len(items)
    return coverage, (accuracy(kept) if kept else None)


def auroc(items: Sequence[Scored]) -> float | None:
    """P(a right answer's confidence > a wrong one's), ties counting half; None without both kinds."""
    right = [i.confidence for i in items if i.correct]
    wrong = [i.confidence for i in items if not i.correct]
    if not right or not wrong:
        return None
    # Rank-sum (Mann-Whitney U) with average ranks for ties: O(n log n).
    ordered = sorted([(c, True) for c in right] + [(c, False) for c in wrong], key=lambda pair: pair[0])
    rank_sum = 0.0
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1][0] == ordered[start][0]:
            end += 1
        average_rank = (start + end) / 2 + 1
        rank_sum += average_rank * sum(1 for k in range(start, end + 1) if ordered[k][1])
        start = end + 1
    u = rank_sum - len(right) * (len(right) + 1) / 2
    return u / (len(right) * len(wrong))


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


def calibration_bins(items: Sequence[Scored], bins: int = ECE_BINS) -> list[CalibrationBin]:
    """Equal-width bins over [0, 1]; a confidence of exactly 1.0 falls in the last one."""
    grouped: list[list[Scored]] = [[] for _ in range(bins)]
    for item in items:
        grouped[min(int(item.confidence * bins), bins - 1)].append(item)
    return [
        CalibrationBin(
            low=k / bins,
            high=(k + 1) / bins,
            count=len(group),
            mean_confidence=sum(i.confidence for i in group) / len(group) if group else None,
            accuracy=accuracy(group),
        )
        for k, group in enumerate(grouped)
    ]


def expected_calibration_error(items: Sequence[Scored], bins: int = ECE_BINS) -> float | None:
    """Sum over bins of (bin share) x |accuracy - mean confidence|."""
    if not items:
        return None
    total = 0.0
    for cell in calibration_bins(items, bins):
        if cell.count and cell.accuracy is not None and cell.mean_confidence is not None:
            total += cell.count / len(items) * abs(cell.accuracy - cell.mean_confidence)
    return total


def confused_pairs(items: Sequence[Scored], top: int = 3) -> list[tuple[str, str, int]]:
    """(gold, predicted, count) of the most frequent mistakes, most frequent first."""
    counts = Counter((i.gold, i.predicted) for i in items if not i.correct)
    return [(gold, predicted, n) for (gold, predicted), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][
        :top
    ]


@dataclass(frozen=True)
class Recommendation:
    threshold: float | None  # None: no threshold reaches the target; send everything to review
    precision: float | None
    coverage: float


def recommend_threshold(items: Sequence[Scored], target_precision: float) -> Recommendation:
    """The lowest threshold whose auto-accepted answers (confidence >= it) are at least
    target_precision right: the most coverage that keeps the precision."""
    best = Recommendation(None, None, 0.0)
    for threshold in sorted({i.confidence for i in items}, reverse=True):
        coverage, precision = at_threshold(items, threshold)
        if precision is not None and coverage is not None and precision >= target_precision:
            best = Recommendation(threshold, precision, coverage)
    return best
