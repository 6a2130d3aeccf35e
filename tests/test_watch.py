"""`SwarmWatch` (client/watch.py) probing real HTTP servers on loopback: a healthy peer, one that
hangs, one that answers a flood, one that is someone else, and a closed port. Each bad peer shows
as down within one round and the round stays bounded by the probe timeout; the planner's hook
then avoids exactly the down peers. No node processes: the peers are small aiohttp apps."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web

from client.measure import Measurements
from client.watch import SwarmWatch, WatchConfig, watching
from swarm.identity import Identity
from swarm.records import PeerRecord
from swarm.transport import Transport

MODEL = {"architecture": "llama", "shape": "L30-d576-ff1536-h9-kv3-v49152", "digest": "0123456789abcdef" * 2}


class FakePlanner:
    """What the watch uses of client/planner.py's Planner."""

    def __init__(self, records: list[PeerRecord]) -> None:
        self._records = records
        self.measurements = Measurements()
        self.refreshes = 0
        self.avoid = None

    async def refresh(self, http, force: bool = False) -> None:
        self.refreshes += 1

    def records(self) -> list[PeerRecord]:
        return list(self._records)

    def address(self, record: PeerRecord) -> str | None:
        return record.addresses[0]


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/info", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(identity: Identity, url: str, span: tuple[int, int]) -> PeerRecord:
    return PeerRecord.create(identity, addresses=[url], now=time.time(), ttl=60.0, model=MODEL, num_layers=30, span=span, throughput=10.0)


@pytest.fixture
async def peers():
    ids = {name: Identity.generate() for name in ("good", "hang", "flood", "impostor", "closed")}
    release = asyncio.Event()

    async def good(request: web.Request) -> web.Response:
        return web.json_response({"peer_id": ids["good"].peer_id, "load": 0.25, "sessions": 2, "max_sessions": 8, "throughput": 99.0})

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"peer_id": ids["hang"].peer_id})

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        for _ in range(64):  # 4 MB of nothing: read only up to the limit
            await response.write(chunk)
        return response

    async def impostor(request: web.Request) -> web.Response:
        return web.json_response({"peer_id": ids["good"].peer_id, "load": 0.0})

    runners, records = [], []
    for name, handler in (("good", good), ("hang", hang), ("flood", flood), ("impostor", impostor)):
        runner, url = await serve(handler)
        runners.append(runner)
        records.append(record(ids[name], url, (0, 30)))
    records.append(record(ids["closed"], f"http://127.0.0.1:{closed_port()}", (0, 30)))
    yield ids, records
    release.set()
    for runner in runners:
        await runner.cleanup()


async def test_a_round_marks_bad_peers_down_within_its_timeout(peers) -> None:
    ids, records = peers
    planner = FakePlanner(records)
    watch = SwarmWatch(planner, Transport(insecure_http=True), WatchConfig(period_s=0.2, timeout_s=0.5, max_info_bytes=64 * 1024))
    async with Transport(insecure_http=True).client_session() as http:
        began = time.monotonic()
        await watch.round(http)
        took = time.monotonic() - began
    assert took < 0.5 * 3 + 1  # probes run at once, each bounded by the timeout (generous slack)
    state = {name: watch.health[i.peer_id].state for name, i in ids.items()}
    assert state == {"good": "up", "hang": "down", "flood": "down", "impostor": "down", "closed": "down"}
    good = watch.health[ids["good"].peer_id]
    assert good.report.load == 0.25 and good.report.sessions == 2 and good.report.throughput == 99.0 and good.rtt_s is not None
    assert planner.measurements.rtt(ids["good"].peer_id) is not None  # the probe's round trip feeds routing
    assert "no answer" in watch.health[ids["hang"].peer_id].reason
    assert "over" in watch.health[ids["flood"].peer_id].reason
    assert "another peer" in watch.health[ids["impostor"].peer_id].reason
    assert watch.down() == frozenset(i.peer_id for n, i in ids.items() if n != "good")


async def test_probes_are_bounded_per_round_and_rotate(peers) -> None:
    _, records = peers
    planner = FakePlanner(records)
    watch = SwarmWatch(planner, Transport(insecure_http=True), WatchConfig(timeout_s=0.5, max_peers=2))
    async with Transport(insecure_http=True).client_session() as http:
        await watch.round(http)
        assert len(watch.health) == 2
        await watch.round(http)
        assert len(watch.health) == 4
        await watch.round(http)
        assert len(watch.health) == 5


async def test_watching_runs_rounds_hooks_the_planner_and_forgets_gone_peers(peers) -> None:
    ids, records = peers
    planner = FakePlanner(records[:1])  # only the good peer
    watch = SwarmWatch(planner, Transport(insecure_http=True), WatchConfig(period_s=0.05, timeout_s=0.5))
    async with watching(watch):
        assert planner.avoid is not None
        while watch.rounds < 2:
            await watch.changed.wait()
        assert watch.health[ids["good"].peer_id].state == "up" and planner.avoid() == frozenset()
        planner._records = records[4:]  # the good peer's record expired; a dead one appeared
        rounds = watch.rounds
        while watch.rounds < rounds + 2:
            await watch.changed.wait()
        assert set(watch.health) == {ids["closed"].peer_id} and planner.avoid() == {ids["closed"].peer_id}
    assert planner.avoid is None and planner.refreshes >= 4


async def test_the_planner_plans_around_down_peers_while_it_can() -> None:
    from client.peers import DiscoveryOptions
    from client.planner import ClientConfig, Planner

    digest = MODEL["digest"]
    a, b = Identity.generate(), Identity.generate()
    planner = Planner(digest, 30, DiscoveryOptions(bootstrap=("http://127.0.0.1:1",)), ClientConfig(transport=Transport(insecure_http=True)))
    for identity in (a, b):
        planner.view.table.merge(record(identity, "http://127.0.0.1:9", (0, 30)), time.time(), source="bootstrap")
    planner.avoid = lambda: frozenset({a.peer_id})
    assert [h.peer_id for h in planner.plan().hops] == [b.peer_id]
    planner.avoid = lambda: frozenset({a.peer_id, b.peer_id})  # nobody else: a down peer is still better than no route
    assert len(planner.plan().hops) == 1




async def test_a_slow_bootstrap_does_not_delay_telling_a_node_died(peers) -> None:
    ids, records = peers
    planner = FakePlanner(records)
    answer = asyncio.Event()

    async def slow_refresh(http, force: bool = False) -> None:  # a bootstrap peer that takes its time
        await answer.wait()

    planner.refresh = slow_refresh
    watch = SwarmWatch(planner, Transport(insecure_http=True), WatchConfig(timeout_s=0.5))
    async with Transport(insecure_http=True).client_session() as http:
        round_ = asyncio.create_task(watch.round(http))

        async def dead_seen() -> None:  # polls in-process state: there is no event for one probe's end
            while ids["closed"].peer_id not in watch.health or watch.health[ids["closed"].peer_id].state != "down":
                await asyncio.sleep(0.05)

        await asyncio.wait_for(dead_seen(), 10)
        assert not round_.done()
        answer.set()
        await round_
    assert watch.rounds == 1
