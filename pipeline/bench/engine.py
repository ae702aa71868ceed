"""CPU engine benchmark on the tiny models: forward passes per image and images/s, for both
tokenizers (the tiny one, every label one token; Qwen's real one, labels of several tokens sharing
prefixes), English and Chinese, summary on and off. Its figures track the decoding's cost in
passes, which is what carries over to a GPU; the CPU's images/s only compare runs on one machine.

The baseline in the same run is the plain decode: one forward pass per answer token, what
free-form generation would spend on the same answer. Each configuration runs in every decode mode
asked for (SKUTAG_DECODE_MODE), taking turns, with images/s the median of the repeats and the
ratio to eager from the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference import TaggingEngine
from pipeline.model_loading import load_model
from pipeline.settings import load_settings
from pipeline.tiny import TOKENIZER_KINDS, build_tiny_model
from schemas.images import PreparedImage
from schemas.taxonomy import default_taxonomy


def _images(count: int, seed: int) -> list[PreparedImage]:
    rng = np.random.default_rng(seed)
    return [
        PreparedImage(f"mem://{i}", str(i), rng.integers(0, 256, (384, 384, 3), dtype=np.uint8), "PNG", (384, 384))
        for i in range(count)
    ]


def model_dir(work_dir: Path, kind: str) -> Path:
    directory = work_dir / f"tiny-{kind}"
    if not (directory / "config.json").exists():
        build_tiny_model(directory, tokenizer_kind="qwen" if kind == "qwen" else "tiny")
    return directory


def measure(
    directory: Path, language: str, summary_tokens: int, images: int, batch: int,
    decode_modes: tuple[str, ...] = ("eager",), repeats: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per decode mode. The modes share the loaded model and take turns in every repeat
    (eager, static, eager, static ...), so a busy machine slows them alike; images/s is the median."""
    settings = load_settings(
        model=str(directory), quantization="fp32", device="cpu", prompt_language=language,
        summary_max_tokens=summary_tokens, batch_size=batch,
    )  # fmt: skip
    loaded = load_model(settings)
    engines = {}
    for mode in decode_modes:
        chosen = settings.model_copy(update={"decode_mode": mode})
        engines[mode] = TaggingEngine(loaded, default_taxonomy(), chosen)
    sample = _images(images, seed=7)
    for engine in engines.values():
        engine.tag(sample[:batch])  # warm-up: the cached prefix, the buffers, compiled graphs
    seconds: dict[str, list[float]] = {mode: [] for mode in decode_modes}
    counts: dict[str, tuple[int, int, int]] = {}
    for _ in range(repeats):
        for mode, engine in engines.items():
            started = time.perf_counter()
            counts[mode] = _tag_all(engine, sample, batch)
            seconds[mode].append(time.perf_counter() - started)
    rows = []
    for mode in decode_modes:
        passes, scoring, generated = counts[mode]
        median = statistics.median(seconds[mode])
        rows.append({
            "decode": mode,
            "forward_passes_per_batch": passes / -(-images // batch),
            "forward_passes_per_image": passes / images,
            "scoring_passes_per_image": scoring / images,
            "answer_tokens_per_image": generated / images,
            "images_per_s": images / median,
            "vs_eager": statistics.median(seconds["eager"]) / median if "eager" in seconds else None,
        })  # fmt: skip
    return rows


def _tag_all(engine: TaggingEngine, sample: list[PreparedImage], batch: int) -> tuple[int, int, int]:
    """Tag the sample in batches; (forward passes, scoring passes, answer tokens)."""
    passes = scoring = generated = 0
    for start in range(0, len(sample), batch):
        _, stats = engine.tag(sample[start : start + batch])
        passes += stats.forward_passes
        scoring += stats.scoring_passes
        generated += stats.generated_tokens
    return passes, scoring, generated


def run(
    work_dir: Path,
    images: int = 16,
    batch: int = 8,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    decode_modes: tuple[str, ...] = ("eager", "static"),
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Every configuration in turn; on_row sees each row as soon as it is measured."""
    rows = []
    for kind in TOKENIZER_KINDS:
        directory = model_dir(work_dir, kind)
        for language in ("en", "zh"):
            for summary_tokens in (0, 40):
                for figures in measure(directory, language, summary_tokens, images, batch, decode_modes, repeats):
                    rows.append({"tokenizer": kind, "language": language, "summary": summary_tokens > 0, **figures})
                    if on_row:
                        on_row(rows[-1])
    return rows
