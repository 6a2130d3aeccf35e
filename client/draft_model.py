"""A draft model held by the client: proposes drafts for speculative decoding (client/speculate.py).

Any checkpoint with the target's tokenizer can draft (a smaller model of the same
family), or the target's own first N blocks and its head (self-speculation by
early exit: `swarm generate --draft-model PATH --draft-blocks N`): no second
model to find, and on a route over a WAN the client's local compute is cheap
beside a round trip. Drafts are greedy (the draft model's argmax), so the
acceptance rule sees a deterministic drafter.

A `DraftModel` is one generation's drafter: it keeps its own KV cache across
rounds and, given the ids so far, rewinds it to the longest prefix it already
holds (rejected drafts are dropped by overwriting, as on the route), then feeds
the rest and drafts one token at a time. `fork()` gives another generation its
own cache over the same weights. Its steps run on the event loop's thread: a
few small blocks, while the route's step is on the wire.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from swarm.errors import BadRequest, ModelMismatch
from swarm.model import Head, KVCache, Segment, Span, load_head, load_span, open_checkpoint
from swarm.model.device import default_dtype, resolve_device

log = logging.getLogger(__name__)

MIN_CACHE = 256  # positions the cache starts with; it doubles when a text outgrows it


class DraftModel:
    """`DraftModel(head, span, blocks=N).propose(ids, k)`: up to k greedy drafts continuing `ids`."""

    def __init__(self, head: Head, span: Span, blocks: int | None = None) -> None:
        if span.start != 0:
            raise BadRequest("a draft model runs from the first block")
        blocks = span.num_blocks if blocks is None else blocks
        if not 1 <= blocks <= span.num_blocks:
            raise BadRequest(f"draft blocks must be in [1, {span.num_blocks}], not {blocks}")
        self.head = head
        self.span = span
        self.blocks = (0, blocks)
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds, in order

    @classmethod
    def load(cls, model: str, blocks: int | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DraftModel:
        """The first `blocks` blocks (default all) and the head of checkpoint `model` (alias, .gguf or HF directory)."""
        where = resolve_device(device)
        dtype = dtype or default_dtype(where)
        with open_checkpoint(model) as checkpoint:
            layers = checkpoint.config.num_layers
            count = layers if blocks is None else blocks
            if not 1 <= count <= layers:
                raise BadRequest(f"--draft-blocks must be in [1, {layers}] for {model}, not {count}")
            span = load_span(checkpoint, 0, count, dtype, device=where)
            head = load_head(checkpoint, dtype, where)
        return cls(head, span)

    def check_vocabulary(self, target: Head) -> None:
        """`ModelMismatch` unless this model's tokenizer is the target's (same ids for the same text)."""
        ours, theirs = self.head.tokenizer, target.tokenizer
        if self.head.config.vocab_size != target.config.vocab_size or ours.get_vocab() != theirs.get_vocab():
            raise ModelMismatch(
                f"the draft model's vocabulary ({self.head.config.vocab_size} tokens) is not the target model's "
                f"({target.config.vocab_size}): a draft model must share the target's tokenizer"
            )

    def fork(self) -> DraftModel:
        """A drafter over the same weights with a cache of its own (one per generation)."""
        return DraftModel(self.head, self.span, self.blocks[1])

    @torch.inference_mode()
    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not ids:
            return []
        ids = list(ids)
        keep = _common_prefix(self.ids, ids)
        keep = min(keep, len(ids) - 1)  # the last id is fed again when held: its row gives the first draft
        self._reserve(len(ids) + k)
        logits = self._feed(ids[keep:], keep)
        drafts: list[int] = []
        while True:
            token = int(logits.argmax())
            drafts.append(token)
            if len(drafts) == k:
                return drafts
            logits = self._feed([token], len(self.ids))

    def _feed(self, ids: list[int], start: int) -> torch.Tensor:
        """Run `ids` at `start` (overwriting from there): the last row's logits [V]."""
        x = self.head.embed(ids).to(device=self.span.device, dtype=self.span.dtype)
        hidden = self.span(x, [Segment(self.cache, start, len(ids))], self.blocks)
        self.ids[start:] = ids
        return self.head.logits(hidden[-1:])[0]

    def _reserve(self, length: int) -> None:
        """A cache of at least `length` positions, keeping what it holds."""
        if self.cache is not None and self.cache.max_length >= length:
            return
        size = max(MIN_CACHE, length, 2 * (self.cache.max_length if self.cache is not None else 0))
        cache = self.span.new_cache(size, self.blocks)
        if self.cache is not None and self.ids:
            held = len(self.ids)
            cache.k[:, :, :held] = self.cache.k[:, :, :held]
            cache.v[:, :, :held] = self.cache.v[:, :, :held]
            cache.length = held
        self.cache = cache


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
