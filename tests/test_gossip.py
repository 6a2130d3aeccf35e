"""Gossip over real sockets on 127.0.0.1: convergence, expiry, goodbyes and forged input.

Each simulated node is an in-process aiohttp app (`peers_routes`) on port 0 with its own
identity, table and `Gossip` loop; its record carries its real URL and a real signature.
Waits are on gossip rounds (`Gossip.wait_rounds`) under a deadline, never fixed sleeps.
Measured times are logged at INFO (`-o log_cli=true --log-cli-level=INFO` shows them).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence

import aiohttp
import msgpack
import pytest
from aiohttp import web

from swarm import wire
from swarm.discovery.exchange import exchange
from swarm.discovery.gossip import Gossip, GossipConfig
from swarm.discovery.peers_http import fetch_peers, peers_routes
from swarm.discovery.proof import PROOF_PATH, ProofConfig, Prover, check_proof, proof_answer
from swarm.errors import BadRequest, PeerUnavailable, SignatureInvalid
from swarm.identity import Identity
from swarm.peers import PeerTable, TableConfig
from swarm.records import PeerRecord, verify_record

log = logging.getLogger(__name__)

PERIOD = 0.2  # seconds between gossip rounds
TTL = 2.0  # record lifetime in the expiry test
LONG_TTL = 30.0  # so that nothing expires during a test that is not about expiry
DEADLINE = 10.0  # for anything awaited
NUM_LAYERS = 30
MODEL = {"architecture": "llama", "shape": "L30-d576", "digest": "0123456789abcdef" * 2}
NOW = 1_700_000_000.0


def make(
    identity: Identity, *, now: float, ttl: float = LONG_TTL, url: str = "http://127.0.0.1:9", **fields: object
) -> PeerRecord:
    return PeerRecord.create(identity, addresses=[url], now=now, ttl=ttl, **fields)  # type: ignore[arg-type]


# --- the table keeps tombstones (pure) ---------------------------------------------------------


def test_leaving_is_signed_and_round_trips() -> None:
    alice = Identity.generate()
    tombstone = make(alice, now=NOW, leaving=True)
    assert tombstone.leaving and not make(alice, now=NOW).leaving
    assert PeerRecord.from_bytes(tombstone.to_bytes()) == tombstone
    verify_record(tombstone, NOW)
    with pytest.raises(SignatureInvalid):
        verify_record(replace(tombstone, leaving=False), NOW)  # nobody can revive a peer by flipping the flag
    with pytest.raises(SignatureInvalid):
        verify_record(replace(make(alice, now=NOW), leaving=True), NOW)  # nor make it leave


def test_tombstone_hides_the_peer_and_refuses_replays_until_it_expires() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    table = PeerTable()
    live = make(alice, now=NOW, model=MODEL, num_layers=NUM_LAYERS, span=(0, 10))
    assert table.merge(live, NOW) and table.merge(make(bob, now=NOW), NOW)
    assert table.coverage(MODEL["digest"], NUM_LAYERS, NOW)[0] == 1

    tombstone = make(alice, now=NOW + 1, ttl=LONG_TTL, model=MODEL, num_layers=NUM_LAYERS, span=(0, 10), leaving=True)
    assert table.merge(tombstone, NOW + 1)
    assert [r.peer_id for r in table.records(NOW + 1)] == [bob.peer_id]
    assert table.coverage(MODEL["digest"], NUM_LAYERS, NOW + 1) == [0] * NUM_LAYERS
    assert len(table) == 1 and alice.peer_id not in table and table.get(alice.peer_id) is None
    assert table.versions()[alice.peer_id] == NOW + 1  # gossip still carries it
    assert not table.merge(live, NOW + 2) and table.refused["stale"] == 1  # a replay does not revive the peer
    assert alice.peer_id not in table

    other = PeerTable()  # a table that never heard the goodbye hears it by gossip
    other.merge(live, NOW)
    exchange(table, other, NOW + 2)
    assert alice.peer_id not in other and len(other) == 1

    back = make(alice, now=NOW + 5)  # the peer restarts: a newer live record
    assert table.merge(back, NOW + 5) and table.get(alice.peer_id) == back and len(table) == 2
    assert table.merge(make(alice, now=NOW + 6, leaving=True), NOW + 6)
    assert sorted(table.expire(NOW + 6 + LONG_TTL)) == sorted([alice.peer_id, bob.peer_id])  # the tombstone too
    assert table.versions() == {} and len(table) == 0
    assert not table.remove(alice.peer_id)


def test_config_checks_its_values() -> None:
    assert GossipConfig(bootstrap=("http://127.0.0.1:8000/",)).bootstrap == ("http://127.0.0.1:8000",)
    for bad in (
        {"bootstrap": "http://127.0.0.1:8000"},
        {"bootstrap": ("127.0.0.1:8000",)},
        {"period_s": 0},
        {"fanout": 0},
        {"record_ttl_s": 5.0, "period_s": 5.0},
        {"max_frame": 100},
    ):
        with pytest.raises(ValueError):
            GossipConfig(**bad)  # type: ignore[arg-type]


# --- simulated nodes ----------------------------------------------------------------------------


@dataclass
class Sim:
    """One simulated node: its server, table and gossip loop, closed by `stop`."""

    identity: Identity
    table: PeerTable
    url: str
    gossip: Gossip
    stack: AsyncExitStack

    async def stop(self) -> None:
        await self.stack.aclose()  # gossip first (a goodbye, if it has a farewell), then the server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def serve(stack: AsyncExitStack, routes: Sequence[web.RouteDef]) -> str:
    """Serve `routes` on 127.0.0.1, a free port; the URL. Closed with `stack`."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}"


