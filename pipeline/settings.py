"""The one typed settings object, shared by the CLI, the workers and Alembic.

Precedence, highest first: CLI flags (passed to load_settings), SKUTAG_* environment variables,
a .env file in the working directory, the defaults below. The defaults make a first run need no
server: a SQLite file in the working directory and the packaged taxonomy.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from schemas.taxonomy import Taxonomy

Quantization = Literal["int8", "int8-torchao", "nf4", "bf16", "fp16", "fp32"]
ImageFit = Literal["crop", "pad"]
PromptLanguage = Literal["en", "zh"]
DecodeMode = Literal["eager", "static", "compiled"]

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
    quantization_skip_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["model.visual", "lm_head"],
        description="Modules kept unquantized (quantized ViTs are an accuracy risk).",
    )

    # --- taxonomy and prompts -------------------------------------------------------------
    taxonomy_path: Path | None = Field(None, description="Your own taxonomy file; the packaged one if unset.")
    prompt_language: PromptLanguage = "en"
    summary_max_tokens: int = Field(
        160, ge=0, le=256,
        description="0 turns the summary off; otherwise a bound on its tokens. The length cap that counts is the "
        "taxonomy's summary max_chars, in characters of the prompt's language.",
    )  # fmt: skip
    confidence_threshold: float = Field(0.5, ge=0.0, le=1.0)
    attribute_thresholds: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description='Per-attribute overrides of confidence_threshold: style=0.7,pattern=0.6 or {"style": 0.7}.',
    )

    # --- listing checks ---------------------------------------------------------------------
    listing_checks: bool = Field(True, description="Compare titles and category hints with the image's tags.")
    listing_min_confidence: float = Field(
        0.8, ge=0.0, le=1.0, description="Only an image tag at least this confident can contradict a listing."
    )
    listing_ignored_attributes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["style", "season"], description="Attributes a listing is not checked on."
    )

    # --- several images per sku -------------------------------------------------------------
    merge_conflict_confidence: float = Field(
        0.8, ge=0.0, le=1.0, description="Two images at least this sure that disagree make the attribute a conflict."
    )

    # --- batching and time limits ---------------------------------------------------------
    batch_size: int = Field(32, ge=1, le=1024, description="Images per engine call, and jobs per queue message.")
    engine_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="Most images per forward batch; a larger call is tagged in chunks of this size. auto: what "
        "the free GPU memory holds on CUDA, 32 on a CPU.",
    )
    decode_mode: DecodeMode = Field(
        "eager",
        description="The engine's key/value cache: eager (grown per step), static (preallocated, written at "
        "explicit slots) or compiled (static, with the decode step under torch.compile; CUDA graphs on a GPU).",
    )
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
    image_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path()], description="Local images must lie under one of these."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts exempt from the private-address check (host or host:port)."
    )
    image_formats: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF"])
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(60_000_000, ge=1)
    decode_budget_mb: int = Field(
        128, ge=16,
        description="Full-size decoded pixels one process's intake threads may hold at once; an image that "
        "needs more decodes alone. Peak intake memory is the larger of this and the largest image.",
    )  # fmt: skip
    fetch_connect_timeout_s: float = Field(3.0, gt=0)
    fetch_read_timeout_s: float = Field(5.0, gt=0)
    fetch_total_timeout_s: float = Field(15.0, gt=0)
    fetch_max_redirects: int = Field(5, ge=0, le=20)
    image_stores: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["s3", "gs"],
        description="fsspec object stores image URIs may name (s3, gs, az, ...; each needs its package).",
    )
    storage_options: Annotated[dict[str, dict[str, Any]], NoDecode] = Field(
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

    # A list setting may be written as one value, a comma-separated list or a JSON list: people
    # write SKUTAG_IMAGE_ROOTS=/data/images, not '["/data/images"]'. Paths also split on os.pathsep
    # (as PATH does); hosts never do (':' separates the port).
    @field_validator(
        "quantization_skip_modules",
        "allowed_hosts",
        "image_formats",
        "listing_ignored_attributes",
        "image_stores",
        mode="before",
    )
    @classmethod
    def _plain_list(cls, value: Any) -> Any:
        return parse_list(value, ",")

    @field_validator("engine_batch_size", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        # Decided here in one message: left to the union, a bad value gets one error per branch.
        text = value.strip() if isinstance(value, str) else value
        if text == "auto":
            return text
        if isinstance(text, str) and text.isdigit():
            text = int(text)
        if not isinstance(text, int) or isinstance(text, bool) or not 1 <= text <= 1024:
            raise ValueError("expected auto or a number of images from 1 to 1024")
        return text

    @field_validator("image_roots", mode="before")
    @classmethod
    def _plain_path_list(cls, value: Any) -> Any:
        return parse_list(value, "," + os.pathsep)

    @field_validator("attribute_thresholds", mode="before")
    @classmethod
    def _plain_thresholds(cls, value: Any) -> Any:
        return parse_thresholds(value)

    @field_validator("storage_options", mode="before")
    @classmethod
    def _json_mapping(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f'not JSON ({exc.msg}); write {{"s3": {{"endpoint_url": "https://..."}}}}') from None

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: str) -> str:
        return check_database_url(normalise_database_url(value))

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

    def with_image_roots(self, *extra: Path) -> Settings:
        """These settings with more image roots: SKUTAG_IMAGE_ROOTS stays, the extra ones are added
        (a catalog's folder, --image-root), each once."""
        roots = list(self.image_roots)
        known = {root.resolve() for root in roots}
        for root in extra:
            if root.resolve() not in known:
                roots.append(root)
                known.add(root.resolve())
        return self.model_copy(update={"image_roots": roots})

    def threshold_for(self, attribute: str) -> float:
        return self.attribute_thresholds.get(attribute, self.confidence_threshold)

    def check_thresholds(self, attribute_names: Iterable[str]) -> None:
        """Refuse thresholds for attributes the taxonomy does not have: a misspelt name would
        otherwise be ignored without a word."""
        known = sorted(set(attribute_names))
        for name in self.attribute_thresholds:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                raise ConfigError(f"SKUTAG_ATTRIBUTE_THRESHOLDS: no attribute {name!r} in the taxonomy ({hint})")


def taxonomy_for(settings: Settings) -> Taxonomy:
    """The taxonomy these settings name, with the settings that refer to its attributes checked
    against it (a misspelt attribute in SKUTAG_ATTRIBUTE_THRESHOLDS is refused, not ignored)."""
    from schemas.taxonomy import CATEGORY, load_taxonomy

    taxonomy = load_taxonomy(settings.taxonomy_path)
    settings.check_thresholds([*taxonomy.attributes, CATEGORY])
    return taxonomy


def load_settings(flag_names: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings; CLI flags come in as overrides (None means 'not given'). flag_names: the
    flag a user typed for a setting (batch_size -> --batch-size), named in the error instead of
    the variable when the bad value came from that flag."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        flags = {name: flag for name, flag in (flag_names or {}).items() if name in given}
        raise ConfigError(describe_validation_error(exc, flags)) from exc
    except SettingsError as exc:  # a source that could not be read at all (a malformed .env value)
        raise ConfigError(f"invalid settings: {str(exc).splitlines()[0]}") from exc


def check_database_url(url: str) -> str:
    """Refuse a URL skutag cannot use here, at load time, so the error names the flag or variable
    it came from (make_engine checks again for callers that build no Settings)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ValueError("not a database URL") from None
    if backend not in ("postgresql", "sqlite"):
        raise ValueError(f"only postgresql and sqlite are supported, not {backend!r}")
    return url


_POSTGRES_ALIASES = re.compile(r"^postgres(ql)?(\+psycopg2)?://")


def normalise_database_url(url: str) -> str:
    """postgres:// (Heroku, libpq, most hosting panels) means postgresql+psycopg2:// to us."""
    return _POSTGRES_ALIASES.sub("postgresql+psycopg2://", url.strip(), count=1)


def parse_list(value: Any, separators: str) -> Any:
    """A JSON list, or values split on any of separators; anything not a string is left to pydantic."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            hint = "write one value, a comma-separated list or a JSON list"
            raise ValueError(f"not a JSON list ({exc.msg}); {hint}") from None
    return [part.strip() for part in re.split(f"[{re.escape(separators)}]", text) if part.strip()]


def parse_thresholds(value: Any) -> Any:
    """{"style": 0.7} (JSON) or style=0.7,pattern=0.6."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f'not JSON ({exc.msg}); write style=0.7,pattern=0.6 or {{"style": 0.7}}') from None
    thresholds: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        name, equals, number = pair.partition("=")
        if not equals or not name.strip():
            raise ValueError(f'{pair!r} is not name=value; write style=0.7,pattern=0.6 or {{"style": 0.7}}')
        thresholds[name.strip()] = number.strip()
    return thresholds


# Settings that may hold credentials (a URL may carry a password): a bad one is named, its value is not repeated.
_NOT_ECHOED = frozenset({"storage_options", "review_token", "database_url", "backfill_source_url"})


def describe_validation_error(exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line per bad setting: the flag the user typed (flags: setting -> flag), else the
    variable a user would set, and what is allowed."""
    lines = []
    for error in exc.errors():
        field, *inside = [str(part) for part in error["loc"]]
        name = (flags or {}).get(field) or ENV_PREFIX + field.upper()
        env_name = name + (f" [{'.'.join(inside)}]" if inside else "")
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        got = "" if field in _NOT_ECHOED else f" (got {error.get('input')!r})"
        lines.append(f"{env_name}: {message}{got}")
    return "invalid settings: " + "; ".join(lines)
