"""Review routing is computed, never cached: the result cache reuses the model's output, and the
writer routes every result by the thresholds in force; `--no-cache` (and `backfill --max-age`)
infer again. On Postgres and SQLite."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.backfill import BackfillOptions, BackfillSummary, run_backfill
from pipeline.db import results, runs
from pipeline.routing import Thresholds, routed
from pipeline.settings import load_settings
from pipeline.writer import ResultWriter
from schemas.results import AttributeTag, TagResult
from schemas.taxonomy import Taxonomy
from tests.conftest import make_jobs, make_result
from tests.test_local import cli, write_catalog


def _sure_but_category(result: TagResult) -> TagResult:
    """All attributes at 0.9 but the category at 0.6, handed over as 'tagged'."""
    attributes = {
        name: tag.model_copy(update={"confidence": 0.6 if name == "category" else 0.9})
        for name, tag in result.attributes.items()
    }
    return result.model_copy(update={"status": "tagged", "review_attributes": [], "attributes": attributes})


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_routing_follows_default_and_per_attribute_thresholds(taxonomy: Taxonomy, sqlite_engine: Engine) -> None:
    (job,) = make_jobs(sqlite_engine, 1)
    result = make_result(job, taxonomy, category="dress").model_copy(
        update={"attributes": {"category": AttributeTag(value="dress", confidence=0.6)}}
    )
    assert routed(result, Thresholds(0.5)).status == "tagged"
    strict = routed(result, Thresholds(0.5, {"category": 0.7}))
    assert (strict.status, strict.review_attributes) == ("needs_review", ["category"])
    failed = result.model_copy(update={"status": "failed"})
    assert routed(failed, Thresholds(0.9)) is failed


def test_the_writer_routes_by_its_thresholds_whatever_it_is_handed(engine: Engine, taxonomy: Taxonomy) -> None:
    jobs = make_jobs(engine, 2)
    handed = [_sure_but_category(make_result(job, taxonomy, category="dress")) for job in jobs]
    ResultWriter(engine, taxonomy, thresholds=Thresholds(0.8)).write(handed)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(results.c.status, results.c.review_attributes).order_by(results.c.job_id)).all()
        states = conn.execute(sa.text("SELECT state FROM jobs ORDER BY id")).scalars().all()
        sets = conn.execute(sa.text("SELECT status FROM tag_sets")).scalars().all()
    assert [row.status for row in stored] == ["needs_review", "needs_review"]
    assert [row.review_attributes for row in stored] == [["category"], ["category"]]
    assert states == ["needs_review", "needs_review"] and sets == ["needs_review", "needs_review"]


def _run(url: str, catalog: Path, model: Path, *extra: str, threshold: str = "0.5") -> tuple[int, str]:
    return cli(
        "--database-url", url, "run", str(catalog), "--model", str(model), "--quantization", "fp32", *extra,
        env={"SKUTAG_CONFIDENCE_THRESHOLD": threshold, "SKUTAG_SUMMARY_MAX_TOKENS": "4"},
    )  # fmt: skip


def _states(engine: Engine, run_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT state, count(*) FROM jobs WHERE run_id = :r GROUP BY state"), {"r": run_id}
        ).all()
    return {state: int(count) for state, count in rows}


def test_a_threshold_change_reroutes_cached_results(engine: Engine, tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = write_catalog(tmp_path, 4, bad=False)
    code, output = _run(_url(engine), catalog, tiny_model_dir, threshold="1.0")
    assert code == 0, output
    assert _states(engine, 1) == {"needs_review": 4}  # nothing is sure enough for 1.0

    code, output = _run(_url(engine), catalog, tiny_model_dir, threshold="0.0")
    assert code == 0 and "4 from the result cache" in output, output
    assert _states(engine, 2) == {"done": 4}  # the same stored outputs, routed by today's threshold
    with engine.connect() as conn:
        statuses = conn.execute(sa.text("SELECT DISTINCT status FROM tag_sets")).scalars().all()
        hits = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE run_id = 2 AND cache_hit")).scalar_one()
    assert statuses == ["tagged"] and hits == 4


def test_no_cache_infers_again(engine: Engine, tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = write_catalog(tmp_path, 3, bad=False)
    assert _run(_url(engine), catalog, tiny_model_dir)[0] == 0
    code, output = _run(_url(engine), catalog, tiny_model_dir, "--no-cache")
    assert code == 0 and "0 from the result cache" in output, output
    with engine.connect() as conn:
        fresh = conn.execute(sa.text("SELECT count(*) FROM results WHERE run_id = 2 AND NOT cache_hit")).scalar_one()
    assert fresh == 3


def test_a_max_age_backfill_bypasses_the_cache(engine: Engine, taxonomy: Taxonomy) -> None:
    assert BackfillOptions().use_cache and not BackfillOptions(no_cache=True).use_cache
    options = BackfillOptions(max_age=timedelta(days=30))
    assert not options.use_cache
    summary = run_backfill(load_settings(), taxonomy, engine, None, options)
    assert isinstance(summary, BackfillSummary)
    with engine.connect() as conn:
        config = conn.execute(sa.select(runs.c.config).where(runs.c.id == summary.run_id)).scalar_one()
    assert config["use_cache"] is False
