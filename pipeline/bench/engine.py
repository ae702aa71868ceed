"""CPU engine benchmark on the tiny models: forward passes per image and images/s, for both
tokenizers (the tiny one, every label one token; Qwen's real one, labels of several tokens sharing
prefixes), English and Chinese, summary on and off. Its figures track the decoding's cost in
passes, which is what carries over to a GPU; the CPU's images/s only compare runs on one machine.

The baseline in the same run is the plain decode: one forward pass per answer token, what
free-form generation would spend on the same answer.
"""

from __future__ import annotations

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


def measure(directory: Path, language: str, summary_tokens: int, images: int, batch: int) -> dict[str, Any]:
    settings = load_settings(
        model=str(directory), quantization="fp32", device="cpu", prompt_language=language,
        summary_max_tokens=summary_tokens, batch_size=batch,
    )  # fmt: skip
    engine = TaggingEngine(load_model(settings), default_taxonomy(), settings)
    sample = _images(images, seed=7)
    engine.tag(sample[:batch])  # warm-up: the cached prefix
    passes = scoring = generated = 0
    started = time.perf_counter()
    for start in range(0, images, batch):
        _, stats = engine.tag(sample[start : start + batch])
        passes += stats.forward_passes
        scoring += stats.scoring_passes
        generated += stats.generated_tokens
    seconds = time.perf_counter() - started
    return {
        "forward_passes_per_batch": passes / -(-images // batch),
        "forward_passes_per_image": passes / images,
        "scoring_passes_per_image": scoring / images,
        "answer_tokens_per_image": generated / images,
        "images_per_s": images / seconds,
    }


def run(
    work_dir: Path, images: int = 16, batch: int = 8, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Every configuration in turn; on_row sees each row as soon as it is measured."""
    rows = []
    for kind in TOKENIZER_KINDS:
        directory = model_dir(work_dir, kind)
        for language in ("en", "zh"):
            for summary_tokens in (0, 40):
                figures = measure(directory, language, summary_tokens, images, batch)
                rows.append({"tokenizer": kind, "language": language, "summary": summary_tokens > 0, **figures})
                if on_row:
                    on_row(rows[-1])
    return rows