async def start_sim(
    http: aiohttp.ClientSession,
    *,
    bootstrap: Sequence[str] = (),
    ttl: float = LONG_TTL,
    identity: Identity | None = None,
    span: tuple[int, int] = (0, NUM_LAYERS),
    farewell: bool = False,
    proof: bool = False,
) -> Sim:
    """One node; with `proof`, its table holds new peers pending until a `Prover` proves them."""
    identity = identity or Identity.generate()
    table = PeerTable(TableConfig(require_proof=proof))
    stack = AsyncExitStack()
    url = await serve(stack, peers_routes(table, identity=identity))

    def record(leaving: bool = False) -> PeerRecord:  # re-signed every round, as a node does
        return make(identity, now=time.time(), ttl=ttl, url=url, model=MODEL, num_layers=NUM_LAYERS, span=span, leaving=leaving)

    config = GossipConfig(bootstrap=tuple(bootstrap), period_s=PERIOD, fanout=2, timeout_s=1.0, record_ttl_s=ttl)
    gossip = Gossip(config, table, record, http, farewell=(lambda: record(leaving=True)) if farewell else None)
    if proof:
        table.merge(record(), time.time(), source="self")
        await stack.enter_async_context(Prover(table, http, ProofConfig(timeout_s=1.0)))
    await stack.enter_async_context(gossip)
    return Sim(identity, table, url, gossip, stack)


async def start_swarm(http: aiohttp.ClientSession, count: int, **options: object) -> list[Sim]:
    """`count` nodes; the first is the only bootstrap peer of the others. Node i serves 6 blocks."""
    first = await start_sim(http, span=(0, 6), **options)  # type: ignore[arg-type]
    rest = [await start_sim(http, bootstrap=[first.url], span=(6 * i, 6 * i + 6), **options) for i in range(1, count)]  # type: ignore[arg-type]
    return [first, *rest]


async def until(condition: Callable[[], bool], gossip: Gossip, deadline: float = DEADLINE) -> float:
    """Seconds until `condition` holds, checked after each round of `gossip`."""
    start = time.monotonic()
    async with asyncio.timeout(deadline):
        while not condition():
            await gossip.wait_rounds()
    return time.monotonic() - start


def peer_ids(sim: Sim) -> set[str]:
    return {record.peer_id for record in sim.table.records(time.time())}


# --- gossip over sockets ----------------------------------------------------------------------


async def test_five_gossipers_converge_through_one_bootstrap_peer(http: aiohttp.ClientSession) -> None:
    sims = await start_swarm(http, 5)
    try:
        everyone = {sim.identity.peer_id: sim.url for sim in sims}
        elapsed = await until(lambda: all(peer_ids(sim) == set(everyone) for sim in sims), sims[0].gossip)
        log.info("5 gossipers converged in %.2f s (period %.1f s, rounds %s)", elapsed, PERIOD, [s.gossip.rounds for s in sims])
        assert elapsed < 5 * PERIOD * 1.1 + 1.0
        for sim in sims:
            assert {r.peer_id: r.addresses[0] for r in sim.table.records(time.time())} == everyone
            assert sim.table.coverage(MODEL["digest"], NUM_LAYERS, time.time()) == [1] * NUM_LAYERS
            assert sim.gossip.failures == 0
            assert set(sim.table.refused) <= {"stale"}  # a partner's older copy of a record: normal lag
    finally:
        for sim in reversed(sims):
            await sim.stop()


