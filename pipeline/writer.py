"""The writer: persists a batch of TagResults and their jobs' state changes in one transaction.

Idempotent by construction: a result is keyed by its job id (ON CONFLICT DO NOTHING), so a
redelivered batch adds nothing and changes nothing. The current tags of a sku follow a defined
winner, the newest result (produced_at, then job id), whatever order writers commit in; rows are
always locked in sku order, so two writers sharing skus never deadlock.

Postgres loads the batch with COPY into temporary staging tables, then moves it with a few
set-based statements; SQLite, the embedded default, fills the same staging tables with
executemany. Everything after the load is the same SQL on both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import StringIO
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import ledger
from pipeline.db import COPY_NULL, copy_field, copy_rows, insert_for, taxonomy_values, translated_errors
from pipeline.errors import RetryableError
from pipeline.listing import ListingChecker
from pipeline.merge import DEFAULT_CONFLICT_CONFIDENCE, TagMerger
from pipeline.result_checks import InvalidResultError, find_invalid
from pipeline.review import tasks as review_tasks
from pipeline.review import thresholds as review_thresholds
from pipeline.routing import Thresholds, routed
from pipeline.sku_images import merge_and_check_listings, open_conflict_tasks
from schemas.results import ErrorCode, ItemError, JobSpec, TagResult, failed_result
from schemas.taxonomy import Taxonomy

log = logging.getLogger(__name__)

NOTIFY_PAYLOAD_LIMIT = 7900  # Postgres caps a NOTIFY payload at 8000 bytes


@dataclass(frozen=True)
class WriteReport:
    results: int
    new_results: int
    skus_updated: int
    tag_rows: int
    seconds: float
    discarded: int = 0  # results of jobs cancelled while they ran: not written (_without_cancelled)


# --- staging rows ----------------------------------------------------------------------------
RESULT_COLUMNS = (
    "job_id", "run_id", "sku", "image_uri", "image_sha256", "cache_key", "status", "category", "summary",
    "attributes", "review_attributes", "error_code", "error_message", "model_id", "model_revision",
    "quantization", "prompt_version", "taxonomy_version", "timings", "cache_hit", "produced_at",
)  # fmt: skip
TAG_COLUMNS = ("job_id", "sku", "attribute", "value", "confidence", "runner_up", "runner_up_confidence")

_PG_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_results (
    job_id bigint, run_id bigint, sku text, image_uri text, image_sha256 text, cache_key text,
    status text, category text, summary text, attributes jsonb, review_attributes jsonb,
    error_code text, error_message text, model_id text, model_revision text, quantization text,
    prompt_version text, taxonomy_version text, timings jsonb, cache_hit boolean,
    produced_at timestamptz, sku_winner boolean) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_tags (
    job_id bigint, sku text, attribute text, value text, confidence double precision,
    runner_up text, runner_up_confidence double precision) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_new (job_id bigint PRIMARY KEY) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_won (sku text PRIMARY KEY, job_id bigint, replaced boolean) ON COMMIT DELETE ROWS;
"""

_SQLITE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS stage_results ({', '.join(RESULT_COLUMNS)}, sku_winner)",
    f"CREATE TEMP TABLE IF NOT EXISTS stage_tags ({', '.join(TAG_COLUMNS)})",
    "CREATE TEMP TABLE IF NOT EXISTS stage_new (job_id INTEGER PRIMARY KEY)",
    "CREATE TEMP TABLE IF NOT EXISTS stage_won (sku TEXT PRIMARY KEY, job_id INTEGER, replaced)",
)

# Every statement of a write goes from the batch's staging tables (tens to a thousand rows) to
# the big tables by index, so:
# - synchronous_commit off: safe to lose on a server crash (the jobs' states roll back with their
#   results, so the ledger re-runs them); it saves a WAL flush wait per batch.
# - jit off: a big table whose statistics lag its growth (a fresh database, a first large run)
#   inflates cost estimates past jit_above_cost, and compiling then cost 5-8 ms per statement on
#   statements that run in well under 1 ms.
# - enable_seqscan off: the same lagging statistics made the planner hash-join the whole of tags
#   or review_tasks for a batch of 32 skus; the staging tables themselves, which have no index,
#   are still scanned (no other path), and every other table is read through an index.
PG_WRITE_SETTINGS = "SET LOCAL synchronous_commit = off; SET LOCAL jit = off; SET LOCAL enable_seqscan = off"

