"""The key/value state of a batch's rows, in the layout SKUTAG_DECODE_MODE picks.

eager: transformers' DynamicCache, grown by concatenation. Each forward appends the widest row's
chunk to every row; the gaps of narrower rows stay in the cache and a validity mask hides them.

static and compiled: one preallocated buffer per layer, (batch, heads, slots, head_dim), sized for
the longest answer the decoding plan allows. Each row writes its chunk at its own next slots (so a
row's cache has no gaps) and the mask is plain causal per row, which also hides every slot not yet
filled. A chunk is padded to one of a few fixed widths (buckets: powers of 4, up to the longest
chunk the plan allows); the padding lands past the row's last real slot, where the row's next
chunk overwrites it. Fixed shapes are what torch.compile needs (CUDA graphs on a GPU): one graph
per (batch size, bucket). The buffers hold the instruction prefix once and are kept across
batches of the same size, so a compiled graph always sees the same addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.constrained import DecodingPlan, TrieNode
from pipeline.errors import InferenceError
from pipeline.settings import DecodeMode

BUCKET_BASE = 4  # chunk widths 1, 4, 16, 64, ...: at most 4x padding, a handful of compiled graphs


# --- sizes from the plan -----------------------------------------------------------------------
def trie_depth(node: TrieNode) -> int:
    """Tokens on the longest path from node to a value."""
    return max((1 + trie_depth(child) for child in node.children.values()), default=0)


def longest_structured_answer(plan: DecodingPlan) -> int:
    """Most tokens the answer can take before the summary: the longest category path plus, for
    the category asking the most, the longest path of each of its attributes."""
    per_category = (
        sum(trie_depth(plan.trie_for(category, name).root) for name in names) for category, names in plan.order.items()
    )
    return trie_depth(plan.category.root) + max(per_category, default=0)


def batch_capacity(batch: int) -> int:
    """The compiled path's batch: the next power of two, so a worker's odd-sized batches (the
    last of a message, a split after out-of-memory) reuse a few graphs instead of compiling more."""
    return 1 << (batch - 1).bit_length()


def bucket(width: int, widest: int) -> int:
    """The fixed width a chunk of `width` tokens is padded to: a power of BUCKET_BASE, or `widest`
    (the longest chunk the plan allows) where that is smaller."""
    size = 1
    while size < width:
        size *= BUCKET_BASE
    return max(width, min(size, widest))


def slot_count(prompt_tokens: int, plan: DecodingPlan, summary_tokens: int) -> int:
    """Slots a row needs: the prompt, the longest answer, and room for the widest padded chunk
    (a chunk, or a scoring pass's candidate, never exceeds the structured answer)."""
    structured = longest_structured_answer(plan)
    summary = summary_tokens if plan.summary_enabled else 0
    return prompt_tokens + structured + summary + structured


# --- eager: a grown DynamicCache -----------------------------------------------------------------
def attention_mask(valid: Any, chunk_valid: Any) -> tuple[Any, Any]:
    """A 4-D boolean mask (B, 1, chunk, past + chunk): causal, and blind to the gaps left by rows
    that appended fewer tokens than others. Returns it with the grown validity of every position."""
    import torch

    past = valid.shape[1]
    width = chunk_valid.shape[1]
    grown = torch.cat([valid, chunk_valid], dim=1)
    causal = torch.ones(width, past + width, dtype=torch.bool, device=valid.device).tril(diagonal=past)
    return grown[:, None, None, :] & causal[None, None], grown


class GrowingRows:
    """Rows on a DynamicCache (SKUTAG_DECODE_MODE=eager)."""

    def __init__(self, cache: Any, valid: Any) -> None:
        self.cache = cache
        self.valid = valid

    @staticmethod
    def width(longest_chunk: int) -> int:
        return longest_chunk

    def forward(self, language_model: Any, lengths: Any, position_ids: Any, **inputs: Any) -> Any:
        """Append each row's chunk (lengths[i] real tokens, the rest padding); the hidden states."""
        import torch

        width = position_ids.shape[-1]
        chunk_valid = torch.arange(width)[None, :] < lengths[:, None]
        mask, self.valid = attention_mask(self.valid, chunk_valid.to(self.valid.device))
        output = language_model(
            attention_mask=mask, position_ids=position_ids, cache=self.cache, use_cache=True, **inputs
        )
        return output.last_hidden_state

    def select(self, slots: Any) -> GrowingRows:
        """A copy of some rows' state, to run a pass on and drop."""
        from transformers import DynamicCache

        copy = DynamicCache(ddp_cache_data=[(layer.keys[slots], layer.values[slots]) for layer in self.cache.layers])
        return GrowingRows(copy, self.valid[slots])


# --- static / compiled: preallocated slots -------------------------------------------------------
def _slot_layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):  # type: ignore[misc]
        """One layer's buffers; each row's chunk goes to that row's own slots (`write_slots`)."""

        def __init__(self, keys: Any, values: Any, fixed_address: bool) -> None:
            import torch

            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True
            if fixed_address:  # compiled graphs (CUDA graphs) mutate these in place
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            slots = kwargs["kwargs"]["write_slots"]  # (B, chunk) slot of each token
            heads = key_states.shape[1]
            self.keys.scatter_(2, slots[:, None, :, None].expand(-1, heads, -1, key_states.shape[3]), key_states)
            self.values.scatter_(2, slots[:, None, :, None].expand(-1, heads, -1, value_states.shape[3]), value_states)
            return self.keys, self.values

    return SlotLayer


