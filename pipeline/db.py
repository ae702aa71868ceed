"""The database: table definitions, engine construction, and the one place database errors are
translated into skutag's error tree (retryable: connection lost, deadlock, serialization failure;
final: constraint violations and bad data).

Tables, in the order a job flows through them:
    items            the catalog as skutag knows it (sku -> image uri, title, category hint, retired)
    runs             one per submit, backfill or local run, with a config snapshot
    jobs             one per sku per run: the ledger (states: schemas.states.JobState)
    results          one per job, full provenance: the log of every input/output pair, and the
                     content-keyed cache (cache_key = image sha256 + model/prompt/taxonomy versions)
    tag_sets         the current result per sku (status, summary, versions)
    tags             the current model value per (sku, attribute), with confidence and runner-up
    reviews          the append-only log of a person's decisions (validated by the database)
    review_decisions the decision in force per (sku, attribute); overrides the model's value for
                     the image the reviewer saw, never deletes it
    review_tasks     the review queue: attributes to decide (low confidence, audit sample, ...),
    review_items       grouped per sku, with a short claim so two reviewers never share one
    taxonomy_values  labels and synonyms of every value, per taxonomy version, for consumers
    listing_mismatches, item_images, tag_sources: see pipeline/catalog_tables.py
The views sku_tags_current, sku_tags_json and listing_issues (see migrations/) are the consumer contract.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from io import StringIO
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError

from pipeline.errors import ConfigError, FinalError, InputError, RetryableError
from schemas.states import OPEN_JOB_STATES, JobState, RunState, sql_list

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a real bigint.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

JOB_STATES = tuple(state.value for state in JobState)
RUN_STATES = tuple(state.value for state in RunState)
RESULT_STATUSES = ("tagged", "needs_review", "failed")


def _one_of(column: str, allowed: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in allowed)})"


items = sa.Table(
    "items",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("image_uri", sa.Text, nullable=False),
    sa.Column("title", sa.Text),
    sa.Column("category_hint", sa.Text),
    sa.Column("image_etag", sa.Text),
    sa.Column("image_last_modified", sa.Text),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("retired_at", Timestamp, doc="Delisted (backfill --retire-missing): out of the views and plan."),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("config", Json, nullable=False),
    sa.Column("total_jobs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("broker_epoch", sa.Text),
    # Set once every job of the run exists; until then the run cannot end (its first jobs may
    # finish while a large submit still adds the rest).
    sa.Column("planned_at", Timestamp),
    sa.Column("summary", Json),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp),
    sa.CheckConstraint(_one_of("state", RUN_STATES), name="state"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("run_id", BigId, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("sku", sa.Text, sa.ForeignKey("items.sku"), nullable=False),
    sa.Column("image_uri", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default="submitted"),
    sa.Column("queue", sa.Text, nullable=False, server_default="new"),
    sa.Column("state", sa.Text, nullable=False, server_default="queued"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", Timestamp),
    sa.Column("published_at", Timestamp),
    sa.Column("last_error_code", sa.Text),
    sa.Column("last_error", sa.Text),
    sa.Column("cache_hit", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp),
    sa.UniqueConstraint("run_id", "sku", "image_uri"),  # one job per image of a sku in a run
    sa.CheckConstraint(_one_of("state", JOB_STATES), name="state"),
    sa.Index("ix_jobs_run_id_state", "run_id", "state"),
    sa.Index("ix_jobs_sku_id", "sku", "id"),
    sa.Index(
        "ix_jobs_open",
        "state",
        "lease_expires_at",
        postgresql_where=sa.text(f"state IN {sql_list(OPEN_JOB_STATES)}"),
        sqlite_where=sa.text(f"state IN {sql_list(OPEN_JOB_STATES)}"),
    ),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("run_id", BigId, nullable=False),
    sa.Column("sku", sa.Text, nullable=False),
    sa.Column("image_uri", sa.Text),
    sa.Column("image_sha256", sa.Text),
    sa.Column("cache_key", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("category", sa.Text),
    sa.Column("summary", sa.Text),
    sa.Column("attributes", Json, nullable=False),
    sa.Column("review_attributes", Json, nullable=False),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("model_revision", sa.Text),
    sa.Column("quantization", sa.Text, nullable=False),
    sa.Column("prompt_version", sa.Text, nullable=False),
    sa.Column("taxonomy_version", sa.Text, nullable=False),
    sa.Column("timings", Json, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False),
    sa.Column("produced_at", Timestamp, nullable=False),
    sa.Column("written_at", Timestamp, nullable=False),
    sa.CheckConstraint(_one_of("status", RESULT_STATUSES), name="status"),
    sa.Index("ix_results_sku_produced_at", "sku", "produced_at"),
    sa.Index(
        "ix_results_cache_key",
        "cache_key",
        postgresql_where=sa.text("cache_key IS NOT NULL"),
        sqlite_where=sa.text("cache_key IS NOT NULL"),
    ),
)

tag_sets = sa.Table(
    "tag_sets",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("job_id", BigId, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("category", sa.Text),
    sa.Column("summary", sa.Text),
    sa.Column("image_uri", sa.Text),
    sa.Column("image_sha256", sa.Text),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("quantization", sa.Text, nullable=False),
    sa.Column("prompt_version", sa.Text, nullable=False),
    sa.Column("taxonomy_version", sa.Text, nullable=False),
    sa.Column("produced_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

tags = sa.Table(
    "tags",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("runner_up", sa.Text),
    sa.Column("runner_up_confidence", sa.Float),
    sa.Column("job_id", BigId, nullable=False),
    sa.Column("image_sha256", sa.Text),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("taxonomy_version", sa.Text, nullable=False),
    sa.Column("produced_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Index("ix_tags_attribute_value", "attribute", "value"),
)

REVIEW_ACTIONS = ("accept", "correct", "not_visible", "undo")

review_reasons = sa.Table(
    "review_reasons",
    metadata,
    sa.Column("reason", sa.Text, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
)

# The append-only log of human decisions (triggers in migrations/versions/0003_review_log.py refuse UPDATE, DELETE and
# values outside the taxonomy, and keep review_decisions and the queue in step with it).
reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("sku", sa.Text, nullable=False),
    sa.Column("attribute", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("value", sa.Text, doc="The value decided; NULL only for an undo back to the model's."),
    sa.Column("value_before", sa.Text, doc="The value in force when the reviewer decided."),
    sa.Column("image_sha256", sa.Text, nullable=False, doc="The image the person looked at; a new image voids it."),
    sa.Column("job_id", BigId, doc="The result whose tags were shown."),
    sa.Column("taxonomy_version", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, sa.ForeignKey("review_reasons.reason"), nullable=False),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("blind", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("undoes", BigId, sa.ForeignKey("reviews.id")),
    sa.Column("note", sa.Text),
    sa.Column("reviewed_at", Timestamp, nullable=False),
    sa.CheckConstraint(_one_of("action", REVIEW_ACTIONS), name="action"),
    sa.CheckConstraint("value IS NOT NULL OR action = 'undo'", name="value"),
    sa.CheckConstraint("undoes IS NOT NULL OR action <> 'undo'", name="undo"),
    sa.CheckConstraint("length(image_sha256) > 0 AND length(reviewer) > 0", name="present"),
    sa.Index("ix_reviews_sku_attribute", "sku", "attribute", "id"),
    sa.Index("ix_reviews_reason_id", "reason", "id"),
)

# The decision in force per (sku, attribute): the newest review, for the image it names.
review_decisions = sa.Table(
    "review_decisions",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("image_sha256", sa.Text, nullable=False),
    sa.Column("review_id", BigId, nullable=False),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("reviewed_at", Timestamp, nullable=False),
)

# The review queue: one open task per (sku, attribute) to decide, grouped into one item per sku
# (what a reviewer opens), ordered by the lowest confidence among its open tasks.
review_tasks = sa.Table(
    "review_tasks",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, sa.ForeignKey("review_reasons.reason"), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("job_id", BigId, nullable=False),
    sa.Column("image_sha256", sa.Text, nullable=False),
    sa.Column("blind", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Index("ix_review_tasks_attribute_confidence", "attribute", "confidence", "sku"),
)

review_items = sa.Table(
    "review_items",
    metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("job_id", BigId, nullable=False),
    sa.Column("run_id", BigId, nullable=False),
    sa.Column("category", sa.Text),
    sa.Column("image_sha256", sa.Text, nullable=False),
    sa.Column("min_confidence", sa.Float, nullable=False),
    sa.Column("open_tasks", sa.Integer, nullable=False),
    sa.Column("claimed_by", sa.Text, doc="A reviewer holds the item until claimed_until."),
    sa.Column("claimed_until", Timestamp),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Index("ix_review_items_min_confidence", "min_confidence", "sku"),
    sa.Index("ix_review_items_run_id", "run_id", "min_confidence", "sku"),
)

# Thresholds chosen from audited data (skutag eval --recommend-thresholds --write); the writer
# routes by them unless SKUTAG_ATTRIBUTE_THRESHOLDS names the attribute.
review_thresholds = sa.Table(
    "review_thresholds",
    metadata,
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("target_precision", sa.Float, nullable=False),
    sa.Column("precision", sa.Float),
    sa.Column("coverage", sa.Float, nullable=False),
    sa.Column("evidence_n", sa.Integer, nullable=False),
    sa.Column("set_by", sa.Text, nullable=False),
    sa.Column("set_at", Timestamp, nullable=False),
    sa.CheckConstraint("threshold >= 0 AND threshold <= 1", name="range"),
)

taxonomy_values = sa.Table(
    "taxonomy_values",
    metadata,
    sa.Column("taxonomy_version", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, primary_key=True),
    sa.Column("label_en", sa.Text, nullable=False),
    sa.Column("label_zh", sa.Text, nullable=False),
    sa.Column("synonyms", Json, nullable=False),
)


# --- engines ---------------------------------------------------------------------------------
def make_engine(database_url: str, **kwargs: Any) -> Engine:
    """An engine for database_url. Built where it is used and passed in; never at import."""
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise ConfigError(f"SKUTAG_DATABASE_URL: not a database URL: {database_url!r}") from exc
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.get_backend_name() == "postgres":  # postgres://, as libpq and hosting panels write it
        url = url.set(drivername="postgresql+psycopg2")
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"SKUTAG_DATABASE_URL: only postgresql and sqlite are supported, got {url.drivername!r}")
    kwargs.setdefault("pool_pre_ping", True)
    try:
        return sa.create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"SKUTAG_DATABASE_URL: {exc}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, export) run beside the writer; foreign keys are off by default.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def insert_for(conn: Connection) -> Any:
    """The dialect's INSERT, which has on_conflict_do_update / on_conflict_do_nothing."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


