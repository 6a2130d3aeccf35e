"""The answer of a last hop that applies the LM head (`swarm-node --serve-head`), as a typed message.

A session opened with `Open.head = K` ends at the model's last block on a node
that serves the head. Each step is then answered with a `head_result`: the
`result` it would have sent (the last position's hidden state, sealed as usual,
so the hop's blocks can still be verified) plus only what sampling needs from
the logits over the whole vocabulary:

    head_result  session, step, blocks, compute_ms, queue_ms, batch, seal, hidden [1, D],
                 ids (K int32, little endian), logits (K float32, little endian: descending),
                 logsumexp (float: over all V logits)

`from_wire` checks the whole message: K in [1, MAX_HEAD_K], as many ids as
logits, finite logits in descending order, distinct ids, and a logsumexp no
smaller than the largest logit. Ids are checked against the vocabulary by the
client, which knows it (client/remote_head.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from swarm.protocol import MAX_HEAD_K, NO_LIMITS, Ack, BadMessage, Limits, Message, Result, _bytes, _check_keys, _tensor, parse

_FIELDS = frozenset(
    {"session", "step", "blocks", "compute_ms", "queue_ms", "batch", "seal", "hidden", "ids", "logits", "logsumexp"}
)


@dataclass(frozen=True)
class HeadResult(Result):
    """A `Result` whose hop also applied the LM head: the top-K ids, their logits, and the logsumexp of all."""

    TYPE: ClassVar[str] = "head_result"
    ids: torch.Tensor | None = None  # [K] int64, most likely first
    logits: torch.Tensor | None = None  # [K] float32, descending
    logsumexp: float = 0.0  # over all V logits: log-probabilities of the candidates stay exact

    def to_wire(self) -> dict[str, Any]:
        assert self.ids is not None and self.logits is not None, "a head result carries its candidates"
        out = super().to_wire()
        out["type"] = self.TYPE
        out["ids"] = self.ids.to(torch.int32).contiguous().numpy().tobytes()
        out["logits"] = self.logits.to(torch.float32).contiguous().numpy().tobytes()
        out["logsumexp"] = float(self.logsumexp)
        return out

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> HeadResult:
        _check_keys(message, cls.TYPE, _FIELDS)
        hidden, dtype = _tensor(message, "hidden", limits)
        raw_ids = _bytes(message, "ids", 4, 4 * MAX_HEAD_K)
        raw_logits = _bytes(message, "logits", 4, 4 * MAX_HEAD_K)
        if len(raw_ids) % 4 or len(raw_ids) != len(raw_logits):
            raise BadMessage("fields 'ids' and 'logits' must hold the same number of 4-byte values")
        ids = torch.frombuffer(bytearray(raw_ids), dtype=torch.int32).to(torch.int64)
        logits = torch.frombuffer(bytearray(raw_logits), dtype=torch.float32)
        lse = message["logsumexp"]
        if not isinstance(lse, float) or not math.isfinite(lse):
            raise BadMessage("field 'logsumexp' must be a finite float")
        if not bool(torch.isfinite(logits).all()) or bool((logits[1:] > logits[:-1]).any()):
            raise BadMessage("field 'logits' must be finite and in descending order")
        if bool((ids < 0).any()) or ids.unique().numel() != ids.numel():
            raise BadMessage("field 'ids' must be distinct non-negative token ids")
        if lse < float(logits[0]):
            raise BadMessage("field 'logsumexp' is below the largest logit")
        return cls(**Ack._timing(message), hidden=hidden, dtype=dtype, ids=ids, logits=logits, logsumexp=lse)


def parse_session(message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Message:
    """`swarm.protocol.parse`, and `head_result` too: what a session's owner may receive."""
    if isinstance(message, dict) and message.get("type") == HeadResult.TYPE:
        return HeadResult.from_wire(message, limits)
    return parse(message, limits)