async def test_stopped_gossiper_expires_everywhere_and_comes_back(http: aiohttp.ClientSession) -> None:
    sims = await start_swarm(http, 5, ttl=TTL)
    first, others, victim = sims[0], sims[:4], sims[4]
    try:
        await until(lambda: all(len(peer_ids(sim)) == 5 for sim in sims), first.gossip)
        await victim.stop()  # no farewell: as if it crashed
        gone = await until(lambda: all(victim.identity.peer_id not in peer_ids(sim) for sim in others), first.gossip)
        log.info("a stopped gossiper expired from every table in %.2f s (ttl %.1f s)", gone, TTL)
        assert TTL - 2 * PERIOD * 1.1 - 0.1 < gone < TTL + 2 * PERIOD * 1.1 + 0.5
        assert sum(sim.gossip.failures for sim in others) > 0  # some tried to reach it meanwhile
        await asyncio.gather(*(sim.gossip.wait_rounds() for sim in others))
        assert all(victim.identity.peer_id not in sim.table.versions() for sim in others)  # expire() dropped it

        again = await start_sim(http, bootstrap=[first.url], ttl=TTL, identity=victim.identity, span=(24, 30))
        sims[4] = again

        def is_back() -> bool:
            records = [sim.table.get(victim.identity.peer_id) for sim in others]
            return all(r is not None and r.addresses[0] == again.url for r in records) and len(peer_ids(again)) == 5

        back = await until(is_back, first.gossip)
        log.info("the restarted gossiper was back in every table in %.2f s", back)
    finally:
        for sim in reversed(sims):
            await sim.stop()


async def test_leaving_gossiper_disappears_at_once(http: aiohttp.ClientSession) -> None:
    sims = await start_swarm(http, 5, farewell=True)
    first, leaver, stayers = sims[0], sims[4], sims[:4]
    leaver_id = leaver.identity.peer_id
    try:
        await until(lambda: all(len(peer_ids(sim)) == 5 for sim in sims), first.gossip)
        old_live = first.table.get(leaver_id)
        assert old_live is not None and not old_live.leaving
        heard_at = time.monotonic()
        await leaver.stop()  # says goodbye to its bootstrap peer and 2 others
        assert leaver_id not in first.table and leaver_id in first.table.versions()
        heard = [sim for sim in stayers if leaver_id not in sim.table]
        assert len(heard) >= 3
        assert first.table.coverage(MODEL["digest"], NUM_LAYERS, time.time()) == [1] * 24 + [0] * 6
        spread = await until(lambda: all(leaver_id not in peer_ids(sim) for sim in stayers), first.gossip)
        log.info("a leaving gossiper was told to %d of 4 peers at once, gone from all in %.2f s (ttl %.0f s)",
                 len(heard), time.monotonic() - heard_at, LONG_TTL)  # fmt: skip
        assert spread < 4 * PERIOD * 1.1 + 0.5

        stale = first.table.refused["stale"]
        async with http.post(
            first.url + "/peers", data=wire.encode({"type": "peers", "records": [old_live.to_wire()]})
        ) as response:
            assert response.status == 200
        # Refused as stale (other loops still run, and a partner's older copy also counts as stale: hence >=).
        assert first.table.refused["stale"] >= stale + 1 and leaver_id not in first.table
    finally:
        for sim in reversed(sims):
            await sim.stop()


async def test_failing_peers_are_counted_and_the_loop_goes_on(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as stack:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
        writers: list[asyncio.StreamWriter] = []

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)  # accept, read nothing, answer nothing

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)

        def hang_up() -> None:
            for writer in writers:
                writer.close()

        stack.callback(hang_up)
        silent = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

        async def nonsense(request: web.Request) -> web.Response:
            return web.Response(body=b"<html>not a peer</html>")

        garbage = await serve(stack, [web.post("/peers", nonsense)])
        not_found = await serve(stack, [])
        table = PeerTable()
        me = Identity.generate()
        config = GossipConfig(bootstrap=(dead, silent, garbage, not_found), period_s=PERIOD, timeout_s=0.3, record_ttl_s=TTL)
        async with Gossip(config, table, lambda: make(me, now=time.time(), ttl=TTL), http) as gossip:
            async with asyncio.timeout(DEADLINE):
                await gossip.wait_rounds(2)
            assert gossip.failures >= 4  # all four bootstrap peers on the announcement
            assert [r.peer_id for r in table.records(time.time())] == [me.peer_id]


# --- forged and malformed input ------------------------------------------------------------


async def post(http: aiohttp.ClientSession, url: str, body: object, **headers: str) -> tuple[int, dict]:
    async with http.post(url + "/peers", data=body, headers=headers) as response:
        return response.status, wire.decode(await response.read())


