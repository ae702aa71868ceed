"""GPU benchmark: the real Qwen3-VL-8B architecture with random weights (no download), tagged by
skutag's engine in bf16, int8 (torchao and bitsandbytes LLM.int8) and nf4 at several batch sizes,
each with the decode modes (SKUTAG_DECODE_MODE: eager, static, compiled = CUDA graphs), against
the article's way: one image at a time, free-form `generate`, fp16. One run, one card.

Random weights cannot stop on their own, so every path produces a fixed amount of output: the
engine its constrained answer with a summary capped at --summary-tokens, the baseline exactly
--baseline-tokens new tokens (about the length of the same JSON answer). The checkpoint is written
once to --work-dir and loaded through skutag's own load_model, the path a worker uses.

`--tiny` runs the same script on the tiny model, on the CPU, in seconds: the check that it works.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.errors import ModelError
from pipeline.gpu_memory import engine_batch_size
from pipeline.inference import TaggingEngine, load_model
from pipeline.prompts import image_placeholder
from pipeline.settings import load_settings
from schemas.images import PreparedImage
from schemas.taxonomy import default_taxonomy


def build_random_8b(directory: Path, device: str) -> Path:
    """Write Qwen3-VL-8B's architecture with random bf16 weights (about 17 GB) to directory."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from pipeline.tiny import (
        IMAGE_PROCESSOR,
        QWEN3_VL_8B_TEXT,
        QWEN3_VL_8B_VISION,
        build_tokenizer,
        config,
        special_token_ids,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokens = special_token_ids(tokenizer)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 8B random numbers on a CPU take minutes
        model = Qwen3VLForConditionalGeneration._from_config(
            config(QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION, tokens), dtype=torch.bfloat16
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
    del model
    _free()
    return directory


def _free() -> None:
    import torch

    torch._dynamo.reset()  # compiled graphs (and their CUDA-graph pools) of engines already measured
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _images(count: int, seed: int = 0) -> list[PreparedImage]:
    rng = np.random.default_rng(seed)
    return [
        PreparedImage(f"mem://{i}", str(i), rng.integers(0, 256, (600, 600, 3), dtype=np.uint8), "JPEG", (800, 600))
        for i in range(count)
    ]


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def measure_engine(
    model_dir: Path,
    quantization: str,
    batch_sizes: list[int | str],
    batches: int,
    summary_tokens: int,
    device: str,
    on_row: Callable[[dict[str, Any]], None],
    decode_modes: tuple[str, ...] = ("eager",),
) -> None:
    """One row per (batch size, decode mode, summary on / off), each handed to on_row as soon as
    it is measured. The modes of one batch size come together, so a cut-short run compares them."""
    settings = load_settings(
        model=str(model_dir), quantization=quantization, device=device, summary_max_tokens=summary_tokens
    )
    loaded = load_model(settings)
    for requested in batch_sizes:
        if requested == "auto" and loaded.device.type != "cuda":
            continue  # auto reads the free GPU memory; a CPU run (--tiny) measures the fixed sizes
        for mode in decode_modes:
            on = settings.model_copy(update={"decode_mode": mode})
            off = on.model_copy(update={"summary_max_tokens": 0})
            engines = {summary: TaggingEngine(loaded, default_taxonomy(), chosen) for summary, chosen in
                       ((True, on), (False, off))}  # fmt: skip
            size = engine_batch_size(engines[True]) if requested == "auto" else int(requested)
            for summary, engine in engines.items():
                on_row(_measure(engine, quantization, size, batches, summary, auto=requested == "auto"))
            del engines  # the static modes' buffers and compiled graphs go with them
            _free()
    del loaded
    _free()


def _measure(
    engine: TaggingEngine, quantization: str, size: int, batches: int, summary: bool, auto: bool
) -> dict[str, Any]:
    images = _images(size)
    engine.tag(images)  # warm-up: kernels, allocator, the cached prefix; compiled graphs for this batch
    _peak_reset(engine.loaded.device)
    seconds, stats = [], None
    for _ in range(batches):
        started = time.perf_counter()
        _, stats = engine.tag(images)
        seconds.append(time.perf_counter() - started)
    assert stats is not None
    return {
        "path": f"skutag {quantization}", "decode": engine.settings.decode_mode,
        "batch": f"{size} (auto)" if auto else size, "summary": summary,
        "images_per_s": size / statistics.median(seconds), "peak_gib": _peak_gib(engine.loaded.device),
        "forward_passes": stats.forward_passes, "forward_passes_per_image": stats.forward_passes / size,
        "scoring_passes": stats.scoring_passes, "generated_tokens_per_image": stats.generated_tokens / size,
        "decided_per_image": stats.decided_tokens / size,
        **{k: v / size for k, v in stats.timings().items()},
    }  # fmt: skip


def measure_article_way(model_dir: Path, images: int, new_tokens: int, device: str) -> dict[str, Any]:
    """One image at a time, HF generate, free-form (no constraint), fp16; the full prompt every time."""
    import torch

    settings = load_settings(model=str(model_dir), quantization="fp16" if device != "cpu" else "fp32", device=device)
    loaded = load_model(settings)
    engine = TaggingEngine(loaded, default_taxonomy(), settings)  # for its prompt and image batcher only
    text = engine.prompt.prefix + image_placeholder(engine.image_tokens) + engine.prompt.after_image
    input_ids = torch.tensor([loaded.tokenizer.encode(text, add_special_tokens=False)], device=loaded.device)
    types = (input_ids == loaded.model.config.image_token_id).int()
    samples = _images(images + 1, seed=1)
    _peak_reset(loaded.device)
    seconds = []
    for index, image in enumerate(samples):
        started = time.perf_counter()
        pixel_values, grid = engine.batcher([image])
        loaded.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=types,
            pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False,
        )  # fmt: skip
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        if index:  # the first is the warm-up
            seconds.append(time.perf_counter() - started)
    row = {"path": "article: generate, fp16, one at a time", "batch": 1, "images_per_s": 1 / statistics.median(seconds),
           "peak_gib": _peak_gib(loaded.device), "forward_passes": new_tokens,
           "generated_tokens_per_image": new_tokens}  # fmt: skip
    del engine, loaded
    _free()
    return row


