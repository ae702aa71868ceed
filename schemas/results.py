"""The types passed between stages, and the JSON export format. Versioned by SCHEMA_VERSION.

    JobSpec     what the producer publishes: one SKU image to tag, with its job id
    ItemError   why one item failed (a code from ErrorCode, a message, retryable or not)
    TagResult   one item's outcome: attributes with confidences, summary, status, provenance

A bad item is a TagResult with status 'failed' and an ItemError, never an exception.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class ErrorCode(StrEnum):
    """Why an item failed. The set is documented in README ("Error codes"); keep the two in step."""

    INVALID_URI = "invalid_uri"
    FETCH_FAILED = "fetch_failed"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"
    FORBIDDEN_ADDRESS = "forbidden_address"
    NOT_FOUND = "not_found"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECOMPRESSION_BOMB = "decompression_bomb"
    CORRUPT = "corrupt"
    INFERENCE_FAILED = "inference_failed"
    INVALID_RESULT = "invalid_result"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    INTERNAL_ERROR = "internal_error"  # a bug: the traceback is in the log, with the job id and sku
    CANCELLED = "cancelled"  # `skutag runs cancel RUN` ended the run before this job ran


# Worth another attempt later; every other code fails the job at once.
RETRYABLE_CODES = frozenset({ErrorCode.FETCH_FAILED, ErrorCode.TIMEOUT, ErrorCode.INFERENCE_FAILED})

Status = Literal["tagged", "needs_review", "failed"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSpec(_Wire):
    job_id: int
    run_id: int
    sku: str
    image_uri: str
    attempt: int = 1


class ItemError(_Wire):
    code: ErrorCode
    message: str = Field(max_length=1000)

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class AttributeTag(_Wire):
    value: str
    confidence: float = Field(ge=0.0, le=1.0)
    runner_up: str | None = None
    runner_up_confidence: float | None = Field(None, ge=0.0, le=1.0)


class Provenance(_Wire):
    model_id: str
    model_revision: str | None = None
    quantization: str
    prompt_version: str
    taxonomy_version: str
    run_id: int | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    cache_hit: bool = False

    @property
    def cache_key_suffix(self) -> str:
        """The versions that, with the image's sha256, decide whether a stored result still holds."""
        model = f"{self.model_id}@{self.model_revision or '-'}"
        return f"{model}/{self.quantization}/{self.prompt_version}/{self.taxonomy_version}"


class TagResult(_Wire):
    schema_version: int = SCHEMA_VERSION
    job_id: int | None = None
    sku: str
    image_uri: str | None = None  # what the tags were computed from; backfill compares it with the item's
    image_sha256: str | None = None
    status: Status
    attributes: dict[str, AttributeTag] = Field(default_factory=dict)
    summary: str | None = None
    review_attributes: list[str] = Field(default_factory=list)
    error: ItemError | None = None
    provenance: Provenance
    produced_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def category(self) -> str | None:
        tag = self.attributes.get("category")
        return tag.value if tag else None

    @property
    def cache_key(self) -> str | None:
        if self.image_sha256 is None or self.status == "failed":
            return None
        return cache_key(self.image_sha256, self.provenance)


def cache_key(image_sha256: str, provenance: Provenance) -> str:
    return f"{image_sha256}:{provenance.cache_key_suffix}"


def failed_result(job: JobSpec, error: ItemError, provenance: Provenance, image_sha256: str | None = None) -> TagResult:
    return TagResult(
        job_id=job.job_id,
        sku=job.sku,
        image_uri=job.image_uri,
        image_sha256=image_sha256,
        status="failed",
        error=error,
        provenance=provenance,
    )