def peers_frame(*records: object) -> bytes:
    return wire.encode({"type": "peers", "records": list(records)})


async def test_forged_and_malformed_pushes_are_refused_and_serving_goes_on(http: aiohttp.ClientSession) -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    now = time.time()
    table = PeerTable()
    known = make(Identity.generate(), now=now)
    table.merge(known, now)
    claimed = replace(make(alice, now=now), peer_id=bob.peer_id)
    good = make(alice, now=now)
    oversized = {**good.to_wire(), "addresses": ["http://" + "a" * 300 + ":1"]}
    record_cases: list[tuple[str, object]] = [
        ("signature_invalid", {**good.to_wire(), "signature": bytes([good.signature[0] ^ 1]) + good.signature[1:]}),
        ("peer_id_mismatch", replace(claimed, signature=alice.sign(claimed.signing_payload())).to_wire()),
        ("expired", make(bob, now=now - 100, ttl=10).to_wire()),
        ("future", make(bob, now=now + 3600).to_wire()),
        ("stale", make(carol, now=now - 5).to_wire()),  # after carol's newer record below
        ("oversized", oversized),
        ("malformed", {"peer_id": "x", "signature": b""}),
    ]
    frame_cases: list[tuple[str, int, bytes | AsyncIterator[bytes], dict[str, str]]] = [
        ("bad_request", 400, b"\xc1 not msgpack", {}),
        ("unsupported_version", 400, msgpack.packb({"type": "peers", "records": [], "v": 99}), {}),
        ("bad_request", 400, wire.encode({"type": "hello", "records": []}), {}),
        ("bad_request", 400, wire.encode({"type": "peers", "records": "all of them"}), {}),
        ("bad_request", 400, peers_frame(*[{}] * 4097), {}),
        ("frame_too_large", 413, b"\x00" * (2 << 20), {}),  # refused on its Content-Length
        ("frame_too_large", 413, chunks(b"\x00" * (1 << 16), 20), {}),  # chunked: refused while read
    ]
    async with AsyncExitStack() as stack:
        url = await serve(stack, peers_routes(table))
        status, reply = await post(http, url, peers_frame(make(carol, now=now).to_wire()))
        assert status == 200 and [r["peer_id"] for r in reply["records"]] == [known.peer_id]

        async def still_serving() -> None:
            fresh = make(Identity.generate(), now=time.time())
            status, reply = await post(http, url, peers_frame(fresh.to_wire()))
            assert status == 200 and fresh.peer_id in table and reply["type"] == "peers"

        for reason, raw in record_cases:
            before = table.refused[reason]
            peers = len(table)
            status, reply = await post(http, url, peers_frame(raw))
            assert status == 200 and reply["type"] == "peers", reason  # the frame was fine, its record was not
            assert table.refused[reason] == before + 1, reason
            assert len(table) == peers, reason
            await still_serving()
        assert bob.peer_id not in table and table.get(carol.peer_id).issued_at == now  # type: ignore[union-attr]

        for code, expected, body, headers in frame_cases:
            before = table.refused[code]
            status, reply = await post(http, url, body, **headers)
            assert (status, reply["type"], reply["code"]) == (expected, "error", code)
            assert table.refused[code] == before + 1, code
            await still_serving()

        fetched = await fetch_peers(http, url, timeout=1.0)
        assert [r.peer_id for r in fetched] == [r.peer_id for r in table.records(time.time())]
        assert len(fetched) == len(table) == 2 + len(record_cases) + len(frame_cases)  # known, carol, one per still_serving


async def chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield chunk


async def test_fetch_peers_drops_bad_records_and_raises_typed_errors(http: aiohttp.ClientSession) -> None:
    now = time.time()
    good, leaving = make(Identity.generate(), now=now), make(Identity.generate(), now=now, leaving=True)
    forged = {**good.to_wire(), "load": 0.5}  # changed after signing

    async def lying(request: web.Request) -> web.Response:
        return web.Response(body=peers_frame(forged, good.to_wire(), leaving.to_wire(), 7))

    async with AsyncExitStack() as stack:
        url = await serve(stack, [web.get("/peers", lying)])
        refused: Counter[str] = Counter()
        assert await fetch_peers(http, url + "/", timeout=1.0, refused=refused) == [good]
        assert refused == {"signature_invalid": 1, "malformed": 1}  # the tombstone is dropped, not refused
        with pytest.raises(PeerUnavailable):
            await fetch_peers(http, await serve(stack, []), timeout=1.0)  # 404: not a peer
    with pytest.raises(PeerUnavailable):
        await fetch_peers(http, url, timeout=1.0)  # closed


