"""Attacks on sessions, hops and pushes (issue 11, attacks 2-4), each beside a legitimate session.

Real node processes on loopback ([0,10) [10,20) [20,30), float32, no bootstrap:
nodes admit next hops by the records clients pass on). The attacker speaks raw
frames; the legitimate session's output must equal an undisturbed local run.
Per-source limits are tested from network namespaces: the attacker has its own
address, and a client at another address still gets the same greedy tokens.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time

import aiohttp
import pytest
import torch
from aiohttp import web

from client.session import RemoteHop, RouteSession, SessionConfig
from node.push import check_next_hop
from swarm import protocol, wire
from swarm.errors import BadAddress, HopNotProven
from swarm.identity import Identity
from swarm.model import Segment
from swarm.peers import PeerTable
from swarm.protocol import NextHop
from swarm.records import PeerRecord
from tests.netns import Lines
from tests.nodes import free_port, start_nodes, stop_nodes
from tests.test_node import Raw, _local, _step, open_message

SPANS = [(0, 10), (10, 20), (20, 30)]
F32 = SessionConfig(wire_dtype="float32")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    found = start_nodes([["--blocks", f"{a}:{b}"] for a, b in SPANS], tmp_path_factory.mktemp("attack"))
    yield found
    stop_nodes(found)


@pytest.fixture(scope="module")
def local_spans(checkpoint):
    from swarm.model import load_span

    return {s: load_span(checkpoint, *s) for s in SPANS}


@pytest.fixture(scope="module")
def digest(checkpoint):
    return checkpoint.fingerprint().digest


def _hops(nodes):
    return [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]


async def _record(http, node) -> PeerRecord:
    async with http.get(f"{node.url}/info") as response:
        return PeerRecord.from_bytes(base64.b64decode((await response.json())["record"]))


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 576, generator=torch.Generator().manual_seed(seed))


# --- sessions are capabilities ---------------------------------------------------------------


async def test_stranger_cannot_close_retarget_push_into_or_poison_a_session(nodes, local_spans, digest):
    x, more = _x(5, 1), _x(2, 2)
    reference = _local(local_spans, SPANS, torch.cat([x, more]))
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, _hops(nodes), digest, 32, F32) as session:
            assert torch.equal(await session.forward(x, 0, output="all"), reference[:5])
            middle = session.hops[1].session_id  # what the previous hop (any stranger there) learns from `next`
            async with Raw(http, nodes[1].url) as stranger:
                attacks = [
                    ({"type": "close", "session": middle}, "not_permitted"),
                    ({"type": "retarget", "session": middle, "next": None}, "not_permitted"),
                    (_step(middle, 5, more[:1], step=1), "not_permitted"),  # no token: not into the KV cache
                    (_step(middle, 5, more[:1], step=1, token=secrets.token_urlsafe(16)), "not_permitted"),
                    (_step(middle, 5, more[:1], step=2**62), "bad_request"),  # out of range: refused whole
                    (_step(middle, 5, more[:1], step=2**40), "not_permitted"),  # in range, no token: still nothing
                ]
                for message, code in attacks:
                    reply = await stranger.ask(message)
                    assert reply["type"] == "error" and reply["code"] == code, (message["type"], reply)
            # the owner heard nothing, and its session goes on exactly as undisturbed
            assert session.broken is None
            out = await session.forward(more[:1], 5)
            out = await session.forward(more[1:], 6)
            torch.testing.assert_close(out, reference[6:], atol=5e-4, rtol=1e-5)
            assert session.broken is None


async def test_errors_of_a_strangers_frames_never_reach_the_owner(nodes, local_spans, digest):
    x = _x(1, 3)
    reference = _local(local_spans, [(0, 10)], torch.cat([x, x]))
    async with aiohttp.ClientSession() as http, Raw(http, nodes[0].url) as owner, Raw(http, nodes[0].url) as stranger:
        assert (await owner.open("owned", digest))["type"] == "opened"
        assert (await owner.ask(_step("owned", 0, x)))["type"] == "result"
        for message in (
            {"type": "close", "session": "owned"},
            _step("owned", 9, x, step=5),  # a bad position: would go to the owner if it were the owner's step
            _step("owned", 1, x, step=2**62),
            _step("owned", 1, torch.full((1, 576), float("nan")), step=1),
        ):
            assert (await stranger.ask(message))["type"] == "error"
        reply = await owner.ask(_step("owned", 1, x, step=1))  # the first frame the owner gets is its own result
        assert reply["type"] == "result" and reply["step"] == 1
        torch.testing.assert_close(wire.unpack_tensor(reply["hidden"]), reference[1:], atol=5e-4, rtol=1e-5)


# --- hops prove who they are -------------------------------------------------------------------


async def test_a_hop_with_the_wrong_key_is_refused_by_the_client(nodes, local_spans, digest):
    a, b, c = nodes
    x = _x(3, 4)
    impostor = RemoteHop(b.url, 10, 20, c.peer_id)  # the route says C, the node at that address is B
    async with aiohttp.ClientSession() as http:
        with pytest.raises(HopNotProven) as caught:
            async with RouteSession(http, [RemoteHop(a.url, 0, 10, a.peer_id), impostor, RemoteHop(c.url, 20, 30, c.peer_id)], digest, 16, F32):
                pass
        assert caught.value.hop == impostor
        async with RouteSession(http, _hops(nodes), digest, 16, F32) as session:  # and an honest route still works
            assert torch.equal(await session.forward(x, 0, output="all"), _local(local_spans, SPANS, x))


class FakeFirstHop:
    """A node for blocks [0, 10) that computes honestly (in this process) and pushes on with the token,
    but first answers a zero `result` to the client, as if it were the last hop."""

    def __init__(self, span) -> None:
        self.span = span
        self.identity = Identity.generate()
        self.next: dict | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self):
        app = web.Application()
        app.add_routes([web.get("/session", self.socket)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    async def socket(self, request):
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async with aiohttp.ClientSession() as http:
            push = None
            async for msg in ws:
                message = wire.decode(msg.data)
                if message["type"] == "open":
                    self.next = message["next"]
                    blocks = tuple(message["blocks"])
                    signature = self.identity.sign(protocol.opened_payload(message["nonce"], message["session"], blocks))
                    opened = protocol.Opened(message["session"], blocks, message["max_length"], self.identity.peer_id, self.identity.public_key_bytes, signature)
                    await ws.send_bytes(wire.encode(opened.to_wire()))
                elif message["type"] == "step":
                    step = protocol.Step.from_wire(message)
                    x = step.hidden.clone()
                    out = self.span(x, [Segment(self.span.new_cache(x.shape[0]), 0, x.shape[0])])
                    bogus = protocol.Result(step.session, step.step, (20, 30), 0.0, 0.0, 1, bytes(64), torch.zeros_like(out[-1:]), "float32")
                    await ws.send_bytes(wire.encode(bogus.to_wire()))
                    push = push or await http.ws_connect(f"{self.next['url']}/session", max_msg_size=0)
                    forward = protocol.Step(self.next["session"], step.step, step.position, out, "float32", step.output, self.next["token"])
                    await push.send_bytes(wire.encode(forward.to_wire()))
                    await ws.send_bytes(wire.encode(protocol.Ack(step.session, step.step, (0, 10), 0.0, 0.0, 1, bytes(64)).to_wire()))
            if push is not None:
                await push.close()
        return ws


async def test_a_result_from_a_hop_that_is_not_last_is_ignored(nodes, local_spans, digest):
    x = _x(4, 5)
    reference = _local(local_spans, SPANS, x)
    async with FakeFirstHop(local_spans[(0, 10)]) as fake, aiohttp.ClientSession() as http:
        hops = [RemoteHop(fake.url, 0, 10, fake.identity.peer_id), *_hops(nodes[1:])]
        async with RouteSession(http, hops, digest, 16, F32) as session:
            out = await session.forward(x, 0, output="all")
    assert torch.equal(out, reference), "the zero result of the first hop was taken as the route's output"


# --- outbound pushes are the node's choice ---------------------------------------------------------


class Listener:
    """An HTTP server that records every request it gets (and, as a websocket, every frame)."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.requests: list[str] = []
        self.frames: list[dict] = []
        self.identity = identity  # answers `prove` with this key, if set

    async def __aenter__(self):
        app = web.Application()
        app.add_routes([web.route("*", "/{tail:.*}", self.handle)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    async def handle(self, request):
        self.requests.append(request.path_qs)
        if request.path != "/session" or request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="ok")
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            message = wire.decode(msg.data)
            self.frames.append(message)
            if message["type"] == "prove" and self.identity is not None:
                proof = protocol.Proof(self.identity.peer_id, self.identity.public_key_bytes, self.identity.sign(protocol.proof_payload(message["nonce"])))
                await ws.send_bytes(wire.encode(proof.to_wire()))
        return ws


def _next(url: str, peer_id: str, record: PeerRecord | None = None) -> dict:
    return NextHop(url, "victim", peer_id, secrets.token_urlsafe(16), record).to_wire() | {"url": url}


async def test_next_hops_that_are_not_proven_peers_are_refused_before_any_dial(nodes, digest):
    a, b, c = nodes
    stranger = Identity.generate()
    async with Listener() as listener, aiohttp.ClientSession() as http, Raw(http, a.url) as raw:
        port = listener.url.rsplit(":", 1)[1]
        b_record, c_record = await _record(http, b), await _record(http, c)
        fake_span = PeerRecord.create(stranger, addresses=(listener.url,), now=time.time(), ttl=60, model=dict(b_record.model), num_layers=30, span=(10, 20))
        wrong_model = PeerRecord.create(stranger, addresses=(listener.url,), now=time.time(), ttl=60, model={**b_record.model, "digest": "e" * 32}, num_layers=30, span=(10, 20))
        cases = [
            (f"http://127.0.0.1:{port}/admin/delete?confirm=1#", b.peer_id, None),  # a path: not a base URL
            (f"http://127.0.0.1:{port}", b.peer_id, None),  # no record, and A's table does not know B
            (f"http://127.0.0.1:{port}", b.peer_id, b_record),  # B's record does not list this address
            (c.url, c.peer_id, c_record),  # C serves [20, 30), not block 10
            (listener.url, stranger.peer_id, wrong_model),  # another model
            (listener.url, stranger.peer_id, PeerRecord.create(stranger, addresses=(listener.url,), now=time.time() - 120, ttl=60, model=dict(b_record.model), num_layers=30, span=(10, 20))),  # expired
        ]
        for index, (url, peer_id, record) in enumerate(cases):
            reply = await raw.ask(open_message(f"ssrf{index}", digest, next=_next(url, peer_id, record)))
            assert reply["type"] == "error" and reply["code"] in ("bad_address", "bad_request"), (index, reply)
        # retarget is held to the same rule
        assert (await raw.open("ssrf-ok", digest))["type"] == "opened"
        reply = await raw.ask({"type": "retarget", "session": "ssrf-ok", "next": _next(f"http://127.0.0.1:{port}/x", b.peer_id)})
        assert reply["code"] == "bad_address"
        # a record for the right span does admit the next hop at open (its key is proven later, on the push)
        assert (await raw.open("ssrf-admitted", digest, next=_next(listener.url, stranger.peer_id, fake_span)))["type"] == "opened"
    assert listener.requests == [], "a refused next hop was dialled"


async def test_a_next_hop_that_cannot_prove_the_records_key_gets_no_activations(nodes, local_spans, digest):
    a = nodes[0]
    x = _x(2, 6)
    claimed = Identity.generate()  # the record's key ...
    squatter = Identity.generate()  # ... and the key of whoever answers at its address
    async with Listener(identity=squatter) as listener, aiohttp.ClientSession() as http, Raw(http, a.url) as owner:
        b_record = await _record(http, nodes[1])
        record = PeerRecord.create(claimed, addresses=(listener.url,), now=time.time(), ttl=60, model=dict(b_record.model), num_layers=30, span=(10, 20))
        assert (await owner.open("pushes", digest, next=_next(listener.url, claimed.peer_id, record)))["type"] == "opened"
        reply = await owner.ask(_step("pushes", 0, x))
        assert reply["type"] == "error" and reply["code"] == "hop_not_proven" and reply["hop"] == claimed.peer_id, reply
        assert "did not prove" in reply["message"]
        # the node cannot even reach a next hop: the error names the peer, not what the network said
        gone = Identity.generate()
        dead = PeerRecord.create(gone, addresses=("http://127.0.0.1:9",), now=time.time(), ttl=60, model=dict(b_record.model), num_layers=30, span=(10, 20))
        assert (await owner.open("dead-end", digest, next=_next("http://127.0.0.1:9", gone.peer_id, dead)))["type"] == "opened"
        reply = await owner.ask(_step("dead-end", 0, x))
        assert reply["code"] == "peer_unavailable" and reply["message"] == f"cannot reach next hop {gone.peer_id}"
        # and an honest session through the same node is undisturbed
        async with RouteSession(http, _hops(nodes), digest, 16, F32) as session:
            assert torch.equal(await session.forward(x, 0, output="all"), _local(local_spans, SPANS, x))
    assert [f["type"] for f in listener.frames] == ["prove"], listener.frames


def test_check_next_hop_is_pure_and_strict():
    me, other = Identity.generate(), Identity.generate()
    model = {"architecture": "llama", "shape": "30x576", "digest": "d" * 32}
    now = time.time()
    record = PeerRecord.create(other, addresses=("http://10.0.0.2:7000",), now=now, ttl=60, model=model, num_layers=30, span=(10, 20))
    table = PeerTable()
    hop = NextHop("http://10.0.0.2:7000", "s", other.peer_id, "t" * 16)
    with pytest.raises(BadAddress):
        check_next_hop(hop, 10, "d" * 32, 30, table, now)  # unknown peer, no record
    assert table.merge(record, now)
    assert check_next_hop(hop, 10, "d" * 32, 30, table, now) == record  # known by the table
    assert check_next_hop(hop, 15, "d" * 32, 30, table, now) == record  # a sub-span starts inside the peer's span
    for bad in (
        (NextHop("http://10.0.0.3:7000", "s", other.peer_id, "t" * 16), 10),  # address not listed
        (hop, 20),  # the peer does not serve block 20
        (hop, 30),  # the last hop has no next hop
        (NextHop("http://10.0.0.2:7000", "s", me.peer_id, "t" * 16), 10),  # someone else's address
    ):
        with pytest.raises(BadAddress):
            check_next_hop(*bad[:1], bad[1], "d" * 32, 30, table, now)
    with pytest.raises(BadAddress):
        check_next_hop(hop, 10, "e" * 32, 30, table, now)
    assert check_next_hop(NextHop(hop.url, "s", other.peer_id, "t" * 16, record), 10, "d" * 32, 30, PeerTable(), now) == record  # by the record passed


# --- per-source limits ---------------------------------------------------------------------------


def test_per_source_limits_answer_busy_while_another_source_still_generates(lan_factory, tmp_path):
    lan = lan_factory(3)
    home, attacker, user = lan.hosts
    limits = ["--max-sockets-per-source", "3", "--max-sessions-per-source", "2", "--max-sessions", "8"]
    (node,) = start_nodes([["--host", home.address, "--blocks", "0:30", *limits]], tmp_path, prefix=["ip", "netns", "exec", home.namespace])
    try:
        from swarm.model import DEFAULT_MODEL, open_checkpoint

        with open_checkpoint(DEFAULT_MODEL) as checkpoint:
            digest = checkpoint.fingerprint().digest
        generate = [sys.executable, "-m", "tests.session_attacker", "generate", node.url, node.peer_id, "12"]
        undisturbed = json.loads(Lines(lan.run_in(user, generate).stdout).expect(lambda line: line.startswith("{"), 180))
        flood = lan.run_in(attacker, [sys.executable, "-m", "tests.session_attacker", "flood", node.url, digest, "3", "2"], stdin=subprocess.PIPE)
        seen = json.loads(Lines(flood.stdout).expect(lambda line: line.startswith("{"), 180))
        assert seen["socket_refusal"] == "busy" and seen["socket_close_code"] == aiohttp.WSCloseCode.TRY_AGAIN_LATER, seen
        assert seen["sessions"] == ["opened", "opened", "busy"], seen
        during = json.loads(Lines(lan.run_in(user, generate).stdout).expect(lambda line: line.startswith("{"), 180))
        assert during["tokens"] == undisturbed["tokens"]
        flood.stdin.close()
        assert flood.wait(30) == 0
    finally:
        stop_nodes([node])


async def test_a_node_on_a_public_address_never_pushes_to_loopback_or_private_addresses(nodes, digest, tmp_path):
    """Address policy (swarm/addresses.py): a node whose public URL is on the internet refuses a next
    hop on loopback or a private range, even one with a valid record, before dialling it."""
    port = free_port()
    # The name is never resolved: the policy reads it (a DNS name with a dot is public); we dial 127.0.0.1.
    (public,) = start_nodes([["--blocks", "0:10", "--port", str(port), "--public-url", "http://node.example.org:7000"]], tmp_path)
    here = f"http://127.0.0.1:{port}"
    try:
        stranger = Identity.generate()
        async with Listener() as listener, aiohttp.ClientSession() as http, Raw(http, here) as raw:
            info = await (await http.get(f"{here}/info")).json()
            assert info["discovery"]["address_policy"]["reach"] == "public"
            b_record = await _record(http, nodes[1])
            inside = PeerRecord.create(stranger, addresses=(listener.url,), now=time.time(), ttl=60, model=dict(b_record.model), num_layers=30, span=(10, 20))
            for index, (url, peer_id, record) in enumerate([(listener.url, stranger.peer_id, inside), (nodes[1].url, nodes[1].peer_id, b_record)]):
                reply = await raw.ask(open_message(f"inward{index}", digest, next=_next(url, peer_id, record)))
                assert reply["type"] == "error" and reply["code"] == "address_refused", reply
        assert listener.requests == [] and listener.frames == [], "a public node dialled a loopback address"
    finally:
        stop_nodes([public])
