"""Joins the stages for one batch of jobs: intake outcomes + cached results + the engine -> one
TagResult per job. The Celery workers, local mode (`skutag run`) and `skutag tag-image` all call
this, so the three paths cannot drift apart.

Per job, in order: an intake failure becomes a failed result (or a retry, when the code is
retryable and attempts remain); an image whose content and versions already have a stored result
reuses it (cache_hit); everything else goes to the engine in one batch, split in halves on GPU
out-of-memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.errors import InferenceError
from pipeline.inference import BatchStats, ItemTags
from pipeline.routing import Thresholds, routed
from schemas.images import IntakeFailure, IntakeOutcome, PreparedImage
from schemas.results import ErrorCode, ItemError, JobSpec, Provenance, TagResult, failed_result

log = logging.getLogger("skutag.runner")


class Tagger(Protocol):
    """What tag_batch needs from the engine: TaggingEngine itself, or a DynamicBatcher in front of it."""

    def provenance(self, run_id: int | None = None) -> Provenance: ...

    def tag_many(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], list[BatchStats]]: ...


@dataclass
class BatchOutcome:
    results: list[TagResult] = field(default_factory=list)  # final: to the writer
    retries: list[tuple[JobSpec, ItemError]] = field(default_factory=list)  # back to the queue
    stats: list[BatchStats] = field(default_factory=list)
    cache_hits: int = 0


def cached_result(
    job: JobSpec, image: PreparedImage, stored: TagResult, provenance: Provenance, thresholds: Thresholds
) -> TagResult:
    """A stored model output for the same image content and versions, re-issued for this job and
    routed by today's thresholds (the stored status is how it was routed then, not now)."""
    result = TagResult(
        job_id=job.job_id,
        sku=job.sku,
        image_uri=job.image_uri,
        image_sha256=image.sha256,
        status="tagged",
        attributes=stored.attributes,
        summary=stored.summary,
        provenance=provenance.model_copy(update={"cache_hit": True, "timings_ms": _intake_timings(image)}),
    )
    return routed(result, thresholds)


def tagged_result(
    job: JobSpec, image: PreparedImage, tags: ItemTags, provenance: Provenance, thresholds: Thresholds | None = None
) -> TagResult:
    result = TagResult(
        job_id=job.job_id,
        sku=job.sku,
        image_uri=job.image_uri,
        image_sha256=image.sha256,
        status="tagged",
        attributes=tags.attributes,
        summary=tags.summary,
        provenance=provenance.model_copy(update={"timings_ms": {**_intake_timings(image), **tags.timings_ms}}),
    )
    return routed(result, thresholds or Thresholds())


def _intake_timings(image: PreparedImage) -> dict[str, float]:
    return {"fetch_ms": round(image.fetch_ms, 3), "decode_ms": round(image.decode_ms, 3)}


def tag_batch(
    engine: Tagger,
    jobs: Sequence[JobSpec],
    outcomes: Sequence[IntakeOutcome],
    cache: Mapping[int, TagResult] | None = None,
    max_attempts: int = 1,
    thresholds: Thresholds | None = None,
) -> BatchOutcome:
    """One result (or retry) per job; jobs and outcomes are parallel sequences. cache maps a job
    id to a stored model output for its image and versions; a job not in it is inferred."""
    thresholds = thresholds or Thresholds()
    batch = BatchOutcome()
    to_infer: list[tuple[JobSpec, PreparedImage]] = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        provenance = engine.provenance(job.run_id)
        if isinstance(outcome, IntakeFailure):
            _fail_or_retry(batch, job, outcome.error, provenance, max_attempts, outcome.sha256)
            continue
        stored = (cache or {}).get(job.job_id)
        if stored is not None:
            batch.results.append(cached_result(job, outcome, stored, provenance, thresholds))
            batch.cache_hits += 1
        else:
            to_infer.append((job, outcome))
    if to_infer:
        _infer(engine, to_infer, batch, max_attempts, thresholds)
    return batch


def _infer(
    engine: Tagger,
    work: list[tuple[JobSpec, PreparedImage]],
    batch: BatchOutcome,
    max_attempts: int,
    thresholds: Thresholds,
) -> None:
    try:
        tags, stats = engine.tag_many([image for _, image in work])
    except InferenceError as exc:  # the batch's failure (device, time limit; OOM was split already)
        error = ItemError(code=ErrorCode.INFERENCE_FAILED, message=exc.message)
        for job, image in work:
            _fail_or_retry(batch, job, error, engine.provenance(job.run_id), max_attempts, image.sha256)
        return
    except Exception as exc:  # a bug one image may trigger: find it by halves, so only it fails
        _isolate(engine, work, batch, max_attempts, thresholds, exc)
        return
    batch.stats += stats
    for (job, image), item in zip(work, tags, strict=True):
        batch.results.append(tagged_result(job, image, item, engine.provenance(job.run_id), thresholds))


def _isolate(
    engine: Tagger,
    work: list[tuple[JobSpec, PreparedImage]],
    batch: BatchOutcome,
    max_attempts: int,
    thresholds: Thresholds,
    exc: Exception,
) -> None:
    if len(work) > 1:
        middle = len(work) // 2
        _infer(engine, work[:middle], batch, max_attempts, thresholds)
        _infer(engine, work[middle:], batch, max_attempts, thresholds)
        return
    job, image = work[0]
    log.error(
        "tagging job %d sku %r failed unexpectedly", job.job_id, job.sku, exc_info=exc,
        extra={"run_id": job.run_id, "job_id": job.job_id, "sku": job.sku},
    )  # fmt: skip
    error = ItemError(code=ErrorCode.INTERNAL_ERROR, message=f"internal error ({type(exc).__name__}); see the log")
    batch.results.append(failed_result(job, error, engine.provenance(job.run_id), image.sha256))


def _fail_or_retry(
    batch: BatchOutcome, job: JobSpec, error: ItemError, provenance: Provenance, max_attempts: int, sha256: str | None
) -> None:
    if error.retryable and job.attempt < max_attempts:
        batch.retries.append((job, error))
    else:
        batch.results.append(failed_result(job, error, provenance, sha256))
