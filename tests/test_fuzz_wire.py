"""Property tests of the frame codec and the field and tensor checks in swarm/wire.py.

Whatever a peer sends, `decode` and the field helpers either return something valid or
raise a `BadRequest`: never another exception, never an invalid value. The tensor check
is compared with an independent oracle (struct, not torch), both ways: nothing invalid
is accepted and nothing valid is refused.
"""

from __future__ import annotations

import re
import struct
from typing import Any
from unittest import mock

import msgpack
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from swarm import protocol, wire
from swarm.errors import BadRequest, FrameTooLarge, UnsupportedVersion
from tests.strategies import EDGE_INTS, ELEMENT_BYTES, FUZZ, INT64, SCALARS, fuzz, mutate_bytes, nested, packable, tensor_oracle

# --- decode ---------------------------------------------------------------------------------


def check_decoded(frame: bytes, max_frame: int = wire.DEFAULT_MAX_FRAME) -> dict[str, Any] | None:
    """`decode(frame)` if it accepts, None if it refuses with a BadRequest; any other outcome fails."""
    try:
        message = wire.decode(frame, max_frame=max_frame)
    except BadRequest:
        return None
    assert isinstance(message, dict)
    version = message["v"]
    assert type(version) is int and version == wire.PROTOCOL_VERSION  # not True, not 1.0
    assert isinstance(message["type"], str)
    assert same(message, msgpack.unpackb(frame, raw=False))  # decode only checks, it changes nothing
    return message


def same(a: Any, b: Any) -> bool:
    """Equal as msgpack sees it (NaN equals NaN)."""
    return msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


def valid_frames() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda kind, body: wire.encode({**body, "type": kind}),
        st.text(max_size=10),
        st.dictionaries(st.text(max_size=10), packable(), max_size=6),
    )


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    return mutate_bytes(draw(valid_frames()), draw)


# Maps that look like messages but get the envelope wrong: version and type of every kind.
wrong_envelopes = st.builds(
    lambda version, kind, body, drop: msgpack.packb(
        {key: value for key, value in {**body, "v": version, "type": kind}.items() if key not in drop},
        use_bin_type=True,
    ),
    st.one_of(st.sampled_from([wire.PROTOCOL_VERSION, True, False, 1.0, 0, 2, -1, "1", b"\x01", [1]]), SCALARS, packable(5)),
    st.one_of(st.text(max_size=8), SCALARS, packable(5)),
    st.dictionaries(st.text(max_size=8), packable(), max_size=4),
    st.sets(st.sampled_from(["v", "type"])),
)


@FUZZ
@given(st.binary(max_size=256))
def test_decode_of_arbitrary_bytes_is_a_message_or_a_bad_request(frame: bytes) -> None:
    check_decoded(frame)


@FUZZ
@given(mutated_frames())
def test_decode_of_a_damaged_frame_is_a_message_or_a_bad_request(frame: bytes) -> None:
    check_decoded(frame)


@FUZZ
@given(wrong_envelopes)
def test_decode_refuses_every_wrong_version_or_type(frame: bytes) -> None:
    raw = msgpack.unpackb(frame, raw=False)
    message = check_decoded(frame)
    envelope_ok = type(raw.get("v")) is int and raw["v"] == wire.PROTOCOL_VERSION and isinstance(raw.get("type"), str)
    assert (message is not None) == envelope_ok


@fuzz(300)
@given(st.one_of(SCALARS, st.lists(packable(), max_size=4)))
def test_decode_refuses_frames_that_are_not_maps(value: Any) -> None:
    with pytest.raises(BadRequest, match="not a msgpack map"):
        wire.decode(msgpack.packb(value, use_bin_type=True))


@fuzz(50)
@given(st.integers(1, 3000), st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"]))
def test_deep_nesting_is_refused_or_decoded_never_a_recursion_error(depth: int, opener: bytes) -> None:
    """Nested arrays or maps, `depth` deep, around one nil: msgpack's stack limit refuses deep ones."""
    frame = b"\x83\xa1v\x01\xa4type\xa1x\xa1n" + opener * depth + b"\xc0"
    check_decoded(frame)
    message = {"type": "step", "payload": nested(min(depth, 400))}  # packb itself recurses
    assert check_decoded(wire.encode(message)) == {**message, "v": wire.PROTOCOL_VERSION}


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, 63))
def test_frames_over_the_limit_are_refused_before_unpacking(frame: bytes, limit: int) -> None:
    assume(len(frame) > limit)
    unpacked = AssertionError("unpacked an oversized frame")
    with mock.patch.object(wire.msgpack, "unpackb", side_effect=unpacked), pytest.raises(FrameTooLarge):
        wire.decode(frame, max_frame=limit)


@FUZZ
@given(valid_frames())
def test_frames_at_the_limit_are_decoded(frame: bytes) -> None:
    assert check_decoded(frame, max_frame=len(frame)) is not None


