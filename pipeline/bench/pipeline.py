"""Pipeline benchmark: images/s end to end through Redis + Celery + Postgres (a `skutag worker` and
a `skutag writer` process, `submit` in this one) vs the same engine called in a plain loop in one
process (intake pool + engine.tag, nothing stored), on the same images, tiny model on the CPU.

orchestration ms/image = (end-to-end wall time - plain loop wall time) / images: everything the
queue, the ledger and the writer add, including their share of this machine's two cores.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from PIL import Image, ImageDraw
from rich.console import Console

from pipeline import ledger
from pipeline.bench.common import scratch_postgres
from pipeline.catalog import read_catalog
from pipeline.db import make_engine
from pipeline.images import ImageIntake
from pipeline.inference import TaggingEngine, load_model
from pipeline.producer import submit_catalog
from pipeline.settings import Settings, load_settings
from schemas.states import RunState
from schemas.taxonomy import default_taxonomy


def _images(directory: Path, count: int, prefix: str = "B") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["sku,image_uri"]
    for index in range(count):
        name = f"{prefix}{index}.jpg"
        color = ((index * 53) % 256, (index * 29) % 256, (index * 7 + len(prefix)) % 256)
        image = Image.new("RGB", (800, 600), color)
        # Every image distinct (the result cache would otherwise serve repeats in the end-to-end run).
        ImageDraw.Draw(image).text((10, 10), f"{prefix}{index}", fill=(255 - color[0], 255 - color[1], 255 - color[2]))
        image.save(directory / name, quality=88)
        lines.append(f"{prefix}-{index:06d},{name}")
    catalog = directory / f"{prefix}-catalog.csv"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def service_pids() -> dict[str, list[int]]:
    """The local Postgres and Redis server processes, for their share of the CPU."""
    found: dict[str, list[int]] = {"postgres": [], "redis": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if name.startswith(("postgres", "postmaster")):
            found["postgres"].append(int(entry.name))
        elif name.startswith("redis-server"):
            found["redis"].append(int(entry.name))
    return found


def plain_loop(settings: Settings, uris: list[str]) -> float:
    """Seconds for intake + engine over every image, batch by batch, nothing stored."""
    engine = TaggingEngine(load_model(settings), default_taxonomy(), settings)
    intake = ImageIntake(settings)
    size = settings.batch_size
    with ThreadPoolExecutor(settings.intake_threads) as pool:
        engine.tag([o for o in intake.prepare_many(uris[:size], pool) if hasattr(o, "pixels")])  # type: ignore[misc]
        started = time.perf_counter()
        for start in range(0, len(uris), size):
            prepared = [o for o in intake.prepare_many(uris[start : start + size], pool) if hasattr(o, "pixels")]
            engine.tag(prepared)  # type: ignore[arg-type]
        return time.perf_counter() - started


def overlapped_loop(settings: Settings, uris: list[str]) -> float:
    """The plain loop with intake of the next batch overlapping the engine on this one: the fair
    baseline for what the queue, ledger and writer cost (the worker overlaps the same way)."""
    engine = TaggingEngine(load_model(settings), default_taxonomy(), settings)
    intake = ImageIntake(settings)
    size = settings.batch_size
    batches = [uris[start : start + size] for start in range(0, len(uris), size)]
    with ThreadPoolExecutor(settings.intake_threads) as pool, ThreadPoolExecutor(1) as prefetch:
        engine.tag([o for o in intake.prepare_many(uris[:size], pool) if hasattr(o, "pixels")])  # type: ignore[misc]
        started = time.perf_counter()
        upcoming = prefetch.submit(intake.prepare_many, batches[0], pool)
        for index in range(len(batches)):
            prepared = upcoming.result()
            if index + 1 < len(batches):
                upcoming = prefetch.submit(intake.prepare_many, batches[index + 1], pool)
            engine.tag([o for o in prepared if hasattr(o, "pixels")])  # type: ignore[misc]
        return time.perf_counter() - started


def end_to_end(
    settings: Settings, env: dict[str, str], catalog: Path, warm_up: Path, logs: Path, cpu: dict[str, float]
) -> float:
    """Seconds from submit to the run's last result, with a GPU worker and a writer running (after
    a warm-up run, as the plain loop gets one untimed batch). Adds each process's CPU seconds to cpu."""
    database = make_engine(settings.database_url)
    processes = [
        subprocess.Popen([sys.executable, "-m", "pipeline", role], env=env, stdout=(logs / f"{role}.log").open("ab"),
                         stderr=subprocess.STDOUT)
        for role in ("worker", "writer")
    ]  # fmt: skip
    try:
        _submit_and_wait(settings, database, warm_up)
        groups = {"worker": [processes[0].pid], "writer": [processes[1].pid], **service_pids()}
        before = {name: cpu_seconds(pids) for name, pids in groups.items()}
        before["submit"] = time.process_time()
        seconds = _submit_and_wait(settings, database, catalog)
        for name, pids in groups.items():
            cpu[name] = cpu.get(name, 0.0) + cpu_seconds(pids) - before[name]
        cpu["submit"] = cpu.get("submit", 0.0) + time.process_time() - before["submit"]
        return seconds
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
        database.dispose()


