"""Memory benchmark: peak RSS of `skutag run` on large images against the same run on small ones.

Both catalogs hold the same number of distinct PNGs; the large ones are small files that declare
many pixels (a flat colour compresses to almost nothing), the case that used to hold a full-size
array per image until its batch ran. Each run is a fresh `skutag run` process (tiny model, CPU,
SQLite); its peak RSS is the kernel's maximum resident set of that child. Goal: flat (large about
equal to small) and under 1 GB.
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class MemoryRun:
    name: str
    images: int
    side: int
    peak_rss_mb: float
    seconds: float
    exit_code: int


def write_catalog(directory: Path, count: int, side: int) -> Path:
    """count distinct side x side PNGs: one encoded image, each copy with its own trailing bytes
    (Pillow ignores data after IEND; the sha256 differs, so no result is reused from the cache)."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (180, 90, 40)).save(buffer, "PNG")
    encoded = buffer.getvalue()
    lines = ["sku,image_uri"]
    for index in range(count):
        name = f"{side}-{index}.png"
        (directory / name).write_bytes(encoded + index.to_bytes(4, "big"))
        lines.append(f"MEM-{side}-{index:05d},{name}")
    catalog = directory / "catalog.csv"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog


PEAK_OF_CHILD = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)


def measure(name: str, catalog: Path, model: Path, work: Path, images: int, side: int) -> MemoryRun:
    """Run `skutag run` in a child of a fresh wrapper process, so ru_maxrss is that run's alone."""
    env = {**os.environ, "SKUTAG_WORK_DIR": str(work / "state"), "SKUTAG_SUMMARY_MAX_TOKENS": "4"}
    command = [
        sys.executable, "-c", PEAK_OF_CHILD, sys.executable, "-m", "pipeline",
        "--database-url", f"sqlite:///{work}/{name}.db", "run", str(catalog),
        "--model", str(model), "--quantization", "fp32",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    last = result.stdout.strip().splitlines()[-1].split()
    peak_kb, code = int(last[0]), int(last[1])
    return MemoryRun(name, images, side, peak_kb / 1024, seconds, code)


def run(images: int, large_side: int, small_side: int, console: Console | None = None) -> list[MemoryRun]:
    from pipeline.tiny import build_tiny_model

    console = console or Console(stderr=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with tempfile.TemporaryDirectory(prefix="skutag-bench-memory-") as scratch:
        work = Path(scratch)
        model = build_tiny_model(work / "tiny-model")
        runs = []
        for name, side in (("small (baseline)", small_side), ("large", large_side)):
            catalog = write_catalog(work / f"images-{side}", images, side)
            console.print(f"{name}: {images} PNGs of {side}x{side} ...")
            runs.append(measure(name.split()[0], catalog, model, work, images, side))
    table = Table(title=f"peak RSS of `skutag run`, {images} images each")
    for column in ("images", "decoded size each", "peak RSS", "vs baseline", "wall time", "exit"):
        table.add_column(column, justify="right")
    baseline = runs[0].peak_rss_mb
    for item in runs:
        decoded = item.side * item.side * 4 / 2**20
        table.add_row(
            f"{item.images} x {item.side}x{item.side}", f"{decoded:,.0f} MB", f"{item.peak_rss_mb:,.0f} MB",
            f"{item.peak_rss_mb / baseline:.2f}x", f"{item.seconds:,.0f} s", str(item.exit_code),
        )  # fmt: skip
    console.print(table)
    return runs