@FUZZ
@given(st.integers(0, 2**20), st.text(max_size=4))
def test_huge_declared_lengths_are_refused_without_allocating(length: int, kind: str) -> None:
    """A bin/str/array header claiming far more than the frame holds is refused, not trusted."""
    head = msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": kind, "x": None}, use_bin_type=True)[:-1]
    for header in (b"\xc6", b"\xdb", b"\xdd", b"\xdf"):  # bin32, str32, array32, map32
        check_decoded(head + header + struct.pack(">I", 2**32 - 1 - length) + b"\x00" * 8)


# Messages as the wire docstring lists them, with valid field values.
session_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
blocks = st.tuples(st.integers(0, 100), st.integers(1, 100)).map(list)
WIRE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "session": session_ids,
    "blocks": blocks,
    "max_length": st.integers(1, 2**16),
    "dtype": st.sampled_from(list(wire.WIRE_DTYPES)),
    "model": st.text(max_size=40),
    "step": st.integers(0, 2**40),
    "position": st.integers(0, 2**16),
    "output": st.sampled_from(["all", "last"]),
    "compute_ms": st.floats(0, 1e6),
    "queue_ms": st.floats(0, 1e6),
    "batch": st.integers(1, 64),
    "code": st.sampled_from(["bad_request", "busy", "internal"]),
    "message": st.text(max_size=60),
    "hidden": st.builds(
        lambda t, d, dtype: wire.pack_tensor(torch.ones(t, d), dtype),
        st.integers(1, 4),
        st.integers(1, 8),
        st.sampled_from(list(wire.WIRE_DTYPES)),
    ),
    "next": st.fixed_dictionaries({"url": st.just("http://127.0.0.1:8000"), "session": session_ids}),
}
MESSAGE_KINDS = {
    "open": ["session", "blocks", "max_length", "dtype", "model", "next"],
    "opened": ["session", "blocks", "max_length"],
    "step": ["session", "step", "position", "hidden", "output"],
    "ack": ["session", "step", "blocks", "compute_ms", "queue_ms", "batch"],
    "result": ["session", "step", "blocks", "compute_ms", "queue_ms", "batch", "hidden"],
    "close": ["session"],
    "closed": ["session"],
    "error": ["code", "message", "session", "step"],
    "forward": ["blocks", "model", "hidden"],
}


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(MESSAGE_KINDS)))
    return {"type": kind, **{name: draw(WIRE_FIELDS[name]) for name in MESSAGE_KINDS[kind]}}