def _submit_and_wait(settings: Settings, database: sa.Engine, catalog: Path) -> float:
    from workers.app import CeleryPublisher, create_app

    publisher = CeleryPublisher(create_app(settings), settings)
    started = time.perf_counter()
    with catalog.open() as handle:
        report = submit_catalog(read_catalog(handle, catalog.name), database, settings, default_taxonomy(), publisher)
    while True:
        with database.connect() as conn:
            state = ledger.state_of_run(conn, report.run_id)
        if state != RunState.RUNNING:
            return time.perf_counter() - started
        time.sleep(0.02)


def run(
    server_url: str,
    broker_url: str,
    images: int = 512,
    repeats: int = 3,
    batch_size: int = 32,
    summary_tokens: int = 8,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="skutag-bench-pipeline-"))
    from pipeline.tiny import build_tiny_model

    model = build_tiny_model(work / "tiny-model")
    catalog = _images(work / "images", images)
    warm_up = _images(work / "images", batch_size * 2, prefix="W")
    uris = [line.split(",")[1] for line in catalog.read_text().splitlines()[1:]]
    plain, overlapped, e2e = [], [], []
    cpu: dict[str, float] = {}
    plain_cpu = 0.0
    for repeat in range(repeats):
        with scratch_postgres(server_url) as database_url:
            env = {**os.environ, "SKUTAG_DATABASE_URL": database_url, "SKUTAG_BROKER_URL": broker_url,
                   "SKUTAG_MODEL": str(model), "SKUTAG_QUANTIZATION": "fp32", "SKUTAG_DEVICE": "cpu",
                   "SKUTAG_SUMMARY_MAX_TOKENS": str(summary_tokens), "SKUTAG_BATCH_SIZE": str(batch_size),
                   "SKUTAG_IMAGE_ROOTS": f'["{work / "images"}"]', "SKUTAG_INTAKE_THREADS": "2"}  # fmt: skip
            settings = load_settings(
                database_url=database_url, broker_url=broker_url, model=str(model), quantization="fp32", device="cpu",
                summary_max_tokens=summary_tokens, batch_size=batch_size, image_roots=[work / "images"],
                intake_threads=2,
            )  # fmt: skip
            redis.Redis.from_url(broker_url).flushdb()
            cpu_before = time.process_time()
            plain.append(plain_loop(settings, uris))
            plain_cpu += time.process_time() - cpu_before
            overlapped.append(overlapped_loop(settings, uris))
            e2e.append(end_to_end(settings, env, catalog, warm_up, work, cpu))
        console.print(
            f"repeat {repeat + 1}: plain {images / plain[-1]:.1f} img/s, overlapped {images / overlapped[-1]:.1f}, "
            f"end to end {images / e2e[-1]:.1f}"
        )
    plain_rate, e2e_rate = images / statistics.median(plain), images / statistics.median(e2e)
    overlapped_rate = images / statistics.median(overlapped)
    overhead_ms = (statistics.median(e2e) - statistics.median(overlapped)) / images * 1000
    console.print(
        f"plain loop {plain_rate:.1f} img/s; overlapped loop {overlapped_rate:.1f}; end to end {e2e_rate:.1f} "
        f"({e2e_rate / plain_rate:.2f}x the plain loop, {e2e_rate / overlapped_rate:.2f}x the overlapped one); "
        f"wall-clock difference {overhead_ms:.2f} ms/image at batch {batch_size}"
    )
    per_image = {name: seconds / (images * repeats) * 1000 for name, seconds in cpu.items()}
    plain_per_image = plain_cpu / (images * repeats) * 1000
    orchestration_cpu = sum(per_image.values()) - plain_per_image
    console.print(
        "CPU ms per image: plain loop "
        + f"{plain_per_image:.2f}; end to end "
        + ", ".join(f"{name} {value:.2f}" for name, value in per_image.items())
        + f"; orchestration (end to end minus plain) {orchestration_cpu:.2f} ms/image"
    )
    return {"images": images, "batch_size": batch_size, "plain_img_per_s": plain_rate,
            "overlapped_img_per_s": overlapped_rate, "e2e_img_per_s": e2e_rate, "ratio_vs_plain": e2e_rate / plain_rate,
            "ratio_vs_overlapped": e2e_rate / overlapped_rate, "orchestration_ms_per_image": overhead_ms,
            "plain_s": plain, "overlapped_s": overlapped, "e2e_s": e2e, "cpu_ms_per_image": per_image,
            "plain_cpu_ms_per_image": plain_per_image, "orchestration_cpu_ms_per_image": orchestration_cpu}  # fmt: skip
