"""The review app at scale: queue page server time with many results and a large review queue,
and bulk accept of thousands of items, on a scratch Postgres database.

Seeding is set-based SQL (generate_series), not the writer: `results` and `tag_sets` rows for
every sku, a review queue of `queued` skus (one or two open tasks each: pattern, and style on
every other one) and, for the queued skus only, their tags (what the item page and bulk accept
read). Requests go through the real Starlette app in-process (its test client), so the time is
the server's: routing, SQL, template, no network.

Baselines in the same run: the same deep page read with OFFSET instead of the keyset cursor, and
the same bulk accept through the per-decision path (DecisionRecorder: validation per item).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline.bench.common import scratch_postgres
from pipeline.db import make_engine, review_tasks
from pipeline.review import queue
from pipeline.review.bulk import accept_in_chunks
from pipeline.review.decisions import Decision, DecisionRecorder
from pipeline.settings import load_settings
from schemas.taxonomy import default_taxonomy

_SEED = """
INSERT INTO items (sku, image_uri, title, created_at, updated_at)
SELECT 'B-' || lpad(g::text, 8, '0'), 'file:///nowhere/' || g || '.jpg', 'item ' || g, now(), now()
FROM generate_series(1, :n) g;
INSERT INTO runs (id, kind, state, config, total_jobs, created_at) VALUES (1, 'bench', 'done', '{}', :n, now());
INSERT INTO jobs (id, run_id, sku, image_uri, state, created_at, updated_at)
SELECT g, 1, 'B-' || lpad(g::text, 8, '0'), 'file:///nowhere/' || g || '.jpg', 'done', now(), now()
FROM generate_series(1, :n) g;
INSERT INTO results (job_id, run_id, sku, image_sha256, status, category, attributes, review_attributes, model_id,
                     quantization, prompt_version, taxonomy_version, timings, cache_hit, produced_at, written_at)
SELECT g, 1, 'B-' || lpad(g::text, 8, '0'), md5(g::text), CASE WHEN g <= :queued THEN 'needs_review' ELSE 'tagged' END,
       'dress', '{}'::jsonb,
       CASE WHEN g > :queued THEN '[]'::jsonb WHEN g % 2 = 0 THEN '["pattern", "style"]'::jsonb
            ELSE '["pattern"]'::jsonb END,
       'bench/model', 'int8', 'pv', :tv, '{}'::jsonb, false, now(), now()
FROM generate_series(1, :n) g;
INSERT INTO tag_sets (sku, job_id, status, category, image_uri, image_sha256, model_id, quantization, prompt_version,
                      taxonomy_version, produced_at, updated_at)
SELECT sku, job_id, status, category, 'file:///nowhere/' || job_id || '.jpg', image_sha256, model_id, quantization,
       prompt_version, taxonomy_version, produced_at, written_at
FROM results;
INSERT INTO tags (sku, attribute, value, confidence, runner_up, runner_up_confidence, job_id, image_sha256, model_id,
                  taxonomy_version, produced_at, updated_at)
SELECT s.sku, a.attribute, a.value, CASE a.attribute WHEN 'pattern' THEN (s.job_id % 997) / 2000.0
                                                     WHEN 'style' THEN 0.4 ELSE 0.9 END,
       NULL, NULL, s.job_id, s.image_sha256, 'bench/model', :tv, now(), now()
FROM tag_sets s CROSS JOIN (VALUES ('category', 'dress'), ('primary_color', 'black'), ('pattern', 'solid'),
                                   ('style', 'casual'), ('season', 'summer')) AS a(attribute, value)
