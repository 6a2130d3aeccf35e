"""Real `swarm-node` processes on loopback: chains by push, every bad input, shutdown.

One module-scoped swarm of three float32 nodes ([0,10) [10,20) [20,30)) is shared
by the tests that only read it; the bad-input tests run against node A while a
healthy session stays open on it, and check that session is undisturbed.
"""

from __future__ import annotations

import asyncio
import math
import secrets

import aiohttp
import msgpack
import pytest
import torch

from client.session import RemoteHop, RouteSession, SessionConfig
from swarm import wire
from swarm.errors import BadRequest, Busy, ModelMismatch, PeerUnavailable, ShuttingDown
from swarm.model import Segment, load_span
from tests.nodes import start_nodes, stop_nodes

SPANS = [(0, 10), (10, 20), (20, 30)]
# bfloat16 on the wire rounds each hop's output to 8 bits of mantissa (relative
# error 2^-9 per value); through three hops the final hidden states stay within
# 1% of float32 in relative norm (measured: 0.4%), and greedy tokens agree.
BF16_REL_ERROR = 0.01


@pytest.fixture(scope="module")
def swarm_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    a = ["--blocks", "0:10", "--max-sessions", "6", "--kv-memory", "64MiB", "--max-frame", "1MiB"]
    nodes = start_nodes([a, ["--blocks", "10:20"], ["--blocks", "20:30"]], tmp)
    yield nodes
    stop_nodes(nodes)


@pytest.fixture(scope="module")
def local_spans(checkpoint):
    return {s: load_span(checkpoint, *s) for s in SPANS + [(0, 20)]}


@pytest.fixture(scope="module")
def digest(checkpoint):
    return checkpoint.fingerprint().digest


def _local(spans, span_keys, x):
    for key in span_keys:
        span = spans[key]
        x = span(x, [Segment(span.new_cache(x.shape[0]), 0, x.shape[0])])
    return x


def _hops(nodes):
    return [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]


async def test_three_hop_chain_float32_is_identical(swarm_nodes, local_spans, head, digest):
    ids = head.encode_prompt("What is the capital of France?", chat=True)
    x = head.embed(ids)
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, _hops(swarm_nodes), digest, 64, SessionConfig(wire_dtype="float32")) as session:
            prefill = await session.forward(x, 0, output="all")
            assert torch.equal(prefill, _local(local_spans, SPANS, x))
            # one-token steps through the caches match a full forward of the longer sequence
            extra = head.embed([504, 3575, 314])
            for i in range(3):
                out = await session.forward(extra[i : i + 1], len(ids) + i)
            whole = _local(local_spans, SPANS, torch.cat([x, extra]))
            torch.testing.assert_close(out, whole[-1:], atol=5e-4, rtol=1e-5)


async def test_two_hop_chain_float32_is_identical(swarm_nodes, local_spans, head, digest):
    x = head.embed(head.encode_prompt("Write a haiku about the sea.", chat=True))
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, _hops(swarm_nodes[:2]), digest, 64, SessionConfig(wire_dtype="float32")) as session:
            out = await session.forward(x, 0, output="all")
    assert torch.equal(out, _local(local_spans, [(0, 10), (10, 20)], x))


async def test_three_hop_chain_bfloat16_wire_is_close(swarm_nodes, local_spans, head, digest):
    x = head.embed(head.encode_prompt("Write a haiku about the sea.", chat=True))
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, _hops(swarm_nodes), digest, 64, SessionConfig(wire_dtype="bfloat16")) as session:
            out = await session.forward(x, 0, output="all")
    assert out.dtype == torch.bfloat16
    reference = _local(local_spans, SPANS, x)
    relative = (out.float() - reference).norm() / reference.norm()
    assert relative < BF16_REL_ERROR, relative
    # and the next-token prediction is unchanged
    assert torch.equal(head.logits(out[-1:]).argmax(-1), head.logits(reference[-1:]).argmax(-1))


async def test_info(swarm_nodes, digest):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{swarm_nodes[1].url}/info") as response:
            info = await response.json()
    assert info["peer_id"] == swarm_nodes[1].peer_id
    assert info["span"] == [10, 20] and info["num_layers"] == 30 and info["model"]["digest"] == digest
    assert info["protocol"] == wire.PROTOCOL_VERSION and info["throughput"] > 0
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["record"]


# --- bad input ------------------------------------------------------------------------------


