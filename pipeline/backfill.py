"""The nightly backfill: re-tag only what changed, for catalogs of millions.

    lock (one backfill at a time) -> refresh the catalog (a file or a read-only SQL query)
    -> [optional content check: conditional re-fetch, re-hash] -> plan (one set-based INSERT)
    -> enqueue with backpressure (never more than max_outstanding jobs in Redis) -> summary

A job is planned for an item, with the first reason that applies:
    retry_failed           its last job failed with a retryable error, and failures < max_attempts
    never_tagged           no current tags
    image_uri_changed      the item's image_uri differs from the one its tags came from, or (a
                           sku with several images) one of its images is new, replaced or gone
    image_content_changed  same URI, different bytes (with --check-content; for a sku with
                           several images, those of any one of them)
    model_changed / quantization_changed / taxonomy_changed / prompt_changed
    older_than_max_age     tags older than --max-age
Nothing is planned for an item whose last job is still open, or failed for good on the same URI.
A planned sku with several images gets one job per image (pipeline.ledger.plan).

A crashed or stopped backfill, started again, continues its run: the plan only adds what is
missing, and finished jobs are never re-enqueued. The backfill process alone publishes its
queue's new jobs (the reconciler leaves them to it), so the bound on outstanding jobs holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import ledger
from pipeline.backfill_target import PlanTarget, plan_target
from pipeline.db import make_engine, translated_errors
from pipeline.errors import ConfigError, InputError, RetryableError
from pipeline.images import Fetcher, FetchPolicy, IntakeError
from pipeline.ledger import backfill_lock
from pipeline.ledger.plan import add_content_changed, count_plan, insert_plan, reset_content_changed
from pipeline.producer import config_snapshot
from pipeline.settings import Settings
from pipeline.worker import JobPublisher
from schemas.taxonomy import Taxonomy

log = logging.getLogger("skutag.backfill")

QUEUE = "backfill"


@dataclass(frozen=True)
class Plan:
    run_id: int | None
    by_reason: dict[str, int]
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


@dataclass
class BackfillSummary:
    run_id: int
    state: str
    jobs_by_state: dict[str, int]
    planned_by_reason: dict[str, int]
    failed_by_reason: dict[str, int]
    cache_hits: int
    started_at: str
    finished_at: str | None
    duration_s: float
    images_per_s: float | None
    gpu_seconds_per_1000_skus: float | None
    planning_s: float = 0.0
    enqueue_s: float = 0.0
    published: int = 0
    resumed: bool = False
    retired: dict[str, int] | None = None  # {"retired": n, "relisted": m} with --retire-missing
    planned_against: dict[str, str] | None = None  # model, quantization, prompt, taxonomy + source
    warnings: list[str] = field(default_factory=list)


# --- planning --------------------------------------------------------------------------------
def _plan_params(settings: Settings, target: PlanTarget, max_age: timedelta | None, now: datetime) -> dict[str, Any]:
    cutoff = now - max_age if max_age else datetime(1970, 1, 1, tzinfo=now.tzinfo)
    return {**asdict(target.versions), "cutoff": cutoff, "max_failures": settings.max_attempts}


# --- content check ---------------------------------------------------------------------------
def check_content(conn: Connection, settings: Settings, threads: int = 16, page: int = 2000) -> dict[str, int]:
    """Re-fetch tagged images whose URI did not change (conditionally, with the stored ETag /
    Last-Modified) and record in content_changed (run_backfill creates it) the skus whose bytes no
    longer match their tags: for a sku with several images, any one of them. Counts are images."""
    fetcher = Fetcher(FetchPolicy.from_settings(settings))
    counts = {"checked": 0, "not_modified": 0, "changed": 0, "errors": 0}
    after = ""
    with ThreadPoolExecutor(threads, thread_name_prefix="skutag-check") as pool:
        while rows := ledger.tagged_items_page(conn, after, page):
            after = rows[-1].sku
            # An image of a multi-image sku never tagged is planned anyway (image_uri_changed).
            rows = [row for row in rows if row.position is None or row.image_sha256 is not None]
            outcomes = list(pool.map(lambda row: _check_one(fetcher, row), rows))
            _record_checks(conn, rows, outcomes, counts)
    fetcher.close()
    return counts


def _check_one(fetcher: Fetcher, row: Any) -> tuple[str, str | None, str | None]:
    """('not_modified' | 'same' | 'changed' | 'error', etag, last_modified)."""
    try:
        fetched = fetcher.fetch(row.image_uri, etag=row.image_etag, last_modified=row.image_last_modified)
    except IntakeError:
        return "error", None, None
    if fetched.not_modified:
        return "not_modified", fetched.etag or row.image_etag, fetched.last_modified or row.image_last_modified
    return ("same" if fetched.sha256 == row.image_sha256 else "changed"), fetched.etag, fetched.last_modified


def _record_checks(
    conn: Connection, rows: Sequence[Any], outcomes: list[tuple[str, str | None, str | None]], counts: dict[str, int]
) -> None:
    changed = sorted({row.sku for row, (verdict, _, _) in zip(rows, outcomes, strict=True) if verdict == "changed"})
    tally = {"not_modified": "not_modified", "changed": "changed", "error": "errors"}
    items: list[tuple[str, str | None, str | None]] = []
    images: list[tuple[str, str, str | None, str | None]] = []
    for row, (verdict, etag, modified) in zip(rows, outcomes, strict=True):
        counts["checked"] += 1
        if verdict in tally:
            counts[tally[verdict]] += 1
        if not (etag or modified):
            continue
        if row.position is None:  # a single-image sku: its validators live on items
            items.append((row.sku, etag, modified))
        else:
            images.append((row.sku, row.image_uri, etag, modified))
    ledger.store_validators(conn, items)  # one executemany per page, not a round trip per item
    ledger.store_image_validators(conn, images)
    add_content_changed(conn, changed)


# --- enqueue with backpressure ---------------------------------------------------------------
@dataclass
class EnqueueProgress:
    published: int = 0
    peak_outstanding: int = 0
    waits: int = 0
    by_state: dict[str, int] | None = None  # the run's jobs by state, refreshed every few seconds
    counted_at: float = 0.0


def enqueue(
    database: Engine,
    publisher: JobPublisher,
    run_id: int,
    max_outstanding: int,
    wait: bool = True,
    page: int = 5000,
    poll_s: float = 1.0,
    on_progress: Callable[[EnqueueProgress, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> EnqueueProgress:
    """Publish the run's jobs without ever having more than max_outstanding of them in the broker.
    With wait, returns when every job of the run has finished; without, when nothing more fits."""
    progress = EnqueueProgress()
    epoch = publisher.epoch()
    while True:
        with translated_errors("enqueueing backfill jobs"), database.begin() as conn:
            in_flight = ledger.outstanding_jobs(conn, run_id)
            progress.peak_outstanding = max(progress.peak_outstanding, in_flight)
            room = max_outstanding - in_flight
            batch = ledger.unpublished_run_jobs(conn, run_id, min(room, page)) if room > 0 else []
            if batch:
                publisher.publish(batch, QUEUE)
                ledger.mark_published(conn, [job.job_id for job in batch], epoch)
                progress.published += len(batch)
                progress.peak_outstanding = max(progress.peak_outstanding, in_flight + len(batch))
        if on_progress:
            if time.monotonic() - progress.counted_at >= 5:
                with database.connect() as conn:
                    progress.by_state = ledger.run_counts(conn, run_id)
                progress.counted_at = time.monotonic()
            on_progress(progress, in_flight)
        if batch:
            continue
        if not wait or (in_flight == 0 and not _has_unpublished(database, run_id)):
            return progress
        progress.waits += 1
        sleep(poll_s)


def _has_unpublished(database: Engine, run_id: int) -> bool:
    with database.connect() as conn:
        return bool(ledger.unpublished_run_jobs(conn, run_id, 1))


# --- summary ---------------------------------------------------------------------------------


def summarize(
    database: Engine, run_id: int, planning_s: float = 0.0, published: int = 0, resumed: bool = False
) -> BackfillSummary:
    with translated_errors("summarizing the backfill"), database.connect() as conn:
        run = ledger.run_row(conn, run_id)
        by_state = ledger.run_counts(conn, run_id)
        planned = ledger.jobs_by_reason(conn, run_id)
        failed = ledger.failures_by_code(conn, run_id)
        gpu_ms, tagged = ledger.gpu_milliseconds(conn, run_id)
        hits = ledger.cache_hits(conn, run_id)
    ended = run.finished_at or ledger.utcnow()
    started = run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=ended.tzinfo)
    ended = ended if ended.tzinfo else ended.replace(tzinfo=started.tzinfo)
    duration = max((ended - started).total_seconds(), 1e-9)
    finished = ledger.finished_count(by_state)
    return BackfillSummary(
        run_id=run_id,
        state=run.state,
        jobs_by_state=by_state,
        planned_by_reason=planned,
        failed_by_reason=failed,
        cache_hits=hits,
        started_at=started.isoformat(),
        finished_at=run.finished_at.isoformat() if run.finished_at else None,
        duration_s=round(duration, 3),
        images_per_s=round(finished / duration, 3) if finished else None,
        gpu_seconds_per_1000_skus=round(gpu_ms / tagged, 3) if tagged else None,  # ms per sku == s per 1000 skus
        planning_s=round(planning_s, 3),
        published=published,
        resumed=resumed,
    )


def estimate_seconds(database: Engine, jobs_to_run: int, recent_runs: int = 5) -> float | None:
    """From the throughput of recent finished runs: their finished jobs over their wall time."""
    with database.connect() as conn:
        rows = ledger.recent_finished_runs(conn, recent_runs)
    seconds = sum(max((r.finished_at - r.created_at).total_seconds(), 1e-3) for r in rows)
    done = sum(r.total_jobs for r in rows)
    return round(jobs_to_run / (done / seconds), 1) if rows and done else None


# --- the whole job ---------------------------------------------------------------------------
@dataclass
class BackfillOptions:
    dry_run: bool = False
    check_content: bool = False
    max_age: timedelta | None = None
    max_outstanding: int = 2000
    wait: bool = True
    poll_s: float = 1.0
    no_cache: bool = False
    retire_missing: bool = False  # items the refreshed catalog no longer lists are retired
    pin_model: bool = False  # --model given: plan for this process's model, not the workers'

    @property
    def use_cache(self) -> bool:
        """A re-tag for age asks for fresh inference: serving it from the cache would re-stamp old tags."""
        return not self.no_cache and self.max_age is None


@dataclass
class DryRun:
    by_reason: dict[str, int]
    estimated_s: float | None
    planning_s: float
    content_check: dict[str, int] | None = None
    retired: dict[str, int] | None = None  # {"retired": n, "relisted": m} with --retire-missing
    planned_against: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


@dataclass(frozen=True)
class RefreshMode:
    commit: bool = True  # False in a dry run: everything is rolled back at the end
    record_seen: bool = False  # list the skus seen, for --retire-missing


CatalogRefresh = Callable[[Connection, RefreshMode], int]


def run_backfill(
    settings: Settings,
    taxonomy: Taxonomy,
    database: Engine,
    publisher: JobPublisher | None,
    options: BackfillOptions,
    refresh: CatalogRefresh | None = None,
    on_progress: Callable[[EnqueueProgress, int], None] | None = None,
) -> BackfillSummary | DryRun:
    """Lock, refresh, plan, enqueue, wait, summarize: the lock is held for all of it, so a second
    backfill exits (LockedError) even while this one only waits for its jobs. A dry run does all
    of it up to the plan in one transaction that it rolls back: no table changes."""
    if options.retire_missing and refresh is None:
        raise ConfigError("--retire-missing needs the whole catalog: --catalog FILE or SKUTAG_BACKFILL_SOURCE_QUERY")
    with backfill_lock(database) as conn:
        reset_content_changed(conn)
        ledger.reset_catalog_seen(conn)
        conn.commit()
        keep = not options.dry_run
        retired_before = ledger.retired_count(conn)
        listed = refresh(conn, RefreshMode(commit=keep, record_seen=options.retire_missing)) if refresh else None
        retired = _retire(conn, listed, retired_before) if options.retire_missing else None
        content = check_content(conn, settings) if options.check_content else None
        if keep:
            conn.commit()
        target = plan_target(conn, settings, taxonomy, options.pin_model)
        for warning in target.warnings:
            log.warning("%s", warning)
        params = _plan_params(settings, target, options.max_age, ledger.utcnow())
        started = time.perf_counter()
        if options.dry_run:
            counts = count_plan(conn, params)
            conn.rollback()
            return DryRun(
                counts, estimate_seconds(database, sum(counts.values())), time.perf_counter() - started, content,
                retired, target.document(), target.warnings,
            )  # fmt: skip
        run_id = ledger.open_run(conn, "backfill")
        resumed = run_id is not None
        if run_id is None:
            run_id = ledger.create_run(conn, "backfill", config_snapshot(settings, taxonomy, options.use_cache))
        insert_plan(conn, run_id, QUEUE, params, ledger.utcnow())
        ledger.seal_run(conn, run_id)
        conn.commit()
        planning_s = time.perf_counter() - started
        published, started = 0, time.perf_counter()
        if publisher is not None:
            published = _publish(database, publisher, run_id, options, on_progress)
        summary = summarize(database, run_id, planning_s, published, resumed)
    summary.enqueue_s = round(time.perf_counter() - started, 3)
    summary.retired, summary.planned_against, summary.warnings = retired, target.document(), target.warnings
    return summary


def _publish(
    database: Engine,
    publisher: JobPublisher,
    run_id: int,
    options: BackfillOptions,
    on_progress: Callable[[EnqueueProgress, int], None] | None,
) -> int:
    """Enqueue (and wait); a broker outage leaves the run's unpublished jobs queued in the ledger."""
    try:
        progress = enqueue(database, publisher, run_id, options.max_outstanding, options.wait, poll_s=options.poll_s,
                           on_progress=on_progress)  # fmt: skip
    except RetryableError as exc:
        raise RetryableError(
            f"{exc.message}. Run {run_id} stays open with its unpublished jobs queued in the ledger (none is "
            f"lost or running): the next `skutag backfill` continues run {run_id} and publishes them"
        ) from exc
    return progress.published


