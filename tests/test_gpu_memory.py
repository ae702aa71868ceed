"""--batch-size auto: the footprint arithmetic and the batch it allows (pure: no GPU needed)."""

from __future__ import annotations

import pytest

from pipeline.gpu_memory import SAFETY, USABLE_FRACTION, auto_batch_size, footprint_for, image_footprint
from pipeline.tiny import QWEN3_VL_8B_TEXT, QWEN3_VL_8B_TOKENS, QWEN3_VL_8B_VISION, config

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