def plain(value: Any) -> Any:
    """What msgpack gives back for `value`: memoryviews arrive as bytes."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


@FUZZ
@given(messages())
def test_every_message_round_trips(message: dict[str, Any]) -> None:
    assert wire.decode(wire.encode(message)) == {**plain(message), "v": wire.PROTOCOL_VERSION}


@FUZZ
@given(st.dictionaries(st.text(max_size=10), packable(), max_size=6), st.text(max_size=10), packable(3))
def test_encode_always_stamps_this_version(body: dict[str, Any], kind: str, claimed: Any) -> None:
    """A message that carries its own `v` (copied from a peer's frame) still leaves as this version."""
    message = {**body, "type": kind, "v": claimed}
    assert same(check_decoded(wire.encode(message)), {**message, "v": wire.PROTOCOL_VERSION})


@pytest.mark.parametrize("version", [True, 1.0])
def test_regression_a_version_that_only_equals_one_is_refused(version: Any) -> None:
    """Found by the fuzzer: `True == 1` and `1.0 == 1`, so decode took them as version 1."""
    with pytest.raises(UnsupportedVersion):
        wire.decode(msgpack.packb({"type": "open", "v": version}))


# --- fields ----------------------------------------------------------------------------------

KINDS = [int, str, list, dict, bytes, float, bool, (int, float), (str, bytes)]
field_values = st.one_of(packable(8), EDGE_INTS)


def field_oracle(message: dict[str, Any], name: str, kind: Any, optional: bool) -> tuple[bool, Any]:
    """(accepted, value) for `field`, written from its contract rather than its code."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    value = message.get(name)
    if value is None:
        return optional, None
    if isinstance(value, bool):
        return bool in kinds, value
    return isinstance(value, kinds), value


@fuzz(400)
@given(
    st.dictionaries(st.sampled_from(["session", "step", "x", "type"]), field_values, max_size=4),
    st.sampled_from(["session", "step", "x"]),
    st.sampled_from(KINDS),
    st.booleans(),
)
def test_field_accepts_exactly_the_declared_kind(message: dict[str, Any], name: str, kind: Any, optional: bool) -> None:
    accepted, expected = field_oracle(message, name, kind, optional)
    try:
        value = wire.field(message, name, kind, optional=optional)
    except BadRequest:
        assert not accepted
        return
    assert accepted and value is expected


session_values = st.one_of(
    field_values,
    st.text(max_size=70),
    st.text("abcXYZ019_-", max_size=70),
    st.builds(lambda s, tail: s + tail, session_ids, st.sampled_from(["\n", " ", "\x00", "/", "é", "\r\n"])),
)


@fuzz(400)
@given(session_values)
def test_session_ids_are_1_to_64_safe_characters(value: Any) -> None:
    valid = isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value) is not None
    try:
        result = protocol.check_session_id(value)  # the one session id rule, used by every message
    except BadRequest:
        assert not valid
        return
    assert valid and result == value


def test_regression_a_session_id_with_a_trailing_newline_is_refused() -> None:
    """Found by the fuzzer: `re.match` with `$` matches before a final newline."""
    with pytest.raises(BadRequest):
        protocol.check_session_id("abc\n")


block_values = st.one_of(field_values, st.lists(st.one_of(INT64, EDGE_INTS, st.booleans(), st.floats()), max_size=3))


@fuzz(400)
@given(block_values)
def test_block_range_is_two_plain_ints_or_refused(value: Any) -> None:
    valid = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    try:
        start, end = wire.block_range({"blocks": value})
    except BadRequest:
        assert not valid
        return
    assert valid and (start, end) == tuple(value) and type(start) is int and type(end) is int


@fuzz(300)
@given(st.one_of(field_values, st.sampled_from([*wire.WIRE_DTYPES, "int8", "float64", "Float32", "float32 "])))
def test_wire_dtype_names_exactly_the_wire_dtypes(name: Any) -> None:
    valid = isinstance(name, str) and name in wire.WIRE_DTYPES
    try:
        dtype = wire.wire_dtype(name)
    except BadRequest:
        assert not valid
        return
    assert valid and dtype == wire.WIRE_DTYPES[name]


# --- tensors ---------------------------------------------------------------------------------

@st.composite
def wire_tensors(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed tensors (random bytes: some NaN or inf), then one field maybe spoiled."""
    dtype = draw(st.sampled_from(list(ELEMENT_BYTES)))
    tokens, width = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    size = tokens * width * ELEMENT_BYTES[dtype]
    data = draw(st.one_of(st.binary(min_size=size, max_size=size), st.just(bytes(size))))
    obj: dict[str, Any] = {"dtype": dtype, "shape": [tokens, width], "data": data}
    spoil = draw(st.sampled_from([None, None, None, "dtype", "shape", "data", "drop", "extra"]))
    if spoil == "dtype":
        obj["dtype"] = draw(st.one_of(SCALARS, st.sampled_from(["int8", "float64", "FLOAT32"])))
    elif spoil == "shape":
        obj["shape"] = draw(st.one_of(packable(4), st.lists(st.one_of(INT64, EDGE_INTS, st.booleans()), max_size=3)))
    elif spoil == "data":
        obj["data"] = draw(st.one_of(SCALARS, st.binary(max_size=size + 3)))
    elif spoil == "drop":
        del obj[draw(st.sampled_from(sorted(obj)))]
    elif spoil == "extra":
        obj[draw(st.text(max_size=5))] = draw(packable(3))
    return obj


@fuzz(500)
@given(
    st.one_of(wire_tensors(), packable(6)),
    st.none() | st.integers(0, 7),
    st.none() | st.integers(0, 5),
)
def test_unpack_tensor_accepts_exactly_valid_tensors(obj: Any, hidden_size: int | None, max_tokens: int | None) -> None:
    valid = tensor_oracle(obj, hidden_size, max_tokens)
    try:
        tensor = wire.unpack_tensor(obj, hidden_size=hidden_size, max_tokens=max_tokens)
    except BadRequest:
        assert not valid
        return
    assert valid
    tokens, width = obj["shape"]
    assert tensor.shape == (tokens, width) and tokens >= 1 and width >= 1
    assert tensor.dtype == wire.WIRE_DTYPES[obj["dtype"]]
    assert bool(torch.isfinite(tensor).all())
    assert tensor.contiguous().view(torch.uint8).numpy().tobytes() == obj["data"]  # the sender's exact values


def test_regression_a_tensor_of_zero_width_is_a_bad_request() -> None:
    """Found by the fuzzer: shape [1, 0] with empty data reached torch.frombuffer, a ValueError.

    client/session.py unpacks a `result` without a hidden size, so a hostile last hop
    could end the client's reader with an untyped error."""
    with pytest.raises(BadRequest):
        wire.unpack_tensor({"dtype": "float32", "shape": [1, 0], "data": b""})


finite_values = st.floats(min_value=-6e4, max_value=6e4, allow_nan=False, width=32)  # finite in float16 too


@FUZZ
@given(
    st.sampled_from(list(wire.WIRE_DTYPES)),
    st.integers(1, 5),
    st.integers(1, 8),
    st.data(),
)
def test_pack_then_unpack_round_trips_every_wire_dtype(dtype: str, tokens: int, width: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(finite_values, min_size=tokens * width, max_size=tokens * width))
    x = torch.tensor(values, dtype=torch.float32).view(tokens, width)
    frame = wire.encode({"type": "step", "hidden": wire.pack_tensor(x, dtype)})
    out = wire.unpack_tensor(wire.decode(frame)["hidden"], hidden_size=width, max_tokens=tokens)
    assert out.dtype == wire.WIRE_DTYPES[dtype] and out.shape == (tokens, width)
    assert torch.equal(out, x.to(out.dtype))