def _retire(conn: Connection, listed: int | None, retired_before: int) -> dict[str, int]:
    if not listed:  # an empty or unreadable catalog must not retire the whole assortment
        raise InputError("the catalog lists no valid items; refusing to retire every item (--retire-missing)")
    relisted = retired_before - ledger.retired_count(conn)  # the refresh brought these back
    return {"retired": ledger.retire_missing(conn), "relisted": relisted}


def catalog_refresh(
    settings: Settings, rows: Iterator[tuple[int, Any]] | None, bad_rows: list[Any]
) -> CatalogRefresh | None:
    """Where the items come from: catalog file rows when given (bad rows collected in bad_rows),
    else SKUTAG_BACKFILL_SOURCE_QUERY when set, else nowhere (plan against the items as they are)."""
    if rows is not None:
        return refresh_from_rows(rows, bad_rows)
    if settings.backfill_source_query:
        source = make_engine(settings.backfill_source_url or settings.database_url)
        return refresh_from_query(source, settings.backfill_source_query)
    return None


def refresh_from_rows(rows: Iterator[tuple[int, Any]], bad_rows: list[Any], chunk: int = 20_000) -> CatalogRefresh:
    """A catalog refresh from parsed file rows (pipeline.catalog.read_catalog), streamed in chunks."""
    from pipeline.catalog import Deduplicator, RowError, chunks
    from pipeline.sku_images import catalog_images, record_images

    deduplicator = Deduplicator()

    def refresh(conn: Connection, mode: RefreshMode) -> int:
        count = 0
        for part in chunks(rows, chunk):
            good: list[tuple[ledger.CatalogRow, int]] = []
            for number, row in part:
                checked = row if isinstance(row, RowError) else deduplicator.check(number, row)
                if isinstance(checked, RowError):
                    bad_rows.append(checked)
                else:
                    good.append((checked, deduplicator.position(checked)))
            firsts = [row for row, position in good if position == 0]  # a sku's first image is its item
            record_images(conn, [row.sku for row in firsts], catalog_images(good, deduplicator), ledger.utcnow())
            _store(conn, firsts, mode)
            count += len(firsts)
        return count

    return refresh


