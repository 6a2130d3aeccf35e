"""The wire codec alone: frames, fields, tensors."""

from __future__ import annotations

import msgpack
import pytest
import torch

from swarm import wire
from swarm.errors import BadRequest, Busy, FrameTooLarge, UnsupportedVersion, error_from_code


def test_frame_round_trip():
    frame = wire.encode({"type": "open", "session": "abc", "blocks": [0, 3]})
    assert wire.decode(frame) == {"type": "open", "session": "abc", "blocks": [0, 3], "v": wire.PROTOCOL_VERSION}


@pytest.mark.parametrize(
    "frame,error,match",
    [
        (b"\xc1\xc1garbage", BadRequest, "not valid msgpack"),
        (wire.encode({"type": "step", "session": "x"})[:-2], BadRequest, "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), BadRequest, "not a msgpack map"),
        (msgpack.packb({"type": "open", "v": 99}), UnsupportedVersion, "version 99"),
        (msgpack.packb({"type": "open"}), UnsupportedVersion, "version None"),
        (msgpack.packb({"type": 5, "v": wire.PROTOCOL_VERSION}), BadRequest, "string 'type'"),
        (msgpack.packb({1: 2, "v": wire.PROTOCOL_VERSION}), BadRequest, "not valid msgpack"),
    ],
)
def test_bad_frames(frame, error, match):
    with pytest.raises(error, match=match):
        wire.decode(frame)


def test_frame_size_checked_before_unpacking():
    with pytest.raises(FrameTooLarge):
        wire.decode(b"\x00" * 101, max_frame=100)


@pytest.mark.parametrize("dtype", list(wire.WIRE_DTYPES))
def test_tensor_round_trip(dtype):
    x = torch.randn(3, 8)
    packed = msgpack.unpackb(msgpack.packb(wire.pack_tensor(x, dtype)))
    out = wire.unpack_tensor(packed, hidden_size=8)
    assert out.dtype == wire.WIRE_DTYPES[dtype] and out.shape == (3, 8)
    assert torch.equal(out, x.to(out.dtype))


def test_bfloat16_travels_as_two_byte_words():
    x = torch.tensor([[1.0, -2.5]], dtype=torch.bfloat16)
    packed = wire.pack_tensor(x, "bfloat16")
    assert bytes(packed["data"]) == x.view(torch.int16).numpy().tobytes()


def _tensor(**overrides):
    base = {"dtype": "float32", "shape": [2, 4], "data": torch.zeros(2, 4).numpy().tobytes()}
    return {**base, **overrides}


@pytest.mark.parametrize(
    "obj,match",
    [
        ("not a map", "must be a map"),
        (_tensor(dtype="int8"), "not supported on the wire"),
        (_tensor(shape=[2, 4, 1]), "shape must be"),
        (_tensor(shape=[2, -4]), "shape must be"),
        (_tensor(shape=[0, 4], data=b""), "no tokens"),
        (_tensor(data=b"\x00" * 31), "needs 32"),
        (_tensor(data="text"), "data must be bytes"),
        (_tensor(data=torch.full((2, 4), float("nan")).numpy().tobytes()), "NaN or infinite"),
        (_tensor(data=torch.full((2, 4), float("inf")).numpy().tobytes()), "NaN or infinite"),
    ],
)
def test_bad_tensors(obj, match):
    with pytest.raises(BadRequest, match=match):
        wire.unpack_tensor(obj)


def test_tensor_limits():
    with pytest.raises(BadRequest, match="hidden size 4 does not match the model's 576"):
        wire.unpack_tensor(_tensor(), hidden_size=576)
    with pytest.raises(BadRequest, match="over the limit of 1"):
        wire.unpack_tensor(_tensor(), max_tokens=1)


def test_fields():
    message = {"type": "step", "session": "ok-id_1", "step": True, "blocks": [1, 2]}
    assert wire.block_range(message) == (1, 2)
    with pytest.raises(BadRequest, match="not a boolean"):
        wire.field(message, "step", int)
    with pytest.raises(BadRequest, match="lacks field 'position'"):
        wire.field(message, "position", int)


def test_error_codes_round_trip():
    frame = wire.error_message(Busy("full"), session="s")
    error = error_from_code(frame["code"], frame["message"])
    assert isinstance(error, Busy) and str(error) == "full"
