"""The reconciler: makes the broker agree with the ledger again.

- a running job whose lease expired (its worker was killed or hung) goes back to the queue;
- a queued job whose message cannot be in the broker any more (published in an earlier life of
  Redis, or longer ago than republish_after_s) is forgotten as published;
- every queued job without a message is published.
A job published twice costs nothing but a skipped claim: results are keyed by job id.
Run by `skutag reconcile`, and periodically by every writer (one at a time: an advisory lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection, Engine

from pipeline import ledger
from pipeline.db import translated_errors
from pipeline.worker import JobPublisher

PAGE = 5000


@dataclass
class ReconcileReport:
    expired_leases: int = 0
    lost_messages: int = 0
    published: int = 0
    skipped: bool = False  # another reconciler held the lock


def reconcile(
    database: Engine, publisher: JobPublisher, *, republish_after_s: float, now: datetime | None = None
) -> ReconcileReport:
    """One pass (SKUTAG_REPUBLISH_AFTER_S is republish_after_s); skipped while another reconciler runs."""
    now = now or ledger.utcnow()
    report = ReconcileReport()
    epoch = publisher.epoch()
    with translated_errors("reconciling"), database.begin() as conn:
        if not ledger.try_reconcile_lock(conn):
            report.skipped = True
            return report
        report.expired_leases = ledger.expire_leases(conn, now)
        stale_before = now - timedelta(seconds=republish_after_s)
        report.lost_messages = ledger.forget_lost_publications(conn, epoch, stale_before)
        report.published = _publish_unpublished(conn, publisher, epoch)
    return report


def _publish_unpublished(conn: Connection, publisher: JobPublisher, epoch: str | None) -> int:
    published, after = 0, 0
    while page := ledger.unpublished_jobs(conn, PAGE, after):
        publisher.publish(page, "new")
        ledger.mark_published(conn, [spec.job_id for spec in page], epoch)
        published += len(page)
        after = page[-1].job_id
    return published
