"""The one place that maps outcomes to the CLI's exit codes (README, "Exit codes")."""

from __future__ import annotations

from enum import IntEnum

from pipeline.errors import ConfigError, InputError, LockedError, ModelError, RetryableError, SkutagError
from schemas.states import RunState


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1  # a bug or an error skutag did not foresee (--debug shows the traceback)
    BAD_INPUT = 2  # bad usage, setting, input file, taxonomy or model
    UNAVAILABLE = 3  # a service (database, broker) is unreachable: try again later
    PARTIAL = 4  # a run ended with some jobs failed
    FAILED = 5  # a run ended with every job failed
    LOCKED = 6  # another process holds the lock this one needs


# Checked in order: the first class the error is an instance of decides.
_FOR_ERROR: tuple[tuple[type[SkutagError], ExitCode], ...] = (
    (LockedError, ExitCode.LOCKED),
    (ConfigError, ExitCode.BAD_INPUT),
    (InputError, ExitCode.BAD_INPUT),
    (ModelError, ExitCode.BAD_INPUT),
    (RetryableError, ExitCode.UNAVAILABLE),
)

_FOR_RUN_STATE: dict[str, ExitCode] = {
    RunState.DONE: ExitCode.OK,
    RunState.PARTIAL: ExitCode.PARTIAL,
    RunState.FAILED: ExitCode.FAILED,
    RunState.CANCELLED: ExitCode.FAILED,
}


def for_error(error: SkutagError) -> ExitCode:
    return next((code for kind, code in _FOR_ERROR if isinstance(error, kind)), ExitCode.UNEXPECTED)


def for_run_state(state: str) -> ExitCode:
    """A finished run's code; OK for a run still running (status --once) or in no known state."""
    return _FOR_RUN_STATE.get(state, ExitCode.OK)


def for_checks(worst_level: int) -> ExitCode:
    """`skutag doctor`: 0 every check ok, 1 the worst was a warning, 2 a check failed."""
    return (ExitCode.OK, ExitCode.UNEXPECTED, ExitCode.BAD_INPUT)[min(int(worst_level), 2)]
