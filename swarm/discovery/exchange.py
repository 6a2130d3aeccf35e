"""One push-pull gossip exchange between two peer tables, without sockets.

This is the outcome every gossip round must have, whatever the wire looks like: after
A and B talk, each holds the newer of the two versions of every live record either
held. Only news moves: each side sends what the other's `versions()` summary lacks or
holds older, the way a summary-then-delta exchange keeps gossip cheap once tables agree.
Being pure, it lets tests and benchmarks simulate a whole swarm in one process.
"""

from __future__ import annotations

from swarm.peers import PeerTable


def exchange(a: PeerTable, b: PeerTable, now: float, *, source: str = "gossip") -> tuple[int, int]:
    """Push-pull between `a` and `b` at `now`; returns (records `a` took, records `b` took).

    Both deltas are taken before either side merges, as when two peers swap at once.
    Merging never raises: refused records are counted in each table's `refused`.
    """
    to_b = a.newer_than(b.versions(), now)
    to_a = b.newer_than(a.versions(), now)
    taken_by_b = sum(b.merge(record, now, source) for record in to_b)
    taken_by_a = sum(a.merge(record, now, source) for record in to_a)
    return taken_by_a, taken_by_b
