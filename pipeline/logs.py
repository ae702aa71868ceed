"""Log output for the long-running processes (worker, writer, backfill): plain text for a person,
or with SKUTAG_LOG_FORMAT=json one JSON object per line for a log shipper. Either way each line
names its process (service) and logger, and carries run_id, job_id and sku where they are known:
passed as `extra=` on the call, or set for a stretch of work with log_context().
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from pipeline.secrets import SecretMaskingFilter

LogFormat = Literal["text", "json"]
CONTEXT_FIELDS = ("run_id", "job_id", "sku")

_context: ContextVar[dict[str, Any]] = ContextVar("skutag_log_context", default={})  # noqa: B039 (never mutated)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (run_id, job_id, sku) to every record logged in this thread/task meanwhile."""
    token = _context.set(_context.get() | {name: value for name, value in fields.items() if value is not None})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        for name, value in _context.get().items():
            if getattr(record, name, None) is None:  # an explicit extra= wins
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": getattr(record, "service", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(service)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if getattr(record, name, None) is not None
        )
        return f"{line} [{context}]" if context else line


def configure_logging(service: str, log_format: LogFormat, level: int = logging.INFO) -> None:
    """One stderr handler on the root logger (Celery keeps it: worker_hijack_root_logger is off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(service))
    handler.addFilter(SecretMaskingFilter())  # no URL password in any line, libraries' included
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Alembic announces its context ("Context impl ...") on every schema check: noise in a command's
    # output, and `db upgrade` prints its own result line.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)  # e.g. Celery's warning about running as root, as a log line
