"""Which blocks a node should serve, from the swarm's coverage. Pure functions, no I/O.

The swarm's speed for a model is set by its slowest block: a token must pass
every block, so the bottleneck is the block with the least throughput summed
over the peers serving it (0 where nobody does). A new node takes the K
contiguous blocks where that sum is lowest; a running node moves only when
moving raises the bottleneck by more than a margin, so nodes do not flap.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from swarm.records import PeerRecord


def block_throughput(records: Iterable[PeerRecord], model_digest: str, num_layers: int, skip: str | None = None) -> list[float]:
    """Per block, the summed throughput (blocks/s) of live peers serving it; `skip` leaves one peer out."""
    totals = [0.0] * num_layers
    for record in records:
        if record.peer_id == skip or record.span is None or record.model_digest != model_digest or record.num_layers != num_layers:
            continue
        for block in range(*record.span):
            totals[block] += record.throughput
    return totals


def choose_span(totals: Sequence[float], count: int, rng: random.Random | None = None) -> tuple[int, int]:
    """The `count` contiguous blocks whose weakest block is weakest, then with the least total.

    Taking the window that contains the swarm's bottleneck is what raises it; among
    such windows, the one with the least throughput overall helps most. Remaining
    ties go to the first window, or to a random one with `rng`: nodes that start
    together into an empty swarm then spread instead of piling onto block 0.
    """
    count = max(1, min(count, len(totals)))
    score = {s: (min(totals[s : s + count]), sum(totals[s : s + count])) for s in range(len(totals) - count + 1)}
    best_score = min(score.values())
    tied = [s for s, value in score.items() if value == best_score]
    best = rng.choice(tied) if rng else tied[0]
    return best, best + count


def bottleneck(totals: Sequence[float]) -> float:
    return min(totals) if totals else 0.0


def should_move(
    totals: Sequence[float], current: tuple[int, int], own_throughput: float, *, margin: float = 0.2
) -> tuple[int, int] | None:
    """A better span for a node serving `current` with `own_throughput`, or None to stay.

    `totals` includes this node's own contribution. We take it out, pick the best
    window for the rest of the swarm, and move only if the resulting bottleneck
    beats the current one by more than `margin` (relative), or if blocks would
    otherwise stay uncovered that the move covers.
    """
    start, end = current
    without = list(totals)
    for block in range(start, end):
        without[block] -= own_throughput
    target = choose_span(without, end - start)
    if target == current:
        return None
    moved = list(without)
    for block in range(*target):
        moved[block] += own_throughput
    now, then = bottleneck(totals), bottleneck(moved)
    if now == 0.0:
        return target if then > 0.0 or _uncovered(moved) < _uncovered(totals) else None
    return target if then > now * (1 + margin) else None


def _uncovered(totals: Sequence[float]) -> int:
    return sum(1 for t in totals if t <= 0.0)


def blocks_that_fit(max_memory: int, block_bytes: int, kv_memory: int, reserve: float = 0.1) -> int:
    """How many blocks a node can hold in `max_memory` bytes: what is left after the KV budget
    and a `reserve` share for activations and the runtime, in whole blocks (at least 1)."""
    usable = max_memory * (1 - reserve) - kv_memory
    return max(1, int(usable // block_bytes))