WHERE s.job_id <= :queued;
INSERT INTO review_tasks (sku, attribute, reason, confidence, job_id, image_sha256, created_at)
SELECT t.sku, t.attribute, 'low_confidence', t.confidence, t.job_id, t.image_sha256, now()
FROM tags t WHERE t.attribute = 'pattern' OR (t.attribute = 'style' AND t.job_id % 2 = 0);
INSERT INTO review_items (sku, job_id, run_id, category, image_sha256, min_confidence, open_tasks, created_at)
SELECT sku, job_id, 1, 'dress', image_sha256, MIN(confidence), COUNT(*), now()
FROM review_tasks GROUP BY sku, job_id, image_sha256;
ANALYZE;
"""


def _taxonomy_rows(conn: Any, version: str) -> None:
    rows = [
        {"v": version, "a": attribute, "value": value, "en": en, "zh": zh}
        for attribute, value, en, zh, _ in default_taxonomy().value_rows()
    ]
    conn.execute(
        sa.text("INSERT INTO taxonomy_values VALUES (:v, :a, :value, :en, :zh, '[]') ON CONFLICT DO NOTHING"), rows
    )


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _timed_get(client: Any, path: str, repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, (path, answer.status_code)
    return {"p50_ms": round(statistics.median(samples), 2), "p95_ms": round(_p95(samples), 2)}


def _sql_page_ms(engine: Any, repeats: int, offset: int | None = None, after: Any = None) -> dict[str, float]:
    """The page's SQL alone: OFFSET (the baseline) or the keyset cursor, same columns and order."""
    columns = "SELECT sku, min_confidence FROM review_items"
    if offset is not None:
        query, params = sa.text(f"{columns} ORDER BY min_confidence, sku LIMIT 51 OFFSET :o"), {"o": offset}
    else:
        query = sa.text(f"{columns} WHERE (min_confidence, sku) > (:c, :s) ORDER BY min_confidence, sku LIMIT 51")
        params = {"c": after.confidence, "s": after.sku}
    samples = []
    with engine.connect() as conn:
        for _ in range(repeats):
            started = time.perf_counter()
            conn.execute(query, params).all()
            samples.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(statistics.median(samples), 2), "p95_ms": round(_p95(samples), 2)}


def run(server_url: str, results: int = 1_000_000, queued: int = 100_000, bulk: int = 10_000,
        repeats: int = 50) -> dict[str, Any]:  # fmt: skip
    from starlette.testclient import TestClient

    from pipeline.review.serve import make_review_app

    taxonomy = default_taxonomy()
    with scratch_postgres(server_url) as url:
        engine = make_engine(url)
        started = time.perf_counter()
        with engine.begin() as conn:
            _taxonomy_rows(conn, taxonomy.version)
            for statement in _SEED.strip().split(";\n"):
                conn.execute(sa.text(statement), {"n": results, "queued": queued, "tv": taxonomy.version})
        seed_s = time.perf_counter() - started
        settings = load_settings(database_url=url, work_dir=Path("/tmp/skutag-bench-review"))
        app = make_review_app(settings, engine, reviewer="bench")
        figures: dict[str, Any] = {"results": results, "queued_items": queued, "seed_s": round(seed_s, 1)}
        with TestClient(app, base_url="http://127.0.0.1:8686") as client:
            client.get("/")  # warm: counts cached, templates compiled
            with engine.connect() as conn:
                deep = queue.list_page(conn, queue.QueueFilter(), None, limit=queued // 2)
            cursor = deep.rows[-1]
            figures["queue_first_page"] = _timed_get(client, "/", repeats)
            figures["queue_deep_page_keyset"] = _timed_get(
                client, f"/?after={queue.Cursor(cursor.confidence, cursor.sku).encode()}", repeats
            )
            figures["deep_page_sql_keyset"] = _sql_page_ms(engine, repeats, after=cursor)
            figures["deep_page_sql_offset_baseline"] = _sql_page_ms(engine, repeats, offset=queued // 2)
            figures["queue_attribute_filter"] = _timed_get(client, "/?attribute=style&max=0.45", repeats)
            counts = []
            for _ in range(5):
                started = time.perf_counter()
                with engine.connect() as conn:
                    queue.count(conn, queue.QueueFilter())
                counts.append((time.perf_counter() - started) * 1000)
            figures["queue_counts_uncached_ms"] = round(statistics.median(counts), 1)
        figures |= _bulk(engine, taxonomy, bulk)
        engine.dispose()
    return figures


def _bulk(engine: Any, taxonomy: Any, bulk: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    with engine.connect() as conn:
        skus = queue.matching_skus(conn, queue.QueueFilter(), 2 * bulk)
    first, second = skus[:bulk], skus[bulk : 2 * bulk]
    started = time.perf_counter()
    decided, _ = accept_in_chunks(engine, first, "bench", now)
    bulk_s = time.perf_counter() - started
    decisions = []
    with engine.connect() as conn:
        for start in range(0, len(second), 1000):
            query = sa.select(review_tasks.c.sku, review_tasks.c.attribute, review_tasks.c.job_id).where(
                review_tasks.c.sku.in_(second[start : start + 1000])
            )
            decisions += [Decision(r.sku, r.attribute, "accept", r.job_id) for r in conn.execute(query)]
    started = time.perf_counter()
    report = DecisionRecorder(engine, taxonomy).record(decisions, "bench")
    baseline_s = time.perf_counter() - started
    assert not report.refused, report.refused[:3]
    return {
        "bulk_accept_items": len(decided),
        "bulk_accept_s": round(bulk_s, 2),
        "per_decision_path_items": len(second),
        "per_decision_path_decisions": len(decisions),
        "per_decision_path_baseline_s": round(baseline_s, 2),
    }
