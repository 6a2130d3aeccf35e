"""Route planning: which peers a client's hidden states pass through, block by block.

Pure functions over a list of `Candidate`s (one per peer record the client trusts),
no I/O, so the planner is tested and benchmarked without a network.

The model (DESIGN.md, "Routing"): layer boundaries S..T are vertices; a peer holding
blocks [s, e) offers an edge i -> j for every s <= i < j <= e, meaning "run blocks
[i, j) on this peer". An edge costs

    fixed + (j - i) * per_block_eff
    fixed         = rtt_s + extra_cost[peer]
    per_block_eff = per_block_s * (1 + load_penalty * load)

The load penalty is multiplicative on compute, not additive: a peer that is busy a
fraction `load` of the time makes our step wait in proportion to the work we give it,
so a busy peer is cheap for one block and expensive for forty. With the default
`load_penalty=1.0` a fully busy peer counts as half as fast. RTT is not scaled: the
network does not care how busy the peer's GPU is.

All edges point forward (i < j), so the graph is a DAG and boundaries in increasing
order are a topological order: Dijkstra's settle order is simply S, S+1, ..., T, and
no heap is needed. A peer of span n offers O(n^2) edges, but because an edge's cost is
linear in its length we never enumerate them: walking j upwards, each peer keeps the
cheapest "open hop" that entered it at some i < j, extended by one block per step:

    open_p(j) = min(open_p(j - 1), dist(j - 1) + fixed_p) + per_block_eff_p
    dist(j)   = min over peers p with s_p < j <= e_p of open_p(j)

open_p(j) is exactly min over i of dist(i) + cost(p, i -> j), so this is the shortest
path over *all* edges, not a heuristic subset, in O(L + sum of span lengths) time
(1000 peers on 80 blocks: about 20k constant steps). The same argument is why a
planner that only considers edges ending at a peer's end or at another peer's start is
also exact (moving a handover point between two hops changes the cost linearly, so one
of the interval's ends is never worse); the walk above needs no such restriction.

Ties are broken deterministically, independent of the input order: among routes of
equal computed cost (equal as floats), fewer hops win, then the smaller sequence of
(peer_id, start, end) hops compared element by element.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from swarm.errors import BadRequest, BadSpan, NoRoute

_NO_EXTRA: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True)
class Candidate:
    """One peer as the planner sees it: what it holds, how fast, how busy, how far.

    Built by the client from a verified peer record plus its own RTT measurement.
    Values come from remote peers, so they are checked here and rejected with typed
    errors: a NaN or negative cost would silently corrupt every route.
    """

    peer_id: str
    start: int  # first block held
    end: int  # one past the last block held: the peer holds [start, end)
    per_block_s: float  # seconds per block for a one-token step (1 / throughput)
    load: float  # fraction of time busy, 0..1
    rtt_s: float  # client's measured round trip to the peer (a default when unknown)
    model: str  # model digest; spans of different checkpoints never mix

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise BadSpan(f"peer {self.peer_id} claims an empty or negative span [{self.start}, {self.end})")
        for name in ("per_block_s", "rtt_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise BadRequest(f"peer {self.peer_id} has {name}={value!r}; need a finite value >= 0")
        if not (0.0 <= self.load <= 1.0):  # also rejects NaN
            raise BadRequest(f"peer {self.peer_id} has load={self.load!r}; need 0 <= load <= 1")


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on `peer_id`."""

    peer_id: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.peer_id}[{self.start}:{self.end})"


@dataclass(frozen=True)
class Route:
    """A chain of hops covering a block range contiguously, and its planned cost.

    `cost` is what the planner minimized: estimated seconds for one token step
    (RTTs + compute, load-adjusted) plus any `extra_cost` the caller added.
    """

    hops: tuple[Hop, ...]
    cost: float

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(hop.peer_id for hop in self.hops)

    @property
    def start(self) -> int:
        return self.hops[0].start

    @property
    def end(self) -> int:
        return self.hops[-1].end

    def __str__(self) -> str:
        return " -> ".join(str(hop) for hop in self.hops)


