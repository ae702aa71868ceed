"""--batch-size auto: the footprint arithmetic and the batch it allows (pure: no GPU needed), and
SKUTAG_ENGINE_BATCH_SIZE: the choice (auto on CUDA, on a CPU, or a number) and the engine keeping to it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pipeline import gpu_memory
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.gpu_memory import (
    CPU_ENGINE_BATCH,
    SAFETY,
    USABLE_FRACTION,
    auto_batch_size,
    engine_batch_limit,
    footprint_for,
    image_footprint,
)
from pipeline.inference import TaggingEngine
from pipeline.kv_state import slot_count
from pipeline.settings import load_settings
from pipeline.tiny import QWEN3_VL_8B_TEXT, QWEN3_VL_8B_TOKENS, QWEN3_VL_8B_VISION, config
from tests.conftest import engine_settings, random_images

GIB = 2**30


def test_the_8b_footprint_per_image() -> None:
    footprint = image_footprint(
        layers=36, kv_heads=8, head_dim=128, sequence_tokens=1000, vocab_size=151936,
        vision_hidden=4304, vision_patches=576, dtype_bytes=2,
    )  # fmt: skip
    assert footprint.kv_cache == 2 * 36 * 8 * 128 * 1000 * 2  # 147 KB per token: about 141 MiB here
    assert footprint.logits == 151936 * 4
    assert footprint.total == int((footprint.kv_cache + footprint.vision + footprint.logits) * SAFETY)


def test_auto_batch_fits_the_free_memory_and_stays_in_bounds() -> None:
    per_image = 300 * 2**20
    size = auto_batch_size(60 * GIB, per_image)
    assert size * per_image <= 60 * GIB * USABLE_FRACTION < (size + 1) * per_image
    assert auto_batch_size(100 * 2**20, per_image) == 1  # too little: still one image (OOM splitting handles it)
    assert auto_batch_size(10_000 * GIB, per_image, limit=256) == 256
    with pytest.raises(ValueError, match="positive"):
        auto_batch_size(GIB, 0)


def test_the_footprint_reads_the_model_config() -> None:
    class Model:
        config = config(QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION, QWEN3_VL_8B_TOKENS)

    footprint = footprint_for(Model(), sequence_tokens=1000, image_side=384, dtype_bytes=2)
    assert footprint.kv_cache == 2 * 36 * 8 * 128 * 1000 * 2
    # An H200 after 17 GB of bf16 weights: about 120 GiB free.
    assert 100 < auto_batch_size(120 * GIB, footprint.total) <= 256


# --- SKUTAG_ENGINE_BATCH_SIZE: the choice, and the engine keeping to it --------------------------
class Model8B:
    config = config(QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION, QWEN3_VL_8B_TOKENS)


def on_a_gpu(engine: TaggingEngine, decode_mode: str) -> SimpleNamespace:
    """The engine's plan and prompt, on an 8B model in bf16 on a CUDA device (as the sizing sees it)."""
    settings = engine.settings.model_copy(update={"decode_mode": decode_mode})
    loaded = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, model=Model8B())
    return SimpleNamespace(
        settings=settings, plan=engine.plan, prefix_ids=engine.prefix_ids, tail_ids=engine.tail_ids, loaded=loaded
    )


def test_auto_engine_batch_reads_the_free_gpu_memory_per_decode_mode(
    tiny_engine: TaggingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_memory, "free_device_bytes", lambda device: 40 * GIB)
    sizes = {mode: engine_batch_limit(on_a_gpu(tiny_engine, mode)) for mode in ("eager", "static", "compiled")}
    prompt = len(tiny_engine.prefix_ids) + len(tiny_engine.tail_ids)
    slots = slot_count(prompt, tiny_engine.plan, tiny_engine.settings.summary_max_tokens)
    footprint = footprint_for(Model8B(), sequence_tokens=slots, image_side=384, dtype_bytes=2)
    assert sizes["static"] == auto_batch_size(40 * GIB, footprint.total) > 1  # sized by the preallocated slots
    compiled = sizes["compiled"]
    assert compiled & (compiled - 1) == 0 and compiled <= sizes["static"] < 2 * compiled  # a power of two
    assert sizes["eager"] > 1


def test_engine_batch_size_given_or_auto_on_a_cpu(tiny_engine: TaggingEngine, tiny_model_dir: Path) -> None:
    assert tiny_engine.settings.engine_batch_size == "auto"
    assert tiny_engine.batch_limit == engine_batch_limit(tiny_engine) == CPU_ENGINE_BATCH
    settings = engine_settings(tiny_model_dir, engine_batch_size="3")
    assert TaggingEngine(tiny_engine.loaded, tiny_engine.taxonomy, settings).batch_limit == 3
    with pytest.raises(ConfigError, match=r"SKUTAG_ENGINE_BATCH_SIZE.*auto or a number"):
        load_settings(engine_batch_size="half")
    with pytest.raises(ConfigError, match="SKUTAG_ENGINE_BATCH_SIZE"):
        load_settings(engine_batch_size="0")


def test_tag_many_runs_a_larger_call_in_engine_batches(tiny_engine: TaggingEngine, tiny_model_dir: Path) -> None:
    settings = engine_settings(tiny_model_dir, engine_batch_size=2)
    engine = TaggingEngine(tiny_engine.loaded, tiny_engine.taxonomy, settings)
    images = random_images(5, seed=81)
    tags, stats = engine.tag_many(images)
    assert [batch.images for batch in stats] == [2, 2, 1]
    whole, _ = engine.tag(images)  # one batch of five: the same tags (rows do not see each other)
    assert [t.answer_ids for t in tags] == [t.answer_ids for t in whole]


def test_worker_help_teaches_the_engine_batch_size() -> None:
    result = CliRunner().invoke(main, ["worker", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--engine-batch-size auto|N" in text and "SKUTAG_ENGINE_BATCH_SIZE" in text
    assert "auto (the default): what the free GPU memory holds" in text
