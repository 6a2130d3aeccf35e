"""The whole model in one process: the baseline every swarm figure is compared with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from client.draft_model import DraftModel
from client.head_batch import HeadBatcher
from swarm.model import Head, Span, load_head, load_span, open_checkpoint
from swarm.model.device import default_dtype, resolve_device


@dataclass
class LocalModel:
    head: Head
    span: Span  # all blocks
    batcher: HeadBatcher = field(init=False)  # for concurrent local generations (client/head_batch.py)

    def __post_init__(self) -> None:
        self.batcher = HeadBatcher(self.head)

    @property
    def device(self) -> torch.device:
        return self.head.device

    @classmethod
    def load(
        cls,
        model: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ) -> LocalModel:
        """Blocks and head on `device` ("cpu", "cuda", "cuda:N" or "auto": a GPU when there is one),
        in `dtype` (default bfloat16 on a GPU, float32 on the CPU).

        `progress(done, total)` counts the blocks, then the head's two parts (swarm.model.load_head)."""
        where = resolve_device(device)  # SwarmError before any weight is read
        dtype = dtype or default_dtype(where)
        with open_checkpoint(model) as checkpoint:
            layers = checkpoint.config.num_layers
            span = load_span(checkpoint, 0, layers, dtype, device=where, progress=(lambda done, _: progress(done, layers + 2)) if progress else None)
            head = load_head(checkpoint, dtype, where, progress=(lambda done, _: progress(layers + done, layers + 2)) if progress else None)
        return cls(head, span)

    def drafter(self, blocks: int) -> DraftModel:
        """Self-speculation: this model's own first `blocks` blocks and head draft (client/draft_model.py),
        sharing every weight with it."""
        return DraftModel(self.head, self.span, blocks)
