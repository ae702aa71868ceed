"""`skutag doctor`: is this machine ready to run skutag? One check per thing that can be wrong,
each a line (ok / warn / fail, and what to do), the exit code by the worst.

Checks run in order and never raise: a check that cannot run is itself a failure with a reason.
Settings come first; when they are invalid, nothing else can be checked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.settings import Settings, load_settings

GIB = 1024**3
LOW_DISK_FAIL = 1 * GIB
LOW_DISK_WARN = 20 * GIB  # an 8B checkpoint is about 17 GB


class Level(IntEnum):
    """Ordered by badness: the exit code is the worst level's value."""

    OK = 0
    WARN = 1
    FAIL = 2


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def line(self) -> str:
        return f"{self.level.name.lower():4}  {self.name:10}  {self.detail}"


def worst(checks: list[Check]) -> Level:
    return max((check.level for check in checks), default=Level.OK)


def run_checks(overrides: dict[str, Any] | None = None) -> Iterator[Check]:
    try:
        settings = load_settings(**(overrides or {}))
    except ConfigError as exc:
        yield Check("settings", Level.FAIL, exc.message)
        return
    yield Check("settings", Level.OK, "valid (SKUTAG_* variables, .env, defaults)")
    for check in (check_database, check_broker, check_model, check_gpu, check_image_roots, check_disk):
        yield _guarded(check, settings)


def _guarded(check: Callable[[Settings], Check], settings: Settings) -> Check:
    try:
        return check(settings)
    except Exception as exc:  # a doctor reports; it never crashes on what it examines
        name = check.__name__.removeprefix("check_").replace("_", " ")
        return Check(name, Level.FAIL, f"could not check: {type(exc).__name__}: {exc}")


def check_database(settings: Settings) -> Check:
    from pipeline.db import redacted
    from pipeline.errors import SkutagError
    from pipeline.migrate import current_revision, head_revision

    where = redacted(settings.database_url)
    sqlite_file = settings.database_url.removeprefix("sqlite:///")
    if settings.database_url.startswith("sqlite:///") and not Path(sqlite_file).exists():
        # Opening it would create an empty file; say so instead (local mode creates it on first run).
        return Check("database", Level.FAIL, f"{where}: no such file: run `skutag db upgrade`")
    try:
        current = current_revision(settings.database_url)
        head = head_revision(settings.database_url)
    except SkutagError as exc:
        return Check("database", Level.FAIL, f"{where}: {exc.message}")
    if current is None:
        return Check("database", Level.FAIL, f"{where}: reachable, no skutag schema: run `skutag db upgrade`")
    if current != head:
        return Check(
            "database", Level.FAIL, f"{where}: at {current}, this skutag needs {head}: run `skutag db upgrade`"
        )
    return Check("database", Level.OK, f"{where}: reachable, schema at {head} (current)")


