"""The whole model in one process: the baseline every swarm figure is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from swarm.model import Head, Span, load_head, load_span, open_checkpoint


@dataclass
class LocalModel:
    head: Head
    span: Span  # all blocks

    @classmethod
    def load(cls, model: str, dtype: torch.dtype = torch.float32, progress: Callable[[str], None] | None = None) -> LocalModel:
        with open_checkpoint(model) as checkpoint:
            layers = checkpoint.config.num_layers
            span = load_span(
                checkpoint, 0, layers, dtype, progress=(lambda done, total: progress(f"blocks {done}/{total}")) if progress else None
            )
            if progress:
                progress("tokenizer and head")
            head = load_head(checkpoint, dtype)
        return cls(head, span)