async def test_frames_stay_within_their_limits(http: aiohttp.ClientSession) -> None:
    now = time.time()
    table = PeerTable()
    for _ in range(40):
        assert table.merge(make(Identity.generate(), now=now, model=MODEL, num_layers=NUM_LAYERS, span=(0, 1)), now)
    size = len(table.records(now)[0].to_bytes())
    async with AsyncExitStack() as stack:
        url = await serve(stack, peers_routes(table, max_frame=8 * 1024, max_records=30))
        async with http.get(url + "/peers") as response:
            frame = await response.read()
        assert len(frame) <= 8 * 1024 and len(wire.decode(frame)["records"]) == (8 * 1024 - 64) // size
        assert len(await fetch_peers(http, url, timeout=1.0)) == (8 * 1024 - 64) // size
        capped = await serve(stack, peers_routes(table, max_records=30))
        assert len(await fetch_peers(http, capped, timeout=1.0, max_records=30)) == 30
        with pytest.raises(BadRequest):
            await fetch_peers(http, capped, timeout=1.0, max_records=29)  # the client's own limit


# --- proofs of address and key -----------------------------------------------------------------


async def test_proving_gossipers_converge_and_never_dial_unproven_records(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as stack:
        posts: list[str] = []

        async def record_post(request: web.Request) -> web.Response:
            posts.append(request.path)  # a listener that knows no key: it must never get gossip
            return web.Response(status=404)

        async def no_key(request: web.Request) -> web.Response:
            return web.Response(body=wire.encode({"type": "proof", "peer_id": "x", "addresses": [], "signature": b""}))

        trap = await serve(stack, [web.post("/peers", record_post), web.get(PROOF_PATH, no_key)])
        sims = await start_swarm(http, 4, proof=True)
        for sim in sims:
            stack.push_async_callback(sim.stop)
        everyone = {sim.identity.peer_id for sim in sims}
        sybils = [make(Identity.generate(), now=time.time(), url=trap) for _ in range(20)]
        sybils += [make(Identity.generate(), now=time.time(), url=sims[1].url) for _ in range(5)]  # another peer's address
        status, _ = await post(http, sims[0].url, peers_frame(*(r.to_wire() for r in sybils)))
        assert status == 200
        took = await until(lambda: all(peer_ids(sim) == everyone for sim in sims), sims[0].gossip)
        log.info("4 proving gossipers converged in %.2f s", took)
        for sim in sims:
            await sim.gossip.wait_rounds(2)
        assert all(peer_ids(sim) == everyone for sim in sims)  # no Sybil was ever listed, nor gossiped on
        assert posts == []  # nobody pushed gossip to an address that did not prove its key
        assert sims[0].table.refused["proof_failed"] == len(sybils) and sims[0].table.pending() == []


async def test_the_proof_endpoint_signs_its_own_addresses_only(http: aiohttp.ClientSession) -> None:
    me, relay = Identity.generate(), Identity.generate()
    own = make(me, now=time.time(), url="http://10.0.0.1:1")
    nonce = bytes(range(32))
    answer = proof_answer(me, own, nonce.hex())
    check_proof(answer, own, "http://10.0.0.1:1/", nonce)
    with pytest.raises(SignatureInvalid):
        check_proof(answer, own, "http://10.0.0.66:1", nonce)  # relayed from another address: the signed list says so
    with pytest.raises(SignatureInvalid):
        check_proof(answer, own, "http://10.0.0.1:1", bytes(32))  # an old answer for another nonce
    with pytest.raises(SignatureInvalid):
        check_proof(proof_answer(relay, own, nonce.hex()), own, "http://10.0.0.1:1", nonce)  # another key
    async with AsyncExitStack() as stack:
        table = PeerTable()
        url = await serve(stack, peers_routes(table, identity=me))
        async with http.get(url + PROOF_PATH, params={"nonce": nonce.hex()}) as response:
            assert response.status == 503  # no own record yet
            assert wire.decode(await response.read())["code"] == "shutting_down"
        table.merge(own, time.time(), source="self")
        for bad in ("", "zz" * 32, "00" * 31):
            async with http.get(url + PROOF_PATH, params={"nonce": bad}) as response:
                assert response.status == 400 and wire.decode(await response.read())["code"] == "bad_request"
        async with http.get(url + PROOF_PATH, params={"nonce": nonce.hex()}) as response:
            check_proof(wire.decode(await response.read()), own, "http://10.0.0.1:1", nonce)
