"""The engine: a batch of prepared images in, one set of tags per image out, always valid against
the taxonomy, every attribute with a confidence from the model's own probabilities.

One batch runs as: preprocess on the device (resize to 384, normalize, patchify) -> vision tower
-> prefill of the image and a short tail on top of the cached instruction prefix -> constrained
decode, where one forward pass serves each decision and every forced token rides along with it.
Rows of a batch follow different paths (a dress has other attributes than a shoe), so each
forward appends a different number of tokens per row; the gaps are masked out of attention and
the positions are kept per row, so a row's result does not depend on its neighbours.

This module owns the model: loading (once per worker process, never at import), quantization, and
the translation of torch / transformers / CUDA errors into skutag's (the one boundary for them).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.constrained import (
    ChoiceTrie,
    DecodingPlan,
    TrieNode,
    build_plan,
    byte_level_token_bytes,
    forced_walk,
    summary_vocabulary,
)
from pipeline.errors import GpuOutOfMemoryError, InferenceError, ModelError
from pipeline.prompts import build_prompt, image_placeholder
from pipeline.settings import Settings
from schemas.images import PreparedImage
from schemas.results import AttributeTag, Provenance
from schemas.taxonomy import CATEGORY, Taxonomy

log = logging.getLogger(__name__)


# --- results of a batch ----------------------------------------------------------------------
@dataclass(frozen=True)
class ItemTags:
    attributes: dict[str, AttributeTag]
    summary: str | None
    review_attributes: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)  # this image's share of its batch's time

    @property
    def status(self) -> Literal["tagged", "needs_review"]:
        return "needs_review" if self.review_attributes else "tagged"


@dataclass
class BatchStats:
    images: int = 0
    prompt_tokens: int = 0  # what the model attended to: cached prefix + prefilled tail, per image
    prefilled_tokens: int = 0  # what prefill actually computed (the prefix comes from the cache)
    generated_tokens: int = 0  # answer tokens appended: decided + forced
    decided_tokens: int = 0  # chosen from the model's probabilities
    forced_tokens: int = 0  # keys, quotes, unique value tails: no decision, no extra forward
    forward_passes: int = 0  # language-model passes: 1 prefill + decode steps
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in vars(self).items()}

    def timings(self) -> dict[str, float]:
        return {
            "preprocess_ms": self.preprocess_ms,
            "vision_ms": self.vision_ms,
            "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms,
        }


# --- loading ---------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    model_id: str
    revision: str | None
    quantization: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    patch_size: int
    merge_size: int
    temporal_patch_size: int


def resolve_device(setting: str) -> Any:
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"SKUTAG_DEVICE is {setting!r} but no CUDA device is available")
    return device


def _dtypes(quantization: str, device: Any) -> tuple[Any, Any]:
    """(weights dtype, compute dtype) for a quantization on a device."""
    import torch

    if quantization == "fp32" or (device.type == "cpu" and quantization in {"int8", "nf4"}):
        return torch.float32, torch.float32
    half = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    named = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return named.get(quantization, half), named.get(quantization, half)


def quantization_config(quantization: str, skip_modules: list[str], compute_dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_modules,
        )
    return None


def load_model(settings: Settings) -> LoadedModel:
    """Load the model and tokenizer once; errors become one clear ModelError."""
    device = resolve_device(settings.device)
    weights_dtype, compute_dtype = _dtypes(settings.quantization, device)
    _quiet_libraries()
    try:
        return _load(settings, device, weights_dtype, compute_dtype)
    except ModelError:
        raise
    except OSError as exc:
        raise ModelError(_missing_model_message(settings.model, exc)) from exc
    except (ImportError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {settings.model} ({settings.quantization}): {first}") from exc


def _quiet_libraries() -> None:
    """Keep a worker's log to what an operator needs: no progress bars, no optional-kernel notices."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # bitsandbytes says so on every int8 matmul with fp32 inputs (the CPU path): expected, not news.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)


