"""Patience for retryable failures: try again with exponential back-off until a deadline.

A worker that claimed jobs holds them for one lease; a database outage shorter than that should
cost a pause, not the jobs. So the worker and the writer retry database work until the lease
ends (never a fixed count of tries, which an outage of any length outlasts), then give the work
back to the broker, whose next delivery starts a new lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.errors import RetryableError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays between tries: first_s, doubling, never above max_s."""

    first_s: float = 0.2
    max_s: float = 5.0

    def next(self, delay: float) -> float:
        return min(delay * 2, self.max_s)


DEFAULT_BACKOFF = Backoff()


def retry_until(
    deadline: float,
    action: Callable[[], T],
    what: str,
    backoff: Backoff = DEFAULT_BACKOFF,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call action until it returns, retrying RetryableError until deadline (a clock() value).
    The last error is raised once the deadline has passed; action runs at least once."""
    delay = backoff.first_s
    tries = 0
    while True:
        tries += 1
        try:
            return action()
        except RetryableError as exc:
            remaining = deadline - clock()
            if remaining <= 0:
                log.warning("%s: gave up after %d tries: %s", what, tries, exc.message)
                raise
            if tries == 1:  # one line per outage, not one per try
                log.warning("%s: %s; retrying for up to %.0f s", what, exc.message, remaining)
            sleep(min(delay, remaining))
            delay = backoff.next(delay)
