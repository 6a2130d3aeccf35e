"""The answer of a last hop that applies the LM head (`swarm-node --serve-head`), as a typed message.

A session opened with `Open.head = K` ends at the model's last block on a node
that serves the head. Each step is then answered with a `head_result`: the
`result` it would have sent (the rows the step outputs, sealed as usual, so the
hop's blocks can still be verified: the last position's for output "last",
every position's for output "all", as a speculative step of k+1 positions asks)
plus, for each of those T rows, only what sampling needs from the logits over
the whole vocabulary:

    head_result  session, step, blocks, compute_ms, queue_ms, batch, seal, hidden [T, D],
                 ids (T x K int32, little endian, row by row),
                 logits (T x K float32, little endian: each row descending),
                 logsumexp (T float32, little endian: each over all V logits of its row)

T is at most MAX_HEAD_ROWS (a step of 32 drafts and the current token); a step
asking the head for more rows is refused (node/head_service.py). `from_wire`
checks the whole message: T in [1, MAX_HEAD_ROWS] and equal to the hidden rows,
K in [1, MAX_HEAD_K] and the same for every row, finite logits in descending
order per row, distinct ids per row, and each row's logsumexp finite and no
smaller than its largest logit. Ids are checked against the vocabulary by the
client, which knows it (client/remote_head.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from swarm.protocol import (
    MAX_HEAD_K,
    NO_LIMITS,
    Ack,
    BadMessage,
    Limits,
    Message,
    Result,
    bytes_field,
    check_keys,
    parse,
    tensor_field,
)

MAX_HEAD_ROWS = 33  # rows one head_result answers: a speculative step of 32 drafts and the current token

_FIELDS = frozenset(
    {"session", "step", "blocks", "compute_ms", "queue_ms", "batch", "seal", "hidden", "ids", "logits", "logsumexp"}
)


@dataclass(frozen=True)
class HeadResult(Result):
    """A `Result` whose hop also applied the LM head to each row it sends: per row, the top-K ids,
    their logits, and the logsumexp of all."""

    TYPE: ClassVar[str] = "head_result"
    ids: torch.Tensor | None = None  # [T, K] int64, most likely first
    logits: torch.Tensor | None = None  # [T, K] float32, each row descending
    logsumexp: torch.Tensor | None = None  # [T] float32, over all V logits: log-probabilities of the candidates stay exact

    def to_wire(self) -> dict[str, Any]:
        assert self.ids is not None and self.logits is not None and self.logsumexp is not None, "a head result carries its candidates"
        out = super().to_wire()
        out["type"] = self.TYPE
        out["ids"] = self.ids.to(torch.int32).contiguous().numpy().tobytes()
        out["logits"] = self.logits.to(torch.float32).contiguous().numpy().tobytes()
        out["logsumexp"] = self.logsumexp.to(torch.float32).contiguous().numpy().tobytes()
        return out

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> HeadResult:
        check_keys(message, cls.TYPE, _FIELDS)
        hidden, dtype = tensor_field(message, "hidden", limits)
        rows = hidden.shape[0]
        if rows > MAX_HEAD_ROWS:
            raise BadMessage(f"a head_result answers at most {MAX_HEAD_ROWS} rows, not {rows}")
        raw_ids = bytes_field(message, "ids", 4 * rows, 4 * rows * MAX_HEAD_K)
        raw_logits = bytes_field(message, "logits", 4 * rows, 4 * rows * MAX_HEAD_K)
        raw_lse = bytes_field(message, "logsumexp", 4 * rows, 4 * rows)
        if len(raw_ids) % (4 * rows) or len(raw_ids) != len(raw_logits):
            raise BadMessage(f"fields 'ids' and 'logits' must hold the same number of 4-byte values for each of the {rows} rows")
        k = len(raw_ids) // (4 * rows)
        ids = torch.frombuffer(bytearray(raw_ids), dtype=torch.int32).to(torch.int64).view(rows, k)
        logits = torch.frombuffer(bytearray(raw_logits), dtype=torch.float32).view(rows, k)
        lse = torch.frombuffer(bytearray(raw_lse), dtype=torch.float32)
        if not bool(torch.isfinite(lse).all()):
            raise BadMessage("field 'logsumexp' must be finite")
        if not bool(torch.isfinite(logits).all()) or bool((logits[:, 1:] > logits[:, :-1]).any()):
            raise BadMessage("field 'logits' must be finite and in descending order in each row")
        if bool((ids < 0).any()) or bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise BadMessage("field 'ids' must be distinct non-negative token ids in each row")
        if bool((lse < logits[:, 0]).any()):
            raise BadMessage("field 'logsumexp' is below the largest logit of its row")
        return cls(**Ack._timing(message), hidden=hidden, dtype=dtype, ids=ids, logits=logits, logsumexp=lse)


def parse_session(message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Message:
    """`swarm.protocol.parse`, and `head_result` too: what a session's owner may receive."""
    if isinstance(message, dict) and message.get("type") == HeadResult.TYPE:
        return HeadResult.from_wire(message, limits)
    return parse(message, limits)