_NOW = sa.bindparam("now", type_=sa.DateTime(timezone=True))

_INSERT_RESULTS = sa.text(f"""
INSERT INTO results ({", ".join(RESULT_COLUMNS)}, written_at)
SELECT {", ".join("s." + c for c in RESULT_COLUMNS)}, :now
FROM stage_results s WHERE true ORDER BY s.job_id
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
""").bindparams(_NOW)

# Only a newer result replaces a sku's current tags: the winner does not depend on commit order.
_UPSERT_TAG_SETS = sa.text("""
INSERT INTO tag_sets (sku, job_id, status, category, summary, image_uri, image_sha256, model_id,
                      quantization, prompt_version, taxonomy_version, produced_at, updated_at)
SELECT s.sku, s.job_id, s.status, s.category, s.summary, s.image_uri, s.image_sha256, s.model_id,
       s.quantization, s.prompt_version, s.taxonomy_version, s.produced_at, :now
FROM stage_results s JOIN stage_new n ON n.job_id = s.job_id
WHERE s.sku_winner ORDER BY s.sku
ON CONFLICT (sku) DO UPDATE SET
    job_id = excluded.job_id, status = excluded.status, category = excluded.category,
    summary = excluded.summary, image_uri = excluded.image_uri, image_sha256 = excluded.image_sha256,
    model_id = excluded.model_id, quantization = excluded.quantization,
    prompt_version = excluded.prompt_version, taxonomy_version = excluded.taxonomy_version,
    produced_at = excluded.produced_at, updated_at = excluded.updated_at
WHERE tag_sets.produced_at < excluded.produced_at
   OR (tag_sets.produced_at = excluded.produced_at AND tag_sets.job_id < excluded.job_id)
RETURNING sku, job_id, {replaced} AS replaced
""").bindparams(_NOW)

# Postgres tells an update (xmax set) from an insert: a sku tagged for the first time has no old
# tags to delete, which saves an index probe per new sku. SQLite cannot tell, so it always looks.
_REPLACED = {"postgresql": "(xmax <> 0)", "sqlite": "1"}

_DELETE_REPLACED_TAGS = sa.text("DELETE FROM tags WHERE sku IN (SELECT sku FROM stage_won WHERE replaced)")

_INSERT_TAGS = sa.text("""
INSERT INTO tags (sku, attribute, value, confidence, runner_up, runner_up_confidence, job_id,
                  image_sha256, model_id, taxonomy_version, produced_at, updated_at)
SELECT t.sku, t.attribute, t.value, t.confidence, t.runner_up, t.runner_up_confidence, t.job_id,
       s.image_sha256, s.model_id, s.taxonomy_version, s.produced_at, :now
FROM stage_tags t
JOIN stage_won w ON w.job_id = t.job_id
JOIN stage_results s ON s.job_id = t.job_id
ORDER BY t.sku, t.attribute
""").bindparams(_NOW)

# The jobs and runs of the newly written results end in the same transaction (the ledger's SQL).
_FINISH_JOBS = ledger.finish_jobs_statement("stage_results", "s.job_id IN (SELECT job_id FROM stage_new)")
_FINISH_RUNS = ledger.finish_runs_statement(
    "SELECT DISTINCT s.run_id FROM stage_results s JOIN stage_new n ON n.job_id = s.job_id"
)


def _without_cancelled(conn: Connection, batch: Sequence[TagResult]) -> list[TagResult]:
    """The batch less the results of jobs that `skutag runs cancel` ended while they ran: such a
    job stays cancelled and its late result changes no tags (a cancel that comes later waits for
    this write's locks on the jobs, and finds them finished)."""
    cancelled = ledger.lock_for_finishing(conn, [r.job_id for r in batch if r.job_id is not None])
    if cancelled:
        log.warning("result discarded: job cancelled (%d results, jobs %s)", len(cancelled), sorted(cancelled)[:10])
    return [result for result in batch if result.job_id not in cancelled]


