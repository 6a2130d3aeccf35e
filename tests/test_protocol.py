"""swarm/protocol.py: every session message round-trips through a frame, and every malformed one is refused typed."""

from __future__ import annotations

import secrets
import time

import pytest
import torch

from swarm import protocol, wire
from swarm.errors import BadAddress, BadRequest
from swarm.identity import Identity, verify
from swarm.protocol import (
    Ack,
    Close,
    Closed,
    Draining,
    Error,
    Forward,
    Limits,
    NextHop,
    Open,
    Opened,
    Proof,
    Prove,
    Result,
    Retarget,
    Retargeted,
    Step,
    parse,
)  # fmt: skip
from swarm.records import PeerRecord

ID = Identity.generate()
MODEL = {"architecture": "llama", "shape": "30x576", "digest": "d" * 32}
RECORD = PeerRecord.create(ID, addresses=("http://127.0.0.1:7001",), now=time.time(), ttl=60, model=MODEL, num_layers=30, span=(10, 20), throughput=5.0)
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
TOKEN = secrets.token_urlsafe(16)
SEAL = bytes(range(64))
NEXT = NextHop("http://127.0.0.1:7001", "s-next", ID.peer_id, TOKEN, RECORD)


def _frame(message: protocol.Message) -> dict:
    return wire.decode(wire.encode(message.to_wire()))


