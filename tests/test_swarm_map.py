"""The swarm map's snapshot (client/swarm_map.py) and the watch's pure parts (client/watch.py), without a network."""

from __future__ import annotations

import json
from typing import Any

import pytest

from client.live import HopSpan, LiveGenerations
from client.swarm_map import coverage, snapshot, steady
from client.watch import PeerHealth, Report, WatchConfig, parse_info
from swarm.identity import Identity
from swarm.records import PeerRecord

NOW = 1_700_000_000.0
MODEL = {"architecture": "llama", "shape": "L30-d576-ff1536-h9-kv3-v49152", "digest": "0123456789abcdef" * 2}


@pytest.fixture(scope="module")
def identities() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def record(identity: Identity, span: tuple[int, int] | None, **fields: Any) -> PeerRecord:
    defaults: dict[str, Any] = {"addresses": ["http://10.0.0.1:31337"], "model": MODEL, "num_layers": 30, "throughput": 25.0, "load": 0.25}
    return PeerRecord.create(identity, now=NOW, ttl=60.0, span=span, **{**defaults, **fields})


def up(rtt_s: float = 0.002, **report: Any) -> PeerHealth:
    health = PeerHealth(since=NOW - 10)
    health.answered(rtt_s, Report(**report), NOW - 5)
    return health


def down(reason: str = "ClientConnectorError") -> PeerHealth:
    health = up()
    health.failed(reason, NOW - 1)
    return health


def test_three_live_nodes_cover_the_model(identities: list[Identity]) -> None:
    a, b, c, _ = identities
    records = [record(c, (20, 30)), record(a, (0, 10)), record(b, (10, 20))]
    health = {r.peer_id: up(load=0.5, sessions=1, max_sessions=8, throughput=40.0) for r in records}
    snap = snapshot(30, "smollm2", records, health, [], now=NOW, monotonic_now=0.0)

    assert [n["span"] for n in snap["nodes"]] == [[0, 10], [10, 20], [20, 30]]  # drawn in block order
    assert snap["covered"] == 30 and snap["holes"] == [] and snap["coverage"] == [1] * 30
    node = snap["nodes"][0]
    assert node["peer_id"] == a.peer_id and node["short"] == a.peer_id[:8] and node["state"] == "up"
    assert node["load"] == 0.5 and node["sessions"] == 1 and node["max_sessions"] == 8 and node["claimed_blocks_per_s"] == 40.0
    assert node["rtt_ms"] == 2.0 and node["for_s"] == 5.0 and node["measured_blocks_per_s"] is None
    json.dumps(snap)  # JSON-able as is


def test_a_dead_node_leaves_a_hole_though_its_record_lives(identities: list[Identity]) -> None:
    a, b, c, _ = identities
    records = [record(a, (0, 10)), record(b, (10, 20)), record(c, (20, 30))]
    health = {a.peer_id: up(), b.peer_id: down("no answer in 1.5 s"), c.peer_id: up()}
    snap = snapshot(30, "m", records, health, [], now=NOW, monotonic_now=0.0)

    assert snap["holes"] == [[10, 20]] and snap["covered"] == 20
    dead = next(n for n in snap["nodes"] if n["peer_id"] == b.peer_id)
    assert dead["state"] == "down" and dead["reason"] == "no answer in 1.5 s" and dead["for_s"] == 1.0


def test_only_up_nodes_count_unknown_and_leaving_do_not(identities: list[Identity]) -> None:
    a, b, c, d = identities
    leaving = up(leaving=True)
    records = [record(a, (0, 15)), record(b, (10, 30)), record(c, (0, 30)), record(d, (5, 25))]
    health = {a.peer_id: up(), b.peer_id: leaving, d.peer_id: up()}  # c not probed yet
    snap = snapshot(30, "m", records, health, [], now=NOW, monotonic_now=0.0)

    states = {n["peer_id"]: n["state"] for n in snap["nodes"]}
    assert states == {a.peer_id: "up", b.peer_id: "leaving", c.peer_id: "unknown", d.peer_id: "up"}
    assert snap["coverage"] == [1] * 5 + [2] * 10 + [1] * 10 + [0] * 5
    assert snap["holes"] == [[25, 30]]


def test_records_without_span_or_of_another_size_are_not_drawn(identities: list[Identity]) -> None:
    a, b, c, _ = identities
    records = [record(a, None), record(b, (0, 12), num_layers=12), record(c, (0, 30))]
    snap = snapshot(30, "m", records, {c.peer_id: up()}, [], now=NOW, monotonic_now=0.0)
    assert [n["peer_id"] for n in snap["nodes"]] == [c.peer_id] and snap["covered"] == 30