# --- COPY --------------------------------------------------------------------------------------
COPY_NULL = "\\N"
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_field(value: Any) -> str:
    """One value in Postgres COPY text format."""
    if value is None:
        return COPY_NULL
    if value is True:
        return "t"
    if value is False:
        return "f"
    if type(value) is str:
        return value.translate(_COPY_ESCAPES)
    return str(value)


def copy_text(rows: Iterable[tuple[Any, ...]]) -> StringIO:
    """Rows in Postgres COPY text format."""
    buffer = StringIO()
    buffer.writelines("\t".join(copy_field(v) for v in row) + "\n" for row in rows)
    buffer.seek(0)
    return buffer


def copy_rows(conn: Connection, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]] | StringIO) -> None:
    """Postgres COPY into table (often a temporary staging table) in conn's transaction; rows or COPY text."""
    text = rows if isinstance(rows, StringIO) else copy_text(rows)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", text)
    finally:
        cursor.close()


def redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid url>"


# --- the error boundary ----------------------------------------------------------------------
# SQLSTATE classes worth another try: serialization failure, deadlock, lock timeout, the server
# shutting down or refusing connections, and every connection exception (class 08).
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300", "53400"})
# invalid_catalog_name (no such database), invalid_authorization_specification, invalid_password
_WRONG_URL_SQLSTATES = frozenset({"3D000", "28000", "28P01"})


