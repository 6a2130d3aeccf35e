"""The whole model in one process: the baseline every swarm figure is compared with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm.model import Head, Span, load_head, load_span, open_checkpoint


@dataclass
class LocalModel:
    head: Head
    span: Span  # all blocks

    @classmethod
    def load(cls, model: str, dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None) -> LocalModel:
        """`progress(done, total)` counts the blocks, then the head's two parts (swarm.model.load_head)."""
        with open_checkpoint(model) as checkpoint:
            layers = checkpoint.config.num_layers
            span = load_span(checkpoint, 0, layers, dtype, progress=(lambda done, _: progress(done, layers + 2)) if progress else None)
            head = load_head(checkpoint, dtype, progress=(lambda done, _: progress(layers + done, layers + 2)) if progress else None)
        return cls(head, span)