def _messages() -> list[protocol.Message]:
    nonce = secrets.token_bytes(32)
    return [
        Open("s1", (0, 10), 64, "bfloat16", "d" * 32, nonce, TOKEN),
        Open("s1", (0, 10), 64, "float32", "d" * 32, nonce, TOKEN, NEXT),
        Open("s1", (0, 10), 64, "float32", "d" * 32, nonce, TOKEN, NEXT, tap=True),
        Open("s1", (0, 10), 64, "float32", "d" * 32, nonce, TOKEN, NextHop("https://node.example:443", "s2", ID.peer_id, TOKEN)),
        Opened("s1", (0, 10), 64, ID.peer_id, ID.public_key_bytes, ID.sign(protocol.opened_payload(nonce, "s1", (0, 10))), RECORD),
        Opened("s1", (0, 10), 64, ID.peer_id, ID.public_key_bytes, bytes(64)),
        Step("s1", 0, 0, X, "float32"),
        Step("s1", 7, 12, X, "float32", "last", TOKEN),
        Ack("s1", 3, (0, 10), 1.5, 2.25, 4, SEAL),
        Ack("s1", 3, (0, 10), 1.5, 2.25, 4, SEAL, X.to(torch.bfloat16), "bfloat16"),
        Result("s1", 3, (20, 30), 1.5, 2.0, 1, SEAL, X, "float32"),
        Retarget("s1", NEXT),
        Retarget("s1", None),
        Retargeted("s1"),
        Close("s1"),
        Closed("s1"),
        Draining("s1"),
        Error("busy", "no room", "s1", 4, ID.peer_id),
        Error("bad_request", "what"),
        Prove(nonce),
        Proof(ID.peer_id, ID.public_key_bytes, ID.sign(protocol.proof_payload(nonce))),
        Forward((2, 7), "d" * 32, X, "float32"),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_round_trip(message):
    back = parse(_frame(message), Limits(hidden_size=8, max_tokens=16))
    assert type(back) is type(message)
    for name in message.__dataclass_fields__:
        mine, theirs = getattr(message, name), getattr(back, name)
        if isinstance(mine, torch.Tensor):
            assert torch.equal(mine, theirs)
        else:
            assert mine == theirs, name


def test_every_type_is_covered():
    assert {type(m).TYPE for m in _messages()} == set(protocol.MESSAGES)


def test_signed_payloads_are_domain_separated():
    nonce = secrets.token_bytes(32)
    signature = ID.sign(protocol.proof_payload(nonce))
    assert verify(ID.public_key_bytes, signature, protocol.proof_payload(nonce))
    assert not verify(ID.public_key_bytes, signature, protocol.opened_payload(nonce, "s", (0, 1)))
    assert protocol.opened_payload(nonce, "s", (0, 1)) != protocol.opened_payload(nonce, "s", (0, 2))


def _good(kind: str) -> dict:
    return next(_frame(m) for m in _messages() if m.TYPE == kind)


def _refusals():
    """(case name, message dict, the error class expected)."""
    step = _good("step")
    yield "unknown type", {"type": "teleport"}, BadRequest
    yield "not a map", ["step"], BadRequest
    yield "unknown field", {**step, "admin": True}, BadRequest
    yield "missing field", {k: v for k, v in step.items() if k != "position"}, BadRequest
    yield "session id shape", {**step, "session": "../etc"}, BadRequest
    yield "session id too long", {**step, "session": "a" * 65}, BadRequest
    yield "step 2^62", {**step, "step": 2**62}, BadRequest
    yield "negative step", {**step, "step": -1}, BadRequest
    yield "boolean step", {**step, "step": True}, BadRequest
    yield "float position", {**step, "position": 1.0}, BadRequest
    yield "position 2^31", {**step, "position": 2**31}, BadRequest
    yield "output", {**step, "output": "some"}, BadRequest
    yield "short token", {**step, "token": "abc"}, BadRequest
    yield "token charset", {**step, "token": "a" * 15 + "!"}, BadRequest
    yield "hidden size", {**step, "hidden": wire.pack_tensor(torch.zeros(1, 9), "float32")}, BadRequest
    yield "too many tokens", {**step, "hidden": wire.pack_tensor(torch.zeros(17, 8), "float32")}, BadRequest
    yield "nan", {**step, "hidden": wire.pack_tensor(torch.full((1, 8), float("nan")), "float32")}, BadRequest
    opened = _good("opened")
    yield "open blocks reversed", {**_good("open"), "blocks": [10, 0]}, BadRequest
    yield "open blocks empty", {**_good("open"), "blocks": [3, 3]}, BadRequest
    yield "open short nonce", {**_good("open"), "nonce": b"x" * 15}, BadRequest
    yield "open nonce not bytes", {**_good("open"), "nonce": "x" * 32}, BadRequest
    yield "open max_length 0", {**_good("open"), "max_length": 0}, BadRequest
    yield "open dtype", {**_good("open"), "dtype": "int8"}, BadRequest
    yield "opened short key", {**opened, "public_key": b"k" * 31}, BadRequest
    yield "opened peer id", {**opened, "peer_id": "not-a-peer-id"}, BadRequest
    yield "opened record garbage", {**opened, "record": b"\x00garbage"}, BadRequest
    yield "ack nan time", {**_good("ack"), "compute_ms": float("nan")}, BadRequest
    yield "ack negative time", {**_good("ack"), "queue_ms": -1.0}, BadRequest
    yield "ack without seal", {k: v for k, v in _good("ack").items() if k != "seal"}, BadRequest
    yield "ack short seal", {**_good("ack"), "seal": b"s" * 63}, BadRequest
    yield "ack seal not bytes", {**_good("ack"), "seal": "s" * 64}, BadRequest
    yield "ack tapped nan", {**_good("ack"), "hidden": wire.pack_tensor(torch.full((1, 8), float("inf")), "float32")}, BadRequest
    yield "ack tapped hidden size", {**_good("ack"), "hidden": wire.pack_tensor(torch.zeros(1, 9), "float32")}, BadRequest
    yield "result without seal", {k: v for k, v in _good("result").items() if k != "seal"}, BadRequest
    yield "result long seal", {**_good("result"), "seal": b"s" * 65}, BadRequest
    yield "open tap not a bool", {**_good("open"), "tap": 1}, BadRequest
    yield "open tap a string", {**_good("open"), "tap": "yes"}, BadRequest
    yield "error without message", {"type": "error", "code": "busy"}, BadRequest
    yield "error hop not a peer id", {"type": "error", "code": "busy", "message": "m", "hop": "http://x:1"}, BadRequest
    yield "proof short signature", {**_good("proof"), "signature": b"s" * 63}, BadRequest
    yield "prove long nonce", {"type": "prove", "nonce": b"n" * 65}, BadRequest
    retarget = _good("retarget")
    for url in (
        "http://127.0.0.1:7001/admin/delete?confirm=1#",
        "http://127.0.0.1:7001/admin",
        "http://127.0.0.1:7001?x=1",
        "http://127.0.0.1:7001#frag",
        "http://user:pw@127.0.0.1:7001",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://",
        "http://127.0.0.1:7001/\\evil",
        "http://exa mple:1",
        "http://" + "a" * 300 + ":1",
    ):
        yield f"next url {url[:40]}", {**retarget, "next": {**retarget["next"], "url": url}}, BadAddress
    yield "next not a map", {**retarget, "next": "http://127.0.0.1:7001"}, BadRequest
    yield "next without token", {**retarget, "next": {k: v for k, v in retarget["next"].items() if k != "token"}}, BadRequest
    yield "next extra key", {**retarget, "next": {**retarget["next"], "path": "/x"}}, BadRequest
    other = Identity.generate()
    yield "next record of another peer", {**retarget, "next": {**retarget["next"], "peer_id": other.peer_id}}, BadRequest
    yield "next record garbage", {**retarget, "next": {**retarget["next"], "record": b"\x91\x00"}}, BadRequest


@pytest.mark.parametrize("case", list(_refusals()), ids=lambda c: c[0])
def test_refusal(case):
    _, message, error = case
    with pytest.raises(error):
        parse(message, Limits(hidden_size=8, max_tokens=16))


def test_from_wire_of_the_wrong_class_is_refused():
    with pytest.raises(BadRequest):
        Step.from_wire(_good("ack"))


def test_parse_can_restrict_types():
    with pytest.raises(BadRequest):
        parse(_good("result"), allowed=frozenset({"open", "step"}))


def test_tap_is_optional_and_off_by_default():
    untapped = _good("open")
    assert "tap" not in untapped and Open.from_wire(untapped).tap is False
    assert Open.from_wire({**untapped, "tap": True}).tap is True
    ack = Ack.from_wire(_good("ack"))
    assert ack.hidden is None and ack.dtype is None
    tapped = parse(_frame(Ack("s1", 3, (0, 10), 1.5, 2.25, 4, SEAL, X, "bfloat16")))
    assert tapped.dtype == "bfloat16" and tapped.hidden.dtype == torch.bfloat16


def test_base_url_keeps_host_and_port_only():
    assert protocol.check_base_url("http://127.0.0.1:7001/") == "http://127.0.0.1:7001"
    assert protocol.check_base_url("https://node.example:8443") == "https://node.example:8443"