def _mark_sku_winners(results: Sequence[TagResult]) -> list[bool]:
    """Within one batch, only the newest non-failed result per sku may become current."""
    best: dict[str, int] = {}
    for index, result in enumerate(results):
        if result.status == "failed":
            continue
        current = best.get(result.sku)
        if current is None or _newer(result, results[current]):
            best[result.sku] = index
    winners = set(best.values())
    return [index in winners for index in range(len(results))]


def _any_to_review(batch: Sequence[TagResult], won: Sequence[Any], merged: Mapping[str, Any]) -> bool:
    """Whether a sku whose tags this batch made current needs review (a merged sku's status is
    the merge's: counted as maybe)."""
    status = {result.job_id: result.status for result in batch}
    return bool(merged) or any(status[row[1]] == "needs_review" for row in won)


def _newer(a: TagResult, b: TagResult) -> bool:
    return (a.produced_at, a.job_id or 0) > (b.produced_at, b.job_id or 0)


def _result_row(result: TagResult, sku_winner: bool, timestamp: Callable[[datetime], Any]) -> tuple[Any, ...]:
    provenance = result.provenance
    attributes = {
        name: {"value": tag.value, "confidence": tag.confidence, "runner_up": tag.runner_up,
               "runner_up_confidence": tag.runner_up_confidence}
        for name, tag in result.attributes.items()
    }  # fmt: skip
    return (
        result.job_id, provenance.run_id or 0, result.sku, result.image_uri, result.image_sha256, result.cache_key,
        result.status, result.category, result.summary, json.dumps(attributes, ensure_ascii=False),
        json.dumps(result.review_attributes), result.error.code.value if result.error else None,
        result.error.message if result.error else None, provenance.model_id, provenance.model_revision,
        provenance.quantization, provenance.prompt_version, provenance.taxonomy_version,
        json.dumps(provenance.timings_ms), provenance.cache_hit, timestamp(result.produced_at), sku_winner,
    )  # fmt: skip


def _tag_rows(result: TagResult) -> Iterable[tuple[Any, ...]]:
    for name, tag in result.attributes.items():
        yield (result.job_id, result.sku, name, tag.value, tag.confidence, tag.runner_up, tag.runner_up_confidence)


def _tag_copy_lines(result: TagResult) -> str:
    """COPY lines for one result's tags. Attribute names and value ids are slugs (the taxonomy
    validates them, and so did find_invalid), so only the sku needs escaping: the hot path."""
    prefix = f"{result.job_id}\t{copy_field(result.sku)}\t"
    return "".join(
        f"{prefix}{name}\t{tag.value}\t{tag.confidence!r}\t{tag.runner_up or COPY_NULL}\t"
        f"{COPY_NULL if tag.runner_up_confidence is None else repr(tag.runner_up_confidence)}\n"
        for name, tag in result.attributes.items()
    )


def _sqlite_timestamp(moment: datetime) -> str:
    # The format SQLAlchemy's SQLite DateTime reads back; SQLite keeps UTC without an offset.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _pg_timestamp(moment: datetime) -> str:
    return moment.isoformat()