def test_live_sessions_are_routes_of_spans_and_count_per_node(identities: list[Identity]) -> None:
    a, b, c, _ = identities
    records = [record(a, (0, 10)), record(b, (10, 30)), record(c, (0, 30))]
    live = LiveGenerations()
    with live.track("chat", 12) as first, live.track("completion", 3) as second:
        first.follow([HopSpan(a.peer_id, 0, 10), HopSpan(b.peer_id, 10, 30)])
        first.new_tokens = 7
        second.follow([HopSpan(c.peer_id, 0, 30)])
        snap = snapshot(30, "m", records, {r.peer_id: up() for r in records}, live.snapshot(), now=NOW, monotonic_now=first.started + 2.5)

    route = snap["sessions"][0]
    assert route["id"] == first.id and route["kind"] == "chat" and route["tokens"] == 7 and route["age_s"] == 2.5
    assert [(h["short"], h["start"], h["end"]) for h in route["hops"]] == [(a.peer_id[:8], 0, 10), (b.peer_id[:8], 10, 30)]
    assert [h["peer_id"] for h in snap["sessions"][1]["hops"]] == [c.peer_id]
    assert {n["peer_id"]: n["live_sessions"] for n in snap["nodes"]} == {a.peer_id: 1, b.peer_id: 1, c.peer_id: 1}


def test_measured_speed_is_blocks_per_second(identities: list[Identity]) -> None:
    a, *_ = identities
    records = [record(a, (0, 30), throughput=1e9)]  # a claim is only shown as a claim
    snap = snapshot(30, "m", records, {a.peer_id: up()}, [], {a.peer_id: 0.004}, now=NOW, monotonic_now=0.0)
    assert snap["nodes"][0]["measured_blocks_per_s"] == 250.0 and snap["nodes"][0]["claimed_blocks_per_s"] == 1e9


def test_coverage_clips_spans_to_the_model() -> None:
    assert coverage(4, [(-3, 2), (3, 99), (1, 2)]) == [1, 2, 0, 1]


def test_steady_ignores_round_trips_and_ages(identities: list[Identity]) -> None:
    a, *_ = identities
    records = [record(a, (0, 30))]
    first = snapshot(30, "m", records, {a.peer_id: up(0.001)}, [], now=NOW, monotonic_now=0.0)
    later = snapshot(30, "m", records, {a.peer_id: up(0.009)}, [], now=NOW + 3, monotonic_now=0.0)
    assert first != later and steady(first) == steady(later)
    failed = snapshot(30, "m", records, {a.peer_id: down()}, [], now=NOW, monotonic_now=0.0)
    assert steady(failed) != steady(first)


# --- the watch's health and what it accepts of /info -----------------------------------------------


def test_health_moves_between_up_and_down_and_keeps_since() -> None:
    health = PeerHealth(since=1.0)
    health.answered(0.01, Report(load=0.1), 2.0)
    assert (health.state, health.since, health.live) == ("up", 2.0, True)
    health.answered(0.02, Report(load=0.2), 4.0)
    assert health.since == 2.0 and health.rtt_s == 0.02  # still up since the first answer
    health.failed("ConnectionRefusedError", 6.0)
    assert (health.state, health.since, health.live, health.reason) == ("down", 6.0, False, "ConnectionRefusedError")
    health.answered(0.01, Report(leaving=True), 8.0)
    assert (health.state, health.since, health.reason) == ("leaving", 8.0, "")


def test_parse_info_keeps_checked_claims() -> None:
    info = {"peer_id": "p1", "load": 0.5, "sessions": 3, "max_sessions": 16, "throughput": 120.5, "shutting_down": False}
    assert parse_info(info, "p1") == Report(load=0.5, sessions=3, max_sessions=16, throughput=120.5, leaving=False)


@pytest.mark.parametrize(
    "info",
    [
        [],
        "x",
        None,
        {"peer_id": "someone-else", "load": 0.1},  # another peer answers at this address
        {"load": 0.1},
    ],
)
def test_parse_info_refuses_what_is_not_this_peers_info(info: object) -> None:
    with pytest.raises(ValueError):
        parse_info(info, "p1")


def test_parse_info_clamps_or_drops_hostile_numbers() -> None:
    info = {"peer_id": "p1", "load": 1e300, "sessions": -5, "max_sessions": "many", "throughput": float("nan"), "shutting_down": "yes"}
    assert parse_info(info, "p1") == Report(load=1.0, sessions=0, max_sessions=None, throughput=None, leaving=False)
    assert parse_info({"peer_id": "p1", "sessions": True, "throughput": 1e300}, "p1") == Report(sessions=None, throughput=1e12)


@pytest.mark.parametrize("field,value", [("period_s", 0.0), ("timeout_s", float("inf")), ("max_peers", 0), ("concurrency", 0), ("max_info_bytes", 0)])
def test_watch_config_refuses_nonsense(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        WatchConfig(**{field: value})