def slot_cache(buffers: list[tuple[Any, Any]], fixed_address: bool = False) -> Any:
    """A transformers Cache over preallocated (keys, values) buffers, one pair per layer."""
    from transformers.cache_utils import Cache

    layer = _slot_layer_class()
    return Cache(layers=[layer(keys, values, fixed_address) for keys, values in buffers])


class SlotRows:
    """Rows on preallocated slots (SKUTAG_DECODE_MODE=static or compiled). `filled` (CPU) is each
    buffer row's next free slot. `step`, when set, runs the decode forwards (the compiled one) on
    every buffer row: the compiled path's buffers hold a padded batch (batch_capacity), whose
    spare rows compute on padding and are never read."""

    def __init__(self, cache: Any, filled: Any, rows: int, widest: int, step: Callable[..., Any] | None = None) -> None:
        self.cache = cache
        self.filled = filled
        self.rows = rows
        self.widest = widest
        self.step = step
        self.slots = int(cache.layers[0].keys.shape[2])
        # The real rows' view, for the uncompiled passes (prefill): they need not run the spare rows.
        self._real = cache
        if len(filled) > rows:
            self._real = slot_cache([(layer.keys[:rows], layer.values[:rows]) for layer in cache.layers])

    def width(self, longest_chunk: int) -> int:
        return bucket(longest_chunk, self.widest)

    def forward(self, language_model: Any, lengths: Any, position_ids: Any, **inputs: Any) -> Any:
        import torch

        width = position_ids.shape[-1]
        if int(self.filled.max()) + width > self.slots:
            raise InferenceError(f"static KV cache of {self.slots} slots is full: the plan's bound is wrong")
        compiled = self.step is not None and "input_ids" in inputs
        filled = self.filled if compiled else self.filled[: self.rows]
        device = position_ids.device
        write = (filled[:, None] + torch.arange(width)[None, :]).to(device)
        mask = torch.arange(self.slots, device=device)[None, None, None, :] <= write[:, None, :, None]
        if compiled:
            assert self.step is not None
            spare = len(filled) - self.rows
            ids = torch.nn.functional.pad(inputs["input_ids"], (0, 0, 0, spare))
            positions = torch.nn.functional.pad(position_ids, (0, 0, 0, spare))
            hidden = self.step(language_model, mask, positions, self.cache, write, input_ids=ids)[: self.rows]
        else:
            hidden = _plain_forward(language_model, mask, position_ids, self._real, write, **inputs)
        self.filled[: self.rows] += lengths
        return hidden

    def select(self, slots: Any) -> SlotRows:
        copy = slot_cache([(layer.keys[slots], layer.values[slots]) for layer in self.cache.layers])
        return SlotRows(copy, self.filled[slots.cpu()].clone(), len(slots), self.widest)


def _plain_forward(language_model: Any, mask: Any, position_ids: Any, cache: Any, write: Any, **inputs: Any) -> Any:
    output = language_model(
        attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, write_slots=write, **inputs
    )
    return output.last_hidden_state


def compiled_step(device: Any) -> Callable[..., Any]:
    """The decode forward under torch.compile with fixed shapes; CUDA graphs on a GPU."""
    import torch

    # One graph per (batch capacity, chunk bucket): up to 9 x 5 of them, past dynamo's default of
    # 8 recompiles, after which it would quietly run the step uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(_plain_forward, mode=mode, dynamic=False)  # type: ignore[no-any-return]


class SlotBuffers:
    """The preallocated buffers, one set per batch size (capacity) seen, each holding the instruction prefix
    in its first slots (written once). Kept so compiled graphs see fixed addresses; dropped on
    out-of-memory (clear)."""

    def __init__(self, slots: int, widest: int, mode: DecodeMode, device: Any) -> None:
        self.slots = slots
        self.widest = widest
        self.mode = mode
        self._caches: dict[int, Any] = {}
        self._step = compiled_step(device) if mode == "compiled" else None

    def rows(self, prefix: list[tuple[Any, Any]], batch: int) -> SlotRows:
        """Rows of a new batch: the prefix in place, every slot after it free."""
        import torch

        capacity = batch_capacity(batch) if self.mode == "compiled" else batch
        if capacity not in self._caches:
            self._caches[capacity] = slot_cache(self._allocate(prefix, capacity), fixed_address=self._step is not None)
        filled = torch.full((capacity,), prefix[0][0].shape[2], dtype=torch.long)
        return SlotRows(self._caches[capacity], filled, batch, self.widest, self._step)

    def _allocate(self, prefix: list[tuple[Any, Any]], batch: int) -> list[tuple[Any, Any]]:
        import torch

        buffers = []
        for keys, values in prefix:
            length = keys.shape[2]
            pair = []
            for source in (keys, values):
                heads, width = source.shape[1], source.shape[3]
                buffer = torch.zeros((batch, heads, self.slots, width), dtype=source.dtype, device=source.device)
                buffer[:, :, :length] = source
                pair.append(buffer)
            buffers.append((pair[0], pair[1]))
        return buffers

    def clear(self) -> None:
        self._caches.clear()
