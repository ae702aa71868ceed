"""Memory bounded by design: every prepared image is under twice the engine's side whatever its
source size or fit, `pad` never builds more than that canvas, full-size decodes share one pixel
budget, and 16-bit samples keep their real brightness."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import DecodePolicy, ImageIntake, decode
from pipeline.pixel_budget import PixelBudget
from pipeline.settings import load_settings
from schemas.images import PreparedImage

SIDE = 384


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def policy(fit: str, budget: PixelBudget | None = None) -> DecodePolicy:
    return DecodePolicy(
        side=SIDE, fit=fit, formats=("JPEG", "PNG", "WEBP", "GIF"), max_pixels=60_000_000, budget=budget
    )


@pytest.mark.parametrize("fit", ["crop", "pad"])
@pytest.mark.parametrize(
    ("size", "mode"),
    [((1, 50_000), "RGB"), ((50_000, 1), "L"), ((7000, 300), "P"), ((300, 7000), "RGBA"), ((3000, 3000), "1"),
     ((2000, 1999), "I;16"), ((800, 800), "LA"), ((383, 5000), "RGB"), ((385, 385), "RGB"), ((20, 30), "RGB")],
)  # fmt: skip
def test_every_prepared_image_is_under_twice_the_engine_side(fit: str, size: tuple[int, int], mode: str) -> None:
    source = Image.new("RGB", size, (90, 120, 200)).convert(mode) if mode != "I;16" else Image.new("I;16", size, 30000)
    pixels, _, source_size = decode(png(source), policy(fit))
    side = pixels.shape[0]
    assert pixels.shape == (side, side, 3) and pixels.dtype == np.uint8
    assert source_size == size
    assert side < 2 * SIDE
    assert side >= min(SIDE, max(size) if fit == "pad" else min(size))  # never below what the engine needs


def test_a_277_byte_strip_in_pad_mode_stays_small() -> None:
    data = png(Image.new("L", (1, 50_000), 0))
    assert len(data) < 1000
    started = time.monotonic()
    pixels, _, _ = decode(data, policy("pad"))
    assert pixels.shape[0] < 2 * SIDE and pixels.nbytes < 2 * 2**20
    assert time.monotonic() - started < 2


def test_concurrent_decodes_stay_within_the_pixel_budget() -> None:
    budget = PixelBudget(40 * 2**20)
    data = png(Image.new("RGB", (2500, 2500), (10, 200, 30)))  # 25 MB decoded each (4 bytes a pixel)
    results: list[int] = []

    def one() -> None:
        results.append(decode(data, policy("crop", budget))[0].shape[0])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and budget.held == 0
    assert 0 < budget.peak <= budget.limit  # at most one 25 MB decode at a time fits in 40 MB


def test_an_image_bigger_than_the_budget_decodes_alone() -> None:
    budget = PixelBudget(16 * 2**20)
    pixels, _, _ = decode(png(Image.new("RGB", (3000, 3000), (1, 2, 3))), policy("crop", budget))
    assert pixels.shape[0] < 2 * SIDE and budget.peak == budget.limit and budget.held == 0


PEAK_SCRIPT = """
import json, resource, sys, threading
from pathlib import Path
from pipeline.images import ImageIntake
from pipeline.settings import load_settings
root = Path(sys.argv[1])
intake = ImageIntake(load_settings(image_roots=[root], decode_budget_mb=int(sys.argv[2])))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
threads = [threading.Thread(target=intake.prepare, args=(str(root / f"{i}.png"),)) for i in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mb": (after - before) / 1024}))
"""


def test_eight_large_pngs_at_once_stay_within_the_budget_in_real_memory(tmp_path: Path) -> None:
    # The case: small files declaring 16M pixels each, eight intake threads. Unbounded,
    # that is 8 x 64 MB of full-size arrays at once; with a 64 MB budget, one at a time.
    data = png(Image.new("RGB", (4000, 4000), (200, 20, 20)))
    for index in range(8):
        (tmp_path / f"{index}.png").write_bytes(data + index.to_bytes(4, "big"))  # distinct files
    output = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), "64"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    grew = json.loads(output)["grew_mb"]
    assert grew < 64 + 64 + 60, f"peak RSS grew {grew:.0f} MB decoding 8 x 4000x4000 PNGs with a 64 MB budget"


def test_a_dark_16_bit_png_keeps_its_real_brightness(tmp_path: Path) -> None:
    dark = Image.fromarray(np.full((64, 64), 200, dtype=np.uint16))  # 200 / 65535: nearly black
    assert dark.mode.startswith("I;16")
    (tmp_path / "dark.png").write_bytes(png(dark))
    bright = Image.fromarray(np.full((64, 64), 60000, dtype=np.uint16))
    (tmp_path / "bright.png").write_bytes(png(bright))
    intake = ImageIntake(load_settings(image_roots=[tmp_path]))
    dark_outcome, bright_outcome = intake.prepare("dark.png"), intake.prepare("bright.png")
    assert isinstance(dark_outcome, PreparedImage) and isinstance(bright_outcome, PreparedImage)
    assert dark_outcome.pixels.mean() < 2
    assert abs(bright_outcome.pixels.mean() - 60000 / 257) < 2
    big_dark = Image.fromarray(np.full((1600, 1600), 300, dtype=np.uint16))  # reduced as well: still dark
    (tmp_path / "big.png").write_bytes(png(big_dark))
    big = intake.prepare("big.png")
    assert isinstance(big, PreparedImage) and big.pixels.mean() < 2 and big.pixels.shape[0] < 2 * SIDE