def _missing_model_message(model: str, exc: OSError) -> str:
    folder = model.rsplit("/", maxsplit=1)[-1]
    if Path(model).exists():
        return f"{model}: not a loadable model directory ({str(exc).splitlines()[0]})"
    return (
        f"model {model!r} is not on this machine and the hub cannot be reached. On a machine with internet: "
        f"`hf download {model} --local-dir ./models/{folder}`, copy that folder here and set "
        f"SKUTAG_MODEL=./models/{folder} (or `skutag model tiny DIR` for a random test model)"
    )


def _load(settings: Settings, device: Any, weights_dtype: Any, compute_dtype: Any) -> LoadedModel:
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    directory = Path(settings.model)
    if directory.is_dir() and not (directory / "config.json").exists():
        raise ModelError(f"{settings.model}: not a loadable model directory (no config.json)")
    kwargs: dict[str, Any] = {
        "revision": settings.model_revision,
        "attn_implementation": "sdpa",
        "dtype": weights_dtype,
    }
    config = quantization_config(settings.quantization, settings.quantization_skip_modules, compute_dtype)
    if config is not None:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": device}
    tokenizer = _local_first(AutoTokenizer.from_pretrained, settings.model, revision=settings.model_revision)
    model = _local_first(Qwen3VLForConditionalGeneration.from_pretrained, settings.model, **kwargs)
    if config is None:
        model = model.to(device)
    model.eval()
    processor = _image_processor_config(settings.model, settings.model_revision)
    vision = model.config.vision_config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=compute_dtype,
        model_id=settings.model,
        revision=settings.model_revision,
        quantization=settings.quantization,
        image_mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),
        patch_size=int(processor.get("patch_size", vision.patch_size)),
        merge_size=int(processor.get("merge_size", vision.spatial_merge_size)),
        temporal_patch_size=int(processor.get("temporal_patch_size", vision.temporal_patch_size)),
    )


def _local_first(loader: Callable[..., Any], model: str, **kwargs: Any) -> Any:
    """Load from the local cache without touching the network; go to the hub only for what is missing
    (a worker restarting with cached weights must not wait on the hub's retries)."""
    import huggingface_hub

    try:
        return loader(model, local_files_only=True, **kwargs)
    except OSError:
        if huggingface_hub.constants.HF_HUB_OFFLINE or Path(model).exists():
            raise
    return loader(model, **kwargs)


def _image_processor_config(model: str, revision: str | None) -> dict[str, Any]:
    from transformers.utils import cached_file

    path = cached_file(
        model, "preprocessor_config.json", revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if path is None:
        return {}
    return dict(json.loads(Path(path).read_text()))


# --- device preprocessing --------------------------------------------------------------------
def patchify(pixels: Any, patch: int, merge: int, temporal: int) -> Any:
    """(B, C, H, W) normalized -> (B * grid_h * grid_w, C * temporal * patch * patch), in the layout
    of transformers' Qwen2VLImageProcessor (merge-window-major, then C, T, patch rows, patch cols)."""
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch, width // patch
    x = pixels.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/m, gw/m, mh, mw, C, ph, pw
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # a still image fills both frames
    return x.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)


