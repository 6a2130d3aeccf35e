"""Message frames and tensors on the wire.

Every message is a msgpack map with a `type` and the protocol version `v`.
Tensors travel as `{"dtype", "shape", "data"}` where `data` is the raw bytes in
row-major order (bfloat16 as its 2-byte words). Frames are size-checked before
they are unpacked, and every field a peer sends is checked here, at the edge,
with a typed error (never an assert): a bad frame costs its sender an error
reply, never the node.

Message types (fields beyond `type` and `v`), as typed classes in swarm/protocol.py,
whose `from_wire` checks a whole message before anything acts on it:

    open       session, blocks [i, j], max_length, dtype, model, nonce (bytes), token (this hop's push token),
               next? {url, session, peer_id, token, record? (the next hop's signed peer record)},
               tap? (bool: acks carry the output pushed on), head? (K: the last hop applies the LM head and
               answers `head_result` instead of `result`: swarm/head_protocol.py)
    opened     session, blocks, max_length, peer_id, public_key, signature (over the tagged nonce, session, blocks), record?
    step       session, step, position, hidden (tensor [T, D]), output? ("all" | "last"), token? (on a push)
    ack        session, step, blocks, compute_ms, queue_ms, batch, seal, hidden? (when tapped)   (every hop -> owner)
    result     session, step, blocks, compute_ms, queue_ms, batch, seal, hidden   (last hop -> owner)
    retarget   session, next? (as in open)                         (owner only)
    retargeted session
    close      session                                             (owner only)
    closed     session
    draining   session                                             (node -> owner: move the session)
    error      code, message, session?, step?, hop? (peer id of the next hop at fault)
    prove      nonce                                               (pushing node -> next hop, once per connection)
    proof      peer_id, public_key, signature (over the tagged nonce)
    forward    blocks [i, j], model, hidden              (POST /forward, stateless; answered by a map of
               type "result", blocks, hidden, seal (over a one-step transcript: session "forward",
               step 0, position 0), peer_id)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import msgpack
import torch

from swarm.errors import BadRequest, FrameTooLarge, SwarmError, UnsupportedVersion

PROTOCOL_VERSION = 1
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)  # see unpack_tensor

DEFAULT_MAX_FRAME = 64 * 2**20

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def encode(message: dict[str, Any]) -> bytes:
    """A message dict -> one frame. Adds the protocol version."""
    return msgpack.packb({**message, "v": PROTOCOL_VERSION}, use_bin_type=True)


def decode(frame: bytes | bytearray | memoryview, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """One frame -> a message dict with a known version and a string `type`."""
    if len(frame) > max_frame:
        raise FrameTooLarge(f"frame of {len(frame)} bytes is over the {max_frame}-byte limit")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_frame, max_str_len=2**20)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise BadRequest("frame is not a msgpack map")
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True and 1.0 also == 1
        raise UnsupportedVersion(f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    if not isinstance(message.get("type"), str):
        raise BadRequest("message has no string 'type'")
    return message


def error_message(error: SwarmError, **context: Any) -> dict[str, Any]:
    """The error frame for `error`: its wire code and its human message."""
    return {"type": "error", "code": error.code, "message": str(error), **context}


# --- fields ---------------------------------------------------------------------------


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """message[name] checked against `kind` (bool is not accepted as an int)."""
    if name not in message or message[name] is None:
        if optional:
            return None
        raise BadRequest(f"{message.get('type', 'message')} lacks field '{name}'")
    value = message[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRequest(f"field '{name}' must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise BadRequest(f"field '{name}' must be {_kind_name(kind)}, not {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def block_range(message: dict[str, Any], name: str = "blocks") -> tuple[int, int]:
    value = field(message, name, list)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadRequest(f"field '{name}' must be [start, end] integers")
    return int(value[0]), int(value[1])


def wire_dtype(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in WIRE_DTYPES:
        raise BadRequest(f"dtype {name!r} is not supported on the wire (use one of {', '.join(WIRE_DTYPES)})")
    return WIRE_DTYPES[name]


# --- tensors --------------------------------------------------------------------------


def pack_tensor(tensor: torch.Tensor, dtype: str) -> dict[str, Any]:
    """A tensor in the wire dtype `dtype`; `data` shares the tensor's memory (no extra copy)."""
    wire = wire_dtype(dtype)
    tensor = tensor.detach().to(device="cpu", dtype=wire).contiguous()
    # A uint8 view exposes the raw words of any dtype (numpy has no bfloat16).
    data = memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b""
    return {"dtype": dtype, "shape": list(tensor.shape), "data": data}


def unpack_tensor(obj: object, *, hidden_size: int | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """A wire tensor -> torch tensor [T, D], validated: dtype, shape, byte length, finite values.

    The result is a read-only view of the frame's bytes when no conversion is
    needed; callers must not write into it.
    """
    if not isinstance(obj, dict):
        raise BadRequest("tensor must be a map of dtype, shape and data")
    dtype = wire_dtype(obj.get("dtype"))
    shape, data = obj.get("shape"), obj.get("data")
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise BadRequest("tensor shape must be [tokens, hidden] non-negative integers")
    if not isinstance(data, bytes):
        raise BadRequest("tensor data must be bytes")
    tokens, width = shape
    if tokens < 1:
        raise BadRequest("tensor holds no tokens")
    if width < 1:  # torch.frombuffer raises ValueError on empty data
        raise BadRequest("tensor has no hidden width")
    if hidden_size is not None and width != hidden_size:
        raise BadRequest(f"hidden size {width} does not match the model's {hidden_size}")
    if max_tokens is not None and tokens > max_tokens:
        raise BadRequest(f"{tokens} tokens in one tensor is over the limit of {max_tokens}")
    element = dtype.itemsize
    if len(data) != math.prod(shape) * element:
        raise BadRequest(f"tensor data is {len(data)} bytes, shape {shape} of {obj['dtype']} needs {math.prod(shape) * element}")
    # `bytes` are not writable: the tensor is only read (the model computes new tensors
    # from it), so the zero-copy view is safe and torch's warning about it is silenced below.
    tensor = torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(tokens, width)
    if not bool(torch.isfinite(tensor).all()):
        raise BadRequest("tensor holds NaN or infinite values")
    return tensor

