"""Product images for the review app, through the intake's own safe path.

The app never fetches a URL a browser names: it looks up the image of a sku with current tags in
the database, then fetches it with the same ImageIntake the workers use (image roots, SSRF rules,
size, pixel and format caps, timeouts), padded to a square so the reviewer sees the whole product.
The JPEG thumbnail is cached on disk by (uri, image sha256, side); a failure is a short text with
the intake's error code, never the upstream's bytes.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image

from pipeline.images import ImageIntake
from pipeline.settings import Settings
from schemas.images import IntakeFailure

THUMBNAIL_SIDE = 512


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes | None
    sha256: str | None  # of the source bytes fetched now; differs from the tags' when the image changed
    error_code: str | None = None
    error: str | None = None


class Thumbnails:
    def __init__(self, settings: Settings, cache_dir: Path, side: int = THUMBNAIL_SIDE) -> None:
        display = settings.model_copy(update={"image_size": side, "image_fit": "pad", "image_decode_min_ratio": 1.0})
        self.intake = ImageIntake(display)
        self.cache_dir = cache_dir
        self.side = side
        self._lock = threading.Lock()

    def close(self) -> None:
        self.intake.close()

    def get(self, image_uri: str, expected_sha256: str | None) -> Thumbnail:
        cached = self._path(image_uri, expected_sha256)
        if expected_sha256 and cached.is_file():
            return Thumbnail(cached.read_bytes(), expected_sha256)
        outcome = self.intake.prepare(image_uri)
        if isinstance(outcome, IntakeFailure):
            return Thumbnail(None, outcome.sha256, outcome.error.code.value, outcome.error.message)
        buffer = BytesIO()
        Image.fromarray(outcome.pixels).save(buffer, format="JPEG", quality=85)
        jpeg = buffer.getvalue()
        if outcome.sha256 == expected_sha256:
            self._store(self._path(image_uri, outcome.sha256), jpeg)
        return Thumbnail(jpeg, outcome.sha256)

    def _path(self, image_uri: str, sha256: str | None) -> Path:
        key = hashlib.sha256(f"{image_uri}\0{sha256}\0{self.side}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.jpg"

    def _store(self, path: Path, jpeg: bytes) -> None:
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part")
            partial.write_bytes(jpeg)
            partial.replace(path)
