"""Route planning: cost arithmetic, ties, gaps, exclusions, sub-ranges, spreading, exactness.

The planner walks the layer-boundary DAG without enumerating edges, so its exactness
is checked against a plain Dijkstra over every edge i -> j of every peer, and its tie
rule against brute-force enumeration of every route on small dyadic tables (dyadic
costs add exactly in floating point, so ties are real ties).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random

import pytest

from swarm.errors import BadRequest, BadSpan, NoRoute
from swarm.routing import Candidate, Hop, Route, plan_route, plan_routes, uncovered

MODEL = "sha256:model-a"


def peer(
    peer_id: str,
    start: int,
    end: int,
    per_block_s: float = 0.01,
    *,
    load: float = 0.0,
    rtt_s: float = 0.01,
    model: str = MODEL,
) -> Candidate:
    return Candidate(peer_id, start, end, per_block_s, load, rtt_s, model)


def random_table(rng: random.Random, num_peers: int, num_layers: int, max_span: int) -> list[Candidate]:
    """Random spans and metrics; block 0..L-1 is guaranteed covered by a few full-length peers."""
    table = []
    for i in range(num_peers):
        start = rng.randrange(num_layers)
        end = start + rng.randint(1, min(max_span, num_layers - start))
        table.append(
            peer(f"p{i:04d}", start, end, rng.uniform(0.001, 0.02), load=rng.random(), rtt_s=rng.uniform(0.002, 0.1))
        )
    # Cover every block so the reference has something to find (gaps are tested apart).
    for b in range(0, num_layers, max_span):
        table.append(peer(f"cover{b:03d}", b, min(b + max_span, num_layers), 0.05, rtt_s=0.2))
    return table


def edge_cost(c: Candidate, i: int, j: int, load_penalty: float = 1.0, extra: float = 0.0) -> float:
    return c.rtt_s + extra + (j - i) * c.per_block_s * (1.0 + load_penalty * c.load)


def reference_cost(
    table: list[Candidate], model: str, start: int, end: int, *, load_penalty: float = 1.0
) -> float:
    """Textbook Dijkstra with a heap over every edge i -> j (s <= i < j <= e) of every peer."""
    edges: dict[int, list[tuple[int, float]]] = {}
    for c in table:
        if c.model != model:
            continue
        lo, hi = max(c.start, start), min(c.end, end)
        for i in range(lo, hi):
            for j in range(i + 1, hi + 1):
                edges.setdefault(i, []).append((j, edge_cost(c, i, j, load_penalty)))
    dist = {start: 0.0}
    heap = [(0.0, start)]
    while heap:
        d, v = heapq.heappop(heap)
        if d > dist.get(v, math.inf):
            continue
        if v == end:
            return d
        for w, cost in edges.get(v, []):
            if d + cost < dist.get(w, math.inf):
                dist[w] = d + cost
                heapq.heappush(heap, (d + cost, w))
    return math.inf


def check_route(route: Route, table: list[Candidate], start: int, end: int, load_penalty: float = 1.0) -> None:
    """Hops are contiguous, inside their peer's span, and add up to the route's cost."""
    by_id = {c.peer_id: c for c in table}
    assert route.hops[0].start == start and route.hops[-1].end == end
    for before, after in zip(route.hops, route.hops[1:]):
        assert before.end == after.start
    total = 0.0
    for hop in route.hops:
        c = by_id[hop.peer_id]
        assert c.start <= hop.start < hop.end <= c.end
        total += edge_cost(c, hop.start, hop.end, load_penalty)
    assert route.cost == pytest.approx(total, rel=1e-9)


# --- basics ---------------------------------------------------------------------------


def test_single_node_route() -> None:
    route = plan_route([peer("solo", 0, 30, 0.002, rtt_s=0.005)], 30, MODEL)
    assert route.hops == (Hop("solo", 0, 30),)
    assert route.peers == ("solo",)
    assert route.cost == pytest.approx(0.005 + 30 * 0.002)
    assert str(route) == "solo[0:30)"


def test_route_str_and_peers() -> None:
    route = plan_route([peer("a", 0, 10), peer("b", 10, 30)], 30, MODEL)
    assert str(route) == "a[0:10) -> b[10:30)"
    assert route.peers == ("a", "b")
    assert (route.start, route.end) == (0, 30)


# --- cost arithmetic over heterogeneous overlapping spans -------------------------------


@pytest.mark.parametrize(
    ("rates", "expected", "cost"),
    [
        # The chain's peers are fast, the big peer slow: chain, with each hand-over where the
        # slow middle peer runs the fewest blocks: 0.03 + 12*0.001 + 6*0.002 + 12*0.001.
        ({"a": 0.001, "b": 0.002, "c": 0.001, "d": 0.003}, "a[0:12) -> b[12:18) -> c[18:30)", 0.066),
        # The big peer is fast enough that one RTT beats three: 0.01 + 30*0.0015.
        ({"a": 0.001, "b": 0.002, "c": 0.001, "d": 0.0015}, "d[0:30)", 0.055),
        # Only the first peer is fast: it runs all it holds, the big peer the rest.
        ({"a": 0.0005, "b": 0.004, "c": 0.004, "d": 0.002}, "a[0:12) -> d[12:30)", 0.062),
    ],
)
def test_cheapest_chain_over_overlapping_spans(rates: dict[str, float], expected: str, cost: float) -> None:
    spans = {"a": (0, 12), "b": (8, 20), "c": (18, 30), "d": (0, 30)}
    table = [peer(name, *spans[name], rates[name]) for name in spans]
    route = plan_route(table, 30, MODEL)
    assert str(route) == expected
    assert route.cost == pytest.approx(cost)
    assert route.cost == pytest.approx(reference_cost(table, MODEL, 0, 30))


def test_rtt_is_paid_once_per_hop() -> None:
    # Same compute either way; a far single peer loses to two near ones only while
    # its RTT exceeds theirs added up.
    near = [peer("a", 0, 15, rtt_s=0.01), peer("b", 15, 30, rtt_s=0.01)]
    assert plan_route(near + [peer("far", 0, 30, rtt_s=0.03)], 30, MODEL).peers == ("a", "b")
    assert plan_route(near + [peer("far", 0, 30, rtt_s=0.015)], 30, MODEL).peers == ("far",)


# --- determinism and ties -------------------------------------------------------------


def test_equal_clones_pick_smallest_peer_id() -> None:
    table = [peer(name, 0, 30, 0.25, rtt_s=0.5) for name in ("m", "c", "x", "a2", "a1")]
    assert plan_route(table, 30, MODEL).peers == ("a1",)


def test_fewer_hops_win_a_tie_before_peer_ids() -> None:
    # Dyadic numbers add exactly: both routes cost 0.5 + 30 * 0.25 = 8.0.
    table = [peer("z", 0, 30, 0.25, rtt_s=0.5), peer("a", 0, 15, 0.25, rtt_s=0.25), peer("b", 15, 30, 0.25, rtt_s=0.25)]
    route = plan_route(table, 30, MODEL)
    assert route.peers == ("z",)
    assert route.cost == 8.0


def test_result_does_not_depend_on_table_order() -> None:
    rng = random.Random(7)
    spans = [(0, 10), (0, 20), (10, 30), (20, 30), (5, 25), (0, 30)]
    # Coarse dyadic metrics make many exact ties.
    table = [
        peer(f"p{i}{k}", s, e, rng.choice([0.25, 0.5]), rtt_s=rng.choice([0.0, 0.5, 1.0]))
        for k, (s, e) in enumerate(spans)
        for i in range(3)
    ]
    first = plan_route(table, 30, MODEL)
    for _ in range(20):
        rng.shuffle(table)
        assert plan_route(table, 30, MODEL) == first


def brute_force_best(table: list[Candidate], start: int, end: int) -> tuple[float, int, tuple[tuple[str, int, int], ...]]:
    """The (cost, hops, hop sequence) minimum over every route, enumerated one by one."""
    best: tuple[float, int, tuple[tuple[str, int, int], ...]] | None = None
    stack: list[tuple[int, float, tuple[tuple[str, int, int], ...]]] = [(start, 0.0, ())]
    while stack:
        v, cost, hops = stack.pop()
        if v == end:
            key = (cost, len(hops), hops)
            best = key if best is None or key < best else best
            continue
        for c in table:
            if c.start <= v < c.end:
                for j in range(v + 1, min(c.end, end) + 1):
                    stack.append((j, cost + edge_cost(c, v, j), hops + ((c.peer_id, v, j),)))
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(40))
def test_tie_rule_matches_brute_force_on_dyadic_tables(seed: int) -> None:
    """Cost first, then fewer hops, then the hop sequence (peer_id, start, end) in order."""
    rng = random.Random(seed)
    num_layers = 6
    table = [peer("full", 0, num_layers, 0.5, rtt_s=1.0)]
    for i in range(5):
        start = rng.randrange(num_layers)
        end = rng.randint(start + 1, num_layers)
        table.append(
            peer(
                rng.choice("abcdefgh") + str(i),
                start,
                end,
                rng.choice([0.125, 0.25, 0.5]),
                load=rng.choice([0.0, 1.0]),
                rtt_s=rng.choice([0.0, 0.25, 0.5]),
            )
        )
    cost, num_hops, hops = brute_force_best(table, 0, num_layers)
    route = plan_route(table, num_layers, MODEL)
    assert route.cost == cost
    assert tuple((h.peer_id, h.start, h.end) for h in route.hops) == hops
    assert len(route.hops) == num_hops


# --- no route --------------------------------------------------------------------------


def test_gaps_raise_no_route_naming_them() -> None:
    table = [peer("a", 0, 10), peer("b", 14, 20), peer("c", 21, 30)]
    with pytest.raises(NoRoute) as caught:
        plan_route(table, 30, MODEL)
    assert str(caught.value) == f"no peer serves blocks [10, 14) and [20, 21) of model {MODEL}"
    assert caught.value.code == "no_route"


def test_three_gaps_and_edges_of_the_model() -> None:
    table = [peer("a", 2, 10), peer("b", 14, 20)]
    with pytest.raises(NoRoute, match=r"blocks \[0, 2\), \[10, 14\) and \[20, 30\) of model"):
        plan_route(table, 30, MODEL)
    assert uncovered(table, MODEL, 0, 30) == [(0, 2), (10, 14), (20, 30)]


def test_empty_table_names_every_block() -> None:
    with pytest.raises(NoRoute, match=r"blocks \[0, 30\) of model"):
        plan_route([], 30, MODEL)


def test_exclusions_are_skipped_and_can_open_gaps() -> None:
    table = [peer("fast", 0, 30, 0.001), peer("a", 0, 15), peer("b", 10, 30)]
    assert plan_route(table, 30, MODEL).peers == ("fast",)
    assert plan_route(table, 30, MODEL, exclude={"fast"}).peers == ("a", "b")
    with pytest.raises(NoRoute, match=r"blocks \[0, 10\) of model"):
        plan_route(table, 30, MODEL, exclude=frozenset({"fast", "a"}))


def test_other_models_are_ignored() -> None:
    table = [peer("other", 0, 30, 0.0001, model="sha256:model-b"), peer("a", 0, 20), peer("b", 20, 30)]
    assert plan_route(table, 30, MODEL).peers == ("a", "b")
    with pytest.raises(NoRoute, match=r"blocks \[20, 30\) of model sha256:model-c"):
        plan_route(table + [peer("c", 0, 20, model="sha256:model-c")], 30, "sha256:model-c")


# --- sub-ranges (failover) ------------------------------------------------------------


def test_sub_range_route_covers_only_that_range() -> None:
    table = [peer("a", 0, 12), peer("b", 8, 22, 0.002), peer("c", 18, 30)]
    route = plan_route(table, 30, MODEL, start=10, end=20)
    assert route.hops == (Hop("b", 10, 20),)
    assert route.cost == pytest.approx(0.01 + 10 * 0.002)
    # Blocks outside the range may be unserved; a gap inside it is named.
    assert plan_route([peer("b", 8, 22)], 30, MODEL, start=10, end=20).peers == ("b",)
    with pytest.raises(NoRoute, match=r"blocks \[12, 15\) of model"):
        plan_route([peer("a", 0, 12), peer("c", 15, 30)], 30, MODEL, start=10, end=20)


def test_sub_range_to_the_end_by_default() -> None:
    route = plan_route([peer("a", 0, 20), peer("b", 15, 30)], 30, MODEL, start=25)
    assert route.hops == (Hop("b", 25, 30),)


@pytest.mark.parametrize(("start", "end"), [(10, 10), (12, 10), (-1, 5), (0, 31)])
def test_bad_sub_range_is_a_bad_span(start: int, end: int) -> None:
    with pytest.raises(BadSpan):
        plan_route([peer("a", 0, 30)], 30, MODEL, start=start, end=end)


# --- load and extra cost ---------------------------------------------------------------


def test_load_penalty_steers_away_from_busy_peers() -> None:
    table = [peer("a", 0, 30, 0.001, load=0.9), peer("b", 0, 30, 0.0015, load=0.0)]
    # a: 0.01 + 30 * 0.001 * 1.9 = 0.067 ; b: 0.01 + 30 * 0.0015 = 0.055
    route = plan_route(table, 30, MODEL)
    assert route.peers == ("b",)
    assert route.cost == pytest.approx(0.055)
    # Without the penalty the faster, busier peer wins: 0.01 + 0.03.
    route = plan_route(table, 30, MODEL, load_penalty=0.0)
    assert route.peers == ("a",)
    assert route.cost == pytest.approx(0.04)


def test_load_penalty_scales_with_blocks_run_on_the_peer() -> None:
    # A busy peer still runs the one block nobody else holds, and no more than that.
    table = [peer("busy", 0, 30, 0.001, load=1.0, rtt_s=0.0), peer("idle", 1, 30, 0.001, rtt_s=0.0)]
    assert str(plan_route(table, 30, MODEL)) == "busy[0:1) -> idle[1:30)"


def test_extra_cost_is_added_once_per_hop() -> None:
    table = [peer("a", 0, 30), peer("b", 0, 30, 0.0101)]
    assert plan_route(table, 30, MODEL).peers == ("a",)
    route = plan_route(table, 30, MODEL, extra_cost={"a": 0.1})
    assert route.peers == ("b",)
    assert route.cost == pytest.approx(0.01 + 30 * 0.0101)


def test_bad_parameters_are_refused() -> None:
    table = [peer("a", 0, 30)]
    with pytest.raises(ValueError):
        plan_route(table, 30, MODEL, extra_cost={"a": -1.0})
    with pytest.raises(ValueError):
        plan_route(table, 30, MODEL, load_penalty=math.nan)
    with pytest.raises(ValueError):
        plan_route(table + [peer("a", 0, 10)], 30, MODEL)  # one id, two spans
    with pytest.raises(BadSpan):
        plan_route(table, 0, MODEL)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"start": 5, "end": 5}, BadSpan),
        ({"start": -1, "end": 5}, BadSpan),
        ({"per_block_s": math.nan}, BadRequest),
        ({"per_block_s": -0.1}, BadRequest),
        ({"rtt_s": math.inf}, BadRequest),
        ({"load": 1.5}, BadRequest),
        ({"load": math.nan}, BadRequest),
    ],
)
def test_candidate_rejects_bad_values(kwargs: dict[str, float], error: type[Exception]) -> None:
    fields = {"peer_id": "x", "start": 0, "end": 10, "per_block_s": 0.01, "load": 0.0, "rtt_s": 0.01, "model": MODEL}
    fields.update(kwargs)
    with pytest.raises(error):
        Candidate(**fields)  # type: ignore[arg-type]


# --- several routes --------------------------------------------------------------------


def test_plan_routes_spreads_over_two_replica_chains() -> None:
    table = [
        peer("a1", 0, 15, 0.001),
        peer("a2", 15, 30, 0.001),
        peer("b1", 0, 15, 0.0012),
        peer("b2", 15, 30, 0.0012),
    ]
    routes = plan_routes(table, 30, MODEL, 2)
    assert [r.peers for r in routes] == [("a1", "a2"), ("b1", "b2")]
    assert routes[0] == plan_route(table, 30, MODEL)
    # No penalty: every session takes the cheapest chain.
    assert [r.peers for r in plan_routes(table, 30, MODEL, 2, spread_penalty=0.0)] == [("a1", "a2")] * 2
    # A third session lands on the chain with the least load added per cost.
    third = plan_routes(table, 30, MODEL, 3)[2]
    assert set(third.peers) <= {"a1", "a2", "b1", "b2"}


def test_plan_routes_mixes_replicas_of_different_shapes() -> None:
    table = [peer("full", 0, 30, 0.001), peer("x", 0, 10, 0.001), peer("y", 10, 30, 0.001)]
    routes = plan_routes(table, 30, MODEL, 2)
    assert [r.peers for r in routes] == [("full",), ("x", "y")]


def test_plan_routes_reuses_peers_when_there_is_no_replica() -> None:
    table = [peer("a", 0, 15), peer("b", 15, 30)]
    assert [r.peers for r in plan_routes(table, 30, MODEL, 3)] == [("a", "b")] * 3
    with pytest.raises(ValueError):
        plan_routes(table, 30, MODEL, 0)


# --- exactness against a plain Dijkstra over every edge --------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_dijkstra_on_random_tables(seed: int) -> None:
    rng = random.Random(seed)
    num_layers = rng.choice([8, 12, 20, 30])
    table = random_table(rng, rng.randint(5, 60), num_layers, max_span=rng.randint(2, num_layers))
    route = plan_route(table, num_layers, MODEL)
    check_route(route, table, 0, num_layers)
    assert route.cost == pytest.approx(reference_cost(table, MODEL, 0, num_layers), rel=1e-9)
    start = rng.randrange(num_layers)
    end = rng.randint(start + 1, num_layers)
    sub = plan_route(table, num_layers, MODEL, start=start, end=end, load_penalty=0.5)
    check_route(sub, table, start, end, load_penalty=0.5)
    assert sub.cost == pytest.approx(reference_cost(table, MODEL, start, end, load_penalty=0.5), rel=1e-9)


@pytest.mark.parametrize(("num_layers", "seed"), [(80, 0), (80, 1), (30, 2)])
def test_thousand_peer_tables(num_layers: int, seed: int) -> None:
    rng = random.Random(seed)
    table = random_table(rng, 1000, num_layers, max_span=num_layers // 2)
    route = plan_route(table, num_layers, MODEL)
    check_route(route, table, 0, num_layers)
    assert route.cost == pytest.approx(reference_cost(table, MODEL, 0, num_layers), rel=1e-9)


def test_thousand_full_replicas_with_clones() -> None:
    """Many identical replicas (default metrics) are pruned, and the smallest id still wins."""
    table = [peer(f"n{i:04d}", 0, 80, 0.01) for i in range(999, -1, -1)]
    table += [peer(f"m{i:04d}", 40 * (i % 2), 40 * (i % 2) + 40, 0.005) for i in range(1000)]
    route = plan_route(table, 80, MODEL)
    assert str(route) == "m0000[0:40) -> m0001[40:80)"
    assert route.cost == pytest.approx(0.02 + 80 * 0.005)


def test_every_route_of_a_small_table_is_no_cheaper() -> None:
    """Enumerate all routes of a small float table: none beats the plan."""
    rng = random.Random(3)
    table = random_table(rng, 8, 6, max_span=4)
    route = plan_route(table, 6, MODEL)
    cheapest = math.inf
    for cut in itertools.product([False, True], repeat=5):
        bounds = [0] + [b for b, on in zip(range(1, 6), cut) if on] + [6]
        total = 0.0
        for i, j in zip(bounds, bounds[1:]):
            total += min((edge_cost(c, i, j) for c in table if c.start <= i and j <= c.end), default=math.inf)
        cheapest = min(cheapest, total)
    assert route.cost == pytest.approx(cheapest, rel=1e-12)