class ImageBatcher:
    """Resize the intake squares to the model's input on the device, normalize and patchify."""

    def __init__(self, loaded: LoadedModel, side: int) -> None:
        import torch

        self.loaded = loaded
        self.side = side
        self.mean = torch.tensor(loaded.image_mean, device=loaded.device).view(1, 3, 1, 1)
        self.std = torch.tensor(loaded.image_std, device=loaded.device).view(1, 3, 1, 1)
        self.grid = side // loaded.patch_size

    def __call__(self, images: Sequence[PreparedImage]) -> tuple[Any, Any]:
        import torch
        from torch.nn import functional

        device = self.loaded.device
        resized = []
        for image in images:
            square = torch.from_numpy(image.pixels).to(device, non_blocking=True)
            square = square.permute(2, 0, 1).unsqueeze(0).float()
            if square.shape[-1] != self.side:
                # Bicubic with antialiasing, as the reference processor's PIL resize does.
                square = functional.interpolate(
                    square, size=(self.side, self.side), mode="bicubic", antialias=True, align_corners=False
                ).clamp_(0, 255)
            resized.append(square)
        batch = torch.cat(resized).div_(255.0).sub_(self.mean).div_(self.std)
        values = patchify(batch, self.loaded.patch_size, self.loaded.merge_size, self.loaded.temporal_patch_size)
        grid = torch.tensor([[1, self.grid, self.grid]] * len(images), device=device)
        return values.to(self.loaded.model.model.visual.dtype), grid


# --- decoding state per row ------------------------------------------------------------------
@dataclass
class _Choice:
    attribute: str
    trie: ChoiceTrie
    node: TrieNode
    confidence: float = 1.0
    runner_up: str | None = None
    runner_up_confidence: float = 0.0


@dataclass
class _Row:
    """One image's walk through the answer."""

    plan: DecodingPlan
    summary_cap: int
    pending: list[int] = field(default_factory=list)
    choice: _Choice | None = None
    category: str | None = None
    queue: list[str] = field(default_factory=list)
    tags: dict[str, AttributeTag] = field(default_factory=dict)
    in_summary: bool = False
    summary_tokens: list[int] = field(default_factory=list)
    done: bool = False
    decided: int = 0
    forced: int = 0

    def start(self) -> None:
        self.choice = _Choice(CATEGORY, self.plan.category, self.plan.category.root)
        self._walk()

    @property
    def branch_tokens(self) -> list[int]:
        assert self.choice is not None
        return list(self.choice.node.children)

    def choose(self, token: int, probabilities: dict[int, float]) -> None:
        """Take the decided token at a branching node; probabilities are over the node's children."""
        choice = self.choice
        assert choice is not None
        for other, probability in probabilities.items():
            mass = choice.confidence * probability
            if other != token and mass > choice.runner_up_confidence:
                choice.runner_up = choice.node.children[other].first_value
                choice.runner_up_confidence = mass
        choice.confidence *= probabilities[token]
        choice.node = choice.node.children[token]
        self.pending.append(token)
        self.decided += 1
        self._walk()

    def take_summary_token(self, token: int, closes: bool) -> None:
        self.decided += 1
        if closes:
            self.done = True
            return
        self.summary_tokens.append(token)
        self.pending.append(token)
        if len(self.summary_tokens) >= self.summary_cap:
            self.done = True  # the cap: the closing quote is implied, no forward pass needed

    def _walk(self) -> None:
        """Append forced tokens until the next decision; finish attributes on the way."""
        while self.choice is not None:
            tokens, node = forced_walk(self.choice.node)
            self.pending += tokens
            self.forced += len(tokens)
            self.choice.node = node
            if not node.is_leaf:
                return
            self._finish_choice(self.choice, node)

    def _finish_choice(self, choice: _Choice, leaf: TrieNode) -> None:
        assert leaf.value_id is not None
        self.tags[choice.attribute] = AttributeTag(
            value=leaf.value_id,
            confidence=_clamp(choice.confidence),
            runner_up=choice.runner_up,
            runner_up_confidence=_clamp(choice.runner_up_confidence) if choice.runner_up else None,
        )
        if choice.attribute == CATEGORY:
            self.category = leaf.value_id
            self.queue = list(self.plan.order[leaf.value_id])
        if self.queue:
            name = self.queue.pop(0)
            assert self.category is not None
            trie = self.plan.trie_for(self.category, name)
            self.choice = _Choice(name, trie, trie.root)
            return
        self.choice = None
        if self.plan.summary_enabled and self.summary_cap > 0:
            self.in_summary = True
        else:
            self.done = True


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, round(value, 6)))