class Raw:
    """A bare websocket to one node, for sending what a well-behaved client never would."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def __aenter__(self):
        self.ws = await self.http.ws_connect(f"{self.url}/session", max_msg_size=0)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def send(self, message) -> None:
        await self.ws.send_bytes(message if isinstance(message, bytes) else wire.encode(message))

    async def recv(self) -> dict:
        msg = await asyncio.wait_for(self.ws.receive(), 30)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        return wire.decode(msg.data)

    async def ask(self, message) -> dict:
        await self.send(message)
        return await self.recv()

    async def open(self, session: str, digest: str, blocks=(0, 10), max_length: int = 16, **extra) -> dict:
        return await self.ask(open_message(session, digest, blocks, max_length, **extra))


def open_message(session: str, digest: str, blocks=(0, 10), max_length: int = 16, **extra) -> dict:
    return {
        "type": "open", "session": session, "blocks": list(blocks), "max_length": max_length, "dtype": "float32", "model": digest,
        "nonce": secrets.token_bytes(16), "token": secrets.token_urlsafe(16), **extra,
    }  # fmt: skip


def _step(session: str, position: int, hidden: torch.Tensor, step: int = 0, **extra) -> dict:
    return {"type": "step", "session": session, "step": step, "position": position, "hidden": wire.pack_tensor(hidden, "float32"), **extra}


def _corrupt(tensor: torch.Tensor, **fields) -> dict:
    packed = wire.pack_tensor(tensor, "float32")
    packed["data"] = bytes(packed["data"])
    packed.update(fields)
    return packed


X = torch.randn(1, 576, generator=torch.Generator().manual_seed(1))


def _bad_inputs(digest: str):
    """(what is sent, the error code expected). Sessions 'bad*' are opened by the test first."""
    yield b"\x00\xff garbage \x13\x37", "bad_request"
    yield wire.encode(_step("bad", 0, X))[:-100], "bad_request"  # truncated frame
    yield {"type": "teleport", "session": "bad"}, "bad_request"
    yield msgpack.packb({"type": "open", "v": 999}), "unsupported_version"
    yield {**_step("bad", 0, X), "hidden": _corrupt(X, data=b"\x00" * 100)}, "bad_request"
    yield _step("bad", 0, torch.randn(1, 100)), "bad_request"  # wrong hidden size
    yield {**_step("bad", 0, X), "hidden": _corrupt(X, dtype="int8")}, "bad_request"
    yield _step("bad", 0, torch.full((1, 576), math.nan)), "bad_request"
    yield _step("bad", 0, torch.full((1, 576), math.inf)), "bad_request"
    yield _step("never-opened", 0, X), "session_not_found"
    yield _step("bad", 5, X), "bad_position"  # skips ahead of the empty cache
    yield _step("bad", -1, X), "bad_request"  # rewinds before the start
    yield _step("bad", 0, torch.randn(17, 576)), "length_exceeded"  # more tokens than max_length 16
    yield _step("bad", 10, torch.randn(1, 576)), "bad_position"
    yield {"type": "retarget", "session": "never-opened", "next": None}, "session_not_found"
    yield {"type": "retarget", "session": "bad", "next": "http://elsewhere"}, "bad_request"
    yield {"type": "retarget", "session": "bad", "next": {"url": "file:///etc/passwd", "session": "s", "peer_id": "a" * 32, "token": "t" * 16}}, "bad_address"
    yield open_message("bad2", digest, (5, 15), 8), "bad_span"
    yield open_message("bad3", "0" * 32, (0, 10), 8), "model_mismatch"
    yield open_message("bad4", digest, (0, 10), 8, dtype="int4"), "bad_request"
    yield open_message("bad5", digest, (0, 10), 8192), "busy"  # KV budget
    yield open_message("bad6", digest, (0, 10), 8, nonce=b"short"), "bad_request"
    yield open_message("bad7", digest, (0, 10), 8, token="short"), "bad_request"
    yield open_message("bad", digest, (0, 10), 8), "bad_request"  # already open
    yield {"type": "prove", "nonce": b"n" * 16}, "proof"  # anyone may ask a node to prove its key, once per connection
    yield {"type": "prove", "nonce": b"n" * 16}, "not_permitted"


async def test_bad_inputs_get_typed_errors_and_disturb_nobody(swarm_nodes, local_spans, digest):
    node = swarm_nodes[0]
    reference = _local(local_spans, [(0, 10)], torch.cat([X, X]))
    async with aiohttp.ClientSession() as http, Raw(http, node.url) as healthy, Raw(http, node.url) as bad:
        assert (await healthy.open("healthy", digest))["type"] == "opened"
        first = await healthy.ask(_step("healthy", 0, X))
        assert first["type"] == "result"
        assert (await bad.open("bad", digest))["type"] == "opened"
        for index, (message, code) in enumerate(_bad_inputs(digest)):
            reply = await bad.ask(message)
            if code == "proof":
                assert reply["type"] == "proof" and reply["peer_id"] == node.peer_id
                continue
            assert reply["type"] == "error" and reply["code"] == code, (index, reply)
            assert reply["message"]
        # only a session's owner may redirect its output
        assert (await healthy.ask({"type": "retarget", "session": "bad", "next": None}))["code"] == "not_permitted"
        assert (await bad.ask({"type": "retarget", "session": "bad", "next": None}))["type"] == "retargeted"
        # the bad connection still works, and so does the healthy session next door
        assert (await bad.ask(_step("bad", 0, X)))["type"] == "result"
        second = await healthy.ask(_step("healthy", 1, X, step=1))
        torch.testing.assert_close(wire.unpack_tensor(second["hidden"]), reference[1:], atol=5e-4, rtol=1e-5)
        await bad.send(b"")  # an empty frame too
        assert (await bad.recv())["code"] == "bad_request"
        await bad.ws.send_str("text is not a frame")
        assert (await bad.recv())["code"] == "bad_request"
        closed = await bad.ask({"type": "close", "session": "bad"})
        assert closed["type"] == "closed"
        reply = await bad.ask(_step("bad", 1, X))
        assert reply["code"] == "session_not_found"
        # a frame over the limit is cut while it is read: the connection closes with 1009
        await bad.send(wire.encode({"type": "step", "session": "bad", "pad": b"\x00" * (1024 * 1024 + 10)}))
        closing = await bad.ws.receive()
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and bad.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # and the healthy session next door still works
        third = await healthy.ask(_step("healthy", 2, X, step=2))
        assert third["type"] == "result"


async def test_too_many_sessions_is_busy_and_a_dropped_connection_frees_them(swarm_nodes, digest):
    node = swarm_nodes[0]
    async with aiohttp.ClientSession() as http:
        async def sessions() -> int:
            async with http.get(f"{node.url}/info") as response:
                return (await response.json())["sessions"]

        before = await sessions()
        async with Raw(http, node.url) as raw:
            codes = [(await raw.open(f"many{i}", digest, max_length=4))["type"] for i in range(6 - before)]
            assert codes == ["opened"] * (6 - before)
            reply = await raw.open("one-too-many", digest, max_length=4)
            assert reply["code"] == "busy" and "6 sessions" in reply["message"]
            assert await sessions() == 6
        # the connection closed without a word: its sessions are freed
        for _ in range(200):
            if await sessions() == before:
                break
            await asyncio.sleep(0.02)
        assert await sessions() == before


async def test_route_session_raises_typed_errors(swarm_nodes, digest):
    hops = _hops(swarm_nodes)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(ModelMismatch):
            async with RouteSession(http, hops, "f" * 32, 16):
                pass
        with pytest.raises(Busy):
            async with RouteSession(http, hops, digest, 8192):  # node A's KV budget is 64 MiB
                pass
        with pytest.raises(BadRequest, match="not contiguous"):
            RouteSession(http, [hops[0], hops[2]], digest, 16)
        with pytest.raises(PeerUnavailable):
            async with RouteSession(http, [RemoteHop("http://127.0.0.1:1", 0, 30, hops[0].peer_id)], digest, 16):
                pass


async def test_forward_endpoint(swarm_nodes, local_spans, digest):
    url = f"{swarm_nodes[0].url}/forward"
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(2))
    good = {"type": "forward", "blocks": [2, 7], "model": digest, "hidden": wire.pack_tensor(x, "float32")}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=wire.encode(good)) as response:
            assert response.status == 200
            out = wire.unpack_tensor(wire.decode(await response.read())["hidden"])
        span = local_spans[(0, 10)]
        torch.testing.assert_close(out, span(x, [Segment(span.new_cache(5, (2, 7)), 0, 5)], (2, 7)), atol=0, rtol=0)
        cases = [
            (b"garbage", 400, "bad_request"),
            (wire.encode({**good, "model": "1" * 32}), 409, "model_mismatch"),
            (wire.encode({**good, "blocks": [8, 12]}), 400, "bad_span"),
            (wire.encode({**good, "type": "open"}), 400, "bad_request"),
            (b"\x00" * (1024 * 1024 + 1), 413, "frame_too_large"),
        ]
        for body, status, code in cases:
            async with http.post(url, data=body) as response:
                assert response.status == status
                assert wire.decode(await response.read())["code"] == code


# --- lifecycle ------------------------------------------------------------------------------


async def test_idle_session_expires_and_sigterm_drains_then_says_shutting_down(tmp_path, digest):
    (node,) = start_nodes([["--blocks", "0:4", "--session-timeout", "1", "--drain-timeout", "0.5"]], tmp_path)
    try:
        async with aiohttp.ClientSession() as http, Raw(http, node.url) as raw:
            assert (await raw.open("idle", digest, blocks=(0, 4)))["type"] == "opened"
            expired = await raw.recv()  # nothing is sent: the reaper frees it after ~1 s
            assert expired["code"] == "session_not_found" and "idle" in expired["message"]

            assert (await raw.open("leaving", digest, blocks=(0, 4), max_length=64))["type"] == "opened"
            await raw.send(_step("leaving", 0, torch.randn(40, 576)))
            node.proc.send_signal(15)
            # the step in flight finishes, and the owner is asked to move the session
            assert {(await raw.recv())["type"] for _ in range(2)} == {"result", "draining"}
            assert (await raw.ask(_step("leaving", 40, X, step=1)))["type"] == "result", "a draining node still serves"
            assert (await raw.recv())["code"] == "shutting_down", "a session not moved within --drain-timeout is closed"
            assert (await raw.ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), "then the node hangs up"
        assert node.proc.wait(60) == 0
    finally:
        node.kill()