def run(
    work_dir: Path,
    tiny: bool = False,
    quantizations: tuple[str, ...] = ("bf16", "int8-torchao", "int8", "nf4"),
    batch_sizes: tuple[int | str, ...] = ("auto", 32, 8, 1),
    decode_modes: tuple[str, ...] = ("eager", "static", "compiled"),
    batches: int = 3,
    summary_tokens: int = 40,
    baseline_tokens: int = 90,
    baseline_images: int = 6,
    console: Console | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    """Every row goes to output (JSON, rewritten) the moment it is measured, so a run stopped by its
    time budget keeps what it measured; the most telling rows come first (bf16 and the two INT8s at
    the largest batch that fits)."""
    import torch

    console = console or Console()
    started = time.perf_counter()
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (tiny model)"
    summary: dict[str, Any] = {"card": card, "seconds": 0.0, "rows": []}

    def keep(row: dict[str, Any]) -> None:
        summary["rows"].append(row)
        summary["seconds"] = time.perf_counter() - started
        if output:
            output.write_text(json.dumps(summary, indent=2))
        console.print(json.dumps(row))

    model_dir = work_dir / ("tiny-model" if tiny else "qwen3-vl-8b-random")
    if not (model_dir / "config.json").exists():
        console.print(f"building {'the tiny model' if tiny else 'Qwen3-VL-8B with random weights'} in {model_dir}")
        if tiny:
            from pipeline.tiny import build_tiny_model

            build_tiny_model(model_dir)
        else:
            build_random_8b(model_dir, device)
    console.print(f"checkpoint ready after {time.perf_counter() - started:.0f} s; card: {card}")
    keep(measure_article_way(model_dir, baseline_images, baseline_tokens, device))
    for quantization in quantizations:
        try:
            measure_engine(
                model_dir, quantization, list(batch_sizes), batches, summary_tokens, device, keep, decode_modes
            )
        except ModelError as exc:  # a missing package (torchao, bitsandbytes) costs its rows, not the run
            keep({"path": f"skutag {quantization}", "error": str(exc)})
        console.print(f"{quantization} done after {time.perf_counter() - started:.0f} s")
    _print(console, [row for row in summary["rows"] if "error" not in row], card)
    return summary


def _print(console: Console, rows: list[dict[str, Any]], card: str) -> None:
    baseline = rows[0]["images_per_s"]
    table = Table(title=f"tagging throughput on {card}")
    for column in (
        "path",
        "decode",
        "batch",
        "img/s",
        "vs article",
        "peak GiB",
        "summary",
        "passes/img",
        "tokens/img",
        "vision ms/img",
        "prefill ms/img",
        "decode ms/img",
    ):
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        table.add_row(
            row["path"], row.get("decode", "-"), str(row["batch"]), f"{row['images_per_s']:.2f}",
            f"{row['images_per_s'] / baseline:.1f}x", peak,
            "on" if row.get("summary", True) else "off",
            f"{row.get('forward_passes_per_image', row['forward_passes']):.2f}",
            f"{row['generated_tokens_per_image']:.0f}",
            f"{row.get('vision_ms', 0):.1f}", f"{row.get('prefill_ms', 0):.1f}", f"{row.get('decode_ms', 0):.1f}",
        )  # fmt: skip
    console.print(table)
