"""A tiny random-weight Qwen3-VL for tests, the demo and CPU benchmarks; and the real 8B shape.

`skutag model tiny DIR` writes a model of the real Qwen3-VL classes (2-layer text model, 2-layer
vision tower, deepstack included), a tokenizer and a Qwen2VL image-processor config. The tokenizer
is either a byte-level BPE trained here on the taxonomy and the prompts (`tiny`: every label one
token, a 4k vocabulary) or Qwen's real one (`qwen`: real_vocab.py, 151,936 rows, labels of several
tokens sharing prefixes as they do for the real model). Either way the model loads through
the very same from_pretrained path as Qwen/Qwen3-VL-8B-Instruct, INT8 included. Its tags are
random: it exercises the machinery, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

TokenizerKind = Literal["tiny", "qwen"]
TOKENIZER_KINDS: tuple[TokenizerKind, ...] = ("tiny", "qwen")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Published Qwen3-VL-8B dimensions (../shared/reference/qwen3-vl-8b.md).
QWEN3_VL_8B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                        "mrope_interleaved": True},
}  # fmt: skip
QWEN3_VL_8B_VISION: dict[str, Any] = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 4096,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}
QWEN3_VL_8B_TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}

TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 3, 3],
                        "mrope_interleaved": True},
}  # fmt: skip
TINY_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [0],
}


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer learns merges from: prompts, labels and JSON in both languages."""
    from pipeline.prompts import corpus_texts
    from schemas.taxonomy import default_taxonomy

    return corpus_texts(default_taxonomy())


def build_tokenizer(vocab_size: int = 4096) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config's vision token ids, as this tokenizer numbers them."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def config(text: dict[str, Any], vision: dict[str, Any], tokens: dict[str, int]) -> Any:
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=dict(text), vision_config=dict(vision), tie_word_embeddings=False, **tokens)


def build_tiny_model(directory: Path, seed: int = 0, tokenizer_kind: TokenizerKind = "tiny") -> Path:
    """Write the tiny model to directory (created) and return it."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_kind == "qwen":
        from pipeline.real_vocab import VOCAB_SIZE, build_qwen_tokenizer

        tokenizer, vocab_size = build_qwen_tokenizer(), VOCAB_SIZE
    else:
        tokenizer = build_tokenizer()
        vocab_size = _round_up(len(tokenizer), 64)
    tokens = special_token_ids(tokenizer)
    text = {**TINY_TEXT, "vocab_size": vocab_size}
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config(text, TINY_VISION, tokens))
    _save_quietly(model, directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2))
    (directory / "SKUTAG_TINY_MODEL.md").write_text(
        "A random-weight Qwen3-VL built by `skutag model tiny`. Its tags are random: it tests the\n"
        "machinery. Point SKUTAG_MODEL at Qwen/Qwen3-VL-8B-Instruct (or a download of it) for real tags.\n"
    )
    return directory


def is_tiny_model(directory: Path) -> bool:
    return (directory / "SKUTAG_TINY_MODEL.md").exists()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _save_quietly(model: Any, directory: Path) -> None:
    """save_pretrained draws a one-shard tqdm bar on stderr; in `make demo` it reads as noise."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