def refresh_from_query(source: Engine, query: str, chunk: int = 20_000) -> CatalogRefresh:
    """A catalog refresh from the user's own table: a read-only query returning sku, image_uri and
    optionally title, category_hint; streamed with a server-side cursor."""

    def refresh(conn: Connection, mode: RefreshMode) -> int:
        count = 0
        with translated_errors("reading the catalog source"), source.connect() as read:
            if read.dialect.name == "postgresql":
                read.exec_driver_sql("SET TRANSACTION READ ONLY")
            result = read.execution_options(stream_results=True, yield_per=chunk).execute(sa.text(query))
            for part in result.mappings().partitions(chunk):
                rows = [
                    ledger.CatalogRow(sku=str(r["sku"]), image_uri=str(r["image_uri"]), title=r.get("title"),
                                      category_hint=r.get("category_hint"))
                    for r in part if r.get("sku") and r.get("image_uri")
                ]  # fmt: skip
                _store(conn, rows, mode)
                count += len(rows)
        return count

    return refresh


def _store(conn: Connection, rows: Sequence[ledger.CatalogRow], mode: RefreshMode) -> None:
    ledger.upsert_items(conn, rows)
    if mode.record_seen:
        ledger.add_catalog_seen(conn, [row.sku for row in rows])
    if mode.commit:  # chunk by chunk: a catalog of millions is not one transaction
        conn.commit()
