"""`--batch-size auto`: the largest batch the free GPU memory holds, from the model's shape.

Per image a batch holds the key/value cache of its whole sequence (the shared prefix is expanded
per row once the first forward concatenates onto it), the vision tower's activations, and the
decision logits; the scoring pass for shared label prefixes copies a few rows' caches on top. The
estimate is deliberately generous (a safety factor) and then only a fraction of the free memory is
planned for: an out-of-memory batch still splits in two (tag_splitting_on_oom), but costs a retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.kv_state import batch_capacity, slot_count

CPU_ENGINE_BATCH = 32  # SKUTAG_ENGINE_BATCH_SIZE=auto off a GPU: no free memory to read; today's default batch
SAFETY = 2.0  # activations, allocator fragmentation, the scoring pass's cache copies
USABLE_FRACTION = 0.85  # of the memory free once the weights are loaded


@dataclass(frozen=True)
class ImageFootprint:
    """What one image of a batch needs on the device, in bytes."""

    kv_cache: int
    vision: int
    logits: int

    @property
    def total(self) -> int:
        return int((self.kv_cache + self.vision + self.logits) * SAFETY)


def image_footprint(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    sequence_tokens: int,
    vocab_size: int,
    vision_hidden: int,
    vision_patches: int,
    dtype_bytes: int,
) -> ImageFootprint:
    kv = 2 * layers * kv_heads * head_dim * sequence_tokens * dtype_bytes
    vision = 4 * vision_hidden * vision_patches * dtype_bytes  # a block's input, output and MLP hidden
    logits = vocab_size * 4  # one fp32 row of logits per decision
    return ImageFootprint(kv_cache=kv, vision=vision, logits=logits)


def auto_batch_size(free_bytes: int, per_image_bytes: int, limit: int = 256) -> int:
    """The batch that fits USABLE_FRACTION of free_bytes, at least 1 and at most limit."""
    if per_image_bytes <= 0:
        raise ValueError("per_image_bytes must be positive")
    fits = int(free_bytes * USABLE_FRACTION) // per_image_bytes
    return max(1, min(limit, fits))


def footprint_for(model: Any, sequence_tokens: int, image_side: int, dtype_bytes: int) -> ImageFootprint:
    """The footprint for a loaded Qwen3-VL at a sequence length (prompt + answer tokens)."""
    text = model.config.text_config
    vision = model.config.vision_config
    return image_footprint(
        layers=text.num_hidden_layers,
        kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", text.hidden_size // text.num_attention_heads),
        sequence_tokens=sequence_tokens,
        vocab_size=text.vocab_size,
        vision_hidden=vision.intermediate_size,
        vision_patches=(image_side // vision.patch_size) ** 2,
        dtype_bytes=dtype_bytes,
    )


def free_device_bytes(device: Any) -> int:
    import torch

    if device.type != "cuda":
        raise ValueError("--batch-size auto needs a CUDA device (it reads the free GPU memory)")
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def engine_batch_size(engine: Any, limit: int = 256) -> int:
    """--batch-size auto for a built TaggingEngine on its device."""
    settings = engine.settings
    prompt = len(engine.prefix_ids) + len(engine.tail_ids)
    if settings.decode_mode == "eager":
        longest_category = max(len(order) for order in engine.plan.order.values())
        sequence = prompt + 16 * (1 + longest_category) + settings.summary_max_tokens  # labels + keys, generous
    else:  # the preallocated slots, whatever the answer's length
        sequence = slot_count(prompt, engine.plan, settings.summary_max_tokens)
    dtype_bytes = 4 if engine.loaded.dtype.is_floating_point and engine.loaded.dtype.itemsize == 4 else 2
    footprint = footprint_for(engine.loaded.model, sequence, settings.image_size, dtype_bytes)
    fits = auto_batch_size(free_device_bytes(engine.loaded.device), footprint.total, limit)
    if settings.decode_mode == "compiled":  # its buffers hold the batch rounded up to a power of two
        fits = batch_capacity(fits + 1) // 2
    return fits


def engine_batch_limit(engine: Any) -> int:
    """SKUTAG_ENGINE_BATCH_SIZE for a built engine: the number given, or for auto what the free GPU
    memory holds (CUDA) or CPU_ENGINE_BATCH (a CPU has no free memory worth sizing by)."""
    requested = engine.settings.engine_batch_size
    if requested != "auto":
        return int(requested)
    if engine.loaded.device.type != "cuda":
        return CPU_ENGINE_BATCH
    return engine_batch_size(engine)
