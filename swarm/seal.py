"""Sealed transcripts: a hop signs what it received and what it sent, step by step.

Verification (DESIGN.md, "Trust") needs evidence a stranger cannot forge: to
accuse a node of computing wrong outputs, the accuser must show outputs the
*node itself* committed to, for inputs it committed to. Every hop keeps one
`Transcript` per session: a hash chain over each step it ran,

    d_0 = sha256(TRANSCRIPT_TAG | msgpack[model, blocks, session, peer_id])
    d_i = sha256(d_{i-1} | msgpack[step, position, sha256(input), sha256(output)])

where input and output are the tensors' wire bytes exactly as received and as
sent (`tensor_digest`). With every step's `ack`/`result` the hop returns
`seal = sign(SEAL_TAG + d_i)`. The latest seal commits the hop to the whole
sequence, so whoever holds the inputs, the outputs and that one seal can
replay the chain, check the signature against the hop's public key, and re-run
the blocks: nobody can frame a hop with outputs it never sent, and a hop
cannot deny the outputs it did send.

`agree` is the tolerance rule: two outputs of the same blocks on the same
inputs agree when their relative RMS difference, row by row, is within what
the wire dtype's rounding allows, or a given tolerance (parties of different
precisions: `swarm.precision.tolerance`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
import torch

from swarm import wire
from swarm.identity import verify
from swarm.precision import WIRE_TOLERANCE

TRANSCRIPT_TAG = b"layerswarm/transcript/v1\n"
SEAL_TAG = b"layerswarm/step-seal/v1\n"
FORWARD_SESSION = "forward"  # a POST /forward answer is sealed as step 0 at position 0 of this session

# The wire dtype's rounding alone: what two parties computing alike may differ by (swarm/precision.py
# says why, and what parties of different precisions may differ by: `swarm.precision.tolerance`).
TOLERANCE = WIRE_TOLERANCE


def tensor_digest(dtype: str, shape: list[int] | tuple[int, ...], data: bytes | memoryview) -> bytes:
    """sha256 over a wire tensor: its dtype, shape and raw bytes (what `wire.pack_tensor` sends)."""
    h = hashlib.sha256(msgpack.packb([dtype, list(shape)]))
    h.update(data)
    return h.digest()


def digest_of(tensor: torch.Tensor, dtype: str) -> bytes:
    """`tensor_digest` of a tensor as it travels in wire dtype `dtype` (same bytes as `pack_tensor`)."""
    packed = wire.pack_tensor(tensor, dtype)
    return tensor_digest(packed["dtype"], packed["shape"], packed["data"])


class Transcript:
    """One hop's hash chain over one session's steps (see the module doc)."""

    __slots__ = ("digest", "steps")

    def __init__(self, model: str, blocks: tuple[int, int], session: str, peer_id: str) -> None:
        self.digest = hashlib.sha256(TRANSCRIPT_TAG + msgpack.packb([model, list(blocks), session, peer_id])).digest()
        self.steps = 0

    def update(self, step: int, position: int, input_digest: bytes, output_digest: bytes) -> bytes:
        """Chain one step in; returns the new digest (what the hop seals)."""
        self.digest = hashlib.sha256(self.digest + msgpack.packb([step, position, input_digest, output_digest])).digest()
        self.steps += 1
        return self.digest


def seal_payload(digest: bytes) -> bytes:
    """What a hop signs after each step: the transcript's latest digest, domain separated."""
    return SEAL_TAG + digest


def check_seal(public_key: bytes, seal: bytes, digest: bytes) -> bool:
    """Whether `seal` is the holder of `public_key`'s signature over transcript digest `digest`."""
    return verify(public_key, seal, seal_payload(digest))


@dataclass(frozen=True)
class Disagreement:
    """How far apart two outputs are: the worst row's relative RMS difference, and which row."""

    error: float
    row: int


def difference(claimed: torch.Tensor, reference: torch.Tensor) -> Disagreement:
    """Relative RMS difference of each row of `claimed` [T, D] from `reference` [T, D]; the worst row."""
    if claimed.shape != reference.shape:
        return Disagreement(float("inf"), -1)
    a, b = claimed.float(), reference.float()
    rms = b.pow(2).mean(dim=-1).sqrt().clamp_min(1e-12)
    errors = (a - b).pow(2).mean(dim=-1).sqrt() / rms
    worst = int(errors.argmax())
    return Disagreement(float(errors[worst]), worst)


def agree(claimed: torch.Tensor, reference: torch.Tensor, dtype: str, tolerance: float | None = None) -> bool:
    """Whether two outputs of the same blocks on the same inputs agree within wire dtype `dtype`'s rounding."""
    limit = TOLERANCE.get(dtype, TOLERANCE["float32"]) if tolerance is None else tolerance
    return difference(claimed, reference).error <= limit