# Refusals at connection time carry no SQLSTATE in psycopg2, only the server's words. These mean the
# URL names something that is not there (or may not log in): waiting will not help, the URL must change.
_WRONG_URL = re.compile(
    r'(database|role) "[^"]*" does not exist|password authentication failed|no pg_hba\.conf entry'
    r"|unable to open database file",
)


def classify_db_error(exc: SQLAlchemyError, action: str) -> RetryableError | FinalError:
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "pgcode", None) or ""
    first_line = (str(orig) if orig is not None else str(exc)).strip().splitlines()[0:1]
    detail = first_line[0] if first_line else type(exc).__name__
    message = f"database error while {action}: {detail}"
    if sqlstate in _WRONG_URL_SQLSTATES or (not sqlstate and _WRONG_URL.search(detail)):
        return ConfigError(f"SKUTAG_DATABASE_URL: {detail} (while {action})")
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return RetryableError(message)
    if sqlstate in _RETRYABLE_SQLSTATES or sqlstate.startswith("08"):
        return RetryableError(message)
    if isinstance(exc, sa.exc.OperationalError) and not sqlstate:
        # No SQLSTATE: the driver never reached the server (refused, reset) or SQLite is busy.
        return RetryableError(message)
    if isinstance(exc, IntegrityError | sa.exc.DataError):
        return InputError(message)
    return FinalError(message)


@contextmanager
def translated_errors(action: str) -> Iterator[None]:
    """Translate SQLAlchemy/psycopg2/sqlite3 errors raised inside into RetryableError or FinalError."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise classify_db_error(exc, action) from exc


# Registered on the same metadata, defined in their own module (after everything they import here).
from pipeline import catalog_tables  # noqa: E402, F401  (so Alembic and every importer of metadata see them)
