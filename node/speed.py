"""How fast this node computes, before it knows which blocks it will serve: blocks per second
for one-token steps, measured on the first block(s) of the checkpoint on the node's device and dtype.

`--blocks auto` without `--num-blocks` sizes its span by this (node/balance.py
`speed_share`), so it must be cheap: a block is loaded, timed and dropped. Where
one block's weights are small enough to stay in a CPU's last-level cache from
step to step (the default model: 14 MB a block in float32), a single block
measures itself faster than any span would run (on the 2-core dev box: 2700
blocks/s on one block, 1800 on ten), so as many blocks are loaded as make
`MIN_WEIGHT_BYTES` of weights: what is timed then streams from memory, as a
span does. A large model's block is that big alone.

The rate is sustained: steps over the wall time of a window of at least
`min_seconds`, not the median of single steps. A node whose compute is throttled
(a CPU quota, a box shared with other work, a GPU shared with other processes)
runs some short steps at full speed and then waits; the median of short steps
would report the bursts (one block under a quarter-core quota: full speed), the
window what a pipeline stage on this node will actually deliver.

Running nodes resize by their span's self-benchmark (node/backend.py,
node/rebalance.py), which is what peers' records carry too.
"""

from __future__ import annotations

import logging
import time

import torch

from swarm.model import Segment, Span, load_span
from swarm.model.quant import block_bytes

log = logging.getLogger(__name__)

MIN_WEIGHT_BYTES = 64 * 2**20  # above a CPU's last-level cache, mostly: see the module docstring


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


def block_speed(checkpoint, dtype: torch.dtype, device: torch.device, min_seconds: float = 0.3, quant: str | None = None) -> float:
    """Blocks/s of this node on the first blocks of `checkpoint` (swarm.model.Checkpoint): one, or as
    many as make `MIN_WEIGHT_BYTES`; loaded (with `quant`, as the node will serve them) and dropped here."""
    config = checkpoint.config
    size = block_bytes(config, dtype, quant, device)
    count = max(1, min(config.num_layers, -(-MIN_WEIGHT_BYTES // size)))
    speed = sustained_speed(load_span(checkpoint, 0, count, dtype, device, quant=quant), min_seconds)  # the blocks are freed on return
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give their memory back before the span loads
    log.info("measured %.1f blocks/s on %d blocks (%s, %s)", speed, count, device, dtype)
    return speed