# --- the engine ------------------------------------------------------------------------------
class TaggingEngine:
    """Tags batches of prepared images. Build one per worker process, after the model is loaded."""

    def __init__(self, loaded: LoadedModel, taxonomy: Taxonomy, settings: Settings) -> None:
        import torch

        self.loaded = loaded
        self.taxonomy = taxonomy
        self.settings = settings
        self.prompt = build_prompt(taxonomy, settings.prompt_language, settings.summary_max_tokens)
        tokenizer = loaded.tokenizer
        self._encode: Callable[[str], list[int]] = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
        self.plan = build_plan(taxonomy, settings.prompt_language, self._encode, settings.summary_max_tokens > 0)
        self.batcher = ImageBatcher(loaded, settings.image_size)
        self.image_tokens = (settings.image_size // loaded.patch_size // loaded.merge_size) ** 2
        self.prefix_ids = self._encode(self.prompt.prefix)
        self.tail_ids = self._encode(image_placeholder(self.image_tokens) + self.prompt.after_image)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._summary_setup(torch)
        self._prefix_cache: list[tuple[Any, Any]] | None = None
        self._tail_positions: Any = None
        self._next_position = 0

    # -- identity --
    def provenance(self, run_id: int | None = None) -> Provenance:
        return Provenance(
            model_id=self.loaded.model_id,
            model_revision=self.loaded.revision,
            quantization=self.loaded.quantization,
            prompt_version=self.prompt.version,
            taxonomy_version=self.taxonomy.version,
            run_id=run_id,
        )

    def _summary_setup(self, torch: Any) -> None:
        tokenizer = self.loaded.tokenizer
        vocab_rows = self.loaded.model.lm_head.weight.shape[0]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.token_bytes = byte_level_token_bytes(tokenizer.get_vocab(), special, vocab_rows)
        allowed, closers = summary_vocabulary(self.token_bytes)
        if self.settings.summary_max_tokens > 0 and not closers:
            raise ModelError("the tokenizer has no token for a closing quote: cannot end the summary")
        mask = torch.zeros(vocab_rows, dtype=torch.bool)
        mask[allowed + closers] = True
        self.summary_mask = mask.to(self.loaded.device)
        self.closers = set(closers)

    # -- the public calls --
    def tag_many(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], list[BatchStats]]:
        """Tag images, splitting the batch on GPU out-of-memory."""
        return tag_splitting_on_oom(self, images)

    def tag(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], BatchStats]:
        """Tags for each image, in order. Raises GpuOutOfMemoryError (split the batch and retry)."""
        import torch

        if not images:
            return [], BatchStats()
        try:
            with torch.inference_mode():  # per thread: the batcher's thread is not the loader's
                return self._tag(images)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise GpuOutOfMemoryError(f"GPU out of memory on a batch of {len(images)} images") from exc
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InferenceError(f"inference failed on a batch of {len(images)} images: {first}") from exc

    def _tag(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], BatchStats]:
        stats = BatchStats(images=len(images))
        clock = _Clock(self.loaded.device)
        pixel_values, grid = self.batcher(images)
        stats.preprocess_ms = clock.lap()
        vision = self.loaded.model.model.visual(pixel_values, grid_thw=grid)
        stats.vision_ms = clock.lap()
        cache, valid, hidden = self._prefill(vision, len(images))
        stats.prefill_ms = clock.lap()
        rows = [_Row(plan=self.plan, summary_cap=self.settings.summary_max_tokens) for _ in images]
        stats.forward_passes = 1 + self._decode(rows, cache, valid, hidden)
        stats.decode_ms = clock.lap()
        stats.prompt_tokens = len(images) * (len(self.prefix_ids) + len(self.tail_ids))
        stats.prefilled_tokens = len(images) * len(self.tail_ids)
        stats.decided_tokens = sum(row.decided for row in rows)
        stats.forced_tokens = sum(row.forced for row in rows)
        stats.generated_tokens = stats.decided_tokens + stats.forced_tokens
        share = {name: round(value / len(images), 3) for name, value in stats.timings().items()}
        return [self._item_tags(row, share) for row in rows], stats

    # -- prefill --
    def _ensure_prefix(self) -> None:
        """Run the shared instructions once; every batch starts from their key/value cache."""
        if self._prefix_cache is not None:
            return
        import torch
        from transformers import DynamicCache

        model = self.loaded.model.model
        full = torch.tensor([self.prefix_ids + self.tail_ids], device=self.loaded.device)
        types = (full == self.loaded.model.config.image_token_id).int()
        grid = torch.tensor([[1, self.batcher.grid, self.batcher.grid]], device=self.loaded.device)
        positions, _ = model.get_rope_index(full, mm_token_type_ids=types, image_grid_thw=grid)
        prefix_length = len(self.prefix_ids)
        cache = DynamicCache()
        model.language_model(
            input_ids=full[:, :prefix_length],
            position_ids=positions[:, :, :prefix_length],
            cache=cache,
            use_cache=True,
        )
        self._prefix_cache = [(layer.keys, layer.values) for layer in cache.layers]
        self._tail_positions = positions[:, :, prefix_length:]
        self._next_position = int(positions.max().item()) + 1

    def _prefill(self, vision: Any, batch: int) -> tuple[Any, Any, Any]:
        import torch
        from transformers import DynamicCache

        self._ensure_prefix()
        assert self._prefix_cache is not None
        device = self.loaded.device
        model = self.loaded.model.model
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._prefix_cache]
        )
        tail = torch.tensor([self.tail_ids], device=device).expand(batch, -1)
        embeds = model.language_model.embed_tokens(tail)
        image_mask = tail == self.loaded.model.config.image_token_id
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), vision.pooler_output.to(embeds.dtype))
        valid = torch.ones(batch, len(self.prefix_ids), dtype=torch.bool, device=device)
        chunk_valid = torch.ones(batch, tail.shape[1], dtype=torch.bool, device=device)
        mask, valid = _attention_mask(valid, chunk_valid)
        output = model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=self._tail_positions.expand(-1, batch, -1),
            cache=cache,
            use_cache=True,
            visual_pos_masks=image_mask,
            deepstack_visual_embeds=list(vision.deepstack_features),
        )
        return cache, valid, output.last_hidden_state[:, -1, :]

    # -- decode --
    def _decode(self, rows: list[_Row], cache: Any, valid: Any, hidden: Any) -> int:
        import torch

        for row in rows:
            row.start()
        positions = torch.full((len(rows),), self._next_position, dtype=torch.long)
        steps = 0
        while True:
            # A row decides when its next token is due at the position just computed; a row still
            # holding forced tokens (say, labels sharing a first token) appends them first.
            ready = [i for i, row in enumerate(rows) if not row.done and not row.pending]
            self._decide(rows, ready, hidden[ready])
            if all(row.done for row in rows):
                return steps
            hidden, valid = self._step(rows, cache, valid, positions)
            steps += 1

    def _step(self, rows: list[_Row], cache: Any, valid: Any, positions: Any) -> tuple[Any, Any]:
        """One forward pass appending each open row's pending tokens (forced + decided)."""
        import torch

        device = self.loaded.device
        chunks = [row.pending if not row.done else [] for row in rows]
        width = max(len(chunk) for chunk in chunks)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        chunk_valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for index, chunk in enumerate(chunks):
            ids[index, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            chunk_valid[index, : len(chunk)] = True
        lengths = torch.tensor([len(chunk) for chunk in chunks])
        text_positions = positions[:, None] + torch.arange(width)[None, :]
        mask, valid = _attention_mask(valid, chunk_valid.to(device))
        model = self.loaded.model.model
        output = model.language_model(
            input_ids=ids.to(device),
            attention_mask=mask,
            position_ids=text_positions.to(device)[None].expand(3, -1, -1),
            cache=cache,
            use_cache=True,
        )
        positions += lengths
        for row in rows:
            row.pending = []
        last = (lengths - 1).clamp(min=0).to(device)
        return output.last_hidden_state[torch.arange(len(rows), device=device), last], valid

    def _decide(self, rows: list[_Row], needing: list[int], hidden: Any) -> None:
        """Turn the last hidden state of each open row into its next token."""
        import torch

        if not needing:
            return
        logits = self.loaded.model.lm_head(hidden).float()
        choosing = [k for k, i in enumerate(needing) if not rows[i].in_summary]
        summarizing = [k for k, i in enumerate(needing) if rows[i].in_summary]
        if choosing:
            options = [rows[needing[k]].branch_tokens for k in choosing]
            width = max(len(o) for o in options)
            index = torch.zeros((len(choosing), width), dtype=torch.long)
            present = torch.zeros((len(choosing), width), dtype=torch.bool)
            for r, option in enumerate(options):
                index[r, : len(option)] = torch.tensor(option)
                present[r, : len(option)] = True
            device = logits.device
            picked = logits[torch.tensor(choosing, device=device)].gather(1, index.to(device))
            probabilities = torch.softmax(picked.masked_fill(~present.to(device), -math.inf), dim=-1).cpu().numpy()
            for r, k in enumerate(choosing):
                option = options[r]
                chances = {token: float(probabilities[r, j]) for j, token in enumerate(option)}
                best = option[int(np.argmax(probabilities[r, : len(option)]))]
                rows[needing[k]].choose(best, chances)
        if summarizing:
            masked = logits[summarizing].masked_fill(~self.summary_mask, -math.inf)
            tokens = masked.argmax(dim=-1).tolist()
            for k, token in zip(summarizing, tokens, strict=True):
                rows[needing[k]].take_summary_token(int(token), int(token) in self.closers)

    def _item_tags(self, row: _Row, share: dict[str, float]) -> ItemTags:
        summary = None
        if row.summary_tokens:
            raw = b"".join(self.token_bytes[t] or b"" for t in row.summary_tokens)
            text = raw.decode("utf-8", errors="ignore").strip()
            summary = text[: self.taxonomy.summary_max_chars].rstrip() or None
        review = [name for name, tag in row.tags.items() if tag.confidence < self.settings.threshold_for(name)]
        return ItemTags(attributes=dict(row.tags), summary=summary, review_attributes=review, timings_ms=share)


def _attention_mask(valid: Any, chunk_valid: Any) -> tuple[Any, Any]:
    """A 4-D boolean mask (B, 1, chunk, past + chunk): causal, and blind to the gaps left by rows
    that appended fewer tokens than others. Returns it with the grown validity of every position."""
    import torch

    past = valid.shape[1]
    width = chunk_valid.shape[1]
    grown = torch.cat([valid, chunk_valid], dim=1)
    causal = torch.ones(width, past + width, dtype=torch.bool, device=valid.device).tril(diagonal=past)
    return grown[:, None, None, :] & causal[None, None], grown


class _Clock:
    """Wall time between laps, in ms, waiting for the device so each stage gets its own time."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = (now - self.last) * 1000, now
        return elapsed


def tag_splitting_on_oom(
    engine: TaggingEngine, images: Sequence[PreparedImage]
) -> tuple[list[ItemTags], list[BatchStats]]:
    """Tag images; when the GPU runs out of memory, tag each half on its own (down to one image)."""
    try:
        tags, stats = engine.tag(images)
        return tags, [stats]
    except GpuOutOfMemoryError:
        if len(images) == 1:
            raise
        middle = len(images) // 2
        log.warning("GPU out of memory on %d images: splitting into %d + %d", len(images), middle, len(images) - middle)
        first, first_stats = tag_splitting_on_oom(engine, images[:middle])
        second, second_stats = tag_splitting_on_oom(engine, images[middle:])
        return first + second, first_stats + second_stats
