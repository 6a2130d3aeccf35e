"""Which blocks each node of a Ray-started swarm serves: replicas where capacity allows. Pure, no I/O.

Nodes started together (node/ray_nodes.py) cannot use `--blocks auto`: every one of
them would read the same empty swarm at the same instant and pick the same window.
So the driver decides, from each node's capacity in blocks (what its memory holds;
None: the whole model), before any of them starts.

The layout lays spans end to end over [0, L), round after round, largest nodes
first: every round that reaches block L is one whole replica of the model. A span
that would run past L is moved back to end at L (it then overlaps the round's
earlier spans, which only adds coverage), and the next node starts a new round at
block 0. The last round may be partial: its spans add coverage where they fall.
Largest first, so big nodes form whole replicas and small ones fill rounds
evenly: capacities [10, 30, 10, 10] of a 30-block model give every block two
nodes, where the order given would leave blocks 20-29 on one.

Losing a node leaves the model covered exactly when every block has two or more
nodes (`coverage`); the caller reports the minimum as the swarm's replicas.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_spans(num_layers: int, capacities: Sequence[int | None]) -> list[tuple[int, int]]:
    """One span (start, end) per node, in the order of `capacities` (blocks each may hold; None: all).

    ValueError when the nodes together cannot hold one replica of the model."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    sizes = [num_layers if cap is None else min(cap, num_layers) for cap in capacities]
    if any(size < 1 for size in sizes):
        raise ValueError(f"every node must hold at least one block, got capacities {list(capacities)}")
    if sum(sizes) < num_layers:
        raise ValueError(f"{len(sizes)} nodes holding {sum(sizes)} blocks cannot cover a model of {num_layers} blocks")
    spans: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    position = 0
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # stable: equal sizes keep their order
        size = sizes[index]
        if position + size >= num_layers:
            spans[index] = (num_layers - size, num_layers)  # closes the round: one more whole replica
            position = 0
        else:
            spans[index] = (position, position + size)
            position += size
    return spans


def coverage(num_layers: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """How many spans hold each block."""
    counts = [0] * num_layers
    for start, end in spans:
        for block in range(start, end):
            counts[block] += 1
    return counts
