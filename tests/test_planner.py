"""The client's trust in peers: measured speed over claims, bans with expiry. All pure (no network).

The planner is fed signed records through its table and steps through
`record_step`, with a fake clock, exactly as `FailoverBlocks` feeds it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from typing import ClassVar

import pytest
import torch

from client.failover import FailoverBlocks
from client.measure import Measurements, StepHop, TrustConfig, apportion
from client.peers import DiscoveryOptions
from client.planner import ClientConfig, Planner, occupied
from client.session import RemoteHop
from swarm.errors import BadRequest, Busy, NoRoute, PeerUnavailable, ShuttingDown
from swarm.identity import Identity
from swarm.records import PeerRecord
from swarm.transport import Transport

DIGEST = "0123456789abcdef" * 2
MODEL = {"architecture": "llama", "shape": "L30-d576-ff1536-h9-kv3-v49152", "digest": DIGEST}
LAYERS = 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(identity: Identity, span: tuple[int, int], throughput: float, port: int) -> PeerRecord:
    return PeerRecord.create(
        identity, addresses=[f"http://127.0.0.1:{port}"], now=time.time(), ttl=300, model=MODEL, num_layers=LAYERS, span=span, throughput=throughput
    )


def _planner(spans: dict[str, tuple[tuple[int, int], float]], claims=None, trust: TrustConfig | None = None):
    """A planner over records named by `spans` (name -> (span, claimed blocks/s)); returns it and name -> peer id."""
    clock = Clock()
    config = ClientConfig(trust=trust or TrustConfig(), transport=Transport(insecure_http=True))  # the records are http
    names: dict[str, str] = {}
    ids: dict[str, str] = {}
    records = []
    for port, (name, (span, throughput)) in enumerate(spans.items(), start=9000):
        record = _record(Identity.generate(), span, throughput, port)
        names[name], ids[record.peer_id] = record.peer_id, name
        records.append(record)
    kwargs = {} if claims is None else {"claims": lambda r: claims(ids[r.peer_id], r)}
    planner = Planner(DIGEST, LAYERS, DiscoveryOptions(bootstrap=("http://127.0.0.1:1",)), config, clock=clock, **kwargs)
    for record in records:
        assert planner.view.table.merge(record, time.time(), source="bootstrap")
    return planner, names, clock


def _route(planner: Planner, names: dict[str, str]) -> list[str]:
    by_id = {v: k for k, v in names.items()}
    return [by_id[p] for p in planner.plan().peers]


def _step(planner: Planner, names: dict[str, str], route: list[tuple[str, int, int]], compute_ms: list[float], wall_s: float) -> None:
    hops = [RemoteHop("http://x", s, e, names[n]) for n, s, e in route]
    planner.record_step(hops, compute_ms, wall_s)


# --- apportioning a step's wall time ---------------------------------------------------------


def test_step_samples_add_up_to_the_wall_time():
    hops = [StepHop("a", 10, 0.010), StepHop("b", 20, 0.020)]
    per_block = apportion(hops, 0.040)  # 10 ms nobody reported: 5 ms each
    assert per_block == pytest.approx([0.015 / 10, 0.025 / 20])
    assert sum(p * h.blocks for p, h in zip(per_block, hops)) == pytest.approx(0.040)


def test_a_lying_compute_time_only_moves_blame_within_its_route():
    honest = apportion([StepHop("liar", 10, 0.100), StepHop("b", 10, 0.005)], 0.110)
    lying = apportion([StepHop("liar", 10, 0.0), StepHop("b", 10, 0.005)], 0.110)
    assert sum(lying) * 10 == pytest.approx(0.110) == pytest.approx(sum(honest) * 10)
    assert lying[0] * 10 >= 0.100 / 2  # the liar still carries half of the 100 ms it hid


@pytest.mark.parametrize("reports", [[1.0, 1.0], [float("nan"), 0.01], [-5.0, float("inf")]])
def test_absurd_compute_reports_cannot_exceed_the_wall_time(reports):
    per_block = apportion([StepHop("a", 1, reports[0]), StepHop("b", 1, reports[1])], 0.02)
    assert all(p >= 0 for p in per_block) and sum(per_block) == pytest.approx(0.02)


# --- claims as priors ----------------------------------------------------------------------


def test_once_anything_is_measured_claims_are_ignored():
    store = Measurements(TrustConfig(claim_factor=1.25))
    store.record_step([StepHop("honest", 10, 0.010)], 0.010, now=0.0)  # 1 ms per block
    costs = store.per_block_costs([("honest", 900.0), ("liar", 1e12), ("modest", 10.0)], now=1.0)
    assert costs["honest"] == pytest.approx(0.001)
    # every unmeasured peer gets the same bounded optimism: one trial, whatever it claims
    assert costs["liar"] == pytest.approx(0.001 / 1.25) == costs["modest"]


def test_with_nothing_measured_claims_are_clamped_against_their_median():
    store = Measurements(TrustConfig(claim_factor=1.25))
    costs = store.per_block_costs([("a", 1000.0), ("b", 1000.0), ("c", 500.0), ("liar", 1e12), ("none", 0.0)], now=0.0)
    assert costs["liar"] == pytest.approx(0.001 / 1.25)
    assert costs["a"] == pytest.approx(0.001) and costs["c"] == pytest.approx(0.002)
    assert 0.001 < costs["none"] < float("inf")  # no claim at all: slow but plannable


def test_stale_measurements_are_forgotten():
    store = Measurements(TrustConfig(stale_s=60.0))
    store.record_step([StepHop("p", 1, 0.5)], 0.5, now=0.0)
    assert store.measured_per_block("p", 59.0) == pytest.approx(0.5)
    assert store.measured_per_block("p", 61.0) is None
    store.record_step([StepHop("p", 1, 0.1)], 0.1, now=100.0)  # a fresh sample restarts the average
    assert store.measured_per_block("p", 100.0) == pytest.approx(0.1)


def test_bad_trust_config_is_refused():
    for bad in ({"claim_factor": 0.5}, {"ewma_alpha": 0.0}, {"ban_s": float("nan")}):
        with pytest.raises(ValueError):
            TrustConfig(**bad)


# --- the route follows measurements --------------------------------------------------------


def test_inflated_claim_gets_one_trial_then_the_route_follows_measured_speed():
    """The route-hijack attack (client half): a record claiming blocks [0, 30) at an absurd speed.
    Clamped, the claim can win one trial route at most; measured slow, it never wins again, and
    the honest peers, once measured, keep the route."""
    spans = {"a": ((0, 15), 900.0), "b": ((15, 30), 900.0), "liar": ((0, 30), 900.0)}
    planner, names, clock = _planner(spans, claims=lambda name, r: 1e12 if name == "liar" else r.throughput)
    liar_cost = next(c for c in planner.candidates() if c.peer_id == names["liar"]).per_block_s
    assert liar_cost == pytest.approx(1 / 900 / 1.25)  # the claim counted for no more than the factor
    assert _route(planner, names) == ["liar"]  # one hop and a clamped claim: worth one trial
    _step(planner, names, [("liar", 0, 30)], [150.0], 0.160)  # it ran at ~5 ms/block
    assert _route(planner, names) == ["a", "b"]
    for _ in range(5):
        clock.now += 1
        _step(planner, names, [("a", 0, 15), ("b", 15, 30)], [15.0, 15.0], 0.034)
        assert _route(planner, names) == ["a", "b"]


def test_measured_peers_outrank_claims_of_the_same_span():
    """A measured replica beats an unmeasured one that claims to be much faster, once the
    factor is 1: a claim can never buy the route over what the client saw."""
    spans = {"honest": ((0, 30), 500.0), "liar": ((0, 30), 500.0)}
    planner, names, _ = _planner(spans, claims=lambda name, r: 1e9 if name == "liar" else r.throughput, trust=TrustConfig(claim_factor=1.0))
    _step(planner, names, [("honest", 0, 30)], [30.0], 0.032)
    route = _route(planner, names)
    costs = {c.peer_id: c.per_block_s for c in planner.candidates()}
    assert costs[names["liar"]] >= costs[names["honest"]]
    assert route == ["honest"] or costs[names["liar"]] == costs[names["honest"]]


def test_a_slow_hop_is_routed_around_after_its_steps_are_measured():
    spans = {"a": ((0, 15), 900.0), "b": ((15, 30), 900.0), "a2": ((0, 15), 900.0)}
    planner, names, clock = _planner(spans)
    first = _route(planner, names)
    slow = first[0]
    other = "a2" if slow == "a" else "a"
    _step(planner, names, [(slow, 0, 15), ("b", 15, 30)], [200.0, 15.0], 0.220)
    assert _route(planner, names) == [other, "b"]


# --- bans ----------------------------------------------------------------------------------


def test_misbehaving_hop_is_banned_with_expiry_and_doubling():
    spans = {"a": ((0, 30), 900.0), "b": ((0, 30), 500.0)}
    planner, names, clock = _planner(spans, trust=TrustConfig(ban_s=10.0))
    hop = RemoteHop("http://x", 0, 30, names["a"])
    assert _route(planner, names) == ["a"]
    error = PeerUnavailable("a closed the connection")
    error.hop = hop
    planner.penalize(error)
    assert _route(planner, names) == ["b"]
    clock.now += 11
    assert _route(planner, names) == ["a"]  # served its ban
    planner.penalize(error)
    clock.now += 11
    assert _route(planner, names) == ["b"]  # second strike: 20 s
    clock.now += 10
    assert _route(planner, names) == ["a"]


@pytest.mark.parametrize("error", [Busy("full"), ShuttingDown("leaving")], ids=["busy", "shutting_down"])
def test_capacity_and_leaving_are_not_misbehaviour(error):
    planner, names, _ = _planner({"a": ((0, 30), 900.0), "b": ((0, 30), 500.0)})
    error.hop = RemoteHop("http://x", 0, 30, names["a"])
    planner.penalize(error)
    assert planner.measurements.banned(planner.clock()) == frozenset()


def test_malformed_frames_ban_their_hop():
    planner, names, _ = _planner({"a": ((0, 30), 900.0), "b": ((0, 30), 500.0)})
    error = BadRequest("a sent a malformed message")
    error.hop = RemoteHop("http://x", 0, 30, names["a"])
    planner.penalize(error)
    assert planner.measurements.banned(planner.clock()) == {names["a"]}


def test_bans_give_way_when_they_are_all_that_blocks_a_route():
    planner, names, _ = _planner({"a": ((0, 15), 900.0), "b": ((15, 30), 900.0)})
    for name in ("a", "b"):
        error = PeerUnavailable("crashed")
        error.hop = RemoteHop("http://x", 0, 15, names[name])
        planner.penalize(error)
    assert _route(planner, names) == ["a", "b"]
    with pytest.raises(NoRoute):  # a generation's own exclusions stay hard
        planner.plan(exclude=frozenset({names["a"]}))


# --- concurrent sessions spread over replicas (data parallel) ------------------------------


def _lease(planner: Planner, names: dict[str, str]):
    """A session on the planner's current best route: its lease and the route's names."""
    route = _route(planner, names)
    lease = planner.lease()
    lease.move(names[n] for n in route)
    return lease, route


def test_a_lone_session_takes_the_fastest_route_and_concurrent_ones_spread():
    planner, names, _ = _planner({"fast": ((0, 30), 1000.0), "slow": ((0, 30), 500.0)})
    assert _route(planner, names) == ["fast"]
    sessions = [_lease(planner, names) for _ in range(12)]
    spread = Counter(route[0] for _, route in sessions)
    assert spread == {"fast": 8, "slow": 4}  # in proportion to speed: (1 + 7) / 1000 = (1 + 3) / 500
    for lease, _ in sessions:
        lease.end()
    assert planner.occupancy == Counter()
    assert _route(planner, names) == ["fast"]  # closed sessions weigh nothing


def test_sessions_spread_over_split_routes_and_a_whole_replica():
    planner, names, _ = _planner({"a": ((0, 15), 900.0), "b": ((15, 30), 900.0), "whole": ((0, 30), 900.0)})
    routes = [_lease(planner, names)[1] for _ in range(4)]
    assert sorted(map(tuple, routes)) == [("a", "b"), ("a", "b"), ("whole",), ("whole",)]
    assert planner.occupancy == {names["a"]: 2, names["b"]: 2, names["whole"]: 2}


def test_spreading_can_be_turned_off():
    planner, names, _ = _planner({"fast": ((0, 30), 1000.0), "slow": ((0, 30), 500.0)})
    planner.config = ClientConfig(spread_penalty=0.0, transport=planner.config.transport)
    assert {_lease(planner, names)[1][0] for _ in range(8)} == {"fast"}


def test_batch_routes_spread_around_open_sessions():
    planner, names, _ = _planner({"a": ((0, 30), 900.0), "b": ((0, 30), 900.0)})
    _, (first,) = _lease(planner, names)
    by_id = {v: k for k, v in names.items()}
    (route,) = planner.plan_routes(1)
    assert by_id[route.peers[0]] != first


def test_occupancy_scales_compute_only():
    planner, names, _ = _planner({"a": ((0, 30), 1000.0)})
    (plain,) = planner.candidates()
    (busy,) = occupied([plain], Counter({names["a"]: 3}), 0.5)
    assert busy.per_block_s == pytest.approx(plain.per_block_s * 2.5) and busy.rtt_s == plain.rtt_s
    with pytest.raises(ValueError):
        ClientConfig(spread_penalty=float("nan"))


class _FakeSession:
    """Stands in for `RouteSession` where only the planning is under test: opening waits on `gate`."""

    gate: asyncio.Event  # set per test, in a subclass (`fake_sessions`)
    refuse: set[str]

    def __init__(self, http, hops, digest, max_length, config, transport) -> None:
        self.route = list(hops)

    async def __aenter__(self):
        await self.gate.wait()
        refused = next((h for h in self.route if h.peer_id in self.refuse), None)
        if refused is not None:
            error = Busy("full")
            error.hop = refused
            raise error
        return self

    async def close(self) -> None:
        pass

    async def replace(self, failed, hops, prefix) -> None:
        at = self.route.index(failed)
        self.route[at : at + 1] = hops


@pytest.fixture
def fake_sessions(monkeypatch):
    """(a planner over `spans` that opens `_FakeSession`s and never re-reads the swarm, the session class)."""

    class Session(_FakeSession):
        gate = asyncio.Event()
        refuse: ClassVar[set[str]] = set()

    async def no_refresh(http, force=False):
        pass

    monkeypatch.setattr("client.planner.RouteSession", Session)

    def planner_of(spans):
        planner, names, _ = _planner(spans)
        monkeypatch.setattr(planner, "refresh", no_refresh)
        return planner, names

    return planner_of, Session


async def test_sessions_opening_at_once_see_each_other(fake_sessions):
    """16 generations starting in the same instant (a burst of API requests): each is counted when its
    route is planned, before its open is awaited, so they do not all plan the same route."""
    planner_of, sessions = fake_sessions
    planner, names = planner_of({"a": ((0, 30), 900.0), "b": ((0, 30), 900.0)})
    by_id = {v: k for k, v in names.items()}
    blocks = [FailoverBlocks(planner, None, 64) for _ in range(16)]
    starting = [asyncio.create_task(b.start()) for b in blocks]
    await asyncio.sleep(0)
    sessions.gate.set()
    await asyncio.gather(*starting)
    assert Counter(by_id[b.session.route[0].peer_id] for b in blocks) == {"a": 8, "b": 8}
    for b in blocks:
        await b.close()
    assert planner.occupancy == Counter()


async def test_a_refused_or_cancelled_open_holds_nothing(fake_sessions):
    planner_of, sessions = fake_sessions
    planner, names = planner_of({"a": ((0, 30), 1000.0), "b": ((0, 30), 500.0)})
    sessions.refuse.add(names["a"])
    sessions.gate.set()
    blocks = FailoverBlocks(planner, None, 64)
    await blocks.start()  # a refuses: planned around
    assert planner.occupancy == {names["b"]: 1}
    await blocks.close()
    sessions.gate = asyncio.Event()
    opening = asyncio.create_task(FailoverBlocks(planner, None, 64).start())
    await asyncio.sleep(0)
    assert sum(planner.occupancy.values()) == 1  # counted while it opens
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert planner.occupancy == Counter()


async def test_occupancy_follows_splices_and_reroutes(fake_sessions):
    planner_of, sessions = fake_sessions
    planner, names = planner_of({"a": ((0, 15), 900.0), "b": ((15, 30), 900.0), "a2": ((0, 15), 800.0), "whole": ((0, 30), 100.0)})
    sessions.gate.set()
    blocks = FailoverBlocks(planner, None, 64)
    await blocks.start()
    assert planner.occupancy == {names["a"]: 1, names["b"]: 1}
    dead = blocks.session.route[0]
    error = PeerUnavailable("a died")
    error.hop = dead
    await blocks._recover(error, torch.zeros(0, 8))  # splice: a2 takes a's blocks
    assert planner.occupancy == {names["a2"]: 1, names["b"]: 1}
    error = PeerUnavailable("b died")
    error.hop = blocks.session.route[1]
    await blocks._recover(error, torch.zeros(0, 8))  # splice: only whole has b's blocks
    assert planner.occupancy == {names["a2"]: 1, names["whole"]: 1}
    first = blocks.session
    await blocks._recover(PeerUnavailable("the route broke somewhere"), torch.zeros(0, 8))  # no hop named: a whole new route
    assert blocks.session is not first and blocks.failovers[-1].how == "reroute"
    assert planner.occupancy == Counter(h.peer_id for h in blocks.session.route)
    await blocks.close()
    assert planner.occupancy == Counter()


def test_failover_does_not_import_swarm():
    """client/failover.py and client/swarm.py share client/planner.py instead of importing each other."""
    code = "import sys, client.failover; assert 'client.swarm' not in sys.modules, 'cycle'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open("client/failover.py") as source:
        assert "client.swarm" not in source.read()
