"""The one typed settings object, shared by the CLI, the workers and Alembic.

Precedence, highest first: CLI flags (passed to load_settings), SKUTAG_* environment variables,
a .env file in the working directory, the defaults below. The defaults make a first run need no
server: a SQLite file in the working directory and the packaged taxonomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError

Quantization = Literal["int8", "nf4", "bf16", "fp16", "fp32"]
ImageFit = Literal["crop", "pad"]
PromptLanguage = Literal["en", "zh"]

DEFAULT_MODEL = "Qwen/Qwen3-VL-8B-Instruct"
ENV_PREFIX = "SKUTAG_"


class Settings(BaseSettings):
    """Everything an operator can set. Field names map to SKUTAG_<NAME> environment variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        protected_namespaces=(),
        validate_default=True,
    )

    # --- services -------------------------------------------------------------------------
    database_url: str = Field(
        "sqlite:///skutag.db",
        description="SQLAlchemy URL. SQLite for a first try; postgresql+psycopg2://... in production.",
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Celery broker: redis://host:6379/N, or amqp://user:password@host:5672/vhost.",
    )
    notify_channel: str = Field(
        "skutag_tags_changed", pattern=r"^[a-z_][a-z0-9_]*$", description="Postgres NOTIFY channel."
    )

    # --- model ----------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Hub id or local directory.")
    model_revision: str | None = Field(None, description="Hub revision (commit) to pin.")
    quantization: Quantization = "int8"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    quantization_skip_modules: list[str] = Field(
        default_factory=lambda: ["model.visual", "lm_head"],
        description="Modules kept unquantized (quantized ViTs are an accuracy risk).",
    )

    # --- taxonomy and prompts -------------------------------------------------------------
    taxonomy_path: Path | None = Field(None, description="Your own taxonomy file; the packaged one if unset.")
    prompt_language: PromptLanguage = "en"
    summary_max_tokens: int = Field(40, ge=0, le=256, description="0 turns the summary off.")
    confidence_threshold: float = Field(0.5, ge=0.0, le=1.0)
    attribute_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-attribute overrides of confidence_threshold."
    )

    # --- listing checks ---------------------------------------------------------------------
    listing_checks: bool = Field(True, description="Compare titles and category hints with the image's tags.")
    listing_min_confidence: float = Field(
        0.8, ge=0.0, le=1.0, description="Only an image tag at least this confident can contradict a listing."
    )
    listing_ignored_attributes: list[str] = Field(
        default_factory=lambda: ["style", "season"], description="Attributes a listing is not checked on."
    )

    # --- batching and time limits ---------------------------------------------------------
    batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_ms: int = Field(50, ge=0, le=60_000, description="Longest a partial batch waits to fill.")
    batch_time_limit_s: float = Field(300.0, gt=0, description="A batch running longer is abandoned.")
    intake_threads: int = Field(8, ge=1, le=256)
    max_attempts: int = Field(3, ge=1, le=100)
    lease_s: int = Field(900, ge=1, description="A running job with no result after this is re-queued.")
    worker_concurrency: int = Field(3, ge=1, le=64, description="Messages a GPU worker works on at once.")
    writer_batch_messages: int = Field(32, ge=1, le=1000, description="Queue messages merged per write.")
    reconcile_interval_s: float = Field(60.0, gt=0, description="How often the writer runs the reconciler.")
    republish_after_s: int = Field(
        7200, ge=1, description="A queued job published longer ago than this is published again."
    )

    # --- intake ---------------------------------------------------------------------------
    image_size: int = Field(384, ge=32, le=2048)
    image_fit: ImageFit = "crop"
    image_decode_min_ratio: float = Field(
        1.0, ge=0.5, le=1.0,
        description="DCT-scaled JPEG decoding may stop at this fraction of image_size (the device upscales "
        "the rest): 0.75 decodes 1600x1200 at 1/4 instead of 1/2, faster and slightly softer.",
    )  # fmt: skip
    image_roots: list[Path] = Field(
        default_factory=lambda: [Path()], description="Local images must lie under one of these."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts exempt from the private-address check (host or host:port)."
    )
    image_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF"])
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(60_000_000, ge=1)
    decode_budget_mb: int = Field(
        256, ge=16,
        description="Full-size decoded pixels one process's intake threads may hold at once; an image that "
        "needs more decodes alone. Peak intake memory is the larger of this and the largest image.",
    )  # fmt: skip
    fetch_connect_timeout_s: float = Field(3.0, gt=0)
    fetch_read_timeout_s: float = Field(5.0, gt=0)
    fetch_total_timeout_s: float = Field(15.0, gt=0)
    fetch_max_redirects: int = Field(5, ge=0, le=20)
    image_stores: list[str] = Field(
        default_factory=lambda: ["s3", "gs"],
        description="fsspec object stores image URIs may name (s3, gs, az, ...; each needs its package).",
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='fsspec options per store, JSON: {"s3": {"endpoint_url": "https://minio.internal"}}. '
        "Prefer the store's own credential chain to keys here.",
    )
    http_headers_file: Path | None = Field(
        None, description="YAML/JSON: host -> headers for private image servers (values may be ${ENV_VAR})."
    )
    http_proxy_from_env: bool = Field(
        False, description="Fetch http(s) images through HTTP(S)_PROXY, honouring NO_PROXY."
    )

    # --- backfill -------------------------------------------------------------------------
    backfill_max_outstanding: int = Field(
        2000, ge=1, description="Most backfill jobs published and not finished at any time (Redis memory bound)."
    )
    backfill_source_query: str | None = Field(
        None, description="Read-only SQL returning sku, image_uri[, title, category_hint]: the catalog to refresh from."
    )
    backfill_source_url: str | None = Field(
        None, description="Database for backfill_source_query (default: database_url)."
    )

    # --- operations -----------------------------------------------------------------------
    work_dir: Path = Field(Path(".skutag"), description="Tiny model, demo catalog, caches.")
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Worker, writer and backfill logs: text, or json (one object per line with run_id, job_id, sku).",
    )
    worker_events: bool = Field(
        False, description="Workers send task events (celery events, Flower); also `skutag worker --events`."
    )

    # --- review app -----------------------------------------------------------------------
    review_token: str | None = Field(
        None, description="Shared reviewer token (16+ characters); reviewers log in with their name and it."
    )
    review_users_file: Path | None = Field(
        None, description="Reviewers with scrypt-hashed passwords, `name:hash` lines (skutag review hash-password)."
    )

    @field_validator("image_size")
    @classmethod
    def _image_size_fits_patches(cls, value: int) -> int:
        # 16 px patches merged 2x2: the side must be a multiple of 32 or the vision tower pads.
        if value % 32:
            raise ValueError("must be a multiple of 32")
        return value

    @field_validator("image_formats")
    @classmethod
    def _upper_formats(cls, value: list[str]) -> list[str]:
        return [name.upper() for name in value]

    @field_validator("attribute_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for name, threshold in value.items():
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {name!r} must be within [0, 1]")
        return value

    def threshold_for(self, attribute: str) -> float:
        return self.attribute_thresholds.get(attribute, self.confidence_threshold)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings; CLI flags come in as overrides (None means 'not given')."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting: the variable a user would set, and what is allowed."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + name.split(".")[0].upper()
        got = error.get("input")
        lines.append(f"{env_name}: {error['msg']} (got {got!r})")
    return "invalid settings: " + "; ".join(lines)
