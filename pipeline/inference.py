"""The engine: a batch of prepared images in, one set of tags per image out, always valid against
the taxonomy, every attribute with a confidence from the model's own probabilities.

One batch runs as: preprocess on the device (device_images) -> vision tower -> prefill of the image
and a short tail on top of the cached instruction prefix -> constrained decode, where one forward
pass serves each decision and every forced token rides along with it (decoding.Row walks the tries
of constrained.py). Rows of a batch follow different paths (a dress has other attributes than a
shoe), so each forward appends a different number of tokens per row; the gaps are masked out of
attention and the positions are kept per row, so a row's result does not depend on its neighbours.

Loading and quantization live in model_loading; this module translates torch / CUDA errors raised
while tagging into skutag's (the one boundary for them at run time).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.constrained import build_plan, byte_level_token_bytes, summary_text, summary_vocabulary
from pipeline.decoding import Candidate, Row
from pipeline.device_images import ImageBatcher
from pipeline.errors import GpuOutOfMemoryError, InferenceError, ModelError
from pipeline.gpu_memory import engine_batch_limit
from pipeline.kv_state import GrowingRows, SlotBuffers, SlotRows, longest_structured_answer, slot_count
from pipeline.model_loading import LoadedModel, load_model
from pipeline.prompts import build_prompt, image_placeholder
from pipeline.settings import Settings
from schemas.images import PreparedImage
from schemas.results import AttributeTag, Provenance
from schemas.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# Re-exported: callers build an engine from one import.
__all__ = [
    "BatchStats",
    "ItemTags",
    "LoadedModel",
    "TaggingEngine",
    "load_model",
    "tag_splitting_on_oom",
]


# --- results of a batch ----------------------------------------------------------------------
@dataclass(frozen=True)
class ItemTags:
    attributes: dict[str, AttributeTag]
    summary: str | None
    review_attributes: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)  # this image's share of its batch's time
    answer_ids: tuple[int, ...] = ()  # the answer's tokens as the model saw them (the closing quote implied)

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
    forward_passes: int = 0  # language-model passes: 1 prefill + decode steps + scoring passes
    scoring_passes: int = 0  # extra passes scoring the values of shared branches (exact confidences)
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
        self._slot_buffers: SlotBuffers | None = None
        if settings.decode_mode != "eager":
            slots = slot_count(len(self.prefix_ids) + len(self.tail_ids), self.plan, settings.summary_max_tokens)
            widest = longest_structured_answer(self.plan)
            self._slot_buffers = SlotBuffers(slots, widest, settings.decode_mode, loaded.device)
        self.batch_limit = engine_batch_limit(self)  # after the weights: auto reads the memory left
        log.info("engine batches of at most %d images (SKUTAG_ENGINE_BATCH_SIZE=%s)", self.batch_limit,
                 settings.engine_batch_size)  # fmt: skip

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
        # Every added token is out of a summary, special or not (<think>, <tool_call>, <|fim_*|>).
        added = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.token_bytes = byte_level_token_bytes(tokenizer.get_vocab(), added, vocab_rows)
        allowed, closers = summary_vocabulary(self.token_bytes)
        if self.settings.summary_max_tokens > 0 and not closers:
            raise ModelError("the tokenizer has no token for a closing quote: cannot end the summary")
        mask = torch.zeros(vocab_rows, dtype=torch.bool)
        mask[allowed + closers] = True
        self.summary_mask = mask.to(self.loaded.device)
        self.closers = set(closers)

    # -- the public calls --
    def tag_many(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], list[BatchStats]]:
        """Tag images in batches of at most batch_limit, each split again on GPU out-of-memory."""
        tags: list[ItemTags] = []
        stats: list[BatchStats] = []
        for start in range(0, len(images), self.batch_limit):
            chunk_tags, chunk_stats = tag_splitting_on_oom(self, images[start : start + self.batch_limit])
            tags += chunk_tags
            stats += chunk_stats
        return tags, stats

    def tag(self, images: Sequence[PreparedImage]) -> tuple[list[ItemTags], BatchStats]:
        """Tags for each image, in order. Raises GpuOutOfMemoryError (split the batch and retry)."""
        import torch

        if not images:
            return [], BatchStats()
        try:
            with torch.inference_mode():  # per thread: the batcher's thread is not the loader's
                return self._tag(images)
        except torch.OutOfMemoryError as exc:
            if self._slot_buffers is not None:
                self._slot_buffers.clear()  # a smaller batch gets buffers of its own size
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
        state, hidden = self._prefill(vision, len(images))
        stats.prefill_ms = clock.lap()
        tokens, characters = self.settings.summary_max_tokens, self.taxonomy.summary_max_chars
        rows = [Row(plan=self.plan, summary_cap=tokens, summary_chars=characters) for _ in images]
        steps, stats.scoring_passes = self._decode(rows, state, hidden)
        stats.forward_passes = 1 + steps + stats.scoring_passes
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

    def _prefill(self, vision: Any, batch: int) -> tuple[GrowingRows | SlotRows, Any]:
        import torch

        self._ensure_prefix()
        assert self._prefix_cache is not None
        device = self.loaded.device
        model = self.loaded.model.model
        state = self._new_rows(batch)
        tail = torch.tensor([self.tail_ids], device=device).expand(batch, -1)
        embeds = model.language_model.embed_tokens(tail)
        image_mask = tail == self.loaded.model.config.image_token_id
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), vision.pooler_output.to(embeds.dtype))
        hidden = state.forward(
            model.language_model,
            torch.full((batch,), tail.shape[1], dtype=torch.long),
            self._tail_positions.expand(-1, batch, -1),
            inputs_embeds=embeds,
            visual_pos_masks=image_mask,
            deepstack_visual_embeds=list(vision.deepstack_features),
        )
        return state, hidden[:, -1, :]

    def _new_rows(self, batch: int) -> GrowingRows | SlotRows:
        """The batch's key/value state on the cached prefix, in SKUTAG_DECODE_MODE's layout."""
        import torch
        from transformers import DynamicCache

        assert self._prefix_cache is not None
        if self._slot_buffers is not None:
            return self._slot_buffers.rows(self._prefix_cache, batch)
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._prefix_cache]
        )
        return GrowingRows(cache, torch.ones(batch, len(self.prefix_ids), dtype=torch.bool, device=self.loaded.device))

    # -- decode --
    def _decode(self, rows: list[Row], state: GrowingRows | SlotRows, hidden: Any) -> tuple[int, int]:
        """Decode every row to its end; returns (decode steps, scoring passes)."""
        import torch

        for row in rows:
            row.start()
        positions = torch.full((len(rows),), self._next_position, dtype=torch.long)
        slots = {id(row): index for index, row in enumerate(rows)}
        steps = scoring = 0
        while True:
            # A row decides when its next token is due at the position just computed; a row still
            # holding forced tokens (say, labels sharing a first token) appends them first.
            to_score = self._decide([(row, hidden[index]) for index, row in enumerate(rows) if row.ready])
            if to_score:
                self._score([(slots[id(row)], row, candidates) for row, candidates in to_score], state, positions)
                scoring += 1
            if all(row.done for row in rows):
                return steps, scoring
            hidden = self._step(rows, state, positions)
            steps += 1

    def _step(self, rows: list[Row], state: GrowingRows | SlotRows, positions: Any) -> Any:
        """One forward pass appending each open row's pending tokens (forced + decided)."""
        import torch

        device = self.loaded.device
        chunks = [row.pending if not row.done else [] for row in rows]
        ids, lengths = self._padded(chunks, state.width(max(len(chunk) for chunk in chunks)))
        text_positions = positions[:, None] + torch.arange(ids.shape[1])[None, :]
        output = state.forward(
            self.loaded.model.model.language_model,
            lengths,
            text_positions.to(device)[None].expand(3, -1, -1),
            input_ids=ids.to(device),
        )
        positions += lengths
        for row in rows:
            row.pending = []
        last = (lengths - 1).clamp(min=0).to(device)
        return output[torch.arange(len(rows), device=device), last]

    def _padded(self, chunks: Sequence[Sequence[int]], width: int) -> tuple[Any, Any]:
        """The chunks as one (rows, width) id tensor, padded on the right, and their lengths."""
        import torch

        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        for index, chunk in enumerate(chunks):
            ids[index, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        return ids, torch.tensor([len(chunk) for chunk in chunks], dtype=torch.long)

    def _decide(self, ready: list[tuple[Row, Any]]) -> list[tuple[Row, list[Candidate]]]:
        """Turn each ready row's last hidden state into its next token; returns the rows whose
        choice waits on scoring a shared branch, with the candidates to score."""
        import torch

        if not ready:
            return []
        logits = self.loaded.model.lm_head(torch.stack([hidden for _, hidden in ready])).float()
        choosing = [(row, row_logits) for (row, _), row_logits in zip(ready, logits, strict=True) if not row.in_summary]
        summarizing = [(row, row_logits) for (row, _), row_logits in zip(ready, logits, strict=True) if row.in_summary]
        to_score = []
        if choosing:
            chances = restricted_probabilities(
                torch.stack([row_logits for _, row_logits in choosing]), [row.branch_tokens for row, _ in choosing]
            )
            for (row, _), row_chances in zip(choosing, chances, strict=True):
                candidates = row.decide(row_chances)
                if candidates:
                    to_score.append((row, candidates))
        if summarizing:
            masked = torch.stack([row_logits for _, row_logits in summarizing]).masked_fill(
                ~self.summary_mask, -math.inf
            )
            for (row, _), token in zip(summarizing, masked.argmax(dim=-1).tolist(), strict=True):
                raw = self.token_bytes[int(token)] or b""
                row.take_summary_token(int(token), summary_text(raw), int(token) in self.closers)
        return to_score

    def _score(
        self, requests: list[tuple[int, Row, list[Candidate]]], state: GrowingRows | SlotRows, positions: Any
    ) -> None:
        """One extra forward pass teacher-forcing every candidate's tokens on a copy of its row's
        cache (the copy is dropped); each candidate's probability given its branch is the product of
        its renormalized probabilities at the branching nodes it passes."""
        import torch

        device = self.loaded.device
        flat = [(slot, row, candidate) for slot, row, candidates in requests for candidate in candidates]
        slots = torch.tensor([slot for slot, _, _ in flat], device=device)
        inputs = [candidate.inputs for _, _, candidate in flat]
        ids, lengths = self._padded(inputs, state.width(max(len(chunk) for chunk in inputs)))
        text_positions = positions[slots.cpu()][:, None] + torch.arange(ids.shape[1])[None, :]
        output = state.select(slots).forward(
            self.loaded.model.model.language_model,
            lengths,
            text_positions.to(device)[None].expand(3, -1, -1),
            input_ids=ids.to(device),
        )
        where = [(index, point) for index, (_, _, candidate) in enumerate(flat) for point in candidate.points]
        rows_at = torch.tensor([index for index, _ in where], device=device)
        columns_at = torch.tensor([point.position for _, point in where], device=device)
        logits = self.loaded.model.lm_head(output[rows_at, columns_at]).float()
        chances = restricted_probabilities(logits, [list(point.options) for _, point in where])
        scores = [1.0] * len(flat)
        for (index, point), point_chances in zip(where, chances, strict=True):
            scores[index] *= point_chances[point.token]
        by_row: dict[int, dict[str, float]] = {}
        for (_, row, candidate), score in zip(flat, scores, strict=True):
            by_row.setdefault(id(row), {})[candidate.value] = score
        for _, row, _ in requests:
            row.resolve(by_row[id(row)])

    def _item_tags(self, row: Row, share: dict[str, float]) -> ItemTags:
        review = [name for name, tag in row.tags.items() if tag.confidence < self.settings.threshold_for(name)]
        return ItemTags(
            attributes=dict(row.tags),
            summary=row.summary,
            review_attributes=review,
            timings_ms=share,
            answer_ids=tuple(row.answer),
        )


def restricted_probabilities(logits: Any, options: list[list[int]]) -> list[dict[int, float]]:
    """Softmax of each row's logits over its own allowed tokens only: {token: probability}."""
    import torch

    width = max(len(option) for option in options)
    index = torch.zeros((len(options), width), dtype=torch.long)
    present = torch.zeros((len(options), width), dtype=torch.bool)
    for row, option in enumerate(options):
        index[row, : len(option)] = torch.tensor(option)
        present[row, : len(option)] = True
    picked = logits.gather(1, index.to(logits.device))
    probabilities = torch.softmax(picked.masked_fill(~present.to(logits.device), -math.inf), dim=-1).cpu().tolist()
    return [{token: probabilities[row][j] for j, token in enumerate(option)} for row, option in enumerate(options)]


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
