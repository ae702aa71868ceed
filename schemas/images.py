"""What intake hands the engine: a decoded, oriented, RGB square ready for the device resize, or
the reason it could not be made (an ItemError, never an exception)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas.results import ItemError


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """The original bytes and what the source said about them (for conditional re-fetches)."""

    image_uri: str
    data: bytes
    sha256: str
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False  # a 304 answer to a conditional request: data is empty
    fetch_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An RGB square (side >= 1) cut from the source with the configured fit; the engine resizes it
    to the model's input size on the device, in one batch."""

    image_uri: str
    sha256: str
    pixels: npt.NDArray[np.uint8]  # (side, side, 3), C-contiguous
    source_format: str
    source_size: tuple[int, int]
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True, slots=True)
class IntakeFailure:
    image_uri: str
    error: ItemError
    sha256: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


IntakeOutcome = PreparedImage | IntakeFailure
