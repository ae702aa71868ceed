"""`skutag review sample`: queue a random sample of items the model was confident about as audit
items, so their outcomes measure accuracy (they are gold for `skutag eval`).

An item is eligible when its current tags went out without review (status tagged), it has an
image hash, and no audit of it is open. Every attribute of a sampled item becomes an audit task.
--stratify category draws from each category in proportion to its size (at least one from each
that has items, while the size allows), so a rare category is measured too. --blind hides the
model's answer from the reviewer so it cannot anchor them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.db import translated_errors
from pipeline.review.tasks import REBUILD_ITEMS

_ELIGIBLE = """
FROM tag_sets s JOIN results r ON r.job_id = s.job_id
WHERE s.status = 'tagged' AND s.image_sha256 IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM review_tasks t WHERE t.sku = s.sku AND t.reason = 'audit')
  {run}
"""

_OPEN_AUDIT = """
INSERT INTO review_tasks (sku, attribute, reason, confidence, job_id, image_sha256, blind, created_at)
SELECT s.sku, t.attribute, 'audit', t.confidence, s.job_id, s.image_sha256, :blind, :now
FROM tag_sets s JOIN tags t ON t.sku = s.sku
WHERE s.sku IN ({skus})
  AND NOT EXISTS (SELECT 1 FROM review_decisions d
                  WHERE d.sku = s.sku AND d.attribute = t.attribute AND d.image_sha256 = s.image_sha256)
ORDER BY s.sku, t.attribute
ON CONFLICT (sku, attribute) DO NOTHING
"""


@dataclass(frozen=True)
class SampleReport:
    eligible: int
    sampled: int
    tasks: int
    by_category: dict[str, int]


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Proportional allocation of total over strata (largest remainders), at least one per
    non-empty stratum while total allows, never more than a stratum holds."""
    available = {name: size for name, size in sizes.items() if size > 0}
    population = sum(available.values())
    if population <= total:
        return dict(available)
    shares = {name: total * size / population for name, size in available.items()}
    counts = {name: min(available[name], max(1, int(share))) for name, share in shares.items()}
    while sum(counts.values()) > total:  # the minimum of one overshot: trim the largest
        largest = max(counts, key=lambda name: (counts[name], name))
        counts[largest] -= 1
    by_remainder = sorted(available, key=lambda name: (-(shares[name] - int(shares[name])), name))
    while sum(counts.values()) < total:
        grown = False
        for name in by_remainder:
            if sum(counts.values()) < total and counts[name] < available[name]:
                counts[name] += 1
                grown = True
        if not grown:
            break
    return counts


def sample_audit(conn: Connection, size: int, now: datetime, run_id: int | None = None, stratify: bool = False,
                 blind: bool = False, seed: int | None = None) -> SampleReport:  # fmt: skip
    run = "AND r.run_id = :run" if run_id is not None else ""
    params = {"run": run_id} if run_id is not None else {}
    rows = conn.execute(sa.text(f"SELECT s.sku, s.category {_ELIGIBLE.format(run=run)}"), params).all()
    strata: dict[str, list[str]] = {}
    for row in rows:
        strata.setdefault(str(row.category) if stratify else "all", []).append(str(row.sku))
    rng = random.Random(seed)
    counts = allocate({name: len(skus) for name, skus in strata.items()}, size)
    chosen: list[str] = []
    for name in sorted(counts):
        chosen += rng.sample(sorted(strata[name]), counts[name])
    tasks = 0
    for start in range(0, len(chosen), 1000):
        chunk = chosen[start : start + 1000]
        placeholders = ", ".join(f":s{k}" for k in range(len(chunk)))
        bound = {f"s{k}": sku for k, sku in enumerate(chunk)}
        inserted = conn.execute(
            sa.text(_OPEN_AUDIT.format(skus=placeholders)).bindparams(
                sa.bindparam("now", type_=sa.DateTime(timezone=True))
            ),
            {**bound, "blind": blind, "now": now},
        )
        tasks += max(inserted.rowcount, 0)
        conn.execute(sa.text(f"DELETE FROM review_items WHERE sku IN ({placeholders})"), bound)
        sampled = f"(SELECT sku FROM tag_sets WHERE sku IN ({placeholders})) AS w"
        conn.execute(sa.text(REBUILD_ITEMS.format(won=sampled)), bound)
    return SampleReport(eligible=len(rows), sampled=len(chosen), tasks=tasks,
                        by_category={name: counts[name] for name in sorted(counts)})  # fmt: skip


def queue_audit_sample(engine: Engine, size: int, run_id: int | None = None, stratify: bool = False,
                       blind: bool = False, seed: int | None = None) -> SampleReport:  # fmt: skip
    """sample_audit in its own transaction: the sample is queued whole or not at all."""
    with translated_errors("sampling audit items"), engine.begin() as conn:
        return sample_audit(conn, size, datetime.now(UTC), run_id, stratify, blind, seed)