def uncovered(
    candidates: Iterable[Candidate],
    model: str,
    start: int,
    end: int,
    *,
    exclude: Collection[str] = frozenset(),
) -> list[tuple[int, int]]:
    """Maximal block ranges inside [start, end) that no eligible candidate holds.

    Exposed because a failing plan is best explained by its gaps, and because a node
    choosing what to serve wants the same answer.
    """
    # +1 where a span starts, -1 where it ends: O(peers + blocks), not O(sum of spans).
    delta = [0] * (end - start + 1)
    for c in candidates:
        if c.model != model or c.peer_id in exclude:
            continue
        lo, hi = max(c.start, start), min(c.end, end)
        if lo < hi:
            delta[lo - start] += 1
            delta[hi - start] -= 1
    gaps: list[tuple[int, int]] = []
    holders = 0
    for offset in range(end - start):
        holders += delta[offset]
        if holders:
            continue
        block = start + offset
        if gaps and gaps[-1][1] == block:
            gaps[-1] = (gaps[-1][0], block + 1)
        else:
            gaps.append((block, block + 1))
    return gaps


def plan_route(
    candidates: Iterable[Candidate],
    num_layers: int,
    model: str,
    *,
    start: int = 0,
    end: int | None = None,
    exclude: Collection[str] = frozenset(),
    load_penalty: float = 1.0,
    extra_cost: Mapping[str, float] = _NO_EXTRA,
) -> Route:
    """The cheapest chain of peers running blocks [start, end) of `model` (default: all).

    A sub-range is what failover asks for: replace only the span a dead hop held.
    Candidates of other models and peers in `exclude` are skipped; spans are clipped to
    the requested range. `extra_cost[peer]` is added once per hop on that peer (seconds);
    `plan_routes` uses it to spread sessions. Raises `NoRoute` naming the blocks that no
    eligible peer serves, `BadSpan` for a range outside [0, num_layers), `ValueError` for
    bad penalties or a peer id listed twice for the model (exclude and extra_cost are
    keyed by peer id, so the caller must keep one record per peer).
    """
    stop = num_layers if end is None else end
    if num_layers <= 0 or not (0 <= start < stop <= num_layers):
        raise BadSpan(f"cannot plan blocks [{start}, {stop}) of a model with {num_layers} blocks")
    if not math.isfinite(load_penalty) or load_penalty < 0:
        raise ValueError(f"load_penalty must be finite and >= 0, got {load_penalty!r}")
    for peer, extra in extra_cost.items():
        if not math.isfinite(extra) or extra < 0:
            raise ValueError(f"extra_cost[{peer!r}] must be finite and >= 0, got {extra!r}")

    eligible = [c for c in candidates if c.model == model and c.peer_id not in exclude]
    if len({c.peer_id for c in eligible}) != len(eligible):
        raise ValueError(f"peer ids must be unique per model; the table for {model} repeats some")
    gaps = uncovered(eligible, model, start, stop)
    if gaps:
        raise NoRoute(f"no peer serves blocks {_join_ranges(gaps)} of model {model}")
    # Sorting makes the walk (and so every tie) independent of the table's order.
    eligible.sort(key=lambda c: c.peer_id)
    route = _walk(eligible, start, stop, load_penalty, extra_cost)
    if route is None:  # every block is held, so only overflowing costs can get here
        raise NoRoute(
            f"every block in [{start}, {stop}) of model {model} is served, "
            "but no chain has a finite cost (peer costs overflow)"
        )
    return route


