"""How fast this node computes, before it knows which blocks it will serve: blocks per second
for one-token steps, measured on one block of the checkpoint on the node's device and dtype.

`--blocks auto` without `--num-blocks` sizes its span by this (node/balance.py
`speed_share`), so it must be cheap: one block is loaded, timed and dropped.

The rate is sustained: steps over the wall time of a window of at least
`min_seconds`, not the median of single steps. A node whose compute is throttled
(a CPU quota, a box shared with other work, a GPU shared with other processes)
runs some short steps at full speed and then waits; the median of short steps
would report the bursts, the window reports what a pipeline stage on this node
will actually deliver.

A caveat: one block's weights may stay in a CPU's last-level cache across steps
where a whole span's would not, so on a CPU a small model measures itself
somewhat faster than a span's self-benchmark (node/backend.py) says later. Running
nodes resize by the latter (node/rebalance.py), which is what peers' records
carry too, so the two are compared like with like from then on.
"""

from __future__ import annotations

import logging
import time

import torch

from swarm.model import Segment, Span, load_span

log = logging.getLogger(__name__)


def sustained_speed(span: Span, min_seconds: float = 0.3, steps: int = 16, warmup: int = 2) -> float:
    """Blocks per second for one-token steps through all of `span`, over at least `min_seconds` of wall time.

    Steps run in rounds of `steps` positions on a fresh cache each (attention stays
    short and the same in every round); the first `warmup` steps warm allocators."""
    x = torch.randn(1, span.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(span.device, span.dtype)
    _rounds(span, x, 1, warmup)
    done, began = 0, time.perf_counter()
    while True:
        _rounds(span, x, 1, steps)
        done += steps
        elapsed = time.perf_counter() - began
        if elapsed >= min_seconds:
            return span.num_blocks * done / elapsed


def _rounds(span: Span, x: torch.Tensor, rounds: int, steps: int) -> None:
    for _ in range(rounds):
        cache = span.new_cache(steps)
        for position in range(steps):
            span(x, [Segment(cache, position, 1)])
    if span.device.type == "cuda":
        torch.cuda.synchronize(span.device)  # the window ends when the GPU is done, not when launches are


def block_speed(checkpoint, dtype: torch.dtype, device: torch.device, min_seconds: float = 0.3) -> float:
    """Blocks/s of this node on one block of `checkpoint` (swarm.model.Checkpoint), loaded and dropped here."""
    speed = sustained_speed(load_span(checkpoint, 0, 1, dtype, device), min_seconds)  # the block is freed on return
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give its memory back before the span loads
    log.info("measured %.1f blocks/s on one block (%s, %s)", speed, device, dtype)
    return speed
