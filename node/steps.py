"""What the backend (node/backend.py) queues and answers: its config, steps and their chunks,
results, and the observer it tells what happens."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from swarm.model.block import KVCache


@dataclass(frozen=True)
class BackendConfig:
    max_sessions: int = 64
    kv_memory_bytes: int = 2 * 2**30
    max_length: int = 8192  # per session; capped by the model's context length
    max_batch_tokens: int = 8192  # tokens in one forward, summed over sessions
    prefill_chunk_tokens: int = 32  # longer steps run in chunks of this many, behind small steps
    prefill_every: int = 4  # ... but a chunk rides in at least every this-many batches
    prefill_share: float = 0.5  # while small steps come, chunks take at most this share of compute time
    max_forwards: int = 4  # stateless /forwards in the node at once (queued or computing)
    max_forward_tokens: int = 8192  # the longest /forward; capped by max_length
    gather_fraction: float = 0.25  # wait at most this share of the last batch's compute time ...
    gather_max_s: float = 0.005  # ... and never longer than this, for active sessions' next steps
    active_window_s: float = 1.0  # a session that stepped this recently counts as active
    # On a CPU, a batch of whole small steps computes on the loop's thread while such batches
    # take at most this long (node/backend.py); 0: every batch goes to the compute thread.
    inline_max_s: float = 0.0025


@dataclass(frozen=True)
class StepResult:
    hidden: torch.Tensor  # [T, D] on the CPU
    compute_s: float  # the forward of the batch this step rode in
    batch_size: int  # sessions in that batch


class StepObserver(Protocol):
    """Told what the batcher does, as it happens (node/metrics.py counts it; None: nobody listens)."""

    def queued(self, seconds: float) -> None:
        """A step waited this long from `submit` until its first tokens started computing."""

    def batch(self, sessions: int, tokens: int, seconds: float) -> None:
        """One ragged forward ran: `sessions` steps (or chunks) of `tokens` tokens in all, in `seconds`."""

    def step(self, seconds: float) -> None:
        """A step's result is ready, this long after its `submit`."""


@dataclass
class Step:
    cache: KVCache
    blocks: tuple[int, int]
    hidden: torch.Tensor  # [T, D], any dtype
    position: int
    done: asyncio.Future = field(repr=False)
    submitted: float = field(default_factory=time.perf_counter)
    computed: int = 0  # tokens of `hidden` already run (a step in chunks)
    outputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    compute_s: float = 0.0

    @property
    def remaining(self) -> int:
        return self.hidden.shape[0] - self.computed


@dataclass
class Chunk:
    """The part of a step that rides in one batch: `count` tokens from `step.computed`."""

    step: Step
    count: int