def plan_routes(
    candidates: Iterable[Candidate],
    num_layers: int,
    model: str,
    count: int,
    *,
    spread_penalty: float = 1.0,
    start: int = 0,
    end: int | None = None,
    exclude: Collection[str] = frozenset(),
    load_penalty: float = 1.0,
    extra_cost: Mapping[str, float] = _NO_EXTRA,
) -> list[Route]:
    """`count` routes for concurrent sessions or batch prompts, spread over replicas.

    Routes are planned one after another; each hop a route puts on a peer raises that
    peer's cost for the next routes by `spread_penalty` times the hop's compute time.
    The model behind it: two sessions sharing a peer wait for each other's steps, so a
    reused peer is about as slow again as the work already given to it. With
    `spread_penalty=0` every route is the cheapest one; larger values spread harder.
    Routes come back in planning order (the first is the plain cheapest route).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not math.isfinite(spread_penalty) or spread_penalty < 0:
        raise ValueError(f"spread_penalty must be finite and >= 0, got {spread_penalty!r}")
    table = list(candidates)
    by_peer = {c.peer_id: c for c in table if c.model == model}
    extra = dict(extra_cost)
    routes: list[Route] = []
    for _ in range(count):
        route = plan_route(
            table,
            num_layers,
            model,
            start=start,
            end=end,
            exclude=exclude,
            load_penalty=load_penalty,
            extra_cost=extra,
        )
        routes.append(route)
        for hop in route.hops:
            c = by_peer[hop.peer_id]
            compute = (hop.end - hop.start) * c.per_block_s * (1.0 + load_penalty * c.load)
            extra[hop.peer_id] = extra.get(hop.peer_id, 0.0) + spread_penalty * compute
    return routes


def _walk(
    peers: Sequence[Candidate],
    first: int,
    last: int,
    load_penalty: float,
    extra_cost: Mapping[str, float],
) -> Route | None:
    """Shortest path from boundary `first` to `last` by the per-peer open-hop walk.

    `peers` is sorted by peer_id. Arrays are indexed by boundary minus `first`.
    `dist[v]`, `hops[v]`, `back[v]` are the best label of boundary v and how it was
    reached (peer index, boundary its hop entered at); `order[v]` is that path's hops as
    a nested tuple `(order[u], peer_id, u, v)`, which Python compares from the first hop
    on, i.e. lexicographically, without rebuilding paths. Equal costs are rare with
    measured floats but common with default metrics, so ties must stay cheap too.
    """
    n = last - first
    fixed: list[float] = []
    rate: list[float] = []
    joining: list[list[int]] = [[] for _ in range(n)]
    leaving: list[list[int]] = [[] for _ in range(n + 1)]
    spans: dict[tuple[int, int], list[int]] = {}
    for k, c in enumerate(peers):
        fixed.append(c.rtt_s + extra_cost.get(c.peer_id, 0.0))
        rate.append(c.per_block_s * (1.0 + load_penalty * c.load))
        lo, hi = max(c.start, first) - first, min(c.end, last) - first
        if lo < hi:
            spans.setdefault((lo, hi), []).append(k)
    for (lo, hi), group in spans.items():
        # Among peers with the same (clipped) span, one whose fixed cost and rate are
        # both no lower than those of a peer sorting before it can never be on the
        # chosen route: swapping it for that peer is strictly cheaper in exact
        # arithmetic, and an identical clone with a larger id always loses the tie.
        # Swarms of replicas of the same span are the normal case, so prune them here.
        if len(group) > 1:
            group.sort(key=lambda k: (fixed[k], rate[k], k))
        cheapest_rate = math.inf
        for k in group:
            if rate[k] < cheapest_rate:
                cheapest_rate = rate[k]
                joining[lo].append(k)  # joins the walk at step lo + 1
                leaving[hi].append(k)  # leaves after step hi

    inf = math.inf
    dist = [inf] * (n + 1)
    hops = [0] * (n + 1)
    back: list[tuple[int, int]] = [(-1, -1)] * (n + 1)
    order: list[tuple[object, ...]] = [()] * (n + 1)
    dist[0] = 0.0
    open_cost = [inf] * len(peers)  # cheapest way to be inside peer k at the current boundary
    open_from = [-1] * len(peers)  # the boundary that open hop entered at
    active: dict[int, None] = {}

    for j in range(1, n + 1):
        for k in joining[j - 1]:
            active[k] = None
        entered = j - 1
        d_prev = dist[entered]
        best = inf
        tied: list[int] = []
        for k in active:
            cost = d_prev + fixed[k]
            current = open_cost[k]
            if cost < current or (
                cost == current
                and (hops[entered], order[entered], entered)
                < (hops[open_from[k]], order[open_from[k]], open_from[k])
            ):
                current = cost
                open_from[k] = entered
            current += rate[k]
            open_cost[k] = current
            if current < best:
                best = current
                tied = [k]
            elif current == best:
                tied.append(k)
        if best == inf:
            return None
        k = tied[0]
        if len(tied) > 1:
            k = min(tied, key=lambda k: (hops[open_from[k]], order[open_from[k]], peers[k].peer_id, open_from[k]))
        u = open_from[k]
        dist[j] = best
        hops[j] = hops[u] + 1
        back[j] = (k, u)
        order[j] = (order[u], peers[k].peer_id, u, j)
        for k in leaving[j]:
            del active[k]

    path: list[Hop] = []
    v = n
    while v > 0:
        k, u = back[v]
        path.append(Hop(peers[k].peer_id, u + first, v + first))
        v = u
    path.reverse()
    return Route(tuple(path), dist[n])


def _join_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """'[10, 14)', '[10, 14) and [20, 21)', '[0, 2), [10, 14) and [20, 21)'."""
    parts = [f"[{s}, {e})" for s, e in ranges]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
