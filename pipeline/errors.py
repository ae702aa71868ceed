"""The error tree: every failure a user or operator can see, and whether trying again can help.

    SkutagError                  one-line message, a stable code (the CLI's exit codes: pipeline.commands.exits)
    ├── RetryableError           the same call may succeed later: DB/broker unreachable,
    │                            deadlock, serialization failure, GPU out of memory
    └── FinalError               trying again will fail the same way
        ├── ConfigError          a bad setting, an unreadable or invalid taxonomy file
        ├── InputError           a bad catalog row, a result outside the taxonomy
        ├── ModelError           weights missing, a model that cannot load
        └── LockedError          another process holds the lock this one needs

A bad image is not an exception at all: intake returns it as data (schemas.results.ItemError), so
one bad SKU never fails its batch. Third-party exceptions are translated into this tree at one
boundary per dependency (pipeline.db for SQLAlchemy/psycopg2, pipeline.inference for torch and
transformers, workers.app for Celery/Redis); nothing else catches them.
"""

from __future__ import annotations


class SkutagError(Exception):
    """Base of every error skutag raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RetryableError(SkutagError):
    code = "unavailable"


class FinalError(SkutagError):
    code = "failed"


class ConfigError(FinalError):
    code = "config"


class InputError(FinalError):
    code = "bad_input"


class ModelError(FinalError):
    code = "model"


class LockedError(FinalError):
    code = "locked"


class InferenceError(RetryableError):
    """The engine failed on a batch for a reason other than memory (a CUDA error, a driver reset)."""

    code = "inference_failed"


class GpuOutOfMemoryError(InferenceError):
    """Raised by the engine so the caller can split the batch and try the halves."""

    code = "gpu_oom"
