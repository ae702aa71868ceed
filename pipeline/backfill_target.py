"""What the backfill plans against: the versions the workers actually run.

A backfill started from cron reads its own settings, which may not be the workers' (another
SKUTAG_MODEL, an older taxonomy file). Planning against those would re-queue the whole catalog as
"model_changed" every night. So the plan's model, quantization, prompt and taxonomy versions come
from the latest successful result the workers wrote; `--model` pins the model (and quantization)
to this process's settings instead. Every field where the backfill's own settings disagree with
the workers' is a warning naming both values, never a silent re-queue.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.db import results
from pipeline.producer import config_snapshot
from pipeline.settings import Settings
from schemas.taxonomy import Taxonomy

SETTING_NAMES = {
    "model_id": "SKUTAG_MODEL (--model)",
    "quantization": "SKUTAG_QUANTIZATION (--quantization)",
    "prompt_version": "the prompt version (SKUTAG_PROMPT_LANGUAGE, SKUTAG_SUMMARY_MAX_TOKENS, taxonomy)",
    "taxonomy_version": "the taxonomy version (SKUTAG_TAXONOMY_PATH)",
}


@dataclass(frozen=True)
class Versions:
    model_id: str
    quantization: str
    prompt_version: str
    taxonomy_version: str


@dataclass(frozen=True)
class PlanTarget:
    versions: Versions
    source: str  # where the versions come from, for the dry run and the summary
    warnings: list[str] = field(default_factory=list)

    def document(self) -> dict[str, str]:
        return {**asdict(self.versions), "source": self.source}


def own_versions(settings: Settings, taxonomy: Taxonomy) -> Versions:
    snapshot = config_snapshot(settings, taxonomy)
    return Versions(settings.model, settings.quantization, snapshot["prompt_version"], snapshot["taxonomy_version"])


def workers_versions(conn: Connection) -> tuple[Versions, int] | None:
    """The versions of the newest successful result (by job id: the primary key's order), and its job."""
    statement = (
        sa.select(results.c.job_id, results.c.model_id, results.c.quantization, results.c.prompt_version,
                  results.c.taxonomy_version)
        .where(results.c.status != "failed")
        .order_by(results.c.job_id.desc())
        .limit(1)
    )  # fmt: skip
    row = conn.execute(statement).one_or_none()
    if row is None:
        return None
    return Versions(row.model_id, row.quantization, row.prompt_version, row.taxonomy_version), int(row.job_id)


def plan_target(conn: Connection, settings: Settings, taxonomy: Taxonomy, pin_model: bool = False) -> PlanTarget:
    own = own_versions(settings, taxonomy)
    latest = workers_versions(conn)
    if latest is None:
        return PlanTarget(own, "this backfill's settings (no successful result yet)")
    theirs, job_id = latest
    chosen = Versions(
        model_id=own.model_id if pin_model else theirs.model_id,
        quantization=own.quantization if pin_model else theirs.quantization,
        prompt_version=theirs.prompt_version,
        taxonomy_version=theirs.taxonomy_version,
    )
    source = f"the workers' latest successful result (job {job_id})" + (
        ", model pinned by --model" if pin_model else ""
    )
    warnings = [
        f"{SETTING_NAMES[name]}: this backfill has {getattr(own, name)!r}, the workers' latest result (job "
        f"{job_id}) has {getattr(theirs, name)!r}; planning against {getattr(chosen, name)!r}"
        for name in SETTING_NAMES
        if getattr(own, name) != getattr(theirs, name)
    ]
    return PlanTarget(chosen, source, warnings)
