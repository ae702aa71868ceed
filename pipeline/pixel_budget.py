"""How many bytes of full-size decoded pixels a process's intake threads may hold at once.

A PNG cannot be decoded at a fraction of its size (JPEG can, with draft), so a small file that
declares 7700x7700 pixels becomes a 237 MB array for a moment, before intake reduces it to the
engine's scale. Eight intake threads doing that together would need 1.9 GB. Each decode holds
its estimated bytes from this budget until its image is reduced and freed; a decode that would
overdraw waits for others to finish, and one image bigger than the whole budget decodes alone.
So peak intake memory is max(budget, the largest single image), whatever arrives.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from PIL import Image

# Bytes per pixel of Pillow's in-memory image (RGB is stored 4 bytes wide), and the modes that
# must be converted (one more full-size copy, at most 4 bytes a pixel) before they can be reduced.
PILLOW_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
CONVERTED_BEFORE_REDUCE = frozenset({"1", "P", "PA", "I;16", "I;16L", "I;16B", "I;16N"})


def decoded_bytes(image: Image.Image) -> int:
    """Upper bound of the memory decoding and reducing this (opened, not loaded) image takes."""
    width, height = image.size
    per_pixel = PILLOW_BYTES_PER_PIXEL.get(image.mode, 4)
    if image.mode in CONVERTED_BEFORE_REDUCE:
        per_pixel += 4
    return width * height * per_pixel


class PixelBudget:
    """A counting semaphore over bytes, shared by the intake threads of one process."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self.peak = 0  # the most held at once, for tests and benchmarks
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        amount = min(max(amount, 0), self.limit)  # an image over the whole budget waits to be alone
        with self._changed:
            self._changed.wait_for(lambda: self.held + amount <= self.limit)
            self.held += amount
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._changed:
                self.held -= amount
                self._changed.notify_all()
