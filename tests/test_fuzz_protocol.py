"""Property tests of the session protocol's typed messages (swarm/protocol.py).

Every message type round-trips through a frame; `parse` of any map raises only a
`BadRequest` subclass; and a valid message with one field replaced by anything at all
is accepted exactly when that value is valid, judged by oracles written from the
protocol's field rules (not by calling its checks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from swarm import protocol, wire
from swarm.errors import BadRequest, SwarmError
from swarm.identity import is_peer_id
from swarm.records import MAX_LAYERS, MAX_RECORD_BYTES, PeerRecord
from tests.strategies import EDGE_INTS, IDENTITIES, SCALARS, fuzz, packable, tensor_oracle

LIMITS = protocol.Limits(hidden_size=8, max_tokens=4)

# --- field rules, written out ---------------------------------------------------------------


def plain_int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and low <= v <= high


def pattern(regex: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and re.fullmatch(regex, v) is not None


def text(max_chars: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) <= max_chars


def raw_bytes(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and low <= len(v) <= high


def blocks_ok(v: Any) -> bool:
    return (
        isinstance(v, list) and len(v) == 2 and all(type(b) is int for b in v) and 0 <= v[0] < v[1] <= MAX_LAYERS
    )


def milliseconds_ok(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(float(v)) and float(v) >= 0


# A URL the node may dial: scheme://host:port, nothing after it but an optional "/". Labelled by hand.
GOOD_URLS = ["http://a:1", "https://[::1]:8443", "http://10.0.0.1:65535/", "http://node-1.example:80"]
BAD_URLS = [
    "http://127.0.0.1:1/admin/delete?confirm=1#", "http://a:1?", "http://a:1#", "http://a:1?x", "http://a:1#x",
    "http://u@a:1", "http://u:p@a:1", "http://a:1/x", "http://a:1//", "ftp://a:1", "a:1", "http://a:0",
    "http://a:65536", "http://a:-1", "http://[::1:80", "http://a:1\n", "http://a b:1", "http://a\\b:1", "",
    "http://:80", "http://a", "http://a:", "http://" + "a" * 250 + ":1", "http://\u00e9:1", 5, None, b"http://a:1",
]  # fmt: skip


def record_bytes_ok(peer_id: Any) -> Callable[[Any], bool]:
    """A `record` field: None, or the bytes of a well-formed peer record (of `peer_id`, when given)."""

    def ok(v: Any) -> bool:
        if v is None:
            return True
        if not isinstance(v, bytes) or not 1 <= len(v) <= MAX_RECORD_BYTES:
            return False
        try:
            record = PeerRecord.from_bytes(v)  # a record's own rules are fuzzed in test_fuzz_records.py
        except SwarmError:
            return False
        return peer_id is None or record.peer_id == peer_id

    return ok


SESSION = pattern(r"[A-Za-z0-9_-]{1,64}")
TOKEN = pattern(r"[A-Za-z0-9_-]{16,64}")
STEP = plain_int(0, protocol.MAX_STEP)
RULES: dict[str, Callable[[Any], bool]] = {
    "session": SESSION,
    "token": TOKEN,
    "blocks": blocks_ok,
    "max_length": plain_int(1, protocol.MAX_POSITION),
    "dtype": lambda v: isinstance(v, str) and v in wire.WIRE_DTYPES,
    "model": text(128),
    "nonce": raw_bytes(protocol.MIN_NONCE_BYTES, protocol.MAX_NONCE_BYTES),
    "step": STEP,
    "position": plain_int(0, protocol.MAX_POSITION),
    "output": lambda v: isinstance(v, str) and v in ("all", "last"),
    "compute_ms": milliseconds_ok,
    "queue_ms": milliseconds_ok,
    "batch": plain_int(0, 2**31),
    "peer_id": is_peer_id,
    "public_key": raw_bytes(32, 32),
    "signature": raw_bytes(64, 64),
    "seal": raw_bytes(64, 64),
    "tap": lambda v: type(v) is bool,
    "code": text(protocol.MAX_CODE_CHARS),
    "message": text(protocol.MAX_MESSAGE_CHARS),
    "hidden": lambda v: tensor_oracle(v, LIMITS.hidden_size, LIMITS.max_tokens),
}
# Optional fields of each message: absent (or None) is fine; `output` absent is "all", but None is no choice.
OPTIONAL = {"open": {"next", "tap"}, "ack": {"hidden"}, "opened": {"record"}, "step": {"output", "token"}, "retarget": {"next"}, "error": {"session", "step", "hop"}}
NONE_MEANS_ABSENT = {(kind, name) for kind, names in OPTIONAL.items() for name in names} - {("step", "output")}
KNOWN_FIELDS = {*RULES, "next", "record", "hop"}

# --- valid messages ----------------------------------------------------------------------------

session_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
tokens = st.from_regex(r"\A[A-Za-z0-9_-]{16,64}\Z")
peer_ids = st.sampled_from([i.peer_id for i in IDENTITIES])
block_ranges = st.integers(0, MAX_LAYERS - 1).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, MAX_LAYERS)))
finite_ms = st.floats(0, 1e9, allow_nan=False)
tensors = st.builds(
    lambda t, values: torch.tensor(values[: t * 8], dtype=torch.float32).view(t, 8),
    st.integers(1, 4),
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=32, max_size=32),
)
record = PeerRecord.create(IDENTITIES[0], addresses=["http://10.0.0.1:31337"], now=1.0, ttl=60.0)
next_hops = st.builds(
    protocol.NextHop,
    url=st.sampled_from([u for u in GOOD_URLS if not u.endswith("/")]),
    session=session_ids,
    peer_id=st.just(record.peer_id),
    token=tokens,
    record=st.none() | st.just(record),
)
wire_dtypes = st.sampled_from(list(wire.WIRE_DTYPES))
seals = st.binary(min_size=64, max_size=64)

MESSAGES: dict[str, st.SearchStrategy[protocol.Message]] = {
    "open": st.builds(
        protocol.Open, session_ids, block_ranges, st.integers(1, protocol.MAX_POSITION), wire_dtypes, st.text(max_size=128),
        st.binary(min_size=16, max_size=64), tokens, st.none() | next_hops, st.booleans(),
    ),
    "opened": st.builds(
        protocol.Opened, session_ids, block_ranges, st.integers(1, protocol.MAX_POSITION), peer_ids,
        st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64), st.none() | st.just(record),
    ),
    "step": st.builds(
        protocol.Step, session_ids, st.integers(0, protocol.MAX_STEP), st.integers(0, protocol.MAX_POSITION), tensors,
        wire_dtypes, st.sampled_from(["all", "last"]), st.none() | tokens,
    ),
    "ack": st.one_of(
        st.builds(protocol.Ack, session_ids, st.integers(0, protocol.MAX_STEP), block_ranges, finite_ms, finite_ms, st.integers(0, 2**31), seals),
        st.builds(
            protocol.Ack, session_ids, st.integers(0, protocol.MAX_STEP), block_ranges, finite_ms, finite_ms,
            st.integers(0, 2**31), seals, tensors, wire_dtypes,
        ),
    ),
    "result": st.builds(
        protocol.Result, session_ids, st.integers(0, protocol.MAX_STEP), block_ranges, finite_ms, finite_ms,
        st.integers(0, 2**31), seals, tensors, wire_dtypes,
    ),
    "retarget": st.builds(protocol.Retarget, session_ids, st.none() | next_hops),
    "retargeted": st.builds(protocol.Retargeted, session_ids),
    "close": st.builds(protocol.Close, session_ids),
    "closed": st.builds(protocol.Closed, session_ids),
    "draining": st.builds(protocol.Draining, session_ids),
    "error": st.builds(
        protocol.Error, st.text(max_size=64), st.text(max_size=200), st.none() | session_ids,
        st.none() | st.integers(0, protocol.MAX_STEP), st.none() | peer_ids,
    ),
    "prove": st.builds(protocol.Prove, st.binary(min_size=16, max_size=64)),
    "proof": st.builds(protocol.Proof, peer_ids, st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64)),
    "forward": st.builds(protocol.Forward, block_ranges, st.text(max_size=128), tensors, wire_dtypes),
}  # fmt: skip


def test_every_message_type_is_fuzzed() -> None:
    assert set(MESSAGES) == set(protocol.MESSAGES)


def same_message(a: protocol.Message, b: protocol.Message) -> bool:
    """Field by field; tensors by value in the wire dtype (dataclass == cannot compare tensors)."""
    if type(a) is not type(b):
        return False
    for f in dataclass_fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            dtype = wire.WIRE_DTYPES[a.dtype]  # type: ignore[attr-defined]
            if not (isinstance(y, torch.Tensor) and y.dtype == dtype and torch.equal(x.to(dtype), y)):
                return False
        elif isinstance(x, protocol.NextHop) and isinstance(y, protocol.NextHop):
            if (x.url.rstrip("/"), x.session, x.peer_id, x.token, x.record) != (y.url, y.session, y.peer_id, y.token, y.record):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@fuzz(25)
@given(data=st.data())
def test_every_message_round_trips_through_a_frame(kind: str, data: st.DataObject) -> None:
    message = data.draw(MESSAGES[kind])
    frame = wire.encode(message.to_wire())
    again = protocol.parse(wire.decode(frame), LIMITS)
    assert same_message(message, again)
    assert wire.encode(again.to_wire()) == frame  # one encoding per message


# --- arbitrary maps ----------------------------------------------------------------------------


def parsed(message: Any) -> protocol.Message | None:
    """`parse(message)`, or None when it refuses with a BadRequest; any other exception fails the test."""
    try:
        result = protocol.parse(message, LIMITS)
    except BadRequest:
        return None
    assert isinstance(result, protocol.Message) and result.TYPE == message["type"]
    return result


@fuzz(300)
@given(
    st.one_of(
        packable(10),
        st.builds(
            lambda kind, body: {**body, "type": kind},
            st.sampled_from(sorted(protocol.MESSAGES)) | st.text(max_size=8) | SCALARS,
            st.dictionaries(st.sampled_from(sorted({*KNOWN_FIELDS, "x"})), packable(4), max_size=8),
        ),
    )
)
def test_parse_of_any_map_gives_a_message_or_a_bad_request(message: Any) -> None:
    parsed(message)


@fuzz(200)
@given(st.binary(max_size=300))
def test_decode_then_parse_of_any_bytes_gives_a_message_or_a_bad_request(frame: bytes) -> None:
    try:
        message = wire.decode(frame)
    except BadRequest:
        return
    parsed(message)


# --- one field replaced: accepted exactly when the value is valid --------------------------------

session_like = st.one_of(
    session_ids,
    st.builds(lambda s, tail: s + tail, session_ids, st.sampled_from(["\n", "\r\n", " ", "\x00", "/", "\u00e9", "."])),
    st.text("abcXYZ019_-", min_size=0, max_size=70),
)
CANDIDATES: dict[str, st.SearchStrategy[Any]] = {
    "session": session_like,
    "token": st.one_of(tokens, session_like, st.text("aZ9_-", min_size=14, max_size=66)),
    "blocks": st.lists(st.one_of(st.integers(-1, MAX_LAYERS + 1), st.booleans(), st.floats(0, 10)), max_size=3)
    | st.builds(lambda a, d: [a, a + d], st.integers(-1, MAX_LAYERS), st.integers(-1, 2)),
    "max_length": st.sampled_from([0, 1, -1, protocol.MAX_POSITION, protocol.MAX_POSITION + 1, True, 1.0, 2**64 - 1]),
    "dtype": st.sampled_from([*wire.WIRE_DTYPES, "int8", "float64", "Float32", ""]),
    "model": st.text(max_size=130),
    "nonce": st.binary(max_size=70),
    "step": st.sampled_from([0, -1, protocol.MAX_STEP, protocol.MAX_STEP + 1, 2**62, True, 1.0, "1"]),
    "position": st.sampled_from([0, -1, protocol.MAX_POSITION, protocol.MAX_POSITION + 1, False, 0.0]),
    "output": st.sampled_from(["all", "last", "ALL", "", "first"]),
    "compute_ms": st.sampled_from([0, 0.0, -0.0, -1e-9, 1e308, math.inf, -math.inf, math.nan, True, 2**64 - 1, "1"]),
    "queue_ms": st.floats() | st.integers(-1, 2),
    "batch": st.sampled_from([0, 1, 2**31, 2**31 + 1, -1, True, 1.5]),
    "peer_id": st.sampled_from([IDENTITIES[1].peer_id, IDENTITIES[1].peer_id.upper(), IDENTITIES[1].peer_id + "\n", "a" * 31, "1" * 32]),
    "public_key": st.binary(min_size=30, max_size=34),
    "signature": st.binary(min_size=62, max_size=66),
    "seal": st.binary(min_size=62, max_size=66),
    "tap": st.sampled_from([True, False, 0, 1, 1.0, "true", b"", None]),
    "code": st.text(max_size=70),
    "message": st.text(max_size=20) | st.just("x" * (protocol.MAX_MESSAGE_CHARS + 1)),
    "hop": st.sampled_from([IDENTITIES[2].peer_id, "nobody", "", IDENTITIES[2].peer_id + "\n"]),
    "hidden": st.fixed_dictionaries(
        {"dtype": wire_dtypes, "shape": st.lists(st.integers(-1, 9), min_size=2, max_size=2)}
    ).flatmap(
        lambda t: st.binary(min_size=max(0, math.prod(t["shape"])) * 4, max_size=max(0, math.prod(t["shape"])) * 4 + 2).map(
            lambda data: {**t, "data": data}
        )
    ),
}  # fmt: skip
RULES["hop"] = is_peer_id


def next_candidates(peer_id: str) -> st.SearchStrategy[tuple[Any, bool]]:
    """A `next` map with one part spoiled, and whether it is still valid."""
    good = {"url": "http://10.0.0.2:31337", "session": "s1", "peer_id": peer_id, "token": "t" * 16}
    other = PeerRecord.create(IDENTITIES[3], addresses=["http://10.0.0.3:1"], now=1.0, ttl=60.0)
    parts: dict[str, st.SearchStrategy[tuple[Any, bool]]] = {
        "url": st.sampled_from([(u, True) for u in GOOD_URLS] + [(u, False) for u in BAD_URLS]),
        "session": session_like.map(lambda v: (v, SESSION(v))),
        "peer_id": st.sampled_from([(peer_id, True), (peer_id + "\n", False), ("1" * 32, False), (peer_id.upper(), False), (None, False)]),
        "token": st.one_of(tokens, session_like).map(lambda v: (v, TOKEN(v))),
        "record": st.sampled_from([(None, True), (record.to_bytes(), record.peer_id == peer_id), (other.to_bytes(), other.peer_id == peer_id)])
        | st.binary(max_size=40).map(lambda v: (v, record_bytes_ok(peer_id)(v))),
    }  # fmt: skip

    @st.composite
    def spoiled(draw: st.DrawFn) -> tuple[Any, bool]:
        how = draw(st.sampled_from([*parts, "drop", "extra", "not_a_map"]))
        if how == "not_a_map":
            return draw(SCALARS.filter(lambda v: v is not None) | st.lists(SCALARS, max_size=3)), False  # None: no next
        value = dict(good)
        if how == "drop":
            key = draw(st.sampled_from(sorted(good)))
            del value[key]
            return value, False
        if how == "extra":
            value[draw(st.text(max_size=6).filter(lambda k: k not in (*good, "record")))] = draw(SCALARS)
            return value, False
        value[how], valid = draw(parts[how])
        return value, valid

    return st.none().map(lambda v: (v, True)) | spoiled()


# The fields of each message type (optional ones included), from the protocol's message list.
FIELDS_BY_KIND = {
    "open": {"session", "blocks", "max_length", "dtype", "model", "nonce", "token", "next", "tap"},
    "opened": {"session", "blocks", "max_length", "peer_id", "public_key", "signature", "record"},
    "step": {"session", "step", "position", "hidden", "output", "token"},
    "ack": {"session", "step", "blocks", "compute_ms", "queue_ms", "batch", "seal", "hidden"},
    "result": {"session", "step", "blocks", "compute_ms", "queue_ms", "batch", "seal", "hidden"},
    "retarget": {"session", "next"},
    "retargeted": {"session"},
    "close": {"session"},
    "closed": {"session"},
    "draining": {"session"},
    "error": {"code", "message", "session", "step", "hop"},
    "prove": {"nonce"},
    "proof": {"peer_id", "public_key", "signature"},
    "forward": {"blocks", "model", "hidden"},
}
CHANGES = sorted({name for names in FIELDS_BY_KIND.values() for name in names}) + ["(drop)", "(extra)"]


def test_every_field_of_every_message_is_fuzzed() -> None:
    assert set(FIELDS_BY_KIND) == set(protocol.MESSAGES)
    assert set(CHANGES) - {"(drop)", "(extra)"} <= {*RULES, "next", "record"}


@st.composite
def one_field_replaced(draw: st.DrawFn, change: str) -> tuple[dict[str, Any], str, bool]:
    """A valid message's wire dict with one field (`change`) set to any value, or one dropped or added;
    and whether it stays valid. An optional field the message lacked is added."""
    kinds = sorted(FIELDS_BY_KIND) if change.startswith("(") else sorted(k for k, f in FIELDS_BY_KIND.items() if change in f)
    message = draw(st.sampled_from(kinds).flatmap(lambda kind: MESSAGES[kind]))
    raw = msgpack.unpackb(wire.encode(message.to_wire()), raw=False)  # as a peer's frame arrives
    kind = raw["type"]
    if change == "(drop)":
        key = draw(st.sampled_from(sorted(set(raw) - {"type", "v"})))
        del raw[key]
        return raw, f"{kind}: drop {key}", key in OPTIONAL.get(kind, set())
    if change == "(extra)":
        key = draw(st.text(max_size=8).filter(lambda k: k not in raw and k not in KNOWN_FIELDS))
        raw[key] = draw(SCALARS)
        return raw, f"{kind}: add {key!r}", False
    if change == "next":
        raw["next"], valid = draw(next_candidates(record.peer_id))
        return raw, f"{kind}: next", valid
    if change == "record":
        raw["record"] = value = draw(st.sampled_from([None, record.to_bytes(), b"", b"\x80"]) | st.binary(max_size=20))
        return raw, f"{kind}: record", record_bytes_ok(None)(value)
    candidates = CANDIDATES[change]
    raw[change] = value = draw(st.one_of(candidates, candidates, candidates, packable(3) | EDGE_INTS))
    valid = (value is None and (kind, change) in NONE_MEANS_ABSENT) or RULES[change](value)
    return raw, f"{kind}: {change}", valid


@pytest.mark.parametrize("change", CHANGES)
@fuzz(20)
@given(data=st.data())
def test_a_message_is_accepted_exactly_when_every_field_is_valid(change: str, data: st.DataObject) -> None:
    raw, what, valid = data.draw(one_field_replaced(change))
    note(what)
    message = parsed(raw)
    assert (message is not None) == valid, f"{what}: {'accepted an invalid' if message else 'refused a valid'} value"


@fuzz(150)
@given(next_candidates(record.peer_id))
def test_a_next_hop_is_accepted_exactly_when_it_is_valid(case: tuple[Any, bool]) -> None:
    """`next` alone (it names where a node will dial): the SSRF URLs, ids, tokens and records."""
    raw, valid = case
    message = parsed({"type": "retarget", "session": "s1", "next": raw})
    assert (message is not None) == valid
    if message is not None and raw is not None:
        assert message.next.url == raw["url"].rstrip("/")  # type: ignore[attr-defined]  # the node dials <url>/session


@fuzz(150)
@given(
    st.one_of(
        st.sampled_from([(u, True) for u in GOOD_URLS] + [(u, False) for u in BAD_URLS]),
        st.builds(  # anything after the port but one "/" is a path, query, fragment or garbage
            lambda url, suffix: (url + suffix, suffix == "/"),
            st.sampled_from(["http://a:1", "https://[::1]:8443", "http://node-1.example:80"]),  # "http://a" + ":" is left open
            st.text("?#/@: \n\t%x\\", min_size=1, max_size=3),
        ),
    )
)
def test_a_next_hop_url_is_accepted_exactly_when_it_is_a_bare_base_url(case: tuple[Any, bool]) -> None:
    url, valid = case
    next_hop = {"url": url, "session": "s1", "peer_id": record.peer_id, "token": "t" * 16}
    assert (parsed({"type": "retarget", "session": "s1", "next": next_hop}) is not None) == valid


@pytest.mark.parametrize(
    "kind,field,value",
    [("close", "session", "abc\n"), ("open", "token", "a" * 16 + "\n"), ("step", "token", "b" * 20 + "\n")],
)
def test_regression_a_trailing_newline_is_not_part_of_an_id(kind: str, field: str, value: str) -> None:
    """Found by the fuzzer: the id patterns used `re.match` with `$`, which matches before a final newline."""
    examples = {
        "close": protocol.Close("s1"),
        "open": protocol.Open("s1", (0, 2), 16, "float32", "m", b"n" * 16, "t" * 16),
        "step": protocol.Step("s1", 0, 0, torch.zeros(1, 8), token="t" * 16),
    }
    raw = msgpack.unpackb(wire.encode({**examples[kind].to_wire(), field: value}), raw=False)
    with pytest.raises(BadRequest):
        protocol.parse(raw, LIMITS)
