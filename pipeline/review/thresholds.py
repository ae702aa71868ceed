"""The thresholds in force: the configured ones, with those stored by `skutag eval
--recommend-thresholds --write` filling in every attribute the configuration does not name."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.db import review_thresholds, translated_errors
from pipeline.routing import Thresholds

STORED_THRESHOLDS_TTL_S = 60.0  # running writers follow a new --write within a minute, no restart


class ThresholdsInForce:
    def __init__(self, engine: Engine, configured: Thresholds, ttl_s: float = STORED_THRESHOLDS_TTL_S) -> None:
        self.engine = engine
        self.configured = configured
        self.ttl_s = ttl_s
        self._cached: tuple[float, Thresholds] | None = None

    def get(self) -> Thresholds:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self.ttl_s:
            with translated_errors("reading stored thresholds"), self.engine.connect() as conn:
                stored = {row.attribute: row.threshold for row in conn.execute(sa.select(review_thresholds))}
            merged = Thresholds(self.configured.default, {**stored, **self.configured.per_attribute})
            self._cached = (now, merged)
        return self._cached[1]
