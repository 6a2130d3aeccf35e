"""Which blocks a node should serve, and how many, from the swarm's coverage. Pure functions, no I/O.

**Where.** The swarm's speed for a model is set by its slowest block: a token must
pass every block, so the bottleneck is the block with the least throughput summed
over the peers serving it (0 where nobody does). A new node takes the K contiguous
blocks where that sum is lowest; a running node moves only when moving raises the
bottleneck by more than a margin, so nodes do not flap.

**How many** (`--blocks auto` without `--num-blocks`). A route is a pipeline: every
token passes every stage, and with many sessions in flight each stage works on
one while the others work on theirs, so the route runs at the pace of its slowest
stage, and a stage of b blocks on a node of speed t (blocks/s) takes b / t per
token. Stage times are equal, so no stage waits on another, exactly when every
node's blocks are proportional to its speed: b_i = L * t_i / sum(t). So a node
takes `speed_share`: the share of the model's L blocks that its measured speed
earns beside the speeds the swarm's records claim (per replica of the model the
others already make), capped by what fits in its memory. A lone session gains
too: its token time is the sum of the stage times, and the blocks of a slow node
are what make a route slow.

Claimed speeds are a peer's own word: a record is signed by the peer itself. Each
claim is held within `claim_factor` of this node's own measured speed (16x: more
than a CPU against a GPU block for block, so honest mixed swarms are barely
clamped), and a node beside other peers takes at least 1 and at most L - 1 blocks,
so one lying record can neither make a node take nothing nor everything. (Many
records of one liar can still move the share within those bounds; records cost a
proven address each, see swarm/peers.py.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

from swarm.records import PeerRecord

CLAIM_FACTOR = 16.0  # a peer's claimed speed counts as at most this much above or below our own measured one


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
    such windows, the one with the least throughput overall helps most. Among windows
    still tied, those whose ends fall on the ends of the model or where coverage
    changes come first: a window in the middle of evenly covered blocks would cut them
    into two pieces that no contiguous span can take over later (a node holding the
    whole model, when a second joins, could shrink to neither side). Remaining ties
    go to the first window, or to a random one with `rng`: nodes that start together
    into an empty swarm then spread instead of piling onto block 0.
    """
    n = len(totals)
    count = max(1, min(count, n))
    score = {s: (min(totals[s : s + count]), sum(totals[s : s + count])) for s in range(n - count + 1)}
    best_score = min(score.values())
    tied = [s for s, value in score.items() if value == best_score]
    edges = {0, n} | {i for i in range(1, n) if totals[i] != totals[i - 1]}
    aligned = {s: (s in edges) + (s + count in edges) for s in tied}
    tied = [s for s in tied if aligned[s] == max(aligned.values())]
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


def peer_speeds(records: Iterable[PeerRecord], model_digest: str, num_layers: int, skip: str | None = None) -> list[tuple[float, int]]:
    """(claimed throughput, blocks held) of each live peer serving this model; `skip` leaves one peer out."""
    return [
        (record.throughput, record.span[1] - record.span[0])
        for record in records
        if record.peer_id != skip and record.span is not None and record.model_digest == model_digest and record.num_layers == num_layers
    ]


def bounded_claim(claim: float, own: float, factor: float = CLAIM_FACTOR) -> float:
    """A peer's claimed speed held within `factor` of `own` (our measured speed); no claim at all counts as the slowest."""
    if not math.isfinite(claim):
        claim = 0.0
    return min(max(claim, own / factor), own * factor)


def speed_share(own: float, peers: Sequence[tuple[float, int]], num_layers: int, factor: float = CLAIM_FACTOR) -> int:
    """The blocks a node of speed `own` (blocks/s) earns beside `peers` ((claimed speed, blocks held), others only).

    Blocks proportional to speed balance a pipeline's stages (module docstring):
    L * own / (own + sum of the others' bounded claims), per replica of the model the
    others make together (their blocks held / L, whole replicas, at least 1): a swarm
    that already serves the model twice over gives a newcomer the share of one of
    two pipelines. Alone: the whole model. Beside others: 1 to L - 1 blocks.
    """
    if not peers:
        return num_layers
    if not (math.isfinite(own) and own > 0):
        return 1  # a node that cannot measure itself claims the least
    replicas = max(1, sum(blocks for _, blocks in peers) // num_layers)
    others = sum(bounded_claim(claim, own, factor) for claim, _ in peers)
    share = num_layers * replicas * own / (own + others)
    return max(1, min(num_layers - 1, round(share)))


def should_resize(
    without: Sequence[float], current: tuple[int, int], own_throughput: float, count: int, *, margin: float = 0.2
) -> tuple[int, int] | None:
    """A span of `count` blocks for a node serving `current`, or None to keep it.

    `without` is the swarm's per-block throughput without this node. A node resizes
    only when its size is badly off its share (by more than `margin` of the share, and
    more than one block: measured speeds are noisy), and never into a span that leaves
    more blocks uncovered than now (a node shrinks only where others cover what it drops).
    """
    start, end = current
    if abs((end - start) - count) <= max(1.0, margin * count):
        return None
    now = _with(without, current, own_throughput)
    target = choose_span(without, count)
    if _uncovered(_with(without, target, own_throughput)) > _uncovered(now):
        return None
    return target


def _with(without: Sequence[float], span: tuple[int, int], throughput: float) -> list[float]:
    totals = list(without)
    for block in range(*span):
        totals[block] += throughput
    return totals
