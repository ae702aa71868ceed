"""Intake benchmark: images/s per core on realistic JPEGs (1000-2000 px, several aspect ratios,
studio and lifestyle shots), skutag's intake vs the article's snippet on the same bytes, one run.

Paths measured, each single-threaded (per core):
  article snippet     open, convert, thumbnail(384), paste on a 384 canvas (letterboxes)
  naive correct       full decode + ImageOps.fit (a correct center crop, no DCT scaling)
  skutag, CPU part    sha256 + DCT-scaled decode + orientation + crop: what the intake threads do;
                      the resize to 384 runs batched on the GPU (ImageBatcher)
  skutag, all on CPU  the same plus a Pillow bicubic resize to 384 (a CPU-only deployment)
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from rich.console import Console
from rich.table import Table

from pipeline.images import DecodePolicy, configure_pillow, decode

SIDE = 384
SHAPES = [
    (1600, 1200),
    (1200, 1600),
    (2000, 2000),
    (1000, 1500),
    (1920, 1080),
    (1000, 1000),
    (1400, 1867),
    (2000, 1333),
]


def synthetic_photo(width: int, height: int, seed: int, studio: bool) -> Image.Image:
    """Photo-like content: smooth lighting, multi-scale texture, hard edges; a studio shot puts the
    product on a near-white background, a lifestyle shot fills the frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 120 + 60, y / height * 110 + 70, (x + y) / (width + height) * 90 + 80], -1)
    for scale, amplitude in ((96, 22), (24, 14), (6, 9), (1, 6)):
        small = rng.normal(0, amplitude, (height // scale + 2, width // scale + 2, 3)).astype(np.float32)
        channels = [
            np.asarray(Image.fromarray(small[..., c]).resize((width, height), Image.Resampling.BILINEAR))
            for c in range(3)
        ]
        base += np.stack(channels, -1)
    photo = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    if studio:
        canvas = Image.new("RGB", (width, height), (246, 246, 244))
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).ellipse([width * 0.2, height * 0.1, width * 0.8, height * 0.9], fill=255)
        canvas.paste(photo, (0, 0), mask.filter(ImageFilter.GaussianBlur(6)))
        photo = canvas
    draw = ImageDraw.Draw(photo)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        color = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.rectangle(
            [x0, y0, x0 + int(rng.integers(30, 300)), y0 + int(rng.integers(10, 120))], outline=color, width=4
        )
    return photo


def corpus(count_per_shape: int = 2, shapes: list[tuple[int, int]] | None = None) -> list[bytes]:
    files = []
    for index, (width, height) in enumerate(shapes or SHAPES):
        for copy in range(count_per_shape):
            image = synthetic_photo(width, height, seed=index * 10 + copy, studio=copy % 2 == 0)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=88 + copy * 3, optimize=False)
            files.append(buffer.getvalue())
    return files


def article_snippet(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((SIDE, SIDE))
    canvas = Image.new("RGB", (SIDE, SIDE))
    canvas.paste(image, ((SIDE - image.width) // 2, (SIDE - image.height) // 2))
    return canvas


def naive_correct(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return ImageOps.fit(image, (SIDE, SIDE), Image.Resampling.BICUBIC)


POLICY = DecodePolicy(side=SIDE, fit="crop", formats=("JPEG", "PNG", "WEBP", "GIF"), max_pixels=60_000_000)


def skutag_cpu_part(data: bytes) -> np.ndarray:
    hashlib.sha256(data).hexdigest()
    return decode(data, POLICY)[0]


FAST_POLICY = DecodePolicy(
    side=SIDE, fit="crop", formats=POLICY.formats, max_pixels=POLICY.max_pixels, min_decode_ratio=0.75
)


def skutag_cpu_part_fast(data: bytes) -> np.ndarray:
    hashlib.sha256(data).hexdigest()
    return decode(data, FAST_POLICY)[0]


def skutag_all_cpu(data: bytes) -> Image.Image:
    square = skutag_cpu_part(data)
    return Image.fromarray(square).resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def _rate(path: Callable[[bytes], Any], files: list[bytes], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for data in files:
            path(data)
        samples.append(len(files) / (time.perf_counter() - started))
    return samples


def _threaded_rate(files: list[bytes], threads: int, repeats: int) -> list[float]:
    samples = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(skutag_cpu_part, files * 2))
            samples.append(2 * len(files) / (time.perf_counter() - started))
    return samples


def run(repeats: int = 5, threads: int = 2, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    configure_pillow(60_000_000)
    files = corpus()
    megabytes = sum(len(f) for f in files) / len(files) / 1e6
    console.print(f"{len(files)} JPEGs, {min(SHAPES)}..{max(SHAPES)} px, mean {megabytes:.2f} MB", style="dim")
    paths: dict[str, Callable[[bytes], Any]] = {
        "article snippet (baseline)": article_snippet,
        "naive correct: full decode + ImageOps.fit": naive_correct,
        "skutag, CPU part (resize on the GPU)": skutag_cpu_part,
        "skutag, CPU part, image_decode_min_ratio 0.75": skutag_cpu_part_fast,
        "skutag, all on CPU": skutag_all_cpu,
    }
    for path in paths.values():  # warm up decoders and caches
        path(files[0])
    rates = {name: _rate(path, files, repeats) for name, path in paths.items()}
    baseline = statistics.median(rates["article snippet (baseline)"])
    table = Table(title=f"intake: images/s per core, median of {repeats}")
    for column in ("path", "img/s", "range", "vs snippet"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, samples in rates.items():
        median = statistics.median(samples)
        table.add_row(name, f"{median:.1f}", f"{min(samples):.0f}-{max(samples):.0f}", f"{median / baseline:.2f}x")
    threaded = _threaded_rate(files, threads, repeats)
    table.add_row(f"skutag, CPU part, {threads} threads (all cores)", f"{statistics.median(threaded):.1f}",
                  f"{min(threaded):.0f}-{max(threaded):.0f}",
                  f"{statistics.median(threaded) / baseline:.2f}x")  # fmt: skip
    console.print(table)
    # The anchors' shape: at 1600x1200 the snippet's thumbnail() cannot use DCT scaling (1200 < 2 x 768).
    anchor_files = corpus(count_per_shape=4, shapes=[(1600, 1200)])
    anchor = {
        name: statistics.median(_rate(paths[name], anchor_files, repeats))
        for name in (
            "article snippet (baseline)",
            "skutag, CPU part (resize on the GPU)",
            "skutag, CPU part, image_decode_min_ratio 0.75",
            "skutag, all on CPU",
        )
    }
    anchor_base = anchor["article snippet (baseline)"]
    console.print(
        "1600x1200 only: "
        + ", ".join(f"{name} {rate:.1f} img/s ({rate / anchor_base:.2f}x)" for name, rate in anchor.items())
    )
    summary = {name: statistics.median(samples) for name, samples in rates.items()}
    summary |= {f"1600x1200: {name}": rate for name, rate in anchor.items()}
    summary[f"threads_{threads}"] = statistics.median(threaded)
    summary["ratio_cpu_part"] = summary["skutag, CPU part (resize on the GPU)"] / baseline
    summary["ratio_all_cpu"] = summary["skutag, all on CPU"] / baseline
    return summary
