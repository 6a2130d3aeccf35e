"""Hypothesis strategies and settings shared by the fuzz tests (tests/test_fuzz_*.py).

The fuzz tests run derandomized (the same examples on every run, so CI cannot flake on
a lucky draw) and never write a hypothesis database into the checkout.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from swarm.identity import Identity
from swarm.records import MAX_ADDRESSES, MAX_FREE_KV_BYTES, MAX_LAYERS, MAX_PROTOCOL, MAX_THROUGHPUT, MODEL_KEYS

# Used as a decorator (`@FUZZ`), not a loaded profile: loading one would change the settings
# of every other hypothesis test in the same pytest run.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(max_examples: int) -> settings:
    """FUZZ with another example budget (cheap properties run more, signing ones fewer)."""
    return settings(FUZZ, max_examples=max_examples)


# --- msgpack values -----------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # every int msgpack can carry
EDGE_INTS = st.sampled_from([0, 1, -1, 2, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    EDGE_INTS,
    st.floats(),
    EDGE_FLOATS,
    st.text(max_size=20),
    st.binary(max_size=20),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)


def packable(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any value msgpack can pack: scalars, lists and str-keyed maps, nested."""
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.dictionaries(st.text(max_size=10), inner, max_size=5),
        ),
        max_leaves=max_leaves,
    )


def nested(depth: int, leaf: Any = 0) -> Any:
    """`leaf` inside `depth` one-element lists: deep nesting without recursion in the builder."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def mutate_bytes(data: bytes, draw: st.DrawFn) -> bytes:
    """One random edit of `data`: flip, set, insert or delete a byte, or truncate."""
    if not data:
        return draw(st.binary(min_size=1, max_size=4))
    index = draw(st.integers(0, len(data) - 1))
    kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
    if kind == "flip":
        bit = 1 << draw(st.integers(0, 7))
        return data[:index] + bytes([data[index] ^ bit]) + data[index + 1 :]
    if kind == "set":
        value = draw(st.integers(0, 255).filter(lambda b: b != data[index]))
        return data[:index] + bytes([value]) + data[index + 1 :]
    if kind == "insert":
        return data[:index] + bytes([draw(st.integers(0, 255))]) + data[index:]
    if kind == "delete":
        return data[:index] + data[index + 1 :]
    return data[:index]


# --- identities and peer records ------------------------------------------------------------

# Fixed keys (not Identity.generate()): derandomized tests need the same records every run.
IDENTITIES = tuple(Identity(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)) for seed in range(1, 7))

_HOST_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
hosts = st.one_of(
    st.text(_HOST_CHARS, min_size=1, max_size=60).filter(lambda h: not h.startswith("-")),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda q: ".".join(map(str, q))),
    st.sampled_from(["[::1]", "[fe80::1]", "[2001:db8::42]"]),
)
addresses = st.builds(
    lambda scheme, host, port, slash: f"{scheme}://{host}:{port}{slash}",
    st.sampled_from(["http", "https"]),
    hosts,
    st.integers(1, 65535),
    st.sampled_from(["", "/"]),
)
model_fields = st.text(min_size=1, max_size=128)
models = st.fixed_dictionaries({key: model_fields for key in MODEL_KEYS})
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def record_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments for `PeerRecord.create` (all but the identity), every one within its limits."""
    fields: dict[str, Any] = {
        "addresses": draw(st.lists(addresses, min_size=1, max_size=MAX_ADDRESSES)),
        "now": draw(st.floats(0.0, 4e9)),
        "ttl": draw(st.floats(0.001, 600.0)),
        "throughput": draw(st.floats(0.0, MAX_THROUGHPUT)),
        "load": draw(st.floats(0.0, 1.0)),
        "free_kv_bytes": draw(st.none() | st.integers(0, MAX_FREE_KV_BYTES)),
        "protocol": draw(st.integers(1, MAX_PROTOCOL)),
        "leaving": draw(st.booleans()),
    }
    if draw(st.booleans()):  # a serving peer; else a bootstrap-only one
        num_layers = draw(st.integers(1, MAX_LAYERS))
        start = draw(st.integers(0, num_layers - 1))
        end = draw(st.integers(start + 1, num_layers))
        fields.update(model=draw(models), num_layers=num_layers, span=draw(st.none() | st.just((start, end))))
    return fields


# --- oracles: what the wire format allows, written from its rules, not from swarm/wire.py ----

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def element_values(dtype: str, data: bytes) -> list[float]:
    """The numbers in `data`, decoded with struct (little-endian, like torch on every host we run)."""
    if dtype == "float32":
        return [v for (v,) in struct.iter_unpack("<f", data)]
    if dtype == "float16":
        return [v for (v,) in struct.iter_unpack("<e", data)]
    return [struct.unpack("<f", b"\x00\x00" + data[i : i + 2])[0] for i in range(0, len(data), 2)]  # bfloat16: top half


def tensor_oracle(obj: Any, hidden_size: int | None, max_tokens: int | None) -> bool:
    """Whether `unpack_tensor` must accept `obj`, from the wire contract alone."""
    if not isinstance(obj, dict) or not isinstance(obj.get("dtype"), str) or obj["dtype"] not in ELEMENT_BYTES:
        return False
    shape, data = obj.get("shape"), obj.get("data")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int for n in shape)):
        return False
    tokens, width = shape
    if tokens < 1 or width < 1 or not isinstance(data, bytes):
        return False
    if (hidden_size is not None and width != hidden_size) or (max_tokens is not None and tokens > max_tokens):
        return False
    if len(data) != tokens * width * ELEMENT_BYTES[obj["dtype"]]:
        return False
    return all(math.isfinite(v) for v in element_values(obj["dtype"], data))
