"""Fixtures: real Postgres and Redis (skipped on a laptop without them, a failure in CI), SQLite,
and factories for catalog rows and results drawn from the real taxonomy."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from pipeline import ledger
from pipeline.db import make_engine
from pipeline.inference import TaggingEngine, load_model
from pipeline.migrate import upgrade
from pipeline.settings import Settings, load_settings
from schemas.images import PreparedImage
from schemas.results import AttributeTag, JobSpec, Provenance, TagResult
from schemas.taxonomy import CATEGORY, NOT_VISIBLE, Taxonomy, default_taxonomy
from tests.rabbitmq import RabbitMQServer, rabbitmq_installed

POSTGRES_URL = os.environ.get("SKUTAG_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SKUTAG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# CI sets this: a missing service is then a failure, not a skip.
REQUIRE_SERVICES = os.environ.get("SKUTAG_REQUIRE_SERVICES") == "1"


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} not reachable: {exc}"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, flushed before and after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        client.close()
        _unavailable("Redis", exc)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """A private rabbitmq-server for this test session (started on first use; ~20 s)."""
    if not rabbitmq_installed():
        _unavailable(
            "RabbitMQ", FileNotFoundError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        )
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"))
    try:
        server.start()
    except RuntimeError as exc:
        _unavailable("RabbitMQ", exc)
    yield server
    server.stop()


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> Iterator[str]:
    """The private RabbitMQ with skutag's queues deleted before and after (like flushdb for Redis)."""
    rabbitmq_server.delete_queues()
    yield rabbitmq_server.url
    if rabbitmq_server.process is not None:
        rabbitmq_server.delete_queues()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        _unavailable("Postgres", exc)
    yield engine
    engine.dispose()


def create_database(admin: Engine) -> str:
    """A new, empty Postgres database; returns its URL."""
    name = f"skutag_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(admin: Engine, url: str) -> None:
    name = make_url(url).database
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_postgres_url(postgres_admin: Engine) -> Iterator[str]:
    url = create_database(postgres_admin)
    yield url
    drop_database(postgres_admin, url)


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_admin: Engine) -> Iterator[str]:
    url = create_database(postgres_admin)
    upgrade(url)
    yield url
    drop_database(postgres_admin, url)


TABLES = (
    "listing_mismatches", "taxonomy_values", "reviews", "review_decisions", "review_tasks", "review_items",
    "review_thresholds", "tags", "tag_sets", "results", "jobs", "runs", "items", "item_images", "tag_sources",
)  # fmt: skip


@pytest.fixture
def pg_engine(migrated_postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: object) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path}/skutag.db"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Both databases skutag supports, with the schema migrated and no rows."""
    name = "pg_engine" if request.param == "postgres" else "sqlite_engine"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def taxonomy() -> Taxonomy:
    return default_taxonomy()


# --- shared fakes ----------------------------------------------------------------------------
class RecordingPublisher:
    """The broker side of the reconciler under test: records what it was asked to publish."""

    def __init__(self, epoch: str = "redis-life-1") -> None:
        self.current_epoch = epoch
        self.published: list[tuple[str, list[int]]] = []

    def publish(self, jobs: Sequence[JobSpec], queue: str) -> None:
        self.published.append((queue, [job.job_id for job in jobs]))

    def epoch(self) -> str | None:
        return self.current_epoch

    @property
    def job_ids(self) -> list[int]:
        return sorted(job_id for _, ids in self.published for job_id in ids)


# --- factories -------------------------------------------------------------------------------
def make_jobs(engine: Engine, count: int, prefix: str = "SKU", kind: str = "submit") -> list[JobSpec]:
    rows = [
        ledger.CatalogRow(sku=f"{prefix}-{i:06d}", image_uri=f"file:///images/{prefix}-{i}.jpg") for i in range(count)
    ]
    with engine.begin() as conn:
        ledger.upsert_items(conn, rows)
        run_id = ledger.create_run(conn, kind, {"test": True})
        created = ledger.add_jobs(conn, run_id, [(row.sku, row.image_uri) for row in rows])
        ledger.seal_run(conn, run_id)
        return created


def provenance(taxonomy: Taxonomy, run_id: int | None = None, **changes: object) -> Provenance:
    base = {
        "model_id": "test/model",
        "quantization": "fp32",
        "prompt_version": "pv-test",
        "taxonomy_version": taxonomy.version,
        "run_id": run_id,
    }
    return Provenance.model_validate(base | changes)


def make_result(
    job: JobSpec,
    taxonomy: Taxonomy,
    seed: int = 0,
    category: str | None = None,
    produced_at: datetime | None = None,
    status: str = "tagged",
) -> TagResult:
    """A valid result for job: a category and a value for each of its attributes, chosen by seed."""
    rng = random.Random(f"{job.sku}:{seed}")
    category = category or rng.choice(sorted(taxonomy.categories))
    attributes = {CATEGORY: AttributeTag(value=category, confidence=round(rng.uniform(0.5, 1.0), 4))}
    for attribute in taxonomy.attributes_for(category):
        # Visible values only: a test about not_visible sets it on purpose.
        value, runner_up = rng.sample([v.id for v in attribute.values if v.id != NOT_VISIBLE], 2)
        attributes[attribute.name] = AttributeTag(
            # At or above the default threshold (0.5): the writer routes by confidence, so a result
            # made 'tagged' must be one the default thresholds leave alone.
            value=value,
            confidence=round(rng.uniform(0.5, 1.0), 4),
            runner_up=runner_up,
            runner_up_confidence=0.1,
        )
    return TagResult(
        job_id=job.job_id,
        sku=job.sku,
        image_uri=job.image_uri,
        image_sha256=f"{rng.getrandbits(256):064x}",
        status=status,  # type: ignore[arg-type]
        attributes=attributes,
        summary=f"summary {seed} for {job.sku}",
        provenance=provenance(taxonomy, job.run_id),
        produced_at=produced_at or datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seed),
    )


# --- the tiny model --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Qwen's real 151,936-token vocabulary (built once per test session)."""
    from pipeline.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen-model"), tokenizer_kind="qwen")


@pytest.fixture(scope="session", params=["tiny", "qwen"])
def any_model_dir(request: pytest.FixtureRequest) -> Path:
    """Each tokenizer in turn: the tiny one (labels of one token) and Qwen's real one."""
    name = "tiny_model_dir" if request.param == "tiny" else "qwen_model_dir"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def any_engine(any_model_dir: Path, taxonomy: Taxonomy) -> TaggingEngine:
    settings = engine_settings(any_model_dir)
    return TaggingEngine(load_model(settings), taxonomy, settings)


def engine_settings(model_dir: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "model": str(model_dir),
        "quantization": "fp32",
        "device": "cpu",
        "summary_max_tokens": 6,
    }
    return load_settings(**(base | overrides))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path, taxonomy: Taxonomy) -> TaggingEngine:
    settings = engine_settings(tiny_model_dir)
    return TaggingEngine(load_model(settings), taxonomy, settings)


def random_images(count: int, seed: int = 0) -> list[PreparedImage]:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        side = int(rng.integers(8, 900))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        images.append(PreparedImage(f"mem://{seed}/{index}", f"{seed}-{index}", pixels, "PNG", (side, side)))
    return images