def check_broker(settings: Settings) -> Check:
    from kombu import Connection

    from pipeline.db import redacted

    where = redacted(settings.broker_url)
    try:
        with Connection(settings.broker_url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            transport = connection.transport.driver_name
    except Exception as exc:  # kombu, redis, amqp and socket errors alike: unreachable
        return Check("broker", Level.FAIL, f"{where}: unreachable ({type(exc).__name__}: {exc})")
    return Check("broker", Level.OK, f"{where}: reachable ({transport})")


def check_model(settings: Settings) -> Check:
    """The files are here (a directory, or the hub cache) and their config is one transformers reads."""
    from transformers import AutoConfig

    directory = Path(settings.model).expanduser()
    if not directory.exists() and settings.model.startswith(("/", ".", "~")):
        return Check("model", Level.FAIL, f"{settings.model}: no such directory (SKUTAG_MODEL)")
    if directory.exists():
        if not (directory / "config.json").is_file():
            return Check("model", Level.FAIL, f"{directory}: no config.json (not a model directory)")
        weights = sorted(p.name for p in directory.glob("*.safetensors"))
        if not weights:
            return Check("model", Level.FAIL, f"{directory}: no *.safetensors weights")
        source = str(directory)
    else:
        cached = _hub_cache_dir(settings.model, settings.model_revision)
        if cached is None:
            folder = settings.model.rsplit("/", maxsplit=1)[-1]
            return Check(
                "model", Level.WARN,
                f"{settings.model} is not in the local hub cache: the worker will download it (about 17 GB), "
                f"or fetch it first: `hf download {settings.model} --local-dir ./models/{folder}`",
            )  # fmt: skip
        source, weights = str(cached), sorted(p.name for p in cached.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(source, revision=settings.model_revision, local_files_only=True)
    return Check(
        "model", Level.OK,
        f"{source}: {config.model_type} config loads, {len(weights)} weight file(s), {settings.quantization}",
    )  # fmt: skip


def _hub_cache_dir(model: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def check_gpu(settings: Settings) -> Check:
    import torch

    needs_bnb = settings.quantization in {"int8", "nf4"}
    if settings.device == "cpu":
        return Check("gpu", Level.OK, "not used (SKUTAG_DEVICE=cpu)")
    if not torch.cuda.is_available():
        level = Level.FAIL if settings.device.startswith("cuda") else Level.WARN
        also = f", and {settings.quantization} needs bitsandbytes' CUDA kernels" if needs_bnb else ""
        built = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
        return Check("gpu", level, f"no CUDA GPU visible ({built}): a worker would run on the CPU{also}")
    index = torch.device("cuda" if settings.device == "auto" else settings.device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    detail = f"cuda:{index} {torch.cuda.get_device_name(index)}, {free / GIB:.0f} of {total / GIB:.0f} GiB free"
    if not needs_bnb:
        return Check("gpu", Level.OK, detail)
    problem = _bitsandbytes_cuda_kernels(index)
    if problem is not None:
        return Check("gpu", Level.FAIL, f"{detail}; bitsandbytes CUDA kernels unusable: {problem}")
    return Check("gpu", Level.OK, f"{detail}; bitsandbytes CUDA kernels work ({settings.quantization})")


def _bitsandbytes_cuda_kernels(index: int) -> str | None:
    """None when an int8 quantize round trip runs on the GPU, else why not."""
    import torch

    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
        from bitsandbytes.cextension import lib
    except Exception as exc:  # an import-time CUDA setup error is the finding itself
        return f"import failed: {exc}"
    if not getattr(lib, "compiled_with_cuda", False):
        return f"bitsandbytes {bitsandbytes.__version__} loaded no CUDA library"
    try:
        sample = torch.randn(64, 64, device=f"cuda:{index}", dtype=torch.float16)
        quantized, scales, _ = bnb_functional.int8_vectorwise_quant(sample)
        restored = bnb_functional.int8_vectorwise_dequant(quantized, scales)
        error = float((restored.float() - sample.float()).abs().max())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if error < 0.1 else f"int8 round trip off by {error:.3f}"


def check_image_roots(settings: Settings) -> Check:
    problems = []
    for root in settings.image_roots:
        path = root.expanduser().resolve()
        if not path.is_dir():
            problems.append(f"{root}: not a directory")
        elif not os.access(path, os.R_OK | os.X_OK):
            problems.append(f"{root}: not readable by this user")
    if problems:
        return Check("images", Level.FAIL, "; ".join(problems) + " (SKUTAG_IMAGE_ROOTS)")
    return Check("images", Level.OK, "readable: " + ", ".join(str(root) for root in settings.image_roots))


def check_disk(settings: Settings) -> Check:
    from huggingface_hub import constants

    places = {"work dir": settings.work_dir, "hub cache": Path(constants.HF_HUB_CACHE)}
    if Path(settings.model).exists():
        places["model"] = Path(settings.model)
    lowest = min(((name, _free_bytes(path)) for name, path in places.items()), key=lambda item: item[1])
    summary = ", ".join(f"{name} {_free_bytes(path) / GIB:.0f} GiB" for name, path in places.items())
    name, free = lowest
    if free < LOW_DISK_FAIL:
        return Check("disk", Level.FAIL, f"{name} has {free / GIB:.1f} GiB free ({summary})")
    if free < LOW_DISK_WARN:
        return Check("disk", Level.WARN, f"{name} has {free / GIB:.0f} GiB free, under 20 GiB ({summary})")
    return Check("disk", Level.OK, f"free: {summary}")


def _free_bytes(path: Path) -> int:
    existing = path.expanduser().absolute()
    while not existing.exists():  # a work dir not yet created: its nearest existing parent
        existing = existing.parent
    return shutil.disk_usage(existing).free