# --- the writer ------------------------------------------------------------------------------
class ResultWriter:
    """Writes batches of results to one database. One instance per process; thread-safe.
    thresholds route each result to tagged / needs_review (pipeline.routing)."""

    def __init__(
        self,
        engine: Engine,
        taxonomy: Taxonomy,
        notify_channel: str | None = None,
        listing: ListingChecker | None = None,
        thresholds: Thresholds | None = None,
        conflict_confidence: float = DEFAULT_CONFLICT_CONFIDENCE,
    ) -> None:
        self.engine = engine
        self.taxonomy = taxonomy
        self.listing = listing if listing is not None else ListingChecker(taxonomy)
        self.merger = TagMerger(taxonomy, conflict_confidence)
        # Review routing is decided here, at write time, from the thresholds in force (these, and those
        # `skutag eval --write` stored): whatever status a worker or the cache handed over.
        self.thresholds_in_force = review_thresholds.ThresholdsInForce(engine, thresholds or Thresholds())
        self.notify_channel = notify_channel if engine.dialect.name == "postgresql" else None
        self._taxonomy_synced = False

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def write(self, results: Sequence[TagResult]) -> WriteReport:
        """Write one batch atomically. Raises InvalidResultError (nothing written) or RetryableError."""
        started = time.perf_counter()
        invalid = find_invalid(results, self.taxonomy)
        if invalid:
            raise InvalidResultError(invalid)
        batch = list({result.job_id: result for result in reversed(results)}.values())[::-1]
        if not batch:
            return WriteReport(0, 0, 0, 0, 0.0)
        self._sync_taxonomy()
        batch = [routed(result, self.thresholds_in_force.get()) for result in batch]
        with translated_errors("writing results"), self.engine.begin() as conn:
            if self.is_postgres:
                conn.exec_driver_sql(PG_WRITE_SETTINGS)
            kept = _without_cancelled(conn, batch)
            discarded, batch = len(batch) - len(kept), kept
            if not batch:
                return WriteReport(0, 0, 0, 0, time.perf_counter() - started, discarded)
            self._stage(conn, batch)
            new_results = self._capture(conn, _INSERT_RESULTS, "stage_new", ("job_id",))
            upsert = sa.text(_UPSERT_TAG_SETS.text.format(replaced=_REPLACED[self.engine.dialect.name]))
            won = self._capture(conn, upsert.bindparams(_NOW), "stage_won", ("sku", "job_id", "replaced"))
            conn.execute(_DELETE_REPLACED_TAGS)
            tag_rows = conn.execute(_INSERT_TAGS, {"now": _utcnow()}).rowcount
            merged = merge_and_check_listings(conn, self.merger, self.listing, batch, new_results, won, _utcnow())
            review_tasks.open_review_tasks(conn, _utcnow(), to_review=_any_to_review(batch, won, merged))
            open_conflict_tasks(conn, merged, _utcnow())
            conn.execute(_FINISH_JOBS, {"now": _utcnow()})
            conn.execute(_FINISH_RUNS, {"now": _utcnow()})
            self._notify(conn, sorted({str(row[0]) for row in won} | set(merged)))
        return WriteReport(
            results=len(batch),
            new_results=len(new_results),
            skus_updated=len(won),
            tag_rows=max(tag_rows, 0),
            seconds=time.perf_counter() - started,
            discarded=discarded,
        )

    def _stage(self, conn: Connection, batch: Sequence[TagResult]) -> None:
        winners = _mark_sku_winners(batch)
        timestamp = _pg_timestamp if self.is_postgres else _sqlite_timestamp
        result_rows = [_result_row(r, w, timestamp) for r, w in zip(batch, winners, strict=True)]
        if self.is_postgres:
            self._stage_postgres(conn, result_rows, StringIO("".join(_tag_copy_lines(r) for r in batch)))
        else:
            self._stage_sqlite(conn, result_rows, [row for result in batch for row in _tag_rows(result)])

    def _stage_postgres(self, conn: Connection, result_rows: list[tuple[Any, ...]], tag_text: StringIO) -> None:
        if not conn.info.get("skutag_staging"):
            conn.exec_driver_sql(_PG_STAGING)
            conn.info["skutag_staging"] = True
        copy_rows(conn, "stage_results", (*RESULT_COLUMNS, "sku_winner"), result_rows)
        copy_rows(conn, "stage_tags", TAG_COLUMNS, tag_text)
        # Temporary tables have no statistics; without them the planner may scan all of jobs. Only
        # the columns statements join, filter or group on: the jsonb and text columns made this
        # ANALYZE cost 7 ms per 1,024 results, for statistics no plan reads.
        conn.exec_driver_sql("ANALYZE stage_results (job_id, run_id, sku, sku_winner)")

    def _stage_sqlite(
        self, conn: Connection, result_rows: list[tuple[Any, ...]], tag_rows: list[tuple[Any, ...]]
    ) -> None:
        for statement in _SQLITE_STAGING:
            conn.exec_driver_sql(statement)
        for table in ("stage_results", "stage_tags", "stage_new", "stage_won"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        marks = ", ".join("?" * (len(RESULT_COLUMNS) + 1))
        conn.exec_driver_sql(f"INSERT INTO stage_results VALUES ({marks})", result_rows)
        if tag_rows:
            marks = ", ".join("?" * len(TAG_COLUMNS))
            conn.exec_driver_sql(f"INSERT INTO stage_tags VALUES ({marks})", tag_rows)

    def _capture(self, conn: Connection, statement: sa.TextClause, table: str, columns: tuple[str, ...]) -> list[Any]:
        """Run an INSERT ... RETURNING and keep the returned rows in a staging table."""
        params = {"now": _utcnow()}
        names = ", ".join(columns)
        if self.is_postgres:
            wrapped = sa.text(
                f"WITH captured AS ({statement.text}) "
                f"INSERT INTO {table} ({names}) SELECT {names} FROM captured RETURNING {names}"
            )
            captured = list(conn.execute(wrapped.bindparams(_NOW), params).fetchall())
            # As for stage_results: without statistics the planner guesses the staging table is
            # large and scans all of review_tasks, tags, ... for the skus in it (cost grows with
            # the database, not the batch).
            conn.exec_driver_sql(f"ANALYZE {table}")
            return captured
        rows = list(conn.execute(statement, params).fetchall())
        if rows:
            marks = ", ".join("?" * len(columns))
            conn.exec_driver_sql(f"INSERT INTO {table} ({names}) VALUES ({marks})", [tuple(r) for r in rows])
        return rows

    def _notify(self, conn: Connection, skus: list[str]) -> None:
        if not self.notify_channel or not skus:
            return
        for payload in notify_payloads(skus):
            conn.execute(sa.select(sa.func.pg_notify(self.notify_channel, payload)))

    def _sync_taxonomy(self) -> None:
        """Store the labels of this taxonomy version once per process, for the consumer views."""
        if self._taxonomy_synced:
            return
        rows = [
            {"taxonomy_version": self.taxonomy.version, "attribute": attribute, "value": value,
             "label_en": en, "label_zh": zh, "synonyms": list(synonyms)}
            for attribute, value, en, zh, synonyms in self.taxonomy.value_rows()
        ]  # fmt: skip
        with translated_errors("storing taxonomy labels"), self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(sa.func.count()).where(taxonomy_values.c.taxonomy_version == self.taxonomy.version)
            ).scalar_one()
            if exists == 0:
                conn.execute(insert_for(conn)(taxonomy_values).on_conflict_do_nothing(), rows)
        self._taxonomy_synced = True


