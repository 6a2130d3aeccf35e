"""The generations a `swarm serve` process is running now, and the route each takes.

The API handlers register each generation here while it runs; the web page's
swarm map draws their routes, `/metrics` counts them, and the planner reads
`occupancy()` to spread new sessions over replicas. One event loop owns it, so
plain attributes suffice: no locks.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HopSpan:
    """One hop of a live route: the peer and the blocks [start, end) it computes."""

    peer_id: str
    start: int
    end: int


@dataclass
class Generation:
    """One running generation (one `choice` of an API request)."""

    id: str
    kind: str  # "chat", "completion" or "page"
    prompt_tokens: int
    started: float = field(default_factory=time.monotonic)
    route: tuple[HopSpan, ...] = ()
    new_tokens: int = 0

    def follow(self, hops: Sequence[HopSpan]) -> None:
        """The route changed (opened, spliced, re-routed)."""
        self.route = tuple(hops)


class LiveGenerations:
    """Every generation running in this process."""

    def __init__(self) -> None:
        self._running: dict[str, Generation] = {}
        self._ids = itertools.count(1)

    @contextmanager
    def track(self, kind: str, prompt_tokens: int) -> Iterator[Generation]:
        """Register a generation for as long as the `with` block runs (also when it fails or is cancelled)."""
        generation = Generation(f"gen-{next(self._ids)}", kind, prompt_tokens)
        self._running[generation.id] = generation
        try:
            yield generation
        finally:
            del self._running[generation.id]

    def __len__(self) -> int:
        return len(self._running)

    def snapshot(self) -> list[Generation]:
        return list(self._running.values())

    def occupancy(self) -> Counter[str]:
        """How many running generations route through each peer."""
        return Counter(hop.peer_id for g in self._running.values() for hop in g.route)