def notify_payloads(skus: Sequence[str]) -> Iterable[str]:
    """JSON payloads {"skus": [...]} each under Postgres' NOTIFY size limit."""
    chunk: list[str] = []
    size = 12
    for sku in skus:
        cost = len(json.dumps(sku, ensure_ascii=False).encode()) + 2  # ", " between items
        if chunk and size + cost > NOTIFY_PAYLOAD_LIMIT:
            yield json.dumps({"skus": chunk}, ensure_ascii=False)
            chunk, size = [], 12
        chunk.append(sku)
        size += cost
    if chunk:
        yield json.dumps({"skus": chunk}, ensure_ascii=False)


def write_with_retry(
    writer: ResultWriter,
    results: Sequence[TagResult],
    attempts: int = 5,
    first_delay_s: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> WriteReport:
    """Retry a write on connection loss, deadlock or serialization failure; idempotency makes it safe."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return writer.write(results)
        except RetryableError:
            if attempt == attempts:
                raise
            sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def write_valid(writer: ResultWriter, results: Sequence[TagResult]) -> WriteReport:
    """Write a batch; results the writer rejects are written as failed (invalid_result) instead,
    so one malformed result never holds back the others."""
    try:
        return write_with_retry(writer, results)
    except InvalidResultError as exc:
        repaired = [
            failed_result(
                JobSpec(job_id=r.job_id or 0, run_id=r.provenance.run_id or 0, sku=r.sku, image_uri=r.image_uri or ""),
                ItemError(code=ErrorCode.INVALID_RESULT, message=exc.problems[index]),
                r.provenance,
                r.image_sha256,
            )
            if index in exc.problems
            else r
            for index, r in enumerate(results)
        ]
        return write_with_retry(writer, repaired)


class WriterSink:
    """Hands results straight to the writer (local mode, benchmarks): no queue in between."""

    def __init__(self, writer: ResultWriter) -> None:
        self.writer = writer

    def send_results(self, results: Sequence[TagResult]) -> None:
        write_valid(self.writer, results)


def _utcnow() -> datetime:
    return datetime.now(UTC)
